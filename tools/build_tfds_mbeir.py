#!/usr/bin/env python
"""Convert an M-BEIR root into TFDS ArrayRecord datasets with the image bytes embedded (no TensorFlow).

    python tools/build_tfds_mbeir.py --mbeir_root ROOT --out DIR [--splits train,val,test] [--tasks T1,T2]
        [--num_shards N] [--on_bad_record error|skip] [--max_pixels N] [--negatives FILE]
        [--num_workers N] [--progress_every SECONDS] [--force]

DIR gets ``mbeir_queries/1.0.0`` and ``mbeir_candidates/1.0.0`` (TFDS dataset directories, one split per
M-BEIR split), lookup tables under ``index/``, the instructions file and a manifest; see
``mmret.data.tfds_mbeir`` for the layout. Read it with ``tfds.data_source("mbeir_queries", data_dir=DIR,
split="train")`` or train on it with ``mmret.data.stores.ArrayRecordStore(DIR, "train")``.

Every record is validated and every image decoded once under ``--max_pixels``. DIR is written beside
itself under a temporary name and renamed at the end, so it is either absent, the old contents (with
``--force``) or complete. Exit status: 0 built (skips, if any, are reported), 1 the build failed (a bad
record under ``--on_bad_record error``, a missing file, an empty split, an I/O error), 2 a usage error or
an existing non-empty DIR without ``--force``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from etils import epath

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(_REPO_ROOT))

from mmret.atomic_dir import OutputExistsError  # noqa: E402
from mmret.data.bad_records import BadRecordError  # noqa: E402
from mmret.data.images import DEFAULT_MAX_PIXELS  # noqa: E402
from mmret.data.mbeir import SPLITS, dataset_task  # noqa: E402
from mmret.data.tfds_mbeir import BuildError, build_tfds_mbeir  # noqa: E402


class UsageError(Exception):
    """A problem with the command line (reported without a traceback)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert an M-BEIR root into TFDS ArrayRecord datasets with embedded image bytes (no TensorFlow).",
    )
    parser.add_argument("--mbeir_root", required=True, type=epath.Path, help="the M-BEIR root directory (read)")
    parser.add_argument("--out", required=True, type=epath.Path, help="output directory (created)")
    parser.add_argument(
        "--splits",
        default=",".join(SPLITS),
        help="comma-separated M-BEIR splits to build (default: train,val,test)",
    )
    parser.add_argument(
        "--tasks",
        default=None,
        help="comma-separated dataset-tasks, e.g. cirr_task7,mscoco_task0 (default: the 16 evaluated ones; "
        "then each split's pool is its global union pool when the root has one)",
    )
    parser.add_argument(
        "--query_file",
        default="auto",
        choices=["auto", "union_up", "union", "per_task"],
        help="where a split's queries come from, as data.query_file: auto (default: train / val from their union "
        "file, query/union_train/mbeir_union_up_train.jsonl or query/union_val/mbeir_union_val.jsonl, when the "
        "root has one; else the per-task files), a union file, or the per-task files",
    )
    parser.add_argument(
        "--num_shards",
        type=_positive_int,
        default=None,
        help="at most this many contiguous shards per split of each dataset (default: one per ~1 GiB)",
    )
    parser.add_argument(
        "--on_bad_record",
        default="error",
        choices=["error", "skip"],
        help="a bad record (invalid line, bad or missing image, ...) stops the build naming file:line "
        "(error, the default) or is dropped, counted and reported (skip)",
    )
    parser.add_argument(
        "--max_pixels",
        type=_positive_int,
        default=DEFAULT_MAX_PIXELS,
        help=f"images with more pixels are bad records (decompression bombs; default {DEFAULT_MAX_PIXELS})",
    )
    parser.add_argument(
        "--negatives",
        type=epath.Path,
        default=None,
        help="a hard-negatives file for the train queries, validated against the train pool and copied "
        "to DIR/negatives/train.jsonl (needs the train split)",
    )
    parser.add_argument(
        "--num_workers",
        type=_non_negative_int,
        default=0,
        help="processes that read and decode images (default 0: in this process)",
    )
    parser.add_argument(
        "--progress_every",
        type=_non_negative_float,
        default=None,
        metavar="SECONDS",
        help="seconds between progress redraws, one bar per split and dataset on stdout (default: a live bar "
        "on a terminal, a line every 10 s in a log; 0: no progress)",
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it is a non-empty directory")
    return parser.parse_args(argv)


def _split_list(text: str, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise UsageError(f"--{what} is empty")
    return items


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = _parse_args(argv)
    try:
        splits = _split_list(args.splits, "splits")
        for split in splits:
            if split not in SPLITS:
                raise UsageError(f"--splits: unknown split {split!r} (choose from {', '.join(SPLITS)})")
        tasks = None
        if args.tasks is not None:
            try:
                tasks = [dataset_task(t) for t in _split_list(args.tasks, "tasks")]
            except ValueError as e:
                raise UsageError(f"--tasks: {e}") from None
        if args.negatives is not None and "train" not in splits:
            raise UsageError("--negatives needs the train split in --splits")
        if not args.mbeir_root.is_dir():
            raise UsageError(f"--mbeir_root {args.mbeir_root}: not a directory")
    except UsageError as e:
        print(f"build_tfds_mbeir: error: {e}", file=sys.stderr)
        return 2
    try:
        report = build_tfds_mbeir(
            args.mbeir_root,
            args.out,
            splits=splits,
            tasks=tasks,
            num_shards=args.num_shards,
            on_bad_record=args.on_bad_record,
            max_pixels=args.max_pixels,
            negatives_file=args.negatives,
            num_workers=args.num_workers,
            progress_every=args.progress_every,
            log=lambda line: print(line, flush=True),
            progress_out=sys.stdout,
            force=args.force,
            query_file=args.query_file,
        )
    except OutputExistsError as e:
        print(f"build_tfds_mbeir: error: {e}", file=sys.stderr)
        return 2
    except (BadRecordError, BuildError, OSError, ValueError) as e:
        print(f"build_tfds_mbeir: error: {e}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
