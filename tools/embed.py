#!/usr/bin/env python
"""Embed M-BEIR test queries and candidate pools (float16 shards, resumable): see mmret/eval/embed.py.

    python tools/embed.py --workdir RUN [--step N] [--out DIR]          # a training run (its config.json)
    python tools/embed.py --hf_dir MODEL --mbeir_root ROOT --out DIR    # a Hugging Face Qwen2-VL directory
    python tools/embed.py --checkpoint CKPT --mbeir_root ROOT --out DIR # an mmret model checkpoint

A run's embeddings default to RUN/eval/<step>/embeddings. Rerunning finishes an interrupted export; a
directory made from another model, other settings or other data (size or mtime of a record file, see
mmret/eval/embed.py) is recomputed whole. --on_bad_record skip drops and counts bad test records (e.g. a
query whose positive is not in its local pool) instead of stopping.
Then: python tools/scann_eval.py --embeddings DIR --mbeir_root ROOT --pool local|global --out OUT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from etils import epath

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="embed.py", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", type=epath.Path, help="a training run directory (uses its config.json)")
    src.add_argument("--hf_dir", type=epath.Path, help="a Hugging Face Qwen2-VL model directory")
    src.add_argument("--checkpoint", type=epath.Path, help="an mmret model checkpoint (tools/convert_checkpoint.py)")
    p.add_argument("--step", type=int, default=None, help="run checkpoint (default: the latest; 0: before training)")
    p.add_argument("--mbeir_root", help="M-BEIR root (default: the run's eval.root or data.root)")
    p.add_argument(
        "--out", type=epath.Path, help="embeddings directory (default for a run: RUN/eval/<step>/embeddings)"
    )
    p.add_argument("--pools", default="local,global", help="comma-separated: local, global")
    p.add_argument("--tasks", default=None, help="comma-separated dataset-tasks (default: the 16)")
    p.add_argument("--batch_size", type=int, default=None, help="per host")
    p.add_argument("--max_length", type=int, default=None, help="tokens per sequence")
    p.add_argument("--max_patches", type=int, default=None, help="vision patches per batch")
    p.add_argument("--shard_size", type=int, default=None)
    p.add_argument("--num_workers", type=int, default=None, help="grain worker processes")
    p.add_argument("--on_bad_record", choices=("error", "skip"), default=None, help="default: error")
    p.add_argument("--dtype", default=None, help="compute dtype (float32, bfloat16)")
    p.add_argument("--template", default=None, help="prompt template (umarvel, last_token, plain)")
    p.add_argument("--pooling", default=None, help="mean or last")
    p.add_argument("--attention", default=None, help="causal or bidirectional")
    return p


def make_config(args: argparse.Namespace):
    from mmret.recipe import as_trainer_config, config_to_json

    if args.workdir is not None:
        path = args.workdir / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a training run directory (no config.json)")
        base = json.loads(path.read_text())
    else:
        source = {"hf_dir": str(args.hf_dir)} if args.hf_dir else {"checkpoint": str(args.checkpoint)}
        base = config_to_json(as_trainer_config({"model": {**source}}))
        base["model"]["dtype"] = "bfloat16"
        if not args.mbeir_root:
            raise ValueError("--mbeir_root is needed without --workdir")
    ev = base.setdefault("eval", {})
    for key in ("batch_size", "max_length", "max_patches", "shard_size", "num_workers", "on_bad_record"):
        if getattr(args, key) is not None:
            ev[key] = getattr(args, key)
    if args.mbeir_root:
        ev["root"] = args.mbeir_root
    ev["pools"] = [p for p in args.pools.split(",") if p]
    if args.tasks:
        ev["tasks"] = [t for t in args.tasks.split(",") if t]
    for section, key, value in (
        ("model", "dtype", args.dtype),
        ("encoder", "pooling", args.pooling),
        ("encoder", "attention", args.attention),
    ):
        if value is not None:
            base.setdefault(section, {})[key] = value
    if args.template is not None:
        base.setdefault("data", {}).setdefault("processor", {})["template"] = args.template
    return as_trainer_config(base)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = make_config(args)
        from mmret.eval.embed import embed, resolve_step

        if args.workdir is not None:
            step = resolve_step(args.workdir, args.step)
            out = args.out or args.workdir / "eval" / str(step) / "embeddings"
            embed(cfg, out, workdir=args.workdir, step=step)
        else:
            if args.out is None:
                raise ValueError("--out is needed without --workdir")
            embed(cfg, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"embed.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
