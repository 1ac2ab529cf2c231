"""Near-duplicate groups from planted vectors: every planted copy found, no false pair among
distinct images, slices of one series and frames of one file left out unless asked; the same
answer from the CLI and the API; and the pair search itself, exact and through the IVF probe."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.duplicates import near_pairs

from .serving import cli

DIM = 128
N_RANDOM = 3000


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _copy(v: np.ndarray, rng, noise: float = 0.01) -> np.ndarray:
    return _unit(v + rng.normal(scale=noise, size=v.shape).astype(np.float32))


@pytest.fixture(scope="module")
def planted(tiny_model, tmp_path_factory):
    """3000 random images, 10 planted copy pairs, one triple, a same-instance pair inside one
    series (a copy), two instances of one series and two frames of one file (slices)."""
    from retrieval.model import resolve_checkpoint
    from retrieval.model.preprocess import PREPROCESSING_VERSION
    from retrieval.store import Manifest, NewImage, Store

    rng = np.random.default_rng(3)
    ckpt = resolve_checkpoint(str(tiny_model))
    root = tmp_path_factory.mktemp("dups") / "store"
    store = Store.create(root, Manifest(model=str(ckpt.path), model_revision=ckpt.revision,
                                        model_fingerprint=ckpt.fingerprint, dim=DIM,
                                        preprocessing_version=PREPROCESSING_VERSION,
                                        index_type="Flat"))
    vectors = _unit(rng.normal(size=(N_RANDOM, DIM)))
    expected: list[set[str]] = []
    with store.writer() as w:
        def add(name, vecs, meta=None):
            w.add_file(path=f"/data/{name}", size=1, mtime_ns=1, content_hash=name,
                       source_kind="dicom" if meta else "image",
                       images=[NewImage(f, 8, 8, v, metadata=meta or {}) for f, v in enumerate(vecs)])

        for i, v in enumerate(vectors):
            add(f"r{i}.png", [v])
        for p in range(10):
            base = _unit(rng.normal(size=DIM))
            add(f"pair{p}-a.png", [base])
            add(f"pair{p}-b.png", [_copy(base, rng)])
            expected.append({f"pair{p}-a.png", f"pair{p}-b.png"})
        base = _unit(rng.normal(size=DIM))
        for j in range(3):
            add(f"triple-{j}.png", [_copy(base, rng, 0.005)])
        expected.append({f"triple-{j}.png" for j in range(3)})
        base = _unit(rng.normal(size=DIM))
        same = {"series_uid": "9.1", "sop_uid": "9.1.1"}
        add("twice-a.dcm", [base], same)
        add("twice-b.dcm", [_copy(base, rng)], same)
        expected.append({"twice-a.dcm", "twice-b.dcm"})
        base = _unit(rng.normal(size=DIM))
        add("slice-1.dcm", [base], {"series_uid": "9.2", "sop_uid": "9.2.1"})
        add("slice-2.dcm", [_copy(base, rng)], {"series_uid": "9.2", "sop_uid": "9.2.2"})
        base = _unit(rng.normal(size=DIM))
        add("frames.dcm", [base, _copy(base, rng)], {"series_uid": "9.3", "sop_uid": "9.3.1"})
    store.close()
    return root, expected


def _names(doc: dict) -> list[set[str]]:
    return sorted(({img["path"].rsplit("/", 1)[-1] for img in g["images"]} for g in doc["groups"]),
                  key=sorted)


def test_finds_every_planted_copy_and_no_false_pair(planted):
    root, expected = planted
    doc = cli("duplicates", "--store", str(root))
    assert _names(doc) == sorted(expected, key=sorted)
    assert doc["slice_pairs_left_out"] == 2 and doc["vectors"] == N_RANDOM + 20 + 3 + 2 + 2 + 2
    assert all(0.98 <= g["min_cos"] <= g["max_cos"] <= 1.0 for g in doc["groups"])


def test_slices_are_listed_when_asked(planted):
    root, expected = planted
    doc = cli("duplicates", "--store", str(root), "--slices")
    assert _names(doc) == sorted([*expected, {"slice-1.dcm", "slice-2.dcm"}, {"frames.dcm"}],
                                 key=sorted)


def test_the_api_gives_the_cli_answer(planted):
    from fastapi.testclient import TestClient

    from .serving import make_app

    root, _ = planted
    with TestClient(make_app(root), base_url="http://127.0.0.1") as client:
        doc = client.get("/duplicates", params={"limit": 5}).json()
        again = client.get("/duplicates", params={"limit": 5}).json()
        assert client.get("/duplicates", params={"threshold": 0.2}).status_code == 422
    assert doc == again and doc["groups_total"] == 12 and len(doc["groups"]) == 5
    assert doc["groups"] == cli("duplicates", "--store", str(root), "--limit", "5")["groups"]


@pytest.mark.parametrize("exact", [True, False])
def test_pair_search_exact_and_probed(exact):
    rng = np.random.default_rng(5)
    base = _unit(rng.normal(size=(4000, 64)))
    copies = np.stack([_copy(base[i], rng, 0.02) for i in range(0, 4000, 100)])
    vectors = np.concatenate([base, copies])
    found = near_pairs(vectors, 0.95, exact=exact)
    pairs = {(int(a), int(b)) for a, b in zip(found.first, found.second)}
    assert pairs == {(i, 4000 + j) for j, i in enumerate(range(0, 4000, 100))}
    assert found.method["method"] == ("exact" if exact else "ivf")
    assert np.all(found.cosine >= 0.95)
