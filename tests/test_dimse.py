"""A PACS over DIMSE as a source, against a real Orthanc's DICOM port on loopback: C-FIND at
study, series and image level with the query filters, C-GET in the decode workers, incremental
re-runs by SOP Instance UID, TLS with certificates, and association failures, refusals and
timeouts reported without ending the run. DICOMweb credentials are tested here too."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from .certs import certificates
from .conftest import PYDICOM_TEST_FILES
from .orthanc import ORTHANC_AET, running_orthanc
from .serving import run_cli

#: CT 2004, MR 2004 (another study), NM (JPEG 2000), an SR (no pixels)
UPLOAD = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "test-SR.dcm")
KNOWN = {"medsearch": ["MEDSEARCH", "127.0.0.1", 104]}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), dicom=True,
                         modalities=KNOWN) as server:
        for name in UPLOAD:
            assert server.upload((PYDICOM_TEST_FILES / name).read_bytes()).status_code == 200
        yield server


def _cli(capsys, *args: str) -> tuple[int, dict]:
    code, out, err = run_cli(capsys, *args, "--json")
    assert "Traceback" not in err
    return code, json.loads(out)


def _index(capsys, store: Path, model: Path, *args: str) -> tuple[int, dict]:
    return _cli(capsys, "index", *args, "--store", str(store), "--model", str(model),
                "--workers", "1", "--no-progress", "--pacs-timeout", "5")


def test_index_dimse_then_incremental(pacs, tiny_model, tmp_path, capsys):
    store = tmp_path / "store"
    code, doc = _index(capsys, store, tiny_model, pacs.dimse)
    assert code == 0, doc
    assert doc["failed"] == 0, doc["failures"]
    assert doc["indexed"] == 3 and doc["total"] == 4
    assert [s["reason"] for s in doc["skipped"]] == ["no pixel data: Comprehensive SR Storage (SR)"]
    assert all(f"dimse://{ORTHANC_AET}@127.0.0.1:" in s["path"] for s in doc["skipped"])
    code, again = _index(capsys, store, tiny_model, pacs.dimse)
    assert code == 0 and again["indexed"] == 0 and again["unchanged"] == 3
    assert again["removed"] == 0

    code, stats = _cli(capsys, "info", "--store", str(store))
    assert stats["images"] == 3 and stats["modalities"] == {"CT": 1, "MR": 1, "NM": 1}

    # a preview of a PACS row fetches the instance again (C-GET), as a file is read again
    from medsearch.app import Medsearch

    app = Medsearch.open(store)
    try:
        png = app.preview(int(app.store.vector_ids()[0]))
        assert png.startswith(b"\x89PNG")
    finally:
        app.store.close()


def test_dimse_query_filters(pacs, tiny_model, tmp_path, capsys):
    code, doc = _index(capsys, tmp_path / "ct", tiny_model, pacs.dimse, "--modality", "ct")
    assert code == 0 and doc["indexed"] == 1 and doc["total"] == 1
    code, doc = _index(capsys, tmp_path / "late", tiny_model, pacs.dimse, "--since", "2030-01-01")
    assert code == 0 and doc["total"] == 0
    code, doc = _index(capsys, tmp_path / "study", tiny_model, pacs.dimse, "--study",
                       "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322")
    assert code == 0 and doc["total"] == 1 and doc["indexed"] == 1


def test_unknown_calling_aet_is_refused_with_a_reason(pacs, tiny_model, tmp_path, capsys):
    code, doc = _index(capsys, tmp_path / "s", tiny_model, pacs.dimse, "--calling-aet", "STRANGER")
    assert code == 2
    assert "STRANGER" in doc["error"] or "rejected" in doc["error"] or "status" in doc["error"]


def test_dead_and_silent_pacs_are_reported_not_fatal(pacs, tiny_model, tmp_path, capsys,
                                                     image_folder):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # accepts, never answers: the association times out
    port = silent.getsockname()[1]
    stop = threading.Event()
    accepted = []

    def hold() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(silent.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        code, doc = _cli(capsys, "index", f"dimse://X@127.0.0.1:{port}", "--store",
                         str(tmp_path / "a"), "--model", str(tiny_model), "--workers", "0",
                         "--pacs-timeout", "1")
        assert code == 2 and f"X@127.0.0.1:{port}" in doc["error"] and "no answer" in doc["error"]
        # with a folder beside it the folder is indexed; the PACS is a warning
        code, doc = _cli(capsys, "index", str(image_folder), "dimse://X@127.0.0.1:9", "--store",
                         str(tmp_path / "b"), "--model", str(tiny_model), "--workers", "0",
                         "--pacs-timeout", "1", "--no-progress")
        assert code == 0 and doc["indexed"] == 11
        assert any("dimse://X@127.0.0.1:9" in w["path"] for w in doc["warnings"])
        assert any(p["root"] == "dimse://X@127.0.0.1:9" for p in doc["prune_skipped"])
    finally:
        stop.set()
        thread.join()
        silent.close()
        for conn in accepted:
            conn.close()
    code, doc = _cli(capsys, "index", "dimse://not-an-address", "--store", str(tmp_path / "c"),
                     "--model", str(tiny_model))
    assert code == 2 and "dimse://AET@HOST:PORT" in doc["error"]


def test_instance_gone_from_the_pacs_is_a_failure_of_that_instance(tiny_model, tmp_path, capsys):
    with running_orthanc(tmp_path / "orthanc", dicom=True, modalities=KNOWN) as server:
        for name in ("CT_small.dcm", "MR_small.dcm"):
            server.upload((PYDICOM_TEST_FILES / name).read_bytes())
        from indexer.dimse import list_instances, retrieve_instance

        listed, problems = list_instances(server.dimse)
        assert len(listed) == 2 and problems == []
        import httpx

        for ident in server.instances():
            httpx.delete(f"{server.base}/instances/{ident}", timeout=10)
        from indexer.images import DecodeError

        with pytest.raises(DecodeError, match="C-GET of .* sent no instance"):
            retrieve_instance(listed[0].path, sop_class=listed[0].sop_class)


def test_dimse_over_tls(tiny_model, tmp_path, capsys):
    certs = certificates(tmp_path / "certs")
    tls = {"DicomTlsEnabled": True, "DicomTlsCertificate": str(certs["server.pem"]),
           "DicomTlsPrivateKey": str(certs["server.key"]),
           "DicomTlsTrustedCertificates": str(certs["ca.pem"]),
           "DicomTlsRemoteCertificateRequired": True}
    with running_orthanc(tmp_path / "orthanc", dicom=True, modalities=KNOWN,
                         extra=tls) as server:
        server.upload((PYDICOM_TEST_FILES / "CT_small.dcm").read_bytes())
        code, doc = _index(capsys, tmp_path / "plain", tiny_model, server.dimse)
        assert code == 2 and "DIMSE query" in doc["error"]
        code, doc = _index(capsys, tmp_path / "tls", tiny_model, server.dimse, "--tls",
                           "--tls-ca", str(certs["ca.pem"]), "--tls-cert",
                           str(certs["client.pem"]), "--tls-key", str(certs["client.key"]))
        assert code == 0 and doc["indexed"] == 1 and doc["failed"] == 0, doc
    code, doc = _index(capsys, tmp_path / "x", tiny_model, "dimse://A@127.0.0.1:9", "--tls",
                       "--tls-cert", str(certs["client.pem"]))
    assert code == 2 and "--tls-key" in doc["error"]


def test_dicomweb_credentials(tiny_model, tmp_path, capsys, monkeypatch):
    with running_orthanc(tmp_path / "orthanc", users={"alice": "s3cret-pw"}) as server:
        server.upload((PYDICOM_TEST_FILES / "CT_small.dcm").read_bytes())
        code, doc = _index(capsys, tmp_path / "anon", tiny_model, server.dicomweb)
        assert code == 2 and "401" in doc["error"]
        monkeypatch.setenv("MEDSEARCH_PACS_PASSWORD", "s3cret-pw")
        code, doc = _index(capsys, tmp_path / "alice", tiny_model, server.dicomweb,
                           "--pacs-user", "alice")
        assert code == 0 and doc["indexed"] == 1 and doc["failed"] == 0, doc
        assert "s3cret-pw" not in json.dumps(doc)
        for path in (tmp_path / "alice").rglob("*"):
            if path.is_file():
                assert b"s3cret-pw" not in path.read_bytes(), path
