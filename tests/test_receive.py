"""`medsearch receive` as a real process: DCMTK's storescu and a real Orthanc push to it; only
allow-listed AE titles get in; garbage on the port harms nothing; a SIGKILL in the middle of a
push loses no acknowledged instance and a re-send duplicates nothing; it shares a store with an
`index` run; a series gets its vector after the quiet period; a full disk is refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from retrieval.store import Store

from .certs import certificates
from .conftest import PYDICOM_TEST_FILES
from .orthanc import free_port, running_orthanc

STORESCU = "/usr/bin/storescu"  # DCMTK's (a venv may put pynetdicom's of that name first)


def _receiver(store: Path, model: Path, port: int, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "medsearch", "receive", "--store", str(store),
                             "--model", str(model), "--port", str(port), "--batch-seconds", "0.3",
                             "--json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("receive did not start: " + proc.stderr.read())
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail("receive did not listen within 90 s")


def _stop(proc: subprocess.Popen) -> tuple[dict, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    return json.loads(out), err


def _received(store: Path) -> dict[str, int]:
    """Received path → images stored for it."""
    with Store.open(store, readonly=True) as st:
        known = st.known_files(["received:"])
        return {path: len(st.ids_for_path(path)) for path in known}


def _wait_drained(store: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while any((store / "spool").glob("*.dcm")):
        assert time.monotonic() < deadline, "the spool did not drain"
        time.sleep(0.2)
    time.sleep(0.5)  # the batch's commit precedes the spool's removal


def _copies(n: int, series: str | None = None) -> list[pydicom.Dataset]:
    """n distinct CT instances (new SOP Instance UIDs), optionally of one series."""
    out = []
    for _ in range(n):
        ds = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if series:
            ds.SeriesInstanceUID = series
        out.append(ds)
    return out


def _push(port: int, datasets, calling: str = "MODALITY", acks: list | None = None,
          tls=None) -> list:
    """Send with pynetdicom, one association; the status of each (None: no answer)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDSEARCH", tls_args=tls)
    if not assoc.is_established:
        return [None] * len(datasets)
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            statuses.append(code)
            if code == 0 and acks is not None:
                acks.append(str(ds.SOPInstanceUID))
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses + [None] * (len(datasets) - len(statuses))


@pytest.fixture(scope="module")
def receiver(tiny_model, tmp_path_factory):
    store = tmp_path_factory.mktemp("receive") / "store"
    port = free_port()
    proc = _receiver(store, tiny_model, port, "--allow", "STORESCU,ORTHANC,MODALITY")
    try:
        yield store, port, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_storescu_push_is_indexed_spool_owner_only(receiver):
    if not Path(STORESCU).is_file():
        pytest.skip("DCMTK's storescu is not installed (scripts/install-test-services.sh)")
    store, port, _ = receiver
    files = [PYDICOM_TEST_FILES / n for n in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm",
                                              "test-SR.dcm")]
    # -xw: propose JPEG 2000 too, so that file arrives compressed, as stored
    for batch, options in ((files[:2] + files[3:], []), (files[2:3], ["-xw"])):
        done = subprocess.run([STORESCU, *options, "-aet", "STORESCU", "-aec", "MEDSEARCH",
                               "127.0.0.1", str(port), *map(str, batch)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    _wait_drained(store)
    received = _received(store)
    sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files[:3]}
    assert {p.removeprefix("received://") for p in received} >= sops
    assert stat.S_IMODE((store / "spool").stat().st_mode) == 0o700
    with Store.open(store, readonly=True) as st:
        assert any("no pixel data" in reason for reason in st.failures().values())  # the SR
    from medsearch.app import Medsearch
    from retrieval.errors import InputError

    app = Medsearch.open(store)
    try:  # the pixels are not kept: the preview says so
        with pytest.raises(InputError, match="not kept once indexed"):
            app.preview(int(app.store.vector_ids()[0]))
    finally:
        app.store.close()


def test_only_allow_listed_titles_and_garbage_harms_nothing(receiver):
    store, port, proc = receiver
    assert _push(port, _copies(1), calling="INTRUDER") == [None]
    for garbage in (b"\x00" * 10, os.urandom(4096),
                    b"\x01\x00\x00\x00\xff\xff\xff\xff" + b"A" * 64):  # a PDU claiming 4 GB
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(garbage)
            sock.settimeout(5)
            try:
                sock.recv(1024)
            except OSError:
                pass
    assert proc.poll() is None
    ok, broken = _copies(2), _copies(1)[0]
    broken.PixelData = broken.PixelData[:100]  # acknowledged (it is stored), then fails to decode
    assert _push(port, [ok[0], broken, ok[1]]) == [0, 0, 0]
    _wait_drained(store)
    assert {f"received://{ds.SOPInstanceUID}" for ds in ok} <= set(_received(store))
    with Store.open(store, readonly=True) as st:
        reason = st.failures()[f"received://{broken.SOPInstanceUID}"]
    assert "pixel" in reason.lower(), reason


def test_orthanc_pushes_to_the_receiver(receiver, tmp_path):
    store, port, _ = receiver
    modalities = {"medsearch": ["MEDSEARCH", "127.0.0.1", port]}
    with running_orthanc(tmp_path / "orthanc", dicom=True, modalities=modalities) as server:
        ids = [server.upload((PYDICOM_TEST_FILES / n).read_bytes()).json()["ID"]
               for n in ("MR_small.dcm", "SC_rgb_rle.dcm")]
        reply = httpx.post(f"{server.base}/modalities/medsearch/store",
                           json={"Resources": ids, "Synchronous": True}, timeout=60)
        assert reply.status_code == 200, reply.text
    _wait_drained(store)
    rle = str(pydicom.dcmread(PYDICOM_TEST_FILES / "SC_rgb_rle.dcm").SOPInstanceUID)
    assert _received(store).get(f"received://{rle}") == 1


def test_kill_during_a_push_loses_nothing_acknowledged(tiny_model, tmp_path):
    store, port = tmp_path / "store", free_port()
    proc = _receiver(store, tiny_model, port, "--allow", "MODALITY")
    datasets = _copies(40)
    acks: list[str] = []
    sender = threading.Thread(target=_push, args=(port, datasets), kwargs={"acks": acks})
    sender.start()
    deadline = time.monotonic() + 60
    while len(acks) < 15 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    sender.join(timeout=60)
    acknowledged = set(acks)
    assert 15 <= len(acknowledged) < 40

    proc = _receiver(store, tiny_model, port, "--allow", "MODALITY")
    try:
        _wait_drained(store)
        received = _received(store)
        assert {f"received://{sop}" for sop in acknowledged} <= set(received)
        # the sender retries everything: nothing is stored twice
        assert _push(port, datasets) == [0] * 40
        _wait_drained(store)
    finally:
        doc, _ = _stop(proc)
    received = _received(store)
    assert set(received) == {f"received://{ds.SOPInstanceUID}" for ds in datasets}
    assert set(received.values()) == {1}
    with Store.open(store, readonly=True) as st:
        assert st.count == 40
    assert not list((store / "spool").glob("*.tmp"))


def test_shares_the_store_with_index_and_series_vectors_after_quiet(tiny_model, tmp_path,
                                                                    image_folder):
    store, port = tmp_path / "store", free_port()
    proc = _receiver(store, tiny_model, port, "--allow", "MODALITY", "--series-vectors",
                     "--quiet-period", "1")
    try:
        series = generate_uid()
        first = _copies(3, series)
        indexing = subprocess.Popen([sys.executable, "-m", "medsearch", "index", str(image_folder),
                                     "--store", str(store), "--workers", "0", "--json",
                                     "--no-progress"], stdout=subprocess.PIPE, text=True)
        assert _push(port, first) == [0, 0, 0]  # acknowledged while `index` may hold the lock
        out, _ = indexing.communicate(timeout=180)
        assert indexing.returncode == 0 and json.loads(out)["indexed"] == 11
        _wait_drained(store)
        time.sleep(3)  # the quiet period passes
    finally:
        doc, err = _stop(proc)
    assert doc["indexed"] == 3 and doc["failed"] == 0
    with Store.open(store, readonly=True) as st:
        assert len(st.known_files([str(image_folder)])) == 11
        assert f"series:{series}" in st.known_files([f"series:{series}"])
        assert st.count == 11 + 3 + 1


def test_full_disk_is_refused_not_acknowledged(tiny_model, tmp_path):
    store, port = tmp_path / "store", free_port()
    free_mb = shutil.disk_usage(tmp_path).free >> 20
    proc = _receiver(store, tiny_model, port, "--allow", "MODALITY",
                     "--min-free-mb", str(free_mb + 1024))
    try:
        assert _push(port, _copies(2)) == [0xA700, 0xA700]
    finally:
        doc, _ = _stop(proc)
    assert doc["received"] == 0 and doc["refused"] == 2 and doc["indexed"] == 0


def test_receive_over_tls_requires_a_signed_client(tiny_model, tmp_path):
    import ssl

    certs = certificates(tmp_path / "certs")
    store, port = tmp_path / "store", free_port()
    proc = _receiver(store, tiny_model, port, "--allow", "MODALITY", "--tls-cert",
                     str(certs["server.pem"]), "--tls-key", str(certs["server.key"]),
                     "--tls-ca", str(certs["ca.pem"]))
    try:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs["ca.pem"]))
        client.load_cert_chain(str(certs["client.pem"]), str(certs["client.key"]))
        assert _push(port, _copies(1), tls=(client, "127.0.0.1")) == [0]
        assert _push(port, _copies(1)) == [None]  # plain DICOM on the TLS port
        anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                               cafile=str(certs["ca.pem"]))
        assert _push(port, _copies(1), tls=(anonymous, "127.0.0.1")) == [None]
    finally:
        doc, _ = _stop(proc)
    assert doc["received"] == 1 and doc["indexed"] == 1
