"""Evaluation metrics on embeddings with known labels: zero-shot, retrieval, linear probe.

Everything here works on arrays (image vectors, label text vectors, a 0/1 truth matrix), so it
is testable with planted embeddings and needs no model. scikit-learn computes every metric it
has (ROC AUC, ROC curves, average precision, confusion matrix, accuracy, logistic regression
and its cross-validation); only what it lacks — retrieval Recall@k, similar-case precision@k
and majority-vote accuracy mMV@k, as reported in the pathology search literature — is counted
here.

Conventions:
* zero-shot AUC and text→image retrieval rank by cosine (the sigmoid is a monotone function of
  it per label, but saturates to ties in floating point);
* a label whose column is all positive or all negative has no AUC/AP: it is listed under
  ``skipped`` with the reason and left out of the macro mean;
* similar-case retrieval: with a ``split`` column, ``test`` rows query the ``train`` rows;
  otherwise leave-one-out over all rows. A neighbour is relevant when it shares a label with
  the query. Majority vote counts each label once per neighbour; ties go to the label seen at
  the better rank.
"""

from __future__ import annotations

import csv
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .zeroshot import LogitScalars, score_vectors

LABEL_SEPARATOR = "|"
DEFAULT_KS = (1, 5, 10)


# -- the manifest ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ManifestRow:
    path: str                  # absolute
    labels: tuple[str, ...]    # may be empty: negative for every label
    split: str | None
    line: int


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """CSV with columns ``path,label[,split]``; labels joined by ``|``; paths relative to the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise InputError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip().lower() for c in (reader.fieldnames or [])]
    if "path" not in columns or "label" not in columns:
        raise InputError(f"{path}: the header must name the columns path,label[,split] "
                         f"(found {', '.join(columns) or 'no header'})")
    reader.fieldnames = columns
    rows, seen = [], {}
    for line, record in enumerate(reader, start=2):
        raw = (record.get("path") or "").strip()
        if not raw:
            raise InputError(f"{path}, line {line}: empty path")
        full = Path(raw).expanduser()
        full = str((full if full.is_absolute() else path.parent / full).absolute())
        if full in seen:
            raise InputError(f"{path}, line {line}: {raw} is listed again (first on line "
                             f"{seen[full]}); give each image once with all its labels joined by '|'")
        seen[full] = line
        labels = tuple(dict.fromkeys(
            x.strip() for x in (record.get("label") or "").split(LABEL_SEPARATOR) if x.strip()))
        split = (record.get("split") or "").strip().lower() or None
        rows.append(ManifestRow(full, labels, split, line))
    if not rows:
        raise InputError(f"{path}: no rows below the header")
    return rows


def vocabulary(label_sets: list[tuple[str, ...]] | list[set[str]]) -> list[str]:
    return sorted({label for labels in label_sets for label in labels})


def truth_matrix(label_sets, labels: list[str]) -> np.ndarray:
    """N×L 0/1 matrix: row i has a 1 in column j when image i carries labels[j]."""
    column = {label: j for j, label in enumerate(labels)}
    out = np.zeros((len(label_sets), len(labels)), np.int8)
    for i, row in enumerate(label_sets):
        for label in row:
            if label in column:
                out[i, column[label]] = 1
    return out


def _single_class(column: np.ndarray) -> str | None:
    positives = int(column.sum())
    if positives == 0:
        return "no positive image"
    if positives == len(column):
        return "no negative image"
    return None


# -- zero-shot -------------------------------------------------------------------------------
def per_label_auc(truth: np.ndarray, scores: np.ndarray, labels: list[str]) -> dict:
    """One-vs-rest ROC AUC per label and their macro mean (scikit-learn's roc_auc_score)."""
    from sklearn.metrics import roc_auc_score

    per_label, skipped = {}, {}
    for j, label in enumerate(labels):
        reason = _single_class(truth[:, j])
        if reason:
            skipped[label] = reason
            continue
        per_label[label] = float(roc_auc_score(truth[:, j], scores[:, j]))
    macro = float(np.mean(list(per_label.values()))) if per_label else None
    return {"per_label": per_label, "macro": macro, "skipped": skipped}


def roc_curves(truth: np.ndarray, scores: np.ndarray, labels: list[str]) -> dict:
    """label → {"fpr", "tpr", "auc"} for plotting (labels without both classes left out)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    curves = {}
    for j, label in enumerate(labels):
        if _single_class(truth[:, j]):
            continue
        fpr, tpr, _ = roc_curve(truth[:, j], scores[:, j])
        curves[label] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(),
                         "auc": float(roc_auc_score(truth[:, j], scores[:, j]))}
    return curves


def zero_shot_confusion(truth: np.ndarray, scores: np.ndarray, labels: list[str]) -> dict:
    """Argmax prediction against the true label, on images that carry exactly one label."""
    from sklearn.metrics import accuracy_score, confusion_matrix

    single = truth.sum(axis=1) == 1
    if not single.any():
        return {"labels": labels, "matrix": [], "n": 0, "accuracy": None}
    y_true = truth[single].argmax(axis=1)
    y_pred = scores[single].argmax(axis=1)
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(labels))))
    return {"labels": labels, "matrix": matrix.tolist(), "n": int(single.sum()),
            "accuracy": float(accuracy_score(y_true, y_pred))}


# -- text → image retrieval ------------------------------------------------------------------
def recall_at_k(relevant: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Share of the relevant images among the k best-scored (one query, one score per image)."""
    top = np.argsort(-scores, kind="stable")[:k]
    return float(relevant[top].sum() / relevant.sum())


def text_retrieval(truth: np.ndarray, scores: np.ndarray, labels: list[str],
                   ks: tuple[int, ...] = DEFAULT_KS) -> dict:
    """Each label's text queries all images: Recall@k and average precision; means over labels."""
    from sklearn.metrics import average_precision_score

    per_label, skipped = {}, {}
    for j, label in enumerate(labels):
        if not truth[:, j].any():
            skipped[label] = "no positive image"
            continue
        entry = {f"recall@{k}": recall_at_k(truth[:, j], scores[:, j], k) for k in ks}
        entry["ap"] = float(average_precision_score(truth[:, j], scores[:, j]))
        per_label[label] = entry
    means = {f"recall@{k}": (float(np.mean([e[f"recall@{k}"] for e in per_label.values()]))
                             if per_label else None) for k in ks}
    means["mAP"] = float(np.mean([e["ap"] for e in per_label.values()])) if per_label else None
    return {**means, "per_label": per_label, "skipped": skipped}


# -- similar-case retrieval ------------------------------------------------------------------
def majority_vote(neighbour_labels: list[tuple[str, ...]] | list[set[str]]) -> str | None:
    """Most frequent label among neighbours (nearest first); a tie goes to the earlier-seen label."""
    counts: Counter = Counter()
    first_seen: dict[str, int] = {}
    for rank, labels in enumerate(neighbour_labels):
        for label in dict.fromkeys(labels):
            counts[label] += 1
            first_seen.setdefault(label, rank)
    if not counts:
        return None
    return min(counts, key=lambda label: (-counts[label], first_seen[label]))


def nearest_neighbours(queries: np.ndarray, database: np.ndarray, k: int,
                       exclude_same: np.ndarray | None = None) -> np.ndarray:
    """Indices into ``database`` of the k best cosine matches per query (exact, chunked).

    ``exclude_same[i]`` is a database index to skip for query i (leave-one-out), or -1.
    """
    k = min(k, len(database) - (1 if exclude_same is not None else 0))
    out = np.zeros((len(queries), max(k, 0)), np.int64)
    if k <= 0:
        return out
    for start in range(0, len(queries), 1024):
        sims = queries[start:start + 1024].astype(np.float64) @ database.T.astype(np.float64)
        if exclude_same is not None:
            rows = np.arange(len(sims))
            own = exclude_same[start:start + 1024]
            sims[rows[own >= 0], own[own >= 0]] = -np.inf
        out[start:start + len(sims)] = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return out


def similar_case_retrieval(vectors: np.ndarray, label_sets: list[tuple[str, ...]],
                           ks: tuple[int, ...] = DEFAULT_KS,
                           splits: list[str | None] | None = None) -> dict:
    """precision@k (neighbours sharing a label) and mMV@k (majority vote is a true label)."""
    vectors = np.asarray(vectors, np.float32)
    sets = [set(s) for s in label_sets]
    has_split = splits is not None and {"train", "test"} <= {s for s in splits if s}
    if has_split:
        queries = [i for i, s in enumerate(splits) if s == "test"]
        database = [i for i, s in enumerate(splits) if s == "train"]
        exclude = None
        protocol = "test queries against train"
    else:
        queries = database = list(range(len(vectors)))
        exclude = np.arange(len(vectors))
        protocol = "leave-one-out"
    queries = [i for i in queries if sets[i]]  # an unlabelled image has nothing to match
    result: dict = {"protocol": protocol, "queries": len(queries), "database": len(database)}
    if not queries or len(database) < 2:
        return {**result, **{f"precision@{k}": None for k in ks}, **{f"mMV@{k}": None for k in ks}}
    db = np.asarray(database)
    neighbours = nearest_neighbours(vectors[queries], vectors[db], max(ks),
                                    None if exclude is None else
                                    np.searchsorted(db, np.asarray(queries)))
    for k in ks:
        precision, votes = [], []
        for row, q in enumerate(queries):
            found = [sets[db[j]] for j in neighbours[row, :k]]
            precision.append(np.mean([bool(sets[q] & s) for s in found]))
            votes.append(majority_vote(found) in sets[q])
        result[f"precision@{k}"] = float(np.mean(precision))
        result[f"mMV@{k}"] = float(np.mean(votes))
    return result


# -- linear probe ----------------------------------------------------------------------------
DEFAULT_CS = (0.01, 0.1, 1.0, 10.0, 100.0)


def probe_estimator(y_train: np.ndarray, single_label: bool, Cs=DEFAULT_CS, inner_folds: int = 3):
    """Logistic regression with C chosen by inner cross-validation (LogisticRegressionCV).

    Where the training part is too small for inner folds (a label with fewer than
    ``inner_folds`` positives or negatives), C is fixed at 1.0 instead; the name says which.
    """
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.multiclass import OneVsRestClassifier

    if single_label:
        smallest = int(np.bincount(y_train)[np.unique(y_train)].min())
    else:
        positives = y_train.sum(axis=0)
        present = (positives > 0) & (positives < len(y_train))
        smallest = int(min(positives[present].min(initial=len(y_train)),
                           (len(y_train) - positives[present]).min(initial=len(y_train))))
    if smallest >= inner_folds:
        base, name = LogisticRegressionCV(Cs=list(Cs), cv=inner_folds, scoring="neg_log_loss",
                                          max_iter=2000), "LogisticRegressionCV"
    else:
        base, name = LogisticRegression(C=1.0, max_iter=2000), "LogisticRegression(C=1)"
    return (base, name) if single_label else (OneVsRestClassifier(base), name + " one-vs-rest")


def probe_folds(truth: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds on each image's first label (unlabelled images: a stratum of their own);
    as many folds as the rarest stratum allows, at most ``folds``."""
    from sklearn.model_selection import StratifiedKFold

    strata = np.where(truth.any(axis=1), truth.argmax(axis=1), truth.shape[1])
    counts = np.bincount(strata)
    n_splits = min(folds, int(counts[counts > 0].min()))
    if n_splits < 2:
        raise ValueError("each label needs at least two images for cross-validation")
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros((len(strata), 1)), strata))


def linear_probe(vectors: np.ndarray, truth: np.ndarray, labels: list[str], *,
                 splits: list[str | None] | None = None, folds: int = 5, seed: int = 0,
                 Cs=DEFAULT_CS) -> dict:
    """Logistic regression on the embeddings, scored on out-of-fold (or test-split) probabilities.

    Single-label data (every image exactly one label): multinomial regression, accuracy,
    balanced accuracy and one-vs-rest AUC per label. Multi-label: one regression per label
    (scikit-learn's OneVsRestClassifier) and AUC per label.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    X = np.asarray(vectors, np.float64)
    truth = np.asarray(truth)
    single_label = bool((truth.sum(axis=1) == 1).all())
    y = truth.argmax(axis=1) if single_label else truth
    has_split = splits is not None and {"train", "test"} <= {s for s in splits if s}
    if has_split:
        plan = [(np.flatnonzero([s == "train" for s in splits]),
                 np.flatnonzero([s == "test" for s in splits]))]
        protocol = "train/test split"
    else:
        try:
            plan = probe_folds(truth, folds, seed)
        except ValueError as exc:
            return {"skipped": str(exc)}
        protocol = f"{len(plan)}-fold stratified cross-validation"
    probs = np.full(truth.shape, np.nan)
    present = np.zeros(len(X), bool)
    estimators = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn's notices of new defaults
        warnings.filterwarnings("ignore", message=".*not present in all training examples.*")
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        for train_idx, test_idx in plan:
            if single_label and len(np.unique(y[train_idx])) < 2:
                return {"skipped": "a training part holds fewer than two labels"}
            estimator, name = probe_estimator(y[train_idx], single_label, Cs)
            estimators.add(name)
            model = estimator.fit(X[train_idx], y[train_idx])
            p = model.predict_proba(X[test_idx])
            if single_label:  # columns follow the classes seen in training
                full = np.zeros((len(test_idx), len(labels)))
                full[:, model.classes_] = p
                p = full
            probs[test_idx] = p
            present[test_idx] = True
    evaluated_truth, evaluated_probs = truth[present], probs[present]
    result = {"protocol": protocol, "estimator": ", ".join(sorted(estimators)), "Cs": list(Cs),
              "multi_label": not single_label, "n": int(present.sum()),
              "auc": per_label_auc(evaluated_truth, evaluated_probs, labels)}
    if single_label:
        y_true, y_pred = evaluated_truth.argmax(axis=1), evaluated_probs.argmax(axis=1)
        result["accuracy"] = float(accuracy_score(y_true, y_pred))
        result["balanced_accuracy"] = float(balanced_accuracy_score(y_true, y_pred))
    result["probabilities"] = evaluated_probs
    return result


# -- everything at once ----------------------------------------------------------------------
def evaluate(image_vectors: np.ndarray, label_sets: list[tuple[str, ...]], labels: list[str],
             label_vectors: np.ndarray, scalars: LogitScalars, *,
             splits: list[str | None] | None = None, ks: tuple[int, ...] = DEFAULT_KS,
             folds: int = 5, seed: int = 0, probe: bool = True) -> dict:
    """All metrics for one labelled set of embeddings; ROC curves included for plotting."""
    if len(image_vectors) != len(label_sets):
        raise ValueError("one label set per image vector")
    truth = truth_matrix(label_sets, labels)
    scores = score_vectors(image_vectors, label_vectors, labels, scalars)
    result = {
        "n_images": len(label_sets),
        "labels": labels,
        "label_counts": {label: int(truth[:, j].sum()) for j, label in enumerate(labels)},
        "zero_shot": {
            "auc": per_label_auc(truth, scores.cosine, labels),
            "confusion": zero_shot_confusion(truth, scores.cosine, labels),
            "roc_curves": roc_curves(truth, scores.cosine, labels),
        },
        "text_retrieval": text_retrieval(truth, scores.cosine, labels, ks),
        "similar_cases": similar_case_retrieval(image_vectors, label_sets, ks, splits),
    }
    if probe:
        probe_result = linear_probe(image_vectors, truth, labels, splits=splits, folds=folds,
                                    seed=seed)
        probe_result.pop("probabilities", None)
        result["linear_probe"] = probe_result
    return result
