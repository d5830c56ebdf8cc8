"""Compiled peak memory of the train step as the global batch grows: plain vs GradCache at a fixed
chunk size. Nothing runs: each step is lowered and compiled ahead of time from abstract inputs and
``compiled.memory_analysis()`` is read (temporary + argument + output bytes).

    python benchmarks/grad_cache_memory.py [--preset tiny] [--chunk 4] [--batches 4,8,16,32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmret import models  # noqa: E402
from mmret.losses import Temperature  # noqa: E402
from mmret.models.encoder import Encoder, EncoderConfig  # noqa: E402
from mmret.models.retriever import Retriever  # noqa: E402
from mmret.tasks.base import init_state, split_model  # noqa: E402
from mmret.tasks.bi_encoder.step import StepConfig, make_train_step  # noqa: E402


def abstract_batch(batch: int, length: int, patches_per_example: int, chunks: int | None, patch_dim: int) -> dict:
    """ShapeDtypeStructs of a collated training batch (one candidate per query)."""

    def side(b: int) -> dict:
        p = b * patches_per_example
        return {
            "input_ids": jax.ShapeDtypeStruct((b, length), jnp.int32),
            "attention_mask": jax.ShapeDtypeStruct((b, length), jnp.int32),
            "pool_mask": jax.ShapeDtypeStruct((b, length), jnp.int32),
            "position_ids": jax.ShapeDtypeStruct((3, b, length), jnp.int32),
            "pixel_values": jax.ShapeDtypeStruct((p, patch_dim), jnp.float32),
            "image_grid_thw": jax.ShapeDtypeStruct((b, 3), jnp.int32),
            "text_tokens": jax.ShapeDtypeStruct((b,), jnp.int32),
        }

    def chunked(b: int) -> dict:
        if chunks is None:
            return side(b)
        one = side(b // chunks)
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct((chunks, *s.shape), s.dtype), one)

    return {
        "query": chunked(batch),
        "candidates": chunked(batch),
        "positive_mask": jax.ShapeDtypeStruct((batch, batch), bool),
    }


def peak_bytes(step, state, batch) -> int:
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--batches", default="4,8,16,32")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--patches", type=int, default=64, help="image patches per example (4 per image token)")
    args = p.parse_args()

    patch_dim = models.find_preset(args.preset).patching.patch_dim
    abstract = nnx.eval_shape(
        lambda: Retriever(
            Encoder(models.from_preset(args.preset, scan_layers=True), EncoderConfig()), Temperature(0.05)
        )
    )
    graphdef, params, rest = split_model(abstract)
    tx = optax.adamw(1e-4)
    state = jax.eval_shape(lambda p, r: init_state(p, r, tx), params, rest)
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        plain = peak_bytes(
            make_train_step(graphdef, tx), state, abstract_batch(b, args.length, args.patches, None, patch_dim)
        )
        gc = peak_bytes(
            make_train_step(graphdef, tx, StepConfig(grad_cache=True)),
            state,
            abstract_batch(b, args.length, args.patches, b // args.chunk, patch_dim),
        )
        rows.append({"global_batch": b, "plain_MiB": round(plain / 2**20, 1), "grad_cache_MiB": round(gc / 2**20, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| global batch | plain step MiB | GradCache (chunk {args.chunk}) MiB |\n|---|---|---|")
    for r in rows:
        print(f"| {r['global_batch']} | {r['plain_MiB']} | {r['grad_cache_MiB']} |")


if __name__ == "__main__":
    main()
