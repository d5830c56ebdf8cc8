"""The conversion table of Qwen2.5-VL (model_type ``qwen2_5_vl``): Qwen2-VL's decoder and merger MLP rules,
RMSNorms (no bias) in the vision blocks and the merger, and the gated vision MLP (biases on all three)."""

from __future__ import annotations

from mmret.convert import qwen2_vl_table as q2
from mmret.convert.table import ConversionTable, Rule

_V, _VO = q2.VISION, q2.VISION_OURS

RULES: tuple[Rule, ...] = (
    Rule("visual.patch_embed.proj.weight", "visual.patch_embed.proj.kernel", "patch_embed"),
    Rule(f"{_V}.norm1.weight", f"{_VO}.norm1.scale"),
    Rule(f"{_V}.norm2.weight", f"{_VO}.norm2.scale"),
    *(
        Rule(f"{_V}.{name}.{w}", f"{_VO}.{name}.{p}", kind)
        for name in ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        for w, p, kind in (("weight", "kernel", "linear"), ("bias", "bias", "copy"))
    ),
    Rule("visual.merger.ln_q.weight", "visual.merger.ln_q.scale"),
    *q2.MERGER_MLP_RULES,
    *q2.TEXT_RULES,
)

TABLE = ConversionTable(
    name="Qwen2.5-VL",
    rules=RULES,
    depth=q2.depth,
    patch_embed_shape=q2.patch_embed_shape,
    hub_aliases=q2.HUB_ALIASES,
)
