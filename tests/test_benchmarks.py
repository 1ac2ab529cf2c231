"""The search benchmarks run from a checkout and print the documented JSON (tiny sizes here;
the figures themselves come from full runs, see benchmarks/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW_FIELDS = {"index", "build_s", "bytes_per_vector", "qps_single", "qps_batch", "recall_at_10"}


def run(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--json"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_search_benchmark_prints_the_contract():
    doc = run("search.py", "--n", "3000", "--queries", "20", "--skip-hnswlib",
              "--indexes", "Flat;HNSW16,SQ8;IVF16,SQ8", "--sweep", "16,32", "--sweep-nprobe", "2")
    assert doc["n"] == 3000 and doc["dim"] == 1152 and doc["default_index"] == "Flat"
    rows = {row["index"]: row for row in doc["rows"]}
    assert {"Flat", "HNSW16,SQ8", "IVF16,SQ8", "numpy"} <= set(rows)
    for row in rows.values():
        assert ROW_FIELDS <= set(row)
    assert rows["Flat"]["recall_at_10"] == 1.0 == rows["numpy"]["recall_at_10"]
    assert rows["Flat"]["filtered_recall_1pct"] == 1.0
    assert [s["ef_search"] for s in rows["HNSW16,SQ8"]["sweep"]] == [16, 32]
    assert [s["nprobe"] for s in rows["IVF16,SQ8"]["sweep"]] == [2]


def test_min_prob_section_measures_recall_against_the_exact_set():
    doc = run("search.py", "--min-prob", "--n", "4000", "--dim", "32", "--queries", "2",
              "--indexes", "HNSW16;Flat")
    assert doc["section"] == "min_prob" and doc["machine"] and "cpu_flags" in doc
    rows = {(row["index"], row["expected_matches"]): row for row in doc["rows"]}
    assert set(rows) == {("HNSW16", 100), ("HNSW16", 1000), ("Flat", 100), ("Flat", 1000)}
    assert rows[("Flat", 1000)]["recall"] == 1.0 and rows[("Flat", 1000)]["precision_is_1"]
    assert all(0.5 < row["recall"] <= 1.0 for row in rows.values())


def test_duplicates_benchmark_finds_the_planted_copies():
    doc = run("duplicates.py", "--n", "3000", "--copies", "30", "--dim", "64")
    assert doc["benchmark"] == "duplicates" and doc["machine"]["cores"]
    assert doc["recall_planted"] == 1.0 and doc["false_pairs"] == 0


def test_store_query_benchmark_runs_through_a_real_store():
    doc = run("store_query.py", "--n", "2000", "--queries", "5")
    assert doc["n"] == 2000 and doc["index"] == "Flat"
    by_filter = {row["filter"]: row for row in doc["rows"]}
    assert set(by_filter) == {"none", "10pct", "1pct"}
    assert all(row["recall_at_10"] == 1.0 for row in by_filter.values())  # exact index
    assert by_filter["1pct"]["matching"] < by_filter["10pct"]["matching"] < 2000


def test_embed_benchmark_measures_the_host_side_alone(tiny_model):
    doc = run("embed.py", "--host-only", "--checkpoint", str(tiny_model), "--images", "16",
              "--unique", "1", "--workers", "1", "--batch-size", "4")
    assert doc["images"] == 16 and doc["workers"] == 1
    assert doc["host_images_per_s"] > 0 and doc["host_main_cpu_ms_per_image"] > 0
    assert doc["decode_frames_per_s_per_worker"] > 0


def test_int8_ceiling_times_the_same_layers_in_both_precisions(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks/ is a checkout folder, not installed
    from benchmarks.embed import linear_layer_seconds

    fp32, int8 = linear_layer_seconds(rows=16, cfg={"hidden_size": 32, "intermediate_size": 64},
                                      repeats=1)
    assert 0 < fp32 < 5 and 0 < int8 < 5


@pytest.mark.slow  # starts its own Ray cluster: ~1 minute on 2 cores
def test_embed_benchmark_compares_the_ray_engine(tiny_model):
    pytest.importorskip("ray", reason="Ray is not installed")
    doc = run("embed.py", "--engine", "ray", "--checkpoint", str(tiny_model), "--images", "8",
              "--unique", "1", "--workers", "1", "--batch-size", "4", "--skip-baseline",
              "--skip-int8", "--skip-text", "--skip-host")
    assert doc["ray_images_per_s"] > 0 and doc["images_per_s"] > 0
    assert "ray_overhead" in doc and doc["ray_actors"] == 1


def test_cli_benchmark_measures_every_command_locally_and_with_a_server(tmp_path):
    doc = run("cli.py", "--n", "300", "--runs", "1", "--cache-dir", str(tmp_path))
    assert {"model", "cores", "flags"} <= set(doc["machine"])
    assert doc["import_time"]["total_s"] > 0 and doc["import_time"]["top"]
    assert {"torch_s", "transformers_s", "faiss_s"} <= set(doc["import_time"])
    tiny = doc["stores"]["tiny"]
    assert tiny["dim"] == 32 and tiny["machine"] == doc["machine"]
    for where in ("local", "server"):
        assert set(tiny[where]) == {"info", "similar_id", "export_id", "classify", "search_text",
                                    "search_repeated"}
        for row in tiny[where].values():
            assert row["median_s"] > 0 and row["peak_rss_mib"] > 0 and len(row["runs_s"]) == 1
    assert set(tiny["local_onnx"]) == {"search_text", "search_repeated"}
    for where in ("local", "local_onnx", "server"):  # how fast the machine was meanwhile
        assert tiny[f"{where}_python_loop_s"] > 0 and tiny[f"{where}_load_average"] >= 0


def test_text_tower_benchmark_prints_the_contract():
    doc = run("text_tower.py", "--runs", "1", "--ways", "int8_cached")
    ways = doc["tiny"]
    assert set(ways) == {"from_pretrained", "int8_cached"}
    for way in ways.values():
        assert {"imports_s", "load_s", "first_query_s", "total_s", "peak_rss_mb"} <= set(way)
    assert ways["from_pretrained"]["min_cosine_to_from_pretrained"] == 1.0
    assert ways["int8_cached"]["min_cosine_to_from_pretrained"] >= 0.99
    assert doc["machine"]["cores"] >= 1
