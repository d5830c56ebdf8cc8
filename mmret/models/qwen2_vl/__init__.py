"""Qwen2-VL in Flax NNX, numerically equal to the Hugging Face PyTorch model.

from mmret.models import qwen2_vl
model = qwen2_vl.from_hf(hf_dir, dtype=jnp.float32)
out = model(input_ids=..., attention_mask=..., pixel_values=..., image_grid_thw=...)
"""

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
]

from mmret.models.qwen2_vl.hf import flat_params, from_hf  # noqa: E402

__all__ += ["flat_params", "from_hf"]
