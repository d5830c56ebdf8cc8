"""The grain training and embedding pipelines on the synthetic M-BEIR corpus."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mmret.data.bad_records import BadRecordError, BadRecords
from mmret.data.negatives import read_negatives, write_negatives
from mmret.data.pipeline import (
    EncodeTrainExample,
    PipelineConfig,
    candidate_dataset,
    iterate,
    query_dataset,
    train_dataset,
)
from mmret.data.processor import Processor, ProcessorConfig
from mmret.data.stores import RawStore

CFG = PipelineConfig(
    batch_size=4,
    max_query_length=160,
    max_candidate_length=160,
    max_query_patches=4 * 256,
    max_candidate_patches=4 * 256,
)


@pytest.fixture(scope="module")
def root(tiny_mbeir) -> Path:
    return tiny_mbeir  # the session's tiny corpus (tests/conftest.py): read only, copied where a test breaks it


@pytest.fixture(scope="module")
def processor(processor_dir) -> Processor:
    return Processor(processor_dir, ProcessorConfig(max_pixels=64 * 28 * 28))


@pytest.fixture(scope="module")
def store(root) -> RawStore:
    return RawStore(root, "train")


def take(it, n):
    return [next(it) for _ in range(n)]


def arrays(batch) -> dict[str, np.ndarray]:
    flat = {f"query.{k}": v for k, v in batch["query"].items()}
    flat.update({f"candidates.{k}": v for k, v in batch["candidates"].items()})
    flat["positive_mask"] = batch["positive_mask"]
    return flat


def assert_same(a, b):
    fa, fb = arrays(a), arrays(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
    assert a["meta"]["qids"] == b["meta"]["qids"] and a["meta"]["dids"] == b["meta"]["dids"]


def test_batches_have_static_shapes_and_label_positives(store, processor):
    it = iter(train_dataset(store, processor, CFG, process_index=0, process_count=1))
    batches = take(it, 6)
    shapes = {k: v.shape for k, v in arrays(batches[0]).items()}
    assert shapes["query.input_ids"] == (4, 160) and shapes["query.pixel_values"] == (1024, 1176)
    assert shapes["candidates.position_ids"] == (3, 4, 160)
    for b in batches[1:]:
        assert {k: v.shape for k, v in arrays(b).items()} == shapes
    by_qid = {q.qid: q for q in store.queries}
    for b in batches:
        qids, dids = b["meta"]["qids"], b["meta"]["dids"]
        for i, qid in enumerate(qids):
            assert dids[i] in by_qid[qid].pos_cand_list  # the sampled positive is a labelled one
            assert b["positive_mask"][i, i]
            for j, did in enumerate(dids):
                assert b["positive_mask"][i, j] == (did in by_qid[qid].pos_cand_list)
        # Image tokens in the ids match the patches of each sequence.
        q = b["query"]
        n_tokens = int((q["input_ids"] == processor.image_token_id).sum())
        assert n_tokens * 4 == int(q["patch_mask"].sum()) == int((q["image_grid_thw"].prod(-1) * q["image_mask"]).sum())


def test_deterministic_for_a_seed(store, processor):
    a = take(iter(train_dataset(store, processor, CFG, process_index=0, process_count=1)), 3)
    b = take(iter(train_dataset(store, processor, CFG, process_index=0, process_count=1)), 3)
    for x, y in zip(a, b, strict=True):
        assert_same(x, y)
    other = PipelineConfig(**{**CFG.__dict__, "seed": 1})
    c = take(iter(train_dataset(store, processor, other, process_index=0, process_count=1)), 3)
    assert [x["meta"]["qids"] for x in a] != [x["meta"]["qids"] for x in c]


@pytest.mark.parametrize("workers", [0, 1])
def test_restored_iterator_yields_the_same_batches(store, processor, workers):
    cfg = PipelineConfig(**{**CFG.__dict__, "num_workers": workers})
    it = iter(train_dataset(store, processor, cfg, process_index=0, process_count=1))
    take(it, 3)
    state = it.get_state()
    expected = take(it, 4)
    restored = iter(train_dataset(store, processor, cfg, process_index=0, process_count=1))
    restored.set_state(state)
    for x, y in zip(expected, take(restored, 4), strict=True):
        assert_same(x, y)


def test_hosts_read_disjoint_slices_covering_an_epoch(store, processor):
    from collections import Counter

    cfg = PipelineConfig(**{**CFG.__dict__, "num_epochs": 1, "batch_size": 8})
    seen = []
    for host in range(2):
        ds = train_dataset(store, processor, cfg, process_index=host, process_count=2)
        seen.append(Counter(q for b in ds for q in b["meta"]["qids"]))
    # The store reads the up-sampled union file: a qid repeats once per copy, each copy its own example.
    available = Counter(q.qid for q in store.queries)
    assert max(available.values()) > 1
    assert sum(seen[0].values()) == sum(seen[1].values()) == len(store.queries) // 2 // 8 * 8  # full batches only
    assert seen[0] + seen[1] <= available  # no example read twice across the hosts


def test_hard_negatives_come_from_the_negatives_file(root, processor, tmp_path):
    store = RawStore(root, "train")
    rng = np.random.default_rng(0)
    dids = sorted(store.pool)
    negs = {}
    for q in store.queries:
        choice = [d for d in rng.choice(dids, 6, replace=False) if d not in q.pos_cand_list]
        negs[q.qid] = choice
    path = tmp_path / "negatives.jsonl"
    write_negatives(path, negs.items())
    assert read_negatives(path, pool=store.pool) == {k: tuple(v) for k, v in negs.items()}
    store = RawStore(root, "train", negatives_file=path)
    cfg = PipelineConfig(**{**CFG.__dict__, "num_negatives": 2})
    b = next(iter(train_dataset(store, processor, cfg, process_index=0, process_count=1)))
    assert b["candidates"]["input_ids"].shape[0] == 4 * 3
    qids, dids_b = b["meta"]["qids"], b["meta"]["dids"]
    for i, qid in enumerate(qids):
        own = dids_b[3 * i : 3 * i + 3]
        assert own[1] in negs[qid] and own[2] in negs[qid]


def test_hard_negatives_default_to_the_queries_neg_cand_list(root, processor):
    store = RawStore(root, "train")
    assert store.negatives is None
    listed = {q.qid: set(q.neg_cand_list) - set(q.pos_cand_list) for q in store.queries}
    with_negs = [i for i, q in enumerate(store.queries) if listed[q.qid]]
    assert len(with_negs) > 6
    cfg = PipelineConfig(**{**CFG.__dict__, "num_negatives": 1, "shuffle": False})
    encode = EncodeTrainExample(store, processor, cfg)
    for i in with_negs[:6]:
        ex = encode((i, 0), np.random.default_rng(i))
        assert ex.dids[1] in listed[ex.qid]
    store.queries[0] = dataclasses.replace(store.queries[0], neg_cand_list=())
    with pytest.raises(BadRecordError, match="no_negatives.*neg_cand_list"):
        encode((0, 0), np.random.default_rng(0))


def test_negatives_file_with_unknown_did_is_reported(root, tmp_path):
    path = tmp_path / "negatives.jsonl"
    path.write_text(json.dumps({"qid": "9:1", "neg_cand_list": ["9:99999999"]}) + "\n")
    store = RawStore(root, "train")
    with pytest.raises(BadRecordError, match=r"negatives.jsonl:1: negative_not_in_pool"):
        read_negatives(path, pool=store.pool)


def _corrupt_first_query_image(root: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the corpus whose first image query (train split) points at a truncated file."""
    copy = tmp_path / "mbeir"
    shutil.copytree(root, copy)
    store = RawStore(copy, "train", query_file="per_task")
    query = next(q for q in store.queries if q.image_path)
    (copy / query.image_path).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return copy, query.qid


def test_bad_image_stops_with_the_record_named(root, processor, tmp_path):
    copy, qid = _corrupt_first_query_image(root, tmp_path)
    store = RawStore(copy, "train")
    cfg = PipelineConfig(**{**CFG.__dict__, "num_epochs": 1, "shuffle": False})
    with pytest.raises(BadRecordError, match=rf"mbeir_\w+_train\.jsonl:\d+ \(query {qid}\): bad_image"):
        for _ in train_dataset(store, processor, cfg, process_index=0, process_count=1):
            pass


def test_bad_image_is_skipped_and_counted(root, processor, tmp_path):
    copy, qid = _corrupt_first_query_image(root, tmp_path)
    store = RawStore(copy, "train", query_file="per_task")  # each query once (no up-sampled copies)
    cfg = PipelineConfig(**{**CFG.__dict__, "num_epochs": 1, "shuffle": False, "on_bad_record": "skip"})
    bad = BadRecords("skip")
    qids = [
        q
        for b in iterate(train_dataset(store, processor, cfg, process_index=0, process_count=1), bad)
        for q in b["meta"]["qids"]
    ]
    assert qid not in qids
    assert bad.counts == {"bad_image": 1}
    assert any(qid in line for line in bad.report())


def test_query_and_candidate_pipelines_cover_everything_once(root, processor):
    store = RawStore(root, "test", tasks=["cirr_task7", "webqa_task1"])
    kw = dict(batch_size=8, max_length=160, max_patches=8 * 256, process_index=0, process_count=1)
    qs = list(query_dataset(store, processor, **kw))
    ids = [i for b in qs for i in b["meta"]["ids"]]
    assert ids == [q.qid for q in store.queries]
    assert sum(int(b["valid"].sum()) for b in qs) == len(store.queries)
    assert all(b["input_ids"].shape == (8, 160) for b in qs)
    dids = sorted(store.pool)[:21]
    cs = list(candidate_dataset(store, dids, processor, **kw))
    assert [i for b in cs for i in b["meta"]["ids"]] == dids and cs[-1]["valid"].sum() == 21 - 16


def test_grad_cache_chunks_hold_the_same_examples(store, processor):
    chunked_cfg = PipelineConfig(**{**CFG.__dict__, "grad_cache_chunk": 2})
    flat = next(iter(train_dataset(store, processor, CFG, process_index=0, process_count=1)))
    chunked = next(iter(train_dataset(store, processor, chunked_cfg, process_index=0, process_count=1)))
    assert chunked["meta"]["qids"] == flat["meta"]["qids"]
    q, fq = chunked["query"], flat["query"]
    assert q["input_ids"].shape == (2, 2, 160) and q["pixel_values"].shape == (2, 512, 1176)
    np.testing.assert_array_equal(q["input_ids"].reshape(4, 160), fq["input_ids"])
    np.testing.assert_array_equal(q["position_ids"].transpose(1, 0, 2, 3).reshape(3, 4, 160), fq["position_ids"])
    real = [q["pixel_values"][i][q["patch_mask"][i] > 0] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(real), fq["pixel_values"][fq["patch_mask"] > 0])
    np.testing.assert_array_equal(chunked["positive_mask"], flat["positive_mask"])
    with pytest.raises(ValueError, match="grad_cache_chunk=3 must divide batch_size=4"):
        PipelineConfig(**{**CFG.__dict__, "grad_cache_chunk": 3})


def test_instruction_redrawn_each_epoch(store, processor):
    """A query read in two epochs gets its instruction drawn from (seed, qid, copy, epoch) each time, as
    UniIR draws a fresh one per read; the two epochs' texts are what query_text_parts gives for them."""
    import copy

    from mmret.data.mbeir import query_text_parts

    small = copy.copy(store)
    small.queries = [q for q in store.queries if q.image_path is None][:16]  # text-only: ids are the text's
    n = len(small.queries)
    cfg = dataclasses.replace(CFG, shuffle=False, num_epochs=2)
    batches = take(iter(train_dataset(small, processor, cfg, process_index=0, process_count=1)), 2 * n // 4)
    ids = np.concatenate([b["query"]["input_ids"] for b in batches])
    differs = 0
    for i, query in enumerate(small.queries):
        parts = [query_text_parts(query, store.instructions, seed=cfg.instruction_seed, epoch=e) for e in (0, 1)]
        for epoch, (instruction, text) in enumerate(parts):
            expect = processor(text=text or None, instruction=instruction or None, image=None).input_ids
            np.testing.assert_array_equal(ids[epoch * n + i][: len(expect)], expect)
        differs += parts[0] != parts[1]
    assert differs >= n // 4  # most queries have several instructions


# ------------------------------------------------------------------------ source-neutral examples, mixing


class _LegacyEncode:
    """The training example encoder as it was before source-neutral examples (restated from M-BEIR records:
    query_text_parts / candidate_text straight into the processor), without the skip logic."""

    def __init__(self, store, processor, cfg):
        self.store, self.processor, self.cfg = store, processor, cfg

    def _image(self, path):
        return None if path is None else self.store.image(path, max_pixels=self.cfg.max_decode_pixels)

    def __call__(self, item, rng):
        from mmret.data.mbeir import candidate_text, query_text_parts
        from mmret.data.pipeline import TrainExample

        index, epoch = item
        query = self.store.queries[index]
        positive = query.pos_cand_list[int(rng.integers(len(query.pos_cand_list)))]
        negatives = []
        if self.cfg.num_negatives:
            pool = [d for d in query.neg_cand_list if d not in query.pos_cand_list]
            picks = rng.choice(len(pool), self.cfg.num_negatives, replace=len(pool) < self.cfg.num_negatives)
            negatives = [pool[int(i)] for i in picks]
        instruction, text = query_text_parts(
            query, self.store.instructions, seed=self.cfg.instruction_seed, epoch=epoch
        )
        image = self._image(query.image_path)
        encoded = self.processor(text=text or None, image=image, instruction=instruction or None)
        dids = [positive, *negatives]
        cands = [self.store.candidate(d) for d in dids]
        return TrainExample(
            query=encoded,
            candidates=[self.processor(text=candidate_text(c) or None, image=self._image(c.image_path)) for c in cands],
            qid=query.qid,
            dids=dids,
            positives=frozenset(query.pos_cand_list),
            bad=BadRecords(self.cfg.on_bad_record),
        )


def _legacy_train_dataset(store, processor, cfg):
    """The single-store training pipeline as it was before mixing (restated), on one host."""
    import grain

    from mmret.data.pipeline import collate_train

    n = len(store.queries)
    ds = grain.MapDataset.source(range(n)).seed(cfg.seed)
    if cfg.shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(cfg.num_epochs).map_with_index(lambda position, index: (index, position // n))
    ds = ds.random_map(_LegacyEncode(store, processor, cfg))
    ds = ds.batch(cfg.batch_size, drop_remainder=True, batch_fn=lambda exs: collate_train(exs, processor, cfg))
    return ds.to_iter_dataset()


@pytest.mark.parametrize("weight", [1.0, 3.0])
def test_one_source_is_the_stream_of_before(store, processor, weight):
    """A single source (any weight) gives the examples of the pre-mixing pipeline in the same order, with the
    same draws (positives, negatives, instructions per epoch), bitwise."""
    from mmret.data.pipeline import mixed_train_dataset

    small = RawStore(store.root, "train", tasks=["webqa_task1", "cirr_task7"])  # 94 queries
    cfg = dataclasses.replace(CFG, num_negatives=1, seed=5)
    n = len(small.queries) // 4 + 3  # into the second epoch (its instruction redraws)
    expected = take(iter(_legacy_train_dataset(small, processor, cfg)), n)
    got = take(iter(mixed_train_dataset([(small, weight)], processor, cfg, process_index=0, process_count=1)), n)
    for x, y in zip(expected, got, strict=True):
        assert_same(x, y)
    plain = take(iter(train_dataset(small, processor, cfg, process_index=0, process_count=1)), 3)
    for x, y in zip(expected[:3], plain, strict=True):
        assert_same(x, y)


@pytest.mark.parametrize("split", ["train", "test"])
def test_mbeir_render_gives_the_tokens_of_before(root, processor, split):
    """For every task of the synthetic corpus, the source-neutral render (query_example / candidate_part ->
    encode_part) gives the processor outputs of the direct M-BEIR path (query_text_parts / candidate_text
    into the processor), in the train and the evaluation forms."""
    from mmret.data.example import encode_part
    from mmret.data.mbeir import EVAL_TASKS, candidate_text, query_task, query_text_parts

    store = RawStore(root, split)
    by_task = {t.name: [] for t in EVAL_TASKS}
    for q in store.queries:
        by_task[query_task(q).name].append(q)
    assert all(by_task.values())  # every task is there

    def image(path):
        return None if path is None else store.image(path, max_pixels=CFG.max_decode_pixels)

    for queries in by_task.values():
        for q in queries[:4]:
            instruction, text = query_text_parts(q, store.instructions, seed=2, epoch=1)
            example = store.query_example(q, seed=2, epoch=1)
            cand = store.candidate(q.pos_cand_list[0])
            for for_eval in (False, True):
                before = processor(
                    text=text or None, image=image(q.image_path), instruction=instruction or None, for_eval=for_eval
                )
                after = encode_part(example.query, processor, image(example.query.image), for_eval=for_eval)
                _assert_processed_equal(before, after)
                before = processor(text=candidate_text(cand) or None, image=image(cand.image_path), for_eval=for_eval)
                part = store.candidate_part(cand.did)
                _assert_processed_equal(before, encode_part(part, processor, image(part.image), for_eval=for_eval))


def _assert_processed_equal(a, b):
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=field.name)
        else:
            assert x == y, field.name


def _examples(batches):
    """Per example of some batches: (qid, its candidate dids, its query's token ids)."""
    out = []
    for b in batches:
        k = len(b["meta"]["dids"]) // len(b["meta"]["qids"])
        for i, qid in enumerate(b["meta"]["qids"]):
            ids = b["query"]["input_ids"][i]
            out.append((qid, tuple(b["meta"]["dids"][k * i : k * (i + 1)]), ids[ids != 0].tobytes()))
    return out


@pytest.fixture(scope="module")
def two_sources(root):
    a = RawStore(root, "train", tasks=["mscoco_task0"])  # 24 queries
    b = RawStore(root, "train", tasks=["webqa_task1"])  # 46 queries
    assert not {q.qid for q in a.queries} & {q.qid for q in b.queries}
    return a, b


def test_mix_is_in_proportion_and_keeps_each_sources_order(two_sources, processor):
    """Weights 1:3. grain scales them to integer proportions (100:300) and puts element k of the stream in
    source 0 when ceil((k + 1) / 4) > ceil(k / 4): a prefix of k examples holds ceil(k / 4) of source 0 and
    floor(3k / 4) of source 1, each within one example of k * w_i / (w_0 + w_1). Each source's examples
    are that source's own stream (seed + i: order, draws, epochs), interleaved."""
    from mmret.data.pipeline import mixed_train_dataset

    a, b = two_sources
    cfg = dataclasses.replace(CFG, num_negatives=1)
    mixed = _examples(
        take(iter(mixed_train_dataset([(a, 1), (b, 3)], processor, cfg, process_index=0, process_count=1)), 16)
    )
    a_ids = {q.qid for q in a.queries}
    source = [0 if qid in a_ids else 1 for qid, _, _ in mixed]
    for k in range(1, len(mixed) + 1):
        n0 = k - sum(source[:k])
        assert abs(n0 - k / 4) < 1 and abs((k - n0) - 3 * k / 4) < 1, k
    assert sum(source) == 48  # source 1 (46 queries) went into its second epoch
    for i, store in enumerate((a, b)):
        own = [e for e, s in zip(mixed, source, strict=True) if s == i]
        alone = dataclasses.replace(cfg, seed=cfg.seed + i)
        ref = _examples(take(iter(train_dataset(store, processor, alone, process_index=0, process_count=1)), 12))
        assert own == ref[: len(own)]


@pytest.mark.parametrize("workers", [0, 1])
def test_mixed_iterator_restores_mid_stream(two_sources, processor, workers):
    from mmret.data.pipeline import mixed_train_dataset

    cfg = dataclasses.replace(CFG, num_workers=workers)
    sources = [(two_sources[0], 1.0), (two_sources[1], 2.5)]
    it = iter(mixed_train_dataset(sources, processor, cfg, process_index=0, process_count=1))
    take(it, 3)
    state = it.get_state()
    expected = take(it, 4)
    restored = iter(mixed_train_dataset(sources, processor, cfg, process_index=0, process_count=1))
    restored.set_state(state)
    for x, y in zip(expected, take(restored, 4), strict=True):
        assert_same(x, y)


def test_mixed_epoch_length_is_where_a_finite_mix_ends(two_sources, processor):
    """With num_epochs=1 the mix ends when its first source is spent: 24 of mscoco at 1 in 4 bound
    it to 96 examples but webqa's 46 at 3 in 4 end it first, at floor(46 * 4 / 3) = 61."""
    from mmret.data.pipeline import mixed_epoch_length, mixed_train_dataset

    a, b = two_sources
    assert mixed_epoch_length([24, 46], [1, 3]) == 61 and mixed_epoch_length([24, 100], [1, 3]) == 96
    cfg = dataclasses.replace(CFG, num_epochs=1)
    batches = list(mixed_train_dataset([(a, 1), (b, 3)], processor, cfg, process_index=0, process_count=1))
    assert sum(len(x["meta"]["qids"]) for x in batches) == 61 // 4 * 4


@pytest.mark.parametrize("weight", [0, -1.0, float("nan"), float("inf"), "1"])
def test_mix_weights_must_be_positive_numbers(store, processor, weight):
    from mmret.data.pipeline import mixed_train_dataset

    with pytest.raises(ValueError, match="weight must be a positive number"):
        mixed_train_dataset([(store, 1.0), (store, weight)], processor, CFG, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no training sources"):
        mixed_train_dataset([], processor, CFG, process_index=0, process_count=1)
