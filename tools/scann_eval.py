#!/usr/bin/env python
"""Search embedded M-BEIR pools and report Recall@1/5/10 per dataset-task (the benchmark's definition).

    python tools/scann_eval.py --embeddings DIR --mbeir_root ROOT --pool local|global --out OUT \
        [--check_exact N] [--method auto|scann|exact] [--num_leaves N] [--num_leaves_to_search N] [--reorder N]

OUT gets <task>.trec (top 50: qid Q0 did rank score tag), report.json, report.md (beside the published
UniIR CLIP_SF and U-MARVEL numbers) and report.png. The report names the search of each index (exact, or
ScaNN with its parameters); --check_exact N measures a ScaNN index against exact search on N sampled
queries per task: the difference of the headline Recall@k (ScaNN - exact) and the neighbour recall@10,
in the report (without it the report says the agreement was not measured). Embeddings come from
tools/embed.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from etils import epath

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scann_eval.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--embeddings", type=epath.Path, required=True, help="an embeddings directory (tools/embed.py)")
    p.add_argument("--mbeir_root", required=True, help="the M-BEIR root (for the qrels)")
    p.add_argument("--pool", choices=("local", "global"), required=True)
    p.add_argument("--out", type=epath.Path, required=True)
    p.add_argument("--tasks", default=None, help="comma-separated dataset-tasks (default: all embedded)")
    p.add_argument("--top", type=int, default=50, help="ranks kept in the TREC files")
    p.add_argument("--check_exact", type=int, default=0, metavar="N", help="queries per task vs exact search")
    p.add_argument("--method", choices=("auto", "scann", "exact"), default="auto")
    for name in ("num_leaves", "num_leaves_to_search", "training_sample_size", "reorder", "brute_force_below"):
        p.add_argument(f"--{name}", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from mmret.eval.evaluate import evaluate
    from mmret.recipe import SearchConfig

    overrides = {
        k: getattr(args, k)
        for k in ("num_leaves", "num_leaves_to_search", "training_sample_size", "reorder", "brute_force_below")
        if getattr(args, k) is not None
    }
    try:
        search = SearchConfig(method=args.method, **overrides)
        tasks = args.tasks.split(",") if args.tasks else None
        evaluate(
            args.embeddings,
            args.mbeir_root,
            args.pool,
            args.out,
            search=search,
            top=args.top,
            check_exact_queries=args.check_exact,
            tasks=tasks,
        )
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"scann_eval.py: {e}", file=sys.stderr)
        return 1
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
