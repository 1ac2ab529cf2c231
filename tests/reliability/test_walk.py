"""Pruning is only done from a walk that read everything: an empty, unreadable or vanished
root (an unmounted share looks like each of these) must never cost the embeddings under it,
a file whose stat fails is kept, and `medsearch remove` drops entries on purpose.

Unreadable folders are real permission faults. Tests run as root here, where mode bits do not
stop reads, so :func:`no_dac_override` drops CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH from this
thread's effective capabilities (capset(2), restored after): the kernel then applies the mode
bits to root as to anyone. As a normal user the chmod alone does it.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from indexer.pipeline import Indexer
from medsearch.cli import main
from retrieval.model import VisionEncoder
from retrieval.store import Store, manifest_for

from ..conftest import write_images

_CAP_VERSION_3 = 0x20080522
_DAC_BITS = (1 << 1) | (1 << 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


@contextmanager
def no_dac_override():
    """Mode bits apply to this thread even as root (the walk runs in it: workers=0)."""
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(_CAP_VERSION_3, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        pytest.skip("capget failed: cannot drop CAP_DAC_OVERRIDE to make a real permission fault")
    saved = data[0].effective
    data[0].effective = saved & ~_DAC_BITS
    if libc.capset(ctypes.byref(header), data) != 0:
        pytest.skip("capset failed: cannot drop CAP_DAC_OVERRIDE to make a real permission fault")
    try:
        yield
    finally:
        data[0].effective = saved
        assert libc.capset(ctypes.byref(header), data) == 0


@pytest.fixture(scope="module")
def encoder(tiny_model) -> VisionEncoder:
    return VisionEncoder.load(str(tiny_model), device="cpu")


def index(store_dir: Path, encoder: VisionEncoder, *roots):
    store = Store.open_or_create(store_dir, manifest_for(encoder, "Flat"))
    with Indexer(store, encoder, workers=0, progress=False) as indexer:
        report = indexer.run(roots)
    store.close()
    return report


def stored_paths(store_dir: Path) -> set[str]:
    store = Store.open(store_dir, readonly=True)
    ids, _ = store.all_vectors()
    assert store.count == len(ids)
    return {row["path"] for row in store.rows([int(i) for i in ids]).values()}


@pytest.fixture()
def indexed(tmp_path, encoder):
    folder = tmp_path / "share"
    write_images(folder / "a", 3)
    write_images(folder / "b", 2, seed=1)
    store_dir = tmp_path / "store"
    assert index(store_dir, encoder, folder).indexed == 5
    return folder, store_dir, stored_paths(store_dir)


def test_an_empty_root_prunes_nothing_and_says_why(indexed, encoder):
    folder, store_dir, before = indexed
    shutil.rmtree(folder)
    folder.mkdir()  # an unmounted share: the mount point is an empty folder
    report = index(store_dir, encoder, folder)
    assert report.removed == 0
    assert stored_paths(store_dir) == before
    [skipped] = report.prune_skipped
    assert skipped["root"] == str(folder) and "no image files" in skipped["reason"]


def test_an_unreadable_root_prunes_nothing(indexed, encoder):
    folder, store_dir, before = indexed
    folder.chmod(0)
    try:
        with no_dac_override():
            with pytest.raises(PermissionError):  # a real fault, or the test means nothing
                os.listdir(folder)
            report = index(store_dir, encoder, folder)
    finally:
        folder.chmod(0o755)
    assert report.removed == 0
    assert stored_paths(store_dir) == before
    [skipped] = report.prune_skipped
    assert skipped["root"] == str(folder) and "cannot read it" in skipped["reason"]
    assert report.warnings and "Permission denied" in report.warnings[0]["reason"]


def test_an_unreadable_subfolder_keeps_the_whole_root(indexed, encoder):
    """A walk that hit an error does not know what is missing: nothing under it is pruned,
    not even a file that really was deleted elsewhere under the root."""
    folder, store_dir, before = indexed
    (folder / "b").chmod(0)
    (folder / "a" / "img000.png").unlink()
    try:
        with no_dac_override():
            report = index(store_dir, encoder, folder)
    finally:
        (folder / "b").chmod(0o755)
    assert report.removed == 0
    assert stored_paths(store_dir) == before
    [skipped] = report.prune_skipped
    assert "could not be read" in skipped["reason"] and str(folder / "b") in skipped["reason"]


def test_a_root_deleted_after_indexing_prunes_nothing(indexed, encoder, capsys):
    folder, store_dir, before = indexed
    shutil.rmtree(folder)
    report = index(store_dir, encoder, folder)
    assert report.removed == 0 and stored_paths(store_dir) == before
    assert "cannot read it" in report.prune_skipped[0]["reason"]
    # the CLI refuses a missing path outright, with a message and no change
    with pytest.raises(SystemExit) as exc:
        main(["index", str(folder), "--store", str(store_dir), "--workers", "0"])
    assert exc.value.code == 2 and "no such file or folder" in capsys.readouterr().err
    assert stored_paths(store_dir) == before


def test_a_file_whose_stat_fails_is_reported_and_kept(indexed, encoder):
    folder, store_dir, before = indexed
    (folder / "b").chmod(0o644)  # listable, but no search (x) bit: stat of its files fails
    try:
        with no_dac_override():
            report = index(store_dir, encoder, folder)
    finally:
        (folder / "b").chmod(0o755)
    assert report.removed == 0
    assert stored_paths(store_dir) == before
    assert {Path(w["path"]).parent.name for w in report.warnings} == {"b"}
    assert all("cannot stat" in w["reason"] for w in report.warnings) and len(report.warnings) == 2
    assert report.prune_skipped == []


def test_files_deleted_under_a_healthy_root_are_still_removed(indexed, encoder):
    folder, store_dir, before = indexed
    gone = folder / "a" / "img001.jpg"
    gone.unlink()
    report = index(store_dir, encoder, folder)
    assert (report.removed, report.prune_skipped, report.warnings) == (1, [], [])
    assert stored_paths(store_dir) == before - {str(gone)}


def cli(capsys, *args) -> tuple[int, dict | str]:
    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr().out
    return code, json.loads(out) if "--json" in args else out


def test_cli_shows_why_nothing_was_removed(indexed, capsys):
    folder, store_dir, before = indexed
    shutil.rmtree(folder)
    folder.mkdir()
    code, text = cli(capsys, "index", str(folder), "--store", str(store_dir), "--workers", "0")
    assert code == 0
    assert f"not removing missing files under {folder}: no image files found" in text
    code, doc = cli(capsys, "index", str(folder), "--store", str(store_dir), "--workers", "0",
                    "--json")
    assert code == 0 and doc["removed"] == 0
    assert doc["prune_skipped"][0]["root"] == str(folder)
    assert stored_paths(store_dir) == before


def test_remove_drops_sources_at_or_under_paths(indexed, capsys, tiny_model):
    folder, store_dir, before = indexed
    store = Store.open(store_dir)
    ids, _ = store.all_vectors()
    with store.writer() as writer:  # a label must go with its image
        from retrieval.store.schema import LabelRow
        writer.session.add_all(LabelRow(image_id=int(i), label="x", source="user") for i in ids)
    store.close()
    shutil.rmtree(folder / "b")  # gone from disk: still removable
    single = folder / "a" / "img000.png"  # still on disk: removed from the store only
    code, doc = cli(capsys, "remove", str(folder / "b"), str(single), str(folder / "nothing"),
                    "--store", str(store_dir), "--json")
    assert code == 0
    removed = {p for p in before if p.startswith(str(folder / "b") + "/")} | {str(single)}
    assert set(doc["paths"]) == removed and doc["removed_files"] == doc["removed_images"] == 3
    assert doc["not_found"] == [str(folder / "nothing")]
    assert single.exists()
    assert stored_paths(store_dir) == before - removed
    store = Store.open(store_dir, readonly=True)
    ids, vectors = store.all_vectors()
    assert store.count == len(ids) == 2
    found = store.search(vectors, k=5)[1]  # the index holds exactly the two left
    assert found[:, 0].tolist() == ids.tolist() and (found[:, 2:] == -1).all()
    with store.sessions() as session:
        from sqlalchemy import func, select
        assert session.scalar(select(func.count()).select_from(LabelRow)) == 2
    code, text = cli(capsys, "remove", str(folder), "--store", str(store_dir))
    assert code == 0 and "removed 2 file(s) (2 image(s))" in text
    assert stored_paths(store_dir) == set()
