"""`medsearch cohort …`: save a query's results with their provenance, list, show, export,
refresh, diff, add to and delete saved cohorts (medsearch.cohorts)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from retrieval.errors import InputError

from .main import app
from .options import (BodyPartOpt, DateFromOpt, DateToOpt, DbOpt, JsonOpt, KOpt, LabelOpt,
                      MinScoreOpt, ModalityOpt, PathGlobOpt, StoreOpt, build_filters, resolve)
from .output import emit
from .query_options import DedupeOpt, DistinctOpt, MinProbOpt, id_list, spec_fields

cohort_app = typer.Typer(help="Reproducible cohorts: saved results with how they were made.",
                         no_args_is_help=True)
app.add_typer(cohort_app, name="cohort")
NameArg = Annotated[str, typer.Argument(help="The cohort's name (letters, digits, . _ -).")]


@contextmanager
def _cohorts(store, db, *, write: bool = False, k: int | None = None) -> Iterator:
    from ..cohorts import Cohorts

    cfg = resolve(store=store, db=db, k=k)
    from ..app import Medsearch

    with Medsearch.from_settings(cfg, readonly=not write) as found:
        yield Cohorts(found), cfg


def _human_cohort(d: dict) -> str:
    p = d["provenance"]
    query = p.get("query") or {}
    terms = " ".join(str(t["value"]) for t in query.get("terms", []))
    return "\n".join([f"{d['name']} ({d['kind']}): {d['count']} image(s), created {d['created']}"
                      + (f", refreshed {d['refreshed']}" if d["refreshed"] else ""),
                      f"  query: {terms or '–'}   model: {p['model']} ({p['model_fingerprint']})",
                      "  ids: " + " ".join(map(str, d["ids"][:50]))
                      + (" …" if d["count"] > 50 else "")])


@cohort_app.command("save")
def save_cmd(
    name: NameArg,
    query: Annotated[Optional[str], typer.Option("--query", help="A text query (arithmetic works).")] = None,
    image_id: Annotated[Optional[int], typer.Option("--id", help="Cases similar to an indexed image.")] = None,
    ids: Annotated[Optional[str], typer.Option("--ids", help="These images, e.g. 5,7,9.")] = None,
    store: StoreOpt = None, db: DbOpt = None, k: KOpt = None, min_score: MinScoreOpt = None,
    modality: ModalityOpt = None, body_part: BodyPartOpt = None, date_from: DateFromOpt = None,
    date_to: DateToOpt = None, path_glob: PathGlobOpt = None, label: LabelOpt = None,
    distinct: DistinctOpt = None, min_prob: MinProbOpt = None, dedupe: DedupeOpt = None,
    replace: Annotated[bool, typer.Option("--replace", help="Replace a cohort of this name.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Save a query's results (or given ids) as a cohort, with their provenance."""
    from retrieval.query import Term, parse_query

    if sum(x is not None for x in (query, image_id, ids)) != 1:
        raise InputError("give one of --query TEXT, --id N or --ids 1,2,3")
    with _cohorts(store, db, write=True, k=k) as (cohorts, cfg):
        if ids is not None:
            doc = cohorts.save(name, ids=id_list(ids, "ids"), replace=replace)
        else:
            terms = parse_query(query) if query is not None else [Term("id", image_id, 1.0)]
            from ..app import QuerySpec

            spec = QuerySpec(terms, k=cfg.k, min_score=min_score, filters=build_filters(
                modality, body_part, date_from, date_to, path_glob, label),
                **spec_fields(distinct, min_prob, 0, dedupe))
            doc = cohorts.save(name, spec=spec, replace=replace)
    emit(doc, json_out, _human_cohort)


@cohort_app.command("list")
def list_cmd(store: StoreOpt = None, db: DbOpt = None, json_out: JsonOpt = False) -> None:
    """The saved cohorts."""
    with _cohorts(store, db) as (cohorts, _):
        doc = {"cohorts": cohorts.list()}
    emit(doc, json_out, lambda d: "\n".join(
        f"{c['name']:<24} {c['kind']:<6} {c['count']:>7}  {c['created']}" for c in d["cohorts"])
        or "no cohorts")


@cohort_app.command("show")
def show_cmd(name: NameArg, store: StoreOpt = None, db: DbOpt = None, json_out: JsonOpt = False) -> None:
    """One cohort: its ids and provenance."""
    with _cohorts(store, db) as (cohorts, _):
        doc = cohorts.show(name)
    emit(doc, json_out, _human_cohort)


@cohort_app.command("export")
def export_cmd(
    name: NameArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="File to write (.csv, .json or .parquet); "
                                                       "the provenance goes to FILE.provenance.json.")],
    store: StoreOpt = None, db: DbOpt = None, json_out: JsonOpt = False,
) -> None:
    """Write the cohort's rows (in saved order, with saved scores) and its provenance."""
    with _cohorts(store, db) as (cohorts, _):
        doc = cohorts.export(name, out)
    emit(doc, json_out, lambda d: f"wrote {d['file']} and {d['provenance']}")


def _changes(d: dict) -> str:
    return (f"entered: {' '.join(map(str, d['entered'])) or '–'}\n"
            f"left:    {' '.join(map(str, d['left'])) or '–'}")


@cohort_app.command("diff")
def diff_cmd(name: NameArg, store: StoreOpt = None, db: DbOpt = None, json_out: JsonOpt = False) -> None:
    """What a refresh would change: images that would enter or leave."""
    with _cohorts(store, db) as (cohorts, _):
        doc = cohorts.diff(name)
    emit(doc, json_out, _changes)


@cohort_app.command("refresh")
def refresh_cmd(name: NameArg, store: StoreOpt = None, db: DbOpt = None, json_out: JsonOpt = False) -> None:
    """Re-run the saved query and save its answer (what entered and left is printed)."""
    with _cohorts(store, db, write=True) as (cohorts, _):
        doc = cohorts.refresh(name)
    emit(doc, json_out, _changes)


@cohort_app.command("add")
def add_cmd(name: NameArg, ids: Annotated[str, typer.Option("--ids", help="Image ids, e.g. 5,7.")],
            store: StoreOpt = None, db: DbOpt = None, json_out: JsonOpt = False) -> None:
    """Add images to a cohort (made when new)."""
    with _cohorts(store, db, write=True) as (cohorts, _):
        doc = cohorts.add(name, id_list(ids, "ids"))
    emit(doc, json_out, _human_cohort)


@cohort_app.command("delete")
def delete_cmd(name: NameArg, store: StoreOpt = None, db: DbOpt = None, json_out: JsonOpt = False) -> None:
    """Delete a saved cohort (the images stay indexed)."""
    with _cohorts(store, db, write=True) as (cohorts, _):
        cohorts.delete(name)
    emit({"deleted": name}, json_out, lambda d: f"deleted cohort {d['deleted']}")
