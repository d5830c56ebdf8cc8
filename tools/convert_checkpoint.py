#!/usr/bin/env python
"""Convert checkpoints between Hugging Face safetensors and mmret orbax checkpoints (any registered backbone).

    python tools/convert_checkpoint.py from_hf --hf_dir DIR --out CKPT [--dtype D] [--no-scan_layers]
    python tools/convert_checkpoint.py to_hf --ckpt CKPT --out HF_DIR [--max_shard_size 5GB] [--dtype D]

The backbone is the one config.json's ``model_type`` names. Progress is one bar over the tensors
(``mmret.progress``, on stdout; whole lines at most every 10 s when stdout is not a terminal). Outputs are
written beside their destination and renamed into place when complete; an existing non-empty output is
refused unless --force. Errors print one line and exit with status 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description=__doc__.split("\n\n")[0],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{from_hf,to_hf}")

    p = sub.add_parser(
        "from_hf",
        help="Hugging Face directory (safetensors) -> orbax checkpoint",
        description="Read a hub model directory one tensor at a time and write an orbax checkpoint of "
        "its parameters, keeping config.json and the tokenizer / processor files in CKPT/hf_files.",
    )
    p.add_argument("--hf_dir", required=True, help="hub model directory: config.json + *.safetensors")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="parameter dtype to store (default: the source's, e.g. bf16 stays bf16)",
    )
    p.add_argument(
        "--scan_layers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="store the blocks stacked on a leading axis, as scan_layers models hold them (default); "
        "load_model converts either layout",
    )
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress display")

    p = sub.add_parser(
        "to_hf",
        help="orbax checkpoint -> Hugging Face directory (safetensors)",
        description="Write an mmret checkpoint as a hub model directory: safetensors in the hub key "
        "layout, config.json and the tokenizer / processor files the checkpoint kept.",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint directory written by from_hf (or save_params)")
    p.add_argument("--out", required=True, help="hub model directory to create")
    p.add_argument(
        "--max_shard_size",
        default="5GB",
        help="largest safetensors file, e.g. 5GB (= 5e9 bytes, the default), 500MB, 2GiB or bytes; a bigger "
        "model is split into model-0000k-of-0000n.safetensors + model.safetensors.index.json",
    )
    p.add_argument(
        "--dtype", choices=DTYPES, default=None, help="dtype of the written tensors (default: the checkpoint's)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mmret.convert.hf import ConversionError

    start = time.monotonic()
    from mmret.progress import StepsBar

    report = StepsBar(args.command, quiet=args.quiet, out=sys.stdout)
    try:
        if args.command == "from_hf":
            from mmret.convert.checkpoint import convert_from_hf

            out = convert_from_hf(
                args.hf_dir,
                args.out,
                dtype=args.dtype,
                scan_layers=args.scan_layers,
                force=args.force,
                progress=report,
            )
        else:
            from mmret.convert.export import export_to_hf

            out = export_to_hf(
                args.ckpt,
                args.out,
                max_shard_size=args.max_shard_size,
                dtype=args.dtype,
                force=args.force,
                progress=report,
            )
    except (ConversionError, OSError) as e:
        report.close()
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    report.close()
    print(f"wrote {out} in {time.monotonic() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
