"""The result-shaping options search, similar and export share (one row per group, probability
threshold, paging, near-copy removal, relevance feedback) and the QuerySpec fields they set."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from retrieval.errors import InputError

DistinctOpt = Annotated[Optional[str], typer.Option(
    "--distinct", help="One row per patient|study|series: the best-scoring image of each group; "
                       "-k counts groups and each row gives group_count.")]
MinProbOpt = Annotated[Optional[float], typer.Option(
    "--min-prob", min=0.0, max=1.0,
    help="Every image whose SigLIP match probability for the (text-only) query is at least P, "
         "ranked and paged by -k/--offset. Uncalibrated model output.")]
OffsetOpt = Annotated[int, typer.Option(
    "--offset", min=0, max=100_000, help="Skip this many rows (groups) first: the next page.")]
DedupeOpt = Annotated[Optional[float], typer.Option(
    "--dedupe", min=0.0, max=1.0,
    help="Drop a row whose cosine to a higher-ranked row already kept is at least T.")]
RelevantOpt = Annotated[Optional[str], typer.Option(
    "--relevant", help="Relevance feedback: ids marked relevant, e.g. 5,7 (Rocchio).")]
NotRelevantOpt = Annotated[Optional[str], typer.Option(
    "--not-relevant", help="Relevance feedback: ids marked not relevant, e.g. 9.")]


RegionOpt = Annotated[Optional[str], typer.Option(
    "--region", help="Only this box of the query image, X,Y,W,H in pixels (embedded as a "
                     "picture of its own: padded to a square like a whole image).")]
RegionSpaceOpt = Annotated[str, typer.Option(
    "--region-space", help="image: pixels of the displayed image; preview: pixels of the "
                           "model-view square that `medsearch preview` shows.")]


def id_list(value: str | None, name: str) -> list[int]:
    """'5,7' → [5, 7]; anything else is refused naming the option."""
    if not value or not value.strip():
        return []
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"{name} takes image ids separated by commas, e.g. 5,7; got {value!r}",
                         setting=name) from None


def spec_fields(distinct: str | None = None, min_prob: float | None = None, offset: int = 0,
                dedupe: float | None = None, relevant: str | None = None,
                not_relevant: str | None = None) -> dict:
    """QuerySpec keyword arguments for the options above."""
    return {"distinct": distinct, "min_prob": min_prob, "offset": offset, "dedupe": dedupe,
            "relevant": id_list(relevant, "relevant"),
            "not_relevant": id_list(not_relevant, "not_relevant")}
