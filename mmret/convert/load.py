"""``from_hf``: a Hugging Face model directory (config.json + safetensors) -> our model, for any backbone.

The directory's ``config.json`` names the ``model_type``; the backbone registry
(:mod:`mmret.models.registry`) gives its config and model classes, :mod:`mmret.convert.tables` its
conversion table; the tensors are read one at a time straight into the (abstract) model.
``mmret.models.from_hf`` is the public entry point and calls this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmret.convert import tables
from mmret.convert.hf import ConversionError, SafetensorsCheckpoint, read_params
from mmret.convert.table import ConversionTable
from mmret.models import registry
from mmret.models.backbone import Backbone
from mmret.models.options import as_dtype
from mmret.models.vocab import grow_vocab


def load_into(model_or_abstract: Any, ckpt: SafetensorsCheckpoint, table: ConversionTable) -> Any:
    """Fill a (possibly abstract) model with the checkpoint's tensors, one at a time."""
    graphdef, state = nnx.split(model_or_abstract)
    flat = dict(nnx.to_flat_state(state))
    target = {path: var.get_value() for path, var in flat.items() if isinstance(var, nnx.Param)}
    cfg = model_or_abstract.cfg
    for path, array in read_params(ckpt, table, cfg, target, np.dtype(cfg.param_dtype)):
        flat[path].set_value(jnp.asarray(array))
        del array
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """A model directory's ``config.json`` as a dict; ``ConversionError`` naming the file otherwise."""
    try:
        return registry.read_config_json(hf_dir)
    except FileNotFoundError as e:
        raise ConversionError(
            f"{Path(hf_dir) / 'config.json'}: missing (every model directory needs its config.json)"
        ) from e
    except ValueError as e:
        raise ConversionError(str(e)) from e


def resolve(hf: dict[str, Any], where: str | Path) -> tuple[Backbone, ConversionTable]:
    """The backbone and conversion table a config.json dict's ``model_type`` names; errors name ``where``."""
    try:
        model_type = registry.model_type_of(hf)
        return registry.get(model_type), tables.get(model_type)
    except registry.UnknownBackboneError as e:
        raise ConversionError(f"{where}: {e}") from None


def config_from_hf(spec: Backbone, hf: dict[str, Any], where: str | Path, **options: Any) -> Any:
    """``spec.config(hf, **options)`` with its errors turned into ``ConversionError`` naming ``where``."""
    try:
        return spec.config(hf, **options)
    except (KeyError, TypeError, ValueError) as e:
        msg = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise ConversionError(f"{where}: {msg}") from e


def from_hf(
    hf_dir: str | Path,
    dtype: Any = jnp.float32,
    param_dtype: Any | None = None,
    *,
    min_vocab_size: int = 0,
    seed: int = 0,
    **options: Any,
) -> Any:
    """Load a Hugging Face directory as the backbone its config.json's ``model_type`` names. ``dtype`` is
    the compute dtype; parameters are stored in ``param_dtype`` (default: ``dtype``). A vocabulary
    smaller than ``min_vocab_size`` is grown to it (:func:`mmret.models.vocab.grow_vocab` with
    ``seed``). Other options: the backbone config's run options."""
    dtype = as_dtype(dtype)
    param_dtype = dtype if param_dtype is None else as_dtype(param_dtype)
    ckpt = SafetensorsCheckpoint(hf_dir)  # first: a clear error for a missing directory or pickle-only weights
    where = Path(hf_dir) / "config.json"
    hf = read_hf_config(hf_dir)
    spec, table = resolve(hf, where)
    cfg = config_from_hf(spec, hf, where).replace(dtype=dtype, param_dtype=param_dtype, **options)
    return grow_vocab(load_into(spec.abstract(cfg), ckpt, table), min_vocab_size, seed=seed)
