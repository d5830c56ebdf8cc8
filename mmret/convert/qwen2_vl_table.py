"""The conversion table of Qwen2-VL (model_type ``qwen2_vl``): hub tensor names <-> mmret parameter paths.

See :mod:`mmret.convert.table` for what a rule says. ``{i}`` runs over the vision blocks for ``visual.``
keys and over the decoder layers otherwise.
"""

from __future__ import annotations

from typing import Any

from mmret.convert.table import ConversionTable, Rule

_V = "visual.blocks.{i}"
_VO = "visual.blocks.layers.{i}"
_T = "model.layers.{i}"
_TO = "language_model.layers.layers.{i}"

RULES: tuple[Rule, ...] = (
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


def _depth(cfg: Any, hub: str) -> int:
    return cfg.vision.depth if hub.startswith("visual.") else cfg.text.num_hidden_layers


def _patch_embed_shape(cfg: Any) -> tuple[int, ...]:
    v = cfg.vision
    return (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)


TABLE = ConversionTable(
    name="Qwen2-VL",
    rules=RULES,
    depth=_depth,
    patch_embed_shape=_patch_embed_shape,
    hub_aliases=HUB_ALIASES,
)
