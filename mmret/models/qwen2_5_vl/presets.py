"""Qwen2.5-VL architecture presets: ``qwen2.5vl-3b`` / ``qwen2.5vl-7b`` are the released checkpoints'
config.json numbers (Qwen/Qwen2.5-VL-3B-Instruct, -7B-Instruct); ``qwen2.5vl-tiny`` / ``qwen2.5vl-small``
are random-weight test models on the real 151,936-entry vocabulary, with windows small enough that their
test images hold several (56 pixels: 2 x 2 merged tokens) and one full-attention block.

``hf_config`` returns the hub layout: text keys at the top level and a nested ``vision_config`` whose
``hidden_size`` is the ViT width and ``out_hidden_size`` the LLM width the merger projects to.
"""

from __future__ import annotations

import copy
from typing import Any

from mmret.models.qwen2_vl.presets import TOKEN_IDS

_VISION: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "patch_size": 14,
    "spatial_patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "in_chans": 3,
    "hidden_act": "silu",
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
}

_TEST_TEXT: dict[str, Any] = {
    "vocab_size": 151936,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}

#: Architecture numbers per preset (``text``: the language model, ``vision``: the ViT).
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5vl-tiny": {
        "text": {
            **_TEST_TEXT,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "mrope_section": [2, 3, 3],
        },
        "vision": {
            **_VISION,
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_heads": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        "dtype": "float32",
    },
    "qwen2.5vl-small": {
        "text": {
            **_TEST_TEXT,
            "hidden_size": 256,
            "intermediate_size": 768,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "mrope_section": [4, 6, 6],
        },
        "vision": {
            **_VISION,
            "depth": 4,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_heads": 4,
            "window_size": 56,
            "fullatt_block_indexes": [1, 3],
        },
        "dtype": "float32",
    },
    "qwen2.5vl-3b": {
        "text": {
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 128000,
            "mrope_section": [16, 24, 24],
            "tie_word_embeddings": True,
        },
        "vision": dict(_VISION),
        "dtype": "bfloat16",
    },
    "qwen2.5vl-7b": {
        "text": {
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 128000,
            "mrope_section": [16, 24, 24],
            "tie_word_embeddings": False,
        },
        "vision": dict(_VISION),
        "dtype": "bfloat16",
    },
}


def hf_config(preset: str) -> dict[str, Any]:
    """Hugging Face ``config.json`` dict (hub Qwen2.5-VL layout) for ``preset``; a fresh copy each call."""
    if preset not in PRESETS:
        raise KeyError(f"unknown Qwen2.5-VL preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = copy.deepcopy(PRESETS[preset])
    text, vision = spec["text"], spec["vision"]
    mrope_section = text.pop("mrope_section")
    head_dim, rem = divmod(text["hidden_size"], text["num_attention_heads"])
    if rem or sum(mrope_section) * 2 != head_dim:
        raise ValueError(f"preset {preset!r}: mrope_section {mrope_section} must sum to head_dim/2")
    if vision["hidden_size"] % vision["num_heads"]:
        raise ValueError(f"preset {preset!r}: vision hidden_size must be divisible by num_heads")
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
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
            "rope_theta": text["rope_theta"],
            "mrope_section": list(mrope_section),
        },
        "vision_config": {
            **vision,
            "in_channels": vision["in_chans"],
            "out_hidden_size": text["hidden_size"],
            "initializer_range": 0.02,
        },
        "torch_dtype": spec["dtype"],
    }
