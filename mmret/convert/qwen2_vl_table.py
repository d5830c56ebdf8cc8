"""The conversion table of Qwen2-VL (model_type ``qwen2_vl``): hub tensor names <-> mmret parameter paths.

See :mod:`mmret.convert.table` for what a rule says. ``{i}`` runs over the vision blocks for ``visual.``
keys and over the decoder layers otherwise.
"""

from __future__ import annotations

from typing import Any

from mmret.convert.table import ConversionTable, Rule

VISION = "visual.blocks.{i}"
VISION_OURS = "visual.blocks.layers.{i}"
_T = "model.layers.{i}"
_TO = "language_model.layers.layers.{i}"

#: The merger's two-layer MLP (the same in Qwen2.5-VL).
MERGER_MLP_RULES: tuple[Rule, ...] = (
    Rule("visual.merger.mlp.0.weight", "visual.merger.mlp_0.kernel", "linear"),
    Rule("visual.merger.mlp.0.bias", "visual.merger.mlp_0.bias"),
    Rule("visual.merger.mlp.2.weight", "visual.merger.mlp_2.kernel", "linear"),
    Rule("visual.merger.mlp.2.bias", "visual.merger.mlp_2.bias"),
)

#: The Qwen2 decoder and the LM head (the same in Qwen2.5-VL).
TEXT_RULES: tuple[Rule, ...] = (
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

RULES: tuple[Rule, ...] = (
    Rule("visual.patch_embed.proj.weight", "visual.patch_embed.proj.kernel", "patch_embed"),
    *(
        Rule(f"{VISION}.{name}.{w}", f"{VISION_OURS}.{name}.{p}", kind)
        for name in ("norm1", "norm2")
        for w, p, kind in (("weight", "scale", "copy"), ("bias", "bias", "copy"))
    ),
    *(
        Rule(f"{VISION}.{name}.{w}", f"{VISION_OURS}.{name}.{p}", kind)
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
        for w, p, kind in (("weight", "kernel", "linear"), ("bias", "bias", "copy"))
    ),
    Rule("visual.merger.ln_q.weight", "visual.merger.ln_q.scale"),
    Rule("visual.merger.ln_q.bias", "visual.merger.ln_q.bias"),
    *MERGER_MLP_RULES,
    *TEXT_RULES,
)

# transformers >= 5 names the same tensors differently in memory (and may save them so).
HUB_ALIASES = (("model.visual.", "visual."), ("model.language_model.", "model."))


def depth(cfg: Any, hub: str) -> int:
    return cfg.vision.depth if hub.startswith("visual.") else cfg.text.num_hidden_layers


def patch_embed_shape(cfg: Any) -> tuple[int, ...]:
    v = cfg.vision
    return (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)


TABLE = ConversionTable(
    name="Qwen2-VL",
    rules=RULES,
    depth=depth,
    patch_embed_shape=patch_embed_shape,
    hub_aliases=HUB_ALIASES,
)
