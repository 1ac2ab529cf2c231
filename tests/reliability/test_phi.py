"""PHI: the patient-key secret lives outside the store, consent withdrawal sticks, paths redact.

Real DICOM files (pydicom's test files with PatientID set), real stores, the real CLI and a real
server on loopback. Every test here failed before the fix it guards (see docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import pickle
import shutil
import sqlite3
import stat
from pathlib import Path

import httpx
import pydicom
import pytest

from retrieval.errors import MedsearchError

from ..conftest import PYDICOM_TEST_FILES as TF, write_images
from ..serving import cli, index_store, make_app, running

PATIENT_A, PATIENT_B = "MRN-0071-ALPHA", "MRN-0093-BRAVO"


@pytest.fixture(autouse=True)
def keys_home(tmp_path, monkeypatch) -> Path:
    """Each test gets its own key folder (the default lives under $XDG_CONFIG_HOME)."""
    home = tmp_path / "config-home"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    monkeypatch.delenv("MEDSEARCH_PHI_KEY_FILE", raising=False)
    monkeypatch.delenv("MEDSEARCH_REDACT_PATHS", raising=False)
    return home


def _dicom(source: str, target: Path, patient: str, *, sop: str | None = None,
           study: str | None = None, series: str | None = None) -> pydicom.Dataset:
    ds = pydicom.dcmread(TF / source)
    ds.PatientID, ds.PatientName = patient, "Secretname^" + patient[-5:]
    if sop:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    if study:
        ds.StudyInstanceUID = study
    if series:
        ds.SeriesInstanceUID = series
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)
    return ds


def _corpus(root: Path) -> dict:
    """Patient A: two CT slices of one series (a series vector) + one MR; patient B: one CT."""
    a1 = _dicom("CT_small.dcm", root / "SMITH_JOHN_77123" / "ct1.dcm", PATIENT_A)
    _dicom("CT_small.dcm", root / "SMITH_JOHN_77123" / "ct2.dcm", PATIENT_A, sop=a1.SOPInstanceUID + ".2")
    mr = _dicom("MR_small.dcm", root / "SMITH_JOHN_77123" / "mr" / "mr.dcm", PATIENT_A)
    b = _dicom("CT_small.dcm", root / "DOE_JANE_99881" / "ct.dcm", PATIENT_B,
               sop="1.2.826.0.1.3680043.8.498.79", study="1.2.826.0.1.3680043.8.498.77",
               series="1.2.826.0.1.3680043.8.498.78")
    write_images(root / "DOE_JANE_99881" / "photos", 3, seed=3)
    return {"ct_study": str(a1.StudyInstanceUID), "mr_study": str(mr.StudyInstanceUID),
            "b_study": str(b.StudyInstanceUID)}


def _index(store: Path, folder: Path, model: Path, *extra: str) -> dict:
    return cli("index", str(folder), "--store", str(store), "--model", str(model),
               "--workers", "0", "--no-progress", *extra)


def _rows(store: Path) -> list[dict]:
    db = sqlite3.connect(store / "meta.sqlite")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute(
            "SELECT images.*, files.path, files.source_kind FROM images JOIN files "
            "ON files.id = images.file_id")]
    finally:
        db.close()


def _store_bytes(store: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file())


def _manifest(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


def _hmac(key: bytes, patient: str) -> str:
    return hmac.new(key, patient.encode(), hashlib.sha256).hexdigest()[:32]


# -- the key file ------------------------------------------------------------------------------
def test_key_file_is_owner_only_outside_the_store_and_never_in_it(tmp_path, tiny_model, keys_home):
    folder = tmp_path / "in"
    _corpus(folder)
    store = tmp_path / "store"
    cli("index", str(folder), "--store", str(store), "--model", str(tiny_model), "--workers", "1",
        "--no-progress")  # a real decode worker process: it must get the key to hash with
    fingerprint = _manifest(store)["phi_key_fingerprint"]
    key_file = keys_home / "medsearch" / "keys" / f"{fingerprint}.key"
    assert key_file.is_file() and store not in key_file.parents
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    key = bytes.fromhex(key_file.read_text().strip())
    assert len(key) == 32 and fingerprint not in key.hex()
    keys = {r["patient_key"] for r in _rows(store) if r["patient_key"]}
    assert keys == {_hmac(key, PATIENT_A), _hmac(key, PATIENT_B)}  # the key file is the key
    raw = _store_bytes(store)  # a copy of the store alone cannot recompute any patient key
    for secret in (key.hex().encode(), key.hex().upper().encode(), key, PATIENT_A.encode()):
        assert secret not in raw
    db = sqlite3.connect(store / "meta.sqlite")
    assert db.execute("SELECT count(*) FROM settings WHERE key = 'phi_hmac_key'").fetchone() == (0,)
    db.close()


def test_missing_or_different_key_refuses_hashing_never_makes_a_new_one(tmp_path, tiny_model,
                                                                        keys_home, monkeypatch):
    folder = tmp_path / "in"
    _corpus(folder)
    store = tmp_path / "store"
    _index(store, folder, tiny_model)
    before = {r["path"]: r["patient_key"] for r in _rows(store)}
    fingerprint = _manifest(store)["phi_key_fingerprint"]
    key_file = keys_home / "medsearch" / "keys" / f"{fingerprint}.key"
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "elsewhere"))  # another machine
    (folder / "new").mkdir()
    _dicom("CT_small.dcm", folder / "new" / "x.dcm", "MRN-NEW-1", sop="1.2.3.4.5.6.7")
    with pytest.raises(MedsearchError, match=r"(?is)key file.*" + fingerprint + r"\.key.*restore"):
        _index(copy, folder, tiny_model)
    assert not list((tmp_path / "elsewhere").rglob("*.key"))  # no silent new key
    monkeypatch.setenv("XDG_CONFIG_HOME", str(keys_home))
    key_file.write_text("ab" * 32 + "\n")  # a different key under the right name
    with pytest.raises(MedsearchError, match=r"(?s)does not match.*re-index"):
        _index(store, folder, tiny_model)
    # --phi drop needs no key: indexing proceeds, and existing keys are untouched
    _index(store, folder, tiny_model, "--phi", "drop")
    after = {r["path"]: r["patient_key"] for r in _rows(store)}
    assert all(after[p] == k for p, k in before.items())


def test_legacy_secret_in_the_database_moves_to_a_key_file_once(tmp_path, tiny_model, keys_home,
                                                               capsys):
    from indexer.pipeline import Indexer
    from retrieval.model import VisionEncoder
    from retrieval.store import Store, manifest_for

    folder = tmp_path / "in"
    _corpus(folder)
    root = tmp_path / "store"
    legacy = bytes(range(32))
    encoder = VisionEncoder.load(str(tiny_model), "cpu")
    store = Store.create(root, manifest_for(encoder, "Flat"))
    store.set_setting("phi_hmac_key", legacy.hex())  # how stores before this fix kept it
    store.close()
    capsys.readouterr()
    store = Store.open(root)
    with store.exclusive():
        Indexer(store, encoder, workers=0, progress=False).run([folder])
    store.close()
    err = capsys.readouterr().err
    fingerprint = _manifest(root)["phi_key_fingerprint"]
    key_file = keys_home / "medsearch" / "keys" / f"{fingerprint}.key"
    assert str(key_file) in err and "moved" in err
    assert bytes.fromhex(key_file.read_text().strip()) == legacy
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    keys = {r["patient_key"] for r in _rows(root) if r["patient_key"]}
    assert keys == {_hmac(legacy, PATIENT_A), _hmac(legacy, PATIENT_B)}  # old keys still match
    assert legacy.hex().encode() not in _store_bytes(root)
    Store.open(root).close()
    assert "moved" not in capsys.readouterr().err  # told once


def test_shared_key_file_makes_two_stores_joinable(tmp_path, tiny_model, monkeypatch):
    folder = tmp_path / "in"
    _corpus(folder)
    shared = tmp_path / "secure" / "cohort.key"
    monkeypatch.setenv("MEDSEARCH_PHI_KEY_FILE", str(shared))
    _index(tmp_path / "a", folder, tiny_model)
    _index(tmp_path / "b", folder / "SMITH_JOHN_77123", tiny_model)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o600
    assert stat.S_IMODE(shared.parent.stat().st_mode) == 0o700
    key_a = {r["patient_key"] for r in _rows(tmp_path / "a")} - {None}
    key_b = {r["patient_key"] for r in _rows(tmp_path / "b")} - {None}
    assert key_b and key_b <= key_a
    assert _manifest(tmp_path / "a")["phi_key_fingerprint"] == \
        _manifest(tmp_path / "b")["phi_key_fingerprint"]


def test_workers_hash_in_place_and_raw_ids_never_travel(tmp_path):
    from indexer.decode import DecodeOptions, decode_source
    from indexer.sources import SourceFile

    path = tmp_path / "ct.dcm"
    _dicom("CT_small.dcm", path, PATIENT_A)
    secret = bytes(range(100, 132))
    source = SourceFile(str(path), path.stat().st_size, 0, "dicom")
    for policy in ("hash", "drop"):
        options = DecodeOptions(image_size=32, phi_policy=policy, phi_secret=secret)
        assert secret.hex() not in repr(options) and repr(secret) not in repr(options)
        decoded = decode_source(source, options)
        shipped = pickle.dumps(decoded)  # what a worker sends back
        assert PATIENT_A.encode() not in shipped and secret not in shipped
        assert decoded.consent_key == _hmac(secret, PATIENT_A)  # for the withdrawn check only
        assert decoded.metadata.get("patient_key") == (_hmac(secret, PATIENT_A)
                                                        if policy == "hash" else None)


# -- forget --------------------------------------------------------------------------------------
def _labels(store: Path, ids: list[int]) -> None:
    db = sqlite3.connect(store / "meta.sqlite")
    db.executemany("INSERT INTO labels (image_id, label, score, source) VALUES (?, 'effusion', 0.9, 'zero-shot:cxr')",
                   [(i,) for i in ids])
    db.commit()
    db.close()


def test_forget_patient_removes_everything_and_reindex_does_not_bring_it_back(tmp_path, tiny_model):
    from retrieval.store import Store

    folder = tmp_path / "in"
    uids = _corpus(folder)
    root = tmp_path / "store"
    _index(root, folder, tiny_model, "--series-vectors")
    rows = _rows(root)
    key_a = next(r["patient_key"] for r in rows if "SMITH" in r["path"])
    ids_a = [r["id"] for r in rows if r["patient_key"] == key_a]
    kept = {r["id"] for r in rows} - set(ids_a)
    assert len(ids_a) == 4  # two CT slices, one MR, one series vector
    _labels(root, ids_a)
    with running(make_app(root)) as url:
        assert httpx.get(f"{url}/images/{ids_a[0]}/preview").status_code == 200  # now cached
        doc = cli("forget", "--patient", key_a, "--store", str(root))
        assert doc["patient_key"] == key_a
        assert (doc["files"], doc["images"], doc["labels"], doc["series"]) == (4, 4, 4, 1)
        assert httpx.get(f"{url}/images/{ids_a[0]}/preview").status_code == 404
        assert httpx.get(f"{url}/images/{ids_a[0]}").status_code == 404
        found = httpx.post(f"{url}/search", json={"query": "ct", "k": 50}).json()["results"]
        assert {r["id"] for r in found} == kept
    assert {r["id"] for r in _rows(root)} == kept
    store = Store.open(root, readonly=True)
    assert set(store.all_vectors()[0].tolist()) == kept
    import faiss
    from retrieval.store.vectors import index_ids as _index_ids

    assert set(_index_ids(faiss.read_index(str(root / "index.faiss"))).tolist()) == kept
    store.close()
    raw = _store_bytes(root)
    for gone in (key_a, uids["ct_study"], uids["mr_study"], "SMITH_JOHN"):
        assert gone.encode() not in raw, gone  # no trace in free pages or the WAL either
    report = _index(root, folder, tiny_model, "--series-vectors")
    assert sorted(s["reason"] for s in report["skipped"]) == ["withdrawn"] * 3
    report = _index(root, folder, tiny_model, "--phi", "drop")  # no key in the rows: still out
    assert sorted(s["reason"] for s in report["skipped"]) == ["withdrawn"] * 3
    assert not [r for r in _rows(root) if "SMITH" in r["path"]]
    assert uids["ct_study"].encode() not in _store_bytes(root)


def test_forget_study_and_a_raw_patient_id(tmp_path, tiny_model):
    folder = tmp_path / "in"
    uids = _corpus(folder)
    root = tmp_path / "store"
    _index(root, folder, tiny_model)
    doc = cli("forget", "--study", uids["mr_study"], "--store", str(root))
    assert (doc["files"], doc["images"]) == (1, 1)
    assert not [r for r in _rows(root) if r["study_uid"] == uids["mr_study"]]
    doc = cli("forget", "--patient", PATIENT_B, "--store", str(root))  # a raw ID: hashed, never kept
    assert doc["images"] == 1 and PATIENT_B not in json.dumps(doc)
    assert PATIENT_B.encode() not in _store_bytes(root)
    report = _index(root, folder, tiny_model)
    assert sorted(s["path"].split("/")[-1] for s in report["skipped"]) == ["ct.dcm", "mr.dcm"]
    assert [r["id"] for r in _rows(root) if "DOE" in r["path"] and r["source_kind"] == "dicom"] == []
    with pytest.raises(MedsearchError, match="--patient KEY or --study UID"):
        cli("forget", "--store", str(root))


# -- path redaction -------------------------------------------------------------------------------
FOLDER_NAMES = ("SMITH_JOHN_77123", "DOE_JANE_99881", "photos")


@pytest.mark.parametrize("mode", ["name", "hash"])
def test_redacted_paths_reveal_no_folder_name_anywhere(tmp_path, tiny_model, monkeypatch, mode):
    folder = tmp_path / "in"
    _corpus(folder)
    root = tmp_path / "store"
    index_store(root, folder, tiny_model)
    monkeypatch.setenv("MEDSEARCH_REDACT_PATHS", mode)
    leaks = [*FOLDER_NAMES, str(tmp_path), tmp_path.name]
    outputs = []
    search = cli("search", "ct scan", "--store", str(root), "-k", "50")
    outputs.append(json.dumps(search))
    assert len(search["results"]) == len(_rows(root))
    ids = [r["id"] for r in search["results"]]
    outputs.append(json.dumps(cli("similar", "--id", str(ids[0]), "--store", str(root), "-k", "50")))
    for suffix in (".csv", ".json"):
        out = tmp_path / f"cohort{suffix}"
        cli("export", "--query", "ct", "--out", str(out), "--store", str(root), "-k", "50")
        outputs.append(out.read_text())
    with pytest.raises(MedsearchError, match="redact_paths"):  # would need the real paths
        cli("export", "--query", "ct", "--out", str(tmp_path / "c.csv"), "--store", str(root),
            "--copy-to", str(tmp_path / "copies"))
    moved = next(r for r in _rows(root) if r["path"].endswith("mr.dcm"))
    Path(moved["path"]).rename(tmp_path / "moved.dcm")  # a preview error names no folder
    with running(make_app(root)) as url:
        missing = httpx.get(f"{url}/images/{moved['id']}/preview")
        assert missing.status_code == 404
        outputs.append(missing.text)
        outputs.append(httpx.post(f"{url}/search", json={"query": "ct", "k": 50}).text)
        outputs.append(httpx.post(f"{url}/similar", json={"id": ids[0], "k": 50}).text)
        outputs.append(httpx.post(f"{url}/export?format=json", json={"query": "ct", "k": 50}).text)
        outputs.append(httpx.post(f"{url}/export?format=csv", json={"query": "ct", "k": 50}).text)
        outputs.extend(httpx.get(f"{url}/images/{i}").text for i in ids)
        again = httpx.post(f"{url}/search", json={"query": "ct scan", "k": 50}).json()["results"]
    for text in outputs:
        for leak in leaks:
            assert leak not in text, (leak, text[:300])
    paths = {r["id"]: r["path"] for r in search["results"]}
    assert {r["id"]: r["path"] for r in again} == paths  # stable tokens: CLI and server agree
    names = {p.rsplit("/", 1)[-1] for p in paths.values()}
    if mode == "name":
        assert {"ct1.dcm", "ct2.dcm", "mr.dcm", "ct.dcm"} <= names
        by_folder = {}
        for p in paths.values():
            by_folder.setdefault(p.rsplit("/", 1)[0], set()).add(p.rsplit("/", 1)[-1])
        assert {"ct1.dcm", "ct2.dcm"} in by_folder.values()  # one folder: one token
    else:
        assert not names & {"ct1.dcm", "ct2.dcm", "mr.dcm", "ct.dcm"}
    monkeypatch.delenv("MEDSEARCH_REDACT_PATHS")
    plain = json.dumps(cli("search", "ct scan", "--store", str(root), "-k", "50"))
    assert "SMITH_JOHN_77123" in plain  # documented: without redaction folder names show
