"""Qwen3-VL (dense) architecture presets: ``qwen3vl-2b`` / ``-4b`` / ``-8b`` are the released checkpoints'
config.json numbers (Qwen/Qwen3-VL-2B-Instruct, -4B-Instruct, -8B-Instruct); ``qwen3vl-tiny`` / ``qwen3vl-small``
are random-weight test models on the real 151,936-entry vocabulary (two DeepStack features each).

``hf_config`` returns the hub layout: nested ``text_config`` and ``vision_config`` (``hidden_size`` the ViT
width, ``out_hidden_size`` the LLM width), the token ids and ``tie_word_embeddings`` at the top level.
"""

from __future__ import annotations

import copy
from typing import Any

from mmret.models.qwen2_vl.presets import TOKEN_IDS

_VISION: dict[str, Any] = {
    "depth": 24,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_heads": 16,
    "patch_size": 16,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "in_channels": 3,
    "hidden_act": "gelu_pytorch_tanh",
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [5, 11, 17],
}

_TEXT: dict[str, Any] = {
    "vocab_size": 151936,
    "head_dim": 128,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-6,
    "rope_theta": 5000000.0,
    "max_position_embeddings": 262144,
    "mrope_section": [24, 20, 20],
}

#: Architecture numbers per preset (``text``: the language model, ``vision``: the ViT).
PRESETS: dict[str, dict[str, Any]] = {
    "qwen3vl-tiny": {
        "text": {
            **_TEXT,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 32768,
            "mrope_section": [2, 3, 3],
        },
        "vision": {
            **_VISION,
            "depth": 3,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0, 1],
        },
        "tie_word_embeddings": True,
        "dtype": "float32",
    },
    "qwen3vl-small": {
        "text": {
            **_TEXT,
            "hidden_size": 256,
            "intermediate_size": 768,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "max_position_embeddings": 32768,
            "mrope_section": [6, 5, 5],
        },
        "vision": {
            **_VISION,
            "depth": 4,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_heads": 4,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [1, 2],
        },
        "tie_word_embeddings": True,
        "dtype": "float32",
    },
    "qwen3vl-2b": {
        "text": {
            **_TEXT,
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
        },
        "vision": dict(_VISION),
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
    },
    "qwen3vl-4b": {
        "text": {
            **_TEXT,
            "hidden_size": 2560,
            "intermediate_size": 9728,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
        },
        "vision": dict(_VISION),
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
    },
    "qwen3vl-8b": {
        "text": {
            **_TEXT,
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
        },
        "vision": {
            **_VISION,
            "depth": 27,
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "deepstack_visual_indexes": [8, 16, 24],
        },
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    },
}


def hf_config(preset: str) -> dict[str, Any]:
    """Hugging Face ``config.json`` dict (hub Qwen3-VL layout) for ``preset``; a fresh copy each call."""
    if preset not in PRESETS:
        raise KeyError(f"unknown Qwen3-VL preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = copy.deepcopy(PRESETS[preset])
    text, vision = spec["text"], spec["vision"]
    mrope_section = text.pop("mrope_section")
    if sum(mrope_section) * 2 != text["head_dim"]:
        raise ValueError(f"preset {preset!r}: mrope_section {mrope_section} must sum to head_dim/2")
    rope = {"rope_type": "default", "rope_theta": text["rope_theta"], "mrope_section": list(mrope_section)}
    ids = {
        k: TOKEN_IDS[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    }
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        **ids,
        "tie_word_embeddings": spec["tie_word_embeddings"],
        "text_config": {
            "model_type": "qwen3_vl_text",
            **text,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "bos_token_id": TOKEN_IDS["bos_token_id"],
            "eos_token_id": TOKEN_IDS["eos_token_id"],
            "rope_scaling": {**rope, "mrope_interleaved": True},
            "rope_parameters": {**rope, "mrope_interleaved": True},
            "tie_word_embeddings": spec["tie_word_embeddings"],
            "use_cache": True,
        },
        "vision_config": {
            "model_type": "qwen3_vl",
            **vision,
            "out_hidden_size": text["hidden_size"],
            "initializer_range": 0.02,
        },
        "torch_dtype": spec["dtype"],
    }
