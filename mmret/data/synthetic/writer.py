"""Write a synthetic corpus in the exact M-BEIR layout (ids, pools, qrels, instructions, images).

Layout decisions (those the real release leaves open):

* Candidate pools are shared by the splits, as in the release: ``cand_pool/local/mbeir_<task>_cand_pool.jsonl``
  holds the candidates of the train, val and test queries of that task; MSCOCO's test queries have their own
  ``mbeir_mscoco_task{0,3}_test_cand_pool.jsonl`` and its train/val queries read
  ``mbeir_mscoco_task{0,3}_cand_pool.jsonl``.
  Every positive of every query (any split) is in the pool its split reads; the positives are *all* the
  pool's candidates of the task's candidate modality that answer the query.
* ``cand_pool/global/mbeir_union_test_cand_pool.jsonl`` is the 16 local test pools concatenated in report
  order; ``mbeir_union_{train,val}_cand_pool.jsonl`` likewise for the pools the train / val queries read.
* Ids count per dataset (``"<dataset id>:<n>"``, from 1), queries and candidates separately, so the dids of
  a dataset's two tasks never collide.
* Images are PNG files ``mbeir_images/<dataset>/<n>.png``, written once per dataset and shared by records.
* Qrels: one file per dataset-task and split, ``qrels/<split>/mbeir_<dataset>_task<N>_<split>_qrels.txt``.
  OVEN and InfoSeek test queries also count as positives the other dataset's copy of the same candidate
  (same text and image, the partner task's local test pool), as the real release's qrels do.
* The union query files: ``query/union_train/mbeir_union_up_train.jsonl`` (every training query, the datasets
  UniIR up-samples, :data:`UP_SAMPLED`, filled to twice their size with seeded ``random.choices`` as UniIR's
  generator fills to its per-dataset targets, then shuffled: up-sampled copies repeat a qid),
  ``mbeir_union_train.jsonl`` beside it (each training query once, shuffled) and
  ``query/union_val/mbeir_union_val.jsonl`` (the val queries in dataset order).
* ``neg_cand_list`` holds a query's known same-modality non-answers. Beyond M-BEIR,
  ``hard_negatives/modality_aware_train.jsonl`` (a negatives file) puts before them the training pool's
  wrong-modality candidates of the query's own content, which a modality-biased retriever ranks first.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from etils import epath

from mmret.atomic_dir import PathLike, absolute, as_path, atomic_output_dir
from mmret.data.synthetic.scenes import render
from mmret.data.synthetic.tasks import DATASETS, TASKS, Cand, Context, Picture, Query, SplitData, TaskSpec, make_kb

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Scale:
    """Queries per task and split, and the knowledge-base size."""

    train: int
    val: int
    test: int
    kb: int


SCALES: dict[str, Scale] = {
    "tiny": Scale(train=24, val=8, test=24, kb=64),
    # `make demo`: enough training queries that the tiny model generalises rather than memorises, and 64 test
    # queries per task so that a task's recall moves in steps of 1.6 points rather than 4.2.
    "demo": Scale(train=128, val=8, test=64, kb=64),
    "small": Scale(train=240, val=32, test=96, kb=120),
}

INSTRUCTIONS_HEADER = ("query_modality", "cand_modality", "dataset_name", "dataset_id")
#: Four instructions per dataset-task; each names the modality of what is wanted.
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "visualnews_task0": (
        "Find the news photo that matches this caption",
        "Retrieve the news image described by the caption",
        "Show me the press photograph this caption was written for",
        "Which news picture fits the following caption",
    ),
    "mscoco_task0": (
        "Find an everyday photo that matches the description",
        "Retrieve the image described by this caption",
        "Show me a picture of what the sentence describes",
        "Find the photograph this caption refers to",
    ),
    "fashion200k_task0": (
        "Find the product photo of the clothing item described",
        "Retrieve the image of this fashion product",
        "Show me a picture of the garment in this listing",
        "Which product photo matches the item description",
    ),
    "webqa_task1": (
        "Retrieve a passage that answers the question",
        "Find a text that contains the answer to this question",
        "Which written passage answers the following question",
        "Look up the paragraph that answers this",
    ),
    "edis_task2": (
        "Find the news story, photo and headline together, that this describes",
        "Retrieve the headline with its image matching the description",
        "Which captioned news photo fits this story",
        "Find the image and headline pair for this news story",
    ),
    "webqa_task2": (
        "Find the captioned photo that answers the question",
        "Retrieve an image with its caption that answers this",
        "Which photo, read with its caption, answers the following question",
        "Look up the image and text that answer the question",
    ),
    "visualnews_task3": (
        "Find the caption written for this news photo",
        "Retrieve the news caption of the image",
        "Which caption describes this press photograph",
        "Write down the matching news caption for this picture",
    ),
    "mscoco_task3": (
        "Find a caption that describes this image",
        "Retrieve a sentence describing the picture",
        "Which text describes what this photo shows",
        "Find a description of the image",
    ),
    "fashion200k_task3": (
        "Find the product description of the item in the photo",
        "Retrieve the listing text for this garment",
        "Which item description matches the product photo",
        "Describe this fashion product with the matching text",
    ),
    "nights_task4": (
        "Find the image most similar to this one",
        "Retrieve another picture of the same scene",
        "Which image looks the same as this picture",
        "Find a picture that shows this very scene",
    ),
    "oven_task6": (
        "Retrieve the encyclopedia passage about the object the question points at in the image",
        "Find the text entry naming the object asked about in the picture",
        "Which article describes the object in the image the question refers to",
        "Look up the entry text for the object singled out by the question",
    ),
    "infoseek_task6": (
        "Find the passage that answers the question about an object in the image",
        "Retrieve the text with the answer to this question about the picture",
        "Which passage answers the question about the object shown",
        "Look up the fact asked about the object in the image",
    ),
    "fashioniq_task7": (
        "Find the garment photo that looks like this one with the requested changes",
        "Retrieve the product image matching this item after the described change",
        "Show me a picture of this clothing item modified as described",
        "Which product photo is this garment changed as requested",
    ),
    "cirr_task7": (
        "Find the picture that shows this scene after the described edit",
        "Retrieve the image of this scene changed as the text says",
        "Which photo is this one with the requested modification",
        "Show me an image like this one, edited as described",
    ),
    "oven_task8": (
        "Retrieve the encyclopedia entry, image and text, of the object the question points at",
        "Find the illustrated entry naming the object asked about in the picture",
        "Which image with its article describes the object the question refers to",
        "Look up the picture and entry text of the object singled out by the question",
    ),
    "infoseek_task8": (
        "Find the illustrated passage that answers the question about an object in the image",
        "Retrieve the image and text with the answer to this question about the picture",
        "Which picture with its passage answers the question about the object shown",
        "Look up the illustrated fact asked about the object in the image",
    ),
}


# ------------------------------------------------------------------------------------------------ paths


def query_relpath(task: TaskSpec, split: str) -> str:
    """``query/<split>/mbeir_<dataset>_task<N>_<split>.jsonl``."""
    return f"query/{split}/mbeir_{task.name}_{split}.jsonl"


def local_pool_relpath(task: TaskSpec, split: str) -> str:
    """The local pool the queries of ``split`` read (see the module docstring)."""
    test = "_test" if task.dataset == "mscoco" and split == "test" else ""
    return f"cand_pool/local/mbeir_{task.name}{test}_cand_pool.jsonl"


def global_pool_relpath(split: str) -> str:
    """The union of the 16 local pools that ``split`` reads."""
    return f"cand_pool/global/mbeir_union_{split}_cand_pool.jsonl"


def qrels_relpath(task: TaskSpec, split: str) -> str:
    """One qrels file per dataset-task and split, named after its query file."""
    return f"qrels/{split}/mbeir_{task.name}_{split}_qrels.txt"


UNION_UP_TRAIN_RELPATH = "query/union_train/mbeir_union_up_train.jsonl"
UNION_TRAIN_RELPATH = "query/union_train/mbeir_union_train.jsonl"
UNION_VAL_RELPATH = "query/union_val/mbeir_union_val.jsonl"
#: The datasets UniIR's generator up-samples (its ``up_sampling: True`` rows), here to twice their size.
UP_SAMPLED = ("webqa", "edis", "nights", "fashioniq", "cirr")
UP_SAMPLE_FACTOR = 2
#: Dataset order of UniIR's ``datasets_info`` (the order the union file is assembled in before shuffling).
UNION_ORDER = (
    "visualnews",
    "mscoco",
    "fashion200k",
    "webqa",
    "edis",
    "nights",
    "oven",
    "infoseek",
    "fashioniq",
    "cirr",
)
#: Test queries of these tasks also get the partner task's copy of each positive (OVEN <-> InfoSeek).
CROSS_POSITIVES = {
    "oven_task6": "infoseek_task6",
    "infoseek_task6": "oven_task6",
    "oven_task8": "infoseek_task8",
    "infoseek_task8": "oven_task8",
}


INSTRUCTIONS_RELPATH = "instructions/query_instructions.tsv"
#: Not part of M-BEIR: the training queries' modality-aware hard negatives (a negatives file, see
#: :mod:`mmret.data.negatives`), as MM-Embed's modality-aware mining would find them.
MODALITY_AWARE_NEGATIVES_RELPATH = "hard_negatives/modality_aware_train.jsonl"


# ---------------------------------------------------------------------------------------------- writing


@dataclass
class TaskSummary:
    """Counts for one dataset-task."""

    name: str
    task_id: int
    query_modality: str
    cand_modality: str
    queries: dict[str, int]
    pool: dict[str, int]  # split -> size of the pool that split reads


@dataclass
class Summary:
    """What was written: per-task counts, images, the global test pool size and the wall time."""

    out: epath.Path
    scale: str
    seed: int
    tasks: list[TaskSummary] = field(default_factory=list)
    images: int = 0
    global_pool: int = 0
    seconds: float = 0.0

    def table(self) -> str:
        """A fixed-width table: queries per split and the local test pool size per dataset-task, then totals."""
        head = f"{'dataset-task':<18} {'modalities':<26} {'train':>6} {'val':>5} {'test':>5} {'pool':>6}"
        lines = [head, "-" * len(head)]
        for t in self.tasks:
            mods = f"{t.query_modality} -> {t.cand_modality}"
            lines.append(
                f"{t.name:<18} {mods:<26} {t.queries['train']:>6} {t.queries['val']:>5} "
                f"{t.queries['test']:>5} {t.pool['test']:>6}"
            )
        total = {s: sum(t.queries[s] for t in self.tasks) for s in SPLITS}
        lines.append("-" * len(head))
        lines.append(
            f"{'total':<18} {'':<26} {total['train']:>6} {total['val']:>5} {total['test']:>5} {self.global_pool:>6}"
        )
        lines.append(f"images: {self.images}; global test pool: {self.global_pool} candidates")
        return "\n".join(lines)


def _rng(seed: int, *parts: object) -> random.Random:
    # str seeds are hashed with SHA-512 by random.seed: stable across processes and PYTHONHASHSEED.
    return random.Random("mmret-synthetic/" + "/".join(str(p) for p in (seed, *parts)))


def _src(kind: str, meta: dict[str, object] | None = None) -> str:
    return json.dumps({"source": "mmret-synthetic", "kind": kind, **(meta or {})}, sort_keys=True)


_Content = tuple[str | None, Picture | None]


class _Writer:
    """Id counters, image registry and the lines of every file, for one corpus."""

    def __init__(self, root: Path | epath.Path) -> None:
        self.root = root
        self.qids: dict[str, int] = {}
        self.dids: dict[str, int] = {}
        self.images: dict[str, dict[Picture, str]] = {}
        self.qrels: dict[str, list[str]] = {}  # relpath -> lines
        self.query_lines: dict[tuple[str, str], list[str]] = {}  # (dataset, split) -> query lines
        self.pools: dict[str, list[str]] = {}  # relpath -> candidate lines
        self.modality_aware: list[str] = []  # negatives-file lines of the train queries

    def image_path(self, dataset: str, picture: Picture) -> str:
        registry = self.images.setdefault(dataset, {})
        if picture not in registry:
            registry[picture] = f"mbeir_images/{dataset}/{len(registry) + 1:06d}.png"
        return registry[picture]

    def _next(self, counters: dict[str, int], task: TaskSpec) -> str:
        counters[task.dataset] = counters.get(task.dataset, 0) + 1
        return f"{task.dataset_id}:{counters[task.dataset]}"

    def pool(self, task: TaskSpec, parts: Sequence[SplitData], relpath: str) -> tuple[list[Cand], dict[_Content, str]]:
        """Merge the pools of ``parts`` (identical candidates once), give them dids, keep their lines."""
        merged: dict[_Content, Cand] = {}
        for part in parts:
            for cand in part.pool:
                content = (cand.txt, cand.img)
                if content in merged:
                    merged[content].keys = merged[content].keys | cand.keys
                else:
                    merged[content] = Cand(cand.txt, cand.img, cand.keys, cand.kind)
        dids: dict[_Content, str] = {}
        lines = []
        for content, cand in merged.items():
            dids[content] = did = self._next(self.dids, task)
            record = {
                "did": did,
                "txt": cand.txt,
                "img_path": None if cand.img is None else self.image_path(task.dataset, cand.img),
                "modality": cand.modality,
                "src_content": _src(cand.kind),
            }
            lines.append(json.dumps(record))
        self.pools[relpath] = lines
        return list(merged.values()), dids

    def queries(
        self,
        task: TaskSpec,
        split: str,
        queries: Sequence[Query],
        pool: Sequence[Cand],
        dids: dict[_Content, str],
        partner: dict[_Content, str] | None = None,
    ) -> None:
        """Label positives (all pool candidates of the task's modality answering the key, then the copies of
        the same content in ``partner``, another dataset's pool: content -> did) and write the split."""
        content_of = {did: content for content, did in dids.items()}
        answering: dict[Hashable, list[str]] = {}
        # Same content, wrong modality: what a retriever with a modality bias ranks first (MM-Embed).
        look_alikes: dict[Hashable, list[str]] = {}
        for cand in pool:
            by_key = answering if cand.modality == task.cand_modality else look_alikes
            for key in cand.keys:
                by_key.setdefault(key, []).append(dids[(cand.txt, cand.img)])
        lines = []
        qrels = self.qrels.setdefault(qrels_relpath(task, split), [])
        for q in queries:
            if q.modality != task.query_modality:
                raise AssertionError(f"{task.name}: query modality {q.modality}, expected {task.query_modality}")
            pos = answering.get(q.key, [])
            if not pos:
                raise AssertionError(f"{task.name} {split}: a query without positives ({q.kind}: {q.txt!r})")
            if partner:
                pos = pos + [partner[content_of[d]] for d in pos if content_of[d] in partner]
            neg = []
            for c in q.hard_negs:
                did = dids[(c.txt, c.img)]
                if c.modality == task.cand_modality and did not in pos and did not in neg:
                    neg.append(did)
            qid = self._next(self.qids, task)
            wrong = look_alikes.get(q.key, [])  # never a positive: positives have the task's modality
            if split == "train" and (wrong or neg):
                self.modality_aware.append(json.dumps({"qid": qid, "neg_cand_list": wrong + neg}))
            record = {
                "qid": qid,
                "query_txt": q.txt,
                "query_img_path": None if q.img is None else self.image_path(task.dataset, q.img),
                "query_modality": q.modality,
                "query_src_content": _src(q.kind, q.meta),
                "pos_cand_list": pos,
                "neg_cand_list": neg,
                "task_id": task.task_id,
            }
            lines.append(json.dumps(record))
            qrels += [f"{qid} 0 {did} 1 {task.task_id}" for did in pos]
        _write_lines(self.root / query_relpath(task, split), lines)
        self.query_lines.setdefault((task.dataset, split), []).extend(lines)

    def union_files(self, seed: int) -> None:
        """The union query files (see the module docstring), from the query lines written so far."""
        train = [line for d in UNION_ORDER for line in self.query_lines.get((d, "train"), [])]
        plain = list(train)
        _rng(seed, "union_train").shuffle(plain)
        _write_lines(self.root / UNION_TRAIN_RELPATH, plain)
        up: list[str] = []
        rng = _rng(seed, "union_up_train")
        for dataset in UNION_ORDER:
            lines = list(self.query_lines.get((dataset, "train"), []))
            if dataset in UP_SAMPLED and lines:
                target = UP_SAMPLE_FACTOR * len(lines)
                while len(lines) < target:  # UniIR's load_and_upsample
                    lines.extend(rng.choices(lines, k=target - len(lines)))
            up.extend(lines)
        rng.shuffle(up)
        _write_lines(self.root / UNION_UP_TRAIN_RELPATH, up)
        val = [line for d in UNION_ORDER for line in self.query_lines.get((d, "val"), [])]
        _write_lines(self.root / UNION_VAL_RELPATH, val)


def _write_lines(path: Path | epath.Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))


def _instruction_rows() -> list[str]:
    rows = ["\t".join((*INSTRUCTIONS_HEADER, "prompt_1", "prompt_2", "prompt_3", "prompt_4"))]
    for task in TASKS:
        name = DATASETS[task.dataset][1]
        rows.append(
            "\t".join((task.query_modality, task.cand_modality, name, str(task.dataset_id), *INSTRUCTIONS[task.name]))
        )
    return rows


def write_corpus(root: Path | epath.Path, scale: str = "tiny", seed: int = 0) -> Summary:
    """Write the whole corpus into the existing, empty directory ``root``."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: choose one of {list(SCALES)}")
    sizes = SCALES[scale]
    ctx = Context(make_kb(_rng(seed, "kb"), sizes.kb))
    writer = _Writer(root)
    summary = Summary(root, scale, seed)
    data: dict[str, dict[str, SplitData]] = {}
    pools: dict[tuple[str, str], tuple[list[Cand], dict[_Content, str]]] = {}  # (task, split) -> pool, dids
    for task in TASKS:
        counts = {s: getattr(sizes, s) * (task.train_multiple if s == "train" else 1) for s in SPLITS}
        data[task.name] = {s: task.generate(_rng(seed, task.name, s), counts[s], ctx) for s in SPLITS}
        groups = [("train", "val"), ("test",)] if task.dataset == "mscoco" else [SPLITS]
        for group in groups:
            built = writer.pool(task, [data[task.name][s] for s in group], local_pool_relpath(task, group[0]))
            pools.update({(task.name, split): built for split in group})
    for task in TASKS:
        for split in SPLITS:
            pool, dids = pools[(task.name, split)]
            partner = (
                pools[(CROSS_POSITIVES[task.name], split)][1]
                if split == "test" and task.name in CROSS_POSITIVES
                else None
            )
            writer.queries(task, split, data[task.name][split].queries, pool, dids, partner)
        summary.tasks.append(
            TaskSummary(
                task.name,
                task.task_id,
                task.query_modality,
                task.cand_modality,
                {s: len(data[task.name][s].queries) for s in SPLITS},
                {s: len(pools[(task.name, s)][0]) for s in SPLITS},
            )
        )
    writer.union_files(seed)
    for relpath, lines in writer.pools.items():
        _write_lines(root / relpath, lines)
    for split in SPLITS:
        union = [line for t in TASKS for line in writer.pools[local_pool_relpath(t, split)]]
        _write_lines(root / global_pool_relpath(split), union)
        if split == "test":
            summary.global_pool = len(union)
    for relpath, lines in writer.qrels.items():
        _write_lines(root / relpath, lines)
    _write_lines(root / INSTRUCTIONS_RELPATH, _instruction_rows())
    _write_lines(root / MODALITY_AWARE_NEGATIVES_RELPATH, writer.modality_aware)
    for dataset, registry in writer.images.items():
        (root / "mbeir_images" / dataset).mkdir(parents=True, exist_ok=True)
        for picture, relpath in registry.items():
            with (root / relpath).open("wb") as f:
                render(picture.scene, picture.jitter).save(f, format="PNG")
        summary.images += len(registry)
    return summary


def write_synthetic_mbeir(out: PathLike, scale: str = "tiny", seed: int = 0, force: bool = False) -> Summary:
    """Write the corpus at ``out`` atomically (beside it, then renamed); ``force`` replaces an existing ``out``."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: choose one of {list(SCALES)}")
    out = as_path(absolute(out))
    start = time.perf_counter()
    with atomic_output_dir(out, force=force) as tmp:
        summary = write_corpus(tmp, scale, seed)
    summary.out = out
    summary.seconds = time.perf_counter() - start
    return summary
