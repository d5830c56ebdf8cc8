#!/usr/bin/env python
"""Export a training run's checkpoint to a plain Hugging Face model directory (``mmret.export``).

    python tools/export_run.py --workdir RUN --out DIR [--step N] [--dtype bfloat16] [--max_shard_size 5GB] [--force]

DIR loads with the backbone's transformers class (e.g. ``Qwen2VLForConditionalGeneration.from_pretrained``),
LoRA merged, with the run's tokenizer and processor files, ``mmret_embedding.json`` (a retriever: template,
pooling, attention, temperature, instructions) or ``mmret_reranker.json`` (a reranker), and a model card
(``README.md``) with the run's evaluation table. ``--step``: default the latest checkpoint; 0 the model the
run starts from. The same as ``python -m mmret.launch --mode=export``. Progress is one bar over the tensors;
DIR is written beside itself and renamed into place (an existing non-empty DIR is refused unless --force).
Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="export_run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the training run's directory (its config.json)")
    parser.add_argument("--out", required=True, help="Hugging Face model directory to create")
    parser.add_argument("--step", type=int, default=None, help="checkpoint (default: the latest; 0: the start)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="of the tensors")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mmret.export import export_run
    from mmret.progress import StepsBar

    start = time.monotonic()
    bar = StepsBar("export", quiet=args.quiet, out=sys.stdout)
    try:
        out = export_run(
            args.workdir,
            args.out,
            args.step,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            force=args.force,
            progress=bar,
        )
    except (ValueError, OSError) as e:
        bar.close()
        print(f"export_run: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    bar.close()
    print(f"wrote {out} in {time.monotonic() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
