"""Sequence packing (mmret.data.packing): the layout, and that packed inputs give the padded inputs' embeddings,
reranker scores, losses and gradients (float32), alone, with GradCache and sharded over a mesh."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from mmret import models, sharding
from mmret.data import packing
from mmret.data.packing import PackingConfig
from mmret.data.processor import Processor, ProcessorConfig
from mmret.data.rerank_pairs import PairRenderer, collate_pairs
from mmret.data.rerank_prompts import UMARVEL
from mmret.losses import Temperature
from mmret.models import qwen2_vl
from mmret.models.encoder import Encoder, EncoderConfig
from mmret.models.qwen2_vl.presets import hf_config
from mmret.models.reranker import Reranker
from mmret.models.retriever import Retriever
from mmret.tasks.base import init_state, split_model
from mmret.tasks.bi_encoder.step import StepConfig, make_train_step
from mmret.tasks.reranker.step import reranker_loss

LENGTH, PATCHES = 160, 8 * 64
WORDS = "red blue dog cat a the on in of beach street house tree car sky small large old new".split()


def picture(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def proc(processor_dir) -> Processor:
    return Processor(processor_dir, ProcessorConfig(max_pixels=16 * 28 * 28))


@pytest.fixture(scope="module")
def proc3(tmp_path_factory) -> Processor:
    """Qwen3-VL's processor (patch 16, 32 x 32 pixels a token), images of at most 16 tokens."""
    spec = models.get("qwen3_vl")
    out = tmp_path_factory.mktemp("qwen3_processor")
    spec.write_processor_files(out, spec.preset_config("qwen3vl-tiny"))
    return Processor(out, ProcessorConfig(min_pixels=32 * 32, max_pixels=16 * 32 * 32), model_type="qwen3_vl")


def processor_for(preset: str, proc: Processor, proc3: Processor) -> Processor:
    return proc3 if preset.startswith("qwen3") else proc


def mixed(proc: Processor, n: int, seed: int, *, instruction: bool) -> list:
    """Text-only, image-only and image+text inputs of uneven lengths, images of several sizes."""
    rng = np.random.default_rng(seed)
    sizes = [(56, 56), (56, 84), (84, 56), (112, 56)]
    out = []
    for i in range(n):
        kind = i % 3
        text = " ".join(rng.choice(WORDS, int(rng.integers(2, 20)))) if kind != 1 else None
        image = picture(rng, *sizes[i % len(sizes)]) if kind != 0 else None
        out.append(proc(text=text, image=image, instruction="Find the match." if instruction else None))
    return out


def padded(proc: Processor, examples: list, patches: int = PATCHES) -> dict:
    return proc.collate(examples, max_length=LENGTH, max_patches=patches, max_images=2 * len(examples))


def packed(
    proc: Processor, examples: list, rows: tuple[int, ...], patches: int = PATCHES, segments: int = 16, budgets=()
) -> dict:
    return packing.pack(
        examples,
        PackingConfig(rows=rows, patches=budgets, max_segments=segments),
        row_length=LENGTH,
        max_patches=patches,
        max_images=2 * len(examples),
        pad_token_id=proc.pad_token_id,
        patch_dim=proc.patcher.patch_dim,
    )


def backbone(seed: int = 3, preset: str = "tiny", **options):
    """A random tiny model: Qwen2-VL's, or another backbone's test preset (``qwen2.5vl-tiny``)."""
    if preset != "tiny":
        return models.from_preset(preset, seed=seed, **options)
    return qwen2_vl.create(qwen2_vl.Qwen2VLConfig.from_hf_dict(hf_config("tiny"), **options), seed=seed)


# ------------------------------------------------------------------------------------------------ layout


def test_first_fit_places_every_example_once_within_the_budgets():
    rng = np.random.default_rng(0)
    outcomes = set()
    for _ in range(200):
        lengths = rng.integers(1, 60, int(rng.integers(1, 30))).tolist()
        rows, length, segments = int(rng.integers(1, 12)), 64, int(rng.integers(1, 6))
        bins = packing.first_fit(lengths, rows, length, segments)
        outcomes.add(bins is None)
        if bins is None:  # then each row was full of segments, or more than half full of tokens (longest first)
            n, total = len(lengths), sum(lengths)
            assert any(n > k * segments and total > (rows - k) * length / 2 for k in range(rows + 1))
            continue
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert len(bins) <= rows and all(len(b) <= segments for b in bins)
        assert all(sum(lengths[i] for i in b) <= length for b in bins)
    assert outcomes == {True, False}
    assert packing.first_fit([10, 40, 30, 20, 10], 2, 64, 4) == [[1, 3], [2, 0, 4]]  # longest first, first fit
    assert packing.first_fit([70], 5, 64, 4) is None
    # the padded layout in packed form is the last resort: one example a row
    assert packing.plan([60, 60, 60], PackingConfig(rows=(1, 2)), 64) == ([[0], [1], [2]], 0)
    assert packing.plan([10, 10, 10], PackingConfig(rows=(1, 2)), 64) == ([[0, 1, 2]], 0)
    assert packing.plan([10, 10, 50], PackingConfig(rows=(1, 2)), 64) == ([[2, 0], [1]], 0)
    # a bucket holds the tokens and the patches, or the next is tried
    two = PackingConfig(rows=(1, 2), patches=(8, 16))
    assert packing.plan([10, 10, 10], two, 64, 8, 32) == ([[0, 1, 2]], 8)
    assert packing.plan([10, 10, 10], two, 64, 12, 32) == ([[0, 1, 2], []], 16)
    assert packing.plan([10, 10, 10], two, 64, 20, 32) == ([[0], [1], [2]], 32)


def test_packing_config_rejects_bad_values():
    with pytest.raises(ValueError, match="positive and increasing"):
        PackingConfig(rows=(4, 2))
    with pytest.raises(ValueError, match="max_segments"):
        PackingConfig(rows=(2,), max_segments=0)
    with pytest.raises(ValueError, match="for each of the 2 row counts"):
        PackingConfig(rows=(2, 3), patches=(8,))
    with pytest.raises(ValueError, match="multiple of 4"):
        PackingConfig(rows=(2,), patches=(6,))
    assert not PackingConfig().enabled and PackingConfig(rows=(3,)).enabled


def test_a_packed_side_holds_each_example_whole_with_its_own_positions(proc):
    examples = mixed(proc, 9, 0, instruction=True)
    side = packed(proc, examples, rows=(3, 5))
    rows, length = side["input_ids"].shape
    assert rows in (3, 5) and length == LENGTH and side["segment_lengths"].shape == (rows, 16)
    s = side["segment_lengths"].shape[1]
    for b, ex in enumerate(examples):
        r, seg = divmod(int(side["slot"][b]), s)
        span = slice(int(side["starts"][b]), int(side["starts"][b]) + ex.length)
        np.testing.assert_array_equal(side["input_ids"][r, span], ex.input_ids)
        np.testing.assert_array_equal(side["position_ids"][:, r, span], ex.position_ids)
        np.testing.assert_array_equal(side["pool_mask"][r, span], ex.pool_mask)
        assert (side["segment_ids"][r, span] == seg + 1).all() and side["segment_lengths"][r, seg] == ex.length
    assert int(side["attention_mask"].sum()) == sum(ex.length for ex in examples)
    assert ((side["segment_ids"] > 0) == (side["attention_mask"] > 0)).all()
    # the images come in the order their tokens do, row by row
    order = [b for _, b in sorted((int(side["slot"][b]), b) for b in range(len(examples)))]
    grids = [examples[b].image_grid_thw for b in order if examples[b].image_grid_thw is not None]
    n = len(grids)
    np.testing.assert_array_equal(side["image_grid_thw"][:n], np.concatenate(grids))
    assert side["image_mask"][:n].all() and not side["image_mask"][n:].any()
    assert packing.real_fraction(side) > packing.real_fraction(padded(proc, examples))


def test_grown_rows_are_empty_and_change_nothing_else(proc):
    side = packed(proc, mixed(proc, 6, 1, instruction=False), rows=(2, 3))
    more = packing.grow_patches(side, PATCHES + 64)
    n = int(side["image_mask"].sum())
    assert more["pixel_values"].shape[0] == PATCHES + 64 and not more["patch_mask"][PATCHES:].any()
    assert int(np.prod(more["image_grid_thw"], axis=1).sum()) == PATCHES + 64  # the filler covers the new rows
    np.testing.assert_array_equal(more["image_grid_thw"][:n], side["image_grid_thw"][:n])
    grown = packing.grow_rows(side, packing.num_rows(side) + 2, proc.pad_token_id)
    assert packing.num_rows(grown) == packing.num_rows(side) + 2
    assert (grown["input_ids"][-2:] == proc.pad_token_id).all() and not grown["attention_mask"][-2:].any()
    assert grown["position_ids"].shape[1] == packing.num_rows(grown)
    np.testing.assert_array_equal(grown["slot"], side["slot"])
    stacked = packing.stack_chunks([side, grown], proc.pad_token_id)
    assert stacked["input_ids"].shape[:2] == (2, packing.num_rows(grown))
    assert stacked["position_ids"].shape[:3] == (2, 3, packing.num_rows(grown))
    with pytest.raises(ValueError, match="cannot shrink"):
        packing.grow_rows(grown, 1, proc.pad_token_id)


# ------------------------------------------------------------------------------------------- embeddings


@nnx.jit
def embed(enc: Encoder, batch: dict):
    """``enc(batch)`` compiled with the encoder an argument (closed over, its weights would be constants of the
    program: a tiny model's 151,936-row embedding table made each compile take seconds)."""
    return enc(batch)


@pytest.mark.parametrize(
    "fusion,pooling,attention,preset",
    [
        ("joint", "mean", "bidirectional", "tiny"),
        ("joint", "last", "causal", "tiny"),
        ("late", "mean", "causal", "tiny"),
        ("joint", "mean", "bidirectional", "qwen2.5vl-tiny"),  # window attention in the vision tower
        ("joint", "mean", "bidirectional", "qwen3vl-tiny"),  # DeepStack, patch 16
        ("late", "mean", "causal", "qwen3vl-tiny"),
    ],
)
def test_packed_embeddings_equal_padded_ones(proc, proc3, fusion, pooling, attention, preset):
    proc = processor_for(preset, proc, proc3)
    enc = Encoder(backbone(preset=preset), EncoderConfig(pooling=pooling, fusion=fusion, attention=attention))
    examples = mixed(proc, 9, 2, instruction=True)
    ref = np.asarray(embed(enc, padded(proc, examples)))
    total = sum(ex.num_patches for ex in examples)
    side = packed(proc, examples, rows=(3,), segments=4, budgets=(total,))
    assert packing.num_rows(side) == 3  # really packed: three or more examples a row, no patch to spare
    assert packing.num_patches(side) == total < PATCHES
    got = np.asarray(embed(enc, side))
    np.testing.assert_allclose(got, ref, atol=1e-5)
    if (fusion, pooling, preset) == ("joint", "mean", "tiny"):  # again with room to spare: empty rows and patch rows
        spare = packing.grow(packed(proc, examples, rows=(5,)), 7, PATCHES + 128, proc.pad_token_id)
        np.testing.assert_allclose(np.asarray(embed(enc, spare)), ref, atol=1e-5)


def test_packed_rows_need_each_examples_position_ids(proc):
    side = packed(proc, mixed(proc, 3, 3, instruction=False), rows=(1,))
    model = backbone()
    with pytest.raises(ValueError, match="need position_ids"):
        model(side["input_ids"], side["attention_mask"], segment_ids=side["segment_ids"])


# --------------------------------------------------------------------------------------------- training


def retriever() -> Retriever:
    return Retriever(Encoder(backbone(seed=1), EncoderConfig()), Temperature(0.05))


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def train_examples(proc):
    return mixed(proc, 8, 4, instruction=True), mixed(proc, 8, 5, instruction=False)


def train_batch(proc, queries, cands, *, rows=None, chunks: int = 1) -> dict:
    def side(exs):
        per = len(exs) // chunks
        parts = [exs[i * per : (i + 1) * per] for i in range(chunks)]
        if rows is None:
            made = [padded(proc, p, PATCHES // chunks) for p in parts]
        else:
            made = [packed(proc, p, rows, PATCHES // chunks) for p in parts]
        return made[0] if chunks == 1 else packing.stack_chunks(made, proc.pad_token_id)

    return {"query": side(queries), "candidates": side(cands), "positive_mask": np.eye(len(queries), dtype=bool)}


def test_a_packed_train_step_equals_the_padded_one_plain_and_with_grad_cache(proc, train_examples):
    queries, cands = train_examples
    tx = optax.sgd(0.5)
    graphdef, params, rest = split_model(retriever())
    state = init_state(params, rest, tx)
    plain = jax.jit(make_train_step(graphdef, tx))
    ref, ref_m = plain(state, train_batch(proc, queries, cands))
    batch = train_batch(proc, queries, cands, rows=(2, 4))
    assert packing.num_rows(batch["query"]) < len(queries) and packing.num_rows(batch["candidates"]) < len(cands)
    got, got_m = plain(state, batch)
    gc = jax.jit(make_train_step(graphdef, tx, StepConfig(grad_cache=True)))
    chunked, chunked_m = gc(state, train_batch(proc, queries, cands, rows=(1, 2), chunks=2))
    assert float(ref_m["loss"]) > 0.1
    moved = 0
    for m, s in ((got_m, got), (chunked_m, chunked)):
        np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(m["grad_norm"]), float(ref_m["grad_norm"]), rtol=1e-4)
        for a, b, before in zip(leaves(s.params), leaves(ref.params), leaves(params), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
            moved += int(np.abs(b - before).max() > 1e-6)
    assert moved > 20


def test_a_packed_step_sharded_over_a_mesh_equals_one_device(proc, train_examples):
    queries, cands = train_examples
    tx = optax.sgd(0.5)
    batch = train_batch(proc, queries, cands, rows=(4,))
    graphdef, params, rest = split_model(retriever())
    step = make_train_step(graphdef, tx)
    ref, ref_m = jax.jit(step)(init_state(params, rest, tx), batch)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, params, rest = split_model(sharding.place_model(retriever(), mesh))
    got, got_m = jax.jit(step)(init_state(params, rest, tx), sharding.put_batch(batch, mesh))
    assert batch["query"]["input_ids"].shape[0] == 4  # the rows split over the 4 batch shards
    np.testing.assert_allclose(float(got_m["loss"]), float(ref_m["loss"]), rtol=1e-5)
    for a, b in zip(leaves(got.params), leaves(ref.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


# --------------------------------------------------------------------------------------------- reranker


@pytest.mark.parametrize("preset", ["tiny", "qwen2.5vl-tiny", "qwen3vl-tiny"])
def test_packed_pairs_give_the_padded_pairs_scores_and_loss(proc, proc3, preset):
    proc = processor_for(preset, proc, proc3)
    renderer = PairRenderer(proc, UMARVEL)
    rng = np.random.default_rng(6)
    pairs = []
    for i in range(6):
        q_image = picture(rng, 56, 56) if i % 2 else None
        c_image = picture(rng, 56, 84) if i % 3 else None
        q = " ".join(rng.choice(WORDS, int(rng.integers(2, 9))))
        c = " ".join(rng.choice(WORDS, int(rng.integers(0, 9))))
        pairs.append(renderer(q, q_image, c, c_image, answer=bool(i % 2)))
    kw = dict(
        max_length=320,
        max_patches=12 * 64,
        max_targets=8,
        pad_token_id=proc.pad_token_id,
        patch_dim=proc.patcher.patch_dim,
    )
    ref_batch = collate_pairs(pairs, **kw)
    batch = collate_pairs(pairs, **kw, packing=PackingConfig(rows=(2, 3)))
    assert packing.num_rows(batch) < len(pairs)
    model = Reranker(backbone(seed=5, preset=preset, with_lm_head=True))
    yes, no = renderer.yes_id, renderer.no_id
    labels = np.array([int(i % 2) for i in range(len(pairs))], np.int32)

    @nnx.jit  # the model an argument: closed over, its weights would be constants of the program (slow to compile)
    def run(m, b):
        return m.score(b, yes, no), reranker_loss(m, {**b, "labels": labels}, yes, no)

    (ref_score, (ref_loss, ref_m)), (got_score, (got_loss, got_m)) = run(model, ref_batch), run(model, batch)
    np.testing.assert_allclose(np.asarray(got_score), np.asarray(ref_score), atol=1e-5)
    assert float(ref_loss) > 0.1 and np.ptp(np.asarray(ref_score)) > 1e-3
    np.testing.assert_allclose(float(got_loss), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(float(got_m["p_yes_positive"]), float(ref_m["p_yes_positive"]), atol=1e-6)
