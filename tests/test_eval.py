"""Evaluation metrics against known answers: planted embeddings, scikit-learn, hand-computed cases."""

from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, average_precision_score, confusion_matrix,
                             roc_auc_score)
from typer.testing import CliRunner

from retrieval.errors import InputError
from retrieval.evaluation import (evaluate, linear_probe, majority_vote, per_label_auc,
                                  read_manifest, recall_at_k, similar_case_retrieval,
                                  text_retrieval, truth_matrix, zero_shot_confusion)
from retrieval.zeroshot import LogitScalars

from .conftest import write_images

SCALARS = LogitScalars(math.log(10.0), -5.0)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted_separable(n_per_label: int = 6, seed: int = 0):
    """Label j's images point mostly along axis j, so every positive outranks every negative."""
    rng = np.random.default_rng(seed)
    labels = ["a", "b", "c"]
    dim = 16
    label_vectors = np.eye(len(labels), dim)
    vectors, sets = [], []
    for j, label in enumerate(labels):
        for _ in range(n_per_label):
            v = np.zeros(dim)
            v[j] = 1.0
            v[len(labels):] = rng.normal(0, 0.05, dim - len(labels))  # noise off the label axes
            vectors.append(unit(v))
            sets.append((label,))
    return np.array(vectors, np.float32), sets, labels, label_vectors


def test_planted_separable_scores_perfectly():
    vectors, sets, labels, label_vectors = planted_separable()
    result = evaluate(vectors, sets, labels, label_vectors, SCALARS, ks=(1, 6), probe=False)
    assert result["zero_shot"]["auc"]["per_label"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert result["zero_shot"]["auc"]["macro"] == 1.0
    assert result["zero_shot"]["confusion"]["accuracy"] == 1.0
    assert result["text_retrieval"]["mAP"] == 1.0
    assert result["text_retrieval"]["recall@6"] == 1.0          # 6 positives per label
    assert result["text_retrieval"]["recall@1"] == pytest.approx(1 / 6)
    assert result["similar_cases"]["precision@1"] == 1.0
    assert result["similar_cases"]["mMV@1"] == 1.0
    assert result["similar_cases"]["protocol"] == "leave-one-out"


def test_planted_indistinguishable_scores_half():
    """Every positive has a twin negative with the identical vector: AUC is exactly 0.5."""
    rng = np.random.default_rng(1)
    base = unit(rng.normal(size=(5, 8)))
    vectors = np.concatenate([base, base]).astype(np.float32)
    sets = [("a",)] * 5 + [("b",)] * 5
    label_vectors = unit(rng.normal(size=(2, 8)))
    result = evaluate(vectors, sets, ["a", "b"], label_vectors, SCALARS, ks=(1,), probe=False)
    assert result["zero_shot"]["auc"]["per_label"] == {"a": 0.5, "b": 0.5}
    assert result["zero_shot"]["auc"]["macro"] == 0.5


def test_metrics_equal_scikit_learn_on_the_same_scores():
    rng = np.random.default_rng(2)
    n, labels = 40, ["a", "b", "c", "d"]
    truth = (rng.random((n, len(labels))) < 0.4).astype(int)
    truth[0], truth[1] = 1, 0          # every column has both classes
    scores = rng.normal(size=(n, len(labels)))
    auc = per_label_auc(truth, scores, labels)
    for j, label in enumerate(labels):
        assert auc["per_label"][label] == roc_auc_score(truth[:, j], scores[:, j])
    assert auc["macro"] == pytest.approx(roc_auc_score(truth, scores, average="macro"), abs=1e-12)
    retrieval = text_retrieval(truth, scores, labels, ks=(5,))
    assert retrieval["mAP"] == pytest.approx(
        average_precision_score(truth, scores, average="macro"), abs=1e-12)

    single = np.eye(len(labels), dtype=int)[rng.integers(0, len(labels), n)]
    confusion = zero_shot_confusion(single, scores, labels)
    assert confusion["matrix"] == confusion_matrix(single.argmax(1), scores.argmax(1)).tolist()
    assert confusion["accuracy"] == accuracy_score(single.argmax(1), scores.argmax(1))


def test_a_single_class_label_is_skipped_not_averaged():
    truth = np.array([[1, 1], [0, 1], [1, 1]])
    auc = per_label_auc(truth, np.array([[0.9, 0.1], [0.1, 0.2], [0.8, 0.3]]), ["a", "b"])
    assert auc["per_label"] == {"a": 1.0} and auc["macro"] == 1.0
    assert auc["skipped"] == {"b": "no negative image"}


def test_recall_at_k_hand_computed():
    relevant = np.array([1, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    assert [recall_at_k(relevant, scores, k) for k in (1, 2, 3, 4)] == [0.5, 0.5, 1.0, 1.0]


def test_majority_vote_hand_computed():
    assert majority_vote([("b",), ("a",), ("a",)]) == "a"
    assert majority_vote([("a",), ("b",), ("b", "a")]) == "a"   # 2–2 tie: a is seen first
    assert majority_vote([("b", "b"), ("a",)]) == "b"            # a label counts once per case
    assert majority_vote([(), ()]) is None


def test_similar_case_precision_and_mmv_hand_computed():
    """Five cases on the unit circle at 0°, 10°, 25°, 45°, 100° labelled A A B B A.

    Leave-one-out neighbours (nearest first): 0→1,2,3  1→0,2,3  2→1,3,0  3→2,1,0  4→3,2,1.
    k=1: neighbours A,A,A,B,B vs queries A,A,B,B,A → 3 of 5 agree: P@1 = mMV@1 = 0.6.
    k=2: shares 1/2 each except 4 (B,B: 0) → P@2 = 0.4; votes (ties to the nearer) A,A,A,B,B
         → 3 right → mMV@2 = 0.6.
    k=3: each query shares exactly 1 of 3 → P@3 = 1/3; votes B,B,A,A,B → none right → mMV@3 = 0.
    """
    angles = np.radians([0, 10, 25, 45, 100])
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    sets = [("A",), ("A",), ("B",), ("B",), ("A",)]
    result = similar_case_retrieval(vectors, sets, ks=(1, 2, 3))
    assert result["precision@1"] == pytest.approx(0.6) and result["mMV@1"] == pytest.approx(0.6)
    assert result["precision@2"] == pytest.approx(0.4) and result["mMV@2"] == pytest.approx(0.6)
    assert result["precision@3"] == pytest.approx(1 / 3) and result["mMV@3"] == 0.0
    # With a split, test rows query only the train rows.
    split = similar_case_retrieval(vectors, sets, ks=(1,),
                                   splits=["train", "train", "train", "test", "test"])
    # 3 (45°) → nearest train is 2 (B): right; 4 (100°) → nearest train is 2 (B): wrong
    assert split["protocol"] == "test queries against train" and split["queries"] == 2
    assert split["precision@1"] == 0.5 and split["mMV@1"] == 0.5


def test_linear_probe_equals_scikit_learn_cross_validation():
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    rng = np.random.default_rng(3)
    labels = ["a", "b", "c"]
    y = np.repeat([0, 1, 2], 12)
    X = unit(rng.normal(size=(36, 10)) + np.eye(3, 10)[y] * 4.0)
    truth = np.eye(3, dtype=int)[y]
    Cs = (0.1, 1.0, 10.0)
    ours = linear_probe(X, truth, labels, folds=3, seed=7, Cs=Cs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = cross_val_predict(
            LogisticRegressionCV(Cs=list(Cs), cv=3, scoring="neg_log_loss", max_iter=2000),
            X, y, cv=StratifiedKFold(3, shuffle=True, random_state=7), method="predict_proba")
    np.testing.assert_allclose(ours["probabilities"], reference, atol=1e-8)
    assert ours["accuracy"] == accuracy_score(y, reference.argmax(1))
    for j, label in enumerate(labels):
        assert ours["auc"]["per_label"][label] == roc_auc_score(truth[:, j], reference[:, j])
    assert ours["protocol"] == "3-fold stratified cross-validation" and ours["accuracy"] > 0.8

    multi = truth.copy()
    multi[:6, 1] = 1                               # some images carry two labels
    result = linear_probe(X, multi, labels, folds=2, Cs=(1.0,))
    assert result["multi_label"] and set(result["auc"]["per_label"]) == set(labels)
    assert linear_probe(X[:3], truth[:3], labels)["skipped"]   # one image per label: no CV


def test_manifest_reading(tmp_path):
    (tmp_path / "sub").mkdir()
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\nsub/x.png,a|b,train\n/abs/y.png,,TEST\nz.png, c ,\n")
    rows = read_manifest(manifest)
    assert rows[0].path == str(tmp_path / "sub" / "x.png") and rows[0].labels == ("a", "b")
    assert rows[1].labels == () and rows[1].split == "test" and rows[1].line == 3
    assert rows[2].labels == ("c",) and rows[2].split is None
    assert truth_matrix([r.labels for r in rows], ["a", "c"]).tolist() == [[1, 0], [0, 0], [0, 1]]
    for text, message in (("file,label\nx.png,a\n", "path,label"),
                          ("path,label\nx.png,a\nx.png,b\n", "line 3"),
                          ("path,label\n", "no rows")):
        manifest.write_text(text)
        with pytest.raises(InputError, match=message):
            read_manifest(manifest)


def test_eval_cli_writes_json_and_html(tiny_model, tmp_path):
    """Decodes through the indexer, reports a broken file without losing the others, and its
    numbers equal scikit-learn's on the same embeddings."""
    from medsearch.cli import app
    from retrieval.model import TextEncoder, VisionEncoder

    paths = write_images(tmp_path / "images", 9)
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    names = ["effusion", "normal", "pneumothorax"]
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        for i, path in enumerate(paths):
            writer.writerow([f"images/{path.name}", names[i % 3] + ("|normal" if i == 0 else "")])
        writer.writerow(["images/broken.png", "normal"])
    out = CliRunner().invoke(app, ["eval", str(manifest), "--model", str(tiny_model), "--device",
                                   "cpu", "--out", str(tmp_path / "report"), "--template", "{}",
                                   "--ks", "1,3", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["n_images"] == 9 and doc["labels"] == names
    assert [f["path"] for f in doc["failures"]] == [str(tmp_path / "images" / "broken.png")]
    saved = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert saved["zero_shot"]["auc"] == doc["zero_shot"]["auc"]
    page = (tmp_path / "report" / "eval.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "src=\"http" not in page
    assert "For research use only; not for diagnosis." in page

    vision = VisionEncoder.load(str(tiny_model), device="cpu")
    from medsearch.cli.classify import query_input
    import torch

    X = vision.embed_batch(torch.from_numpy(np.stack([query_input(p, vision.image_size) for p in paths])))
    T = TextEncoder.load(str(tiny_model), device="cpu").embed(names)
    sets = [{names[i % 3]} | ({"normal"} if i == 0 else set()) for i in range(9)]
    truth = truth_matrix(sets, names)
    cos = X.astype(np.float64) @ T.T.astype(np.float64)
    for j, label in enumerate(names):
        assert doc["zero_shot"]["auc"]["per_label"][label] == pytest.approx(
            roc_auc_score(truth[:, j], cos[:, j]), abs=1e-9)
    assert doc["text_retrieval"]["mAP"] == pytest.approx(
        average_precision_score(truth, cos, average="macro"), abs=1e-9)


def test_eval_reuses_stored_vectors(tiny_model, tmp_path):
    from medsearch.cli import app

    from .test_zeroshot import build_store

    store = build_store(tmp_path, tiny_model, 4)
    extra = write_images(tmp_path / "new", 2, seed=5)
    stored = sorted((tmp_path / "images").iterdir())
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\n" + "".join(
        f"{p},{'ab'[i % 2]},{'train' if i < 4 else 'test'}\n" for i, p in enumerate(stored + extra)))
    out = CliRunner().invoke(app, ["eval", str(manifest), "--store", str(store), "--out",
                                   str(tmp_path / "r"), "--ks", "1", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert (doc["n_images"], doc["from_store"], doc["embedded"]) == (6, 4, 2)
    assert doc["similar_cases"]["protocol"] == "test queries against train"
    assert doc["linear_probe"]["protocol"] == "train/test split"
