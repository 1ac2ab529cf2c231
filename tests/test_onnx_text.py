"""The text tower exported to ONNX int8 (``text_runtime = "onnx"``): checked, cached by
checkpoint fingerprint, within cosine 0.999 of the transformers tower, and run without torch.
(Loading only the text weights and the int8 cache of the torch tower: tests/test_texttower.py.)"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

QUERIES = ["pleural effusion", "a tiny nodule in the left upper lobe", "KNEE X-RAY, lateral view",
           "Hämatom", "no acute findings"]


def test_onnx_tower_is_exported_once_checked_and_close(tiny_model, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from retrieval.model import resolve_checkpoint
    from retrieval.model.encoders import TextEncoder
    from retrieval.model.onnx_text import OnnxTextEncoder, tower_path

    checkpoint = resolve_checkpoint(str(tiny_model))
    onnx = OnnxTextEncoder(checkpoint, tmp_path)
    path = tower_path(tmp_path, checkpoint)
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left
    tower = TextEncoder(checkpoint, "cpu", "fp32")
    reference = tower.embed(QUERIES)
    got = onnx.embed(QUERIES)
    assert got.shape == reference.shape
    assert np.min(np.sum(got * reference, axis=1)) >= 0.999
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    modified = path.stat().st_mtime_ns
    again = OnnxTextEncoder(checkpoint, tmp_path)  # from the cache: not exported again
    assert path.stat().st_mtime_ns == modified
    assert np.array_equal(again.embed(QUERIES), got)
    # the export found sentencepiece alone to agree with transformers' tokenizer
    assert again.tokens is not None
    for texts in (QUERIES, ["a <unk> token", "</s> written out"]):  # the latter: transformers'
        assert again.token_ids(texts).tolist() == tower.token_ids(texts).tolist()


def test_sentencepiece_tokens_agree_with_transformers(tiny_model):
    import random

    from retrieval.model import resolve_checkpoint
    from retrieval.model.encoders import TextEncoder
    from retrieval.model.siglip_tokens import SentencepieceTokens

    checkpoint = resolve_checkpoint(str(tiny_model))
    reference, tokens = TextEncoder(checkpoint, "cpu", "fp32"), SentencepieceTokens(tiny_model)
    rng = random.Random(7)
    alphabet = "abcdefghijklmXYZ0189 .,;:!?'\"-()[]/\\@#%&*_+=`|\t\néüßçØ日本—°µ>"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90)))
             for _ in range(300)] + ["x " * 100, "", "   "]
    texts = [t for t in texts if tokens.handles(t)]
    assert [tokens.ids(t) for t in texts] == reference.token_ids(texts).tolist()


def test_onnx_search_imports_no_torch(tiny_model, tmp_path, image_folder):
    pytest.importorskip("onnxruntime")
    from .serving import index_store

    store = tmp_path / "store"
    index_store(store, image_folder, tiny_model)
    env = {**os.environ, "MEDSEARCH_TEXT_RUNTIME": "onnx", "MEDSEARCH_CACHE_DIR": str(tmp_path)}
    code = ("import sys, json\nfrom medsearch.cli import main\n"
            "try:\n    main(['search', sys.argv[2], '--store', sys.argv[1], '--json', '-k', '5'])\n"
            "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "print(json.dumps({'torch': 'torch' in sys.modules}), file=sys.stderr)\n")

    def search(query: str, runtime: str) -> tuple[list[int], bool]:
        done = subprocess.run([sys.executable, "-c", code, str(store), query],
                              capture_output=True, text=True, timeout=300,
                              env={**env, "MEDSEARCH_TEXT_RUNTIME": runtime})
        assert done.returncode == 0, done.stderr
        used_torch = json.loads(done.stderr.strip().splitlines()[-1])["torch"]
        return [r["id"] for r in json.loads(done.stdout)["results"]], used_torch

    search("pleural effusion", "onnx")  # exports the tower once (that step needs torch)
    onnx_ids, used_torch = search("a small left pleural effusion", "onnx")  # not cached
    assert used_torch is False
    torch_ids, _ = search("a small left pleural effusion", "torch")
    assert len(set(onnx_ids) & set(torch_ids)) >= 3  # int8 moves scores by ~0.001
