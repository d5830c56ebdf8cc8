"""The Qwen2 decoder layer: grouped-query attention with M-RoPE, SwiGLU MLP, RMSNorm (pre-norm)."""

from __future__ import annotations

import jax
from flax import nnx

from mmret.models.partitioning import constrain
from mmret.models.qwen2_vl.attention import dot_product_attention
from mmret.models.qwen2_vl.config import Qwen2VLConfig
from mmret.models.qwen2_vl.layers import RMSNorm, activation, linear
from mmret.models.qwen2_vl.rope import apply_rotary


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen2VLConfig, *, rngs: nnx.Rngs):
        t = cfg.text
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = t.num_attention_heads, t.num_key_value_heads, t.head_dim
        self.impl = cfg.attention_impl
        q_dim, kv_dim = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
        self.q_proj = linear(t.hidden_size, q_dim, ("embed", "heads"), bias=True, **kw)
        self.k_proj = linear(t.hidden_size, kv_dim, ("embed", "kv_heads"), bias=True, **kw)
        self.v_proj = linear(t.hidden_size, kv_dim, ("embed", "kv_heads"), bias=True, **kw)
        self.o_proj = linear(q_dim, t.hidden_size, ("heads", "embed"), bias=False, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        q = self.q_proj(x).reshape(b, n, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, n, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = dot_product_attention(q, k, v, mask, impl=self.impl)
        return self.o_proj(out.reshape(b, n, -1))


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen2VLConfig, *, rngs: nnx.Rngs):
        t = cfg.text
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.act = activation(t.hidden_act)
        self.gate_proj = linear(t.hidden_size, t.intermediate_size, ("embed", "mlp"), bias=False, **kw)
        self.up_proj = linear(t.hidden_size, t.intermediate_size, ("embed", "mlp"), bias=False, **kw)
        self.down_proj = linear(t.intermediate_size, t.hidden_size, ("mlp", "embed"), bias=False, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(self.act(self.gate_proj(x)) * self.up_proj(x), "batch", "length", "act_mlp")
        return self.down_proj(h)


class DecoderLayer(nnx.Module):
    attention_class: type[nnx.Module] = Attention

    def __init__(self, cfg: Qwen2VLConfig, *, rngs: nnx.Rngs):
        kw = dict(eps=cfg.text.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.text.hidden_size, **kw)
        self.self_attn = self.attention_class(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.text.hidden_size, **kw)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """``x`` [batch, length, embed], split over the batch axes under the activation layout."""
        x = constrain(x + self.self_attn(self.input_layernorm(x), cos, sin, mask), "batch", "length", "act_embed")
        return constrain(x + self.mlp(self.post_attention_layernorm(x)), "batch", "length", "act_embed")
