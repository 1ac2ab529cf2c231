"""Reproducible cohorts on planted vectors: a saved query's ids and provenance, exports that are
byte-identical each time (with their provenance sidecar), `diff` and `refresh` after new
matching images are indexed, the same through /cohorts, and refusals (names, uploads, clashes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .serving import cli

TEXT = "planted finding"


def _add(root, model, vectors, start):
    from retrieval.store import NewImage, Store

    store = Store.open(root, exclusive=True)
    try:
        with store.writer() as w:
            for j, v in enumerate(vectors):
                w.add_file(path=f"/data/img-{start + j}.png", size=1, mtime_ns=1,
                           content_hash=f"h{start + j}", source_kind="image",
                           images=[NewImage(0, 8, 8, v)])
    finally:
        store.close()


@pytest.fixture()
def planted(tiny_model, tmp_path):
    """20 images, 5 of them close (cosine 0.9) to the text's vector."""
    from retrieval.model import TextEncoder, resolve_checkpoint
    from retrieval.model.preprocess import PREPROCESSING_VERSION
    from retrieval.store import Manifest, Store

    from .test_query_shape import _toward

    ckpt = resolve_checkpoint(str(tiny_model))
    text = TextEncoder(ckpt, "cpu", "fp32").embed([TEXT])[0].astype(np.float64)
    text /= np.linalg.norm(text)
    rng = np.random.default_rng(2)
    root = tmp_path / "store"
    Store.create(root, Manifest(model=str(ckpt.path), model_revision=ckpt.revision,
                                model_fingerprint=ckpt.fingerprint, dim=len(text),
                                preprocessing_version=PREPROCESSING_VERSION)).close()
    _add(root, tiny_model, [_toward(text, 0.9 if i < 5 else 0.0, rng) for i in range(20)], 0)
    return root, text, rng


def test_save_export_twice_diff_and_refresh(planted, tiny_model, tmp_path):
    from .test_query_shape import _toward

    root, text, rng = planted
    saved = cli("cohort", "save", "finding", "--query", TEXT, "--min-score", "0.5", "-k", "100",
                "--store", str(root))
    assert saved["count"] == 5 and saved["kind"] == "search"
    p = saved["provenance"]
    assert p["query"]["min_score"] == 0.5 and p["query"]["terms"][0]["value"] == TEXT
    assert p["store_rows"] == 20 and p["model_fingerprint"] and p["preprocessing_version"]
    first = cli("cohort", "export", "finding", "--out", str(tmp_path / "a.csv"), "--store", str(root))
    cli("cohort", "export", "finding", "--out", str(tmp_path / "b.csv"), "--store", str(root))
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv.provenance.json").read_bytes() == \
        (tmp_path / "b.csv.provenance.json").read_bytes()
    assert json.loads((tmp_path / "a.csv.provenance.json").read_text())["ids"] == saved["ids"]
    assert first["provenance"].endswith("a.csv.provenance.json")
    assert len((tmp_path / "a.csv").read_text().splitlines()) == 6

    _add(root, tiny_model, [_toward(text, 0.9, rng), _toward(text, 0.0, rng)], 20)
    diff = cli("cohort", "diff", "finding", "--store", str(root))
    assert len(diff["entered"]) == 1 and diff["left"] == []
    assert cli("cohort", "show", "finding", "--store", str(root))["count"] == 5  # diff saves nothing
    refreshed = cli("cohort", "refresh", "finding", "--store", str(root))
    assert refreshed["entered"] == diff["entered"] and refreshed["cohort"]["count"] == 6
    assert refreshed["cohort"]["provenance"]["store_rows"] == 22
    assert cli("cohort", "diff", "finding", "--store", str(root)) == {"entered": [], "left": []}
    far = next(i for i in range(1, 23) if i not in refreshed["cohort"]["ids"])
    cli("cohort", "add", "finding", "--ids", str(far), "--store", str(root))
    again = cli("cohort", "refresh", "finding", "--store", str(root))  # hand-added ids stay
    assert again == {**again, "entered": [], "left": []} and far in again["cohort"]["ids"]
    listed = cli("cohort", "list", "--store", str(root))["cohorts"]
    assert [(c["name"], c["count"]) for c in listed] == [("finding", 7)]


def test_the_api_saves_lists_adds_and_refuses(planted):
    from fastapi.testclient import TestClient

    from .serving import make_app

    root, _, _ = planted
    with TestClient(make_app(root), base_url="http://127.0.0.1") as client:
        made = client.post("/cohorts", json={"name": "api-1", "search": {"query": TEXT, "k": 3}})
        assert made.status_code == 201, made.text
        assert made.json()["count"] == 3
        again = client.post("/cohorts", json={"name": "api-1", "ids": [1]})
        assert again.status_code == 409 and "exists" in again.json()["error"]
        assert client.post("/cohorts", json={"name": "../x", "ids": [1]}).status_code == 422
        assert client.post("/cohorts", json={"name": "two", "ids": [1],
                                             "search": {"query": "a"}}).status_code == 422
        assert client.get("/cohorts/nope").status_code == 404
        added = client.post("/cohorts/picked/add", json={"ids": [3, 4]}).json()
        assert added["kind"] == "ids" and added["ids"] == [3, 4]
        names = [c["name"] for c in client.get("/cohorts").json()["cohorts"]]
        assert names == ["api-1", "picked"]
        csv = client.get("/cohorts/api-1/export", params={"format": "csv"})
        assert csv.status_code == 200 and csv.text.count("\n") == 4
        assert client.get("/cohorts/api-1/diff").json() == {"entered": [], "left": []}
        assert client.delete("/cohorts/picked").status_code == 204
        assert client.get("/cohorts/picked").status_code == 404
    cli_view = cli("cohort", "show", "api-1", "--store", str(root))
    assert cli_view["count"] == 3


def test_a_cohort_of_ids_lists_removed_images_as_left(planted):
    root, _, _ = planted
    saved = cli("cohort", "save", "chosen", "--ids", "2,5,7", "--store", str(root))
    from medsearch.app import Medsearch

    assert saved["ids"] == [2, 5, 7]
    with Medsearch.open(root) as found:
        path = found.row(5)["path"]
    removed = cli("remove", path, "--store", str(root))
    assert removed["removed_images"] == 1
    assert cli("cohort", "diff", "chosen", "--store", str(root)) == {"entered": [], "left": [5]}
    with pytest.raises(Exception, match="exists"):
        cli("cohort", "save", "chosen", "--ids", "2", "--store", str(root))
    with pytest.raises(Exception, match="cohort name"):
        cli("cohort", "save", "bad/name", "--ids", "2", "--store", str(root))


def test_forgotten_images_leave_every_cohort(planted):
    from retrieval.store import Store

    root, _, _ = planted
    cli("cohort", "save", "kept", "--ids", "2,5,7", "--store", str(root))
    store = Store.open(root, exclusive=True)
    try:
        with store.writer() as w:  # what `forget` does in its transaction
            assert w.forget_in_cohorts([5, 99]) == 1
    finally:
        store.close()
    assert cli("cohort", "show", "kept", "--store", str(root))["ids"] == [2, 7]
