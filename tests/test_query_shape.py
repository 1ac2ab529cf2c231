"""Result shaping on planted vectors: one row per patient/study/series, min-prob, paging,
near-copy removal and Rocchio feedback, through the application object, the CLI and the API."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from retrieval.errors import InputError
from retrieval.query import Term, expression, parse_query, rocchio

from .conftest import PYDICOM_TEST_FILES
from .serving import cli

SCALE, BIAS = math.log(10.0), -2.0   # exp(scale) = 10: probabilities spread over (0, 1)
TEXT = "pneumothorax"
PATIENTS, PER_PATIENT = 6, 4


def _set_scalars(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    tensors = load_file(file)
    tensors["logit_scale"] = torch.tensor([SCALE], dtype=torch.float32)
    tensors["logit_bias"] = torch.tensor([BIAS], dtype=torch.float32)
    save_file(tensors, file, metadata={"format": "pt"})


def _toward(t: np.ndarray, cos: float, rng) -> np.ndarray:
    """A unit vector with cosine ``cos`` to the unit vector ``t``."""
    u = rng.normal(size=t.shape)
    u -= (u @ t) * t
    u /= np.linalg.norm(u)
    return (cos * t + math.sqrt(1 - cos * cos) * u).astype(np.float32)


def _build(root: Path, model: Path, index_type: str = "Flat") -> tuple[Path, dict]:
    """Patients p0..p5 with 4 images each (2 studies, 2 series), 4 images without keys, and one
    near-copy pair; every vector planted at a known cosine to the text's vector."""
    from retrieval.model import TextEncoder, resolve_checkpoint
    from retrieval.model.preprocess import PREPROCESSING_VERSION
    from retrieval.store import Manifest, NewImage, Store

    ckpt = resolve_checkpoint(str(model))
    text = TextEncoder(ckpt, "cpu", "fp32").embed([TEXT])[0].astype(np.float64)
    text /= np.linalg.norm(text)
    rng = np.random.default_rng(7)
    store = Store.create(root, Manifest(model=str(ckpt.path), model_revision=ckpt.revision,
                                        model_fingerprint=ckpt.fingerprint, dim=len(text),
                                        preprocessing_version=PREPROCESSING_VERSION,
                                        index_type=index_type))
    meta, n = {}, 0
    with store.writer() as writer:
        for p in range(PATIENTS):
            for j in range(PER_PATIENT):
                cos = float(rng.uniform(-0.3, 0.6))
                m = {"patient_key": f"p{p}", "study_uid": f"1.2.{p}.{j // 2}",
                     "series_uid": f"1.2.{p}.{j // 2}.{j % 2}"}
                writer.add_file(path=f"/data/p{p}-{j}.png", size=1, mtime_ns=1, content_hash=f"h{n}",
                                source_kind="image",
                                images=[NewImage(0, 8, 8, _toward(text, cos, rng), metadata=m)])
                n += 1
        for j in range(4):
            writer.add_file(path=f"/data/free-{j}.png", size=1, mtime_ns=1, content_hash=f"f{j}",
                            source_kind="image",
                            images=[NewImage(0, 8, 8, _toward(text, 0.5 + 0.05 * j, rng))])
        base = _toward(text, 0.45, rng)
        near = base + rng.normal(scale=0.005, size=base.shape).astype(np.float32)
        for j, v in enumerate((base, near / np.linalg.norm(near))):
            writer.add_file(path=f"/data/copy-{j}.png", size=1, mtime_ns=1, content_hash=f"c{j}",
                            source_kind="image", images=[NewImage(0, 8, 8, v)])
    store.close()
    return root, {"text": text}


@pytest.fixture(scope="module")
def model(tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scalars") / "siglip"
    shutil.copytree(tiny_model, folder)
    _set_scalars(folder)
    return folder


@pytest.fixture(scope="module")
def planted(model, tmp_path_factory):
    return _build(tmp_path_factory.mktemp("planted") / "store", model)


@pytest.fixture()
def app(planted):
    from medsearch.app import Medsearch

    with Medsearch.open(planted[0]) as found:
        yield found


def _exact(app) -> tuple[np.ndarray, np.ndarray, dict]:
    """(ids, cosines to the text, id → row metadata), computed from the stored vectors."""
    ids, vectors = app.store.all_vectors()
    text = app.searcher.text_vector(TEXT).astype(np.float64)
    scores = vectors.astype(np.float64) @ text
    rows = app.store.rows([int(i) for i in ids])
    return ids, scores, {int(i): rows[int(i)]["metadata"] for i in ids}


def _spec(**fields):
    from medsearch.app import QuerySpec

    return QuerySpec([Term("text", TEXT)], **fields)


# -- distinct ----------------------------------------------------------------------------------
@pytest.mark.parametrize("distinct,column", [("patient", "patient_key"), ("study", "study_uid"),
                                             ("series", "series_uid")])
def test_distinct_keeps_the_best_image_of_each_group(app, distinct, column):
    ids, scores, meta = _exact(app)
    page = app.page(_spec(k=100, distinct=distinct))
    groups = [r.metadata.get(column) for r in page.results]
    keyed = [g for g in groups if g is not None]
    assert len(keyed) == len(set(keyed)) == len({m[column] for m in meta.values() if column in m})
    assert len(groups) - len(keyed) == 6   # the images without keys: each its own group
    for r in page.results:
        key = r.metadata.get(column)
        members = [i for i in ids if meta[int(i)].get(column) == key] if key else [r.id]
        best = max(members, key=lambda i: scores[list(ids).index(i)])
        assert r.id == best and r.group_count == len(members)
    assert page.next_offset is None


def test_distinct_counts_groups_and_pages_them(app):
    whole = app.page(_spec(k=12, distinct="patient"))
    assert len(whole.results) == 12 and whole.next_offset is None
    pages, offset = [], 0
    while offset is not None:
        part = app.page(_spec(k=5, offset=offset, distinct="patient"))
        assert part.offset == offset
        pages += part.results
        offset = part.next_offset
    assert [r.id for r in pages] == [r.id for r in whole.results]


def test_group_count_counts_the_images_passing_the_threshold(app):
    ids, scores, meta = _exact(app)
    page = app.page(_spec(k=10, distinct="patient", min_score=0.2))
    assert page.results and all(r.score >= 0.2 for r in page.results)
    for r in page.results:
        key = r.metadata.get("patient_key")
        if key:
            expected = sum(1 for i, s in zip(ids, scores) if meta[int(i)].get("patient_key") == key
                           and s >= 0.2 - 1e-6)
            assert r.group_count == expected


# -- min-prob ----------------------------------------------------------------------------------
@pytest.mark.parametrize("index_type,scan", [("Flat", True), ("HNSW16", True), ("HNSW16", False)])
def test_min_prob_returns_exactly_the_images_passing(model, tmp_path, monkeypatch, index_type, scan):
    """Flat is exact; a small HNSW store is scanned exactly; with the scan turned off the
    widened index search (its codes re-scored near the threshold) gives the same answer."""
    from medsearch.app import Medsearch
    from retrieval import ranking

    if not scan:
        monkeypatch.setattr(ranking, "EXACT_SCAN_LIMIT", 0)

    root, _ = _build(tmp_path / "store", model, index_type)
    with Medsearch.open(root) as found:
        ids, scores, _ = _exact(found)
        probs = 1.0 / (1.0 + np.exp(-(math.exp(SCALE) * scores + BIAS)))
        for p in (0.5, 0.8, 0.95):
            want = [int(i) for i in ids[np.argsort(-scores, kind="stable")] if probs[list(ids).index(i)] >= p]
            got, offset = [], 0
            while offset is not None:
                page = found.page(_spec(k=4, offset=offset, min_prob=p))
                got += page.results
                offset = page.next_offset
            assert [r.id for r in got] == want, p
            for r in got:
                assert r.prob == pytest.approx(probs[list(ids).index(r.id)], abs=1e-4)
                assert r.prob >= p - 1e-6
        with pytest.raises(InputError, match="text-only") as refused:
            found.page(_spec(min_prob=0.5, relevant=[1]))
        assert refused.value.setting == "min_prob"


# -- paging, dedupe, feedback ------------------------------------------------------------------
def test_pages_concatenate_to_one_big_page(app):
    whole = app.page(_spec(k=100))   # the store holds 30 images
    assert len(whole.results) == 30 and whole.next_offset is None
    assert app.page(_spec(k=29)).next_offset == 29
    got, offset = [], 0
    while offset is not None:
        page = app.page(_spec(k=7, offset=offset))
        got += page.results
        offset = page.next_offset
    assert [(r.id, r.score) for r in got] == [(r.id, r.score) for r in whole.results]
    beyond = app.page(_spec(k=10, offset=30))
    assert beyond.results == [] and beyond.next_offset is None


def test_dedupe_drops_the_planted_near_copy(app):
    copies = {i for i, m in app.store.rows(list(map(int, app.store.all_vectors()[0]))).items()
              if m["path"].startswith("/data/copy-")}
    plain = [r.id for r in app.page(_spec(k=40)).results]
    assert copies <= set(plain)
    deduped = app.page(_spec(k=40, dedupe=0.99))
    kept = [r.id for r in deduped.results]
    assert len(copies & set(kept)) == 1 and set(plain) - set(kept) == copies - set(kept)
    first = min(copies, key=plain.index)   # the higher-ranked copy stays
    assert first in kept
    paged = app.page(_spec(k=10, dedupe=0.99)).results + \
        app.page(_spec(k=30, offset=10, dedupe=0.99)).results
    assert [r.id for r in paged] == kept[:40]


def test_rocchio_expression_round_trips_and_runs_the_same(app):
    terms = parse_query('"pleural effusion" - 0.5:"tube"')
    fed = rocchio(terms, [3, 5, 9], [2])
    assert [t.weight for t in fed] == [1.0, -0.5, 0.25, 0.25, 0.25, -0.15]
    assert parse_query(expression(fed)) == fed
    page = app.page(_spec(k=5, relevant=[3, 5], not_relevant=[2]))
    assert page.query_expression == '1:"pneumothorax" + 0.375:#3 + 0.375:#5 - 0.15:#2'
    again = app.page(type(_spec())(parse_query(page.query_expression), k=5))
    assert [r.id for r in again.results] == [r.id for r in page.results]
    with pytest.raises(InputError, match="both relevant and not relevant"):
        rocchio(terms, [3], [3])


# -- a DICOM store: patient keys, and the PHI policy drop ------------------------------------------
def _dicom_store(root: Path, model: Path, policy: str) -> Path:
    from indexer.pipeline import Indexer
    from retrieval.model import VisionEncoder
    from retrieval.store import Store, manifest_for

    folder = root / "dicom"
    folder.mkdir(parents=True)
    for p in range(3):
        for j in range(3):
            ds = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
            ds.PatientID = f"MRN-{p}"
            ds.StudyInstanceUID = f"1.2.826.0.1.{p}"
            ds.SeriesInstanceUID = f"1.2.826.0.1.{p}.{j}"
            ds.SOPInstanceUID = f"1.2.826.0.1.{p}.{j}.1"
            ds.PixelData = (ds.pixel_array + 37 * (3 * p + j)).astype(ds.pixel_array.dtype).tobytes()
            ds.save_as(folder / f"p{p}-{j}.dcm")
    encoder = VisionEncoder.load(str(model), "cpu")
    store = Store.open_or_create(root / "store", manifest_for(encoder, "Flat"))
    Indexer(store, encoder, workers=0, batch_size=9, progress=False, phi_policy=policy).run([folder])
    store.close()
    return root / "store"


@pytest.fixture(scope="module")
def dicom_stores(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom")
    return {policy: _dicom_store(root / policy, model, policy) for policy in ("hash", "drop")}


def test_one_row_per_patient_on_a_dicom_store(dicom_stores):
    from medsearch.app import Medsearch

    with Medsearch.open(dicom_stores["hash"]) as found:
        assert found.info()["patient_keys"] is True
        page = found.page(_spec(k=10, distinct="patient"))
        keys = [r.metadata["patient_key"] for r in page.results]
        assert len(keys) == len(set(keys)) == 3
        assert [r.group_count for r in page.results] == [3, 3, 3]
        assert len(found.page(_spec(k=10, distinct="series")).results) == 9


def test_distinct_patient_is_refused_without_patient_keys(dicom_stores, capsys):
    from medsearch.app import Medsearch

    from .serving import run_cli

    with Medsearch.open(dicom_stores["drop"]) as found:
        assert found.info()["patient_keys"] is False
        with pytest.raises(InputError, match='PHI policy "drop"') as refused:
            found.page(_spec(distinct="patient"))
        assert refused.value.setting == "distinct"
        assert len(found.page(_spec(k=10, distinct="study")).results) == 3
    code, _, err = run_cli(capsys, "search", TEXT, "--distinct", "patient",
                           "--store", str(dicom_stores["drop"]))
    assert code != 0 and "--distinct" in err and "patient keys" in err


def _png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).save(out, format="PNG")
    return out.getvalue()


# -- the CLI and the API give the same pages -------------------------------------------------------
def test_export_dedupe_and_distinct(planted, tmp_path):
    import json

    root = str(planted[0])
    doc = cli("export", "--query", TEXT, "--dedupe", "0.99", "-k", "40", "--out",
              str(tmp_path / "d.json"), "--store", root)
    rows = json.loads((tmp_path / "d.json").read_text())
    assert doc["rows"] == len(rows) == 29   # 30 images, one of the planted pair dropped
    assert sum(r["path"].startswith("/data/copy-") for r in rows) == 1
    cli("export", "--query", TEXT, "--distinct", "series", "-k", "40", "--offset", "2", "--out",
        str(tmp_path / "s.json"), "--store", root)
    series = json.loads((tmp_path / "s.json").read_text())
    # every planted image is its own series (4 per patient) or has none: 30 groups, 2 skipped
    assert len(series) == 28 and all(r["group_count"] == 1 for r in series)


def test_api_and_cli_agree(planted, dicom_stores):
    from fastapi.testclient import TestClient

    from .serving import make_app

    root = str(planted[0])
    with TestClient(make_app(planted[0]), base_url="http://127.0.0.1") as client:
        stats = client.get("/stats").json()
        assert stats["patient_keys"] is True and stats["image_size"] == 448
        for body, args in [
            ({"distinct": "patient", "k": 3}, ["--distinct", "patient", "-k", "3"]),
            ({"min_prob": 0.6, "k": 4, "offset": 2}, ["--min-prob", "0.6", "-k", "4", "--offset", "2"]),
            ({"dedupe": 0.99, "k": 5}, ["--dedupe", "0.99", "-k", "5"]),
            ({"relevant": [3, 5], "not_relevant": [2], "k": 4},
             ["--relevant", "3,5", "--not-relevant", "2", "-k", "4"]),
        ]:
            api = client.post("/search", json={"query": TEXT, **body})
            assert api.status_code == 200, api.text
            local = cli("search", TEXT, *args, "--store", root)
            for x, y in zip(api.json()["results"], local["results"]):
                assert x == y, {key: (x[key], y.get(key)) for key in x if x[key] != y.get(key)}
            assert api.json() == local
        doc = client.post("/search", json={"query": TEXT, "distinct": "patient", "k": 2}).json()
        assert doc["offset"] == 0 and doc["next_offset"] == 2 and doc["query_expression"] == '1:"pneumothorax"'
        assert all("group_count" in r and "prob" in r for r in doc["results"])
        fed = client.post("/search", json={"query": TEXT, "relevant": [3], "k": 4}).json()
        again = client.post("/search", json={"query": fed["query_expression"], "k": 4}).json()
        assert again["results"] == fed["results"]
        similar = client.post("/similar", json={"id": 1, "distinct": "study", "k": 3}).json()
        assert len({r["metadata"].get("study_uid") for r in similar["results"]}) == 3
        upload = client.post("/similar", files={"file": ("q.png", _png())},
                             data={"distinct": "patient", "k": "2", "offset": "1",
                                   "relevant": "3,5", "dedupe": "0.99"})
        assert upload.status_code == 200, upload.text
        doc = upload.json()
        assert doc["offset"] == 1 and len(doc["results"]) == 2
        assert doc["query_expression"] == "1:<upload> + 0.375:#3 + 0.375:#5"
        form = client.get("/openapi.json").json()["paths"]["/similar"]["post"]["requestBody"]
        assert form["content"]["multipart/form-data"]["schema"]["properties"]["relevant"]["type"] == "string"
        for bad in ({"distinct": "ward"}, {"min_prob": 2}, {"offset": -1}, {"offset": 100_001},
                    {"dedupe": 1.5}, {"relevant": list(range(33))}):
            assert client.post("/search", json={"query": TEXT, **bad}).status_code in (400, 422), bad
        exported = client.post("/export?format=json", json={"query": TEXT, "distinct": "patient",
                                                              "k": 20})
        assert exported.status_code == 200 and len(exported.json()) == 12
        assert sum(row["group_count"] or 0 for row in exported.json()) == 30
        assert all(0 < row["prob"] < 1 for row in exported.json())
    with TestClient(make_app(dicom_stores["drop"]), base_url="http://127.0.0.1") as client:
        refused = client.post("/search", json={"query": TEXT, "distinct": "patient"})
        assert refused.status_code == 400 and "patient keys" in refused.json()["error"]
