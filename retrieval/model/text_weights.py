"""The text tower from only its own weights: a query needs none of the vision tower's.

``from_pretrained`` reads a whole SigLIP checkpoint (both towers: ~3.5 GB for MedSigLIP-448)
and initialises every weight randomly before overwriting it. Here the tower is built on the
meta device (no memory, no initialisation), and only the ``text_model.*`` tensors are read
from the safetensors files and assigned in place. A checkpoint this cannot read that way
(``.bin`` weights, keys of another layout) is loaded the ordinary way.
"""

from __future__ import annotations

from .checkpoint import Checkpoint, load_tower, quiet_transformers

PREFIX = "text_model."


def load_text_tower(checkpoint: Checkpoint):
    """SiglipTextModel in eval mode, reading only the text weights when it can."""
    from transformers import SiglipTextModel

    files = sorted(checkpoint.path.glob("*.safetensors"))
    if files:
        model = _from_text_weights(checkpoint, files)
        if model is not None:
            return model
    return load_tower(SiglipTextModel, checkpoint)


def _text_config(checkpoint: Checkpoint):
    from transformers import SiglipConfig, SiglipTextConfig

    with quiet_transformers():
        if checkpoint.config.get("model_type") == "siglip":
            config = SiglipConfig.from_pretrained(checkpoint.path).text_config
        else:
            config = SiglipTextConfig.from_pretrained(checkpoint.path)
    config._attn_implementation = "sdpa"  # what from_pretrained picks on CPU and CUDA
    return config


def _from_text_weights(checkpoint: Checkpoint, files: list):
    import torch
    from safetensors import safe_open
    from transformers import SiglipTextModel

    try:
        config = _text_config(checkpoint)
        with torch.device("meta"), quiet_transformers():
            model = SiglipTextModel(config)
        wanted = set(model.state_dict())
        state = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    # the tower's own names carry the prefix or not, by transformers version
                    name = key if key in wanted else key.removeprefix(PREFIX)
                    if key.startswith(PREFIX) and name in wanted:
                        state[name] = handle.get_tensor(key)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except Exception:  # anything unexpected: the ordinary loader says what is wrong
        return None
    if missing or unexpected:
        return None
    for name, buffer in list(model.named_buffers()):
        if not buffer.is_meta:
            continue
        if not name.endswith("position_ids"):  # a buffer we do not know how to rebuild
            return None
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        owner.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand(buffer.shape),
                              persistent=False)
    if any(p.is_meta for p in model.parameters()):
        return None
    return model.float().eval()
