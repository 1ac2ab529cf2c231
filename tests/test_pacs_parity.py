"""A PACS path as robust as the folder path: every DICOM test file a real Orthanc accepts is
indexed once from its folder and once from the PACS (DICOMweb, and DIMSE C-GET); both give the
same SOP Instance UIDs, the same vectors and the same failure and skip reasons.

The set: pydicom's test files (odd encodings, big-endian, missing or partial File Meta,
compressed syntaxes, truncations, an SR), plus crafted ones: a UID that is not a dotted number
(must be URL-encoded, not refused) and an unsupported transfer syntax (Deflated Image Frame
Compression), which must fail with the folder path's reason, not "unexpected ValueError".
"""

from __future__ import annotations

import io
import warnings
import zlib
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from indexer.pacs import PacsAccess
from indexer.pipeline import Indexer
from retrieval.model import VisionEncoder
from retrieval.store import Store, manifest_for

from .conftest import PYDICOM_TEST_FILES
from .orthanc import running_orthanc

DEFLATED_FRAMES = "1.2.840.10008.1.2.8.1"  # Deflated Image Frame Compression (2024)
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
ODD_UID = "1.2.826.0.1.3680043.8.498.odd-uid_7"


def _sop_uid(data: bytes) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
            return str(ds.SOPInstanceUID).strip() or None
    except Exception:
        return None


def _crafted() -> dict[str, bytes]:
    """Files no public set has: an odd UID, a transfer syntax no decoder supports."""
    out = {}
    ds = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ODD_UID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    out["odd_uid.dcm"] = buffer.getvalue()
    ds = pydicom.dcmread(PYDICOM_TEST_FILES / "MR_small.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID + ".8"
    # pydicom writes no syntax it does not know: written as JPEG Baseline (encapsulated, the
    # same UID length padded), then the UID is swapped
    ds.file_meta.TransferSyntaxUID = JPEG_BASELINE
    ds.PixelData = encapsulate([zlib.compress(ds.PixelData)])
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    assert data.count(JPEG_BASELINE.encode()) == 1
    out["deflated_frames.dcm"] = data.replace(JPEG_BASELINE.encode(),
                                              DEFLATED_FRAMES.encode() + b"\0")
    return out


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Orthanc (DICOMweb and DICOM port) holding every test file it accepts, one per SOP
    Instance UID, and a folder with exactly those files; ``sop_of`` maps a file to its UID."""
    folder = tmp_path_factory.mktemp("parity-files")
    candidates = {p.name if p.parent == PYDICOM_TEST_FILES else f"{p.parent.name}_{p.name}":
                  p.read_bytes() for p in sorted(PYDICOM_TEST_FILES.rglob("*")) if p.is_file()}
    candidates.update(_crafted())
    modalities = {"medsearch": ["MEDSEARCH", "127.0.0.1", 104]}
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), dicom=True,
                         modalities=modalities) as server:
        sop_of: dict[str, str] = {}
        for name, data in candidates.items():
            sop = _sop_uid(data)
            if sop is None or sop in sop_of.values():
                continue
            reply = server.upload(data)
            if reply.status_code == 200 and reply.json().get("Status") == "Success":
                (folder / name).write_bytes(data)
                sop_of[str(folder / name)] = sop
        assert ODD_UID in sop_of.values() and len(sop_of) > 60, len(sop_of)
        yield server, folder, sop_of


def _index(store_dir: Path, model: Path, source: str):
    encoder = VisionEncoder.load(str(model), "cpu")
    store = Store.open_or_create(store_dir, manifest_for(encoder, "Flat"))
    try:
        # one image per forward pass: the same vectors whatever order the sources come in
        with Indexer(store, encoder, workers=1, batch_size=1, progress=False,
                     pacs=PacsAccess(timeout_s=20)) as indexer:
            report = indexer.run([source]).to_json()
        rows = store.rows([int(i) for i in store.vector_ids()])
        vectors = {}
        for image_id, row in rows.items():
            vectors[(row["path"], row["frame"])] = store.vectors([image_id])[0]
        return report, vectors
    finally:
        store.close()


def _by_sop(report: dict, vectors: dict, sop_of) -> tuple[dict, dict, dict]:
    failed = {sop_of(f["path"]): f["reason"] for f in report["failures"]}
    skipped = {sop_of(s["path"]): s["reason"] for s in report["skipped"]}
    by_sop = {(sop_of(path), frame): v for (path, frame), v in vectors.items()}
    return failed, skipped, by_sop


def _pacs_sop(path: str) -> str:
    return unquote(path.rsplit("/", 1)[1])


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_folder_and_pacs_index_the_same(loaded, tiny_model, tmp_path, protocol):
    server, folder, sop_of = loaded
    folder_report, folder_vectors = _index(tmp_path / "folder", tiny_model, str(folder))
    source = server.dicomweb if protocol == "dicomweb" else server.dimse
    pacs_report, pacs_vectors = _index(tmp_path / "pacs", tiny_model, source)

    assert pacs_report["total"] == folder_report["total"] == len(sop_of)
    f_failed, f_skipped, f_vectors = _by_sop(folder_report, folder_vectors, sop_of.__getitem__)
    p_failed, p_skipped, p_vectors = _by_sop(pacs_report, pacs_vectors, _pacs_sop)
    deflated = {sop for sop in f_failed if sop.endswith(".8")}
    assert len(deflated) == 1 and "Deflated Image Frame" in f_failed[min(deflated)]
    if protocol == "dimse":  # Orthanc's DICOM stack cannot send a syntax newer than itself
        sop = deflated.pop()
        assert "sent no instance (status 0x" in p_failed.pop(sop)
        f_failed.pop(sop)
    assert p_failed == f_failed
    assert p_skipped == f_skipped
    assert set(p_vectors) == set(f_vectors)
    cosines = {key: float(np.dot(f_vectors[key], p_vectors[key])
                          / np.linalg.norm(f_vectors[key]) / np.linalg.norm(p_vectors[key]))
               for key in f_vectors}
    worst = min(cosines, key=cosines.get)
    assert cosines[worst] >= 0.9999, (worst, [p for p, s in sop_of.items() if s == worst[0]])
    # what the issue found lost on the PACS path is there
    assert (ODD_UID, 0) in p_vectors
    assert not any("retrieval failed" in r or "C-GET" in r for r in p_failed.values())
