"""AdamW with linear warm-up + cosine decay, global-norm clipping, weight-decay masks by path regex
and optional per-group learning rates.

The transformation works on the trainable parameters only (``nnx.Optimizer(model, tx, wrt=...)``
with ``mmret.lora.trainable_filter``), as nnx ``State`` of Variables or of plain arrays. Parameters
are float32 master weights (the model computes in ``dtype``, e.g. bfloat16, and stores
``param_dtype=float32``); the first and second moments are float32, and ``init`` rejects a
non-float32 floating parameter unless ``require_float32=False``.

Paths are the dot-joined parameter paths (``language_model.layers.layers.self_attn.q_proj.bias``)
matched with ``re.fullmatch``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

#: No weight decay on biases, norm scales / biases, embedding tables and a temperature by default.
NO_DECAY = (
    r"(.*\.)?bias",
    r".*(norm|ln_q)[^.]*\.scale",
    r"(.*\.)?embedding",
    r"(.*\.)?(log_)?temperature(\..*)?",
)

DEFAULT_GROUP = "default"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + warm-up/cosine schedule. ``learning_rate`` is the peak; the schedule rises linearly
    from 0 over the warm-up (``warmup_steps`` if set, else ``ceil(warmup_ratio * total_steps)``),
    then follows a half cosine down to ``end_lr_ratio * learning_rate`` at ``total_steps``.

    ``lr_groups``: ``(path regex, peak lr)`` pairs (first match wins) for parameters that follow the
    same schedule shape at another peak, e.g. ``((r".*temperature", 1e-3),)``.
    """

    learning_rate: float = 1e-4
    total_steps: int = 1000
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    end_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    no_decay: tuple[str, ...] = NO_DECAY
    clip_grad_norm: float | None = 1.0
    lr_groups: tuple[tuple[str, float], ...] = ()
    require_float32: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.lr_groups, Mapping):
            object.__setattr__(self, "lr_groups", tuple(self.lr_groups.items()))
        object.__setattr__(self, "lr_groups", tuple((str(p), float(lr)) for p, lr in self.lr_groups))
        object.__setattr__(self, "no_decay", tuple(self.no_decay))
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")
        if self.learning_rate < 0 or any(lr < 0 for _, lr in self.lr_groups):
            raise ValueError("learning rates must be >= 0")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ValueError(f"end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be positive or None, got {self.clip_grad_norm}")
        for p in (*self.no_decay, *(p for p, _ in self.lr_groups)):
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"bad path regex {p!r}: {e}") from e

    @property
    def num_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return int(self.warmup_steps)
        return min(self.total_steps, math.ceil(self.warmup_ratio * self.total_steps))


def lr_schedule(cfg: OptimizerConfig, peak: float | None = None) -> optax.Schedule:
    """The learning rate at each step (for ``peak``, default ``cfg.learning_rate``)."""
    peak = cfg.learning_rate if peak is None else peak
    end = peak * cfg.end_lr_ratio
    warmup, total = cfg.num_warmup_steps, cfg.total_steps

    def schedule(step: jax.Array | int) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        rising = peak * step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
        cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, rising, cosine)

    return schedule


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_name(keypath: Sequence[Any]) -> str:
    """Dot-joined name of a pytree key path (nnx ``State`` of Variables or of arrays)."""
    names = [_key_name(k) for k in keypath]
    if names and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names = names[:-1]  # a Variable's own value
    return ".".join(names)


def map_paths(fn: Callable[[str, Any], Any], params: Any) -> Any:
    """``fn(path, leaf)`` over every leaf of ``params``, keeping its structure."""
    return jax.tree_util.tree_map_with_path(lambda kp, x: fn(path_name(kp), x), params)


def decay_mask(params: Any, no_decay: Sequence[str] = NO_DECAY) -> Any:
    """True where weight decay applies: every leaf whose path matches none of ``no_decay``."""
    return map_paths(lambda p, _: not any(re.fullmatch(r, p) for r in no_decay), params)


def group_labels(params: Any, groups: Sequence[tuple[str, float]]) -> Any:
    """Each leaf's learning-rate group: ``group{i}`` for the first matching pattern, else default."""

    def label(path: str, _: Any) -> str:
        for i, (pattern, _lr) in enumerate(groups):
            if re.fullmatch(pattern, path):
                return f"group{i}"
        return DEFAULT_GROUP

    return map_paths(label, params)


class _Empty(NamedTuple):
    pass


def require_float32() -> optax.GradientTransformation:
    """A no-op whose ``init`` fails if a floating parameter is not float32 (master weights)."""

    def init(params: Any) -> _Empty:
        bad = []
        map_paths(
            lambda p, x: (
                bad.append(f"{p}: {x.dtype}")
                if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.float32
                else None
            ),
            params,
        )
        if bad:
            raise ValueError(
                "master weights must be float32 (create the model with param_dtype=float32; compute "
                f"in bfloat16 with dtype=bfloat16); got {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}"
            )
        return _Empty()

    def update(updates: Any, state: _Empty, params: Any = None) -> tuple[Any, _Empty]:
        del params
        return updates, state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Clip by global norm (over all trainable parameters), then AdamW on each learning-rate group."""

    def adamw(peak: float) -> optax.GradientTransformation:
        return optax.adamw(
            lr_schedule(cfg, peak),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda params: decay_mask(params, cfg.no_decay),
            mu_dtype=jnp.float32,
        )

    parts = []
    if cfg.require_float32:
        parts.append(require_float32())
    if cfg.clip_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
    if cfg.lr_groups:
        transforms = {DEFAULT_GROUP: adamw(cfg.learning_rate)}
        transforms.update({f"group{i}": adamw(lr) for i, (_, lr) in enumerate(cfg.lr_groups)})
        parts.append(optax.multi_transform(transforms, lambda params: group_labels(params, cfg.lr_groups)))
    else:
        parts.append(adamw(cfg.learning_rate))
    return optax.chain(*parts)
