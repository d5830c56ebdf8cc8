"""The store protocol: RawStore and ArrayRecordStore give the same examples, candidates, positives and
images for the same corpus; M-BEIR records render by UniIR's rules; a non-M-BEIR source trains too."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from helpers import uniir_format_string  # noqa: E402
from PIL import Image

from mmret.data import mbeir
from mmret.data.bad_records import BadRecords
from mmret.data.example import Example, Part
from mmret.data.pipeline import PipelineConfig, train_dataset
from mmret.data.processor import Processor, ProcessorConfig
from mmret.data.sources.mbeir import as_store
from mmret.data.stores import ArrayRecordStore, EvalStore, RawStore, Store
from mmret.data.synthetic import write_synthetic_mbeir
from mmret.data.tfds_mbeir import build_tfds_mbeir
from mmret.models.qwen2_vl.processor_files import write_processor_files

BIG = 10**9  # a decode cap that lets every synthetic image through


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "mbeir"
    write_synthetic_mbeir(out, scale="tiny", seed=0)
    return out


@pytest.fixture(scope="module")
def build(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tfds") / "build"
    build_tfds_mbeir(root, out, splits=["train", "test"], num_shards=2)
    return out


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory) -> Processor:
    d = tmp_path_factory.mktemp("proc")
    write_processor_files(d)
    return Processor(d, ProcessorConfig(max_pixels=64 * 28 * 28))


@pytest.mark.parametrize("split", ["train", "test"])
def test_raw_and_array_record_stores_hold_the_same_examples(root: Path, build: Path, split: str) -> None:
    raw, ar = RawStore(root, split), ArrayRecordStore(build, split)
    assert isinstance(raw, Store) and isinstance(ar, Store)
    assert len(raw.queries) == len(ar.queries) > 0
    keys: set[str] = set()
    for epoch in (0, 1):
        a = [raw.query_example(q, seed=3, epoch=epoch) for q in raw.queries]
        b = [ar.query_example(q, seed=3, epoch=epoch) for q in ar.queries]
        assert a == b
    for q, ex in zip(raw.queries, a, strict=True):
        assert ex.positives == q.pos_cand_list and ex.task == mbeir.query_task(q).name
        assert all(raw.candidate_part(d) == ar.candidate_part(d) for d in ex.positives)
        keys |= {ex.query.image} - {None}
    assert [raw.candidate_part(d) for d in raw.pool] == [ar.candidate_part(d) for d in ar.pool]
    assert raw.negatives is None and ar.negatives is None
    for part in [raw.candidate_part(d) for d in raw.pool][:40]:
        keys |= {part.image} - {None}
    for key in sorted(keys)[:60]:
        np.testing.assert_array_equal(
            np.asarray(raw.image(key, max_pixels=BIG)), np.asarray(ar.image(key, max_pixels=BIG)), err_msg=key
        )
    for store in (raw, ar):
        with pytest.raises(KeyError):
            store.candidate_part("9:123456789")


def test_mbeir_queries_render_by_uniirs_rules(root: Path) -> None:
    """Each query part: an instruction among its (dataset, modality, positive modality) options, formatted,
    then the rest of UniIR's ``format_string(instruction + " " + text)``; the record's ids and image."""
    store = RawStore(root, "train")
    table = store.instructions
    assert table is not None
    seen_modalities = set()
    for q in store.queries:
        ex = store.query_example(q, seed=0)
        options = table.lookup(q.dataset_id, q.modality, mbeir.TASK_MODALITIES[q.task_id][1])
        raw_instruction = next(o for o in options if uniir_format_string(o) == ex.query.instruction)
        full = uniir_format_string(f"{uniir_format_string(raw_instruction)} {q.text or ''}")
        joined = f"{ex.query.instruction} {ex.query.text}" if ex.query.text else ex.query.instruction
        assert joined == full
        assert (ex.id, ex.query.image, ex.positives, ex.negatives) == (
            q.qid,
            q.image_path,
            q.pos_cand_list,
            q.neg_cand_list,
        )
        assert ex.query.modality == q.modality and ex.task == mbeir.query_task(q).name
        seen_modalities.add(q.modality)
        cand = store.candidate_part(q.pos_cand_list[0])
        record = store.candidate(q.pos_cand_list[0])
        assert cand == Part(record.did, uniir_format_string(record.text) or None, record.image_path)
        assert cand.modality == record.modality
    assert seen_modalities == {"text", "image", "image,text"}


def test_as_store_wraps_a_holder_of_mbeir_records(root: Path) -> None:
    """An object with M-BEIR ``queries`` / ``instructions`` / ``candidate`` / ``image`` (the evaluation
    store's shape) renders as RawStore does; a Store is returned as it is."""
    raw = RawStore(root, "test", tasks=["cirr_task7"])
    holder = SimpleNamespace(
        queries=raw.queries, instructions=raw.instructions, candidate=raw.candidate, image=raw.image
    )
    wrapped = as_store(holder)
    assert isinstance(wrapped, Store) and as_store(raw) is raw
    assert wrapped.negatives is None
    assert [wrapped.query_example(q, seed=1) for q in holder.queries] == [
        raw.query_example(q, seed=1) for q in raw.queries
    ]
    did = raw.queries[0].pos_cand_list[0]
    assert wrapped.candidate_part(did) == raw.candidate_part(did)


def test_the_evaluation_store_is_a_store(root: Path) -> None:
    """EvalStore renders test queries and candidates as RawStore does, without a wrapper; it has no
    negatives file; with the global pool it reads every local pool (pool_tasks) and the union's members."""
    tasks = ["cirr_task7", "webqa_task1"]
    ev = EvalStore(root, "test", tasks, ["local"], BadRecords("error"))
    raw = RawStore(root, "test", tasks=tasks)
    assert isinstance(ev, Store) and as_store(ev) is ev and ev.negatives is None
    assert ev.queries == list(raw.queries) and list(ev.task_queries) == tasks
    assert [ev.query_example(q, seed=2) for q in ev.queries] == [raw.query_example(q, seed=2) for q in raw.queries]
    assert all(ev.candidate_part(d) == raw.candidate_part(d) for d in raw.pool)
    key = next(q.image_path for q in ev.queries if q.image_path)
    np.testing.assert_array_equal(np.asarray(ev.image(key, max_pixels=BIG)), np.asarray(raw.image(key, max_pixels=BIG)))
    assert ev.skipped() == {} and list(ev.pools) == tasks and ev.members == []
    both = EvalStore(root, "test", tasks, ["local", "global"], BadRecords("error"))
    assert list(both.pools) == mbeir.pool_tasks(root, "test", tasks, ["global"])
    assert list(both.pools)[:2] == tasks and len(both.pools) == len(mbeir.EVAL_TASKS)
    assert both.members == list(mbeir.read_global_pool(root, "test"))


def test_input_files_name_what_an_evaluation_reads(root: Path, tmp_path: Path) -> None:
    files = mbeir.input_files(root, "test", ["cirr_task7"], ["local"])
    assert files == [
        mbeir.instructions_path(root),
        mbeir.query_path(root, "test", "cirr_task7"),
        mbeir.local_pool_path(root, "cirr_task7", "test"),
    ]
    assert mbeir.input_files(root, "test", ["cirr_task7"], ["global"])[-1] == mbeir.global_pool_path(root, "test")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        mbeir.input_files(tmp_path / "absent", "test", ["cirr_task7"], ["local"])


# --------------------------------------------------------------------------------- another kind of source


@dataclasses.dataclass
class CaptionStore:
    """A caption file as a store: each (caption, image) line is a text -> image example whose candidate
    is that line's image; ids are the line numbers (nothing like M-BEIR's ``<dataset>:<n>``)."""

    lines: list[tuple[str, Image.Image]]
    negatives: Any = None

    @property
    def queries(self) -> list[int]:
        return list(range(len(self.lines)))

    def query_example(self, record: int, *, seed: int, epoch: int = 0) -> Example:
        caption, _ = self.lines[record]
        return Example(Part(f"caption-{record}", caption), (f"image-{record}",), task="captions")

    def candidate_part(self, cid: str) -> Part:
        if not cid.startswith("image-"):
            raise KeyError(cid)
        return Part(cid, None, cid)

    def image(self, key: str, *, max_pixels: int) -> Image.Image:
        return self.lines[int(key.removeprefix("image-"))][1]


def test_a_caption_source_trains_without_mbeir_tables(processor: Processor) -> None:
    rng = np.random.default_rng(0)
    lines = [
        (f"A photo number {i}.", Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))) for i in range(10)
    ]
    store = CaptionStore(lines)
    assert isinstance(store, Store)
    cfg = PipelineConfig(
        batch_size=2,
        max_query_length=64,
        max_candidate_length=64,
        max_query_patches=2 * 64,
        max_candidate_patches=2 * 64,
        shuffle=False,
    )
    batch = next(iter(train_dataset(store, processor, cfg, process_index=0, process_count=1)))
    assert batch["meta"]["qids"] == ["caption-0", "caption-1"]
    assert batch["meta"]["dids"] == ["image-0", "image-1"]
    np.testing.assert_array_equal(batch["positive_mask"], np.eye(2, dtype=bool))
    want = processor(text="A photo number 0.").input_ids
    np.testing.assert_array_equal(batch["query"]["input_ids"][0, : len(want)], want)
    want = processor(image=lines[1][1])
    np.testing.assert_array_equal(batch["candidates"]["input_ids"][1, : want.length], want.input_ids)
