"""Qwen2-VL in Flax NNX, numerically equal to the Hugging Face PyTorch model.

from mmret.models import qwen2_vl
model = qwen2_vl.from_hf(hf_dir, dtype=jnp.float32)   # = mmret.models.from_hf
out = model(input_ids=..., attention_mask=..., pixel_values=..., image_grid_thw=...)

Its backbone spec (registered as model_type ``qwen2_vl``) is :data:`mmret.models.qwen2_vl.backbone.BACKBONE`.
"""

from mmret.models.load import from_hf
from mmret.models.params import flat_params
from mmret.models.qwen2_vl.config import Qwen2VLConfig, TextConfig, VisionConfig
from mmret.models.qwen2_vl.model import Qwen2VL, Qwen2VLOutput, abstract, count_params, create

__all__ = [
    "Qwen2VL",
    "Qwen2VLConfig",
    "Qwen2VLOutput",
    "TextConfig",
    "VisionConfig",
    "abstract",
    "count_params",
    "create",
    "flat_params",
    "from_hf",
]
