"""Sequence packing: several examples in one row of a static-shape batch, told apart by segment ids.

A padded batch gives every example a row of ``max_length`` tokens; M-BEIR's inputs are far shorter on average
and very uneven (a caption of a dozen tokens beside an image of 300), so most of the computed tokens are
padding. A packed side lays its ``B`` examples whole into ``R`` rows of the same ``row_length`` (first fit,
longest first, at most ``max_segments`` examples a row): each token carries its example's segment number in
the row (1, 2, ...; 0 is padding), attention stays inside a segment (the model's mask), the M-RoPE positions
are each example's own (they restart per segment: the processor computes them per example), and pooling is
per segment. ``R`` is the smallest of the configured row counts (:attr:`PackingConfig.rows`) the examples fit
in; when none holds them, one example a row (``R = B``, the padded layout in packed form) always does, so no
batch fails and the shapes a run compiles are those few. Chunks of a GradCache batch, and the processes of a
multi-host job, take the largest row count any of them needs (:func:`grow_rows`, :func:`globalize`): rows are
only ever added, empty.

A packed side holds, besides :func:`mmret.data.processor.collate`'s per-token keys (``input_ids``,
``attention_mask``, ``pool_mask`` [R, L]; ``position_ids`` [3, R, L]) and image keys (the images in the order
their tokens come, row by row):

- ``segment_ids`` [R, L] int32: the token's segment in its row (1..S), 0 for padding;
- ``segment_lengths`` [R, S] int32: tokens per segment (``S = max_segments``; 0: no segment);
- ``slot`` [B] int32: where example ``b`` is, ``row * S + segment - 1`` (the examples keep their order:
  per-segment results are gathered back with it);
- ``starts`` [B] int32: the column of example ``b``'s first token in its row;
- ``lengths`` / ``text_tokens`` [B] int32, per example as in the padded batch.

Attention kernels: the model turns ``segment_ids`` into a block-diagonal boolean mask and calls
``jax.nn.dot_product_attention`` as for padded batches, so the GPU path keeps cuDNN's fused attention (it takes
the mask as a bias). Not built here (no accelerator to test it on): TPU's splash attention takes the same
``segment_ids`` as its ``SegmentIds(q, kv)`` and skips the blocks between segments, and cuDNN's packed (THD)
layout takes per-segment offsets (``segment_lengths`` gives them), which would save the masked blocks' FLOPs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmret.data.processor import ProcessedExample, collate_images, text_tokens

#: The per-row keys :func:`grow_rows` extends, with the value an empty row has (None: the pad id); the
#: reranker's pairs add their per-segment answer and target columns.
ROW_KEYS: dict[str, int | None] = {
    "input_ids": None,
    "attention_mask": 0,
    "pool_mask": 0,
    "position_ids": 0,  # [3, R, L]: its rows are axis 1
    "segment_ids": 0,
    "segment_lengths": 0,
    "answer_index": 0,
    "target_positions": 0,
}


@dataclasses.dataclass(frozen=True)
class PackingConfig:
    """The shapes a packed side may take, per batch (per GradCache chunk): bucket ``i`` is ``rows[i]`` rows and
    ``patches[i]`` image patch rows (empty ``patches``: the side's whole patch budget in every bucket). A batch
    takes the first bucket that holds its tokens and its patches, else one example a row with the whole patch
    budget. Empty ``rows``: no packing (padded rows). ``max_segments``: examples per row at most.
    ``row_length``: tokens per row (0: the side's max length; longer rows fit more of the long examples, e.g.
    three image queries of about 330 tokens in 1,000, at the cost of attention over longer rows)."""

    rows: tuple[int, ...] = ()
    patches: tuple[int, ...] = ()
    max_segments: int = 16
    row_length: int = 0

    def __post_init__(self) -> None:
        rows, patches = tuple(int(r) for r in self.rows), tuple(int(p) for p in self.patches)
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "patches", patches)
        if any(r <= 0 for r in rows) or list(rows) != sorted(set(rows)):
            raise ValueError(f"packing.rows must be positive and increasing, got {self.rows!r}")
        if patches and (len(patches) != len(rows) or any(p <= 0 or p % 4 for p in patches)):
            raise ValueError(
                f"packing.patches must give a positive multiple of 4 for each of the {len(rows)} row counts, "
                f"got {self.patches!r}"
            )
        if self.max_segments <= 0:
            raise ValueError(f"packing.max_segments must be positive, got {self.max_segments}")
        if self.row_length < 0:
            raise ValueError(f"packing.row_length must be >= 0 (0: the max length), got {self.row_length}")

    @property
    def enabled(self) -> bool:
        return bool(self.rows)


def is_packed(side: dict[str, Any]) -> bool:
    """Whether a collated side is packed (has ``slot``)."""
    return "slot" in side


def first_fit(lengths: Sequence[int], rows: int, row_length: int, max_segments: int) -> list[list[int]] | None:
    """Examples (indices into ``lengths``) per row: first fit, longest first (ties by index), at most
    ``max_segments`` a row; None when they do not fit in ``rows`` rows. Each row lists its examples in
    placement order."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = int(lengths[i])
        if n > row_length:
            return None
        for r, free in enumerate(room):
            if n <= free and len(bins[r]) < max_segments:
                bins[r].append(i)
                room[r] -= n
                break
        else:
            if len(bins) == rows:
                return None
            bins.append([i])
            room.append(row_length - n)
    return bins


def plan(
    lengths: Sequence[int], cfg: PackingConfig, row_length: int, patches: int = 0, max_patches: int = 0
) -> tuple[list[list[int]], int]:
    """(rows, patch budget) of the first bucket that holds examples of ``lengths`` with ``patches`` patch rows
    in all, else (one example a row, ``max_patches``)."""
    for i, rows in enumerate(cfg.rows):
        if rows >= len(lengths):
            break
        budget = cfg.patches[i] if cfg.patches else max_patches
        if patches > budget:
            continue
        bins = first_fit(lengths, rows, row_length, cfg.max_segments)
        if bins is not None:
            return bins + [[] for _ in range(rows - len(bins))], budget
    return [[i] for i in range(len(lengths))], max_patches


def pack(
    examples: Sequence[ProcessedExample],
    cfg: PackingConfig,
    *,
    row_length: int,
    max_patches: int,
    max_images: int,
    pad_token_id: int,
    pixel_dtype: Any = np.float32,
    patch_dim: int = 3 * 2 * 14 * 14,
) -> dict[str, np.ndarray]:
    """A packed side of ``examples`` (see the module docstring): rows of ``cfg.row_length`` tokens, else
    ``row_length`` (the side's max length); ``max_patches``: the patch budget of one example a row.
    ``ValueError`` when an example is longer than a row or the images do not fit ``max_patches``."""
    if cfg.row_length:
        if cfg.row_length < row_length:
            raise ValueError(f"packing.row_length={cfg.row_length} is shorter than the max length {row_length}")
        row_length = cfg.row_length
    for b, ex in enumerate(examples):
        if ex.length > row_length:
            raise ValueError(f"example {b} has {ex.length} tokens, more than max_length={row_length}")
    n_patches = sum(ex.num_patches for ex in examples)
    bins, max_patches = plan([ex.length for ex in examples], cfg, row_length, n_patches, max_patches)
    rows, s_max = len(bins), cfg.max_segments
    input_ids = np.full((rows, row_length), pad_token_id, dtype=np.int32)
    attention = np.zeros((rows, row_length), dtype=np.int32)
    pool = np.zeros((rows, row_length), dtype=np.int32)
    segments = np.zeros((rows, row_length), dtype=np.int32)
    positions = np.zeros((3, rows, row_length), dtype=np.int32)
    segment_lengths = np.zeros((rows, s_max), dtype=np.int32)
    slot = np.zeros(len(examples), dtype=np.int32)
    starts = np.zeros(len(examples), dtype=np.int32)
    for r, members in enumerate(bins):
        col = 0
        for s, b in enumerate(members):
            ex = examples[b]
            span = slice(col, col + ex.length)
            input_ids[r, span] = ex.input_ids
            attention[r, span] = ex.attention_mask
            pool[r, span] = ex.pool_mask
            positions[:, r, span] = ex.position_ids
            segments[r, span] = s + 1
            segment_lengths[r, s] = ex.length
            slot[b], starts[b] = r * s_max + s, col
            col += ex.length
    in_row_order = [examples[b] for members in bins for b in members]
    images = collate_images(
        in_row_order, max_patches=max_patches, max_images=max_images, pixel_dtype=pixel_dtype, patch_dim=patch_dim
    )
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "pool_mask": pool,
        "position_ids": positions,
        "segment_ids": segments,
        "segment_lengths": segment_lengths,
        **images,
        "slot": slot,
        "starts": starts,
        "lengths": np.array([ex.length for ex in examples], np.int32),
        "text_tokens": text_tokens(examples),
    }


def num_rows(side: dict[str, Any]) -> int:
    """Rows of a packed side (of one chunk: a chunked side's rows are axis 1)."""
    return int(side["input_ids"].shape[-2])


def num_patches(side: dict[str, Any]) -> int:
    """Patch rows of a side's image budget (of one chunk)."""
    return int(side["pixel_values"].shape[-2])


def grow_patches(side: dict[str, Any], patches: int) -> dict[str, Any]:
    """``side`` with zero patch rows appended up to ``patches``, covered by the filler grid row (unchunked)."""
    extra = patches - num_patches(side)
    if extra < 0:
        raise ValueError(f"cannot shrink a side's {num_patches(side)} patch rows to {patches}")
    if extra == 0:
        return side
    if extra % 4:
        raise ValueError(f"patch rows grow by multiples of 4, not {extra}")
    out = dict(side)
    px = side["pixel_values"]
    out["pixel_values"] = np.concatenate([px, np.zeros((extra, px.shape[1]), px.dtype)])
    out["patch_mask"] = np.concatenate([side["patch_mask"], np.zeros(extra, side["patch_mask"].dtype)])
    grid = side["image_grid_thw"].copy()
    filler = int(np.sum(side["image_mask"]))  # the row after the images
    if filler >= grid.shape[0]:
        raise ValueError(f"no grid row left for the filler of {extra} added patch rows")
    grid[filler] = (1, 2, int(grid[filler, 2] if grid[filler, 0] else 0) + extra // 2)
    out["image_grid_thw"] = grid
    return out


def grow_rows(side: dict[str, Any], rows: int, pad_token_id: int = 0) -> dict[str, Any]:
    """``side`` with empty rows appended up to ``rows`` (``slot`` stays valid); chunked sides (a leading chunk
    axis) too. The new rows' ``input_ids`` are ``pad_token_id`` (masked out: the value changes nothing)."""
    extra = rows - num_rows(side)
    if extra < 0:
        raise ValueError(f"cannot shrink a packed side of {num_rows(side)} rows to {rows}")
    if extra == 0:
        return side
    chunked = side["input_ids"].ndim == 3
    out = dict(side)
    for key, fill in ROW_KEYS.items():
        if key not in side:
            continue
        x = side[key]
        axis = int(chunked) + int(key == "position_ids")
        shape = (*x.shape[:axis], extra, *x.shape[axis + 1 :])
        out[key] = np.concatenate([x, np.full(shape, pad_token_id if fill is None else fill, x.dtype)], axis=axis)
    return out


def grow(side: dict[str, Any], rows: int, patches: int, pad_token_id: int = 0) -> dict[str, Any]:
    """``side`` (unchunked) grown to ``rows`` rows and ``patches`` patch rows."""
    return grow_patches(grow_rows(side, rows, pad_token_id), patches)


def grow_chunks(side: dict[str, Any], rows: int, patches: int, pad_token_id: int = 0) -> dict[str, Any]:
    """:func:`grow` of a side, or of each GradCache chunk of a chunked side (a leading chunk axis)."""
    if side["input_ids"].ndim != 3:
        return grow(side, rows, patches, pad_token_id)
    n = len(side["input_ids"])
    parts = [grow({k: v[i] for k, v in side.items()}, rows, patches, pad_token_id) for i in range(n)]
    return {k: np.stack([p[k] for p in parts]) for k in side}


def stack_chunks(chunks: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Chunks of a GradCache side stacked on a leading axis, packed chunks first grown to the rows and patch
    rows of the largest."""
    if is_packed(chunks[0]):
        rows, patches = max(num_rows(c) for c in chunks), max(num_patches(c) for c in chunks)
        chunks = [grow(c, rows, patches, pad_token_id) for c in chunks]
    return {k: np.stack([c[k] for c in chunks]) for k in chunks[0]}


def globalize(side: dict[str, Any], pad_token_id: int = 0) -> dict[str, Any]:
    """This process's block of a global packed side: grown to the rows and patch rows of the largest block
    of any process (one small all-gather when there are several), ``slot`` offset past the rows of the
    processes before it (blocks are concatenated along the rows in process order)."""
    import jax

    from mmret.multihost import max_over_processes

    rows, patches = max_over_processes([num_rows(side), num_patches(side)])
    out = grow_chunks(side, rows, patches, pad_token_id)
    offset = jax.process_index() * rows * side["segment_lengths"].shape[-1]
    return {**out, "slot": out["slot"] + np.int32(offset)} if offset else out


def real_fraction(side: dict[str, Any]) -> float:
    """Real tokens over computed tokens of a collated side (packed or padded)."""
    return float(np.sum(side["attention_mask"])) / float(np.size(side["attention_mask"]))
