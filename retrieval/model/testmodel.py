"""A tiny, randomly initialised SigLIP checkpoint made offline, in the standard layout.

Tests, CI and the demo load it through exactly the code path used for MedSigLIP-448, so the
whole product runs without the (gated) real weights. Its rankings mean nothing.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import torch

from .checkpoint import quiet_transformers

FINDINGS = [
    "pneumothorax", "pleural effusion", "cardiomegaly", "atelectasis", "consolidation",
    "pulmonary edema", "lung opacity", "fracture", "nodule", "mass", "pneumonia",
    "melanoma", "nevus", "basal cell carcinoma", "diabetic retinopathy", "glaucoma",
    "tumor tissue", "normal tissue", "hemorrhage", "infarct", "no finding",
]
SITES = ["left", "right", "bilateral", "upper lobe", "lower lobe", "on the back", "on the arm",
         "chest", "abdomen", "brain", "knee", "retina", "skin", "slide"]
TEMPLATES = ["a photo of {}", "a chest x-ray showing {}", "{} on the {}", "an image of {} {}",
             "ct scan with {}", "mri of the {}", "there is {} in the {}", "no evidence of {}"]


def _corpus() -> list[str]:
    lines = []
    for template, finding, site in itertools.product(TEMPLATES, FINDINGS, SITES):
        lines.append(template.format(finding, site) if template.count("{}") == 2
                     else template.format(finding))
    return lines


def train_tokenizer(out_dir: Path, vocab_size: int = 400) -> Path:
    """Train a sentencepiece unigram model on medical phrases; ids follow SigLIP's spiece."""
    import sentencepiece as spm

    prefix = out_dir / "spiece"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def make_test_model(out_dir: str | Path, *, image_size: int = 448, patch_size: int = 32,
                    hidden_size: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny SigLIP (config, safetensors, tokenizer) to ``out_dir``; deterministic in seed."""
    from transformers import SiglipConfig, SiglipModel, SiglipTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        spiece = train_tokenizer(Path(tmp))
        tokenizer = SiglipTokenizer(vocab_file=str(spiece), model_max_length=64)
        tokenizer.save_pretrained(out)
        vocab = len(tokenizer)
    text = dict(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=64,
                pad_token_id=1, eos_token_id=1, bos_token_id=None,
                projection_size=hidden_size)
    vision = dict(hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                  num_hidden_layers=layers, num_attention_heads=2, image_size=image_size,
                  patch_size=patch_size)
    with quiet_transformers():  # SiglipConfig's defaults warn about token ids we override
        config = SiglipConfig(text_config=text, vision_config=vision)
        torch.manual_seed(seed)
        model = SiglipModel(config).eval()
        model.save_pretrained(out)
    (out / "README.md").write_text(
        "Tiny randomly initialised SigLIP made by `medsearch make-test-model`.\n"
        "For tests and demos only: its embeddings and rankings are meaningless.\n"
    )
    return out
