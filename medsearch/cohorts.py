"""Reproducible cohorts over the application object: a query's results saved with how they
were made (provenance), re-run and compared later, exported byte-identically each time.

A cohort is saved in the store's database under the store's writer lock, taken only for the
one write transaction (an index run holding it makes the save fail at once, saying so).
Cohorts made from an uploaded image or a local file are refused: they could not be re-run.
"""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from retrieval import export
from retrieval.errors import ConflictError, InputError, NotFoundError
from retrieval.filters import Filters
from retrieval.query import Term
from retrieval.region import Region
from retrieval.store.cohort_rows import CohortRows

from .app import Medsearch, QuerySpec

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_MEMBERS = 100_000


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise InputError(f"cohort name {name!r}: use 1–64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit", setting="name")
    return name


def spec_to_json(spec: QuerySpec) -> dict:
    """Every field of the query (new fields included as they come), JSON-ready."""
    if spec.upload is not None or any(t.kind in ("upload", "file") for t in spec.terms):
        raise InputError("a cohort cannot be saved from an uploaded image or a local file: it "
                         "could not be re-created; index the image and use its id (#N)")
    doc = {}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if f.name == "upload":
            continue
        if f.name == "terms":
            value = [t.to_json() for t in value]
        elif isinstance(value, Filters):
            value = {k: v for k, v in dataclasses.asdict(value).items()
                     if v not in (None, [])} or None
        elif isinstance(value, Region):
            value = value.to_json()
        elif isinstance(value, tuple):
            value = list(value)
        doc[f.name] = value
    return doc


def spec_from_json(doc: dict) -> QuerySpec:
    known = {f.name for f in dataclasses.fields(QuerySpec)}
    fields = {k: v for k, v in doc.items() if k in known}
    fields["terms"] = [Term(t["kind"], t["value"], t["weight"]) for t in doc.get("terms", [])]
    fields["filters"] = Filters.from_dict(fields["filters"]) if fields.get("filters") else None
    if fields.get("region"):
        fields["region"] = Region.parse(fields["region"]["region"],
                                        fields["region"]["region_space"])
    return QuerySpec(**fields)


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _medsearch_version() -> str:
    try:
        return version("medsearch")
    except PackageNotFoundError:
        return "unknown"


class Cohorts:
    """save / list / show / rows / export / diff / refresh / add / delete, for one store."""

    def __init__(self, app: Medsearch) -> None:
        self.app = app
        self.table = CohortRows(app.store.db)

    # -- reading ---------------------------------------------------------------------------
    def _get(self, name: str) -> dict:
        found = self.table.get(check_name(name))
        if found is None:
            raise NotFoundError(f"no cohort named {name!r} (`medsearch cohort list` shows them)")
        return found

    def list(self) -> list[dict]:
        return self.table.names()

    def show(self, name: str) -> dict:
        found = self._get(name)
        return {"name": found["name"], "kind": found["kind"], "count": len(found["members"]),
                "ids": [i for i, _ in found["members"]], "created": found["created"],
                "refreshed": found["refreshed"], "provenance": json.loads(found["provenance"])}

    def rows(self, name: str) -> list[dict]:
        """Export rows of the members still in the store, in saved rank order, with the scores
        they were saved with (so an export is the same every time)."""
        found = self._get(name)
        with self.app.store_lock:
            stored = self.app.store.rows([i for i, _ in found["members"]])
        results = []
        for image_id, score in found["members"]:
            row = stored.get(image_id)
            if row is not None:
                results.append({"id": image_id, "score": score, "frame": row["frame"],
                                "path": self.app.searcher.redact(row["path"]),
                                "metadata": row["metadata"]})
        return export.cohort_rows(results)

    def provenance_bytes(self, name: str) -> bytes:
        return (json.dumps(self.show(name), indent=1, sort_keys=True) + "\n").encode()

    def export(self, name: str, out: str | Path) -> dict:
        """The cohort file and its provenance sidecar (``out`` + ``.provenance.json``)."""
        out = Path(out).expanduser()
        data = export.to_bytes(self.rows(name), export.format_for(out))
        sidecar = out.with_name(out.name + ".provenance.json")
        export.write_file(out, data, "cohort file")
        export.write_file(sidecar, self.provenance_bytes(name), "provenance file")
        return {"file": str(out), "provenance": str(sidecar), "rows": data.count(b"\n") - 1
                if out.suffix.lower() == ".csv" else None}

    # -- writing ---------------------------------------------------------------------------
    def _members(self, spec: QuerySpec | None, ids: list[int] | None) -> list[tuple[int, float | None]]:
        if spec is not None:
            if spec.k > MAX_MEMBERS:
                raise InputError(f"k is over {MAX_MEMBERS} for a cohort", setting="k")
            run = dataclasses.replace(spec, offset=0)
            return [(r.id, r.score) for r in self.app.page(run).results]
        self._check_members(list(ids or []))
        return [(int(i), None) for i in dict.fromkeys(ids or [])]

    def _check_members(self, ids: list[int]) -> None:
        """Ids in a request body that name no image: the body is wrong (400), not the cohort
        the path names (404)."""
        try:
            self.app._check_ids(ids)
        except NotFoundError as exc:
            raise InputError(f"{exc}; a cohort holds indexed images only", setting="ids") from None

    def _provenance(self, spec: QuerySpec | None, created: str, extra: dict | None = None) -> dict:
        m, store = self.app.store.manifest, self.app.store
        doc = {"query": spec_to_json(spec) if spec is not None else None,
               "model": m.model, "model_revision": m.model_revision,
               "model_fingerprint": m.model_fingerprint,
               "preprocessing_version": m.preprocessing_version, "decode": m.decode,
               "store_rows": store.count, "medsearch_version": _medsearch_version(),
               "created": created}
        return {**doc, **(extra or {})}

    def _write(self, name: str, kind: str, created: str, refreshed: str | None,
               provenance: dict, members: list) -> None:
        with self.app.store_lock, self.app.store.exclusive():
            self.table.save(name, kind, created, refreshed, json.dumps(provenance, sort_keys=True),
                            members)

    def save(self, name: str, *, spec: QuerySpec | None = None, ids: list[int] | None = None,
             replace: bool = False) -> dict:
        """Run ``spec`` (or take ``ids``) and save the result as cohort ``name``."""
        check_name(name)
        if (spec is None) == (ids is None):
            raise InputError("give a query or a list of ids for the cohort (one of them)")
        if not replace and self.table.get(name) is not None:
            raise ConflictError(f"a cohort named {name!r} exists; choose another name or replace "
                                "it (--replace, or \"replace\": true)", setting="name")
        self.app.refresh()
        if spec is not None:
            spec_to_json(spec)  # refuses uploads and files before any work
        members = self._members(spec, ids)
        created = _now()
        kind = "ids" if spec is None else (
            "similar" if all(t.kind == "id" for t in spec.terms) else "search")
        self._write(name, kind, created, None,
                    self._provenance(spec, created), members)
        return self.show(name)

    def diff(self, name: str) -> dict:
        """What a refresh would change: ids that would enter, and ids that would leave
        (no longer matching, or removed from the store)."""
        found = self._get(name)
        old = [i for i, _ in found["members"]]
        new = [i for i, _ in self._rerun(found)]
        kept = set(new)
        return {"entered": [i for i in new if i not in set(old)],
                "left": [i for i in old if i not in kept]}

    def _rerun(self, found: dict) -> list[tuple[int, float | None]]:
        self.app.refresh()
        provenance = json.loads(found["provenance"])
        if provenance.get("query") is not None:
            members = self._members(spec_from_json(provenance["query"]), None)
            have = {i for i, _ in members}
            added = [i for i in provenance.get("added", []) if i not in have]
            present = self.app.store.rows(added) if added else {}
            return members + [(i, None) for i in added if i in present]  # hand-added stay
        present = self.app.store.rows([i for i, _ in found["members"]])
        return [(i, s) for i, s in found["members"] if i in present]

    def refresh(self, name: str) -> dict:
        """Re-run the saved query and save its answer; returns what entered and left."""
        found = self._get(name)
        members = self._rerun(found)
        old = [i for i, _ in found["members"]]
        new_ids = [i for i, _ in members]
        changes = {"entered": [i for i in new_ids if i not in set(old)],
                   "left": [i for i in old if i not in set(new_ids)]}
        refreshed = _now()
        provenance = json.loads(found["provenance"])
        provenance.update(store_rows=self.app.store.count, refreshed=refreshed,
                          medsearch_version=_medsearch_version())
        self._write(found["name"], found["kind"], found["created"], refreshed, provenance, members)
        return {**changes, "cohort": self.show(name)}

    def add(self, name: str, ids: list[int]) -> dict:
        """Add images by id (a cohort of kind "ids" is made when ``name`` is new)."""
        check_name(name)
        self._check_members(list(ids))
        found = self.table.get(name)
        if found is None:
            return self.save(name, ids=list(ids))
        members = list(found["members"])
        have = {i for i, _ in members}
        members += [(int(i), None) for i in dict.fromkeys(ids) if int(i) not in have]
        provenance = json.loads(found["provenance"])
        provenance["added"] = sorted(set(provenance.get("added", [])) | {int(i) for i in ids})
        self._write(name, found["kind"], found["created"], found["refreshed"], provenance, members)
        return self.show(name)

    def delete(self, name: str) -> None:
        self._get(name)
        with self.app.store_lock, self.app.store.exclusive():
            self.table.delete(name)
