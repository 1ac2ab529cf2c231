"""Tagging a store: zero-shot labels with their sigmoid scores written into the labels table.

Uses the stored vectors (no image is decoded or embedded again) and only the text tower. Each
run replaces the earlier predictions of the same source (e.g. "zero-shot:cxr"), so re-tagging
with other thresholds or prompts never piles up stale rows; user labels are never touched.
Search filters (``--label pneumothorax``) then see the predictions like any other label.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .store import Store
from .zeroshot import ZeroShotClassifier, sigmoid

CHUNK = 4096


@dataclass
class TagReport:
    source: str
    images: int = 0
    written: int = 0
    replaced: int = 0
    per_label: dict[str, int] = field(default_factory=dict)
    min_score: float = 0.5
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"source": self.source, "images": self.images, "written": self.written,
                "replaced": self.replaced, "per_label": self.per_label,
                "min_score": self.min_score, "seconds": self.seconds}


def default_source(preset: str | None) -> str:
    return f"zero-shot:{preset or 'labels'}"


def tag_store(store: Store, classifier: ZeroShotClassifier, labels: list[str],
              templates: list[str], *, min_score: float = 0.5, source: str = "zero-shot:labels",
              ) -> TagReport:
    """Write every (image, label) whose sigmoid score ≥ ``min_score``, in one transaction."""
    if not 0.0 <= min_score <= 1.0:
        raise InputError(f"the minimum score must be between 0 and 1 (a sigmoid score), got {min_score}")
    if source == "user":
        raise InputError("source 'user' is reserved for labels given by people")
    started = time.perf_counter()
    report = TagReport(source=source, min_score=min_score, per_label={label: 0 for label in labels})
    label_vectors = classifier.label_vectors(labels, templates)
    with store.writer() as writer:
        ids = writer.vector_ids()
        report.replaced = writer.remove_labels(source)
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]
            cosine = store.vectors(chunk).astype(np.float64) @ label_vectors.T.astype(np.float64)
            probs = sigmoid(classifier.scalars.logits(cosine))
            rows, cols = np.nonzero(probs >= min_score)
            writer.add_labels([(int(chunk[r]), labels[c], float(probs[r, c]))
                               for r, c in zip(rows, cols)], source)
            for c, n in enumerate(np.bincount(cols, minlength=len(labels))):
                report.per_label[labels[c]] += int(n)
            report.written += len(rows)
        report.images = len(ids)
        # in the same transaction: a kill never leaves labels without the record of how
        writer.set_setting(f"tags:{source}", json.dumps({
            "labels": labels, "templates": templates, "min_score": min_score,
            "model": store.manifest.model, "tagged_at": time.time()}))
    report.seconds = round(time.perf_counter() - started, 3)
    return report
