"""Qwen3-VL (dense) in Flax NNX, numerically equal to the Hugging Face PyTorch model.

model = mmret.models.from_hf(hf_dir)   # a directory whose config.json says model_type "qwen3_vl"

Its backbone spec (registered as model_type ``qwen3_vl``) is :data:`mmret.models.qwen3_vl.backbone.BACKBONE`.
MoE variants (``qwen3_vl_moe``) are not ported.
"""

from mmret.models.qwen3_vl.config import Qwen3VLConfig, TextConfig, VisionConfig
from mmret.models.qwen3_vl.model import Qwen3VL, abstract, create

__all__ = ["Qwen3VL", "Qwen3VLConfig", "TextConfig", "VisionConfig", "abstract", "create"]
