"""The recipe schema: every config type of a run and its defaults, in one place.

A run is described by one :class:`TrainerConfig` (the model source, the encoder, LoRA, the data, the
optimiser, the step's loss switches, checkpoints, evaluation). :func:`as_trainer_config` parses it from
a nested dict or an ``ml_collections.ConfigDict`` with dacite: unknown keys, values of the wrong type and
values outside a ``Literal`` are errors naming the dotted key. :func:`config_to_json` writes it back.

Train, evaluation and the tools read this module; it imports nothing above the data and model layers.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args

import dacite

from mmret.data.bad_records import OnBadRecord
from mmret.data.images import DEFAULT_MAX_PIXELS
from mmret.data.packing import PackingConfig
from mmret.data.pipeline import PipelineConfig
from mmret.data.processor import ProcessorConfig
from mmret.lora import ALSO_TRAIN, LLM_LINEARS
from mmret.losses import MAX_TEMPERATURE, MIN_TEMPERATURE
from mmret.models.encoder import EncoderConfig
from mmret.models.options import AttentionImpl, RematPolicy
from mmret.optim import OptimizerConfig

Dtype = Literal["float32", "bfloat16", "float16"]
DataFormat = Literal["raw", "array_record"]
# "auto": the union file of the split when the root has one (train: mbeir_union_up_train.jsonl, val:
# mbeir_union_val.jsonl), else the per-task files; "union_up" / "union": that union file (required);
# "per_task": the 16 per-task files. An ArrayRecord build holds what it was built from ("auto" takes it).
QueryFile = Literal["auto", "union_up", "union", "per_task"]
SymmetricReduction = Literal["mean", "sum"]
SearchMethod = Literal["auto", "scann", "exact"]
POOLS = ("local", "global")
# What a data root holds (:mod:`mmret.data.sources`): an M-BEIR root; SimCSE's NLI csv (``nli_for_simcse.csv``:
# sent0 -> sent1); LLaVA's CC3M-595K caption pairs (``chat.json`` + ``images/``); a BEIR text-retrieval dataset
# (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``).
Layout = Literal["mbeir", "nli", "caption", "beir"]
MiningRule = Literal["umarvel", "mmembed"]
Pool = Literal["local", "global"]

# ================================================================================================ model


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Where the backbone comes from: exactly one of ``hf_dir`` (a Hugging Face directory), ``checkpoint``
    (an mmret orbax checkpoint, :mod:`mmret.convert.checkpoint`) or ``preset`` (random weights from
    ``seed``; for tests and smoke runs); checked by the task that builds the model."""

    hf_dir: str | None = None
    checkpoint: str | None = None
    preset: str | None = None
    seed: int = 0
    # Start from another run's weights (a chained stage): its directory (its config.json rebuilds its model)
    # and step (None: its latest checkpoint), LoRA merged. The model source above still gives the processor
    # files and the architecture; the weights are the run's.
    init_from: str | None = None
    init_step: int | None = None
    dtype: Dtype = "float32"  # compute
    param_dtype: Dtype = "float32"  # master weights
    scan_layers: bool = True
    remat: RematPolicy = "none"
    attention_impl: AttentionImpl = "xla"

    def sources(self) -> list[str]:
        """The model-source fields that are set."""
        return [s for s in ("hf_dir", "checkpoint", "preset") if getattr(self, s)]


@dataclasses.dataclass(frozen=True)
class TemperatureConfig:
    init: float = 0.05
    learnable: bool = True
    # With model.init_from: start from that run's temperature (True) or from ``init`` (False).
    carry: bool = True
    min: float = MIN_TEMPERATURE
    max: float = MAX_TEMPERATURE


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """``rank=0``: no adapters. ``lora_only``: only the adapters (and ``also_train``) train."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target: str = LLM_LINEARS  # path regex (from the backbone) of the linear layers that get adapters
    lora_only: bool = True
    also_train: tuple[str, ...] = ALSO_TRAIN


# ================================================================================================= data


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One more training source, mixed with ``data``'s own by weight (grain's mixing): an M-BEIR-layout root
    (``format="raw"``) or an ArrayRecord build of one; the fields mean what ``data``'s do."""

    root: str
    weight: float = 1.0
    layout: Layout = "mbeir"
    format: DataFormat = "raw"
    split: str = "train"
    tasks: tuple[str, ...] | None = None
    query_file: QueryFile = "auto"
    negatives_file: str | None = None

    def __post_init__(self) -> None:
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"data.mix: weight must be positive, got {self.weight}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """An M-BEIR root (``format="raw"``) or a TFDS/ArrayRecord build (``"array_record"``) of it, optionally
    mixed with more sources (``mix``): source ``i`` gives ``weight_i / sum(weights)`` of every stretch of
    the stream, each source in its own order; with ``epochs``, an epoch ends when the first source runs out
    (:func:`mmret.data.pipeline.mixed_epoch_length`)."""

    root: str | None = None
    layout: Layout = "mbeir"  # what the root holds (see Layout)
    format: DataFormat = "raw"
    split: str = "train"
    tasks: tuple[str, ...] | None = None  # dataset-tasks to keep (of the union file or the per-task files)
    query_file: QueryFile = "auto"
    negatives_file: str | None = None
    weight: float = 1.0  # of this source in a mix (only read with ``mix``)
    mix: tuple[SourceConfig, ...] = ()  # or a mapping {label: source}, in order (a ConfigDict with sort_keys=False)
    processor_dir: str | None = None  # tokenizer + preprocessor files; default: the model's directory
    processor: ProcessorConfig = ProcessorConfig()
    pipeline: PipelineConfig = PipelineConfig()

    def __post_init__(self) -> None:
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"data.weight must be positive, got {self.weight}")

    def sources(self) -> list[SourceConfig]:
        """Every training source: this one first, then ``mix``."""
        own = SourceConfig(
            root=self.root or "",
            weight=self.weight,
            layout=self.layout,
            format=self.format,
            split=self.split,
            tasks=self.tasks,
            query_file=self.query_file,
            negatives_file=self.negatives_file,
        )
        return [own, *self.mix]


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1000  # steps; also at the end and on SIGTERM
    keep: int = 3
    async_save: bool = True
    save_frozen: bool = False  # also store the frozen parameters (else re-read from the model source)


# ================================================================================================= eval


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """How to search a candidate pool. ``None`` fields are scaled with the pool size ``n`` (see
    :meth:`resolve`); the rules were tuned on 1M x 1536 clustered vectors (benchmarks/search.py,
    benchmarks/RESULTS.md) to reach recall@10 >= 0.99 against exact search.
    """

    method: SearchMethod = "auto"  # auto = exact below brute_force_below vectors, else ScaNN
    # Exact below 100k candidates. Measured at dim 1536 on 2 CPU cores (benchmarks/RESULTS.md): a ScaNN build costs
    # ~0.25-0.6 ms per pool vector (255 s at 1M, 62 s at 100k on a loaded machine) and exact search ~19-37 ns per
    # (query, candidate) pair, so a build only pays once a task has more than ~13-17k queries, whatever the pool
    # size. Below 100k, exact search of even 25k queries takes at most ~1.5 min and is exact; above, its cost grows
    # with pool x queries (1M x 25k: ~8 min against ~4.5 min for ScaNN's build and search) and ScaNN takes over.
    brute_force_below: int = 100_000
    num_leaves: int | None = None  # None: 2*sqrt(n), clipped to [1, 4096] and to n // 20
    num_leaves_to_search: int | None = None  # None: 3% of the leaves, at least 8
    training_sample_size: int | None = None  # None: min(n, max(100_000, 64 * num_leaves))
    dimensions_per_block: int = 2
    # Spherical k-means (unit-norm centroids) for the leaves. With plain k-means, points join leaves by L2 but
    # queries pick leaves by inner product, which favours large-norm (tight) centroids; on unit-norm data the
    # spherical tree found the neighbours in far fewer leaves (measured: benchmarks/RESULTS.md).
    spherical: bool = True
    anisotropic_quantization_threshold: float = 0.2  # NaN: plain (isotropic) quantisation
    reorder: int | None = None  # None: max(100, 4 * k), candidates rescored exactly
    exact_chunk: int = 32_768  # candidates per matrix product in exact search

    def __post_init__(self) -> None:
        if self.method not in get_args(SearchMethod):
            raise ValueError(f"eval.search.method must be one of {get_args(SearchMethod)}, got {self.method!r}")
        if not isinstance(self.brute_force_below, int) or self.brute_force_below < 0:
            raise ValueError(
                f"eval.search.brute_force_below must be a non-negative int, got {self.brute_force_below!r}"
            )
        for name in ("num_leaves", "num_leaves_to_search", "training_sample_size", "reorder"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"eval.search.{name} must be positive (or None to scale it), got {value!r}")
        for name in ("dimensions_per_block", "exact_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"eval.search.{name} must be positive, got {value!r}")
        if self.num_leaves is not None and self.num_leaves_to_search is not None:
            if self.num_leaves_to_search > self.num_leaves:
                raise ValueError(
                    f"eval.search.num_leaves_to_search ({self.num_leaves_to_search}) must not exceed "
                    f"eval.search.num_leaves ({self.num_leaves})"
                )
        t = self.anisotropic_quantization_threshold
        if not isinstance(self.spherical, bool):
            raise ValueError(f"eval.search.spherical must be a bool, got {self.spherical!r}")
        if not isinstance(t, int | float) or math.isinf(t):
            raise ValueError(f"eval.search.anisotropic_quantization_threshold must be a finite float or NaN, got {t!r}")

    def resolve(self, n: int, k: int) -> dict[str, int]:
        """The ScaNN parameters for a pool of ``n`` vectors searched for ``k`` neighbours: given fields as
        they are, ``None`` fields by the rules beside each field. Raises ``ValueError`` when a given
        ``num_leaves`` exceeds ``n``."""
        if n <= 0:
            raise ValueError("cannot index an empty pool")
        if self.num_leaves is not None:
            if self.num_leaves > n:
                raise ValueError(f"eval.search.num_leaves ({self.num_leaves}) must not exceed the pool size ({n})")
            leaves = self.num_leaves
        else:
            leaves = max(1, min(4096, round(2 * math.sqrt(n)), n // 20))
        to_search = self.num_leaves_to_search or max(8, math.ceil(0.03 * leaves))
        to_search = min(to_search, leaves)
        sample = self.training_sample_size or max(100_000, 64 * leaves)
        sample = min(sample, n)
        reorder = self.reorder or max(100, 4 * k)
        return {
            "num_leaves": leaves,
            "num_leaves_to_search": to_search,
            "training_sample_size": sample,
            "reorder": reorder,
            "dimensions_per_block": self.dimensions_per_block,
        }


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Embedding and search settings; 0 / None fields fall back to the training config's values.

    ``root``: the M-BEIR root (default ``data.root``). ``batch_size`` is per host (default the
    training ``data.pipeline.batch_size``); ``max_length`` is per sequence and ``max_patches`` per
    batch (defaults: the training pipeline's larger query/candidate values, patches scaled to the
    batch). ``shard_size``: embeddings per shard file, the unit of resumption. ``top``: ranks kept in
    the TREC run files. ``at_start`` / ``at_end``: evaluate the model before and after training
    (``mmret.launch`` in train mode). ``check_exact``: queries sampled per task (all of a task's when
    fewer) on which a ScaNN index is compared with exact search: the task's headline Recall@k with each,
    and the neighbour recall@10; in the report (0: not measured, and the report says so). Exact search of
    the samples costs ``16 * check_exact`` queries against the global pool. ``on_bad_record``: a bad
    test record (e.g. a query whose own-dataset positive is not in its local pool) stops the run
    (``"error"``) or is skipped and counted (``"skip"``: the report lists the skips and is not complete).
    ``query_fraction`` < 1 keeps a seeded sample of each task's queries (``query_seed``; the distillation
    teacher's subset of training queries, :func:`mmret.data.stores.sample_queries`). ``pages``: queries per
    task shown in the HTML pages of the retrieval beside each report (their top 5; :mod:`mmret.eval.pages`; 0:
    none).
    """

    root: str | None = None
    split: str = "test"
    tasks: tuple[str, ...] | None = None  # None: the 16 evaluated dataset-tasks
    pools: tuple[str, ...] = POOLS
    batch_size: int = 0
    max_length: int = 0
    max_patches: int = 0
    shard_size: int = 4096
    num_workers: int = 0
    max_decode_pixels: int = DEFAULT_MAX_PIXELS
    instruction_seed: int = 0
    query_fraction: float = 1.0
    query_seed: int = 0
    top: int = 50
    pages: int = 20
    at_start: bool = False
    at_end: bool = False
    check_exact: int = 0
    on_bad_record: OnBadRecord = "error"
    search: SearchConfig = SearchConfig()
    packing: PackingConfig = PackingConfig()  # rows of max_length tokens per batch (mmret.data.packing)

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_length", "max_patches", "check_exact"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("shard_size", "top"):
            if getattr(self, name) <= 0:
                raise ValueError(f"eval.{name} must be positive, got {getattr(self, name)}")
        if self.on_bad_record not in get_args(OnBadRecord):
            raise ValueError(f"eval.on_bad_record must be one of {get_args(OnBadRecord)}, got {self.on_bad_record!r}")
        if not 0.0 < self.query_fraction <= 1.0:
            raise ValueError(f"eval.query_fraction must be in (0, 1], got {self.query_fraction}")
        bad = [p for p in self.pools if p not in POOLS]
        if bad or not self.pools:
            raise ValueError(f"eval.pools must be a non-empty subset of {POOLS}, got {self.pools}")


# =============================================================================================== mining


@dataclasses.dataclass(frozen=True)
class MiningConfig:
    """Hard-negative mining (:mod:`mmret.mining`): a run's checkpoint embeds the ``split`` queries of the M-BEIR
    root (``root``, default ``data.root``) and a pool, searches the top ``top_k`` (``eval.search``), then a rule
    picks ``negatives`` per query (``false_negative_filter``: drop candidates whose normalised text or decoded
    pixels equal those of a positive of the same modality, :mod:`mmret.mining.false_negatives`).

    ``umarvel``: the first ``negatives`` ranks of the top ``top_k`` that are not positives; a query with too few
    gets random pool candidates (seeded by ``seed`` and the qid). ``mmembed``: kind a, candidates of a modality
    other than the task's target within the top ``modality_top``; kind b, target-modality candidates ranked
    beyond ``rank_cut``; ``round(negatives * modality_share)`` (half up) of the negatives are kind a (as many as
    there are), the rest kind b, each short kind filled from the other, then random (:mod:`mmret.mining.rules`).
    ``modality_top`` and ``rank_cut`` are checked against ``top_k`` only for ``mmembed`` (``umarvel`` reads
    neither).
    ``pool``: ``global`` (the split's union pool, U-MARVEL's and MM-Embed's choice) or ``local`` (each task's
    own pool; the reranker's training lists). ``tasks``: None, every task with a query file of the split.
    """

    rule: MiningRule = "umarvel"
    negatives: int = 5
    top_k: int = 100
    pool: Pool = "global"
    split: str = "train"
    root: str | None = None
    tasks: tuple[str, ...] | None = None
    seed: int = 0
    modality_top: int = 50
    rank_cut: int = 45
    modality_share: float = 0.5
    false_negative_filter: bool = True
    random_fallback: bool = True  # False: a query short of hard negatives keeps fewer (the reranker's lists)
    on_bad_record: OnBadRecord = "error"

    def __post_init__(self) -> None:
        for name in ("negatives", "top_k", "modality_top"):
            if getattr(self, name) <= 0:
                raise ValueError(f"mining.{name} must be positive, got {getattr(self, name)}")
        if self.rank_cut < 0:
            raise ValueError(f"mining.rank_cut must be >= 0, got {self.rank_cut}")
        if self.rule == "mmembed" and self.rank_cut >= self.top_k:
            raise ValueError(f"mining.rank_cut must be in [0, mining.top_k={self.top_k}), got {self.rank_cut}")
        if self.rule == "mmembed" and self.modality_top > self.top_k:
            raise ValueError(f"mining.modality_top ({self.modality_top}) must not exceed mining.top_k ({self.top_k})")
        if not 0.0 <= self.modality_share <= 1.0:
            raise ValueError(f"mining.modality_share must be in [0, 1], got {self.modality_share}")


# =============================================================================================== stages


@dataclasses.dataclass(frozen=True)
class RerankConfig:
    """The pointwise reranker (task ``reranker``, :mod:`mmret.tasks.reranker`): its prompt
    (:mod:`mmret.data.rerank_prompts`), which tokens the LM loss trains (``assistant_turn``: U-MARVEL's collator;
    ``answer``: the answer token alone), each text's token cap (U-MARVEL's training: 256), and the static
    shapes of a batch of pairs (``max_length`` tokens per pair, U-MARVEL's 2048; ``max_patches`` image patch
    rows per host batch; ``max_targets`` trained tokens per pair)."""

    prompt: str = "umarvel"
    loss_on: Literal["assistant_turn", "answer"] = "assistant_turn"
    max_text_tokens: int | None = 256
    max_length: int = 2048
    max_patches: int = 4 * 1200
    max_targets: int = 8
    # --mode=rerank (mmret.eval.rerank): the top_k of a retrieval run's TREC files (rerank.retrieval) rescored
    # in batches of batch_size pairs per host; fused score cosine + weight * P(yes), weight None: chosen per
    # task from weight_grid on the validation run rerank.select_on.
    retrieval: str | None = None
    select_on: str | None = None
    top_k: int = 50
    batch_size: int = 8
    weight: float | None = None
    weight_grid: tuple[float, ...] = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
    cosine: bool = True  # False: the reranker's P(yes) alone orders the top_k (MM-Embed's zero-shot reranking)
    # Pairs packed into rows of max_length tokens (mmret.data.packing), in training and in --mode=rerank.
    packing: PackingConfig = PackingConfig()

    def __post_init__(self) -> None:
        from mmret.data.rerank_prompts import get_prompt

        get_prompt(self.prompt)  # a ValueError naming the known prompts
        for name in ("max_length", "max_targets", "top_k", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"rerank.{name} must be positive, got {getattr(self, name)}")
        if self.max_patches <= 0 or self.max_patches % 4:
            raise ValueError(f"rerank.max_patches must be a positive multiple of 4, got {self.max_patches}")


#: U-MARVEL's per-task fusion weights of the distillation teacher (w = 1.0 elsewhere; RECIPES.md section 3).
UMARVEL_TEACHER_WEIGHTS = {"mscoco_task0": 0.5, "mscoco_task3": 0.1}


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Listwise distillation of a reranker into the retriever (task ``distill``, U-MARVEL's stage 5).

    The teacher (:mod:`mmret.distill.teacher`, a stage's ``teacher_from``): the retriever (the stage's
    ``init_from``) retrieves the local top ``top_k`` of a seeded ``fraction`` of the ``split`` queries of
    each task (``tasks``; None: the stage's ``data.tasks``, else every task with a query file), the reranker
    scores each pair (``rerank.*``: prompt, shapes, batch), and each list gets the fused scores ``cosine +
    w * P(yes)`` (``weight``, or ``task_weights[task]``); written to ``teacher_file``, which the training
    reads. The loss (:func:`mmret.losses.listwise_distillation`): ``KL(softmax(teacher_scale * fused / tau)
    || softmax(cosine / tau))`` over each query's list, mean over queries, tau the retriever's temperature
    (no gradient through the teacher side), the student's log-probabilities taken as ``log(q + log_eps)``
    (U-MARVEL's code; 0: the exact KL); ``infonce_weight`` > 0 adds that much InfoNCE over the global
    batch's candidates (U-MARVEL: 0, in-batch candidates ignored)."""

    teacher_file: str | None = None
    fraction: float = 0.1
    split: str = "train"
    tasks: tuple[str, ...] | None = None
    top_k: int = 50
    weight: float = 1.0
    task_weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(UMARVEL_TEACHER_WEIGHTS))
    seed: int = 0
    on_bad_record: OnBadRecord = "skip"
    teacher_scale: float = 0.5
    log_eps: float = 1e-8
    infonce_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.log_eps < 0:
            raise ValueError(f"distill.log_eps must be >= 0, got {self.log_eps}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"distill.fraction must be in (0, 1], got {self.fraction}")
        if self.top_k <= 0:
            raise ValueError(f"distill.top_k must be positive, got {self.top_k}")
        if self.teacher_scale <= 0:
            raise ValueError(f"distill.teacher_scale must be positive, got {self.teacher_scale}")
        if self.infonce_weight < 0:
            raise ValueError(f"distill.infonce_weight must be >= 0, got {self.infonce_weight}")
        if self.on_bad_record not in get_args(OnBadRecord):
            raise ValueError(
                f"distill.on_bad_record must be one of {get_args(OnBadRecord)}, got {self.on_bad_record!r}"
            )

    def weight_of(self, task: str) -> float:
        """The fusion weight w of ``task``."""
        return float(self.task_weights.get(task, self.weight))


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One stage of a chained recipe (:mod:`mmret.chain`): the run config is the recipe's own with
    ``overrides`` merged in (nested mappings, key by key; any other value replaces), trained in
    ``<workdir>/<name>``. ``init_from``: an earlier stage whose final weights (LoRA merged) this one starts
    from (None: the model source). ``mine_from``: an earlier stage whose final model mines hard negatives
    (``mining`` of the merged config) before this stage trains; the mined file becomes its
    ``data.negatives_file``. ``teacher_from``: a reranker stage whose final model, with the ``init_from``
    stage's retriever, builds this stage's distillation teacher (``distill`` of the merged config,
    :mod:`mmret.distill.teacher`) before it trains; the file becomes its ``distill.teacher_file``."""

    name: str
    init_from: str | None = None
    mine_from: str | None = None
    teacher_from: str | None = None
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# ================================================================================================== run


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Everything a run reads. ``task``: the kind of training (:mod:`mmret.tasks`); the other sections are
    read by the tasks that need them. ``total_steps=None``: ``optimizer.total_steps``."""

    task: str = "bi_encoder"
    model: ModelConfig = ModelConfig()
    encoder: EncoderConfig = EncoderConfig()
    temperature: TemperatureConfig = TemperatureConfig()
    lora: LoRAConfig = LoRAConfig()
    freeze: tuple[str, ...] = ()  # path regexes (relative to the backbone or to the Retriever)
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    symmetric: bool = False  # add the candidate->query InfoNCE term (U-MARVEL's caption stage)
    symmetric_reduction: SymmetricReduction = "mean"  # how the two directions combine ("sum": U-MARVEL's code)
    # Labelled positives of a query elsewhere in the batch are left out of its denominator (True, mmret's
    # default) or count as negatives (False: U-MARVEL's loss, the paper config's choice).
    mask_false_negatives: bool = True
    # Queries per GradCache chunk (None, or the whole per-host batch: the plain step); sets the pipeline's too.
    grad_cache_chunk: int | None = None
    mesh: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"data": -1, "fsdp": 1, "tensor": 1})
    rules: Any = None  # overrides of mmret.sharding.DEFAULT_RULES
    total_steps: int | None = None
    # Epochs over the training file: the schedule's length is derived from the number of examples the store
    # read (floor(epochs * examples / global batch)), replacing optimizer.total_steps. None: optimizer.total_steps.
    epochs: float | None = None
    seed: int = 0  # LoRA dropout keys
    log_every: int = 10
    checkpoint: CheckpointConfig = CheckpointConfig()
    max_nonfinite_steps: int = 10
    inject_nonfinite_steps: tuple[int, ...] = ()  # testing hook: these steps (1-based, as logged) see NaN parameters
    eval: EvalConfig = EvalConfig()  # embedding, search and report (mmret.eval)
    mining: MiningConfig = MiningConfig()  # --mode=mine, and stages with ``mine_from``
    rerank: RerankConfig = RerankConfig()  # the reranker task's prompt, loss and pair shapes
    distill: DistillConfig = DistillConfig()  # the distill task's teacher and loss (U-MARVEL's stage 5)
    # A chained recipe (mmret.chain), in order; empty: one run. A config file may give a mapping
    # {name: stage fields} instead (then ``--config.stages.<name>.overrides.a.b=...`` overrides one stage).
    stages: tuple[StageConfig, ...] = ()

    def __post_init__(self) -> None:
        if self.rules is not None:  # nested lists (JSON, ml_collections) as the tuples the rules table holds
            object.__setattr__(self, "rules", _tuples(self.rules))
        for name in ("log_every", "max_nonfinite_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.checkpoint.every <= 0 or self.checkpoint.keep <= 0:
            raise ValueError("checkpoint.every and checkpoint.keep must be positive")
        if self.total_steps is not None and self.total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.grad_cache_chunk is not None:
            dataclasses.replace(self.data.pipeline, grad_cache_chunk=self.grad_cache_chunk)  # validates it
            given = self.data.pipeline.grad_cache_chunk
            if given is not None and given != self.grad_cache_chunk:
                raise ValueError(
                    f"grad_cache_chunk={self.grad_cache_chunk} and data.pipeline.grad_cache_chunk={given} differ"
                )

    @property
    def steps(self) -> int:
        """Steps this run trains for (before :func:`with_epochs` resolves ``epochs``)."""
        return self.optimizer.total_steps if self.total_steps is None else self.total_steps


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def with_epochs(cfg: TrainerConfig, examples: int, global_batch: int) -> TrainerConfig:
    """``cfg`` with ``epochs`` turned into the schedule's length for ``examples`` training examples (an
    up-sampled copy counts as an example) at ``global_batch``; unchanged when ``epochs`` is None."""
    if cfg.epochs is None:
        return cfg
    steps = int(cfg.epochs * examples) // global_batch
    if steps < 1:
        raise ValueError(
            f"epochs={cfg.epochs} over {examples} examples is less than one global batch of {global_batch}"
        )
    return dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, total_steps=steps))


def step_pipeline(cfg: TrainerConfig) -> PipelineConfig:
    """The pipeline config the train step needs: chunked for GradCache, unchunked for the plain step.

    ``grad_cache_chunk`` (trainer or pipeline) equal to the per-host batch leaves nothing to cache: the plain
    step runs, on unchunked batches.
    """
    pipeline = cfg.data.pipeline
    if cfg.grad_cache_chunk is not None:  # the pipeline collates the chunks
        pipeline = dataclasses.replace(pipeline, grad_cache_chunk=cfg.grad_cache_chunk)
    if pipeline.grad_cache_chunk == pipeline.batch_size:
        pipeline = dataclasses.replace(pipeline, grad_cache_chunk=None)
    return pipeline


# ============================================================================================== parsing


def _int_as_float(value: Any) -> Any:
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _sources(value: Any) -> Any:
    """``data.mix`` given as a mapping {label: source} (a ConfigDict whose entries the command line reaches,
    ``--config.data.mix.<label>.root=...``): its sources in order."""
    return list(value.values()) if isinstance(value, Mapping) else value


_DACITE = dacite.Config(
    strict=True, cast=[tuple], type_hooks={float: _int_as_float, tuple[SourceConfig, ...]: _sources}
)


def _unknown_key(cls: type, values: Mapping[str, Any], where: str = "") -> tuple[str, type] | None:
    """The first key of ``values`` (dotted, from the top) that is no field of dataclass ``cls``, with the
    dataclass it should have been a field of."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if name not in fields:
            return where + name, cls
        if isinstance(value, Mapping):
            options = typing.get_args(hints[name]) if _is_union(hints[name]) else (hints[name],)
            for option in options:
                if dataclasses.is_dataclass(option):
                    found = _unknown_key(option, value, f"{where}{name}.")
                    if found:
                        return found
    return None


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _plain(value: Any) -> Any:
    """``value`` with ``ml_collections.ConfigDict`` nodes turned into dicts and the ``FieldReference`` s
    that ``to_dict`` leaves inside tuples and lists (e.g. a ``data.mix`` entry's root) resolved."""
    if type(value).__name__ == "FieldReference" and hasattr(value, "get"):
        value = value.get()
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value


def parse(cls: type, values: Mapping[str, Any] | Any, where: str = "") -> Any:
    """Dataclass ``cls`` from a nested mapping (or ``ConfigDict``) through dacite; ``ValueError`` naming
    the dotted key of an unknown key, a value of the wrong type or one outside its ``Literal``."""
    values = _plain(values)
    try:
        return dacite.from_dict(cls, values, config=_DACITE)
    except dacite.UnexpectedDataError as e:
        found = _unknown_key(cls, values)
        key, parent = found if found else (", ".join(sorted(e.keys)), cls)
        known = ", ".join(f.name for f in dataclasses.fields(parent))
        raise ValueError(f"config: unknown key {where}{key}; known keys of {parent.__name__}: {known}") from None
    except dacite.WrongTypeError as e:
        key = where + e.field_path
        allowed = _literal_values(e.field_type)
        if allowed and isinstance(e.value, str):
            raise ValueError(f"{key} must be one of {allowed}, got {e.value!r}") from None
        raise ValueError(f"{key}: expected {_type_name(e.field_type)}, got {e.value!r}") from None
    except dacite.DaciteError as e:
        raise ValueError(f"config: {e}") from None


def _literal_values(hint: Any) -> tuple[Any, ...]:
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    return tuple(a for o in options if typing.get_origin(o) is Literal for a in typing.get_args(o))


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def as_trainer_config(config: TrainerConfig | Mapping[str, Any] | Any) -> TrainerConfig:
    """A :class:`TrainerConfig` from itself, a nested dict or an ``ml_collections.ConfigDict``."""
    if isinstance(config, TrainerConfig):
        return config
    values = _plain(config)
    if isinstance(values.get("stages"), Mapping):  # {name: stage} (a ConfigDict's stages, in order)
        values["stages"] = [_named_stage(name, stage) for name, stage in values["stages"].items()]
    return parse(TrainerConfig, values)


def _named_stage(name: str, stage: Any) -> Any:
    if not isinstance(stage, Mapping):
        raise ValueError(f"stages.{name}: expected a mapping of the stage's fields, got {stage!r}")
    if stage.get("name", name) != name:
        raise ValueError(f"stages.{name}.name: {stage['name']!r} differs from its key {name!r}")
    return {**stage, "name": name}


def config_to_json(cfg: Any) -> Any:
    """``cfg`` (dataclasses, mappings, sequences) as JSON-ready values; other objects as their ``str``."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_json(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {str(k): config_to_json(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [config_to_json(v) for v in cfg]
    return cfg if isinstance(cfg, str | int | float | bool | type(None)) else str(cfg)
