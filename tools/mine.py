#!/usr/bin/env python
"""Mine hard negatives with a training run's checkpoint (see mmret/mining/mine.py), then print the summary.

    python tools/mine.py --workdir RUN [--step N] [--out DIR]               # the run's config.json mining.*
    python tools/mine.py --workdir RUN --rule mmembed --rank_cut 45 --modality_share 0.5
    python tools/mine.py --workdir RUN --pool local --top_k 100 --tasks cirr_task7,webqa_task1

The options override the run's ``mining`` settings. Output defaults to RUN/mined/<step>: negatives.jsonl
(what data.negatives_file reads), summary.json, and the embeddings/ they were searched in. A rerun with the
same inputs reuses the file; an interrupted one resumes its embeddings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from etils import epath

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mine.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=epath.Path, required=True, help="a training run directory (its config.json)")
    p.add_argument("--step", type=int, default=None, help="run checkpoint (default: the latest; 0: before training)")
    p.add_argument("--out", type=epath.Path, help="output directory (default: RUN/mined/<step>)")
    p.add_argument("--mbeir_root", help="M-BEIR root (default: the run's mining.root or data.root)")
    p.add_argument("--rule", choices=("umarvel", "mmembed"), default=None)
    p.add_argument("--negatives", type=int, default=None, help="negatives per query")
    p.add_argument("--top_k", type=int, default=None, help="ranks searched per query")
    p.add_argument("--pool", choices=("global", "local"), default=None)
    p.add_argument("--split", default=None, help="queries mined (default: train)")
    p.add_argument("--tasks", default=None, help="comma-separated dataset-tasks (default: every one of the split)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random fallback")
    p.add_argument("--modality_top", type=int, default=None, help="mmembed: kind a within these ranks")
    p.add_argument("--rank_cut", type=int, default=None, help="mmembed: kind b beyond this rank")
    p.add_argument("--modality_share", type=float, default=None, help="mmembed: share of kind a")
    p.add_argument("--false_negative_filter", type=_bool, default=None, help="true or false (default: true)")
    p.add_argument("--on_bad_record", choices=("error", "skip"), default=None, help="default: error")
    p.add_argument("--search", choices=("auto", "exact", "scann"), default=None, help="eval.search.method")
    p.add_argument("--batch_size", type=int, default=None, help="embedding batch per host")
    p.add_argument("--shard_size", type=int, default=None, help="embeddings per shard file")
    p.add_argument("--num_workers", type=int, default=None, help="grain worker processes")
    return p


_MINING = (
    "rule",
    "negatives",
    "top_k",
    "pool",
    "split",
    "seed",
    "modality_top",
    "rank_cut",
    "modality_share",
    "false_negative_filter",
    "on_bad_record",
)


def make_config(args: argparse.Namespace):
    from mmret.recipe import as_trainer_config

    path = args.workdir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a training run directory (no config.json)")
    base = json.loads(path.read_text())
    mining = base.setdefault("mining", {})
    for key in _MINING:
        if getattr(args, key) is not None:
            mining[key] = getattr(args, key)
    if args.mbeir_root:
        mining["root"] = args.mbeir_root
    if args.tasks:
        mining["tasks"] = [t for t in args.tasks.split(",") if t]
    ev = base.setdefault("eval", {})
    for key in ("batch_size", "shard_size", "num_workers"):
        if getattr(args, key) is not None:
            ev[key] = getattr(args, key)
    if args.search is not None:
        ev.setdefault("search", {})["method"] = args.search
    return as_trainer_config(base)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = make_config(args)
        from mmret.checkpoints import resolve_step
        from mmret.mining.mine import SUMMARY, mine

        step = resolve_step(args.workdir, args.step)
        out = args.out or args.workdir / "mined" / str(step)
        path = mine(cfg, out, workdir=args.workdir, step=step)
    except (FileNotFoundError, ValueError) as e:
        print(f"mine.py: {e}", file=sys.stderr)
        return 1
    summary = json.loads((path.parent / SUMMARY).read_text())
    summary.pop("key", None)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
