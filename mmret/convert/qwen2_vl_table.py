"""The one declarative mapping between Qwen2-VL hub tensor names and mmret parameter paths.

Each rule pairs a hub key with our path; ``{i}`` is a block index (vision blocks or decoder
layers). With ``scan_layers`` our blocks are stacked along a leading axis and the ``.{i}`` of our
path disappears. ``kind`` names the layout change, applied one way on import and inverted on export.
Both directions (``mmret.convert.hf``) and ``from_hf`` read this table and nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

Kind = Literal["copy", "linear", "patch_embed"]


@dataclasses.dataclass(frozen=True)
class Rule:
    hub: str
    ours: str
    kind: Kind = "copy"


_V = "visual.blocks.{i}"
_VO = "visual.blocks.layers.{i}"
_T = "model.layers.{i}"
_TO = "language_model.layers.layers.{i}"

TABLE: tuple[Rule, ...] = (
    Rule("visual.patch_embed.proj.weight", "visual.patch_embed.proj.kernel", "patch_embed"),
    *(
        Rule(f"{_V}.{hub}.{w}", f"{_VO}.{ours}.{p}", kind)
        for hub, ours in (
            ("norm1", "norm1"),
            ("norm2", "norm2"),
        )
        for w, p, kind in (("weight", "scale", "copy"), ("bias", "bias", "copy"))
    ),
    *(
        Rule(f"{_V}.{name}.{w}", f"{_VO}.{name}.{p}", kind)
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
        for w, p, kind in (("weight", "kernel", "linear"), ("bias", "bias", "copy"))
    ),
    Rule("visual.merger.ln_q.weight", "visual.merger.ln_q.scale"),
    Rule("visual.merger.ln_q.bias", "visual.merger.ln_q.bias"),
    Rule("visual.merger.mlp.0.weight", "visual.merger.mlp_0.kernel", "linear"),
    Rule("visual.merger.mlp.0.bias", "visual.merger.mlp_0.bias"),
    Rule("visual.merger.mlp.2.weight", "visual.merger.mlp_2.kernel", "linear"),
    Rule("visual.merger.mlp.2.bias", "visual.merger.mlp_2.bias"),
    Rule("model.embed_tokens.weight", "language_model.embed_tokens.embedding"),
    *(
        Rule(f"{_T}.self_attn.{p}.{w}", f"{_TO}.self_attn.{p}.{o}", kind)
        for p in ("q_proj", "k_proj", "v_proj")
        for w, o, kind in (("weight", "kernel", "linear"), ("bias", "bias", "copy"))
    ),
    Rule(f"{_T}.self_attn.o_proj.weight", f"{_TO}.self_attn.o_proj.kernel", "linear"),
    *(Rule(f"{_T}.mlp.{p}.weight", f"{_TO}.mlp.{p}.kernel", "linear") for p in ("gate_proj", "up_proj", "down_proj")),
    Rule(f"{_T}.input_layernorm.weight", f"{_TO}.input_layernorm.scale"),
    Rule(f"{_T}.post_attention_layernorm.weight", f"{_TO}.post_attention_layernorm.scale"),
    Rule("model.norm.weight", "language_model.norm.scale"),
    Rule("lm_head.weight", "lm_head.kernel", "linear"),
)

# transformers >= 5 names the same tensors differently in memory (and may save them so).
HUB_ALIASES = (("model.visual.", "visual."), ("model.language_model.", "model."))


def canonical_hub_key(key: str) -> str:
    """A hub key in the classic layout, whichever layout it was saved in."""
    for alias, canonical in HUB_ALIASES:
        if key.startswith(alias):
            return canonical + key[len(alias) :]
    return key


def to_ours(x: np.ndarray, kind: Kind) -> np.ndarray:
    """Hub layout -> ours."""
    if kind == "linear":  # torch Linear weight [out, in] -> kernel [in, out]
        return np.ascontiguousarray(x.T)
    if kind == "patch_embed":  # Conv3d [embed, C, T, P, P], kernel == stride -> kernel [C*T*P*P, embed]
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
    return x


def to_hub(x: np.ndarray, kind: Kind, hub_shape: tuple[int, ...]) -> np.ndarray:
    """Ours -> hub layout (the inverse of ``to_ours``)."""
    if kind in ("linear", "patch_embed"):
        return np.ascontiguousarray(x.T).reshape(hub_shape)
    return x
