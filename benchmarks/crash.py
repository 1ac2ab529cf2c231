"""Crash loop: SIGKILL `medsearch index`, `reindex` and `tag` at random moments, resume each
time, and check the store's invariants after every kill. Prints one JSON document.

    python benchmarks/crash.py --kills 50            # the long run (docs/reliability.md)
    python benchmarks/crash.py --kills 10 --quick    # about what CI runs

Each run is the real CLI in its own process group (the decode workers die with it, as in a
power cut or an OOM kill), killed after a delay drawn (seeded) uniformly over the length of an
uninterrupted run of the same command, so kills land in start-up, between and inside
commits, in the index save and after the last write. After each kill the checker opens the
store read-only as `search` would and verifies:

* it opens; the ids in the FAISS index equal the image rows' ids equal the vector rows' ids;
* no duplicate ids or (path, frame) pairs; no committed image lost;
* no id ever names another image than it did before (id → (path, frame, content hash));
* every stored vector equals a fresh embedding of its file (cosine ≥ 0.9999), computed once
  here with the same decode and encoder, fp32;
* the index type in use is the one the manifest names; a tag run's labels are all there or
  none, with the record of the run in the same state.

When a run finishes, the store must equal one built without interruption: the same
(path, frame) set and failures, vectors at cosine ≥ 0.9999, the same top-10 for queries.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu  # noqa: E402

COS_MIN = 0.9999
#: Scores of the same image in two builds may differ by float16 steps of its stored vector
#: (raw vectors are kept as float16: one step is ~1e-4 of a component at the test model's 32
#: dimensions), so rankings are compared to this tolerance.
SCORE_ATOL = 5e-4


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
#: Real DICOM from pydicom's wheel: single-frame (raw, RLE, JPEG 2000, odd-sized RGB),
#: multi-frame (2-frame RGB RLE 8/16-bit, 15-frame dose), a no-image plan, a truncated file.
DICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm",
               "SC_rgb_small_odd.dcm", "SC_rgb_rle_2frame.dcm", "SC_rgb_rle_16bit_2frame.dcm",
               "rtdose.dcm", "rtplan.dcm", "MR_truncated.dcm")
TAG_LABELS = "effusion,pneumothorax,normal,nodule"
TAG_SOURCE = "zero-shot:crash"



def make_corpus(folder: Path, images: int, seed: int = 0) -> None:
    """PNG 8-bit RGB, PNG grey, PNG 16-bit, JPEG; real DICOM; three broken files."""
    from PIL import Image
    import pydicom

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        h, w = int(rng.integers(48, 160)), int(rng.integers(48, 160))
        yy, xx = np.mgrid[0:h, 0:w]
        unit = np.sin(xx / (3 + i % 17)) + np.cos(yy / (4 + i % 13)) + rng.normal(0, 0.3, (h, w))
        unit = (unit - unit.min()) / (unit.max() - unit.min())
        sub = folder / f"part{i % 4}"
        sub.mkdir(exist_ok=True)
        kind = i % 4
        if kind == 0:
            rgb = np.stack([unit, unit[::-1], unit[:, ::-1]], axis=2)
            Image.fromarray((rgb * 255).astype(np.uint8)).save(sub / f"rgb{i:04d}.png")
        elif kind == 1:
            Image.fromarray((unit * 255).astype(np.uint8)).save(sub / f"grey{i:04d}.png")
        elif kind == 2:
            Image.fromarray((unit * 65535).astype(np.uint16)).save(sub / f"deep{i:04d}.png")
        else:
            Image.fromarray((unit * 255).astype(np.uint8)).convert("RGB").save(
                sub / f"photo{i:04d}.jpg", quality=90)
    dicom = Path(pydicom.__file__).parent / "data" / "test_files"
    (folder / "dicom").mkdir(exist_ok=True)
    for name in DICOM_FILES:
        shutil.copy(dicom / name, folder / "dicom" / name)
    (folder / "broken").mkdir(exist_ok=True)
    (folder / "broken" / "empty.png").write_bytes(b"")
    (folder / "broken" / "notes.jpg").write_text("a text file, not a JPEG")
    good = next((folder / "part0").glob("*.png")).read_bytes()
    (folder / "broken" / "truncated.png").write_bytes(good[: len(good) // 2])


def medsearch(*args: str) -> list[str]:
    return [sys.executable, "-m", "medsearch", *args]


def child_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return env


def index_args(corpus: Path, store: Path, model: Path, workers: int) -> list[str]:
    return medsearch("index", str(corpus), "--store", str(store), "--model", str(model),
                     "--workers", str(workers), "--batch-size", "1", "--frames", "all",
                     "--precision", "fp32", "--no-progress", "--json")


def run_to_end(cmd: list[str], watch: Path | None = None, timeout: float = 600,
               ) -> tuple[dict, float, float | None]:
    """Run ``cmd`` to its end: (its JSON, seconds, seconds until ``watch`` appeared)."""
    started = time.perf_counter()
    appeared = None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=child_env())
        while proc.poll() is None:
            if appeared is None and watch is not None and watch.exists():
                appeared = time.perf_counter() - started
            if time.perf_counter() - started > timeout:
                proc.kill()
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:4])} failed ({proc.returncode}): {stderr[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1]), seconds, appeared


def kill_delay(rng: random.Random, seconds: float, writing_from: float) -> float:
    """Uniform over the whole run one time in four, else over the part that writes: a kill
    during imports tests nothing the others do not."""
    if rng.random() < 0.25:
        return rng.uniform(0, seconds)
    return rng.uniform(writing_from, seconds)


def run_and_kill(cmd: list[str], delay: float, log: Path) -> tuple[bool, float]:
    """Start ``cmd``, SIGKILL its whole process group after ``delay`` s: (killed, seconds)."""
    started = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env(),
                                start_new_session=True)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            try:  # the fork server or a worker may outlive the leader by a moment
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return True, delay
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:4])} failed ({proc.returncode}): "
                           f"{log.read_text(errors='replace')[-2000:]}")
    return False, time.perf_counter() - started


@dataclass
class Fresh:
    """(path, frame) → (unit vector, content hash), embedded here, once."""

    vectors: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)


def fresh_embeddings(corpus: Path, model: Path) -> Fresh:
    from indexer.decode import DecodeOptions, decode_source
    from indexer.sources import walk
    from retrieval.model.acceleration import stack_planes
    from retrieval.model import VisionEncoder

    encoder = VisionEncoder.load(str(model), device="cpu", precision="fp32")
    options = DecodeOptions(image_size=encoder.image_size, frames="all", phi_policy="drop")
    fresh = Fresh()
    for source in walk([corpus]):
        decoded = decode_source(source, options)
        if not decoded.frames:
            continue
        vectors = encoder.embed_batch(stack_planes([f.planes for f in decoded.frames],
                                                   encoder.device))
        fresh.hashes[source.path] = decoded.content_hash
        for frame, vector in zip(decoded.frames, vectors):
            fresh.vectors[(source.path, frame.index)] = vector / np.linalg.norm(vector)
    return fresh


@dataclass
class Snapshot:
    """What a store holds, read the way a searcher would see it."""

    rows: dict[int, tuple[str, int, str]]          # id → (path, frame, content hash)
    vectors: dict[tuple[str, int], np.ndarray]
    failures: dict[str, str]
    labels: dict[tuple[str, int, str], float]      # (path, frame, label) → score, TAG_SOURCE
    tag_record: bool
    index_type: str
    index_in_use: str
    top10: list[list[tuple[str, int, float]]]  # (path, frame, score) per query


def snapshot(store_dir: Path, queries: np.ndarray, problems: list[str]) -> Snapshot | None:
    """Open the store read-only and check that it agrees with itself; None if there is none."""
    from retrieval import ann
    from retrieval.store import MANIFEST, Store

    if not (store_dir / MANIFEST).is_file():
        return None
    try:
        store = Store.open(store_dir, readonly=True)
    except Exception as exc:  # the store must open: anything else is a finding
        problems.append(f"store does not open: {type(exc).__name__}: {exc}")
        return None
    try:
        image_rows = store.image_keys()
        vector_ids = store.vector_ids().tolist()
        failures = store.failures()
        labels = store.labels(TAG_SOURCE)
        tag_record = store.setting(f"tags:{TAG_SOURCE}") is not None
        image_ids = [r[0] for r in image_rows]
        index_ids = store.vector_index.ids()
        live = np.setdiff1d(index_ids, store.vector_index.tombstones)
        if len(set(image_ids)) != len(image_ids) or len(np.unique(index_ids)) != len(index_ids):
            problems.append("duplicate ids")
        if set(live.tolist()) != set(image_ids) or set(vector_ids) != set(image_ids):
            problems.append(f"ids disagree: index {len(live)}, images {len(image_ids)}, "
                            f"vectors {len(vector_ids)}")
        pairs = [(r[1], r[2]) for r in image_rows]
        if len(set(pairs)) != len(pairs):
            problems.append("duplicate (path, frame) rows")
        stored = store.vectors(image_ids) if image_ids else np.zeros((0, store.dim), np.float32)
        status = store.index_status()
        if status["index_in_use"] != store.manifest.index_type:
            problems.append(f"manifest names {store.manifest.index_type}, index in use is "
                            f"{status['index_in_use']}")
        inner = type(ann.inner_index(store.index)).__name__
        expected = {"Flat": "IndexFlat", "HNSW32": "IndexHNSWFlat"}.get(store.manifest.index_type)
        if expected and not inner.startswith(expected):
            problems.append(f"manifest names {store.manifest.index_type}, the index is {inner}")
        top10 = []
        if len(image_ids):
            scores, found = store.search(queries, 10)
            rows = {r[0]: (r[1], r[2]) for r in image_rows}
            top10 = [[(*rows[int(i)], float(s)) for i, s in zip(q, qs) if i >= 0]
                     for q, qs in zip(found, scores)]
        return Snapshot(rows={r[0]: (r[1], r[2], r[3]) for r in image_rows},
                        vectors={p: v for p, v in zip(pairs, stored)}, failures=failures,
                        labels={(p, f, l): s for p, f, l, s in labels}, tag_record=tag_record,
                        index_type=store.manifest.index_type, index_in_use=status["index_in_use"],
                        top10=top10)
    finally:
        store.close()  # read-only: nothing is saved


@dataclass
class Ledger:
    """Counts across the whole loop; an id, once given, must name the same image for ever."""

    fresh: Fresh
    ids: dict[int, tuple[str, int, str]] = field(default_factory=dict)
    checks: int = 0
    passed: int = 0
    lost: int = 0
    duplicated: int = 0
    reused: int = 0
    inconsistent: int = 0
    findings: list[str] = field(default_factory=list)

    def check(self, snap: Snapshot | None, problems: list[str], before: Snapshot | None,
              what: str, tag_expected: dict | None = None) -> None:
        self.checks += 1
        bad = list(problems)
        if snap is not None:
            for i, key in snap.rows.items():
                if self.ids.setdefault(i, key) != key:
                    self.reused += 1
                    bad.append(f"id {i} named {self.ids[i]} and now {key}")
            for pair, vector in snap.vectors.items():
                want = self.fresh.vectors.get(pair)
                cos = cosine(vector, want) if want is not None else -1
                if cos < COS_MIN:
                    self.inconsistent += 1
                    bad.append(f"{pair}: stored vector has cosine {cos:.6f} to a fresh one")
            for path, _, digest in snap.rows.values():
                if self.fresh.hashes.get(path) != digest:
                    self.inconsistent += 1
                    bad.append(f"{path}: stored content hash differs from the file's")
            if tag_expected is not None and snap.labels:
                if not any(set(snap.labels) == set(e) for e in tag_expected):
                    self.inconsistent += 1
                    bad.append(f"tag labels partial or mixed: {len(snap.labels)}, expected one "
                               f"of {[len(e) for e in tag_expected]}")
            if snap.labels and not snap.tag_record or snap.tag_record and not snap.labels:
                self.inconsistent += 1
                bad.append("tag labels and the record of the tag run disagree")
        if before is not None:
            now = set(snap.vectors) if snap else set()
            lost = set(before.vectors) - now
            self.lost += len(lost)
            bad += [f"lost {p}" for p in sorted(lost)[:5]]
        self.duplicated += sum("duplicate" in b for b in bad)
        self.inconsistent += sum(b.startswith(("ids disagree", "manifest", "store does not"))
                                 for b in bad)
        if bad:
            self.findings += [f"{what}: {b}" for b in bad]
        else:
            self.passed += 1


def same_store(a: Snapshot, ref: Snapshot) -> list[str]:
    """Differences between a resumed store and the uninterrupted reference."""
    out = []
    if set(a.vectors) != set(ref.vectors):
        out.append(f"(path, frame) sets differ: {len(a.vectors)} vs {len(ref.vectors)}")
    for pair in set(a.vectors) & set(ref.vectors):
        if cosine(a.vectors[pair], ref.vectors[pair]) < COS_MIN:
            out.append(f"{pair}: vector differs from the uninterrupted build")
    if set(a.failures) != set(ref.failures):
        out.append(f"failures differ: {sorted(set(a.failures) ^ set(ref.failures))[:3]}")
    if len(a.top10) != len(ref.top10) or not all(map(same_ranking, a.top10, ref.top10)):
        out.append("top-10 differs from the uninterrupted build")
    return out


def same_ranking(a: list[tuple[str, int, float]], b: list[tuple[str, int, float]]) -> bool:
    """The same results in the same order, but images of equal score (identical frames) may
    come in either order, and a tie cut by the k-th place may keep either member."""
    if len(a) != len(b) or not np.allclose([s for *_, s in a], [s for *_, s in b],
                                           atol=SCORE_ATOL):
        return False
    groups = lambda rows: [{(p, f) for p, f, s in rows if abs(s - t) <= SCORE_ATOL}  # noqa: E731
                           for *_, t in rows]
    last = a[-1][2] if a else 0.0
    return all(x == y for x, y, (*_, s) in zip(groups(a), groups(b), a) if abs(s - last) > SCORE_ATOL)


def crash_loop(work: Path, model: Path, *, index_kills: int, reindex_kills: int, tag_kills: int,
               images: int, seed: int = 0, workers: tuple[int, ...] = (0,),
               new_rounds: bool = True) -> dict:
    """The whole loop; returns the JSON document (see the module docstring). ``new_rounds``:
    once a kill leaves everything committed, finish, compare and index again from nothing
    (more varied moments, but a full run each time: off in CI)."""
    from retrieval.search import Searcher
    from retrieval.store import Store
    from retrieval.tagging import tag_store
    from retrieval.zeroshot import ZeroShotClassifier, read_logit_scalars, resolve_labels

    started = time.perf_counter()
    rng = random.Random(seed)
    corpus = work / "corpus"
    make_corpus(corpus, images, seed)
    fresh = fresh_embeddings(corpus, model)
    ledger = Ledger(fresh)
    pairs = sorted(fresh.vectors)
    queries = np.stack([fresh.vectors[pairs[i]] for i in
                        np.random.default_rng(seed).choice(len(pairs), 4, replace=False)])
    queries = np.ascontiguousarray(queries, np.float32)

    # the uninterrupted build: the reference, and the length of a run
    ref_dir = work / "reference"
    _, t_index, t_store = run_to_end(index_args(corpus, ref_dir, model, workers[0]),
                                     watch=ref_dir / "meta.sqlite")
    t_store = t_store or 0.0
    problems: list[str] = []
    reference = snapshot(ref_dir, queries, problems)
    ledger.check(reference, problems, None, "reference")
    ledger.ids.clear()  # the reference store's ids are its own

    moments: Counter = Counter()
    kills = Counter()
    rounds = 0

    def new_store() -> Path:
        nonlocal rounds
        rounds += 1
        return work / f"store{rounds}"

    def finish(cmd: list[str], store_dir: Path, before: Snapshot | None) -> Snapshot | None:
        run_to_end(cmd)
        problems: list[str] = []
        snap = snapshot(store_dir, queries, problems)
        ledger.check(snap, problems, before, "completed run")
        return snap

    # -- index ------------------------------------------------------------------------------
    store_dir, prev = new_store(), None
    log = work / "run.log"
    while kills["index"] < index_kills:
        cmd = index_args(corpus, store_dir, model, rng.choice(workers))
        rows_before = len(prev.rows) if prev else 0
        # a resumed run is shorter: start-up plus the part of the work still to do
        left = t_store + (t_index - t_store) * (1 - rows_before / max(1, len(reference.rows)))
        killed, _ = run_and_kill(cmd, kill_delay(rng, left, t_store), log)
        problems = []
        snap = snapshot(store_dir, queries, problems)
        if not killed:
            moments["index: finished before the kill"] += 1
            ledger.check(snap, problems, prev, "index finished")
            diff = same_store(snap, reference) if snap else ["no store"]
            ledger.inconsistent += len(diff)
            ledger.findings += [f"index final: {d}" for d in diff]
            store_dir, prev = new_store(), None  # another round from nothing
            continue
        kills["index"] += 1
        rows = len(snap.rows) if snap else 0
        moments["index: " + ("before the store existed" if snap is None and not problems else
                             "nothing new committed yet" if rows == rows_before else
                             "all committed, index not yet saved" if rows == len(reference.rows)
                             and not (store_dir / "index.faiss").exists() else
                             "all committed" if rows == len(reference.rows) else
                             "mid-run, after commits")] += 1
        ledger.check(snap, problems, prev, f"index kill {kills['index']}")
        prev = snap or prev
        if new_rounds and rows == len(reference.rows) and kills["index"] < index_kills:
            # nothing left to interrupt: resume to the end, compare, and start again
            done = finish(index_args(corpus, store_dir, model, workers[0]), store_dir, prev)
            diff = same_store(done, reference) if done else ["no store"]
            ledger.inconsistent += len(diff)
            ledger.findings += [f"index round {rounds}: {d}" for d in diff]
            store_dir, prev = new_store(), None
    final = finish(index_args(corpus, store_dir, model, workers[0]), store_dir, prev)
    diff = same_store(final, reference) if final else ["no store"]
    ledger.inconsistent += len(diff)
    ledger.findings += [f"index final: {d}" for d in diff]

    # Reindex and tag runs are as long as a CLI start-up plus a little work: first guessed
    # from the index run's start-up, then each run that ends before its kill is the measure.
    t_runs = {"reindex": t_store, "tag": t_store}

    def kill_run(kind: str, cmd: list[str]) -> bool:
        killed, seconds = run_and_kill(cmd, kill_delay(rng, 1.2 * t_runs[kind],
                                                       0.6 * t_runs[kind]), log)
        if not killed:
            t_runs[kind] = seconds
        return killed

    # -- reindex: Flat <-> HNSW32 ----------------------------------------------------------
    def reindex(target: str) -> list[str]:
        return medsearch("reindex", "--index-type", target, "--store", str(store_dir), "--json")

    target, prev = "HNSW32", final
    while kills["reindex"] < reindex_kills:
        killed = kill_run("reindex", reindex(target))
        problems = []
        snap = snapshot(store_dir, queries, problems)
        ledger.check(snap, problems, prev, f"reindex {'kill' if killed else 'finished'}")
        if killed:
            kills["reindex"] += 1
            moments["reindex: " + ("already switched" if snap and snap.index_type == target
                                   else "not yet switched")] += 1
        else:
            moments["reindex: finished before the kill"] += 1
            if snap and snap.index_type != target:
                ledger.inconsistent += 1
                ledger.findings.append(f"reindex to {target} finished but the store is "
                                       f"{snap.index_type}")
        target = "Flat" if target == "HNSW32" else "HNSW32"
        prev = snap or prev
    final = finish(reindex("HNSW32"), store_dir, prev)
    # HNSW search is approximate: compare with the reference rebuilt as HNSW32 (same graph)
    shutil.copytree(ref_dir, work / "reference-hnsw")
    with Store.open(work / "reference-hnsw") as ref_hnsw:
        ref_hnsw.rebuild("HNSW32")
    ref_hnsw = snapshot(work / "reference-hnsw", queries, [])
    diff = same_store(final, ref_hnsw) if final else ["no store"]
    if final is None or final.index_type != "HNSW32" or final.index_in_use != "HNSW32":
        diff.append("the finished reindex did not leave an HNSW32 index")
    ledger.inconsistent += len(diff)
    ledger.findings += [f"reindex final: {d}" for d in diff]

    # -- tag: two thresholds in turn, so a kill that mixed them would show -------------------
    ref_store = Store.open(ref_dir)
    with ref_store.exclusive():
        text = Searcher(ref_store, str(model), "cpu").text_encoder
        classifier = ZeroShotClassifier(text, read_logit_scalars(text.checkpoint))
        chosen, templates = resolve_labels([TAG_LABELS])
        tag_store(ref_store, classifier, chosen, templates, min_score=0.0, source=TAG_SOURCE)
    ref_store.close()
    every = snapshot(ref_dir, queries, []).labels
    scores = np.sort(np.fromiter(every.values(), float))
    gaps = np.diff(scores[len(scores) // 4: 3 * len(scores) // 4])  # a clear gap mid-range
    at = len(scores) // 4 + int(np.argmax(gaps))
    threshold = round(float(scores[at] + scores[at + 1]) / 2, 6)
    expected = [every, {k: v for k, v in every.items() if v >= threshold}]

    def tag(min_score: float) -> list[str]:
        return medsearch("tag", "--store", str(store_dir), "--model", str(model), "--labels",
                         TAG_LABELS, "--min-score", str(min_score), "--source", TAG_SOURCE,
                         "--json")

    turn = 1  # the threshold first; then all labels, and so on
    while kills["tag"] < tag_kills:
        had = set(prev.labels) if prev else set()
        killed = kill_run("tag", tag((0.0, threshold)[turn % 2]))
        problems = []
        snap = snapshot(store_dir, queries, problems)
        ledger.check(snap, problems, prev, f"tag {'kill' if killed else 'finished'}", expected)
        if killed:
            kills["tag"] += 1
            now = set(snap.labels) if snap else set()
            moments["tag: " + ("new labels written" if now == set(expected[turn % 2]) != had
                               else "old labels kept")] += 1
        else:
            moments["tag: finished before the kill"] += 1
        turn += 1
        prev = snap or prev
    final = finish(tag(0.0), store_dir, prev)
    if final is None or set(final.labels) != set(every) or any(
            abs(final.labels[k] - every[k]) > 1e-4 for k in every):
        ledger.inconsistent += 1
        ledger.findings.append("tag final: labels differ from an uninterrupted tag run")

    return {"kills": sum(kills.values()), "kills_by_command": dict(kills),
            "moments": dict(sorted(moments.items())), "invariant_checks": ledger.checks,
            "invariant_checks_passed": ledger.passed, "lost": ledger.lost,
            "duplicated": ledger.duplicated, "reused": ledger.reused,
            "inconsistent": ledger.inconsistent, "findings": ledger.findings[:20],
            "images": len(fresh.vectors), "files": len(fresh.hashes), "rounds": rounds,
            "seconds_per_index_run": round(t_index, 2),
            "seconds_to_store_open": round(t_store, 2),
            "seconds_per_reindex_run": round(t_runs["reindex"], 2),
            "seconds_per_tag_run": round(t_runs["tag"], 2),
            "seconds": round(time.perf_counter() - started, 1), "seed": seed,
            "cpu": cpu()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="kills in all (index 60%%, "
                        "reindex 20%%, tag 20%%)")
    parser.add_argument("--images", type=int, default=160, help="generated images besides DICOM")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, help="checkpoint (default: a tiny random SigLIP)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    parser.add_argument("--json", action="store_true", help="(always JSON; for symmetry)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="medsearch-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = args.model
        if model is None:
            from retrieval.model.testmodel import make_test_model
            model = make_test_model(work / "tiny-siglip")
        reindex = tag = max(1, args.kills // 5)
        doc = crash_loop(work, model, index_kills=args.kills - reindex - tag,
                         reindex_kills=reindex, tag_kills=tag, images=args.images,
                         seed=args.seed, workers=(0, 1))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
