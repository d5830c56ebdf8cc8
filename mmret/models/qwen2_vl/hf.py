"""``from_hf``: a Qwen2-VL Hugging Face directory (safetensors) -> our model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmret.convert.hf import SafetensorsCheckpoint, read_params
from mmret.models.qwen2_vl.config import Qwen2VLConfig, as_dtype
from mmret.models.qwen2_vl.model import Qwen2VL, abstract


def load_into(model_or_abstract: Qwen2VL, ckpt: SafetensorsCheckpoint) -> Qwen2VL:
    """Fill a (possibly abstract) model with the checkpoint's tensors, one at a time."""
    graphdef, state = nnx.split(model_or_abstract)
    flat = dict(nnx.to_flat_state(state))
    target = {path: var.get_value() for path, var in flat.items() if isinstance(var, nnx.Param)}
    cfg = model_or_abstract.cfg
    for path, array in read_params(ckpt, cfg, target, np.dtype(cfg.param_dtype)):
        flat[path].set_value(jnp.asarray(array))
        del array
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def from_hf(hf_dir: str | Path, dtype: Any = jnp.float32, param_dtype: Any | None = None, **options: Any) -> Qwen2VL:
    """Load a Hugging Face Qwen2-VL directory. ``dtype`` is the compute dtype; parameters are stored
    in ``param_dtype`` (default: ``dtype``). Other options: see ``Qwen2VLConfig``."""
    dtype = as_dtype(dtype)
    param_dtype = dtype if param_dtype is None else as_dtype(param_dtype)
    cfg = Qwen2VLConfig.from_hf_dir(hf_dir, dtype=dtype, param_dtype=param_dtype, **options)
    ckpt = SafetensorsCheckpoint(hf_dir)
    return load_into(abstract(cfg), ckpt)


def flat_params(model: Qwen2VL) -> dict[tuple, jax.Array]:
    """Our parameters as a flat dict of path -> array."""
    return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
