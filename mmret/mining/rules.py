"""Hard-negative rules: one query's ranked retrieval -> its negatives. Pure functions (no I/O of their own:
what a candidate is, and whether it is a false negative, are passed in).

Inputs, for one query: ``ranked`` (retrieved dids, best first: the search's top ``top_k``) and their
``scores``; ``positives`` (the training record's whole ``pos_cand_list``); ``is_false_negative`` (a
predicate on a did, e.g. :class:`mmret.mining.false_negatives.FalseNegatives`: same content as a positive);
``pool`` (every did of the searched pool, for the random fallback); ``n`` negatives; ``rng`` (from
:func:`query_rng`: seed and qid only, so the draw depends neither on the order queries are processed in
nor on how many hosts mine).

A candidate is *eligible* when it is not a positive and not a false negative. Every rule keeps the
retrieved order (ties stay as the search broke them) and returns its picks sorted by rank, then the random
fallback (:func:`random_fill`: eligible pool candidates outside the retrieved list) in draw order. Each
pick is a :class:`Negative` (did, 1-based ``rank`` in ``ranked``, 0 for a random one; ``score``, None for a
random one; ``kind``).

* :func:`umarvel` (U-MARVEL's stage 4): the first ``n`` eligible ranks, kind ``"hard"``.
* :func:`mmembed` (MM-Embed's modality-aware mining): kind a ``"modality"``, eligible candidates within the
  top ``modality_top`` whose modality differs from the task's target modality; kind b ``"beyond_cut"``,
  eligible target-modality candidates ranked beyond ``rank_cut`` (rank > rank_cut, within ``ranked``).
  See its docstring for the exact split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np

HARD = "hard"
MODALITY = "modality"
BEYOND_CUT = "beyond_cut"
RANDOM = "random"
KINDS = (HARD, MODALITY, BEYOND_CUT, RANDOM)

#: Random draws tried before the fallback enumerates the eligible pool (then only a few are left).
_DRAWS_PER_NEGATIVE = 16


@dataclasses.dataclass(frozen=True)
class Negative:
    """One mined negative: ``rank`` 1-based in the retrieved list (0: random), ``score`` (None: random)."""

    did: str
    rank: int
    score: float | None
    kind: str


def query_rng(seed: int, qid: str) -> np.random.Generator:
    """The generator of ``qid``'s random fallback: a function of ``(seed, qid)`` only."""
    digest = hashlib.blake2b(f"{seed}\x00{qid}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _never(did: str) -> bool:
    return False


def random_fill(
    count: int,
    pool: Sequence[str],
    rng: np.random.Generator,
    exclude: Callable[[str], bool],
) -> list[Negative]:
    """``count`` distinct random pool dids for which ``exclude`` is false (fewer when the pool runs out).

    Draws ``rng.integers(len(pool))`` one at a time, skipping excluded and repeated dids; after
    ``16 * count + 16`` draws the rest come from a ``rng.permutation`` of the pool (only a nearly
    exhausted pool gets there), so a pool of millions is never permuted for a usual query."""
    out: list[Negative] = []
    taken: set[str] = set()
    if count <= 0 or not pool:
        return out
    for _ in range(_DRAWS_PER_NEGATIVE * (count + 1)):
        did = pool[int(rng.integers(len(pool)))]
        if did not in taken and not exclude(did):
            taken.add(did)
            out.append(Negative(did, 0, None, RANDOM))
            if len(out) == count:
                return out
    for i in rng.permutation(len(pool)):
        did = pool[int(i)]
        if did not in taken and not exclude(did):
            taken.add(did)
            out.append(Negative(did, 0, None, RANDOM))
            if len(out) == count:
                break
    return out


def _fallback_excluder(
    positives: Collection[str], ranked: Sequence[str], is_false_negative: Callable[[str], bool]
) -> Callable[[str], bool]:
    """The random fallback skips positives, every retrieved did (picked already, or passed over by the
    rule: a positive, a false negative, or for :func:`mmembed` a target-modality candidate within the cut)
    and false negatives."""
    retrieved = set(ranked)
    return lambda did: did in positives or did in retrieved or is_false_negative(did)


def umarvel(
    ranked: Sequence[str],
    scores: Sequence[float],
    *,
    positives: Collection[str],
    n: int,
    pool: Sequence[str],
    rng: np.random.Generator,
    is_false_negative: Callable[[str], bool] = _never,
) -> list[Negative]:
    """U-MARVEL's rule: the first ``n`` ranks of ``ranked`` (the top ``top_k``) that are neither positives
    nor false negatives, kind ``"hard"``; when fewer than ``n``, the rest random pool candidates outside
    the retrieved list that are neither (kind ``"random"``, :func:`random_fill`)."""
    out: list[Negative] = []
    seen: set[str] = set()
    for rank, (did, score) in enumerate(zip(ranked, scores, strict=True), 1):
        if len(out) == n:
            break
        if did in positives or did in seen or is_false_negative(did):
            continue
        seen.add(did)
        out.append(Negative(did, rank, float(score), HARD))
    return out + random_fill(n - len(out), pool, rng, _fallback_excluder(positives, ranked, is_false_negative))


def target_share(n: int, share: float) -> int:
    """Kind a's target count: ``n * share`` rounded half up (``round`` would round 2.5 to 2)."""
    return min(n, math.floor(n * share + 0.5))


def mmembed(
    ranked: Sequence[str],
    scores: Sequence[float],
    *,
    positives: Collection[str],
    target_modality: str,
    modality_of: Mapping[str, str] | Callable[[str], str],
    n: int,
    modality_top: int,
    rank_cut: int,
    modality_share: float,
    pool: Sequence[str],
    rng: np.random.Generator,
    is_false_negative: Callable[[str], bool] = _never,
) -> list[Negative]:
    """MM-Embed's modality-aware rule, exactly:

    1. Kind a (``"modality"``): eligible candidates of rank <= ``modality_top`` whose modality
       (``modality_of``) is not ``target_modality``, in rank order. Kind b (``"beyond_cut"``): eligible
       candidates of rank > ``rank_cut`` whose modality is ``target_modality``, in rank order. (A
       wrong-modality candidate beyond ``modality_top`` and a target-modality one within ``rank_cut`` are
       neither.)
    2. ``want_a = floor(n * modality_share + 0.5)``; take the first ``min(want_a, len(a))`` of kind a,
       then the first ``n - taken`` of kind b.
    3. Shortfall: more of kind a (after those taken), then random pool candidates outside the retrieved
       list that are neither positives nor false negatives (:func:`random_fill`). (A shortfall of kind a
       is filled by b in step 2 already.)

    The picks are returned sorted by rank, then the random ones. False negatives are asked about lazily,
    only for candidates a step reaches.
    """
    kind_of = modality_of.__getitem__ if isinstance(modality_of, Mapping) else modality_of
    seen: set[str] = set()
    kind_a: list[Negative] = []
    kind_b: list[Negative] = []
    for rank, (did, score) in enumerate(zip(ranked, scores, strict=True), 1):
        if did in positives or did in seen:
            continue
        seen.add(did)
        on_target = kind_of(did) == target_modality
        if not on_target and rank <= modality_top:
            kind_a.append(Negative(did, rank, float(score), MODALITY))
        elif on_target and rank > rank_cut:
            kind_b.append(Negative(did, rank, float(score), BEYOND_CUT))

    def take(candidates: list[Negative], start: int, count: int) -> tuple[list[Negative], int]:
        """Up to ``count`` eligible candidates from ``candidates[start:]``; returns them and where it stopped."""
        got: list[Negative] = []
        i = start
        while len(got) < count and i < len(candidates):
            if not is_false_negative(candidates[i].did):
                got.append(candidates[i])
            i += 1
        return got, i

    picked_a, stop_a = take(kind_a, 0, target_share(n, modality_share))
    picked_b, _ = take(kind_b, 0, n - len(picked_a))
    more_a, _ = take(kind_a, stop_a, n - len(picked_a) - len(picked_b))
    out = sorted(picked_a + picked_b + more_a, key=lambda x: x.rank)
    return out + random_fill(n - len(out), pool, rng, _fallback_excluder(positives, ranked, is_false_negative))
