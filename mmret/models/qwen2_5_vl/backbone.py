"""Qwen2.5-VL's backbone spec (registered under the Hugging Face model_type ``qwen2_5_vl``): Qwen2-VL's
tokenizer, special tokens, image patching and position ids, its own model, presets and processor class."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmret.models.qwen2_5_vl import presets
from mmret.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from mmret.models.qwen2_5_vl.model import Qwen2_5_VL
from mmret.models.qwen2_vl.backbone import BACKBONE as QWEN2_VL
from mmret.models.qwen2_vl.processor_files import write_processor_files as _write_files


def write_processor_files(out_dir: Path, hf: Mapping[str, Any]) -> list[Path]:
    """The offline Qwen2 tokenizer files and a ``preprocessor_config.json`` matching ``hf``'s vision config."""
    vision = hf.get("vision_config") or {}
    return _write_files(
        out_dir,
        patch_size=vision.get("patch_size", 14),
        temporal_patch_size=vision.get("temporal_patch_size", 2),
        merge_size=vision.get("spatial_merge_size", 2),
        processor_class="Qwen2_5_VLProcessor",
    )


BACKBONE = dataclasses.replace(
    QWEN2_VL,
    model_type="qwen2_5_vl",
    name="Qwen2.5-VL",
    config_class=Qwen2_5_VLConfig,
    model_class=Qwen2_5_VL,
    presets=tuple(presets.PRESETS),
    test_presets=("qwen2.5vl-tiny", "qwen2.5vl-small"),
    preset_config=presets.hf_config,
    hf_model_class="Qwen2_5_VLForConditionalGeneration",
    write_processor_files=write_processor_files,
)
