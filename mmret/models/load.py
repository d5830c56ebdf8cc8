"""Building a backbone model without naming its family: from a Hugging Face directory or a preset.

    model = models.from_hf(hf_dir, dtype="bfloat16", param_dtype="float32", scan_layers=True)
    model = models.from_preset("tiny", seed=0, dtype="float32")
    spec = models.backbone_of(hf_dir)          # the directory's config.json -> its Backbone

Both dispatch on the Hugging Face ``model_type`` through :mod:`mmret.models.registry`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmret.models import registry
from mmret.models.backbone import Backbone


def from_hf(
    hf_dir: str | Path,
    dtype: Any = "float32",
    param_dtype: Any | None = None,
    *,
    min_vocab_size: int = 0,
    seed: int = 0,
    **options: Any,
) -> Any:
    """Load a Hugging Face directory (``config.json`` + safetensors) as the backbone its ``model_type``
    names. ``dtype`` is the compute dtype; parameters are stored in ``param_dtype`` (default: ``dtype``).
    A vocabulary smaller than ``min_vocab_size`` (a processor's ``vocab_size`` after adding tokens) is
    grown to it (:func:`mmret.models.vocab.grow_vocab` with ``seed``). Other options: the backbone
    config's run options (``scan_layers``, ``remat``, ``attention_impl``, ``max_image_patches``,
    ``with_lm_head``, ``attention``, ...).

    A thin entry point: it imports :mod:`mmret.convert` when called (models never import the
    conversion code at module level); the loader is :func:`mmret.convert.load.from_hf`. Errors about
    the directory are ``mmret.convert.hf.ConversionError`` naming the file.
    """
    from mmret.convert.load import from_hf as load

    return load(hf_dir, dtype, param_dtype, min_vocab_size=min_vocab_size, seed=seed, **options)


def preset_config(name: str) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict of preset ``name`` (whichever backbone defines it)."""
    return registry.find_preset(name).preset_config(name)


def from_preset(
    name: str, *, seed: int = 0, dtype: Any = "float32", param_dtype: Any | None = None, **options: Any
) -> Any:
    """A randomly initialised model (``seed``) of preset ``name``; dtypes and options as :func:`from_hf`."""
    spec = registry.find_preset(name)
    param_dtype = dtype if param_dtype is None else param_dtype
    return spec.create(spec.config(spec.preset_config(name), dtype=dtype, param_dtype=param_dtype, **options), seed)


def backbone_of(model_dir: str | Path) -> Backbone:
    """The backbone a model directory's ``config.json`` names (``FileNotFoundError`` without one,
    ``mmret.models.registry.UnknownBackboneError`` listing the known model types)."""
    return registry.backbone_of(model_dir)
