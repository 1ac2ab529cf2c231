"""`forget`: a research participant withdraws consent; their images leave the store for good."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from retrieval.errors import InputError

from .main import app
from .options import DbOpt, JsonOpt, StoreOpt, key_files, open_for_writing, resolve
from .output import emit


def _human(d: dict) -> str:
    who = f"patient {d['patient_key']}" if "patient_key" in d else f"study {d['study_uid']}"
    return (f"forgot {who}: {d['files']} file(s), {d['images']} image(s) and their vectors, "
            f"{d['labels']} label(s), {d['series']} series vector(s) removed from {d['store']}; "
            "later index runs skip their files (reason: withdrawn)")


@app.command("forget")
def forget_cmd(
    patient: Annotated[Optional[str], typer.Option(
        "--patient", help="The patient key shown in results (or a raw PatientID: hashed with "
                          "the store's key, never stored).")] = None,
    study: Annotated[Optional[str], typer.Option("--study", help="A StudyInstanceUID.")] = None,
    store: StoreOpt = None, db: DbOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove a patient's or a study's images, vectors, labels and series vectors, and keep
    them out of later index runs (withdrawn consent)."""
    from retrieval.privacy import forget

    if (patient is None) == (study is None):
        raise InputError("give exactly one of --patient KEY or --study UID")
    cfg = resolve(store=store, db=db)
    with open_for_writing(cfg) as st:
        doc = forget(st, patient=patient, study=study, keys=key_files(cfg))
    emit(doc, json_out, _human)
