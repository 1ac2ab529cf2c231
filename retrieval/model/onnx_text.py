"""The text tower exported to ONNX and quantised to int8, run with ONNX Runtime.

A text query needs the text tower for one forward pass; with torch and transformers' model
code that costs seconds of imports and loading before it starts. Exported once per checkpoint
(``text_runtime = "onnx"``), the tower is a file in the cache folder, keyed by the checkpoint
fingerprint, that ONNX Runtime loads without torch. The export is checked before it is kept:
on a fixed set of queries each vector must be within ``MIN_COSINE`` of the transformers tower's
(the int8 weights move a vector by about that much; rankings barely change). The graph is
saved already optimised (portable optimisations only), so a process loads it without
optimising it again. Tokenisation is sentencepiece alone (:mod:`.siglip_tokens`) where the
export found it to agree with transformers' SigLIP tokenizer for this checkpoint, else that
tokenizer (which needs no torch, but a second of imports).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint, quiet_transformers
from .siglip_tokens import recipe_ids

#: Raised when the recipe below changes, so old exports are not reused.
EXPORT_VERSION = 2
MIN_COSINE = 0.999
PROBES = ("chest x-ray", "left pneumothorax", "right lower lobe consolidation with effusion",
          "melanoma on the back", "normal brain MRI", "fracture of the distal radius",
          "a CT of the abdomen with contrast", "diabetic retinopathy, severe", "")


def tower_path(cache_folder: Path, checkpoint: Checkpoint) -> Path:
    return Path(cache_folder) / "text-towers" / f"{checkpoint.fingerprint}-v{EXPORT_VERSION}-int8.onnx"


def _tokenizer(checkpoint: Checkpoint):
    """The checkpoint's tokenizer class itself (AutoTokenizer would import torch)."""
    import transformers

    try:
        config = json.loads((checkpoint.path / "tokenizer_config.json").read_text())
        cls = getattr(transformers, str(config.get("tokenizer_class")))
    except (OSError, ValueError, AttributeError):
        cls = transformers.AutoTokenizer
    with quiet_transformers():
        return cls.from_pretrained(checkpoint.path, local_files_only=True)


def _token_ids(tokenizer, texts) -> np.ndarray:
    return np.asarray(recipe_ids(tokenizer, texts), dtype=np.int64)


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def export(checkpoint: Checkpoint, cache_folder: Path) -> tuple[Path, float]:
    """Export, quantise and check the text tower once; (the file, the worst probe cosine).
    Needs torch, transformers and onnx; raises ``RuntimeError`` if the check fails."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .texttower import load_text_model, warnings_quiet

    final = tower_path(cache_folder, checkpoint)
    final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    print(f"medsearch: exporting the text tower of {checkpoint.name} to ONNX int8 (once; "
          f"kept in {final.parent})", file=sys.stderr)
    model = load_text_model(checkpoint)
    tokenizer = _tokenizer(checkpoint)
    ids = _token_ids(tokenizer, PROBES)
    with torch.inference_mode():
        expected = _unit(model(input_ids=torch.from_numpy(ids)).pooler_output.numpy())
    stem = final.with_name(f".{final.stem}.{os.getpid()}")
    plain, quantised = stem.with_suffix(".fp32.onnx"), stem.with_suffix(".int8.onnx")
    optimised = stem.with_suffix(".opt.onnx")
    try:
        with warnings_quiet(), _quiet_root_log():  # tracer and quantiser notes
            torch.onnx.export(model, (torch.from_numpy(ids),), str(plain),
                              input_names=["input_ids"],
                              output_names=["last_hidden_state", "pooler_output"],
                              dynamic_axes={"input_ids": {0: "batch"}}, opset_version=17,
                              dynamo=False)
            quantize_dynamic(str(plain), str(quantised), weight_type=QuantType.QInt8)
        _session(quantised, None, save_optimised=optimised)
        got = _unit(_session(optimised, None).run(["pooler_output"], {"input_ids": ids})[0])
        worst = float(np.min(np.sum(got * expected, axis=1)))
        if worst < MIN_COSINE:
            raise RuntimeError(f"the int8 ONNX text tower moved a probe query's vector to cosine "
                               f"{worst:.5f} (< {MIN_COSINE}); use text_runtime = \"torch\"")
        facts = {"checkpoint": checkpoint.name, "fingerprint": checkpoint.fingerprint,
                 "worst_probe_cosine": worst, "export_version": EXPORT_VERSION,
                 "sentencepiece_tokens": _tokens_agree(checkpoint, tokenizer)}
        final.with_suffix(".json").write_text(json.dumps(facts))  # first: the tower names it
        os.chmod(optimised, 0o600)
        os.replace(optimised, final)  # whole or absent: a kill mid-export leaves no half file
    finally:
        for temp in (plain, quantised, optimised, plain.with_suffix(".onnx.data")):
            temp.unlink(missing_ok=True)
    return final, worst


@contextlib.contextmanager
def _quiet_root_log():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _tokens_agree(checkpoint: Checkpoint, tokenizer) -> bool:
    """Whether sentencepiece alone tokenises as transformers' ``tokenizer`` does for this
    checkpoint."""
    from .siglip_tokens import BATTERY, SentencepieceTokens, agrees

    try:
        return agrees(SentencepieceTokens(checkpoint.path),
                      lambda texts: _token_ids(tokenizer, texts).tolist(), PROBES + BATTERY)
    except Exception:  # another tokenizer class, no spiece.model …: transformers' it is
        return False


def _session(path: Path, threads: int | None, save_optimised: Path | None = None):
    """An ONNX Runtime session; ``save_optimised``: optimise the graph (portable rewrites
    only) and save it there, else load a graph saved that way without optimising again."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    levels = onnxruntime.GraphOptimizationLevel
    if save_optimised is not None:
        options.graph_optimization_level = levels.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(save_optimised)
    else:
        options.graph_optimization_level = levels.ORT_DISABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxTextEncoder:
    """The text tower on ONNX Runtime; the same calls as ``TextEncoder``."""

    device = "cpu"
    precision = "int8"

    def __init__(self, checkpoint: Checkpoint, cache_folder: Path, *,
                 threads: int | None = None) -> None:
        path = tower_path(cache_folder, checkpoint)
        if not path.is_file():
            path, _ = export(checkpoint, cache_folder)
        self.checkpoint = checkpoint
        self.session = _session(path, threads)
        self.dim = int(self.session.get_outputs()[1].shape[-1])
        self._cache: dict[str, np.ndarray] = {}
        self._tokenizer = None  # transformers' SigLIP tokenizer, when it is needed
        self.tokens = None
        try:
            if json.loads(path.with_suffix(".json").read_text()).get("sentencepiece_tokens"):
                from .siglip_tokens import SentencepieceTokens

                self.tokens = SentencepieceTokens(checkpoint.path)
        except (OSError, ValueError, ImportError):
            self.tokens = None

    def token_ids(self, texts: list[str]) -> np.ndarray:
        if self.tokens is not None and all(self.tokens.handles(t) for t in texts):
            return np.asarray([self.tokens.ids(t) for t in texts], dtype=np.int64)
        if self._tokenizer is None:
            self._tokenizer = _tokenizer(self.checkpoint)
        return _token_ids(self._tokenizer, texts)

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        ids = self.token_ids(texts)
        return _unit(self.session.run(["pooler_output"], {"input_ids": ids})[0])

    def embed_cached(self, text: str) -> np.ndarray:
        """One query, remembered for this process (the persistent cache is the store's)."""
        if text not in self._cache:
            if len(self._cache) >= 1024:
                self._cache.pop(next(iter(self._cache)))
            self._cache[text] = self.embed([text])[0]
        return self._cache[text].copy()
