"""Forward latency: our jitted Flax backbone vs the Hugging Face PyTorch model, same weights, inputs
and machine, reported as a ratio (measured interleaved, so machine noise hits both sides alike). The
backbone is the one defining ``--preset`` (mmret.models.registry).

    python benchmarks/forward.py --preset small                      # CPU, float32
    python benchmarks/forward.py --preset qwen2vl-2b --dtype bfloat16 --batch 8 --length 512 --image_tokens 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmret import models
from mmret.models.backbone import Backbone
from mmret.models.reference import transformers_model


def make_inputs(spec: Backbone, batch: int, length: int, image_tokens: int, vocab: int, seed: int = 0):
    """Each row: a few text tokens, one image of ``image_tokens`` merged tokens (a square-ish grid),
    then text up to ``length``. Returns numpy ids, mask, pixel_values, grid."""
    rng = np.random.default_rng(seed)
    gh = int(np.sqrt(image_tokens))
    while image_tokens % gh:
        gh -= 1
    gw = image_tokens // gh
    m = spec.patching.merge_size
    grid = np.array([[1, m * gh, m * gw]] * batch, np.int64)
    ids = rng.integers(0, min(vocab, 150000), size=(batch, length))
    ids[:, 1] = spec.tokens.vision_start.id
    ids[:, 2 : 2 + image_tokens] = spec.tokens.image_pad.id
    ids[:, 2 + image_tokens] = spec.tokens.vision_end.id
    mask = np.ones_like(ids)
    patches = batch * m * m * image_tokens
    pixel_values = rng.standard_normal((patches, spec.patching.patch_dim)).astype(np.float32)
    return ids, mask, pixel_values, grid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--image_tokens", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--attention_impl", default="xla", choices=["xla", "cudnn", "auto"])
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()

    import torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = models.find_preset(args.preset)
    cfg_dict = spec.preset_config(args.preset)
    patches_per_image = spec.patching.merge_size**2 * args.image_tokens
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        hf = transformers_model(spec, cfg_dict).to(torch_dtype).eval()
        hf.save_pretrained(tmp)
        # Every image has the same patches: the vision tower attends within blocks of that many.
        model = models.from_hf(
            tmp, dtype=args.dtype, attention_impl=args.attention_impl, max_image_patches=patches_per_image
        )
    hf = hf.to(device)

    vocab = cfg_dict.get("vocab_size") or cfg_dict["text_config"]["vocab_size"]  # flat or nested layout
    ids, mask, pv, grid = make_inputs(spec, args.batch, args.length, args.image_tokens, vocab)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask, pv, grid):
        return nnx.merge(graphdef, state)(ids, mask, pv, grid).last_hidden_state

    j_args = [jnp.asarray(x) for x in (ids, mask, pv, grid)]
    t_kw = dict(
        input_ids=torch.tensor(ids, device=device),
        attention_mask=torch.tensor(mask, device=device),
        pixel_values=torch.tensor(pv, device=device, dtype=torch_dtype),
        image_grid_thw=torch.tensor(grid, device=device),
        mm_token_type_ids=torch.tensor((ids == spec.tokens.image_pad.id).astype(np.int64), device=device),
    )

    def run_jax() -> float:
        t0 = time.perf_counter()
        forward(state, *j_args).block_until_ready()
        return time.perf_counter() - t0

    def run_torch() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.model(**t_kw)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    run_jax()
    compile_s = time.perf_counter() - t0
    run_torch()
    ours, peer = [], []
    for _ in range(args.iters):  # interleaved
        ours.append(run_jax())
        peer.append(run_torch())
    tokens = args.batch * args.length
    res = {
        "preset": args.preset,
        "model_type": spec.model_type,
        "dtype": args.dtype,
        "device": jax.devices()[0].device_kind,
        "torch_device": device,
        "torch_attention": hf.config._attn_implementation,
        "batch": args.batch,
        "length": args.length,
        "image_tokens": args.image_tokens,
        "jax_compile_s": round(compile_s, 2),
        "mmret_ms": round(1e3 * statistics.median(ours), 2),
        "hf_ms": round(1e3 * statistics.median(peer), 2),
        "mmret_tokens_per_s": round(tokens / statistics.median(ours)),
        "hf_tokens_per_s": round(tokens / statistics.median(peer)),
        "hf_over_mmret_latency": round(statistics.median(peer) / statistics.median(ours), 3),
    }
    print(json.dumps(res, indent=2))
    print(
        f"| {args.preset} | {args.dtype} | {res['device']} | {args.batch}x{args.length} ({args.image_tokens} img) "
        f"| {res['mmret_ms']} | {res['hf_ms']} | {res['hf_over_mmret_latency']}x |"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
