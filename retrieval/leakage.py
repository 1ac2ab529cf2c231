"""Train/test leakage in an evaluation set: test images that share a patient, a study, or a
near-identical picture with a train image, so that a metric would partly measure recall of
images the model (or a probe) has effectively seen.

Patient keys and Study Instance UIDs come from the store's rows (unknown for images embedded
on the fly); near-duplicates from the vectors themselves (retrieval.duplicates), so that leak
is found for every image.
"""

from __future__ import annotations

import numpy as np

from .duplicates import check_threshold, cross_pairs
from .errors import InputError

KINDS = ("patient", "study", "near_duplicate")

#: Offending test positions listed per kind in the report (all are counted).
LISTED = 200


def find_leaks(splits: list[str | None], vectors: np.ndarray, *,
               patient_keys: list[str | None] | None = None,
               study_uids: list[str | None] | None = None,
               threshold: float = 0.98, kinds: tuple[str, ...] = KINDS) -> dict:
    """Per kind (patient, study, near_duplicate; those in ``kinds``): how many test images leak
    and which (by position); ``leaking`` lists every leaking test position, ascending."""
    threshold = check_threshold(threshold, "leak_threshold")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise InputError(f"unknown leak kind(s) {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(KINDS)}", setting="leak_by")
    if "patient" not in kinds:
        patient_keys = None
    if "study" not in kinds:
        study_uids = None
    test = [i for i, s in enumerate(splits) if s == "test"]
    train = [i for i, s in enumerate(splits) if s == "train"]
    found_by: dict[str, list[int]] = {}
    for kind, keys in (("patient", patient_keys), ("study", study_uids)):
        if keys is None:
            continue
        seen = {keys[i] for i in train if keys[i]}
        found_by[kind] = [i for i in test if keys[i] and keys[i] in seen]
    if "near_duplicate" in kinds:
        pairs = cross_pairs(vectors[test], vectors[train], threshold) if test and train else None
        found_by["near_duplicate"] = sorted({test[int(q)] for q in pairs.first}) if pairs else []
    leaking = sorted({i for found in found_by.values() for i in found})
    known = {kind: sum(1 for i in test if keys[i]) for kind, keys in
             (("patient", patient_keys), ("study", study_uids)) if keys is not None}
    return {"test_images": len(test), "train_images": len(train), "threshold": threshold,
            "keys_known": known, "leaking_test_images": len(leaking), "leaking": leaking,
            **{kind: {"count": len(found), "positions": found[:LISTED]}
               for kind, found in found_by.items()}}


def describe(leakage: dict) -> str:
    """One sentence for the command line and the report."""
    kinds = ", ".join(f"{leakage[kind]['count']} by {kind.replace('_', '-')}"
                      for kind in ("patient", "study", "near_duplicate") if kind in leakage)
    unknown = [f"{kind} keys known for {n} of {leakage['test_images']}"
               for kind, n in leakage["keys_known"].items() if n < leakage["test_images"]]
    near = (f"; near-copy at cosine ≥ {leakage['threshold']}" if "near_duplicate" in leakage
            else "")
    text = (f"train/test leakage: {leakage['leaking_test_images']} of {leakage['test_images']} "
            f"test image(s) leak ({kinds}{near})")
    if unknown:
        text += "; " + "; ".join(unknown)
    if leakage.get("dropped"):
        text += f"; {leakage['dropped']} dropped before evaluating (--drop-leaks)"
    return text
