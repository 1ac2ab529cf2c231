"""The running server answers for the command line (issue 18, part 4): same output as the
local path, found through an owner-only runtime file, stale files ignored and removed.

A real `medsearch serve` runs in a subprocess on a loopback port; each CLI call is a fresh
process that reports whether it imported torch, which tells a server answer (no model here)
from a local one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PYDICOM_TEST_FILES, write_images
from tests.serving import free_port, index_store
from tests.test_lazy_start import HEAVY, WRAPPER

#: also SQLAlchemy (a command the server answers never opens the store itself) and numpy (nor
#: imports what only local work needs)
SERVED_WRAPPER = WRAPPER.replace(repr(HEAVY), repr((*HEAVY, "sqlalchemy", "numpy")))

ROOT = Path(__file__).resolve().parents[1]


def _env(runtime: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "XDG_RUNTIME_DIR": str(runtime)}


def run(runtime: Path, *args: str) -> tuple[int, str, str, list[str]]:
    """(exit code, stdout, stderr, heavy modules imported) of one CLI process."""
    done = subprocess.run([sys.executable, "-c", SERVED_WRAPPER, *args], capture_output=True,
                          text=True, env=_env(runtime), timeout=180, cwd=ROOT)
    heavy = [json.loads(line[6:]) for line in done.stderr.splitlines() if line.startswith("HEAVY ")]
    err = "\n".join(line for line in done.stderr.splitlines() if not line.startswith("HEAVY "))
    return done.returncode, done.stdout, err, heavy[-1] if heavy else []


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    write_images(root / "images", 10)
    index_store(root / "store", root / "images", tiny_model)
    runtime = root / "runtime"
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "medsearch", "serve", "--store",
                               str(root / "store"), "--port", str(port), "--log-level", "warning"],
                              env=_env(runtime), cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    folder = runtime / "medsearch"
    deadline = time.monotonic() + 120
    while not list(folder.glob("server-*.json")):
        assert server.poll() is None, server.stderr.read()
        assert time.monotonic() < deadline, "the server published no runtime file"
        time.sleep(0.2)
    yield root / "store", runtime, server
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def _same_both_ways(served, *args: str) -> str:
    store, runtime, _ = served
    for _ in range(50):  # the file is written just before the port is bound
        code, out, err, heavy = run(runtime, *args, "--store", str(store), "--json")
        if "torch" not in heavy:
            break
        time.sleep(0.2)
    local = run(runtime, *args, "--store", str(store), "--json", "--local")
    assert code == 0 == local[0], (err, local[2])
    assert "torch" not in heavy, "the server did not answer"
    assert "numpy" not in heavy and "sqlalchemy" not in heavy
    assert out == local[1]
    return out


def test_search_is_answered_by_the_server_and_equals_the_local_answer(served):
    out = _same_both_ways(served, "search", '"chest x-ray" - "tube"', "-k", "5")
    assert len(json.loads(out)["results"]) == 5


def test_info_is_answered_by_the_server_without_opening_the_store(served):
    store, runtime, _ = served
    code, out, err, heavy = run(runtime, "info", "--store", str(store), "--json")
    local = run(runtime, "info", "--store", str(store), "--json", "--local")
    assert code == 0 == local[0], (err, local[2])
    assert "sqlalchemy" not in heavy and "sqlalchemy" in local[3]
    served_doc, local_doc = json.loads(out), json.loads(local[1])
    assert served_doc == local_doc


def test_similar_by_id_and_filters_equal_the_local_answer(served):
    _same_both_ways(served, "similar", "--id", "3", "-k", "4")
    _same_both_ways(served, "similar", "--id", "3", "-k", "3", "--path-glob", "*.png",
                    "--dedupe", "0.999")


def test_export_by_id_writes_the_same_file(served, tmp_path):
    store, runtime, _ = served
    via_server, local = tmp_path / "server.csv", tmp_path / "local.csv"
    code, _, err, heavy = run(runtime, "export", "--id", "2", "-k", "5", "--out", str(via_server),
                              "--store", str(store), "--json")
    assert code == 0, err
    code, _, err, _ = run(runtime, "export", "--id", "2", "-k", "5", "--out", str(local),
                          "--store", str(store), "--json", "--local")
    assert code == 0, err
    assert via_server.read_bytes() == local.read_bytes() and heavy == []


def test_bad_input_keeps_the_local_error_and_exit_code(served):
    store, runtime, _ = served
    for args in (("similar", "--id", "9999"), ("search", '"x"', "--date-from", "yesterday")):
        served_run = run(runtime, *args, "--store", str(store), "--json")
        local_run = run(runtime, *args, "--store", str(store), "--json", "--local")
        assert served_run[0] == local_run[0] == 2
        assert served_run[1] == local_run[1] and "error" in json.loads(served_run[1])


def test_the_runtime_file_is_owner_only(served):
    _, runtime, server = served
    folder = runtime / "medsearch"
    [path] = folder.glob("server-*.json")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["pid"] == server.pid and doc["url"].startswith("http://127.0.0.1:")
    assert doc["token"] is None


def test_a_stale_runtime_file_is_ignored_and_removed(tiny_model, tmp_path):
    write_images(tmp_path / "images", 4)
    index_store(tmp_path / "store", tmp_path / "images", tiny_model)
    from medsearch.runtime import answer_key, publish, store_identity
    from medsearch.settings import Settings

    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    identity = store_identity(tmp_path / "store", manifest)
    runtime = tmp_path / "runtime"
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    try:
        key = answer_key(Settings.resolve(store=str(tmp_path / "store")),
                         manifest["model_fingerprint"])
        path = publish(identity, f"http://127.0.0.1:{free_port()}", None, key)
    finally:
        del os.environ["XDG_RUNTIME_DIR"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({**json.loads(path.read_text()), "pid": dead.pid}))
    code, out, err, heavy = run(runtime, "similar", "--id", "1", "-k", "2", "--store",
                                str(tmp_path / "store"), "--json")
    assert code == 0 and len(json.loads(out)["results"]) == 2, err
    assert not path.exists()


def _classify_args(served, tiny_model, image: Path) -> tuple[str, ...]:
    store, _, _ = served
    return ("classify", str(image), "--labels", "effusion, normal", "--labels", "chest tube",
            "--template", "a chest x-ray with {}", "--template", "{}", "--max-entropy", "0.7",
            "--model", str(tiny_model), "--store", str(store), "--json")


@pytest.mark.parametrize("image", ["img000.png", "img001.jpg", "img002.png",
                                   str(PYDICOM_TEST_FILES / "CT_small.dcm")])
def test_classify_is_answered_by_the_server_and_equals_the_local_answer(served, tiny_model,
                                                                        image):
    """The server decodes the upload and scores it as local `classify` does: same JSON, to
    the last digit, for PNG (8- and 16-bit), JPEG and DICOM."""
    store, runtime, _ = served
    path = Path(image) if Path(image).is_absolute() else store.parent / "images" / image
    args = _classify_args(served, tiny_model, path)
    for _ in range(50):  # the file is written just before the port is bound
        code, out, err, heavy = run(runtime, *args)
        if "torch" not in heavy:
            break
        time.sleep(0.2)
    assert code == 0, err
    assert "torch" not in heavy and "numpy" not in heavy, "the server did not answer"
    local = run(runtime, *args, "--local")
    without_store = run(runtime, *args[:-3], "--json")  # no --store: local, as before
    assert local[0] == 0 == without_store[0], (local[2], without_store[2])
    assert "torch" in local[3] and "torch" in without_store[3]
    assert out == local[1] == without_store[1]
    doc = json.loads(out)
    assert sorted(r["label"] for r in doc["results"]) == ["chest tube", "effusion", "normal"]


def test_classify_without_a_server_works_locally(served, tiny_model, tmp_path):
    """No server published in this runtime folder: `classify --store` works here, silently."""
    store, runtime, _ = served
    args = _classify_args(served, tiny_model, store.parent / "images" / "img000.png")
    code, out, err, heavy = run(tmp_path / "no-server", *args)
    assert code == 0 and "torch" in heavy, err
    assert out == run(runtime, *args, "--local")[1]


def test_classify_asks_only_where_the_server_would_score_alike(served, tiny_model, tmp_path):
    """Another query decoding recorded in the store, another model, the ONNX text tower, a
    file the server does not accept or would decode as another kind: classify locally."""
    from medsearch.cli.remote import _same_classifier, _same_source_kind
    from medsearch.settings import Settings

    store, _, _ = served
    same = Settings.resolve(store=str(store), model=str(tiny_model))
    assert _same_classifier(same, store)
    assert not _same_classifier(same.model_copy(update={"text_runtime": "onnx"}), store)
    other_model = tmp_path / "other-model"  # other weights: here, another config
    shutil.copytree(tiny_model, other_model)
    config = json.loads((other_model / "config.json").read_text())
    (other_model / "config.json").write_text(json.dumps({**config, "other": 1}))
    assert not _same_classifier(same.model_copy(update={"model": str(other_model)}), store)
    windowed = tmp_path / "windowed"
    windowed.mkdir()
    manifest = json.loads((store / "manifest.json").read_text())
    (windowed / "manifest.json").write_text(json.dumps({**manifest, "decode": {
        "window": "auto", "frames": "all", "series_vectors": False}}))
    assert not _same_classifier(same, windowed)
    (windowed / "manifest.json").write_text(json.dumps({**manifest, "decode": {
        "window": "file", "frames": "all", "series_vectors": True}}))
    assert _same_classifier(same, windowed)  # a query is its middle frame either way
    png = (store.parent / "images" / "img000.png").read_bytes()
    dicom = (PYDICOM_TEST_FILES / "CT_small.dcm").read_bytes()
    assert _same_source_kind(Path("a.png"), png) and _same_source_kind(Path("a.dcm"), dicom)
    assert not _same_source_kind(Path("a.dcm"), png)  # the local decoder goes by the name
    assert not _same_source_kind(Path("a.bmp"), b"BM" + bytes(200))  # not accepted there


def test_the_runtime_file_goes_at_a_clean_shutdown(served):
    _, runtime, server = served
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)
    assert list((runtime / "medsearch").glob("server-*.json")) == []
