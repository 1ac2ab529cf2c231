"""The model layer equals a plain transformers reference built independently of our code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, SiglipTextModel, SiglipVisionModel

from retrieval.errors import ModelUnavailableError
from retrieval.model import TextEncoder, VisionEncoder, resolve_checkpoint
from retrieval.model.preprocess import model_input


def numpy_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """Reference resize: half-pixel centres, no antialiasing, edges clamped (tf.image.resize)."""
    h, w, _ = img.shape

    def coords(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = (np.arange(size) + 0.5) * (n_in / size) - 0.5
        x = np.clip(x, 0, None)
        lo = np.minimum(np.floor(x).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (x - lo)

    y0, y1, fy = coords(h)
    x0, x1, fx = coords(w)
    top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
    bottom = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


def reference_input(pixels: np.ndarray, size: int) -> torch.Tensor:
    depth = 65535.0 if pixels.dtype == np.uint16 else 255.0
    unit = pixels.astype(np.float64) / depth
    if unit.ndim == 2:
        unit = np.repeat(unit[:, :, None], 3, axis=2)
    unit = unit[:, :, :3]
    h, w, _ = unit.shape
    side = max(h, w)
    square = np.zeros((side, side, 3))
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = unit
    resized = numpy_bilinear(square, size)
    return torch.tensor(resized * 2 - 1, dtype=torch.float32).permute(2, 0, 1)


def samples() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [
        rng.integers(0, 256, (300, 180, 3), dtype=np.uint8),        # portrait RGB, downscale
        rng.integers(0, 65536, (120, 160), dtype=np.uint16),        # 16-bit grey, upscale
        rng.integers(0, 256, (97, 97, 4), dtype=np.uint8),          # RGBA, odd size
        rng.integers(0, 256, (50, 700), dtype=np.uint8),            # extreme aspect ratio
    ]


def test_preprocessing_matches_independent_reference(tiny_model):
    for pixels in samples():
        ours = model_input(pixels, 448)
        ref = reference_input(pixels, 448)
        assert ours.shape == (3, 448, 448)
        assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())


def test_padding_is_centred_zero_in_unit_range():
    pixels = np.full((100, 200), 255, np.uint8)
    out = model_input(pixels, 448)
    assert out[:, 0, 224].tolist() == pytest.approx([-1.0] * 3)    # padded band is black
    assert out[:, 224, 224].tolist() == pytest.approx([1.0] * 3)   # image is white
    assert out[:, 110, 224].tolist() == pytest.approx([-1.0] * 3)  # 112 rows of padding above
    assert out[:, 113, 224].tolist() == pytest.approx([1.0] * 3)
    assert out[:, 337, 224].tolist() == pytest.approx([-1.0] * 3)  # … and below


def test_image_embeddings_equal_transformers_reference(tiny_model):
    # fp32 pinned: the reference is fp32, and ``auto`` may pick bf16 on this CPU
    encoder = VisionEncoder.load(str(tiny_model), device="cpu", precision="fp32")
    reference = SiglipVisionModel.from_pretrained(tiny_model).eval()
    images = samples()
    ours = encoder.embed_batch(torch.stack([model_input(p, encoder.image_size) for p in images]))
    with torch.no_grad():
        pooled = reference(pixel_values=torch.stack([reference_input(p, 448) for p in images])).pooler_output
    expected = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    assert ours.dtype == np.float32 and ours.shape == (4, encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_text_embeddings_equal_reference_without_attention_mask(tiny_model):
    encoder = TextEncoder.load(str(tiny_model), device="cpu", precision="fp32")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    reference = SiglipTextModel.from_pretrained(tiny_model).eval()
    texts = ["Left pneumothorax.", "melanoma on the back", "a chest x-ray showing cardiomegaly"]
    encoded = tokenizer(texts, padding="max_length", max_length=64, truncation=True,
                        return_tensors="pt")
    assert "attention_mask" in encoded  # the tokenizer offers a mask by default …
    with torch.no_grad():
        plain = reference(input_ids=encoded["input_ids"]).pooler_output
        masked = reference(**encoded).pooler_output
    expected = torch.nn.functional.normalize(plain, dim=-1).numpy()
    with_mask = torch.nn.functional.normalize(masked, dim=-1).numpy()
    ours = encoder.embed(texts)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    # … and passing it would change the embedding, which is why it is not passed.
    assert np.abs(ours - with_mask).max() > 1e-3
    np.testing.assert_allclose(encoder.embed_cached(texts[0]), ours[0], atol=1e-6)


def test_long_text_is_truncated_to_64_tokens(tiny_model):
    encoder = TextEncoder.load(str(tiny_model), device="cpu")
    ids = encoder.token_ids(["pneumothorax " * 200, "nodule"])
    assert ids.shape == (2, 64)


def test_missing_model_gives_one_clear_message(tmp_path, monkeypatch):
    from huggingface_hub import constants  # the hub library's resolved settings

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelUnavailableError) as err:
        resolve_checkpoint("google/medsiglip-448")
    message = str(err.value)
    assert "Health AI Developer Foundations" in message and "--model PATH" in message
    assert "HF_HUB_OFFLINE" in message
    with pytest.raises(ModelUnavailableError, match="no config.json"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(ModelUnavailableError, match="no such folder"):
        resolve_checkpoint(str(tmp_path / "nope" / "model"))


def test_a_non_siglip_checkpoint_is_refused_clearly(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ModelUnavailableError, match="SigLIP-family"):
        VisionEncoder.load(str(tmp_path), device="cpu")
