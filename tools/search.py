#!/usr/bin/env python
"""Search with a trained retriever from the command line: a query (text and/or an image) against a pool, top k.

    python tools/search.py --embeddings RUN/eval/STEP/embeddings [--pool global|local:TASK] \\
        --text "a dog on a beach" [--image q.jpg] [--task mscoco_task0 | --instruction "..."] [--k 10]
    python tools/search.py --model EXPORT_OR_RUN --folder DIR --text "a dog on a beach" [--k 10]

``--embeddings``: a run's evaluation embeddings (``--mode=eval`` or ``--mode=embed`` wrote them); the query is
embedded with the model they came from (their manifest's run and step) unless ``--model`` names another, and
hits are shown with their text and image path from the M-BEIR pool file. ``--pool``: ``global`` (the union
pool; default when it was embedded) or ``local:TASK``. ``--folder``: every image (``.jpg .jpeg .png .webp
.bmp .gif``) and every non-empty line of every ``.txt`` file under DIR is a candidate, embedded now.
``--model``: an exported directory (``tools/export_run.py``) or a run directory (``--step``: default its
latest checkpoint). Search is exact (inner product of unit vectors: cosine). ``--json``: one JSON object a
hit instead of the table. Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="search.py", description=__doc__.split("\n\n")[0])
    pool = parser.add_mutually_exclusive_group(required=True)
    pool.add_argument("--embeddings", type=Path, help="a run's evaluation embeddings directory")
    pool.add_argument("--folder", type=Path, help="a folder of images and .txt files to embed and search")
    parser.add_argument("--pool", default=None, help="with --embeddings: global or local:TASK")
    parser.add_argument("--model", type=Path, default=None, help="exported directory or run (default: the embeddings')")
    parser.add_argument("--step", type=int, default=None, help="with a run as --model: its checkpoint")
    parser.add_argument("--text", default=None, help="the query's text")
    parser.add_argument("--image", type=Path, default=None, help="the query's image")
    parser.add_argument("--task", default=None, help="M-BEIR task whose first instruction the query takes")
    parser.add_argument("--instruction", default=None, help="the query's instruction")
    parser.add_argument("--k", type=int, default=10, help="hits to show (default 10)")
    parser.add_argument("--json", action="store_true", help="one JSON object a hit")
    return parser


def folder_candidates(folder: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(labels, API inputs) of the candidates under ``folder``, in path order."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such directory")
    labels, items = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            labels.append(str(path))
            items.append({"image": path})
        elif path.suffix.lower() == ".txt":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    labels.append(f"{path}:{n}")
                    items.append({"text": line.strip()})
    if not items:
        raise ValueError(f"{folder}: no images ({' '.join(IMAGE_SUFFIXES)}) or .txt lines to search")
    return labels, items


def _pool(emb: Any, pool: str | None) -> tuple[str, list[str], Any]:
    pools = emb.manifest.get("pools", [])
    pool = pool or ("global" if "global" in pools else f"local:{emb.tasks[0]}")
    if pool == "global":
        ids, vectors = emb.global_pool()
    elif pool.startswith("local:"):
        ids, vectors = emb.local_pool(pool.split(":", 1)[1])
    else:
        raise ValueError(f"--pool must be global or local:TASK, got {pool!r}")
    return pool, ids, vectors


def _described(root: str, split: str, pool: str, ids: list[str]) -> dict[str, Any]:
    from mmret.data.bad_records import BadRecords
    from mmret.data.mbeir import read_global_pool, read_local_pool

    bad = BadRecords("skip")
    if pool == "global":
        return read_global_pool(root, split, bad=bad)
    return read_local_pool(root, pool.split(":", 1)[1], split, bad=bad)


def search(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The hits, best first: rank, score, id and what the candidate holds."""
    import numpy as np

    import mmret
    from mmret.eval.index import exact_search

    if args.text is None and args.image is None:
        raise ValueError("give the query's --text and/or --image")
    if args.k <= 0:
        raise ValueError(f"--k must be positive, got {args.k}")
    info: dict[str, Any] = {}
    if args.embeddings is not None:
        from mmret.eval.embed import Embeddings

        emb = Embeddings(args.embeddings)
        pool, ids, vectors = _pool(emb, args.pool)
        source = emb.manifest.get("source", {})
        model, step = args.model, args.step
        if model is None:
            if "workdir" not in source:
                raise ValueError(f"{args.embeddings}: the embeddings name no run; give --model")
            model, step = Path(source["workdir"]), source.get("step", step)
        info = _described(emb.manifest["mbeir_root"], emb.manifest["split"], pool, ids)
    else:
        if args.model is None:
            raise ValueError("--folder needs --model (an exported directory or a run)")
        model, step = args.model, args.step
    retriever = mmret.Retriever.from_pretrained(model, step=step)
    if args.folder is not None:
        ids, items = folder_candidates(args.folder)
        vectors = retriever.encode_candidates(items)
    query = {"text": args.text, "image": args.image}
    query = {k: v for k, v in query.items() if v is not None}
    q = retriever.encode_queries([query], instruction=args.instruction, task=args.task)
    order, scores = exact_search(q, np.asarray(vectors), args.k)
    hits = []
    for rank, (i, s) in enumerate(zip(order[0], scores[0], strict=True), 1):
        c = info.get(ids[i])
        hit = {"rank": rank, "score": round(float(s), 5), "id": ids[i]}
        if c is not None:
            hit.update(text=c.text, image=c.image_path)
        hits.append(hit)
    return hits


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        hits = search(args)
    except (ValueError, OSError) as e:
        print(f"search: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.json:
        print("\n".join(json.dumps(h, ensure_ascii=False) for h in hits))
        return 0
    print(f"{'rank':>4}  {'score':>8}  {'id':<24} content")
    for h in hits:
        content = " | ".join(str(h[k]) for k in ("image", "text") if h.get(k))
        print(f"{h['rank']:>4}  {h['score']:>8.4f}  {h['id']:<24} {content[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
