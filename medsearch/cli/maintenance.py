"""Store upkeep: check (verify everything), repair (rebuild what is derived), backup (online copy)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from retrieval.errors import InputError

from .main import app
from .options import DbOpt, JsonOpt, StoreOpt, open_for_writing, resolve, store_root
from .output import emit

if TYPE_CHECKING:  # SQLAlchemy and the store load when a command opens one
    from retrieval.store import Store


def _model_note(st: Store) -> tuple[list[str], list[str]]:
    """(problems, notes) about the model fingerprint: checked when the checkpoint is here."""
    m = st.manifest
    if m.model_revision != "local" or not Path(m.model).is_dir():
        return [], [f"model {m.model!r} is not a local folder here: its fingerprint was not checked"]
    from retrieval.model import resolve_checkpoint

    try:
        fingerprint = resolve_checkpoint(m.model).fingerprint
    except Exception as exc:  # noqa: BLE001 - any failure to read it is only a note
        return [], [f"model {m.model!r} could not be read ({exc}): fingerprint not checked"]
    if fingerprint != m.model_fingerprint:
        return [f"the checkpoint at {m.model} has changed since the store was built (fingerprint "
                f"{fingerprint} ≠ {m.model_fingerprint}); its vectors no longer match the model: "
                "restore the checkpoint or re-index into a new store"], []
    return [], []


def _check_human(d: dict) -> str:
    lines = [f"{d['store']}: {'ok' if d['ok'] else 'NOT OK'}  "
             + ", ".join(f"{k} {v}" for k, v in d["counts"].items())]
    lines += [f"  problem: {p}" for p in d["problems"]]
    lines += [f"  fixed: {p}" for p in d.get("fixed", [])]
    lines += [f"  dropped (index them again): {p}" for p in d.get("dropped", [])]
    lines += [f"  re-embed: {p}" for p in d.get("reembed", [])[:50]]
    lines += [f"  note: {n}" for n in d.get("notes", [])]
    return "\n".join(lines)


def _finish(doc: dict, json_out: bool) -> None:
    emit(doc, json_out, _check_human)
    if not doc["ok"]:
        # SystemExit, not typer.Exit: the CLI runs click with standalone_mode=False, where
        # click turns Exit into a return value that main() drops
        sys.exit(1)


@app.command("check")
def check_cmd(store: StoreOpt = None, db: DbOpt = None, json_out: JsonOpt = False) -> None:
    """Verify rows against vectors against the index, the checksums and the model fingerprint
    (exit 1 when anything is wrong; nothing is changed)."""
    cfg = resolve(store=store, db=db)
    from retrieval.store import Store

    st = Store.open(store_root(cfg), readonly=True, db=cfg.db)
    doc = st.check()
    problems, notes = _model_note(st)
    doc["problems"] += problems
    doc["ok"] = not doc["problems"]
    doc["notes"] = notes
    _finish(doc, json_out)


@app.command("repair")
def repair_cmd(
    store: StoreOpt = None, db: DbOpt = None,
    drop: Annotated[bool, typer.Option(
        "--drop", help="Delete the sources that must be re-embedded, so the next `index` run "
                       "embeds them again.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Rebuild what is derived (the index file, the manifest's record of it) and list what
    must be re-embedded."""
    with open_for_writing(resolve(store=store, db=db)) as st:
        doc = st.repair(drop=drop)
    _finish(doc, json_out)


@app.command("backup")
def backup_cmd(
    to: Annotated[Path, typer.Option("--to", help="New (or empty) folder for the copy.")],
    store: StoreOpt = None, db: DbOpt = None, json_out: JsonOpt = False,
) -> None:
    """Copy the store while it may be in use (SQLite's backup API; index and manifest of the
    same moment); the copy is checked before this returns."""
    root = store_root(resolve(store=store, db=db))
    if to.resolve() == root.resolve():
        raise InputError("--to must be a different folder from --store")
    from retrieval.store import backup

    _finish(backup(root, to), json_out)
