"""Qwen2-VL architecture presets and their Hugging Face ``config.json`` dicts.

Pure Python (no torch / transformers import). ``qwen2vl-2b`` and ``qwen2vl-7b`` describe the released
Qwen2-VL-2B / -7B architectures exactly; ``tiny`` and ``small`` are random-weight test models that keep
the real 151,936-entry vocabulary so they work with the real tokenizer.

``hf_config`` returns the flat layout of the Qwen2-VL hub checkpoints: text-model keys at the top level
(``hidden_size``, ``num_hidden_layers``, ``rope_theta``, ``rope_scaling`` with ``mrope_section``, ...)
and a nested ``vision_config``. ``transformers`` 5 reads this layout directly (it moves the top-level
text keys into its ``text_config``); it also gets ``rope_parameters`` (the v5 name) and the vision
``in_channels`` (v5 name of the hub's ``in_chans``) so no key needs translating.
"""

from __future__ import annotations

import copy
from typing import Any

#: Special token ids shared by every preset (they index the real Qwen2-VL tokenizer).
TOKEN_IDS: dict[str, int] = {
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
}

_VISION_QWEN2VL: dict[str, Any] = {
    "depth": 32,
    "embed_dim": 1280,
    "num_heads": 16,
    "mlp_ratio": 4,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "in_chans": 3,
    "hidden_act": "quick_gelu",
}

#: Architecture numbers per preset. ``text`` holds the language model, ``vision`` the ViT; the vision
#: ``hidden_size`` (merger output width) is always the text ``hidden_size`` and is filled in by
#: :func:`hf_config`.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "text": {
            "vocab_size": 151936,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
            "mrope_section": [2, 3, 3],
            "tie_word_embeddings": True,
        },
        "vision": {**_VISION_QWEN2VL, "depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2},
        "dtype": "float32",
    },
    "small": {
        "text": {
            "vocab_size": 151936,
            "hidden_size": 256,
            "intermediate_size": 768,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
            "mrope_section": [4, 6, 6],
            "tie_word_embeddings": True,
        },
        "vision": {**_VISION_QWEN2VL, "depth": 4, "embed_dim": 128, "num_heads": 4, "mlp_ratio": 4},
        "dtype": "float32",
    },
    "qwen2vl-2b": {
        "text": {
            "vocab_size": 151936,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
            "mrope_section": [16, 24, 24],
            "tie_word_embeddings": True,
        },
        "vision": dict(_VISION_QWEN2VL),
        "dtype": "bfloat16",
    },
    "qwen2vl-7b": {
        "text": {
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
            "mrope_section": [16, 24, 24],
            "tie_word_embeddings": False,
        },
        "vision": dict(_VISION_QWEN2VL),
        "dtype": "bfloat16",
    },
}


def hf_config(preset: str) -> dict[str, Any]:
    """Hugging Face ``config.json`` dict (hub Qwen2-VL layout) for ``preset``; a fresh copy each call."""
    if preset not in PRESETS:
        raise KeyError(f"unknown Qwen2-VL preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = copy.deepcopy(PRESETS[preset])
    text, vision = spec["text"], spec["vision"]
    mrope_section = text.pop("mrope_section")
    head_dim, rem = divmod(text["hidden_size"], text["num_attention_heads"])
    if rem or sum(mrope_section) * 2 != head_dim:
        raise ValueError(f"preset {preset!r}: mrope_section {mrope_section} must sum to head_dim/2")
    if vision["embed_dim"] % vision["num_heads"]:
        raise ValueError(f"preset {preset!r}: vision embed_dim must be divisible by num_heads")
    rope_theta = text["rope_theta"]
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        **text,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "max_window_layers": text["num_hidden_layers"],
        "sliding_window": text["max_position_embeddings"],
        "use_sliding_window": False,
        "use_cache": True,
        **TOKEN_IDS,
        "rope_scaling": {"type": "mrope", "mrope_section": list(mrope_section)},
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": rope_theta,
            "mrope_section": list(mrope_section),
        },
        "vision_config": {
            **vision,
            "in_channels": vision["in_chans"],
            "hidden_size": text["hidden_size"],
            "initializer_range": 0.02,
        },
        "torch_dtype": spec["dtype"],
    }
