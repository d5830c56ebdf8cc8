"""Nearest-neighbour search for offline evaluation: ScaNN (mmret.eval.index, default SearchConfig) against exact
search (mmret.eval.index.exact_search) and faiss-cpu (IVF + 4-bit PQ fast scan + exact refine), on clustered
synthetic L2-normalised vectors. Reports build seconds, queries/s (one batched call over all queries, all cores)
and recall@k against exact search; the target is ScaNN recall@10 >= 0.99 at >= 20x exact search's queries/s.

    python benchmarks/search.py --sweep_leaves 8,15,30           # 1M x 1536, 2,000 queries: ~13 GB peak, ~12 min
    python benchmarks/search.py --n 200000 --no_faiss            # quicker
    python benchmarks/search.py --n 200000 --num_leaves_to_search 50 --reorder 200   # override ScaNN params

Data: a two-level gaussian mixture (superclusters holding clusters, sizes skewed) plus a shared low-rank
within-cluster spread, a common mean direction and isotropic noise, then L2-normalised; queries are fresh draws
from the same mixture. The printed ``data`` line gives the cosine statistics it yields (random pairs, top-1 and
top-10 neighbours) to compare with real embedding pools.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmret.eval.index import build_index, exact_search, recall_against_exact  # noqa: E402
from mmret.recipe import SearchConfig  # noqa: E402


class Mixture:
    """x = mean + supercluster + cluster + low-rank spread + isotropic noise, normalised. Squared norms of the
    parts (before normalising): 0.15, 0.35, 0.5, 0.6 (over ``rank`` dims, decaying spectrum), 0.2."""

    def __init__(self, dim: int, clusters: int, superclusters: int, rank: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)
        self.dim, self.rank = dim, min(rank, dim)
        self.mean = np.sqrt(0.15) * unit(rng.standard_normal(dim))
        supers = np.sqrt(0.35) * unit(rng.standard_normal((superclusters, dim)))
        own = np.sqrt(0.5) * unit(rng.standard_normal((clusters, dim)))
        self.centers = (self.mean + supers[rng.integers(superclusters, size=clusters)] + own).astype(np.float32)
        w = rng.lognormal(0.0, 1.0, size=clusters)  # skewed cluster sizes
        self.weights = w / w.sum()
        self.basis = np.linalg.qr(rng.standard_normal((dim, self.rank)))[0].T.astype(np.float32)  # [rank, dim]
        spectrum = (np.arange(1, self.rank + 1) ** -0.5).astype(np.float32)
        self.spread = (np.sqrt(0.6 / np.sum(spectrum**2)) * spectrum).astype(np.float32)
        self.iso = np.float32(np.sqrt(0.2 / dim))

    def draw(self, n: int, rng: np.random.Generator, out: np.ndarray | None = None, block: int = 65_536) -> np.ndarray:
        """``n`` unit vectors (float32), generated ``block`` rows at a time into ``out`` (allocated if None)."""
        out = np.empty((n, self.dim), np.float32) if out is None else out
        for r0 in range(0, n, block):
            b = min(block, n - r0)
            x = out[r0 : r0 + b]
            rng.standard_normal((b, self.dim), dtype=np.float32, out=x)
            x *= self.iso
            x += self.centers[rng.choice(len(self.weights), size=b, p=self.weights)]
            x += (rng.standard_normal((b, self.rank), dtype=np.float32) * self.spread) @ self.basis
            x /= np.linalg.norm(x, axis=1, keepdims=True)
        return out


def timed(fn, repeats: int = 1):
    """(result of the last call, median seconds over ``repeats`` calls)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, statistics.median(times)


def run_faiss(vectors, queries, exact_ids, k, nlist, train_size, reorder, seed, time_exact, repeats, target=0.99):
    """IVF{nlist},PQ{dim/2}x4fs,RFlat (residual 4-bit PQ over 2-dim blocks, fast scan, exact refine of
    ``reorder`` candidates: ScaNN's layout) trained on ``train_size`` vectors; nprobe swept upward until recall
    reaches ``target``. Returns one row per nprobe tried; the last is timed again interleaved with exact search
    (``time_exact()`` -> exact queries/s) and carries ``exact_qps`` from beside it."""
    try:
        import faiss
    except ImportError:
        print("faiss-cpu not installed (pip install -e '.[bench]'): skipping the faiss peer", flush=True)
        return []
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    n, dim = vectors.shape
    factory = f"IVF{nlist},PQ{dim // 2}x4fs,RFlat"
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed + 1)
    t0 = time.perf_counter()
    index.train(vectors[np.sort(rng.choice(n, size=min(train_size, n), replace=False))])
    for r0 in range(0, n, 262_144):
        index.add(vectors[r0 : r0 + 262_144])
    build_s = time.perf_counter() - t0
    index.k_factor = max(1, reorder // k)
    ivf = faiss.extract_index_ivf(index)
    rows = []
    for nprobe in (4, 8, 16, 32, 64, 128, 256, 512):
        if nprobe > nlist:
            break
        ivf.nprobe = nprobe
        index.search(queries[:16], k)  # warm-up
        (_, ids), s = timed(lambda: index.search(queries, k), repeats=3)
        rows.append(
            {
                "method": f"faiss {factory} nprobe={nprobe} k_factor={index.k_factor}",
                "build_s": round(build_s, 1),
                "qps": round(len(queries) / s, 1),
                "recall": round(recall_against_exact(ids, exact_ids, k), 4),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        if rows[-1]["recall"] >= target:
            break
    exact_qps, faiss_t = [], []
    for _ in range(repeats):
        exact_qps.append(time_exact())
        faiss_t.append(timed(lambda: index.search(queries, k))[1])
    rows[-1]["qps"] = round(len(queries) / statistics.median(faiss_t), 1)
    rows[-1]["exact_qps"] = round(statistics.median(exact_qps), 1)
    print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clusters", type=int, default=4096)
    p.add_argument("--superclusters", type=int, default=64)
    p.add_argument("--rank", type=int, default=128, help="dimension of the within-cluster spread")
    p.add_argument("--exact_queries", type=int, default=200, help="exact search is timed on this many queries")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (medians)")
    for name in ("num_leaves", "num_leaves_to_search", "training_sample_size", "reorder", "dimensions_per_block"):
        p.add_argument(f"--{name}", type=int, default=None, help="ScaNN override (default: SearchConfig's rule)")
    p.add_argument("--anisotropic_quantization_threshold", type=float, default=None)
    p.add_argument("--spherical", type=int, choices=[0, 1], default=None, help="override SearchConfig.spherical")
    p.add_argument("--sweep_leaves", default="", help="also search the built ScaNN index with these leaves_to_search")
    p.add_argument("--no_faiss", action="store_true")
    p.add_argument("--faiss_nlist", type=int, default=None, help="default: ScaNN's num_leaves")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    mix = Mixture(args.dim, args.clusters, args.superclusters, args.rank, args.seed)
    t0 = time.perf_counter()
    vectors = mix.draw(args.n, rng)
    queries = mix.draw(args.queries, rng)
    print(f"data: {args.n} x {args.dim} + {args.queries} queries in {time.perf_counter() - t0:.0f} s", flush=True)

    # Exact search: the ground truth for every query.
    (exact_ids, exact_scores), truth_s = timed(lambda: exact_search(queries, vectors, args.k))
    pairs = rng.integers(args.n, size=(20_000, 2))
    stats = {
        "random_pair_cos": round(float(np.mean(np.sum(vectors[pairs[:, 0]] * vectors[pairs[:, 1]], axis=1))), 3),
        "top1_cos": round(float(exact_scores[:, 0].mean()), 3),
        f"top{args.k}_cos": round(float(exact_scores[:, -1].mean()), 3),
        "ground_truth_s": round(truth_s, 1),
    }
    print("data", json.dumps(stats), flush=True)

    # ScaNN with SearchConfig's defaults (method forced to scann).
    overrides = {
        name: getattr(args, name)
        for name in (
            "num_leaves",
            "num_leaves_to_search",
            "training_sample_size",
            "reorder",
            "dimensions_per_block",
            "anisotropic_quantization_threshold",
            "spherical",
        )
        if getattr(args, name) is not None
    }
    if "spherical" in overrides:
        overrides["spherical"] = bool(overrides["spherical"])
    cfg = SearchConfig(method="scann", **overrides)
    index, build_s = timed(lambda: build_index(vectors, cfg, k=args.k))
    params = index.params
    index.search(queries[:16], args.k)  # warm-up

    # Throughput, interleaved (the cores are shared, so load hits both sides alike): exact search on the first
    # ``exact_queries`` queries, ScaNN on all of them; medians over ``repeats``.
    nq_exact = min(args.exact_queries, args.queries)

    def time_exact() -> float:
        return nq_exact / timed(lambda: exact_search(queries[:nq_exact], vectors, args.k))[1]

    exact_qps_runs, scann_t = [], []
    for _ in range(args.repeats):
        exact_qps_runs.append(time_exact())
        (ids, _), s = timed(lambda: index.search(queries, args.k))
        scann_t.append(s)
    exact_qps = statistics.median(exact_qps_runs)
    rows = [{"method": "exact (mmret exact_search)", "build_s": 0.0, "qps": round(exact_qps, 1), "recall": 1.0}]
    print(json.dumps(rows[-1]), flush=True)
    rows.append(
        {
            "method": "ScaNN (SearchConfig defaults)" if not overrides else f"ScaNN ({overrides})",
            "build_s": round(build_s, 1),
            "qps": round(args.queries / statistics.median(scann_t), 1),
            "recall": round(recall_against_exact(ids, exact_ids, args.k), 4),
            "params": params,
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    for leaves in (int(x) for x in args.sweep_leaves.split(",") if x):
        exact_qps_runs, scann_t = [], []
        index.search(queries[:16], args.k, leaves_to_search=leaves)
        for _ in range(args.repeats):
            exact_qps_runs.append(time_exact())
            (ids, _), s = timed(lambda leaves=leaves: index.search(queries, args.k, leaves_to_search=leaves))
            scann_t.append(s)
        rows.append(
            {
                "method": f"ScaNN, same index, num_leaves_to_search={leaves} at search time",
                "build_s": round(build_s, 1),
                "qps": round(args.queries / statistics.median(scann_t), 1),
                "recall": round(recall_against_exact(ids, exact_ids, args.k), 4),
                "exact_qps": round(statistics.median(exact_qps_runs), 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    index = None  # free ScaNN's copy of the pool before faiss makes its own
    gc.collect()

    if not args.no_faiss:
        rows += run_faiss(
            vectors,
            queries,
            exact_ids,
            args.k,
            args.faiss_nlist or params["num_leaves"],
            params["training_sample_size"],
            params["reorder"],
            args.seed,
            time_exact,
            args.repeats,
        )

    print("\n(ratio: to the exact queries/s timed interleaved beside it; faiss rows before the last: to the first)")
    print(f"| N | dim | method | build s | queries/s | recall@{args.k} vs exact | ratio to exact qps |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["qps"] / r.get("exact_qps", exact_qps)
        cells = [f"{args.n:,}", args.dim, r["method"], r["build_s"], f"{r['qps']:,}", r["recall"], f"{ratio:.1f}x"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    scann_row = rows[1]
    held = scann_row["recall"] >= 0.99 and scann_row["qps"] >= 20 * exact_qps
    print(f"\ntarget (ScaNN recall@{args.k} >= 0.99 at >= 20x exact qps): {'held' if held else 'NOT held'}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None}, "data": stats, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
