"""`medsearch demo` works offline from nothing and says its model is random."""

from __future__ import annotations

from .test_cli import cli


def test_demo_runs_offline_end_to_end(capsys, tmp_path):
    code, doc, err = cli(capsys, "demo", "--dir", str(tmp_path))
    assert code == 0
    assert doc["random_model"] is True
    assert "RANDOMLY initialised" in err and "medsiglip-448" in err
    assert doc["index"]["indexed"] >= 12 and doc["index"]["failed"] == 0
    assert len(doc["text_query"]["results"]) == 5
    similar = doc["similar_query"]["results"]
    assert len(similar) == 5 and doc["similar_query"]["id"] not in [r["id"] for r in similar]
    kinds = {r["metadata"]["source_kind"] for r in doc["text_query"]["results"] + similar}
    assert kinds <= {"image", "dicom"}
