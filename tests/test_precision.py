"""Precision and device options: int8 / bf16 on CPU stay close to fp32; the recipe on a device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval import acceleration
from retrieval.errors import InputError
from retrieval.model import TextEncoder, VisionEncoder, resolve_checkpoint
from retrieval.preprocess import model_input


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


def test_precision_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    expected = "bf16" if acceleration.cpu_has_native_bf16() else "fp32"
    assert acceleration.resolve_precision("auto", cpu) == expected
    assert acceleration.resolve_precision("INT8", cpu) == "int8"
    with pytest.raises(InputError, match="CPU only"):
        acceleration.resolve_precision("int8", cuda)
    with pytest.raises(InputError, match="must be one of"):
        acceleration.resolve_precision("fp16", cpu)
    assert acceleration.auto_batch_size(cpu) == 8
    assert acceleration.auto_batch_size(cpu, 32) == 32


@pytest.mark.parametrize("shape,dtype", [((300, 200), np.uint16), ((150, 333, 3), np.uint8),
                                         ((500, 500), np.uint8), ((100, 140, 2), np.uint16)])
def test_device_recipe_equals_host_recipe(shape, dtype):
    rng = np.random.default_rng(1)
    pixels = (rng.random(shape) * np.iinfo(dtype).max).astype(dtype)
    on_device = acceleration.device_model_input(pixels, 448, torch.device("cpu"))
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
