"""Bi-encoder train step throughput: mmret (jitted JAX step) vs the same step in Hugging Face PyTorch.

Same random weights, same batch (B queries and B candidates, each ``--length`` tokens of which
``--image_tokens`` are one image), bidirectional attention, mean pooling, L2 normalisation,
InfoNCE over the batch (temperature 0.05), AdamW; iterations interleaved, medians reported. The backbone
is the one defining ``--preset`` (mmret.models.registry).

    python benchmarks/train_step.py --preset small                      # CPU, float32
    python benchmarks/train_step.py --preset qwen2vl-2b --dtype bfloat16 --batch 8 --length 512 --image_tokens 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.forward import make_inputs  # noqa: E402
from mmret import models  # noqa: E402
from mmret.losses import Temperature  # noqa: E402
from mmret.models.encoder import Encoder, EncoderConfig  # noqa: E402
from mmret.models.reference import transformers_model  # noqa: E402
from mmret.models.retriever import Retriever  # noqa: E402
from mmret.tasks.base import init_state, split_model  # noqa: E402
from mmret.tasks.bi_encoder.step import make_train_step  # noqa: E402

LR, TAU = 1e-5, 0.05


def jax_batch(ids, mask, pv, grid) -> dict:
    side = {
        "input_ids": ids,
        "attention_mask": mask,
        "pool_mask": mask,
        "pixel_values": pv,
        "image_grid_thw": grid,
        "text_tokens": np.full(ids.shape[0], ids.shape[1], np.int32),
    }
    return {"query": side, "candidates": dict(side), "positive_mask": np.eye(ids.shape[0], dtype=bool)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--image_tokens", type=int, default=64)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--attention_impl", default="xla", choices=["xla", "cudnn", "auto"])
    p.add_argument("--remat", default="none")
    args = p.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    spec = models.find_preset(args.preset)
    cfg_dict = spec.preset_config(args.preset)
    torch.manual_seed(0)
    hf = transformers_model(spec, cfg_dict).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        # f32 master weights, compute in --dtype (the mmret recipe)
        backbone = models.from_hf(
            tmp,
            dtype=args.dtype,
            param_dtype="float32",
            attention_impl=args.attention_impl,
            remat=args.remat,
            # one image per sequence (the trainer: the processor's cap)
            max_image_patches=spec.patching.merge_size**2 * args.image_tokens,
        )
    hf = hf.to(device=device, dtype=torch_dtype).train()
    hf_opt = torch.optim.AdamW(hf.model.parameters(), lr=LR)

    ids, mask, pv, grid = make_inputs(spec, args.batch, args.length, args.image_tokens, cfg_dict["vocab_size"])
    model = Retriever(Encoder(backbone, EncoderConfig()), Temperature(TAU, learnable=False))
    tx = optax.adamw(LR)
    graphdef, params, rest = split_model(model)
    step = jax.jit(make_train_step(graphdef, tx), donate_argnums=0)
    state = init_state(params, rest, tx)
    batch = jax.tree.map(jnp.asarray, jax_batch(ids, mask, pv, grid))

    t_in = dict(
        input_ids=torch.tensor(ids, device=device),
        pixel_values=torch.tensor(pv, device=device, dtype=torch_dtype),
        image_grid_thw=torch.tensor(grid, device=device),
        mm_token_type_ids=torch.tensor((ids == spec.tokens.image_pad.id).astype(np.int64), device=device),
    )
    length = ids.shape[1]
    bidir = {"full_attention": torch.tensor(mask, device=device).bool()[:, None, None, :].expand(-1, 1, length, -1)}
    pos = torch.tensor(np.asarray(backbone.position_ids(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(grid))))
    m = torch.tensor(mask, device=device, dtype=torch.float32)[..., None]

    def torch_embed() -> torch.Tensor:
        h = hf.model(**t_in, attention_mask=bidir, position_ids=pos.to(device)).last_hidden_state.float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    def run_torch() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        q, c = torch_embed(), torch_embed()
        loss = torch.nn.functional.cross_entropy(q @ c.T / TAU, torch.arange(q.shape[0], device=device))
        loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def run_jax() -> float:
        nonlocal state
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    run_jax()
    compile_s = time.perf_counter() - t0
    run_torch()
    ours, peer = [], []
    for _ in range(args.iters):
        ours.append(run_jax())
        peer.append(run_torch())
    samples = 2 * args.batch  # queries + candidates embedded per step
    res = {
        "preset": args.preset,
        "model_type": spec.model_type,
        "dtype": args.dtype,
        "device": jax.devices()[0].device_kind,
        "torch_device": device,
        "batch": args.batch,
        "length": args.length,
        "image_tokens": args.image_tokens,
        "jax_compile_s": round(compile_s, 1),
        "mmret_step_ms": round(1e3 * statistics.median(ours), 1),
        "hf_step_ms": round(1e3 * statistics.median(peer), 1),
        "mmret_samples_per_s": round(samples / statistics.median(ours), 2),
        "hf_samples_per_s": round(samples / statistics.median(peer), 2),
        "hf_over_mmret_step_time": round(statistics.median(peer) / statistics.median(ours), 3),
    }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
