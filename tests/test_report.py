"""Findings report and evaluation page: contents, self-contained HTML, embedded figures."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from retrieval.evaluation import majority_vote
from retrieval.report import (confusion_png, eval_figures, eval_html, findings_html, roc_png)
from retrieval.zeroshot import RESEARCH_NOTICE

from .test_zeroshot import build_store

USER_LABELS = {0: ["A"], 1: ["A"], 2: ["B"], 3: ["B", "C"], 4: ["A"], 5: ["B"]}


def embedded_pngs(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data)))
            for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_notice_is_the_cli_notice():
    from medsearch.cli.output import RESEARCH_NOTICE as CLI_NOTICE

    assert RESEARCH_NOTICE == CLI_NOTICE


def test_figures_are_png():
    curves = {"a": {"fpr": [0, 0, 1], "tpr": [0, 1, 1], "auc": 1.0},
              "b": {"fpr": [0, 0.5, 1], "tpr": [0, 0.5, 1], "auc": 0.5}}
    roc = Image.open(io.BytesIO(roc_png(curves)))
    confusion = Image.open(io.BytesIO(confusion_png([[3, 1], [0, 4]], ["a", "b"])))
    assert roc.format == confusion.format == "PNG" and roc.width > 200 and confusion.width > 200


def test_eval_page_is_self_contained_and_escaped():
    from retrieval.evaluation import evaluate
    from retrieval.zeroshot import LogitScalars

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(8, 6)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sets = [("<script>x</script>",), ("b",)] * 4
    labels = ["<script>x</script>", "b"]
    result = evaluate(vectors, sets, labels, np.eye(2, 6), LogitScalars(0.0, 0.0), ks=(1,),
                      probe=False)
    page = eval_html({**result, "failures": []}, eval_figures(result))
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert len(embedded_pngs(page)) == 2 and RESEARCH_NOTICE in page
    assert not re.search(r'(src|href)="(?!data:)', page)


@pytest.fixture(scope="module")
def labelled_store(tiny_model, tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("report"), tiny_model, 6, USER_LABELS)


def test_report_cli_with_store(labelled_store, tiny_model, tmp_path):
    from medsearch.cli import app
    from medsearch.cli.classify import query_input
    from retrieval.model import VisionEncoder
    from retrieval.model.preprocess import model_input_to_uint8
    from retrieval.store import Store

    query = sorted((labelled_store.parent / "images").iterdir())[0]      # image 0, indexed
    html_path = tmp_path / "out" / "report.html"
    out = CliRunner().invoke(app, ["report", str(query), "--store", str(labelled_store), "--out",
                                   str(html_path), "-k", "3", "--top", "4", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)

    # findings: the 4 best sigmoid scores of the cxr preset, with bands and the review flag
    assert len(doc["findings"]) == 4 and doc["preset"] == "cxr"
    sigmoids = [f["sigmoid"] for f in doc["findings"]]
    assert sigmoids == sorted(sigmoids, reverse=True)
    assert all(f["band"] in ("low", "moderate", "high") for f in doc["findings"])
    assert isinstance(doc["needs_review"], bool) and 0.0 <= doc["entropy"] <= 1.0

    # similar cases: computed independently from the stored vectors, the query itself left out
    st = Store.open(labelled_store, readonly=True)
    ids, vectors = st.all_vectors()
    rows = st.rows(ids.tolist())
    st.close()
    own = next(i for i in ids if rows[int(i)]["path"] == str(query))
    tensor = query_input(query, 448)
    vision = VisionEncoder.load(str(tiny_model), device="cpu")
    vector = vision.embed_batch(torch.from_numpy(tensor[None]))[0]
    sims = vectors @ vector
    order = [int(ids[j]) for j in np.argsort(-sims) if int(ids[j]) != own][:3]
    assert [s["id"] for s in doc["similar"]] == order
    expected_labels = [[x["label"] for x in rows[i]["metadata"]["labels"]] for i in order]
    assert [s["reference_labels"] for s in doc["similar"]] == expected_labels
    assert doc["majority_vote"] == majority_vote(expected_labels)

    # the page: self-contained, notice, the preview is exactly the model input
    page = html_path.read_text()
    assert doc["html"] == str(html_path)
    assert page.count(RESEARCH_NOTICE) >= 2 and "treatment" not in page.lower()
    assert not re.search(r'(src|href)="(?!data:)', page)
    (preview,) = embedded_pngs(page)
    np.testing.assert_array_equal(np.asarray(preview.convert("RGB")),
                                  model_input_to_uint8(torch.from_numpy(tensor)))


def test_report_without_store(tiny_model, tmp_path):
    from medsearch.cli import app

    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80), dtype=np.uint8)).save(image)
    out = CliRunner().invoke(app, ["report", str(image), "--model", str(tiny_model),
                                   "--labels", "melanoma,nevus", "--template", "{}"])
    assert out.exit_code == 0, out.output
    assert out.stdout.startswith(RESEARCH_NOTICE) and "melanoma" in out.stdout
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nope.png"), "--model",
                                       str(tiny_model), "--json"])
    assert missing.exit_code != 0 and "no such file" in str(missing.exception)


def test_findings_page_flags_review():
    doc = {"source": "q.png", "model": "m", "templates": ["{}"], "needs_review": True,
           "review_reasons": ["top-two margin 0.010 < 0.1"], "findings": [
               {"label": "pneumothorax", "sigmoid": 0.7, "softmax": 0.51, "band": "high"}],
           "bands": {"moderate": 0.1, "high": 0.5}, "entropy": 0.99, "margin": 0.01,
           "similar": [], "majority_vote": None}
    page = findings_html(doc)
    assert "Needs human review" in page and "margin 0.010" in page and RESEARCH_NOTICE in page
