"""Zero-shot classification: label prompts through the text tower, scored against image vectors.

Two scores per label, because they answer different questions:

* ``softmax`` across the given labels (what the MedSigLIP model card does): "which of these
  labels fits best?" — the scores sum to 1 and depend on which other labels were given;
* ``sigmoid`` per label, SigLIP's own training objective ``sigmoid(exp(logit_scale)·cos +
  logit_bias)`` with the checkpoint's learned scalars: "does this label apply?" — independent
  of the other labels, so right for multi-label findings.

Prompts: each label is put into one or more templates (``"{}"`` is the label verbatim); with
several templates the normalised text embeddings are averaged and normalised again (a prompt
ensemble). Uncertainty: normalised entropy of the softmax and the top-two margin, with a
"needs human review" flag at configurable thresholds. Scores are uncalibrated model outputs
for research; nothing here is a diagnosis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError, ModelUnavailableError
from .model.checkpoint import Checkpoint, resolve_checkpoint, safetensors_files
from .model.names import DEFAULT_MODEL

if TYPE_CHECKING:  # the tower imports torch: loaded only when a label is scored; numpy is
    # imported where scores are computed (the command line reads the presets at every start)
    import numpy as np

    from .model.encoders import TextEncoder

RESEARCH_NOTICE = "For research use only; not for diagnosis."

#: Used with ``--labels`` when no template is given.
DEFAULT_TEMPLATES: tuple[str, ...] = ("a medical image showing {}",)

#: The 13 chest X-ray findings of the MedSigLIP model card's zero-shot evaluation (CheXpert's
#: observations without "No Finding").
CXR_FINDINGS: tuple[str, ...] = (
    "enlarged cardiomediastinum", "cardiomegaly", "lung opacity", "lung lesion",
    "consolidation", "edema", "pneumonia", "atelectasis", "pneumothorax", "pleural effusion",
    "pleural other", "fracture", "support devices",
)


@dataclass(frozen=True)
class Preset:
    """A label set for one kind of image, with the prompt ensemble that suits it."""

    name: str
    description: str
    labels: tuple[str, ...]
    templates: tuple[str, ...]


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("cxr", "chest X-ray findings (the 13 of the MedSigLIP card)", CXR_FINDINGS,
           ("chest x-ray showing {}", "a chest radiograph with {}", "{}")),
    Preset("derm", "dermatology lesion types (HAM10000-style classes)",
           ("melanoma", "melanocytic nevus", "basal cell carcinoma", "actinic keratosis",
            "benign keratosis", "dermatofibroma", "vascular lesion", "squamous cell carcinoma"),
           ("a dermatology photo of {}", "a skin lesion showing {}", "{}")),
    Preset("fundus", "diabetic retinopathy grades on fundus photographs",
           ("no diabetic retinopathy", "mild diabetic retinopathy",
            "moderate diabetic retinopathy", "severe diabetic retinopathy",
            "proliferative diabetic retinopathy"),
           ("a fundus photograph showing {}", "a retinal image with {}", "{}")),
    Preset("pathology", "colorectal histopathology tissue types (NCT-CRC-HE classes)",
           ("adipose tissue", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
            "normal colon mucosa", "cancer-associated stroma",
            "colorectal adenocarcinoma epithelium"),
           ("a histopathology image of {}", "an h&e stained slide showing {}", "{}")),
)}


# -- labels and prompts ----------------------------------------------------------------------
def check_template(template: str) -> str:
    if "{}" not in template:
        raise InputError(f"template {template!r} has no '{{}}' where the label goes; "
                         "e.g. 'a chest x-ray showing {}' (or '{}' for the label alone)")
    return template


def resolve_labels(labels: list[str] | tuple[str, ...] | None = None, preset: str | None = None,
                   templates: list[str] | tuple[str, ...] | None = None,
                   ) -> tuple[list[str], list[str]]:
    """Labels and templates from either explicit labels or a preset; templates override."""
    if bool(labels) == bool(preset):
        raise InputError("give either labels (at least two) or a preset "
                         f"({'|'.join(PRESETS)}), one of them")
    if preset:
        if preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        chosen = list(PRESETS[preset].labels)
        default_templates = PRESETS[preset].templates
    else:
        chosen = []
        for value in labels or []:
            chosen += [part.strip() for part in value.split(",") if part.strip()]
        default_templates = DEFAULT_TEMPLATES
    if len(set(chosen)) != len(chosen):
        dup = sorted({x for x in chosen if chosen.count(x) > 1})
        raise InputError(f"label(s) given twice: {', '.join(dup)}")
    if len(chosen) < 2:
        raise InputError("give at least two labels: softmax compares labels with each other "
                         "(add an alternative such as 'normal')")
    chosen_templates = [check_template(t) for t in (templates or default_templates)]
    return chosen, chosen_templates


def prompt(template: str, label: str) -> str:
    return template.replace("{}", label)


# -- the checkpoint's learned scalars -------------------------------------------------------
@dataclass(frozen=True)
class LogitScalars:
    """``logit_scale`` (a log: the multiplier is its exp) and ``logit_bias`` of the checkpoint."""

    scale: float
    bias: float

    def logits(self, cosine: np.ndarray) -> np.ndarray:
        import numpy as np

        return math.exp(self.scale) * np.asarray(cosine, np.float64) + self.bias


def _scalar(value) -> float:
    return float(value.reshape(-1)[0].float().item())


def _find(keys, name: str) -> str | None:
    for key in keys:
        if key == name or key.endswith("." + name):
            return key
    return None


def read_logit_scalars(checkpoint: Checkpoint) -> LogitScalars:
    """Read the two scalars straight from the weights files, without loading either tower."""
    return _read_logit_scalars(str(checkpoint.path), checkpoint.fingerprint, checkpoint.name)


@lru_cache(maxsize=8)
def _read_logit_scalars(path: str, _fingerprint: str, name: str) -> LogitScalars:
    folder = Path(path)
    found: dict[str, float] = {}
    from safetensors import safe_open

    for file in safetensors_files(  # sharded: only where the index puts the scalars
            folder, lambda key: key.split(".")[-1] in ("logit_scale", "logit_bias")):
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
            for wanted in ("logit_scale", "logit_bias"):
                key = _find(keys, wanted)
                if key is not None and wanted not in found:
                    found[wanted] = _scalar(handle.get_tensor(key))
    if len(found) < 2:
        for file in sorted(folder.glob("*.bin")):
            import torch

            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for wanted in ("logit_scale", "logit_bias"):
                key = _find(state.keys(), wanted)
                if key is not None and wanted not in found:
                    found[wanted] = _scalar(state[key])
    if len(found) < 2:
        missing = ", ".join(sorted({"logit_scale", "logit_bias"} - set(found)))
        raise ModelUnavailableError(
            f"checkpoint {name!r} ({folder}) has no {missing} in its weights; per-label sigmoid "
            "scores need a full SigLIP checkpoint (both towers and the learned logit scalars)")
    return LogitScalars(found["logit_scale"], found["logit_bias"])


# -- scores and uncertainty ------------------------------------------------------------------
def softmax(logits: np.ndarray) -> np.ndarray:
    import numpy as np

    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    import numpy as np

    logits = np.asarray(logits, np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * logits))  # overflow-free logistic


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy divided by log(K): 0 = all mass on one label, 1 = uniform."""
    import numpy as np

    probs = np.asarray(probs, np.float64)
    k = probs.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(probs > 0, probs * np.log(probs), 0.0)
    return -terms.sum(axis=-1) / math.log(k) if k > 1 else np.zeros(probs.shape[:-1])


def top_two_margin(probs: np.ndarray) -> np.ndarray:
    """Best minus second-best probability: small means the model cannot separate them."""
    import numpy as np

    probs = np.asarray(probs, np.float64)
    if probs.shape[-1] < 2:
        return np.ones(probs.shape[:-1])
    top2 = -np.partition(-probs, 1, axis=-1)[..., :2]
    return top2[..., 0] - top2[..., 1]


@dataclass(frozen=True)
class ReviewThresholds:
    """A result needs human review when its softmax is too flat or its top two too close."""

    max_entropy: float = 0.8
    min_margin: float = 0.1

    def reasons(self, entropy: float, margin: float) -> list[str]:
        out = []
        if entropy > self.max_entropy:
            out.append(f"normalised entropy {entropy:.3f} > {self.max_entropy}")
        if margin < self.min_margin:
            out.append(f"top-two margin {margin:.3f} < {self.min_margin}")
        return out


@dataclass(frozen=True)
class Bands:
    """Words for sigmoid scores; the cut points are conventions, not calibrated probabilities."""

    moderate: float = 0.1
    high: float = 0.5

    def __call__(self, score: float) -> str:
        return "high" if score >= self.high else "moderate" if score >= self.moderate else "low"


@dataclass
class LabelScore:
    label: str
    softmax: float
    sigmoid: float
    cosine: float

    def to_json(self) -> dict:
        return {"label": self.label, "softmax": round(self.softmax, 6),
                "sigmoid": round(self.sigmoid, 6)}


@dataclass
class Classification:
    """One image's scores (best softmax first) and how sure the model is."""

    results: list[LabelScore]
    entropy: float
    margin: float
    needs_review: bool
    review_reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"results": [r.to_json() for r in self.results],
                "needs_review": self.needs_review, "entropy": round(self.entropy, 6),
                "margin": round(self.margin, 6), "review_reasons": self.review_reasons,
                "notice": RESEARCH_NOTICE}


@dataclass
class ZeroShotScores:
    """Scores of N images against L labels (rows: images, columns: labels)."""

    labels: list[str]
    cosine: np.ndarray
    softmax: np.ndarray
    sigmoid: np.ndarray


def score_vectors(image_vectors: np.ndarray, label_vectors: np.ndarray, labels: list[str],
                  scalars: LogitScalars) -> ZeroShotScores:
    """Pure arithmetic on unit vectors: usable with stored vectors and no model at all."""
    import numpy as np

    images = np.atleast_2d(np.asarray(image_vectors, np.float64))
    cosine = images @ np.asarray(label_vectors, np.float64).T
    logits = scalars.logits(cosine)
    return ZeroShotScores(list(labels), cosine, softmax(logits), sigmoid(logits))


def classifications(scores: ZeroShotScores, thresholds: ReviewThresholds = ReviewThresholds(),
                    ) -> list[Classification]:
    import numpy as np

    entropy = normalised_entropy(scores.softmax)
    margin = top_two_margin(scores.softmax)
    out = []
    for i in range(len(scores.cosine)):
        order = np.argsort(-scores.softmax[i], kind="stable")
        results = [LabelScore(scores.labels[j], float(scores.softmax[i, j]),
                              float(scores.sigmoid[i, j]), float(scores.cosine[i, j])) for j in order]
        reasons = thresholds.reasons(float(entropy[i]), float(margin[i]))
        out.append(Classification(results, float(entropy[i]), float(margin[i]), bool(reasons),
                                  reasons))
    return out


class ZeroShotClassifier:
    """Text tower + the checkpoint's logit scalars; image vectors come from anywhere."""

    def __init__(self, text_encoder: TextEncoder, scalars: LogitScalars | None = None,
                 thresholds: ReviewThresholds = ReviewThresholds()) -> None:
        self.text = text_encoder
        self.scalars = scalars or read_logit_scalars(text_encoder.checkpoint)
        self.thresholds = thresholds
        self._label_cache: dict[tuple, np.ndarray] = {}

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, device: str = "auto",
             thresholds: ReviewThresholds = ReviewThresholds()) -> "ZeroShotClassifier":
        from .model.encoders import TextEncoder

        checkpoint = resolve_checkpoint(model)
        return cls(TextEncoder(checkpoint, device), read_logit_scalars(checkpoint), thresholds)

    def label_vectors(self, labels: list[str], templates: list[str] | tuple[str, ...]) -> np.ndarray:
        """L×d unit vectors; each the normalised mean of its labels' template embeddings."""
        import numpy as np

        key = (tuple(labels), tuple(templates))
        if key not in self._label_cache:
            templates = [check_template(t) for t in templates]
            prompts = [prompt(t, label) for label in labels for t in templates]
            chunks = [self.text.embed(prompts[i:i + 64]) for i in range(0, len(prompts), 64)]
            vectors = np.concatenate(chunks).reshape(len(labels), len(templates), -1)
            mean = vectors.astype(np.float64).mean(axis=1)
            norms = np.linalg.norm(mean, axis=1, keepdims=True)
            self._label_cache[key] = (mean / np.maximum(norms, 1e-12)).astype(np.float32)
        return self._label_cache[key]

    def scores(self, image_vectors: np.ndarray, labels: list[str],
               templates: list[str] | tuple[str, ...] = DEFAULT_TEMPLATES) -> ZeroShotScores:
        return score_vectors(image_vectors, self.label_vectors(labels, templates), labels,
                             self.scalars)

    def classify(self, image_vectors: np.ndarray, labels: list[str],
                 templates: list[str] | tuple[str, ...] = DEFAULT_TEMPLATES) -> list[Classification]:
        """One :class:`Classification` per image vector (rows of ``image_vectors``)."""
        return classifications(self.scores(image_vectors, labels, templates), self.thresholds)
