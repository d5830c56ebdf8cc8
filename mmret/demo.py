"""The embedded default job (until the training engine lands): load a Qwen2-VL directory (the tiny
random model by default), embed a few synthetic image/text inputs, and print a result table.

    python tools/make_tiny_model.py --out /tmp/mmret_demo/tiny
    python -m mmret.demo --model_dir /tmp/mmret_demo/tiny
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw

from mmret.models import qwen2_vl
from mmret.models.qwen2_vl.processor_files import load_processor

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}


def draw(colour: str, shape: str, size: int = 112) -> Image.Image:
    """A synthetic picture: one coloured shape on a white background."""
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    return img


def inputs() -> list[tuple[str, str | None, Image.Image | None]]:
    """(name, text, image) for a handful of queries and candidates of every modality."""
    return [
        ("text: red circle", "A red circle.", None),
        ("image: red circle", None, draw("red", "circle")),
        ("image: blue square", None, draw("blue", "square")),
        ("image+text: green", "What colour is this shape?", draw("green", "circle", 84)),
        ("text: blue square", "A blue square.", None),
    ]


def render(processor, text: str | None, image: Image.Image | None) -> dict:
    content = ([{"type": "image"}] if image is not None else []) + ([{"type": "text", "text": text}] if text else [])
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return processor(text=prompt, images=[image] if image is not None else None, return_tensors="np")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", type=Path, required=True, help="a Hugging Face Qwen2-VL directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    model = qwen2_vl.from_hf(args.model_dir, dtype=args.dtype, attention="bidirectional")
    processor = load_processor(args.model_dir)
    print(
        f"loaded {args.model_dir} ({qwen2_vl.count_params(model) / 1e6:.1f}M parameters, "
        f"{jax.devices()[0].platform}) in {time.perf_counter() - t0:.1f}s"
    )
    graphdef, state = nnx.split(model)

    @jax.jit
    def embed(state, ids, mask, pv, grid):
        hidden = nnx.merge(graphdef, state)(ids, mask, pv, grid).last_hidden_state.astype(jnp.float32)
        m = mask[..., None].astype(jnp.float32)
        pooled = (hidden * m).sum(1) / m.sum(1)  # mean pooling over the tokens
        return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)

    names, embeddings, lengths = [], [], []
    for name, text, image in inputs():
        enc = render(processor, text, image)
        pv, grid = enc.get("pixel_values"), enc.get("image_grid_thw")
        e = embed(state, enc["input_ids"], enc["attention_mask"], pv, grid)
        names.append(name)
        embeddings.append(np.asarray(e[0]))
        lengths.append(enc["input_ids"].shape[1])
    emb = np.stack(embeddings)
    sims = emb @ emb.T
    width = max(map(len, names))
    print(f"\n{'input':<{width}}  tokens  norm    embedding[:4]")
    for name, n, e in zip(names, lengths, emb, strict=True):
        print(f"{name:<{width}}  {n:>6}  {np.linalg.norm(e):.4f}  {np.array2string(e[:4], precision=3)}")
    print(f"\ncosine similarity (random weights: the numbers show the plumbing, not quality; dim {emb.shape[1]})")
    print(f"{'':<{width}}  " + "  ".join(f"{i:>6}" for i in range(len(names))))
    for i, name in enumerate(names):
        print(f"{name:<{width}}  " + "  ".join(f"{s:>6.3f}" for s in sims[i]))


if __name__ == "__main__":
    main()
