"""``from_hf``: a Qwen2-VL Hugging Face directory (safetensors) -> our model; ``grow_vocab`` for added tokens.

``grow_vocab`` appends token-embedding rows (and rows of an untied ``lm_head``) as
``transformers.PreTrainedModel.resize_token_embeddings(n)`` does by default (``mean_resizing=True``, checked
in transformers 5.24): each new row is drawn from a normal with the old rows' mean and covariance scaled by
1e-9 (computed in float32), or is the mean where that covariance is not positive definite. The draw is
seeded (numpy), so a grown model is reproducible; it differs from torch's draw only by noise of about
3e-5 standard deviations around the mean. Only growth: a table with rows to spare is left as is
(U-MARVEL's own ``resize_token_embeddings(len(tokenizer))`` would truncate Qwen2-VL's padded rows, which
changes no embedding of a token the tokenizer can emit).
"""

from __future__ import annotations

import dataclasses
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


def from_hf(
    hf_dir: str | Path,
    dtype: Any = jnp.float32,
    param_dtype: Any | None = None,
    *,
    min_vocab_size: int = 0,
    seed: int = 0,
    **options: Any,
) -> Qwen2VL:
    """Load a Hugging Face Qwen2-VL directory. ``dtype`` is the compute dtype; parameters are stored
    in ``param_dtype`` (default: ``dtype``). A vocabulary smaller than ``min_vocab_size`` (say a
    processor's ``vocab_size`` after adding tokens) is grown to it (:func:`grow_vocab` with ``seed``).
    Other options: see ``Qwen2VLConfig``."""
    dtype = as_dtype(dtype)
    param_dtype = dtype if param_dtype is None else as_dtype(param_dtype)
    ckpt = SafetensorsCheckpoint(hf_dir)  # first: a clear error for a missing directory or pickle-only weights
    cfg = Qwen2VLConfig.from_hf_dir(hf_dir, dtype=dtype, param_dtype=param_dtype, **options)
    return grow_vocab(load_into(abstract(cfg), ckpt), min_vocab_size, seed=seed)


#: Where the token embedding [vocab, hidden] and an untied LM head's kernel [hidden, vocab] live.
EMBED_PATH: tuple[str, ...] = ("language_model", "embed_tokens", "embedding")
LM_HEAD_PATH: tuple[str, ...] = ("lm_head", "kernel")


def mean_resized_rows(rows: np.ndarray, added: int, rng: np.random.Generator) -> np.ndarray:
    """``rows`` [n, d] and ``added`` new rows after them, drawn as transformers' mean resizing draws them
    (module docstring); the result keeps ``rows``' dtype."""
    old = np.asarray(rows, dtype=np.float32)
    mean = old.mean(axis=0)
    centered = old - mean
    covariance = (centered.T @ centered / old.shape[0]).astype(np.float64)
    try:
        scale = np.linalg.cholesky(1e-9 * covariance)
        new = mean + rng.standard_normal((added, old.shape[1])) @ scale.T
    except np.linalg.LinAlgError:  # not positive definite: the mean alone
        new = np.broadcast_to(mean, (added, old.shape[1]))
    return np.concatenate([np.asarray(rows), new.astype(np.asarray(rows).dtype)])


def grow_vocab(model: Qwen2VL, vocab_size: int, *, seed: int = 0) -> Qwen2VL:
    """``model`` with ``vocab_size`` token-embedding rows (and untied ``lm_head`` columns) when it has
    fewer, the new ones drawn from ``seed`` (module docstring); otherwise ``model`` itself."""
    cfg = model.cfg
    added = vocab_size - cfg.text.vocab_size
    if added <= 0:
        return model
    grown = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=vocab_size))
    graphdef, state = nnx.split(abstract(grown))
    flat = dict(nnx.to_flat_state(state))
    source = dict(nnx.to_flat_state(nnx.state(model)))
    rng = np.random.default_rng(seed)
    for path, var in flat.items():
        value = source.pop(path).get_value()
        if path == EMBED_PATH:
            value = jnp.asarray(mean_resized_rows(np.asarray(value), added, rng))
        elif path == LM_HEAD_PATH:
            value = jnp.asarray(mean_resized_rows(np.asarray(value).T, added, rng).T)
        var.set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def flat_params(model: Qwen2VL) -> dict[tuple, jax.Array]:
    """Our parameters as a flat dict of path -> array."""
    return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
