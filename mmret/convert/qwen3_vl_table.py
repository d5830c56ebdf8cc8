"""The conversion table of Qwen3-VL (model_type ``qwen3_vl``): hub tensor names <-> mmret parameter paths.

The released checkpoints name tensors as transformers 5 holds them (``model.visual.``,
``model.language_model.``), which is this table's layout. ``{i}`` runs over the vision blocks for
``model.visual.blocks`` keys, over the DeepStack mergers for ``deepstack_merger_list`` keys and over the
decoder layers otherwise.
"""

from __future__ import annotations

from typing import Any

from mmret.convert import qwen2_vl_table as q2
from mmret.convert.table import ConversionTable, Rule

_V, _VO = "model.visual.blocks.{i}", "visual.blocks.layers.{i}"
_D, _DO = "model.visual.deepstack_merger_list.{i}", "visual.deepstack_merger_list.layers.{i}"
_T, _TO = "model.language_model.layers.{i}", "language_model.layers.layers.{i}"


def _weight_and_bias(hub: str, ours: str, kind: str) -> tuple[Rule, Rule]:
    return Rule(f"{hub}.weight", f"{ours}.{'kernel' if kind == 'linear' else 'scale'}", kind), Rule(
        f"{hub}.bias", f"{ours}.bias"
    )


RULES: tuple[Rule, ...] = (
    Rule("model.visual.patch_embed.proj.weight", "visual.patch_embed.proj.kernel", "patch_embed"),
    Rule("model.visual.patch_embed.proj.bias", "visual.patch_embed.proj.bias"),
    Rule("model.visual.pos_embed.weight", "visual.pos_embed.embedding"),
    *_weight_and_bias(f"{_V}.norm1", f"{_VO}.norm1", "copy"),
    *_weight_and_bias(f"{_V}.norm2", f"{_VO}.norm2", "copy"),
    *_weight_and_bias(f"{_V}.attn.qkv", f"{_VO}.attn.qkv", "linear"),
    *_weight_and_bias(f"{_V}.attn.proj", f"{_VO}.attn.proj", "linear"),
    *_weight_and_bias(f"{_V}.mlp.linear_fc1", f"{_VO}.mlp.fc1", "linear"),
    *_weight_and_bias(f"{_V}.mlp.linear_fc2", f"{_VO}.mlp.fc2", "linear"),
    *(
        rule
        for hub, ours in (("model.visual.merger", "visual.merger"), (_D, _DO))
        for rule in (
            *_weight_and_bias(f"{hub}.norm", f"{ours}.ln_q", "copy"),
            *_weight_and_bias(f"{hub}.linear_fc1", f"{ours}.mlp_0", "linear"),
            *_weight_and_bias(f"{hub}.linear_fc2", f"{ours}.mlp_2", "linear"),
        )
    ),
    Rule("model.language_model.embed_tokens.weight", "language_model.embed_tokens.embedding"),
    *(
        Rule(f"{_T}.self_attn.{p}.weight", f"{_TO}.self_attn.{p}.kernel", "linear")
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    ),
    Rule(f"{_T}.self_attn.q_norm.weight", f"{_TO}.self_attn.q_norm.scale"),
    Rule(f"{_T}.self_attn.k_norm.weight", f"{_TO}.self_attn.k_norm.scale"),
    *(Rule(f"{_T}.mlp.{p}.weight", f"{_TO}.mlp.{p}.kernel", "linear") for p in ("gate_proj", "up_proj", "down_proj")),
    Rule(f"{_T}.input_layernorm.weight", f"{_TO}.input_layernorm.scale"),
    Rule(f"{_T}.post_attention_layernorm.weight", f"{_TO}.post_attention_layernorm.scale"),
    Rule("model.language_model.norm.weight", "language_model.norm.scale"),
    Rule("lm_head.weight", "lm_head.kernel", "linear"),
)


def depth(cfg: Any, hub: str) -> int:
    if "deepstack_merger_list" in hub:
        return len(cfg.vision.deepstack_visual_indexes)
    return cfg.vision.depth if hub.startswith("model.visual.") else cfg.text.num_hidden_layers


TABLE = ConversionTable(
    name="Qwen3-VL",
    rules=RULES,
    depth=depth,
    patch_embed_shape=q2.patch_embed_shape,
    embed="model.language_model.embed_tokens.weight",
)
