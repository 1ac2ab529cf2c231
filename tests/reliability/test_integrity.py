"""Store integrity (issue 13, defects 3-5 and 8, item 5): index files that fail to write never
replace good ones, damaged ones are never searched, ids are never handed out twice, two
runs never both create a store, files are owner-only, and check / repair / backup work."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval.errors import StoreError
from retrieval.store import INDEX_FILE, MANIFEST, Manifest, NewFile, NewImage, Store, backup

#: Stored vectors are float16: a unit vector scores 1 against itself to about 1e-4 at this DIM.
DIM = 16
REPO = Path(__file__).resolve().parents[2]


def manifest(index_type: str = "Flat", fingerprint: str = "abc") -> Manifest:
    return Manifest(model="m", model_revision="local", model_fingerprint=fingerprint, dim=DIM,
                    preprocessing_version="v1", index_type=index_type)


def unit(rng, n=1) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def add(store: Store, names: list[str], vectors: np.ndarray) -> list[int]:
    with store.writer() as w:
        return [ids[0] for ids in w.add_files([
            NewFile(name, 1, 1, name, "image", [NewImage(0, 8, 8, v)])
            for name, v in zip(names, vectors)])]


def make(root: Path, n: int = 60, index_type: str = "Flat", seed: int = 0):
    rng = np.random.default_rng(seed)
    vectors = unit(rng, n)
    store = Store.create(root, manifest(index_type))
    ids = add(store, [f"/a/{i}.png" for i in range(n)], vectors)
    store.close()
    return ids, vectors


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.iterdir() if p.name.endswith(".tmp")]


# -- defect 3: a failed write never replaces the good index ---------------------------------
def test_disk_full_while_saving_keeps_the_good_index(tmp_path, monkeypatch):
    root = tmp_path / "store"
    make(root)
    good_index, good_manifest = (root / INDEX_FILE).read_bytes(), (root / MANIFEST).read_bytes()
    store = Store.open(root)
    add(store, [f"/b/{i}.png" for i in range(40)], unit(np.random.default_rng(1), 40))
    real_write = os.write
    written = {"n": 0}

    def full_disk(fd, data):  # the disk fills up part-way through the index file
        if ".tmp" in os.readlink(f"/proc/self/fd/{fd}") and INDEX_FILE in os.readlink(f"/proc/self/fd/{fd}"):
            if written["n"] + len(data) > 2000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written["n"] += len(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(StoreError, match=r"index\.faiss.*disk full"):
        store.save()
    monkeypatch.setattr(os, "write", real_write)
    assert (root / INDEX_FILE).read_bytes() == good_index
    assert (root / MANIFEST).read_bytes() == good_manifest
    assert no_temp_files(root)
    reopened = Store.open(root, readonly=True)
    assert reopened.index_problem is None and reopened.count == 100  # rows committed: reconciled
    store.save()  # space is back: the next save goes through
    assert Store.open(root, readonly=True).index_problem is None


def _can_mount_tmpfs(folder: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    folder.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                        capture_output=True).returncode == 0
    return ok


def test_a_really_full_filesystem_keeps_the_good_index(tmp_path):
    mnt = tmp_path / "small"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("needs root and tmpfs mounts to make a small filesystem")
    try:
        root = mnt / "store"
        make(root, n=3000)
        good_index, good_manifest = (root / INDEX_FILE).read_bytes(), (root / MANIFEST).read_bytes()
        store = Store.open(root)
        add(store, [f"/b/{i}.png" for i in range(3000)], unit(np.random.default_rng(1), 3000))
        filler = mnt / "filler"
        with open(filler, "wb") as fh:  # fill every byte that is left but ~64 KiB
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        os.truncate(filler, max(0, filler.stat().st_size - 65536))
        with pytest.raises(StoreError, match=r"index\.faiss.*disk full"):
            store.save()
        assert (root / INDEX_FILE).read_bytes() == good_index
        assert (root / MANIFEST).read_bytes() == good_manifest
        assert no_temp_files(root)
        filler.unlink()
        store.save()
        store.close()
        reopened = Store.open(root, readonly=True)
        assert reopened.index_problem is None and reopened.count == 6000
        reopened.engine.dispose()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# -- damaged index files are never searched -------------------------------------------------
def _flip_vector(root: Path, vector: np.ndarray) -> None:
    data = bytearray((root / INDEX_FILE).read_bytes())
    # the index holds what the rows hold: the vector rounded through float16
    at = data.find(vector.astype(np.float16).astype(np.float32).tobytes())
    assert at > 0
    data[at + 3] ^= 0x40  # the exponent of its first value: a very different vector
    (root / INDEX_FILE).write_bytes(bytes(data))


DAMAGE = {
    "truncated": lambda root, v: (root / INDEX_FILE).write_bytes(
        (root / INDEX_FILE).read_bytes()[:-500]),
    "bit-flipped": lambda root, v: _flip_vector(root, v[7]),
    "wrong id count": lambda root, v: (root / MANIFEST).write_text(json.dumps(
        {**json.loads((root / MANIFEST).read_text()), "index_count": 59})),
    "missing": lambda root, v: (root / INDEX_FILE).unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_index_is_never_answered_from(tmp_path, damage, caplog):
    root = tmp_path / "store"
    ids, vectors = make(root)
    DAMAGE[damage](root, vectors)
    on_disk = (root / INDEX_FILE).read_bytes() if (root / INDEX_FILE).exists() else None

    with caplog.at_level(logging.WARNING, logger="retrieval.store"):
        reader = Store.open(root, readonly=True)
    assert reader.index_problem
    assert any(INDEX_FILE in r.getMessage() and "medsearch repair" in r.getMessage()
               for r in caplog.records)
    scores, found = reader.search(vectors[7], 1)
    assert found[0][0] == ids[7] and scores[0][0] == pytest.approx(1.0, abs=1e-3)
    assert reader.count == 60
    reader.close()
    after = (root / INDEX_FILE).read_bytes() if (root / INDEX_FILE).exists() else None
    assert after == on_disk  # a reader never writes

    report = Store.open(root, readonly=True).check()
    assert not report["ok"]
    assert any(INDEX_FILE in p for p in report["problems"])

    fixed = Store.open(root, exclusive=True).repair()
    assert fixed["ok"], fixed
    assert Store.open(root, readonly=True).check()["ok"]
    clean = Store.open(root, readonly=True)
    assert clean.index_problem is None and clean.count == 60


def test_a_writable_open_rebuilds_and_saves_a_damaged_index(tmp_path, caplog):
    root = tmp_path / "store"
    make(root)
    DAMAGE["truncated"](root, None)
    with caplog.at_level(logging.WARNING, logger="retrieval.store"):
        store = Store.open(root)
    assert any(str(root / INDEX_FILE) in r.getMessage() and "rebuilding" in r.getMessage()
               for r in caplog.records)
    store.close()
    assert Store.open(root, readonly=True).index_problem is None  # saved whole
    assert Store.open(root, readonly=True).check()["ok"]


def test_full_checksum_catches_what_the_size_check_cannot(tmp_path):
    root = tmp_path / "store"
    _, vectors = make(root)
    m = json.loads((root / MANIFEST).read_text())
    m["index_crc32"] = None  # an index recorded by sha256 only: the full check still sees it
    (root / MANIFEST).write_text(json.dumps(m))
    _flip_vector(root, vectors[3])
    store = Store.open(root, readonly=True)
    assert store.index_problem is None
    assert "sha256" in store.verify_index_file()
    scores, _ = store.search(vectors[3], 1)
    assert scores[0][0] == pytest.approx(1.0, abs=1e-3)  # switched to the rebuilt index


def _cli(capsys, *args: str) -> tuple[int, dict]:
    """The real CLI entry (argument parsing, exit codes), in-process: no interpreter start."""
    from medsearch.cli import main

    code = 0
    try:
        main([*args, "--json"])
    except SystemExit as exc:
        code = exc.code or 0
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_check_exits_non_zero_and_repair_fixes(tmp_path, capsys):
    root = tmp_path / "store"
    make(root)
    DAMAGE["truncated"](root, None)
    code, doc = _cli(capsys, "check", "--store", str(root))
    assert code != 0
    assert doc["ok"] is False and any("index.faiss" in p for p in doc["problems"])
    assert doc["counts"]["images"] == 60
    code, doc = _cli(capsys, "repair", "--store", str(root))
    assert code == 0 and doc["ok"], doc
    code, doc = _cli(capsys, "check", "--store", str(root))
    assert code == 0 and doc["ok"], doc
    dest = tmp_path / "copy"
    code, doc = _cli(capsys, "backup", "--store", str(root), "--to", str(dest))
    assert code == 0 and doc["ok"] and doc["counts"]["images"] == 60


def test_repair_lists_and_drops_what_must_be_re_embedded(tmp_path):
    root = tmp_path / "store"
    ids, _ = make(root)
    with sqlite3.connect(root / "meta.sqlite") as con:
        con.execute("UPDATE vectors SET vector = x'00' WHERE image_id = ?", (ids[4],))
        con.execute("DELETE FROM vectors WHERE image_id = ?", (ids[5],))
    report = Store.open(root, readonly=True).check()
    assert not report["ok"] and report["reembed"] == ["/a/4.png", "/a/5.png"]
    store = Store.open(root, exclusive=True)
    assert store.count == 58  # neither is searched
    kept = store.repair()
    assert kept["reembed"] == ["/a/4.png", "/a/5.png"] and not kept["ok"]
    dropped = store.repair(drop=True)
    store.close()
    assert dropped["ok"] and dropped["dropped"] == ["/a/4.png", "/a/5.png"]


# -- defect 4: ids are never reused ---------------------------------------------------------
def _lose_last_commit(root: Path, lost: list[int]) -> None:
    """What a power cut under synchronous=NORMAL does: the last commit vanishes, its
    AUTOINCREMENT counter update with it, while the saved index keeps the ids."""
    con = sqlite3.connect(root / "meta.sqlite")
    with con:
        con.execute("PRAGMA foreign_keys=ON")
        con.execute(f"DELETE FROM files WHERE id IN (SELECT file_id FROM images WHERE id IN "
                    f"({','.join(map(str, lost))}))")
        top = con.execute("SELECT max(id) FROM images").fetchone()[0]
        con.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'images'", (top,))
        con.execute("UPDATE sqlite_sequence SET seq = (SELECT max(id) FROM files) "
                    "WHERE name = 'files'")
    con.close()


@pytest.mark.parametrize("index_type", ["Flat", "HNSW32"])
@pytest.mark.parametrize("how", ["lost commit", "older database restored"])
def test_ids_are_never_reused(tmp_path, index_type, how):
    root = tmp_path / "store"
    rng = np.random.default_rng(5)
    vectors = unit(rng, 12)
    store = Store.create(root, manifest(index_type))
    add(store, [f"/a/{i}.png" for i in range(9)], vectors[:9])
    store.close()
    if how == "older database restored":
        src, dst = sqlite3.connect(root / "meta.sqlite"), sqlite3.connect(tmp_path / "old.sqlite")
        src.backup(dst)
        src.close()
        dst.close()
    store = Store.open(root)
    lost = add(store, [f"/a/{i}.png" for i in range(9, 12)], vectors[9:])
    store.close()  # the index file now holds the lost ids
    if how == "lost commit":
        _lose_last_commit(root, lost)
    else:
        for suffix in ("-wal", "-shm"):
            (root / f"meta.sqlite{suffix}").unlink(missing_ok=True)
        shutil.copy(tmp_path / "old.sqlite", root / "meta.sqlite")

    store = Store.open(root)
    new_vector = unit(rng)[0]
    (new_id,) = add(store, ["/a/new.png"], new_vector[None])
    assert new_id > max(lost)
    for v in vectors[9:]:  # the lost image's vector never finds the new image
        scores, found = store.search(v, 3)
        assert not any(i == new_id and s > 0.99 for s, i in zip(scores[0], found[0]))
    scores, found = store.search(new_vector, 1)  # and the new image is found by its own
    assert found[0][0] == new_id and scores[0][0] == pytest.approx(1.0, abs=1e-3)
    store.close()
    store = Store.open(root)  # and again after a reopen
    (newer,) = add(store, ["/a/newer.png"], unit(rng))
    assert newer > new_id
    store.close()


# -- defect 5: two runs creating one store --------------------------------------------------
RACER = """
import sys, time, numpy as np
from pathlib import Path
from retrieval.errors import StoreError
from retrieval.store import Manifest, NewImage, Store
base, model, go, rounds = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
print("ready", flush=True)
while not go.exists() or not go.read_text():
    time.sleep(0.005)
start = float(go.read_text())
m = Manifest(model=model, model_revision="local", model_fingerprint=model, dim=4,
             preprocessing_version="v1")
for r in range(rounds):
    while time.time() < start + 0.4 * r:   # both start each round at the same instant
        pass
    try:
        st = Store.open_or_create(base / f"store{r}", m)   # the order `medsearch index` used
        with st.exclusive():
            with st.writer() as w:
                for i in range(5):
                    w.add_file(path=f"/{model}/{i}", size=1, mtime_ns=1, content_hash=model,
                               source_kind="image",
                               images=[NewImage(0, 1, 1, np.full(4, 0.5, np.float32))])
            st.close()
        print(r, "ok", flush=True)
    except StoreError as exc:
        print(r, "refused", exc, flush=True)
"""


def test_two_runs_creating_one_store_never_mix_models(tmp_path):
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rounds, go = 8, tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), model, str(go),
                               str(rounds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for model in ("modelA", "modelB")]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    tmp = tmp_path / "go.tmp"
    tmp.write_text(str(time.time() + 0.3))
    tmp.rename(go)
    outs = [p.communicate(timeout=180) for p in procs]
    for (out, err), p in zip(outs, procs):
        assert p.returncode == 0 and "Traceback" not in err, err
    lines = [dict(enumerate(out.splitlines())) for out, _ in outs]
    for r in range(rounds):
        results = {model: lines[k][r] for k, model in enumerate(("modelA", "modelB"))}
        winners = [m for m, line in results.items() if line.split()[1] == "ok"]
        refused = [line for line in results.values() if line.split()[1] == "refused"]
        assert all("another process is writing" in x or "cannot be mixed" in x for x in refused)
        root = tmp_path / f"store{r}"
        m = Manifest.read(root / MANIFEST)
        assert winners == [m.model_fingerprint], results
        store = Store.open(root, readonly=True)
        owners = {row["path"].split("/")[1]
                  for row in store.rows(store.all_vectors()[0].tolist()).values()}
        assert owners == {m.model_fingerprint}
        assert store.check()["ok"]
        store.engine.dispose()
        assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]


def test_a_second_writer_is_refused_with_a_clear_error(tmp_path):
    root = tmp_path / "store"
    first = Store.open_or_create(root, manifest(), exclusive=True)
    # flock conflicts between two open files even in one process: no second interpreter needed
    with pytest.raises(StoreError, match="another process is writing"):
        Store.open_or_create(root, manifest(), exclusive=True)
    with pytest.raises(StoreError, match="another process is writing"):
        Store.open(root, exclusive=True)
    first.close()
    again = Store.open_or_create(root, manifest(), exclusive=True)  # free once it is closed
    again.close()


# -- defect 8: owner-only files -------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_store_files_are_owner_only_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        root = tmp_path / "parent" / "store"
        store = Store.create(root, manifest(), exclusive=True)
        add(store, ["/a.png"], unit(np.random.default_rng(0)))
        store.save()
        names = {p.name for p in root.iterdir()}
        assert {"meta.sqlite", "meta.sqlite-wal", "meta.sqlite-shm", INDEX_FILE, MANIFEST,
                "write.lock"} <= names
        assert root.stat().st_mode & 0o777 == 0o700
        for p in root.iterdir():
            assert p.stat().st_mode & 0o777 == 0o600, p.name
        store.close()
    finally:
        os.umask(old)


# -- item 5: backup while the store is in use -----------------------------------------------
WRITER = """
import sys, time, numpy as np
from retrieval.store import Store, NewImage
st = Store.open(sys.argv[1], exclusive=True)
rng = np.random.default_rng(1)
for b in range(int(sys.argv[2])):
    with st.writer() as w:
        for i in range(4):
            v = rng.normal(size=16).astype(np.float32)
            w.add_file(path=f"/w/{b}/{i}", size=1, mtime_ns=1, content_hash="h",
                       source_kind="image", images=[NewImage(0, 1, 1, v / np.linalg.norm(v))])
    if b % 3 == 0:
        st.save()
st.close()
"""


def test_backup_while_writing_gives_a_copy_that_agrees_with_itself(tmp_path):
    root = tmp_path / "store"
    make(root)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), "150"],
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stderr=subprocess.PIPE, text=True)
    copies = []
    try:
        while proc.poll() is None and len(copies) < 6:
            dest = tmp_path / f"backup{len(copies)}"
            report = backup(root, dest)
            assert report["ok"], report
            copies.append(dest)
    finally:
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert copies
    for dest in copies:  # restore: the copy is a store on its own
        restored = tmp_path / ("restored-" + dest.name)
        shutil.copytree(dest, restored)
        store = Store.open(restored, readonly=True)
        assert store.index_problem is None
        report = store.check()
        assert report["ok"], report
        assert store.count == report["counts"]["images"] and (store.count - 60) % 4 == 0
        store.engine.dispose()
    with pytest.raises(StoreError, match="not empty"):
        backup(root, copies[0])


def test_a_manifest_from_before_these_fields_still_opens_and_gets_them(tmp_path):
    root = tmp_path / "store"
    ids, vectors = make(root)
    data = json.loads((root / MANIFEST).read_text())
    for name in ("index_size", "index_count", "index_crc32", "index_sha256", "index_previous",
                 "id_high_water"):
        data.pop(name)
    (root / MANIFEST).write_text(json.dumps(data))
    old = Store.open(root, readonly=True)
    assert old.index_problem is None and old.count == 60
    assert "checksum" in " ".join(old.check()["problems"])  # says repair records one
    store = Store.open(root, exclusive=True)
    assert store.repair()["ok"]
    store.close()
    m = Manifest.read(root / MANIFEST)
    assert m.index_count == 60 and m.id_high_water == max(ids) and m.index_sha256
