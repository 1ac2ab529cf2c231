"""Zero-shot commands: classify, tag, eval, report (research use only; never a diagnosis).

`classify FILE --store S` asks a running `medsearch serve` for that store when it scores as this
process would (medsearch.cli.remote.classify), so neither tower loads here."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from retrieval.errors import InputError
from retrieval.model import resolve_checkpoint
from retrieval.zeroshot import (PRESETS, Bands, ReviewThresholds, ZeroShotClassifier,
                                read_logit_scalars, resolve_labels)

from . import remote
from .main import app
from .options import (DbOpt, DeviceOpt, JsonOpt, ModelOpt, StoreOpt, open_for_writing, resolve,
                      searcher, store_root, text_encoder, vision_encoder)
from .output import RESEARCH_NOTICE, emit, note
from .remote import LocalOpt

if TYPE_CHECKING:  # the tower imports torch, the store SQLAlchemy, numpy ~40 ms: when used
    import numpy as np

    from retrieval.model import VisionEncoder
    from retrieval.store import Store

LabelsOpt = Annotated[Optional[list[str]], typer.Option(
    "--labels", help="Candidate labels, comma-separated and/or repeated (at least two).")]
PresetOpt = Annotated[Optional[str], typer.Option(
    "--preset", help=f"A built-in label set: {', '.join(PRESETS)}.")]
TemplateOpt = Annotated[Optional[list[str]], typer.Option(
    "--template", help="Prompt template with {} for the label ('{}' = label verbatim); "
                       "repeat for a prompt ensemble (embeddings averaged).")]
MaxEntropyOpt = Annotated[float, typer.Option(
    "--max-entropy", min=0.0, max=1.0, help="Flag for review above this normalised entropy.")]
MinMarginOpt = Annotated[float, typer.Option(
    "--min-margin", min=0.0, max=1.0, help="Flag for review below this top-two softmax margin.")]


def query_input(file: Path, image_size: int, decode: dict | None = None) -> np.ndarray:
    """The model input (3×S×S) of a query file's middle frame, decoded as the indexer does
    (with a store's recorded ``decode`` settings when it is compared with one)."""
    from indexer.view import DecodeSettings, read_image

    return read_image(file, image_size=image_size,
                      settings=DecodeSettings.from_manifest(decode).for_query()).tensor


def embed_query(encoder: VisionEncoder, file: Path,
                decode: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    import torch

    tensor = query_input(file, encoder.image_size, decode)
    return encoder.embed_batch(torch.from_numpy(tensor[None]))[0], tensor


def _classify_human(d: dict) -> str:
    width = max(len(r["label"]) for r in d["results"])
    lines = [RESEARCH_NOTICE, f"{'label':<{width}}  softmax  sigmoid"]
    lines += [f"{r['label']:<{width}}  {r['softmax']:7.4f}  {r['sigmoid']:7.4f}" for r in d["results"]]
    flag = ("NEEDS HUMAN REVIEW: " + "; ".join(d["review_reasons"])) if d["needs_review"] \
        else "scores are separated (not flagged)"
    lines.append(f"normalised entropy {d['entropy']:.3f}, top-two margin {d['margin']:.3f}: {flag}")
    lines.append(RESEARCH_NOTICE)
    return "\n".join(lines)


@app.command("classify")
def classify_cmd(
    file: Annotated[Path, typer.Argument(help="Image or DICOM file.")],
    labels: LabelsOpt = None, preset: PresetOpt = None, template: TemplateOpt = None,
    model: ModelOpt = None, device: DeviceOpt = None,
    max_entropy: MaxEntropyOpt = ReviewThresholds.max_entropy,
    min_margin: MinMarginOpt = ReviewThresholds.min_margin,
    store: StoreOpt = None, db: DbOpt = None, json_out: JsonOpt = False, local: LocalOpt = False,
) -> None:
    """Zero-shot scores of one image: softmax across the labels and a sigmoid per label.

    With --store, a running `medsearch serve` for that store scores it when it would score it
    exactly as here (see --local); the store is not read otherwise."""
    chosen, templates = resolve_labels(labels, preset, template)
    cfg = resolve(model=model, device=device, store=store, db=db)
    if store is not None:
        doc = remote.classify(cfg, store_root(cfg), file, chosen, templates, max_entropy,
                              min_margin, local=local)
        if doc is not None:
            emit(doc, json_out, _classify_human)
            return
    checkpoint = resolve_checkpoint(cfg.model)
    encoder = vision_encoder(cfg, checkpoint)
    vector, _ = embed_query(encoder, file)
    classifier = ZeroShotClassifier(text_encoder(cfg, checkpoint),
                                    read_logit_scalars(checkpoint),
                                    ReviewThresholds(max_entropy, min_margin))
    result = classifier.classify(vector[None, :], chosen, templates)[0]
    emit(result.to_json(), json_out, _classify_human)


@app.command("tag")
def tag_cmd(
    store: StoreOpt = None, db: DbOpt = None, labels: LabelsOpt = None, preset: PresetOpt = None,
    template: TemplateOpt = None,
    min_score: Annotated[float, typer.Option(
        "--min-score", help="Write labels whose sigmoid score is at least this.")] = 0.5,
    source: Annotated[Optional[str], typer.Option(
        "--source", help="Name of this prediction set (default zero-shot:PRESET).")] = None,
    model: ModelOpt = None, device: DeviceOpt = None, json_out: JsonOpt = False,
) -> None:
    """Write zero-shot labels with scores into the store, from the stored vectors."""
    from retrieval.tagging import default_source, tag_store

    chosen, templates = resolve_labels(labels, preset, template)
    cfg = resolve(store=store, db=db, device=device)
    with open_for_writing(cfg) as st:
        text = searcher(cfg, st, model).text_encoder  # checks the store's model
        classifier = ZeroShotClassifier(text, read_logit_scalars(text.checkpoint))
        report = tag_store(st, classifier, chosen, templates, min_score=min_score,
                           source=source or default_source(preset))

    def human(d: dict) -> str:
        lines = [f"tagged {d['images']} image(s) as {d['source']}: {d['written']} label(s) with "
                 f"sigmoid ≥ {d['min_score']} (replaced {d['replaced']} earlier)"]
        lines += [f"  {label}: {n}" for label, n in d["per_label"].items() if n]
        lines.append(RESEARCH_NOTICE)
        return "\n".join(lines)

    emit(report.to_json(), json_out, human)


def _stored_vectors(st: Store, paths: list[str]) -> dict[str, np.ndarray]:
    """path → stored vector (the middle one of the stored frames) for paths already indexed."""
    return st.vectors_for_paths(paths)


def _stored_keys(st: Store, paths: list[str]) -> dict[str, tuple[str | None, str | None]]:
    """path → (patient key, Study Instance UID) of the indexed paths, for the leakage check."""
    out = {}
    for path in paths:
        ids = sorted(st.ids_for_path(path))
        if ids:
            meta = st.rows(ids[:1])[ids[0]]["metadata"]
            out[path] = (meta.get("patient_key"), meta.get("study_uid"))
    return out


def _leakage(kept: list, vectors: dict, keys: dict | None, threshold: float,
             kinds: str) -> dict | None:
    """Train/test leaks of the kept manifest rows (None without a train/test split)."""
    import numpy as np

    from retrieval.leakage import find_leaks

    splits = [r.split for r in kept]
    if not {"train", "test"} <= set(splits):
        return None
    doc = find_leaks(splits, np.stack([vectors[r.path] for r in kept]),
                     patient_keys=[keys.get(r.path, (None, None))[0] for r in kept] if keys is not None else None,
                     study_uids=[keys.get(r.path, (None, None))[1] for r in kept] if keys is not None else None,
                     threshold=threshold,
                     kinds=tuple(k.strip().replace("-", "_") for k in kinds.split(",") if k.strip()))
    doc["paths"] = [kept[i].path for i in doc["leaking"][:200]]
    return doc


def _indexed_ids(st: Store, file: Path) -> set[int]:
    """Ids of the images of ``file`` if it is itself indexed (so it is not its own similar case)."""
    return st.ids_for_path(str(file.expanduser().absolute()))


def _embed_files(encoder: VisionEncoder, paths: list[str], batch_size: int,
                 failures: list[dict], decode: dict | None = None) -> dict[str, np.ndarray]:
    import numpy as np
    import torch

    out: dict[str, np.ndarray] = {}
    pending: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        if pending:
            vectors = encoder.embed_batch(torch.from_numpy(np.stack([t for _, t in pending])))
            out.update({p: v for (p, _), v in zip(pending, vectors)})
            pending.clear()

    for path in paths:
        try:
            pending.append((path, query_input(Path(path), encoder.image_size, decode)))
        except InputError as exc:  # one broken file never costs the others
            failures.append({"path": path, "reason": str(exc).removeprefix(f"{path}: ")})
        if len(pending) >= batch_size:
            flush()
    flush()
    return out


@app.command("eval")
def eval_cmd(
    manifest: Annotated[Path, typer.Argument(help="CSV with columns path,label[,split]; "
                                                  "several labels per image joined by '|'.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for eval.json and eval.html.")],
    store: StoreOpt = None, db: DbOpt = None, model: ModelOpt = None, device: DeviceOpt = None,
    template: TemplateOpt = None,
    preset: Annotated[Optional[str], typer.Option(
        "--preset", help="Use this preset's prompt templates (labels come from the manifest).")] = None,
    ks: Annotated[str, typer.Option("--ks", help="Comma-separated k values for @k metrics.")] = "1,5,10",
    folds: Annotated[int, typer.Option(min=2, help="Cross-validation folds of the linear probe.")] = 5,
    leak_threshold: Annotated[float, typer.Option(
        min=0.5, max=1.0, help="Cosine at which a test image counts as a near-copy of a train image.")] = 0.98,
    leak_by: Annotated[str, typer.Option(
        help="Which leaks to look for: patient, study, near-duplicate (comma-separated).")
    ] = "patient,study,near-duplicate",
    drop_leaks: Annotated[bool, typer.Option(
        "--drop-leaks", help="Evaluate without the test images that leak (same patient, study "
                             "or a near-copy in train).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Zero-shot AUC, text→image and similar-case retrieval, and a linear probe on a labelled set;
    with a train/test split, test images that leak from train are counted (and can be dropped)."""
    import numpy as np

    from retrieval.evaluation import evaluate, read_manifest, vocabulary
    from retrieval.report import eval_figures, eval_html, write_html
    from retrieval.zeroshot import DEFAULT_TEMPLATES, check_template

    try:
        k_values = tuple(sorted({int(k) for k in ks.split(",") if k.strip()}))
    except ValueError:
        raise InputError(f"--ks must be comma-separated whole numbers, got {ks!r}") from None
    if not k_values or min(k_values) < 1:
        raise InputError(f"--ks needs positive numbers, got {ks!r}")
    if preset is not None and preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    templates = [check_template(t) for t in (template or (PRESETS[preset].templates if preset
                                                          else DEFAULT_TEMPLATES))]
    rows = read_manifest(manifest)
    cfg = resolve(model=model, device=device, db=db)
    started = time.perf_counter()
    failures: list[dict] = []
    vectors: dict[str, np.ndarray] = {}
    decode, keys = None, None
    if store is not None:
        from retrieval.store import Store

        st = Store.open(store, readonly=True, db=cfg.db)
        found = searcher(cfg, st, model)
        vectors = _stored_vectors(st, [r.path for r in rows])
        keys = _stored_keys(st, [r.path for r in rows])
        decode = st.manifest.decode
        get_text = lambda: found.text_encoder  # noqa: E731
        get_vision = lambda: found.vision_encoder  # noqa: E731
    else:
        checkpoint = resolve_checkpoint(cfg.model)
        get_text = lambda: text_encoder(cfg, checkpoint)  # noqa: E731
        get_vision = lambda: vision_encoder(cfg, checkpoint)  # noqa: E731
    from_store = len(vectors)
    missing = [r.path for r in rows if r.path not in vectors]
    if missing:
        note(f"embedding {len(missing)} image(s) not in the store")
        vectors.update(_embed_files(get_vision(), missing, cfg.batch_size, failures, decode))
    kept = [r for r in rows if r.path in vectors]
    leakage = _leakage(kept, vectors, keys, leak_threshold, leak_by)
    if leakage is not None:
        leakage["dropped"] = 0
        if drop_leaks and leakage["leaking"]:
            leaking = set(leakage["leaking"])
            kept = [r for i, r in enumerate(kept) if i not in leaking]
            leakage["dropped"] = len(leaking)
    elif drop_leaks:
        raise InputError(f"{manifest}: --drop-leaks needs a split column with train and test rows")
    labels = vocabulary([r.labels for r in kept])
    if len(kept) < 2 or len(labels) < 2:
        raise InputError(f"{manifest}: need at least two usable images and two labels to evaluate "
                         f"(usable images {len(kept)}, labels {len(labels)}, failed {len(failures)})")
    text = get_text()
    classifier = ZeroShotClassifier(text, read_logit_scalars(text.checkpoint))
    splits = [r.split for r in kept] if any(r.split for r in kept) else None
    result = evaluate(np.stack([vectors[r.path] for r in kept]), [r.labels for r in kept], labels,
                      classifier.label_vectors(labels, templates), classifier.scalars,
                      splits=splits, ks=k_values, folds=folds)
    result.update({"manifest": str(manifest), "model": text.checkpoint.name,
                   "templates": templates, "ks": list(k_values), "from_store": from_store,
                   "embedded": len(kept) - min(from_store, len(kept)), "failures": failures,
                   "seconds": round(time.perf_counter() - started, 3), "notice": RESEARCH_NOTICE,
                   "leakage": leakage})
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "eval.json", out / "eval.html"
    json_path.write_text(json.dumps(result, indent=2))
    write_html(html_path, eval_html(result, eval_figures(result)))
    summary = {k: v for k, v in result.items()}
    summary["zero_shot"] = {k: v for k, v in result["zero_shot"].items() if k != "roc_curves"}
    summary.update({"json": str(json_path), "html": str(html_path)})

    def human(d: dict) -> str:
        tr, sc, zs = d["text_retrieval"], d["similar_cases"], d["zero_shot"]["auc"]
        probe = d.get("linear_probe", {})
        fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        lines = [RESEARCH_NOTICE,
                 f"{d['n_images']} image(s), {len(d['labels'])} label(s), failed {len(d['failures'])}",
                 f"zero-shot macro AUC {fmt(zs['macro'])}"]
        lines += [f"  {label}: {fmt(auc)}" for label, auc in zs["per_label"].items()]
        lines.append("text→image " + ", ".join(f"R@{k} {fmt(tr[f'recall@{k}'])}" for k in d["ks"])
                     + f", mAP {fmt(tr['mAP'])}")
        lines.append(f"similar cases ({sc['protocol']}) " + ", ".join(
            f"P@{k} {fmt(sc[f'precision@{k}'])} mMV@{k} {fmt(sc[f'mMV@{k}'])}" for k in d["ks"]))
        if "skipped" in probe:
            lines.append(f"linear probe: not run ({probe['skipped']})")
        elif probe:
            lines.append(f"linear probe ({probe['protocol']}) macro AUC {fmt(probe['auc']['macro'])}"
                         + (f", accuracy {fmt(probe['accuracy'])}" if "accuracy" in probe else ""))
        if d.get("leakage"):
            from retrieval.leakage import describe

            lines.append(describe(d["leakage"]))
        lines.append(f"wrote {d['json']} and {d['html']}")
        return "\n".join(lines)

    emit(summary, json_out, human)


@app.command("report")
def report_cmd(
    file: Annotated[Path, typer.Argument(help="Image or DICOM file.")],
    store: StoreOpt = None, db: DbOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the HTML page here.")] = None,
    labels: LabelsOpt = None, preset: PresetOpt = None, template: TemplateOpt = None,
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="Similar cases to show.")] = 5,
    top: Annotated[int, typer.Option("--top", min=1, help="Findings to show.")] = 5,
    model: ModelOpt = None, device: DeviceOpt = None,
    max_entropy: MaxEntropyOpt = ReviewThresholds.max_entropy,
    min_margin: MinMarginOpt = ReviewThresholds.min_margin,
    json_out: JsonOpt = False,
) -> None:
    """Findings report for one image: top zero-shot findings, similar cases, review flag.

    Labels default to the cxr preset; --labels or --preset choose others.
    """
    from retrieval.model.preprocess import model_input_to_uint8
    from retrieval.report import findings, findings_html, image_png, write_html

    if not labels and not preset:
        preset = "cxr"
    chosen, templates = resolve_labels(labels, preset, template)
    cfg = resolve(model=model, device=device, db=db)
    found, exclude = None, None
    if store is not None:
        from retrieval.store import Store

        found = searcher(cfg, Store.open(store, readonly=True, db=cfg.db), model)
        text, vision = found.text_encoder, found.vision_encoder
        exclude = _indexed_ids(found.store, file)
    else:
        checkpoint = resolve_checkpoint(cfg.model)
        text = text_encoder(cfg, checkpoint)
        vision = vision_encoder(cfg, checkpoint)
    vector, tensor = embed_query(vision, file, found.store.manifest.decode if found else None)
    classifier = ZeroShotClassifier(text, read_logit_scalars(text.checkpoint),
                                    ReviewThresholds(max_entropy, min_margin))
    doc = findings(vector, classifier, chosen, templates, searcher=found, k=k, top=top,
                   bands=Bands(), source=str(file), exclude=exclude)
    doc["preset"] = preset
    if out is not None:
        import torch

        preview = image_png(model_input_to_uint8(torch.from_numpy(tensor)))
        doc["html"] = str(write_html(out, findings_html(doc, preview)))

    def human(d: dict) -> str:
        lines = [RESEARCH_NOTICE, f"findings for {d['source']} (sigmoid per label, band):"]
        lines += [f"  {f['label']}: {f['sigmoid']:.4f} ({f['band']}), softmax {f['softmax']:.4f}"
                  for f in d["findings"]]
        lines.append("NEEDS HUMAN REVIEW: " + "; ".join(d["review_reasons"]) if d["needs_review"]
                     else "scores are separated (not flagged for review)")
        if d["similar"]:
            lines.append(f"{len(d['similar'])} most similar indexed cases:")
            lines += [f"  {s['score']:.4f}  id={s['id']}  {s['path']}  "
                      f"[{', '.join(s['reference_labels']) or 'no labels'}]" for s in d["similar"]]
            lines.append(f"majority vote: {d['majority_vote'] or 'none (no labelled neighbours)'}")
        if d.get("html"):
            lines.append(f"wrote {d['html']}")
        lines.append(RESEARCH_NOTICE)
        return "\n".join(lines)

    emit(doc, json_out, human)
