#!/usr/bin/env python
"""Write synthetic roots of the three pair layouts, offline and deterministic for a seed.

    python tools/make_synthetic_pairs.py --out DIR [--scale tiny|demo] [--seed N] [--force]

DIR gets ``nli/`` (``data.layout: nli``: SimCSE's ``nli_for_simcse.csv``), ``caption/`` (``caption``: LLaVA's
CC3M-595K ``chat.json`` and ``images/``) and ``beir/`` (``beir``: ``corpus.jsonl``, ``queries.jsonl``,
``qrels/{train,test}.tsv``); every text describes a rendered scene (see ``mmret.data.synthetic.pairs``). The
same seed and scale give byte-identical files. DIR is written beside itself under a temporary name and
renamed into place, so it is either absent, the old contents (with ``--force``) or complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from etils import epath

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(_REPO_ROOT))

from mmret.data.synthetic.pairs import SCALES, write_synthetic_pairs  # noqa: E402


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Write synthetic nli, caption and beir data roots (offline).")
    parser.add_argument("--out", required=True, type=epath.Path, help="output directory (created)")
    parser.add_argument("--scale", default="tiny", choices=list(SCALES), help="sizes (default: tiny)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    parser.add_argument("--force", action="store_true", help="replace --out if it is a non-empty directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = _parse_args(argv)
    try:
        summary = write_synthetic_pairs(args.out, scale=args.scale, seed=args.seed, force=args.force)
    except (ValueError, OSError) as e:
        print(f"make_synthetic_pairs: error: {e}", file=sys.stderr)
        return 2
    print(summary.table())
    print(f"wrote {summary.out} (scale={args.scale}, seed={args.seed}) in {summary.seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
