"""The fast text tower: text weights alone, memory-mapped, equal to ``from_pretrained``'s; the
int8 tower cached by checkpoint fingerprint, corrupt or foreign entries ignored."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import SiglipTextModel

from retrieval.model import TextEncoder, resolve_checkpoint
from retrieval.model import texttower
from retrieval.model.checkpoint import load_tower

TEXTS = ["a chest x-ray showing pneumothorax", "nodule", "glaucoma of the retina",
         "no evidence of fracture on the knee"]


def _vectors(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return torch.nn.functional.normalize(model(input_ids=ids).pooler_output, dim=-1)


def test_fast_loader_gives_the_full_loaders_vectors(tiny_model):
    checkpoint = resolve_checkpoint(str(tiny_model))
    fast = texttower.load_text_fast(checkpoint)
    assert fast is not None
    assert not any(t.is_meta for t in [*fast.parameters(), *fast.buffers()])
    full = load_tower(SiglipTextModel, checkpoint)
    ids = TextEncoder(checkpoint, "cpu", "fp32").token_ids(TEXTS)
    cos = (_vectors(fast, ids) * _vectors(full, ids)).sum(-1)
    assert float(cos.min()) >= 0.99999


def test_fast_loader_reads_only_text_weights(tiny_model):
    checkpoint = resolve_checkpoint(str(tiny_model))
    model = texttower.load_text_fast(checkpoint)
    names = set(model.state_dict())
    assert not any(n.startswith("vision_model") for n in names)
    state = texttower.text_state(checkpoint, names)
    assert state is not None and set(state) == names
    assert texttower.text_state(checkpoint, names | {"not.a.text.weight"}) is None


def test_encoder_uses_the_fast_path_for_safetensors(tiny_model):
    before = dict(texttower.loads)
    encoder = TextEncoder.load(str(tiny_model), device="cpu", precision="fp32")
    assert encoder.loaded_from == "loaded"
    assert texttower.loads.get("safetensors", 0) == before.get("safetensors", 0) + 1
    assert texttower.loads.get("from_pretrained", 0) == before.get("from_pretrained", 0)


def test_bin_checkpoint_falls_back_to_from_pretrained(tiny_model, tmp_path):
    folder = tmp_path / "bin-model"
    shutil.copytree(tiny_model, folder)
    model = SiglipTextModel.from_pretrained(tiny_model)
    from transformers import SiglipModel

    full = SiglipModel.from_pretrained(tiny_model)
    (folder / "model.safetensors").unlink()
    torch.save(full.state_dict(), folder / "pytorch_model.bin")
    checkpoint = resolve_checkpoint(str(folder))
    assert texttower.load_text_fast(checkpoint) is None
    before = texttower.loads.get("from_pretrained", 0)
    encoder = TextEncoder(checkpoint, "cpu", "fp32")
    assert texttower.loads["from_pretrained"] == before + 1
    ids = encoder.token_ids(TEXTS)
    cos = (_vectors(encoder.model, ids) * _vectors(model.eval(), ids)).sum(-1)
    assert float(cos.min()) >= 0.99999


def test_int8_tower_is_cached_and_gives_identical_vectors(tiny_model, tmp_path):
    checkpoint = resolve_checkpoint(str(tiny_model))
    first = TextEncoder(checkpoint, "cpu", "int8", cache_dir=tmp_path)
    entry = texttower.int8_entry(tmp_path, checkpoint)
    assert first.loaded_from == "int8-quantised" and entry.is_file()
    assert entry.stat().st_mode & 0o077 == 0
    second = TextEncoder(checkpoint, "cpu", "int8", cache_dir=tmp_path)
    assert second.loaded_from == "int8-cache"
    assert np.array_equal(first.embed(TEXTS), second.embed(TEXTS))
    fp32 = TextEncoder(checkpoint, "cpu", "fp32").embed(TEXTS)
    assert float((second.embed(TEXTS) * fp32).sum(-1).min()) > 0.99


def test_no_cache_folder_quantises_every_time(tiny_model):
    encoder = TextEncoder.load(str(tiny_model), device="cpu", precision="int8")
    assert encoder.loaded_from == "int8-quantised"


@pytest.mark.parametrize("damage", ["flip", "truncate", "sidecar", "other-fingerprint",
                                    "garbage"])
def test_a_damaged_or_foreign_int8_entry_is_ignored_and_rewritten(tiny_model, tmp_path, damage):
    checkpoint = resolve_checkpoint(str(tiny_model))
    reference = TextEncoder(checkpoint, "cpu", "int8", cache_dir=tmp_path).embed(TEXTS)
    entry = texttower.int8_entry(tmp_path, checkpoint)
    sidecar = entry.with_suffix(".json")
    data = bytearray(entry.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        entry.write_bytes(bytes(data))
    elif damage == "truncate":
        entry.write_bytes(bytes(data[: len(data) // 3]))
    elif damage == "sidecar":
        sidecar.unlink()
    elif damage == "other-fingerprint":
        record = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps({**record, "fingerprint": "0" * 16}))
    else:
        entry.write_bytes(b"not a torch file at all")
        record = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps({**record, "size": len(b"not a torch file at all")}))
    again = TextEncoder(checkpoint, "cpu", "int8", cache_dir=tmp_path)
    assert again.loaded_from == "int8-quantised"
    assert np.array_equal(again.embed(TEXTS), reference)
    third = TextEncoder(checkpoint, "cpu", "int8", cache_dir=tmp_path)
    assert third.loaded_from == "int8-cache"  # the entry was written again


def test_an_unwritable_cache_folder_costs_only_the_cache(tiny_model, tmp_path):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("x")
    encoder = TextEncoder.load(str(tiny_model), device="cpu", precision="int8",
                               cache_dir=blocked)
    assert encoder.loaded_from == "int8-quantised"
    assert encoder.embed(TEXTS).shape == (len(TEXTS), encoder.dim)


def test_a_cached_int8_tower_reads_no_weights_file(tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    checkpoint = resolve_checkpoint(str(folder))
    first = TextEncoder(checkpoint, "cpu", "int8", cache_dir=tmp_path / "cache").embed(TEXTS)
    (folder / "model.safetensors").rename(tmp_path / "weights-away")
    again = TextEncoder(checkpoint, "cpu", "int8", cache_dir=tmp_path / "cache")
    assert again.loaded_from == "int8-cache"
    assert np.array_equal(again.embed(TEXTS), first)
