"""How commands talk: one JSON document on stdout with --json, readable text otherwise.

Logs and progress always go to stderr so scripts can parse stdout.
"""

from __future__ import annotations

import json
import sys
from typing import Callable

from retrieval.zeroshot import RESEARCH_NOTICE  # printed around every zero-shot result



def emit(document: dict, as_json: bool, human: Callable[[dict], str] | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(document, default=_jsonable) + "\n")
    else:
        text = human(document) if human else json.dumps(document, indent=2, default=_jsonable)
        sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def results_table(document: dict) -> str:
    rows = document.get("results", [])
    if not rows:
        return "no results"
    lines = []
    for rank, r in enumerate(rows, 1):
        meta = r.get("metadata", {})
        tags = " ".join(f"{k}={meta[k]}" for k in ("modality", "body_part", "study_date") if meta.get(k))
        frame = f" [frame {r['frame']}]" if r.get("frame") else ""
        extra = (f"  prob={r['prob']:.3f}" if r.get("prob") is not None else "") + \
            (f"  group_count={r['group_count']}" if r.get("group_count") is not None else "")
        lines.append(f"{document.get('offset', 0) + rank:3d}. {r['score']:.4f}{extra}  "
                     f"id={r['id']}  {r['path']}{frame}  {tags}".rstrip())
    if document.get("next_offset") is not None:
        lines.append(f"more: --offset {document['next_offset']}")
    return "\n".join(lines)
