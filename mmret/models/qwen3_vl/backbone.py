"""Qwen3-VL's backbone spec (registered under the Hugging Face model_type ``qwen3_vl``): the Qwen2 tokenizer
and special tokens, a chat template without a default system turn, Qwen2-VL's position ids for still images,
patch 16 with mean/std 0.5, its own model and presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmret.models.backbone import ImagePatching
from mmret.models.qwen2_vl.backbone import BACKBONE as QWEN2_VL
from mmret.models.qwen2_vl.processor_files import chat_template
from mmret.models.qwen2_vl.processor_files import write_processor_files as _write_files
from mmret.models.qwen3_vl import presets
from mmret.models.qwen3_vl.config import Qwen3VLConfig
from mmret.models.qwen3_vl.model import Qwen3VL

#: Qwen/Qwen3-VL-*-Instruct preprocessor_config.json: size {shortest_edge: 65536, longest_edge: 16777216},
#: patch 16, merge 2, mean and std 0.5.
PATCHING = ImagePatching(
    patch_size=16,
    temporal_patch_size=2,
    merge_size=2,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    min_pixels=65536,
    max_pixels=16777216,
)


def write_processor_files(out_dir: Path, hf: Mapping[str, Any]) -> list[Path]:
    """The offline Qwen2 tokenizer files, a chat template that adds no default system turn (as Qwen3-VL's
    released one) and a ``preprocessor_config.json`` of Qwen3-VL's image settings matching ``hf``'s vision
    config."""
    vision = hf.get("vision_config") or {}
    return _write_files(
        out_dir,
        patch_size=vision.get("patch_size", PATCHING.patch_size),
        temporal_patch_size=vision.get("temporal_patch_size", PATCHING.temporal_patch_size),
        merge_size=vision.get("spatial_merge_size", PATCHING.merge_size),
        processor_class="Qwen3VLProcessor",
        image_mean=PATCHING.image_mean,
        image_std=PATCHING.image_std,
        min_pixels=PATCHING.min_pixels,
        max_pixels=PATCHING.max_pixels,
        template=chat_template(None),
    )


BACKBONE = dataclasses.replace(
    QWEN2_VL,
    model_type="qwen3_vl",
    name="Qwen3-VL",
    config_class=Qwen3VLConfig,
    model_class=Qwen3VL,
    patching=PATCHING,
    presets=tuple(presets.PRESETS),
    test_presets=("qwen3vl-tiny", "qwen3vl-small"),
    preset_config=presets.hf_config,
    hf_model_class="Qwen3VLForConditionalGeneration",
    write_processor_files=write_processor_files,
    default_system_prompt=None,  # Qwen/Qwen3-VL-*-Instruct's chat template adds no system turn
)
