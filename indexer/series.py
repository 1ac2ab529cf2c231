"""Series-level vectors: one vector per DICOM series, so a CT or MR series is found as one case.

The series vector is the mean of the series' frame vectors, renormalised. It is stored as an
ordinary image row (so search, filters and `similar --id` work unchanged) under a synthetic
source ``series:<SeriesInstanceUID>`` with ``source_kind = "series"`` and ``frame = -1``; its
metadata is the series' own (modality, body part, study …), without a SOP Instance UID.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

from retrieval.store import NewImage, Store

PREFIX = "series:"
SOURCE_KIND = "series"
SERIES_FRAME = -1
#: A series vector is only worth storing when it summarises several frames.
MIN_MEMBERS = 2
_SERIES_FIELDS = ("modality", "body_part", "study_date", "study_description",
                  "series_description", "view_position", "manufacturer", "study_uid",
                  "series_uid", "patient_sex", "patient_age", "patient_key")


def series_path(series_uid: str) -> str:
    return PREFIX + series_uid


def update_series_vectors(store: Store, series_uids: Iterable[str]) -> int:
    """(Re)compute the vectors of these series; returns how many series rows now exist for them."""
    uids = sorted({u for u in series_uids if u})
    if not uids:
        return 0
    members: dict[str, list[dict]] = {u: [] for u in uids}
    for row in store.series_images(uids, exclude_kind=SOURCE_KIND):
        members[row["series_uid"]].append(row)
    written = 0
    with store.writer() as writer:
        for uid, images in members.items():
            if len(images) < MIN_MEMBERS:
                writer.remove_file(series_path(uid))
                continue
            ids = sorted(img["id"] for img in images)
            mean = store.vectors(ids).astype(np.float64).mean(axis=0)
            norm = float(np.linalg.norm(mean))
            if norm == 0.0:
                writer.remove_file(series_path(uid))
                continue
            first = min(images, key=lambda img: img["id"])
            meta = {k: first[k] for k in _SERIES_FIELDS if first[k] is not None}
            digest = hashlib.blake2b(",".join(map(str, ids)).encode(), digest_size=20).hexdigest()
            writer.add_file(path=series_path(uid), size=len(ids), mtime_ns=0, content_hash=digest,
                            source_kind=SOURCE_KIND,
                            images=[NewImage(SERIES_FRAME, first["width"], first["height"],
                                             (mean / norm).astype(np.float32), meta)])
            written += 1
    return written


def stale_series(store: Store) -> list[str]:
    """Series whose stored vector no longer matches its members (some were removed or added)."""
    stored, counts = store.series_counts(SOURCE_KIND)
    return sorted(u for u, size in stored.items() if u and counts.get(u, 0) != size)
