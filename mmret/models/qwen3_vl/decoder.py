"""The Qwen3 decoder: grouped-query attention with per-head q/k RMSNorm before the rotary embedding and no
biases, Qwen2's SwiGLU MLP and pre-norm layout; the language model adds DeepStack features after its first
layers."""

from __future__ import annotations

import jax
from flax import nnx

from mmret.models.qwen2_vl.attention import dot_product_attention
from mmret.models.qwen2_vl.decoder import DecoderLayer as Qwen2DecoderLayer
from mmret.models.qwen2_vl.layers import RMSNorm, linear
from mmret.models.qwen2_vl.model import LanguageModel as Qwen2LanguageModel
from mmret.models.qwen2_vl.rope import apply_rotary
from mmret.models.qwen3_vl.config import Qwen3VLConfig


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen3VLConfig, *, rngs: nnx.Rngs):
        t = cfg.text
        kw = dict(bias=t.attention_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        norm = dict(eps=t.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = t.num_attention_heads, t.num_key_value_heads, t.head_dim
        self.impl = cfg.attention_impl
        q_dim, kv_dim = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
        self.q_proj = linear(t.hidden_size, q_dim, ("embed", "heads"), **kw)
        self.k_proj = linear(t.hidden_size, kv_dim, ("embed", "kv_heads"), **kw)
        self.v_proj = linear(t.hidden_size, kv_dim, ("embed", "kv_heads"), **kw)
        self.o_proj = linear(q_dim, t.hidden_size, ("heads", "embed"), **kw)
        self.q_norm = RMSNorm(t.head_dim, **norm)
        self.k_norm = RMSNorm(t.head_dim, **norm)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, n, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(b, n, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).reshape(b, n, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = dot_product_attention(q, k, v, mask, impl=self.impl)
        return self.o_proj(out.reshape(b, n, -1))


class DecoderLayer(Qwen2DecoderLayer):
    attention_class = Attention


class LanguageModel(Qwen2LanguageModel):
    """Qwen2's language model with Qwen3 layers; ``deepstack`` [k, B, L, d] (zero off the image tokens) is
    added to the hidden states after each of the first k layers."""

    layer_class = DecoderLayer

    def __call__(  # type: ignore[override]
        self, embeds: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, deepstack: jax.Array | None = None
    ) -> jax.Array:
        x = embeds
        k = 0 if deepstack is None else deepstack.shape[0]
        for i in range(k):
            x = self.layers(x, cos, sin, mask, start=i, stop=i + 1) + deepstack[i].astype(x.dtype)
        return self.norm(self.layers(x, cos, sin, mask, start=k))


__all__ = ["Attention", "DecoderLayer", "LanguageModel"]
