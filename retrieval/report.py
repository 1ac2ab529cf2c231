"""Reports people read: the findings page for one image and the evaluation page, as one HTML file.

Every page is self-contained (figures and the preview are PNGs embedded as data URIs), so it
can be mailed or archived as one file. Plots use matplotlib's object API (no pyplot, no
display). Every page carries the research-use notice; no page suggests a treatment.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from .evaluation import majority_vote
from .export import write_file
from .search import Searcher
from .zeroshot import RESEARCH_NOTICE, Bands, Classification, ZeroShotClassifier

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222}
.notice{background:#fff3cd;border:1px solid #e0c36c;padding:.6em 1em;font-weight:600}
.review{background:#fde2e1;border:1px solid #e39a96;padding:.6em 1em}
.ok{background:#e3f4e1;border:1px solid #93c98b;padding:.6em 1em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.band-high{color:#a40000;font-weight:600}.band-moderate{color:#8a5a00}.band-low{color:#555}
img{max-width:100%}
"""


# -- images ----------------------------------------------------------------------------------
def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_png(pixels: np.ndarray) -> bytes:
    """H×W×3 uint8 (e.g. from ``model_input_to_uint8``) → PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def roc_png(curves: dict, title: str = "ROC curves (one-vs-rest)") -> bytes:
    """One line per label from ``evaluation.roc_curves`` output, with its AUC in the legend."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance (AUC 0.5)")
    for label, curve in curves.items():
        ax.plot(curve["fpr"], curve["tpr"], label=f"{label} ({curve['auc']:.3f})")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title,
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize="small", loc="lower right")
    return _figure_png(fig)


def confusion_png(matrix: list[list[int]], labels: list[str],
                  title: str = "Zero-shot confusion matrix (single-label images)") -> bytes:
    from matplotlib.figure import Figure

    m = np.asarray(matrix)
    side = max(4.0, 0.55 * len(labels) + 2)
    fig = Figure(figsize=(side + 1, side))
    ax = fig.add_subplot()
    shown = ax.imshow(m, cmap="Blues")
    fig.colorbar(shown, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize="small")
    ax.set_yticks(range(len(labels)), labels, fontsize="small")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    threshold = m.max() / 2 if m.size else 0
    for (i, j), value in np.ndenumerate(m):
        ax.text(j, i, str(value), ha="center", va="center", fontsize="x-small",
                color="white" if value > threshold else "black")
    return _figure_png(fig)


# -- HTML helpers ----------------------------------------------------------------------------
def _e(value) -> str:
    return html.escape(str(value))


def _num(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>\n"
            f"<p class=\"notice\">{_e(RESEARCH_NOTICE)}</p>\n<h1>{_e(title)}</h1>\n{body}\n"
            f"<p class=\"notice\">{_e(RESEARCH_NOTICE)} Scores are uncalibrated model outputs; "
            f"a qualified reader decides.</p>\n</body></html>\n")


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(rows_cell for rows_cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(path: str | Path, text: str) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_file(path, text.encode("utf-8"), "report")


# -- findings for one image ------------------------------------------------------------------
def reference_labels(metadata: dict) -> list[str]:
    """Labels people gave an indexed image (predicted ones carry a score and are left out)."""
    return [entry["label"] for entry in metadata.get("labels", []) if entry.get("score") is None]


def findings(image_vector: np.ndarray, classifier: ZeroShotClassifier, labels: list[str],
             templates: list[str], *, searcher: Searcher | None = None, k: int = 5, top: int = 5,
             bands: Bands = Bands(), source: str | None = None,
             exclude: set[int] | None = None) -> dict:
    """The findings document: top zero-shot labels with bands, similar cases, the vote, the flag.

    ``exclude``: indexed ids not to count as similar cases (the query image itself, if indexed).
    """
    result: Classification = classifier.classify(image_vector[None, :], labels, templates)[0]
    by_sigmoid = sorted(result.results, key=lambda r: -r.sigmoid)[:top]
    doc = {
        "notice": RESEARCH_NOTICE,
        "source": source,
        "model": classifier.text.checkpoint.name,
        "labels": labels,
        "templates": templates,
        "findings": [{"label": r.label, "sigmoid": round(r.sigmoid, 6),
                      "softmax": round(r.softmax, 6), "band": bands(r.sigmoid)} for r in by_sigmoid],
        "bands": {"moderate": bands.moderate, "high": bands.high},
        "needs_review": result.needs_review,
        "review_reasons": result.review_reasons,
        "entropy": round(result.entropy, 6),
        "margin": round(result.margin, 6),
        "similar": [],
        "majority_vote": None,
    }
    if searcher is not None:
        hits = searcher.by_vector(np.asarray(image_vector, np.float32), k, exclude=exclude)
        doc["similar"] = [{**hit.to_json(), "reference_labels": reference_labels(hit.metadata)}
                          for hit in hits]
        doc["majority_vote"] = majority_vote([tuple(h["reference_labels"]) for h in doc["similar"]])
    return doc


def findings_html(doc: dict, preview_png: bytes | None = None) -> str:
    flag = ("<p class=\"review\"><b>Needs human review:</b> " + _e("; ".join(doc["review_reasons"]))
            + "</p>") if doc["needs_review"] else \
        "<p class=\"ok\">Scores are separated (not flagged for review); still a research output.</p>"
    parts = [f"<p>Source: {_e(doc.get('source') or '–')}<br>Model: {_e(doc['model'])}<br>"
             f"Prompt templates: {_e(', '.join(doc['templates']))}</p>", flag]
    if preview_png:
        parts.append("<h2>What the model sees</h2><p>The padded, resized model input.</p>"
                     f"<img alt=\"model input preview\" src=\"{data_uri(preview_png)}\" width=\"336\">")
    rows = [[f"<td>{_e(f['label'])}</td>", f"<td class=\"num\">{_num(f['sigmoid'])}</td>",
             f"<td class=\"num\">{_num(f['softmax'])}</td>",
             f"<td class=\"band-{_e(f['band'])}\">{_e(f['band'])}</td>"] for f in doc["findings"]]
    parts.append("<h2>Top zero-shot findings</h2>" + _table(
        ["label", "sigmoid (per label)", "softmax (across labels)", "band"], rows))
    parts.append(f"<p>Bands on the sigmoid score: high ≥ {doc['bands']['high']}, moderate ≥ "
                 f"{doc['bands']['moderate']}, else low. Normalised entropy "
                 f"{_num(doc['entropy'])}, top-two margin {_num(doc['margin'])}.</p>")
    if doc["similar"]:
        rows = [[f"<td>{i}</td>", f"<td class=\"num\">{_num(s['score'])}</td>",
                 f"<td>{s['id']}</td>", f"<td>{_e(s['path'])}</td>",
                 f"<td>{_e(', '.join(s['reference_labels']) or '–')}</td>"]
                for i, s in enumerate(doc["similar"], 1)]
        parts.append(f"<h2>{len(doc['similar'])} most similar indexed cases</h2>" + _table(
            ["rank", "cosine", "id", "path", "labels"], rows))
        parts.append(f"<p>Majority vote of their labels: <b>{_e(doc['majority_vote'] or 'none (no labelled neighbours)')}</b></p>")
    return _page("Findings report", "\n".join(parts))


# -- evaluation page -------------------------------------------------------------------------
def eval_figures(result: dict) -> dict[str, bytes]:
    figures = {}
    curves = result["zero_shot"].get("roc_curves") or {}
    if curves:
        figures["roc"] = roc_png(curves, "Zero-shot ROC curves (one-vs-rest)")
    confusion = result["zero_shot"].get("confusion") or {}
    if confusion.get("n"):
        figures["confusion"] = confusion_png(confusion["matrix"], confusion["labels"])
    return figures


def eval_html(result: dict, figures: dict[str, bytes]) -> str:
    zs, tr, sc = result["zero_shot"], result["text_retrieval"], result["similar_cases"]
    ks = [key.split("@")[1] for key in sc if key.startswith("precision@")]
    parts = [f"<p>Manifest: {_e(result.get('manifest', '–'))}<br>Model: {_e(result.get('model', '–'))}"
             f"<br>Images evaluated: {result['n_images']} (failed: {len(result.get('failures', []))})"
             f"<br>Prompt templates: {_e(', '.join(result.get('templates', [])))}</p>"]
    leakage = result.get("leakage")
    if leakage:
        from .leakage import describe

        listed = "".join(f"<li>{_e(path)}</li>" for path in leakage.get("paths", []))
        parts.append(f"<h2>Train/test leakage</h2><p>{_e(describe(leakage))}.</p>"
                     + (f"<ul>{listed}</ul>" if listed else ""))
    rows = [[f"<td>{_e(label)}</td>", f"<td class=\"num\">{result['label_counts'][label]}</td>",
             f"<td class=\"num\">{_num(zs['auc']['per_label'].get(label))}</td>",
             f"<td class=\"num\">{_num(tr['per_label'].get(label, {}).get('ap'))}</td>",
             f"<td class=\"num\">{_num(result.get('linear_probe', {}).get('auc', {}).get('per_label', {}).get(label))}</td>"]
            for label in result["labels"]]
    rows.append(["<td><b>macro</b></td>", "<td></td>", f"<td class=\"num\"><b>{_num(zs['auc']['macro'])}</b></td>",
                 f"<td class=\"num\"><b>{_num(tr['mAP'])}</b></td>",
                 f"<td class=\"num\"><b>{_num(result.get('linear_probe', {}).get('auc', {}).get('macro'))}</b></td>"])
    parts.append("<h2>Per label</h2>" + _table(
        ["label", "images", "zero-shot AUC", "text→image AP", "linear-probe AUC"], rows))
    if zs["auc"]["skipped"]:
        parts.append("<p>No AUC for: " + _e("; ".join(f"{k} ({v})" for k, v in zs["auc"]["skipped"].items())) + "</p>")
    if "roc" in figures:
        parts.append(f"<img alt=\"ROC curves\" src=\"{data_uri(figures['roc'])}\">")
    if "confusion" in figures:
        parts.append(f"<h2>Zero-shot confusion matrix</h2><p>{zs['confusion']['n']} single-label "
                     f"images, accuracy {_num(zs['confusion']['accuracy'])}.</p>"
                     f"<img alt=\"confusion matrix\" src=\"{data_uri(figures['confusion'])}\">")
    recall_rows = [[f"<td>{k}</td>", f"<td class=\"num\">{_num(tr.get(f'recall@{k}'))}</td>",
                    f"<td class=\"num\">{_num(sc.get(f'precision@{k}'))}</td>",
                    f"<td class=\"num\">{_num(sc.get(f'mMV@{k}'))}</td>"] for k in ks]
    parts.append("<h2>Retrieval</h2><p>Text→image: each label's prompt queries all images "
                 f"(mAP {_num(tr['mAP'])}). Similar cases: {_e(sc['protocol'])}, "
                 f"{sc['queries']} queries against {sc['database']} images.</p>" + _table(
                     ["k", "text→image Recall@k", "similar-case precision@k", "mMV@k"], recall_rows))
    probe = result.get("linear_probe")
    if probe:
        if "skipped" in probe:
            parts.append(f"<h2>Linear probe</h2><p>Not run: {_e(probe['skipped'])}</p>")
        else:
            extra = (f", accuracy {_num(probe['accuracy'])}, balanced accuracy "
                     f"{_num(probe['balanced_accuracy'])}") if "accuracy" in probe else ""
            parts.append(f"<h2>Linear probe</h2><p>{_e(probe['estimator'])}, {_e(probe['protocol'])}, "
                         f"{probe['n']} images: macro AUC {_num(probe['auc']['macro'])}{extra}.</p>")
    if result.get("failures"):
        rows = [[f"<td>{_e(f['path'])}</td>", f"<td>{_e(f['reason'])}</td>"] for f in result["failures"]]
        parts.append("<h2>Images not evaluated</h2>" + _table(["path", "reason"], rows))
    return _page("Evaluation report", "\n".join(parts))
