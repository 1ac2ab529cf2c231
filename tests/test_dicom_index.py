"""DICOM through the indexer: metadata and the PHI policy, DICOMDIR, series vectors, preview."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from .conftest import PYDICOM_TEST_FILES as TF
from .serving import run_cli

def _index(tmp_path: Path, model: Path, roots: list, **options):
    from indexer.pipeline import Indexer
    from retrieval.store import manifest_for
    from retrieval.model import VisionEncoder
    from retrieval.store import Store

    encoder = VisionEncoder.load(str(model), "cpu")
    store = Store.open_or_create(tmp_path / "store", manifest_for(encoder, "Flat"))
    report = Indexer(store, encoder, workers=0, batch_size=8, progress=False, **options).run(roots)
    return store, report


def _all_rows(store) -> list[dict]:
    ids = list(store.all_vectors()[0])
    return list(store.rows([int(i) for i in ids]).values())


@pytest.mark.parametrize("policy", ["hash", "keep", "drop"])
def test_phi_policy_and_direct_identifiers_never_stored(tiny_model, tmp_path, policy):
    folder = tmp_path / "in"
    folder.mkdir()
    ds = pydicom.dcmread(TF / "CT_small.dcm")
    ds.PatientName, ds.PatientID = "Secretname^Alice", "MRN-0042"
    ds.PatientBirthDate, ds.PatientAddress = "19700101", "1 Hidden Street"
    ds.AccessionNumber, ds.InstitutionName = "ACC-9876", "Hospital of Secrets"
    ds.ReferringPhysicianName, ds.OperatorsName = "Refer^Bob", "Oper^Carol"
    ds.BodyPartExamined, ds.ViewPosition, ds.PatientAge = "chest", "ap", "045Y"
    ds.save_as(folder / "ct.dcm")
    store, report = _index(tmp_path, tiny_model, [folder], phi_policy=policy)
    assert report.indexed == 1
    (row,) = _all_rows(store)
    meta = row["metadata"]
    assert meta["modality"] == "CT" and meta["body_part"] == "CHEST" and meta["view_position"] == "AP"
    assert meta["patient_age"] == "045Y" and meta["study_uid"] == str(ds.StudyInstanceUID)
    if policy == "hash":
        assert len(meta["patient_key"]) == 32 and "MRN" not in meta["patient_key"]
    elif policy == "keep":
        assert meta["patient_key"] == "MRN-0042"
    else:
        assert "patient_key" not in meta
    store.close()
    raw = b"".join(p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file())
    for secret in (b"Secretname", b"19700101", b"Hidden Street", b"ACC-9876", b"Secrets",
                   b"Refer^Bob", b"Oper^Carol"):
        assert secret not in raw, secret
    assert (b"MRN-0042" in raw) == (policy == "keep")


def test_hash_key_is_stable_in_a_store_and_differs_between_stores(tiny_model, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(TF / name, folder / name)
    store_a, _ = _index(tmp_path / "a", tiny_model, [folder])
    store_b, _ = _index(tmp_path / "b", tiny_model, [folder])
    keys_a = {r["metadata"]["sop_uid"]: r["metadata"].get("patient_key") for r in _all_rows(store_a)}
    keys_b = {r["metadata"]["sop_uid"]: r["metadata"].get("patient_key") for r in _all_rows(store_b)}
    assert keys_a.keys() == keys_b.keys() and all(keys_a.values())
    assert not set(keys_a.values()) & set(keys_b.values())   # a per-store secret
    store_a.close(), store_b.close()


def test_dicomdir_is_followed_and_skipped_itself(tiny_model, tmp_path):
    from indexer.dicomdir import referenced_files

    src = TF / "dicomdirtests"
    folder = tmp_path / "media"
    for patient in ("77654033", "98892001", "98892003"):
        shutil.copytree(src / patient, folder / patient)
    shutil.copy(src / "DICOMDIR", folder / "DICOMDIR")
    referenced = referenced_files(folder / "DICOMDIR")
    assert len(referenced) == 31                       # every record's file exists
    # index the DICOMDIR alone: its referenced files come along
    store, report = _index(tmp_path, tiny_model, [folder / "DICOMDIR"])
    assert report.total == 1 + len(referenced)
    assert [Path(s["path"]).name for s in report.skipped] == ["DICOMDIR"]
    assert "media directory" in report.skipped[0]["reason"]
    assert report.indexed + report.failed == len(referenced) and report.indexed > 20
    store.close()
    # a second run finds them unchanged
    store, again = _index(tmp_path, tiny_model, [folder / "DICOMDIR"])
    assert again.indexed == 0 and again.unchanged == report.indexed
    store.close()


def test_series_vectors(tiny_model, tmp_path):
    from indexer.series import SOURCE_KIND, series_path

    folder = tmp_path / "series"
    folder.mkdir()
    base = pydicom.dcmread(TF / "CT_small.dcm")
    series_uid = pydicom.uid.generate_uid()
    arr = base.pixel_array
    for i in range(3):                                 # one CT series of three slices
        ds = pydicom.dcmread(TF / "CT_small.dcm")
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, pydicom.uid.generate_uid()
        ds.PixelData = np.roll(arr, 7 * i, axis=0).astype(arr.dtype).tobytes()
        ds.save_as(folder / f"slice{i}.dcm")
    shutil.copy(TF / "MR_small.dcm", folder / "mr.dcm")   # a series of one: no series vector
    store, report = _index(tmp_path, tiny_model, [folder], series_vectors=True)
    assert report.indexed == 4 and report.series == 1
    rows = _all_rows(store)
    series = [r for r in rows if r["metadata"]["source_kind"] == SOURCE_KIND]
    assert len(series) == 1 and series[0]["frame"] == -1 and series[0]["path"] == series_path(series_uid)
    assert series[0]["metadata"]["modality"] == "CT" and "sop_uid" not in series[0]["metadata"]
    members = [r["id"] for r in rows if r["metadata"].get("series_uid") == series_uid
               and r["metadata"]["source_kind"] != SOURCE_KIND]
    mean = store.vectors(members).mean(axis=0)
    # stored as float16: equal to half a float16 step (2**-11 relative)
    np.testing.assert_allclose(store.vectors([series[0]["id"]])[0], mean / np.linalg.norm(mean),
                               rtol=2 ** -11, atol=1e-5)
    store.close()
    # removing a slice updates the series vector; removing all but one drops it
    (folder / "slice2.dcm").unlink()
    store, report = _index(tmp_path, tiny_model, [folder], series_vectors=True)
    assert report.removed == 1 and report.series == 1
    (folder / "slice1.dcm").unlink()
    store.close()
    store, report = _index(tmp_path, tiny_model, [folder], series_vectors=True)
    assert not [r for r in _all_rows(store) if r["metadata"]["source_kind"] == SOURCE_KIND]
    store.close()


_cli = run_cli


def test_preview_writes_what_the_model_sees(tmp_path, capsys):
    import torch

    from indexer.view import read_image
    from retrieval.model.preprocess import model_input_to_uint8

    out = tmp_path / "ybr.png"
    code, stdout, stderr = _cli(capsys, "preview", str(TF / "examples_ybr_color.dcm"), "--out",
                                str(out), "--size", "64", "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["frame"] == 15 and doc["frames"] == 30 and doc["size"] == 64
    shown = np.asarray(Image.open(out))
    decoded = read_image(TF / "examples_ybr_color.dcm", image_size=64)
    np.testing.assert_array_equal(shown, model_input_to_uint8(torch.from_numpy(decoded.tensor)))
    # the padding of a non-square image is black, the image centred
    assert shown[:5].max() == 0 and shown[-5:].max() == 0 and shown[32].max() > 0

    frame0 = tmp_path / "f0.png"
    assert _cli(capsys, "preview", str(TF / "examples_ybr_color.dcm"), "--frame", "0",
                "--out", str(frame0), "--size", "64")[0] == 0
    assert not np.array_equal(np.asarray(Image.open(frame0)), shown)
    code, stdout, _ = _cli(capsys, "preview", str(TF / "test-SR.dcm"), "--out",
                           str(tmp_path / "x.png"), "--json")
    assert code == 2 and "no pixel data" in json.loads(stdout)["error"]
    code, _, stderr = _cli(capsys, "preview", str(TF / "CT_small.dcm"), "--window", "nope",
                           "--out", str(tmp_path / "y.png"))
    assert code == 2 and "window must be one of" in stderr


def test_dicomdir_records_pointing_outside_its_folder_are_refused_never_read(tiny_model, tmp_path):
    """Defect 6: ``..``, absolute and symlinked ReferencedFileIDs become failures, not sources."""
    from pydicom.fileset import FileSet

    secret = tmp_path / "secret.dcm"                       # beside the media folder, outside it
    shutil.copy(TF / "MR_small.dcm", secret)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(TF / "MR_small.dcm", outside / "OTHER.DCM")
    folder = tmp_path / "media"
    fs = FileSet()
    for number in range(4):
        ds = pydicom.dcmread(TF / "CT_small.dcm")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = number + 1
        fs.add(ds)
    fs.write(folder)
    (folder / "LINK").symlink_to(outside, target_is_directory=True)
    ds = pydicom.dcmread(folder / "DICOMDIR")
    instances = [r for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r]
    assert len(instances) == 4
    instances[1].ReferencedFileID = ["..", "secret.dcm"]
    instances[2].ReferencedFileID = str(secret)            # an absolute path
    instances[3].ReferencedFileID = ["LINK", "OTHER.DCM"]  # a symlink out of the folder
    ds.save_as(folder / "DICOMDIR")

    store, report = _index(tmp_path, tiny_model, [folder / "DICOMDIR"])
    failed = {Path(f["path"].split("#")[0]).name: f["reason"] for f in report.failures}
    assert report.failed == 3 and set(failed) == {"DICOMDIR"}, report.failures
    indexed = [r["path"] for r in _all_rows(store)]
    assert len(indexed) == 1 and all(Path(p).resolve().is_relative_to(folder.resolve())
                                     for p in indexed)
    assert not any("secret" in p or "OTHER" in p for p in indexed)
    store.close()
    from indexer.dicomdir import dicomdir_references

    inside, refused = dicomdir_references(folder / "DICOMDIR")
    assert len(inside) == 1 and inside[0].resolve().is_relative_to(folder.resolve())
    assert len(refused) == 3
    assert all("DICOMDIR" in reason and "record" in reason and "outside" in reason
               for _, reason in refused)
