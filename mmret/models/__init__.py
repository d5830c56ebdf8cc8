"""Backbones and the heads built on them.

The entry points name no backbone family; they dispatch on the Hugging Face ``model_type``:

    from mmret import models
    model = models.from_hf(hf_dir, dtype="bfloat16")       # config.json's model_type -> its backbone
    model = models.from_preset("tiny", seed=0)
    spec = models.backbone_of(hf_dir)                       # a Backbone: tokens, patching, presets, ...
    spec = models.get("qwen2_vl"); models.names()
"""

from mmret.models.backbone import Backbone, ImagePatching, SpecialTokens, Token
from mmret.models.load import backbone_of, from_hf, from_preset, preset_config
from mmret.models.registry import (
    UnknownBackboneError,
    UnknownPresetError,
    find_preset,
    get,
    names,
    of_config,
    presets,
    register,
    unregister,
)

__all__ = [
    "Backbone",
    "ImagePatching",
    "SpecialTokens",
    "Token",
    "UnknownBackboneError",
    "UnknownPresetError",
    "backbone_of",
    "find_preset",
    "from_hf",
    "from_preset",
    "get",
    "names",
    "of_config",
    "preset_config",
    "presets",
    "register",
    "unregister",
]
