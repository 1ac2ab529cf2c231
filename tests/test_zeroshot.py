"""Zero-shot scores against known answers and an independent transformers reference; tagging."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from .conftest import write_images
from retrieval.errors import InputError, ModelUnavailableError
from retrieval.model import TextEncoder, VisionEncoder, resolve_checkpoint
from retrieval.model.preprocess import model_input
from retrieval.zeroshot import (CXR_FINDINGS, PRESETS, LogitScalars, ReviewThresholds,
                                ZeroShotClassifier, classifications, normalised_entropy,
                                read_logit_scalars, resolve_labels, score_vectors, softmax,
                                top_two_margin)

SCALE, BIAS = math.log(7.5), -1.25   # known values planted in the checkpoint


def _set_scalars(folder: Path, scale: float | None, bias: float | None) -> None:
    file = folder / "model.safetensors"
    tensors = load_file(file)
    for key, value in (("logit_scale", scale), ("logit_bias", bias)):
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = torch.tensor([value], dtype=torch.float32)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def planted_model(tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("planted") / "siglip"
    shutil.copytree(tiny_model, folder)
    _set_scalars(folder, SCALE, BIAS)
    return folder


@pytest.fixture(scope="module")
def classifier(planted_model) -> ZeroShotClassifier:
    return ZeroShotClassifier.load(str(planted_model), device="cpu")


def test_scalars_are_read_from_the_checkpoint(planted_model, tmp_path):
    scalars = read_logit_scalars(resolve_checkpoint(str(planted_model)))
    assert scalars.scale == pytest.approx(SCALE, abs=1e-6)
    assert scalars.bias == pytest.approx(BIAS, abs=1e-6)
    # Without them the sigmoid cannot be computed: a clear error, not a silent default.
    broken = tmp_path / "no-scalars"
    shutil.copytree(planted_model, broken)
    _set_scalars(broken, None, None)
    with pytest.raises(ModelUnavailableError, match="logit_scale"):
        read_logit_scalars(resolve_checkpoint(str(broken)))


def test_sigmoid_uses_the_planted_scale_and_bias(classifier):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, classifier.text.dim)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    labels = ["pneumothorax", "pleural effusion", "no finding"]
    scores = classifier.scores(image, labels, ["{}"])
    text = classifier.text.embed(labels)
    cosine = image.astype(np.float64) @ text.T.astype(np.float64)
    expected = 1.0 / (1.0 + np.exp(-(7.5 * cosine - 1.25)))
    np.testing.assert_allclose(scores.sigmoid, expected, atol=1e-6)
    # softmax across labels: the bias cancels, the scale does not
    logits = 7.5 * cosine
    np.testing.assert_allclose(scores.softmax, np.exp(logits) / np.exp(logits).sum(1, keepdims=True),
                               atol=1e-6)


def test_scores_equal_siglip_forward(planted_model):
    """Independent reference: transformers' own SiglipModel computes logits_per_image (in
    fp32, so both towers are pinned to fp32: ``auto`` may pick bf16 on this CPU)."""
    from transformers import AutoTokenizer, SiglipModel

    checkpoint = resolve_checkpoint(str(planted_model))
    classifier = ZeroShotClassifier(TextEncoder(checkpoint, "cpu", "fp32"))
    pixels = np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    vision = VisionEncoder(checkpoint, "cpu", "fp32")
    vector = vision.embed_batch(model_input(pixels, vision.image_size)[None])
    labels = ["left pneumothorax", "cardiomegaly", "normal chest"]
    ours = classifier.classify(vector, labels, ["a chest x-ray showing {}"])[0]

    model = SiglipModel.from_pretrained(planted_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(planted_model)
    ids = tokenizer([f"a chest x-ray showing {x}" for x in labels], padding="max_length",
                    max_length=64, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=vision.preprocess(pixels)[None]).logits_per_image[0]
    by_label = {r.label: r for r in ours.results}
    for j, label in enumerate(labels):
        assert by_label[label].sigmoid == pytest.approx(torch.sigmoid(logits[j]).item(), abs=1e-5)
        assert by_label[label].softmax == pytest.approx(logits.softmax(0)[j].item(), abs=1e-5)


def test_prompt_ensemble_averages_normalised_embeddings(classifier):
    templates = ["a chest x-ray showing {}", "{} on the chest", "{}"]
    labels = ["pneumothorax", "mass"]
    vectors = classifier.label_vectors(labels, templates)
    for i, label in enumerate(labels):
        each = classifier.text.embed([t.replace("{}", label) for t in templates]).astype(np.float64)
        mean = each.mean(axis=0)
        np.testing.assert_allclose(vectors[i], mean / np.linalg.norm(mean), atol=1e-6)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


def test_uncertainty_known_answers():
    uniform = np.full(4, 0.25)
    assert normalised_entropy(uniform) == pytest.approx(1.0)
    assert top_two_margin(uniform) == pytest.approx(0.0)
    certain = np.array([0.0, 1.0, 0.0])
    assert normalised_entropy(certain) == pytest.approx(0.0)
    assert top_two_margin(certain) == pytest.approx(1.0)
    half = np.array([0.5, 0.5, 0.0])
    assert normalised_entropy(half) == pytest.approx(math.log(2) / math.log(3))
    assert top_two_margin(np.array([0.6, 0.1, 0.3])) == pytest.approx(0.3)
    assert softmax(np.array([[0.0, math.log(3.0)]])) == pytest.approx(np.array([[0.25, 0.75]]))


def test_needs_review_at_configurable_thresholds():
    label_vectors = np.eye(3, 4)
    images = np.array([[1.0, 0, 0, 0],                      # clearly label a
                       [1.0, 1.0, 0, 0] / np.sqrt(2)])       # a and b tie
    scores = score_vectors(images, label_vectors, ["a", "b", "c"], LogitScalars(math.log(20), 0.0))
    clear, tie = classifications(scores, ReviewThresholds(max_entropy=0.8, min_margin=0.1))
    assert clear.results[0].label == "a" and not clear.needs_review
    assert tie.needs_review and tie.margin == pytest.approx(0.0, abs=1e-9)
    assert any("margin" in r for r in tie.review_reasons)
    # The same first image is flagged once the entropy threshold is strict enough.
    (strict, _) = classifications(scores, ReviewThresholds(max_entropy=clear.entropy / 2, min_margin=0.0))
    assert strict.needs_review and "entropy" in strict.review_reasons[0]
    doc = clear.to_json()
    assert set(doc) >= {"results", "needs_review", "entropy", "margin"}
    assert set(doc["results"][0]) == {"label", "softmax", "sigmoid"}
    assert sum(r["softmax"] for r in doc["results"]) == pytest.approx(1.0, abs=1e-5)


def test_labels_presets_and_templates():
    labels, templates = resolve_labels(preset="cxr")
    assert labels == list(CXR_FINDINGS) and len(labels) == 13
    assert {"pneumothorax", "pleural effusion", "cardiomegaly"} <= set(labels)
    assert templates == list(PRESETS["cxr"].templates)
    labels, templates = resolve_labels(["pneumothorax, normal", "mass"], templates=["{}"])
    assert labels == ["pneumothorax", "normal", "mass"] and templates == ["{}"]
    for bad in (dict(labels=["a", "b"], preset="cxr"), dict(), dict(preset="xray"),
                dict(labels=["only one"]), dict(labels=["a,a"]),
                dict(labels=["a", "b"], templates=["no placeholder"])):
        with pytest.raises(InputError):
            resolve_labels(**bad)


# -- tagging a store -------------------------------------------------------------------------
def build_store(folder: Path, model: Path, n: int, labels: dict[int, list[str]] | None = None) -> Path:
    """A store of ``n`` written images, embedded here and written through the store's writer
    (independent of the indexing pipeline); ``labels``: image number → user labels."""
    from PIL import Image

    from retrieval.model.preprocess import PREPROCESSING_VERSION
    from retrieval.store import Manifest, NewImage, Store

    paths = write_images(folder / "images", n)
    encoder = VisionEncoder.load(str(model), device="cpu")
    ckpt = encoder.checkpoint
    store = Store.create(folder / "store", Manifest(
        model=str(ckpt.path), model_revision=ckpt.revision, model_fingerprint=ckpt.fingerprint,
        dim=encoder.dim, preprocessing_version=PREPROCESSING_VERSION))
    with store.writer() as writer:
        for i, path in enumerate(paths):
            pixels = np.asarray(Image.open(path))
            vector = encoder.embed_batch(model_input(pixels, encoder.image_size)[None])[0]
            writer.add_file(path=str(path.absolute()), size=path.stat().st_size, mtime_ns=0,
                            content_hash=f"h{i}", source_kind="image",
                            images=[NewImage(0, pixels.shape[1], pixels.shape[0], vector,
                                             labels=(labels or {}).get(i, []))])
    store.close()
    return folder / "store"


@pytest.fixture(scope="module")
def tagged_store(planted_model, tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("tag"), planted_model, 8)


def _label_rows(store_dir: Path, source: str) -> dict[tuple[int, str], float]:
    from sqlalchemy import select

    from retrieval.store.schema import LabelRow
    from retrieval.store import Store

    st = Store.open(store_dir, readonly=True)
    with st.sessions() as session:
        rows = session.execute(select(LabelRow.image_id, LabelRow.label, LabelRow.score)
                               .where(LabelRow.source == source)).all()
    st.close()
    return {(i, label): score for i, label, score in rows}


def test_tag_writes_exact_predictions_and_replaces_them(tagged_store, classifier):

    from retrieval.filters import Filters
    from retrieval.store.schema import LabelRow
    from retrieval.search import Searcher
    from retrieval.store import Store
    from retrieval.tagging import tag_store

    labels, templates = resolve_labels(preset="cxr")
    st = Store.open(tagged_store)
    ids, vectors = st.all_vectors()
    sig = classifier.scores(vectors, labels, templates).sigmoid
    threshold = float(np.median(sig))  # some pairs pass, some do not
    with st.sessions() as session, session.begin():
        session.add(LabelRow(image_id=int(ids[0]), label="pneumothorax", score=None, source="user"))
    first = tag_store(st, classifier, labels, templates, min_score=threshold, source="zero-shot:cxr")
    expected = {(int(ids[r]), labels[c]): float(sig[r, c]) for r, c in zip(*np.nonzero(sig >= threshold))}
    assert 0 < len(expected) < sig.size
    got = _label_rows(tagged_store, "zero-shot:cxr")
    assert got.keys() == expected.keys()
    assert all(got[key] == pytest.approx(expected[key], abs=1e-9) for key in expected)
    assert first.written == len(expected) and first.images == len(ids)

    again = tag_store(st, classifier, labels, templates, min_score=0.0, source="zero-shot:cxr")
    assert again.replaced == len(expected) and again.written == sig.size
    assert len(_label_rows(tagged_store, "zero-shot:cxr")) == sig.size   # replaced, not added
    assert len(_label_rows(tagged_store, "user")) == 1                   # user label untouched

    tag_store(st, classifier, labels, templates, min_score=threshold, source="zero-shot:cxr")
    counts = {label: int((sig[:, j] >= threshold).sum()) for j, label in enumerate(labels)
              if label != "pneumothorax"}   # pneumothorax also carries the user label
    target = max(counts, key=counts.get)
    tagged_ids = {i for (i, label) in expected if label == target}
    results = Searcher(st, device="cpu").text("x", k=50, filters=Filters(label=[target]))
    assert tagged_ids and {r.id for r in results} == tagged_ids
    st.close()


def test_tag_and_classify_cli(tagged_store, planted_model, classifier):
    from medsearch.cli import app
    from medsearch.cli.output import RESEARCH_NOTICE

    runner = CliRunner()
    out = runner.invoke(app, ["tag", "--store", str(tagged_store), "--preset", "cxr",
                              "--min-score", "0.0", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["source"] == "zero-shot:cxr" and doc["written"] == doc["images"] * 13

    image = next((tagged_store.parent / "images").glob("*.png"))
    out = runner.invoke(app, ["classify", str(image), "--preset", "cxr", "--model",
                              str(planted_model), "--device", "cpu", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert [set(r) for r in doc["results"]] == [{"label", "softmax", "sigmoid"}] * 13
    assert isinstance(doc["needs_review"], bool)
    assert sum(r["softmax"] for r in doc["results"]) == pytest.approx(1.0, abs=1e-4)
    softmaxes = [r["softmax"] for r in doc["results"]]
    assert softmaxes == sorted(softmaxes, reverse=True)
    # the CLI's numbers are the API's numbers on the same image vector
    from medsearch.cli.classify import embed_query

    vector, _ = embed_query(VisionEncoder.load(str(planted_model), device="cpu"), image)
    api = classifier.classify(vector[None], *resolve_labels(preset="cxr"))[0].to_json()
    assert [r["label"] for r in api["results"]] == [r["label"] for r in doc["results"]]
    assert np.allclose([r["sigmoid"] for r in api["results"]], [r["sigmoid"] for r in doc["results"]],
                       atol=1e-5)

    human = runner.invoke(app, ["classify", str(image), "--labels", "pneumothorax,normal",
                                "--template", "{}", "--model", str(planted_model)])
    assert human.exit_code == 0 and RESEARCH_NOTICE in human.stdout
    assert "treat" not in human.stdout.lower()
