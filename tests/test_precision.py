"""Precision and device options: int8 / bf16 on CPU stay close to fp32; ``auto`` never picks a
precision slower than fp32 (measured, cached per machine); the recipe on a device."""

from __future__ import annotations

import json
import os
import logging

import numpy as np
import pytest
import torch

from retrieval.model import acceleration
from retrieval.errors import InputError
from retrieval.model import TextEncoder, VisionEncoder, resolve_checkpoint
from retrieval.model.preprocess import model_input, pad_to_square, resize_square, to_rgb


def cosine(a, b):
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    pixels = [(rng.random((120, 90)) * 65535).astype(np.uint16), rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)]
    return torch.stack([model_input(p, 448) for p in pixels])


def test_int8_quantises_linear_layers_and_stays_close(tiny_model, batch):
    ckpt = resolve_checkpoint(str(tiny_model))
    fp32 = VisionEncoder(ckpt, "cpu", "fp32")
    int8 = VisionEncoder(ckpt, "cpu", "int8")
    assert fp32.precision == "fp32" and int8.precision == "int8"
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert any(isinstance(m, dynamic) for m in int8.model.modules())
    assert not any(type(m) is torch.nn.Linear for m in int8.model.modules())
    assert cosine(fp32.embed_batch(batch), int8.embed_batch(batch)).min() > 0.99
    text32, text8 = TextEncoder(ckpt, "cpu", "fp32"), TextEncoder(ckpt, "cpu", "int8")
    queries = ["left pneumothorax", "a chest x-ray showing cardiomegaly"]
    assert cosine(text32.embed(queries), text8.embed(queries)).min() > 0.99


def test_bf16_on_cpu_runs_and_stays_close(tiny_model, batch):
    ckpt = resolve_checkpoint(str(tiny_model))
    fp32 = VisionEncoder(ckpt, "cpu", "fp32").embed_batch(batch)
    bf16 = VisionEncoder(ckpt, "cpu", "bf16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    out = bf16.embed_batch(batch)
    assert out.dtype == np.float32 and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert cosine(fp32, out).min() > 0.98


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty per-machine cache (its folder is passed as ``cache_dir``) and no decision
    remembered in this process; the CLI's settings point at the same folder."""
    monkeypatch.setattr(acceleration, "_choices", {})
    monkeypatch.setenv("MEDSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "precision.json"


def fake_probe(monkeypatch, fp32_seconds: float, bf16_seconds: float | None) -> list:
    """Stand-in timings for the decision tests; the real probe runs in its own test below."""
    calls = []
    monkeypatch.setattr(acceleration, "_probe_seconds",
                        lambda: calls.append(1) or (fp32_seconds, bf16_seconds))
    return calls


@pytest.mark.parametrize("fp32,bf16,expected", [
    (1.0, 3.0, "fp32"),    # bf16 3× slower (emulated, or AVX512-BF16 without AMX)
    (1.0, 0.9, "fp32"),    # faster, but inside the safety margin
    (1.0, 0.8, "bf16"),    # exactly 1.25× as fast
    (1.0, 0.25, "bf16"),
    (1.0, None, "fp32"),   # bf16 does not run here
])
def test_auto_decision_is_a_function_of_the_measured_times(fp32, bf16, expected):
    precision, reason = acceleration.choose_cpu_precision(fp32, bf16)
    assert precision == expected
    assert ("1.25×" in reason) if bf16 else ("do not run" in reason)


def test_auto_picks_fp32_when_bf16_measures_slower_but_honours_explicit_bf16(fresh_cache, monkeypatch):
    fake_probe(monkeypatch, 0.01, 0.03)
    cpu = torch.device("cpu")
    assert acceleration.resolve_precision("auto", cpu, fresh_cache.parent) == "fp32"
    assert acceleration.resolve_precision("bf16", cpu) == "bf16"
    assert acceleration.resolve_precision("INT8", cpu) == "int8"
    choice = acceleration.precision_choice(cpu, fresh_cache.parent)
    assert choice["precision"] == "fp32" and "0.33×" in choice["reason"]
    assert choice["bf16_gflops"] < choice["fp32_gflops"]


def test_the_real_probe_gives_a_choice_its_own_timings_support(fresh_cache, caplog):
    before = acceleration.measurements
    with caplog.at_level(logging.INFO, logger="retrieval.model.acceleration"):
        choice = acceleration.precision_choice("cpu", fresh_cache.parent)
        again = acceleration.precision_choice("cpu", fresh_cache.parent)
    assert acceleration.measurements == before + 1 and not choice["cached"] and again["cached"]
    assert choice["precision"] in ("fp32", "bf16")  # never int8: it moves the embedding
    fp32, bf16 = choice["fp32_seconds"], choice["bf16_seconds"]
    assert choice["precision"] == acceleration.choose_cpu_precision(fp32, bf16)[0]
    m, k, n = acceleration.PROBE_SHAPE
    assert choice["fp32_gflops"] == pytest.approx(2 * m * k * n / fp32 / 1e9, abs=0.1)
    assert acceleration.resolve_precision("auto", torch.device("cpu"), fresh_cache.parent) == choice["precision"]
    logged = [r.getMessage() for r in caplog.records if "--precision auto" in r.getMessage()]
    assert len(logged) == 1 and choice["precision"] in logged[0]  # once per process


def test_the_decision_is_cached_per_machine_and_reused(fresh_cache, monkeypatch):
    calls = fake_probe(monkeypatch, 0.01, 0.005)
    first = acceleration.precision_choice("cpu", fresh_cache.parent)
    assert first["precision"] == "bf16" and not first["cached"] and len(calls) == 1
    key = first["machine"]
    assert str(torch.get_num_threads()) in key and torch.__version__ in key
    assert set(json.loads(fresh_cache.read_text())["machines"]) == {key}
    monkeypatch.setattr(acceleration, "_choices", {})  # as a new process would start
    second = acceleration.precision_choice("cpu", fresh_cache.parent)
    assert second["cached"] and len(calls) == 1
    assert {k: second[k] for k in ("precision", "fp32_gflops", "bf16_gflops")} == \
        {k: first[k] for k in ("precision", "fp32_gflops", "bf16_gflops")}
    # another machine's entry (here: another thread count) is kept, never used for this one
    assert acceleration.machine_key(1) != acceleration.machine_key(2)
    doc = json.loads(fresh_cache.read_text())
    doc["machines"] = {"other CPU | amx_bf16 | torch 0 | 64 threads": doc["machines"][key]}
    fresh_cache.write_text(json.dumps(doc))
    monkeypatch.setattr(acceleration, "_choices", {})
    assert not acceleration.precision_choice("cpu", fresh_cache.parent)["cached"] and len(calls) == 2
    assert len(json.loads(fresh_cache.read_text())["machines"]) == 2


def test_a_cached_choice_follows_its_own_timings(fresh_cache, monkeypatch):
    calls = fake_probe(monkeypatch, 0.01, 0.005)
    key = acceleration.precision_choice("cpu", fresh_cache.parent)["machine"]
    doc = json.loads(fresh_cache.read_text())
    doc["machines"][key].update(precision="bf16", bf16_seconds=0.03)  # edited by hand
    fresh_cache.write_text(json.dumps(doc))
    monkeypatch.setattr(acceleration, "_choices", {})
    choice = acceleration.precision_choice("cpu", fresh_cache.parent)
    assert choice["cached"] and choice["precision"] == "fp32" and len(calls) == 1


@pytest.mark.parametrize("content", ["{not json", "[]", '{"machines": {"x": 1}}', "",
                                     '{"machines": []}'])
def test_a_corrupt_cache_is_ignored_and_rewritten(fresh_cache, monkeypatch, content):
    calls = fake_probe(monkeypatch, 0.01, 0.03)
    fresh_cache.parent.mkdir(parents=True)
    fresh_cache.write_text(content)
    choice = acceleration.precision_choice("cpu", fresh_cache.parent)
    assert choice["precision"] == "fp32" and not choice["cached"] and len(calls) == 1
    assert json.loads(fresh_cache.read_text())["machines"][choice["machine"]]["precision"] == "fp32"


def test_an_unwritable_cache_never_fails_a_command(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(acceleration, "_choices", {})
    calls = fake_probe(monkeypatch, 0.01, 0.03)
    unwritable = blocker / "cache"  # under a file: no mkdir
    assert acceleration.resolve_precision("auto", torch.device("cpu"), unwritable) == "fp32" and calls
    assert list(tmp_path.iterdir()) == [blocker]


def test_precision_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(InputError, match="CPU only"):
        acceleration.resolve_precision("int8", cuda)
    with pytest.raises(InputError, match="must be one of"):
        acceleration.resolve_precision("fp16", cpu)
    if not torch.cuda.is_available():
        assert acceleration.resolve_precision("auto", cuda) == "fp32"
    assert acceleration.precision_choice("nonsense")["precision"] is None
    assert acceleration.auto_batch_size(cpu) == 8
    assert acceleration.auto_batch_size(cpu, 32) == 32


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_pooling_head_projects_keys_in_one_product(tiny_model, precision):
    """A batch-first MultiheadAttention given batch-major keys projected them with the weight
    expanded once per token (T×C×2C; materialised in bf16: 5.4 GB per batch at full size),
    which made CPU bf16 slower than fp32. One product, and the same numbers as one by one."""
    from torch.profiler import profile

    encoder = VisionEncoder(resolve_checkpoint(str(tiny_model)), "cpu", precision)
    config = encoder.model.config
    tokens, width = (config.image_size // config.patch_size) ** 2, config.hidden_size
    batch = torch.from_numpy(np.random.default_rng(4).uniform(-1, 1, (3, 3, 448, 448)).astype(np.float32))
    with profile(record_shapes=True) as prof:
        together = encoder.embed_batch(batch)
    shapes = {tuple(s) for e in prof.events() for s in e.input_shapes if s}
    assert (tokens, width, 2 * width) not in shapes
    one_by_one = np.concatenate([encoder.embed_batch(batch[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5 if precision == "fp32" else 2e-2)


@pytest.mark.parametrize("shape,dtype", [((300, 200), np.uint16), ((150, 333, 3), np.uint8),
                                         ((500, 500), np.uint8), ((100, 140, 2), np.uint16)])
def test_tensor_recipe_equals_host_recipe(shape, dtype):
    """The recipe's tensor steps (any torch device) give the host recipe's input."""
    rng = np.random.default_rng(1)
    pixels = (rng.random(shape) * np.iinfo(dtype).max).astype(dtype)
    unit = to_rgb(pixels.astype(np.float64) / np.iinfo(dtype).max)
    chw = torch.from_numpy(np.ascontiguousarray(unit.transpose(2, 0, 1)))
    on_device = (resize_square(pad_to_square(chw), 448) * 2.0 - 1.0).to(torch.float32)
    torch.testing.assert_close(on_device, model_input(pixels, 448), atol=1e-6, rtol=0)


def test_batches_stack_grey_as_one_plane_and_embed_the_same(tiny_model):
    rng = np.random.default_rng(3)
    grey = [rng.uniform(-1, 1, (1, 32, 32)).astype(np.float32) for _ in range(2)]
    colour = rng.uniform(-1, 1, (3, 32, 32)).astype(np.float32)
    cpu = torch.device("cpu")
    planes = acceleration.stack_planes(grey, cpu)
    assert planes.shape == (2, 1, 32, 32)
    mixed = acceleration.stack_planes(grey + [colour], cpu)
    expected = np.stack([np.repeat(g, 3, axis=0) for g in grey] + [colour])
    torch.testing.assert_close(mixed, torch.from_numpy(expected))
    encoder = VisionEncoder(resolve_checkpoint(str(tiny_model)), "cpu", "fp32")
    size = encoder.image_size
    grey = [rng.uniform(-1, 1, (1, size, size)).astype(np.float32) for _ in range(2)]
    one_plane = encoder.embed_batch(acceleration.stack_planes(grey, cpu))
    three = encoder.embed_batch(torch.from_numpy(np.stack([np.repeat(g, 3, axis=0) for g in grey])))
    np.testing.assert_allclose(one_plane, three, atol=1e-6)


def test_info_shows_what_auto_picks_and_why(tiny_model, tmp_path, fresh_cache, monkeypatch):
    from typer.testing import CliRunner

    from medsearch.cli import app
    from retrieval.store import Store, manifest_for

    fake_probe(monkeypatch, 0.01, 0.03)
    encoder = VisionEncoder(resolve_checkpoint(str(tiny_model)), "cpu", "fp32")
    Store.create(tmp_path / "store", manifest_for(encoder, "Flat")).close()
    monkeypatch.setenv("MEDSEARCH_DEVICE", "cpu")
    out = CliRunner().invoke(app, ["info", "--store", str(tmp_path / "store"), "--json"])
    assert out.exit_code == 0, out.output
    auto = json.loads(out.stdout)["precision_auto"]
    assert (auto["device"], auto["precision"]) == ("cpu", "fp32") and "0.33×" in auto["reason"]
    assert {"fp32_gflops", "bf16_gflops", "cached", "machine"} <= set(auto)


def test_a_thread_count_set_once_holds_for_towers_loaded_later(tiny_model, monkeypatch):
    monkeypatch.setattr(acceleration, "_threads", None)
    before = torch.get_num_threads()
    try:
        assert acceleration.configure_cpu_threads() == (os.cpu_count() or 1)
        assert acceleration.configure_cpu_threads(1) == 1
        VisionEncoder(resolve_checkpoint(str(tiny_model)), "cpu", "fp32")
        assert torch.get_num_threads() == 1 and acceleration.configure_cpu_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_cuda_bf16_mode_is_a_parameter(tiny_model):
    with pytest.raises(InputError, match="weights, autocast"):
        VisionEncoder(resolve_checkpoint(str(tiny_model)), "cpu", "fp32", cuda_bf16="fp8")
    cpu = torch.device("cpu")
    assert acceleration.input_dtype(cpu, "bf16", "autocast") == torch.bfloat16  # CPU: weights
    cuda = torch.device("cuda")
    assert acceleration.input_dtype(cuda, "bf16", "autocast") == torch.float32
    assert acceleration.input_dtype(cuda, "bf16", "weights") == torch.bfloat16
