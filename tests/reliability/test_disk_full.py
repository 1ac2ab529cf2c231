"""A full disk and a failing one: the run stops with a clear error, the store keeps its last
committed state (opens, agrees with itself, answers searches), and the next run after space
is freed completes and equals an uninterrupted build. A read error on one source costs that
file only.

The full disk is real: a size-limited tmpfs mounted by the test (needs root and permission
to mount; skipped with the reason otherwise). The read error is injected (EIO cannot be made
on demand without a faulty device): ``open`` raises it for one path, as a bad sector would.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from indexer.pipeline import Indexer
from medsearch.cli import main
from retrieval.model import VisionEncoder
from retrieval.store import Store, manifest_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def crash(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks/ is a checkout folder, not installed
    import benchmarks.crash as crash

    return crash


@pytest.fixture()
def small_fs(tmp_path):
    """A 3 MiB file system: a store with its SQLite write-ahead log fills it quickly (a new
    store's 16 KB pages take 0.43 MiB with four images in it)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a size-limited file system needs root to mount (tmpfs)")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=700", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def cli(capsys, *args) -> tuple[int, str, str]:
    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def index_args(corpus: Path, store: Path, model: Path) -> list[str]:
    return ["index", str(corpus), "--store", str(store), "--model", str(model), "--workers", "0",
            "--frames", "all", "--precision", "fp32", "--no-progress", "--json"]


def test_disk_full_stops_cleanly_keeps_the_store_and_the_next_run_resumes(
        tmp_path, small_fs, tiny_model, capsys, crash):
    corpus = tmp_path / "corpus"
    crash.make_corpus(corpus / "first", 12, seed=2)
    crash.make_corpus(corpus / "more", 120, seed=3)  # far more than 3 MiB of store can hold
    fresh = crash.fresh_embeddings(corpus, tiny_model)
    queries = np.ascontiguousarray(np.stack(list(fresh.vectors.values())[:4]), np.float32)
    store = small_fs / "store"
    code, _, err = cli(capsys, *index_args(corpus / "first", store, tiny_model))
    assert code == 0, err
    problems: list[str] = []
    before = crash.snapshot(store, queries, problems)
    assert before and not problems

    code, out, err = cli(capsys, *index_args(corpus, store, tiny_model))
    assert code == 2, (out, err)
    # the store's own write check or SQLite: either names the store's file and what to do
    assert str(store) in err and "disk full" in err and "command again" in err
    assert "Traceback" not in err and json.loads(out)["type"] == "StoreError"
    assert not list(store.glob("*.tmp")), "a failed write left a temp file taking space"

    # the last committed state: opens, agrees with itself, nothing committed was lost
    ledger = crash.Ledger(fresh)
    after = crash.snapshot(store, queries, problems)
    ledger.check(after, problems, before, "after disk full")
    assert ledger.findings == [] and ledger.passed == 1
    assert len(before.rows) <= len(after.rows) < len(fresh.vectors)
    code, out, err = cli(capsys, "search", "a chest x-ray", "--store", str(store), "-k", "3",
                         "--json")
    assert code == 0 and len(json.loads(out)["results"]) == 3, err

    # space freed: the same command completes and equals an uninterrupted build
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    code, out, err = cli(capsys, *index_args(corpus, store, tiny_model))
    assert code == 0, err
    reference_dir = tmp_path / "reference"
    assert cli(capsys, *index_args(corpus, reference_dir, tiny_model))[0] == 0
    final = crash.snapshot(store, queries, problems)
    ledger.check(final, problems, after, "after space freed")
    assert ledger.findings == []
    assert crash.same_store(final, crash.snapshot(reference_dir, queries, [])) == []


def test_an_io_error_reading_one_source_costs_that_file_only(tmp_path, tiny_model, monkeypatch,
                                                             crash):
    corpus = tmp_path / "corpus"
    crash.make_corpus(corpus, 8, seed=4)
    bad = str(next((corpus / "part1").glob("*.png")))
    real_open = builtins.open

    def failing_open(file, *args, **kwargs):
        if os.fspath(file) == bad:
            raise OSError(errno.EIO, os.strerror(errno.EIO), bad)
        return real_open(file, *args, **kwargs)

    encoder = VisionEncoder.load(str(tiny_model), device="cpu", precision="fp32")
    st = Store.open_or_create(tmp_path / "store", manifest_for(encoder, "Flat"))
    monkeypatch.setattr(builtins, "open", failing_open)
    with Indexer(st, encoder, workers=0, progress=False, frames="all") as indexer:
        report = indexer.run([corpus])
    monkeypatch.undo()
    st.close()
    reasons = {f["path"]: f["reason"] for f in report.failures}
    assert reasons[bad] == "cannot read the file: Input/output error"
    # the others: everything a run without the fault indexes, less that one file
    st2 = Store.open_or_create(tmp_path / "clean", manifest_for(encoder, "Flat"))
    with Indexer(st2, encoder, workers=0, progress=False, frames="all") as indexer:
        expected = indexer.run([corpus])
    st2.close()
    assert report.indexed == expected.indexed - 1
    assert report.images == expected.images - 1
    assert report.failed == expected.failed + 1


def test_storage_faults_become_messages_that_name_the_file(tmp_path):
    """Any OS error at the store's files is a message naming the file, never a traceback;
    other errors are left alone for the code that knows them."""
    import errno

    from retrieval.errors import storage_error

    denied = storage_error(tmp_path, PermissionError(errno.EACCES, "Permission denied",
                                                     str(tmp_path / "meta.sqlite")))
    assert denied is not None and "meta.sqlite: Permission denied" in str(denied)
    assert "disk full" in str(storage_error(tmp_path, OSError(errno.ENOSPC, "No space left")))
    assert "I/O error" in str(storage_error(tmp_path, OSError(errno.EIO, "Input/output error")))
    assert storage_error(tmp_path, RuntimeError("a bug")) is None
