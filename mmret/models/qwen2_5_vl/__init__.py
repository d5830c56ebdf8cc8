"""Qwen2.5-VL in Flax NNX, numerically equal to the Hugging Face PyTorch model.

model = mmret.models.from_hf(hf_dir)   # a directory whose config.json says model_type "qwen2_5_vl"

Its backbone spec (registered as model_type ``qwen2_5_vl``) is
:data:`mmret.models.qwen2_5_vl.backbone.BACKBONE`.
"""

from mmret.models.qwen2_5_vl.config import Qwen2_5_VLConfig, VisionConfig
from mmret.models.qwen2_5_vl.model import Qwen2_5_VL, abstract, create

__all__ = ["Qwen2_5_VL", "Qwen2_5_VLConfig", "VisionConfig", "abstract", "create"]
