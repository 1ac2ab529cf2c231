"""`medsearch duplicates`: groups of near-identical images in a store (re-exports, a film stored
twice; slices of one series only when asked)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .main import app
from .options import DbOpt, JsonOpt, StoreOpt, resolve
from .output import emit


def _human(d: dict) -> str:
    lines = [f"{d['groups_total']} group(s) of near-identical images (cosine ≥ {d['threshold']}) "
             f"among {d['vectors']} vectors, {d['images_in_groups']} image(s) in them"]
    if d["slice_pairs_left_out"]:
        lines.append(f"{d['slice_pairs_left_out']} pair(s) of slices of one series left out "
                     "(--slices lists them)")
    for n, group in enumerate(d["groups"], 1):
        lines.append(f"group {n}: {group['size']} images, cosine {group['min_cos']:.4f}–"
                     f"{group['max_cos']:.4f}")
        lines += [f"  #{img['id']}  {img['path']}" + (f" [frame {img['frame']}]"
                                                      if img["frame"] else "")
                  for img in group["images"]]
    if d["groups_total"] > len(d["groups"]):
        lines.append(f"… {d['groups_total'] - len(d['groups'])} more group(s) (--limit)")
    return "\n".join(lines)


@app.command("duplicates")
def duplicates_cmd(
    store: StoreOpt = None, db: DbOpt = None,
    threshold: Annotated[float, typer.Option(
        min=0.5, max=1.0, help="Cosine at or above which two images count as near-identical.")] = 0.98,
    slices: Annotated[bool, typer.Option(
        "--slices", help="Also pair different instances of one series and frames of one file "
                         "(consecutive slices are near-identical by nature).")] = False,
    limit: Annotated[Optional[int], typer.Option(min=1, help="List at most this many groups.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Near-identical images: from the stored vectors, by batched range searches, not n² pairs."""
    from ..app import Medsearch

    with Medsearch.from_settings(resolve(store=store, db=db)) as found:
        doc = found.duplicates(threshold, slices=slices, limit=limit)
    emit(doc, json_out, _human)
