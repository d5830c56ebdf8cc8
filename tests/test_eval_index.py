"""Nearest-neighbour search (mmret.eval.index): exact search against a full sort, ScaNN recall, the auto
choice, save/load, check_exact and config validation."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mmret.eval.index import (
    ExactIndex,
    ScannIndex,
    SearchConfig,
    build_index,
    check_exact,
    exact_search,
    load_index,
    recall_against_exact,
)


def full_sort(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: score everything at once, sort by (descending score, ascending index)."""
    s = queries.astype(np.float32) @ vectors.astype(np.float32).T
    index = np.broadcast_to(np.arange(vectors.shape[0]), s.shape)
    order = np.lexsort((index, -s), axis=1)[:, :k]
    return order, np.take_along_axis(s, order, axis=1)


def integer_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """Small integers: every inner product is exact in float32 whatever the summation order, so ties are
    real ties (and frequent)."""
    return np.random.default_rng(seed).integers(-2, 3, size=(n, dim)).astype(np.float32)


def clustered(n: int, dim: int, queries: int, clusters: int = 40, spread: float = 0.6, seed: int = 0):
    """L2-normalised draws from a gaussian mixture, and fresh queries from the same mixture."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)

    def draw(m: int) -> np.ndarray:
        x = centers[rng.integers(clusters, size=m)] + spread * rng.standard_normal((m, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return draw(n), draw(queries)


@pytest.fixture(scope="module")
def pool():
    return clustered(4000, 48, 300)


# --- exact search ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [4096, 1000, 333, 7])  # whole pool, not dividing 2501, tiny
@pytest.mark.parametrize("k", [1, 10, 64])
def test_exact_search_matches_full_sort_with_ties(chunk, k):
    vectors, queries = integer_vectors(2501, 16, seed=1), integer_vectors(50, 16, seed=2)
    ref_ids, ref_scores = full_sort(queries, vectors, k)
    # the data has ties across the cut (more candidates reach the k-th score than k), or the tie rule is untested
    assert ((queries @ vectors.T >= ref_scores[:, -1:]).sum(axis=1) > k).any()
    ids, scores = exact_search(queries, vectors, k, chunk=chunk)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (50, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores)


def test_exact_search_normalised_float_data(pool):
    vectors, queries = pool
    ref_ids, ref_scores = full_sort(queries, vectors, 20)
    ids, scores = exact_search(queries, vectors, 20, chunk=999)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()


@pytest.mark.parametrize("chunk", [10_000, 1000, 3])
def test_duplicates_come_lower_index_first(chunk):
    vectors = integer_vectors(2500, 16, seed=3)
    dup = (5, 999, 1000, 2499)  # across chunk boundaries for chunk=1000
    vectors[list(dup)] = 4.0  # far larger norm than any other row: the duplicates are the top 4 for this query
    ids, scores = exact_search(np.full((2, 16), 1.0, np.float32), vectors, 6, chunk=chunk)
    assert tuple(ids[0, :4]) == dup and tuple(ids[1, :4]) == dup
    assert (scores[:, :4] == 64.0).all() and (scores[:, 4] < 64.0).all()


def test_k_larger_than_pool():
    vectors, queries = integer_vectors(7, 8, seed=4), integer_vectors(3, 8, seed=5)
    ids, scores = exact_search(queries, vectors, 20, chunk=3)
    assert ids.shape == (3, 7) and scores.shape == (3, 7)
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.tile(np.arange(7), (3, 1)))
    np.testing.assert_array_equal(ids, full_sort(queries, vectors, 7)[0])


def test_float16_input(pool):
    vectors, queries = pool
    v16, q16 = vectors.astype(np.float16), queries.astype(np.float16)
    ids, scores = exact_search(q16, v16, 10, chunk=1234)
    assert scores.dtype == np.float32
    ref_ids, ref_scores = exact_search(q16.astype(np.float32), v16.astype(np.float32), 10, chunk=1234)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores)
    index = ExactIndex(v16, chunk=1234)
    assert index.vectors.dtype == np.float16  # kept as given, converted chunk by chunk
    np.testing.assert_array_equal(index.search(q16, 10)[0], ref_ids)


def test_exact_search_rejects_bad_shapes():
    with pytest.raises(ValueError, match="dimension mismatch"):
        exact_search(np.zeros((2, 3), np.float32), np.zeros((5, 4), np.float32), 1)
    with pytest.raises(ValueError, match="empty pool"):
        exact_search(np.zeros((2, 3), np.float32), np.zeros((0, 3), np.float32), 1)
    with pytest.raises(ValueError, match="k must be positive"):
        exact_search(np.zeros((2, 3), np.float32), np.zeros((5, 3), np.float32), 0)


# --- ScaNN ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scann_index(pool):
    return build_index(pool[0], SearchConfig(method="scann"), k=10)


def test_scann_recall_and_exact_scores(pool, scann_index):
    vectors, queries = pool
    assert isinstance(scann_index, ScannIndex)
    assert scann_index.params["min_partition_size"] == 4000 // (8 * 126)  # 1/8 of the sample points per leaf
    ids, scores = scann_index.search(queries, 10)
    assert ids.dtype == np.int64 and ids.shape == (300, 10) and scores.dtype == np.float32
    exact_ids, _ = exact_search(queries, vectors, 10)
    assert recall_against_exact(ids, exact_ids, 10) >= 0.95
    # scores are the reordered exact inner products, sorted descending
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, vectors[ids]), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_search_time_overrides(pool, scann_index):
    vectors, queries = pool
    exact_ids, _ = exact_search(queries, vectors, 10)
    leaves = scann_index.params["num_leaves"]
    one_leaf = recall_against_exact(scann_index.search(queries, 10, leaves_to_search=1)[0], exact_ids, 10)
    every_leaf = recall_against_exact(scann_index.search(queries, 10, leaves_to_search=leaves)[0], exact_ids, 10)
    assert one_leaf < 0.8 and every_leaf == 1.0
    assert scann_index.params["num_leaves_to_search"] == 8  # the built parameters are untouched
    with pytest.raises(ValueError, match="leaves_to_search must be in"):
        scann_index.search(queries, 10, leaves_to_search=leaves + 1)


def test_scann_short_results_are_padded():
    vectors, queries = clustered(300, 16, 5, clusters=10, seed=6)
    cfg = SearchConfig(method="scann", num_leaves=10, num_leaves_to_search=1, reorder=100)
    ids, scores = build_index(vectors, cfg, k=100).search(queries, 100)
    assert ids.shape == (5, 100)
    missing = ids == -1
    assert missing.any(axis=1).all()  # one leaf of ~30 points cannot fill 100 slots
    assert np.isneginf(scores[missing]).all() and np.isfinite(scores[~missing]).all()
    for row, miss in zip(ids, missing, strict=True):
        found = row[~miss]
        assert len(set(found.tolist())) == len(found) and not miss[: len(found)].any()  # misses at the end


def test_auto_picks_exact_below_threshold_and_scann_above(pool):
    vectors = pool[0]
    assert isinstance(build_index(vectors), ExactIndex)  # 4000 < the default threshold
    assert isinstance(build_index(vectors, SearchConfig(brute_force_below=4001)), ExactIndex)
    assert isinstance(build_index(vectors, SearchConfig(brute_force_below=4000)), ScannIndex)
    assert isinstance(build_index(vectors, SearchConfig(method="exact", brute_force_below=0)), ExactIndex)
    assert isinstance(build_index(vectors[:100], SearchConfig(method="scann")), ScannIndex)


def test_save_load_round_trip(pool, scann_index, tmp_path):
    vectors, queries = pool
    exact = ExactIndex(vectors.astype(np.float16), chunk=777)
    for index, name in ((exact, "exact"), (scann_index, "scann")):
        index.save(tmp_path / name)
        moved = tmp_path / f"moved-{name}"  # paths inside the directory are relative
        (tmp_path / name).rename(moved)
        assert json.loads((moved / "index.json").read_text())["kind"] == name
        loaded = load_index(moved)
        assert type(loaded) is type(index)
        for got, want in zip(loaded.search(queries, 10), index.search(queries, 10), strict=True):
            np.testing.assert_array_equal(got, want)
    assert ExactIndex.load(tmp_path / "moved-exact").chunk == 777
    assert ExactIndex.load(tmp_path / "moved-exact", mmap=True).vectors.dtype == np.float16
    with pytest.raises(ValueError, match="kind is 'exact'"):
        ScannIndex.load(tmp_path / "moved-exact")
    with pytest.raises(FileExistsError):
        exact.save(tmp_path / "moved-exact")
    exact.save(tmp_path / "moved-exact", force=True)


def test_saved_scann_index_loads_in_a_fresh_process(pool, scann_index, tmp_path):
    vectors, queries = pool
    scann_index.save(tmp_path / "index")
    np.save(tmp_path / "queries.npy", queries[:20])
    code = (
        "import sys, numpy as np; from mmret.eval.index import load_index; d = sys.argv[1]; "
        "ids, scores = load_index(d + '/index').search(np.load(d + '/queries.npy'), 10); "
        "np.save(d + '/ids.npy', ids); np.save(d + '/scores.npy', scores)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True)
    ids, scores = scann_index.search(queries[:20], 10)
    np.testing.assert_array_equal(np.load(tmp_path / "ids.npy"), ids)
    np.testing.assert_array_equal(np.load(tmp_path / "scores.npy"), scores)


# --- recall ---------------------------------------------------------------------------------------------------


def test_recall_against_exact():
    approx = np.array([[1, 2, 3], [4, 5, 6], [-1, -1, 7]])
    exact = np.array([[3, 2, 9], [7, 8, 9], [7, 1, 2]])
    assert recall_against_exact(approx, exact, 3) == pytest.approx((2 / 3 + 0 + 1 / 3) / 3)
    assert recall_against_exact(approx, exact, 1) == pytest.approx(0.0)
    assert recall_against_exact(exact, exact, 10) == 1.0  # k cut to the list length


def test_check_exact(pool, scann_index):
    vectors, queries = pool
    assert check_exact(ExactIndex(vectors), vectors, queries, 50, k=10) == 1.0
    assert check_exact(scann_index, vectors, queries, 10_000, k=10) >= 0.95  # n above len: all queries
    bad = build_index(vectors, SearchConfig(method="scann", num_leaves=200, num_leaves_to_search=1, reorder=10), k=10)
    bad_recall = check_exact(bad, vectors, queries, 200, k=10, seed=1)
    assert 0.0 < bad_recall < 0.8
    assert bad_recall == check_exact(bad, vectors, queries, 200, k=10, seed=1)  # seeded sample


# --- config ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "faiss"}, "eval.search.method must be one of"),
        ({"num_leaves": 0}, "eval.search.num_leaves must be positive"),
        ({"num_leaves_to_search": -1}, "eval.search.num_leaves_to_search must be positive"),
        ({"training_sample_size": 0}, "eval.search.training_sample_size must be positive"),
        ({"reorder": 0}, "eval.search.reorder must be positive"),
        ({"dimensions_per_block": 0}, "eval.search.dimensions_per_block must be positive"),
        ({"exact_chunk": 0}, "eval.search.exact_chunk must be positive"),
        ({"brute_force_below": -1}, "eval.search.brute_force_below must be a non-negative int"),
        ({"num_leaves": 10, "num_leaves_to_search": 11}, "eval.search.num_leaves_to_search .* must not exceed"),
        ({"anisotropic_quantization_threshold": float("inf")}, "anisotropic_quantization_threshold must be"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**kwargs)


def test_scaled_defaults():
    p = SearchConfig().resolve(1_000_000, k=10)
    assert p["num_leaves"] == 2000 and p["num_leaves_to_search"] == 60
    assert p["training_sample_size"] == 128_000 and p["reorder"] == 100
    assert SearchConfig().resolve(1_000_000, k=50)["reorder"] == 200
    small = SearchConfig().resolve(3000, k=10)
    assert small["num_leaves"] == 110 and small["training_sample_size"] == 3000
    assert SearchConfig().resolve(100_000_000, k=10)["num_leaves"] == 4096
    assert SearchConfig(num_leaves=50, reorder=7).resolve(3000, k=10)["reorder"] == 7
    with pytest.raises(ValueError, match="must not exceed the pool size"):
        SearchConfig(num_leaves=50).resolve(40, k=10)
