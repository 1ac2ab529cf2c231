"""The Ray engine on a real local Ray cluster (loopback, 2 CPUs): the same rows, vectors and
rankings as the local engine; a killed embedding actor costs nothing; a broken file costs one."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import PYDICOM_TEST_FILES, write_images

ray = pytest.importorskip("ray", reason="Ray is not installed")


@pytest.fixture(scope="module")
def cluster():
    try:
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
    except Exception as exc:  # no shared memory, no ports: say why, don't fail the suite
        pytest.skip(f"cannot start a local Ray cluster: {type(exc).__name__}: {exc}")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ray-corpus")
    write_images(folder, 6)
    for name in ("CT_small.dcm", "MR_small.dcm", "rtstruct.dcm"):  # rtstruct: no image
        shutil.copy(PYDICOM_TEST_FILES / name, folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def _local(store_dir: Path, tiny_model: Path, folder: Path):
    from indexer.pipeline import Indexer
    from retrieval.model import VisionEncoder, resolve_checkpoint
    from retrieval.store import Store, manifest_for

    encoder = VisionEncoder(resolve_checkpoint(str(tiny_model)), "cpu", "fp32")
    store = Store.create(store_dir, manifest_for(encoder, "Flat"))
    with Indexer(store, encoder, workers=0, batch_size=4, progress=False) as indexer:
        report = indexer.run([folder])
    return store, report


def _ray(store_dir: Path, tiny_model: Path, folder: Path, **spec):
    from indexer.ray_engine import EmbedderSpec, ModelShape, RayIndexer
    from retrieval.model import resolve_checkpoint
    from retrieval.store import Store, manifest_for

    checkpoint = resolve_checkpoint(str(tiny_model))
    shape = ModelShape.of(checkpoint)
    store = (Store.open(store_dir, exclusive=True) if store_dir.exists()
             else Store.create(store_dir, manifest_for(shape, "Flat")))
    spec = EmbedderSpec(str(tiny_model), checkpoint.fingerprint, "cpu", "fp32", threads=1, **spec)
    with RayIndexer(store, shape, spec, batch_size=4, progress=False) as indexer:
        report = indexer.run([folder])
    return store, report


def _rows(store) -> dict[tuple[str, int], tuple]:
    """(path, frame) → (metadata, vector) of every stored image."""
    keys = store.image_keys()
    rows = store.rows([k[0] for k in keys])
    vectors = store.vectors([k[0] for k in keys])
    drop = ("id", "file_id")  # ids come from each store's own writer
    return {(path, frame): ({k: v for k, v in rows[i].items() if k not in drop}, vector)
            for (i, path, frame, _), vector in zip(keys, vectors)}


def test_ray_and_local_engines_agree(cluster, tmp_path, tiny_model, folder):
    started = time.perf_counter()
    local, local_report = _local(tmp_path / "local", tiny_model, folder)
    remote, ray_report = _ray(tmp_path / "ray", tiny_model, folder)
    for key in ("indexed", "images", "failed", "unchanged", "total"):
        assert getattr(ray_report, key) == getattr(local_report, key), key
    assert ray_report.failed == 1 and ray_report.failures[0]["path"].endswith("broken.png")
    assert ray_report.failures == local_report.failures  # the same reason
    assert [s["path"] for s in ray_report.skipped] == [s["path"] for s in local_report.skipped]
    assert remote.failures() == local.failures()
    a, b = _rows(local), _rows(remote)
    assert sorted(a) == sorted(b) and len(a) == local_report.images
    for key in a:
        # patient keys are hashed with each store's own key (retrieval.privacy): not compared
        meta = [{k: v for k, v in x[key][0]["metadata"].items() if k != "patient_key"}
                for x in (a, b)]
        assert meta[0] == meta[1] and a[key][0]["path"] == b[key][0]["path"], key
        u, v = a[key][1], b[key][1]
        assert float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v))) >= 0.99999, key
    for key in list(a)[:4]:  # the same top-10 for a few queries
        query = a[key][1][None]
        top = [[(s.rows([int(i)])[int(i)]["path"], s.rows([int(i)])[int(i)]["frame"])
                for i in s.search(query, 10)[1][0] if i >= 0] for s in (local, remote)]
        assert top[0] == top[1]
    # incremental: a second run embeds nothing (broken and no-image files are tried again)
    remote.close()
    store, again = _ray(tmp_path / "ray", tiny_model, folder)
    assert (again.indexed, again.unchanged, again.failed) == (0, ray_report.indexed, 1)
    # only the mtime changed: decoded (to hash it), not embedded, its row kept
    store.close()
    touched = folder / "CT_small.dcm"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    store, touch = _ray(tmp_path / "ray", tiny_model, folder)
    assert (touch.indexed, touch.images, touch.unchanged) == (0, 0, ray_report.indexed)
    assert len(store.image_keys()) == ray_report.images
    assert store.known_files([str(folder)])[str(touched)][1] == touched.stat().st_mtime_ns
    store.close()
    print(f"ray vs local: {time.perf_counter() - started:.1f} s")


def test_a_killed_actor_costs_no_item_and_duplicates_none(cluster, tmp_path, tiny_model, folder):
    marker = tmp_path / "killed"
    store, report = _ray(tmp_path / "ray", tiny_model, folder, kill_after=1,
                         kill_marker=str(marker), batch_size=2)
    assert marker.exists()  # the actor was killed mid-run, and Ray started it again
    assert len((tmp_path / "killed.starts").read_text().split()) >= 2
    keys = [(path, frame) for _, path, frame, _ in store.image_keys()]
    assert len(keys) == len(set(keys)) == report.images
    indexed = {path for path, _ in keys}
    expected = {str(p) for p in folder.iterdir()} - {str(folder / "broken.png"),
                                                       str(folder / "rtstruct.dcm")}
    assert indexed == expected
    assert report.failed == 1


def test_cli_index_with_the_ray_engine(cluster, tmp_path, tiny_model, folder, capsys):
    from tests.test_cli import cli

    store = tmp_path / "store"
    code, doc, err = cli(capsys, "index", str(folder), "--store", str(store), "--model",
                         str(tiny_model), "--device", "cpu", "--engine", "ray", "--ray-address",
                         "auto", "--no-progress")
    assert code == 0, doc
    assert (doc["indexed"], doc["failed"], len(doc["skipped"])) == (8, 1, 1)
    assert "Ray cluster" in err
    code, doc, _ = cli(capsys, "search", "chest", "--store", str(store), "--model", str(tiny_model))
    assert code == 0 and len(doc["results"]) == 8


def _crash_on_poison(batch, options):
    """A decode task whose worker dies (as a segfaulting decoder's would) on one file."""
    from indexer.ray_engine import _decode_block

    if any(b"poison" in blob for blob in batch["source"]):
        os._exit(1)
    return _decode_block(batch, options)


@pytest.mark.slow  # three attempts, each killing a worker: ~20 s on 2 cores
def test_a_decoder_crash_costs_one_file_with_its_reason(cluster, tmp_path, tiny_model):
    from indexer.ray_engine import LOST_REASON, EmbedderSpec, ModelShape, RayIndexer
    from retrieval.model import resolve_checkpoint
    from retrieval.store import Store, manifest_for

    folder = tmp_path / "crash"
    write_images(folder, 4)
    shutil.copy(next(folder.glob("*.png")), folder / "poison.png")
    checkpoint = resolve_checkpoint(str(tiny_model))
    shape = ModelShape.of(checkpoint)
    store = Store.create(tmp_path / "store", manifest_for(shape, "Flat"))
    spec = EmbedderSpec(str(tiny_model), checkpoint.fingerprint, "cpu", "fp32", threads=1)

    class Crashing(RayIndexer):
        decode_block = staticmethod(_crash_on_poison)

    with Crashing(store, shape, spec, batch_size=4, progress=False) as indexer:
        report = indexer.run([folder])
    assert (report.indexed, report.failed) == (4, 1)
    assert report.failures == [{"path": str(folder / "poison.png"), "reason": LOST_REASON}]
    store.close()


def test_ray_is_imported_only_for_the_ray_engine():
    import subprocess
    import sys

    code = ("import sys, medsearch.cli.main, medsearch.cli.core, indexer.pipeline; "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@pytest.mark.slow  # two CLI runs, each starting its own Ray cluster: ~1 minute on 2 cores
def test_a_killed_driver_resumes_without_duplicates(tmp_path, tiny_model):
    import os
    import signal
    import subprocess
    import sys

    from retrieval.store import Store

    folder = tmp_path / "many"
    write_images(folder, 24, seed=3)
    store_dir = tmp_path / "store"
    cmd = [sys.executable, "-m", "medsearch", "index", str(folder), "--store", str(store_dir),
           "--model", str(tiny_model), "--device", "cpu", "--engine", "ray", "--ray-address",
           "local", "--batch-size", "1", "--no-progress", "--json"]
    # its own session, so what its cluster leaves behind after the kill can be found
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    committed, deadline = 0, time.time() + 240
    while time.time() < deadline and proc.poll() is None and committed < 3:
        if (store_dir / "manifest.json").exists():
            try:
                with Store.open(store_dir, readonly=True) as store:
                    committed = len(store.image_keys())
            except Exception:  # not yet created in full
                committed = 0
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)  # the driver only, as an OOM kill would
    proc.wait()
    _kill_session(proc.pid)  # Ray's node agents outlive a SIGKILLed driver: not the test's
    assert 3 <= committed < 24
    finish = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr[-2000:]
    import json

    doc = json.loads(finish.stdout)
    assert 0 < doc["indexed"] < 24 and doc["indexed"] + doc["unchanged"] == 24
    with Store.open(store_dir, readonly=True) as store:
        keys = [(path, frame) for _, path, frame, _ in store.image_keys()]
        assert len(keys) == len(set(keys)) == store.count == 24


def _kill_session(sid: int) -> None:
    """SIGKILL what is left of the processes in session ``sid`` (started by this test)."""
    import os
    import signal

    time.sleep(2)  # raylet and GCS exit with the driver; their agents do not
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # stat: state ppid pgrp session …
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass
