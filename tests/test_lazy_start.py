"""Commands that need no model never import torch or transformers (issue 18, lazy start-up).

Each command runs in a fresh process, as a user's shell runs it; the process reports at exit
which of the heavy modules it imported, and the command's output is checked too (right ids,
right counts), so a command cannot pass by failing early.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_images
from tests.serving import index_store

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")
#: Runs the CLI like the console script, then prints the heavy modules it imported (stderr).
WRAPPER = ("import atexit, json, sys\n"
           "atexit.register(lambda: print('HEAVY ' + json.dumps(sorted(m for m in "
           f"{HEAVY!r} if m in sys.modules)), file=sys.stderr))\n"
           "from medsearch.cli import main\n"
           "main(sys.argv[1:])\n")


def run(*args: str) -> tuple[int, str, list[str]]:
    """(exit code, stdout, heavy modules imported) of one CLI process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True,
                          text=True, env=env, timeout=120, cwd=ROOT)
    lines = [line for line in done.stderr.splitlines() if line.startswith("HEAVY ")]
    assert lines, done.stderr
    return done.returncode, done.stdout, json.loads(lines[-1][6:])


@pytest.fixture(scope="module")
def store(tiny_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lazy")
    write_images(root / "images", 10)
    index_store(root / "store", root / "images", tiny_model)
    # the CPU's --precision auto decision is measured once per machine (torch), then cached
    code, out, _ = run("info", "--store", str(root / "store"), "--json")
    assert code == 0, out
    return root / "store"


def _expected_similar(store: Path, image_id: int, k: int) -> list[int]:
    from retrieval.store import Store

    with Store.open(store) as st:
        ids = sorted(st.rows(list(range(0, 1000))))
        vectors = st.vectors(ids)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = unit @ unit[ids.index(image_id)]
    ranked = [ids[i] for i in np.argsort(-scores, kind="stable") if ids[i] != image_id]
    return ranked[:k]


def test_info_imports_no_model_and_reports_the_store(store):
    code, out, heavy = run("info", "--store", str(store), "--json")
    doc = json.loads(out)
    assert code == 0 and heavy == []
    assert doc["count"] == 10 and doc["dim"] == 32 and doc["image_size"] is not None
    assert doc["precision_auto"]["cached"] is True and doc["precision_auto"]["precision"]


def test_similar_by_id_imports_no_model_and_ranks_by_the_stored_vectors(store):
    code, out, heavy = run("similar", "--id", "3", "-k", "4", "--store", str(store), "--json")
    assert code == 0 and heavy == []
    assert [r["id"] for r in json.loads(out)["results"]] == _expected_similar(store, 3, 4)


def test_export_by_id_imports_no_model(store, tmp_path):
    target = tmp_path / "cohort.json"
    code, out, heavy = run("export", "--id", "3", "-k", "4", "--out", str(target),
                           "--store", str(store), "--json")
    assert code == 0 and heavy == [] and json.loads(out)["rows"] == 4
    written = json.loads(target.read_text())
    rows = written["rows"] if isinstance(written, dict) else written
    assert [r["id"] for r in rows] == _expected_similar(store, 3, 4)


def test_cohort_list_and_show_import_no_model(store):
    code, out, _ = run("cohort", "save", "lazy-few", "--ids", "2,5,7", "--store", str(store),
                       "--json")
    assert code == 0, out
    code, out, heavy = run("cohort", "list", "--store", str(store), "--json")
    assert code == 0 and heavy == []
    assert [c["name"] for c in json.loads(out)["cohorts"]] == ["lazy-few"]
    code, out, heavy = run("cohort", "show", "lazy-few", "--store", str(store), "--json")
    assert code == 0 and heavy == [] and sorted(json.loads(out)["ids"]) == [2, 5, 7]


def test_check_imports_no_model(store):
    code, out, heavy = run("check", "--store", str(store), "--json")
    doc = json.loads(out)
    assert code == 0 and heavy == [] and doc["ok"] is True and doc["counts"]["images"] == 10


@pytest.mark.parametrize("args, code", [(("--help",), 0), (("search", "--help"), 0),
                                        (("search",), 2), (("no-such-command",), 2),
                                        (("similar", "--id", "x"), 2)])
def test_help_and_usage_errors_import_no_model(args, code):
    got, out, heavy = run(*args, "--json") if code == 2 else run(*args)
    assert got == code and heavy == []
    if code == 2:
        assert json.loads(out)["type"] == "UsageError"


def test_a_text_search_still_loads_the_model(store):
    """The check above is not vacuous: the same wrapper sees torch when a model is needed."""
    code, out, heavy = run("search", "a chest x-ray", "-k", "2", "--store", str(store), "--json")
    assert code == 0 and "torch" in heavy and len(json.loads(out)["results"]) == 2


def test_the_command_line_starts_without_numpy_or_pydantic_settings():
    """What every command pays before it runs (a served one then only asks the server): no
    numpy (the zero-shot presets and query parsing need none), no pydantic-settings (the
    settings read their environment layer themselves), no store."""
    code = ("import sys, medsearch.cli.main\n"
            "print(sorted(m for m in ('numpy', 'pydantic_settings', 'sqlalchemy', 'faiss', "
            "'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout.replace("'", '"')) == [], done.stderr


def test_settings_read_their_environment_variables_in_any_case(monkeypatch):
    from medsearch.settings import Settings
    from retrieval.errors import InputError

    monkeypatch.setenv("medsearch_k", "4")
    monkeypatch.setenv("MEDSEARCH_Text_Runtime", "onnx")
    monkeypatch.setenv("MEDSEARCH_NO_SUCH_SETTING", "ignored")
    settings = Settings.resolve(device=None)
    assert (settings.k, settings.text_runtime) == (4, "onnx")
    monkeypatch.delenv("medsearch_k")
    monkeypatch.setenv("MEDSEARCH_K", "four")
    with pytest.raises(InputError, match="environment variable MEDSEARCH_K"):
        Settings.resolve()
