"""SigLIP's text tokenisation with sentencepiece alone: what transformers' SiglipTokenizer does
for a query (lower case, punctuation removed, whitespace collapsed, sentencepiece pieces, EOS,
truncated and padded to 64), without importing transformers (a second of a first query).

It is used only where it was shown to agree: the ONNX export compares it with transformers'
tokenizer on a battery of texts for that checkpoint and records the outcome. Texts that could
name a special token (``<``) or carry sentencepiece's own space mark go to transformers.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

from .names import TEXT_MAX_LENGTH

SPACE = "\u2581"  # sentencepiece's word-start mark
_PUNCTUATION = str.maketrans("", "", string.punctuation)
#: Texts the battery and the probes cover; compared at export.
BATTERY = ("", " ", "a", "A Chest X-Ray!!", "left   pneumothorax, small.", "Melanoma on the back",
           "ünïcödé Ärztin 123 $%^&*", "x" * 300, "word " * 80, "CT\tabdomen\nwith contrast",
           "l'épanchement pleural", "日本語のテキスト", "e.g. 3.5 cm (approx.)", "  leading spaces",
           "trailing spaces   ", "MRI: T2-weighted, FLAIR", "n° 5 — fracture", "100% occluded")


def recipe_ids(tokenizer, texts, tensors: str = "np"):
    """MedSigLIP's text recipe with transformers' tokenizer: padded to 64 with max_length
    padding, truncated; ids only, no mask (``tensors``: "np" or "pt")."""
    return tokenizer(list(texts), padding="max_length", max_length=TEXT_MAX_LENGTH,
                     truncation=True, return_tensors=tensors)["input_ids"]


class SentencepieceTokens:
    """Token ids of texts, as SiglipTokenizer with padding to 64 and truncation gives them."""

    def __init__(self, folder: Path) -> None:
        import sentencepiece

        config = json.loads((folder / "tokenizer_config.json").read_text())
        if config.get("tokenizer_class") != "SiglipTokenizer":
            raise ValueError(f"not a SiglipTokenizer: {config.get('tokenizer_class')}")
        self.lower = bool(config.get("do_lower_case", True))
        self.sp = sentencepiece.SentencePieceProcessor()
        self.sp.Load(str(folder / "spiece.model"))
        self.unk = str(config.get("unk_token") or "<unk>")
        self.unk_length = len(self.sp.encode(self.unk))
        self.eos = self.sp.piece_to_id(str(config.get("eos_token") or "</s>"))
        self.pad = self.sp.piece_to_id(str(config.get("pad_token") or "</s>"))
        self.specials = {self.unk, str(config.get("eos_token") or "</s>"),
                         str(config.get("pad_token") or "</s>")}

    @staticmethod
    def handles(text: str) -> bool:
        """Texts this class tokenises exactly as transformers does (see the module doc)."""
        return "<" not in text and SPACE not in text

    def _pieces(self, text: str) -> list[str]:
        text = SPACE + text.replace(SPACE, " ")
        if self.lower:
            text = text.lower()
        text = re.sub(r"\s+", " ", text.translate(_PUNCTUATION)).strip()
        pieces = self.sp.encode(self.unk + text, out_type=str)
        pieces = pieces[self.unk_length:] if len(pieces) >= self.unk_length else pieces
        if len(pieces) > 1 and pieces[0] == SPACE and pieces[1] in self.specials:
            pieces = pieces[1:]
        return pieces

    def ids(self, text: str) -> list[int]:
        ids = [self.sp.piece_to_id(p) for p in self._pieces(text)][:TEXT_MAX_LENGTH - 1]
        if not ids or ids[-1] != self.eos:
            ids.append(self.eos)
        return ids + [self.pad] * (TEXT_MAX_LENGTH - len(ids))


def agrees(tokens: SentencepieceTokens, reference, texts) -> bool:
    """Whether ``tokens`` gives transformers' ids (``reference(list) -> list of id lists``)."""
    texts = [t for t in texts if tokens.handles(t)]
    return [tokens.ids(t) for t in texts] == [list(map(int, r)) for r in reference(texts)]
