"""The command line and its JSON contract (what scripts depend on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from medsearch.cli import main
from medsearch.settings import Settings

from .conftest import add_bad_files

ROOT = Path(__file__).resolve().parents[1]


def cli(capsys, *args) -> tuple[int, dict, str]:
    """Run the real CLI in-process; return (exit code, the one JSON document, stderr)."""
    code = 0
    try:
        main([*args, "--json"])
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got: {out!r}"
    return code, json.loads(lines[0]), err


@pytest.fixture(scope="module")
def indexed(tiny_model, tmp_path_factory):
    from .conftest import PYDICOM_TEST_FILES, write_images
    import shutil

    folder = tmp_path_factory.mktemp("cli") / "images"
    write_images(folder, 6)
    shutil.copy(PYDICOM_TEST_FILES / "CT_small.dcm", folder / "ct")  # no extension: found by DICM
    add_bad_files(folder)
    return folder, folder.parent / "store"


def test_index_search_similar_info_contract(capsys, tiny_model, indexed):
    folder, store = indexed
    code, doc, _ = cli(capsys, "index", str(folder), "--store", str(store), "--model",
                       str(tiny_model), "--workers", "0")
    assert code == 0
    assert {"indexed", "unchanged", "removed", "failed", "failures", "total"} <= set(doc)
    assert (doc["indexed"], doc["failed"], doc["total"]) == (7, 3, 10)
    assert all(set(f) == {"path", "reason"} and f["reason"] for f in doc["failures"])

    code, doc, _ = cli(capsys, "index", str(folder), "--store", str(store), "--workers", "0")
    assert (code, doc["indexed"], doc["unchanged"]) == (0, 0, 7)

    code, doc, _ = cli(capsys, "search", "left pneumothorax", "--store", str(store), "-k", "3")
    assert code == 0 and len(doc["results"]) == 3
    for r in doc["results"]:
        assert set(r) == {"id", "path", "frame", "score", "metadata", "prob"}  # a text query
        assert isinstance(r["id"], int) and isinstance(r["score"], float)
    assert doc["offset"] == 0 and doc["next_offset"] == 3
    assert doc["query_expression"] == '1:"left pneumothorax"'

    code, doc, _ = cli(capsys, "search", "chest", "--store", str(store), "--modality", "CT")
    assert [Path(r["path"]).name for r in doc["results"]] == ["ct"]
    assert doc["results"][0]["metadata"]["modality"] == "CT"

    code, doc, _ = cli(capsys, "similar", str(folder / "img004.jpg"), "--store", str(store), "-k", "2")
    assert Path(doc["results"][0]["path"]).name == "img004.jpg"
    assert doc["results"][0]["score"] >= 0.999

    first = doc["results"][0]["id"]
    code, doc, _ = cli(capsys, "similar", "--id", str(first), "--store", str(store), "-k", "3")
    assert len(doc["results"]) == 3 and first not in [r["id"] for r in doc["results"]]

    code, doc, _ = cli(capsys, "info", "--store", str(store))
    assert (doc["model"], doc["dim"], doc["count"], doc["index_type"]) == (
        str(tiny_model), 32, 7, "Flat")

    # 7 vectors cannot train 64 lists: the chosen type waits, searched exactly meanwhile
    code, doc, _ = cli(capsys, "reindex", "--index-type", "IVF64,SQ8", "--store", str(store))
    assert (code, doc["index_type"], doc["index_in_use"], doc["index_waiting_for"]) == (
        0, "IVF64,SQ8", "Flat", 39 * 64)
    code, doc, _ = cli(capsys, "info", "--store", str(store))
    assert (doc["index_type"], doc["index_in_use"], doc["index_reason"]) == (
        "IVF64,SQ8", "Flat", "chosen by the user")
    code, doc, _ = cli(capsys, "similar", str(folder / "img004.jpg"), "--store", str(store), "-k", "2")
    assert Path(doc["results"][0]["path"]).name == "img004.jpg"
    code, doc, _ = cli(capsys, "reindex", "--index-type", "auto", "--store", str(store))
    assert (code, doc["index_type"], doc["index_waiting_for"]) == (0, "Flat", None)


def test_embed_contract(capsys, tiny_model, indexed):
    folder, _ = indexed
    code, doc, _ = cli(capsys, "embed", "--model", str(tiny_model), "--text", "pleural effusion")
    assert code == 0 and doc["dim"] == 32 and len(doc["vectors"]) == 1
    assert abs(sum(x * x for x in doc["vectors"][0]) - 1) < 1e-5
    code, doc, _ = cli(capsys, "embed", "--model", str(tiny_model), "--image", str(folder / "ct"))
    assert code == 0 and len(doc["vectors"]) == 1 and len(doc["vectors"][0]) == 32


def test_errors_are_one_json_document_and_no_traceback(capsys, tmp_path, tiny_model, indexed):
    folder, store = indexed
    code, doc, err = cli(capsys, "search", "x", "--store", str(tmp_path / "none"))
    assert code == 2 and "no store" in doc["error"] and "Traceback" not in err
    code, doc, err = cli(capsys, "similar", str(folder / "notes.jpg"), "--store", str(store))
    assert code == 2 and "notes.jpg" in doc["error"] and "not a readable image" in doc["error"]
    code, doc, _ = cli(capsys, "search", "x", "--store", str(store), "--date-from", "soon")
    assert code == 2 and "date_from" in doc["error"]
    code, doc, _ = cli(capsys, "similar", "--id", "99999", "--store", str(store))
    assert code == 2 and "99999" in doc["error"]
    code, doc, _ = cli(capsys, "index", str(folder), "--store", str(store), "--model",
                       str(tmp_path))
    assert code == 2 and "config.json" in doc["error"]


def test_gated_model_message_from_a_real_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "medsearch", "embed", "--text", "x"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "Health AI Developer Foundations" in proc.stderr and "--model PATH" in proc.stderr
    assert proc.stdout == ""


def test_default_settings_file_matches_the_code():
    documented = tomllib.loads((ROOT / "config" / "medsearch.toml").read_text())
    defaults = Settings().model_dump()
    assert documented == {k: v for k, v in defaults.items() if v is not None}


def test_settings_file_and_environment_override(tmp_path, monkeypatch):
    from retrieval.errors import InputError

    cfg = tmp_path / "m.toml"
    cfg.write_text('k = 3\nphi_policy = "drop"\n')
    monkeypatch.setenv("MEDSEARCH_CONFIG", str(cfg))
    monkeypatch.setenv("MEDSEARCH_BATCH_SIZE", "32")
    s = Settings.resolve()
    assert (s.k, s.phi_policy, s.batch_size) == (3, "drop", 32)
    cfg.write_text('phi_policy = "publish"\n')
    with pytest.raises(InputError, match="phi_policy"):
        Settings.resolve()


def test_unusable_device_is_named(capsys, tiny_model):
    code, doc, _ = cli(capsys, "embed", "--model", str(tiny_model), "--text", "x", "--device", "gpu0")
    assert code == 2 and "--device" in doc["error"]


@pytest.mark.parametrize("args, message", [
    (["index", ".", "--bogus"], "No such option: --bogus"),
    (["nosuch"], "No such command 'nosuch'"),
    (["search"], "Missing argument"),
])
def test_usage_errors_are_one_line_not_a_traceback(args, message):
    """Whichever click typer brings (0.29 vendors its own), a usage error is a message."""
    proc = subprocess.run([sys.executable, "-m", "medsearch", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and message in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "medsearch", *args, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in json.loads(proc.stdout)["error"]
