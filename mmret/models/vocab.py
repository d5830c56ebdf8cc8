"""``grow_vocab``: token-embedding rows for tokens a processor added, drawn as transformers draws them.

``grow_vocab`` appends token-embedding rows (and rows of an untied ``lm_head``) as
``transformers.PreTrainedModel.resize_token_embeddings(n)`` does by default (``mean_resizing=True``, checked
in transformers 5.24): each new row is drawn from a normal with the old rows' mean and covariance scaled by
1e-9 (computed in float32), or is the mean where that covariance is not positive definite. The draw is
seeded (numpy), so a grown model is reproducible; it differs from torch's draw only by noise of about
3e-5 standard deviations around the mean. Only growth: a table with rows to spare is left as is
(U-MARVEL's own ``resize_token_embeddings(len(tokenizer))`` would truncate Qwen2-VL's padded rows, which
changes no embedding of a token the tokenizer can emit).

Any registered backbone: the embedding and LM-head paths come from its spec.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmret.models import registry


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


def grow_vocab(model: Any, vocab_size: int, *, seed: int = 0) -> Any:
    """``model`` with ``vocab_size`` token-embedding rows (and untied ``lm_head`` columns) when it has
    fewer, the new ones drawn from ``seed`` (module docstring); otherwise ``model`` itself."""
    cfg = model.cfg
    added = vocab_size - cfg.vocab_size
    if added <= 0:
        return model
    spec = registry.of_config(cfg)
    graphdef, state = nnx.split(spec.abstract(cfg.with_vocab_size(vocab_size)))
    flat = dict(nnx.to_flat_state(state))
    source = dict(nnx.to_flat_state(nnx.state(model)))
    rng = np.random.default_rng(seed)
    for path, var in flat.items():
        value = source.pop(path).get_value()
        if path == spec.embed_path:
            value = jnp.asarray(mean_resized_rows(np.asarray(value), added, rng))
        elif path == spec.lm_head_path:
            value = jnp.asarray(mean_resized_rows(np.asarray(value).T, added, rng).T)
        var.set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
