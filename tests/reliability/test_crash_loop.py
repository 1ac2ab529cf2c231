"""SIGKILL `medsearch index`, `reindex` and `tag` at random moments (10 kills, seeded) and
check after every kill that the store opens and agrees with itself, that no id is lost,
duplicated or reused, that every vector equals a fresh embedding of its file, and that the
finished store equals an uninterrupted build. The long run (≥ 50 kills) is
`python benchmarks/crash.py`; the harness and its checks live there."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kills_during_index_reindex_and_tag_leave_a_consistent_store(tmp_path, tiny_model,
                                                                     monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks/ is a checkout folder, not installed
    from benchmarks.crash import crash_loop

    doc = crash_loop(tmp_path, tiny_model, index_kills=6, reindex_kills=2, tag_kills=2,
                     images=16, seed=13)
    assert doc["kills"] == 10, doc
    assert doc["findings"] == [], doc
    assert (doc["lost"], doc["duplicated"], doc["reused"], doc["inconsistent"]) == (0, 0, 0, 0)
    assert doc["invariant_checks_passed"] == doc["invariant_checks"] >= 12
    assert doc["images"] > doc["files"]  # multi-frame DICOM: several vectors for one file
