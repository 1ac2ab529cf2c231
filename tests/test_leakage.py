"""Train/test leakage: planted patient, study and near-copy leaks are each counted, clean test
images are not, and `eval --drop-leaks` evaluates without them (a real DICOM store whose
patient keys come from the PHI policy)."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from retrieval.leakage import describe, find_leaks


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_each_planted_leak_is_found_and_clean_images_are_not():
    rng = np.random.default_rng(1)
    vectors = _unit(rng.normal(size=(8, 64))).astype(np.float32)
    vectors[6] = _unit(vectors[1] + rng.normal(scale=0.01, size=64))  # a near-copy of train 1
    splits = ["train", "train", "train", "test", "test", "test", "test", "test"]
    patients = ["A", "B", None, "A", "C", None, "D", None]
    studies = ["s1", "s2", "s3", "s9", "s8", "s3", "s7", None]
    doc = find_leaks(splits, vectors, patient_keys=patients, study_uids=studies)
    assert doc["patient"] == {"count": 1, "positions": [3]}
    assert doc["study"] == {"count": 1, "positions": [5]}
    assert doc["near_duplicate"] == {"count": 1, "positions": [6]}
    assert doc["leaking"] == [3, 5, 6] and doc["leaking_test_images"] == 3
    assert doc["keys_known"] == {"patient": 3, "study": 4}
    assert "3 of 5 test image(s) leak" in describe(doc)
    only = find_leaks(splits, vectors, patient_keys=patients, study_uids=studies,
                      kinds=("patient",))
    assert only["leaking"] == [3] and "near_duplicate" not in only and "study" not in only


def test_eval_flags_a_planted_patient_leak_and_drops_it(tiny_model, tmp_path):
    from medsearch.cli import app

    from .test_query_shape import _dicom_store

    store = _dicom_store(tmp_path, tiny_model, "hash")
    folder = tmp_path / "dicom"
    train = ["p0-0", "p0-1", "p0-2", "p1-0"]
    test = ["p1-1", "p2-0", "p2-1", "p2-2"]  # p1-1: the same patient (and study) as p1-0
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\n" + "".join(
        f"{folder / name}.dcm,{'ab'[i % 2]},{split}\n"
        for i, (name, split) in enumerate([(n, "train") for n in train] + [(n, "test") for n in test])))

    def run(*extra):
        out = CliRunner().invoke(app, ["eval", str(manifest), "--store", str(store), "--out",
                                       str(tmp_path / "r"), "--ks", "1", "--json", *extra])
        assert out.exit_code == 0, out.output
        return json.loads(out.stdout)

    # the tiny random model maps these CT slices to near-identical vectors: patient and study only
    doc = run("--leak-by", "patient,study")
    leak = doc["leakage"]
    assert leak["patient"]["count"] == 1 and leak["study"]["count"] == 1
    assert leak["paths"] == [f"{folder / 'p1-1'}.dcm"] and leak["dropped"] == 0
    assert doc["n_images"] == 8
    assert "Train/test leakage" in (tmp_path / "r" / "eval.html").read_text()
    dropped = run("--leak-by", "patient,study", "--drop-leaks")
    assert dropped["n_images"] == 7 and dropped["leakage"]["dropped"] == 1
    assert dropped["similar_cases"]["queries"] == 3
