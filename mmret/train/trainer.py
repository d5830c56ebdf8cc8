"""The trainer: ``train(config, workdir)`` reads top to bottom in labelled sections (big_vision style):
config, mesh, data, model, shard, step, checkpoint, loop.

What a run leaves in ``workdir``::

    config.json          the resolved config
    metrics.jsonl        one record per log point (loss, accuracy, temperature, grad_norm,
                         learning_rate, examples_per_s, tokens_per_s, skipped steps, ...)
    tb/                  TensorBoard event files (written without TensorFlow: mmret.train.metrics)
    checkpoints/<step>/  orbax: state (step, trainable parameters, optimiser state), data (per
                         process: grain iterator state and bad-record counts, JSON), info (run
                         counters, JSON)[, frozen (the frozen parameters, checkpoint.save_frozen)]

Preemption: a SIGTERM sets a flag; the loop saves at the next step boundary and returns (exit 0).
A run killed outright (SIGKILL, a lost host) resumes from the latest checkpoint whose save completed
(orbax writes beside the step directory and renames it into place), with the data iterator where it
was: the resumed run computes exactly what the uninterrupted one would have (bitwise on CPU). A
checkpoint that cannot be read is moved to ``checkpoints_unreadable/`` with a warning and the previous
one is tried.

Non-finite guard: a step whose loss or gradient norm is not finite leaves parameters and optimiser
state unchanged (selected inside the jitted step), is counted, and ``max_nonfinite_steps`` such steps
in a row stop the run with :class:`NonFiniteError`.

    python -m mmret.train.trainer --config cfg.json --workdir DIR    # (mmret.launch is the real entry)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import re
import shutil
import signal
import sys
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mmret import sharding
from mmret.data.bad_records import BadRecords
from mmret.data.pipeline import PipelineConfig, RawStore, train_dataset
from mmret.data.processor import Processor, ProcessorConfig
from mmret.eval.config import EvalConfig
from mmret.lora import ALSO_TRAIN, LLM_LINEARS, PathRegex, apply_lora, set_dropout_key
from mmret.lora import trainable_filter as lora_trainable_filter
from mmret.losses import MAX_TEMPERATURE, MIN_TEMPERATURE, Temperature
from mmret.models import qwen2_vl
from mmret.models.encoder import Encoder, EncoderConfig
from mmret.optim import OptimizerConfig, lr_schedule, make_optimizer
from mmret.train.metrics import MetricWriters
from mmret.train.step import Retriever, StepConfig, TrainState, make_train_step

log = logging.getLogger("mmret.train")

#: Paths (dot-joined, from the Retriever) of what a ``freeze`` pattern may also match relative to.
BACKBONE_PREFIX = r"encoder\.backbone\."

# =============================================================================================== config


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Where the backbone comes from: exactly one of ``hf_dir`` (a Hugging Face Qwen2-VL directory),
    ``checkpoint`` (an mmret orbax checkpoint, :mod:`mmret.convert.checkpoint`) or ``preset`` (random
    weights from ``seed``; for tests and smoke runs)."""

    hf_dir: str | None = None
    checkpoint: str | None = None
    preset: str | None = None
    seed: int = 0
    dtype: str = "float32"  # compute
    param_dtype: str = "float32"  # master weights
    scan_layers: bool = True
    remat: str = "none"
    attention_impl: str = "xla"


@dataclasses.dataclass(frozen=True)
class TemperatureConfig:
    init: float = 0.05
    learnable: bool = True
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


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """An M-BEIR root (``format="raw"``) or a TFDS/ArrayRecord build (``"array_record"``) of it."""

    root: str = ""
    format: str = "raw"
    split: str = "train"
    tasks: tuple[str, ...] | None = None  # dataset-tasks to keep (of the union file or the per-task files)
    # "auto": the union file of the split when the root has one (train: mbeir_union_up_train.jsonl, val:
    # mbeir_union_val.jsonl), else the per-task files; "union_up" / "union": that union file (required);
    # "per_task": the 16 per-task files. An ArrayRecord build holds what it was built from ("auto" takes it).
    query_file: str = "auto"
    negatives_file: str | None = None
    processor_dir: str | None = None  # tokenizer + preprocessor files; default: the model's directory
    processor: ProcessorConfig = ProcessorConfig()
    pipeline: PipelineConfig = PipelineConfig()


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1000  # steps; also at the end and on SIGTERM
    keep: int = 3
    async_save: bool = True
    save_frozen: bool = False  # also store the frozen parameters (else re-read from the model source)


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Everything :func:`train` reads. ``total_steps=None``: ``optimizer.total_steps``."""

    model: ModelConfig = ModelConfig()
    encoder: EncoderConfig = EncoderConfig()
    temperature: TemperatureConfig = TemperatureConfig()
    lora: LoRAConfig = LoRAConfig()
    freeze: tuple[str, ...] = ()  # path regexes (relative to the backbone or to the Retriever)
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    symmetric: bool = False  # add the candidate->query InfoNCE term (U-MARVEL's caption stage)
    symmetric_reduction: str = "mean"  # how the two directions combine: "mean", or "sum" (U-MARVEL's code)
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

    def __post_init__(self) -> None:
        sources = [s for s in ("hf_dir", "checkpoint", "preset") if getattr(self.model, s)]
        if len(sources) != 1:
            raise ValueError(f"model: give exactly one of hf_dir, checkpoint, preset (got {sources or 'none'})")
        for name in ("log_every", "max_nonfinite_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.checkpoint.every <= 0 or self.checkpoint.keep <= 0:
            raise ValueError("checkpoint.every and checkpoint.keep must be positive")
        if self.total_steps is not None and self.total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.symmetric_reduction not in ("mean", "sum"):
            raise ValueError(f"symmetric_reduction must be 'mean' or 'sum', got {self.symmetric_reduction!r}")
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


def _from_dict(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from a (nested) mapping; unknown keys are errors naming their path."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(
            f"config: unknown key {where}{unknown[0]}; known keys of {where or 'the trainer'}: "
            f"{', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _convert(hints[name], value, f"{where}{name}")
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str) -> Any:
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        value = value.to_dict()
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if isinstance(value, Mapping):
        for option in options:
            if dataclasses.is_dataclass(option):
                return _from_dict(option, value, where + ".")
        return dict(value)
    if isinstance(value, list | tuple):
        for option in options:
            if typing.get_origin(option) is tuple:
                args = typing.get_args(option)
                inner = args[0] if len(args) == 2 and args[1] is Ellipsis else None
                return tuple(_convert(inner, v, where) if inner is not None else _tuples(v) for v in value)
        return _tuples(value)
    return value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def as_trainer_config(config: TrainerConfig | Mapping[str, Any] | Any) -> TrainerConfig:
    """A :class:`TrainerConfig` from itself, a nested dict or an ``ml_collections.ConfigDict``."""
    if isinstance(config, TrainerConfig):
        return config
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return _from_dict(TrainerConfig, config, "")


def config_to_json(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_json(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {str(k): config_to_json(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [config_to_json(v) for v in cfg]
    return cfg if isinstance(cfg, str | int | float | bool | type(None)) else str(cfg)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


# ===================================================================================== building blocks


def open_store(cfg: DataConfig, bad: BadRecords) -> Any:
    """The record store of ``cfg`` (raw M-BEIR root or ArrayRecord build)."""
    if not cfg.root:
        raise ValueError("data.root: no M-BEIR root given")
    if cfg.format == "raw":
        return RawStore(
            cfg.root, cfg.split, cfg.tasks, negatives_file=cfg.negatives_file, bad=bad, query_file=cfg.query_file
        )
    if cfg.format == "array_record":
        from mmret.data.tfds_mbeir import ArrayRecordStore

        return ArrayRecordStore(
            cfg.root, cfg.split, cfg.tasks, negatives_file=cfg.negatives_file, bad=bad, query_file=cfg.query_file
        )
    raise ValueError(f"data.format must be 'raw' or 'array_record', got {cfg.format!r}")


def processor_dir(cfg: TrainerConfig) -> Path:
    if cfg.data.processor_dir:
        return Path(cfg.data.processor_dir)
    if cfg.model.hf_dir:
        return Path(cfg.model.hf_dir)
    if cfg.model.checkpoint:
        from mmret.convert.checkpoint import hf_files_dir

        return hf_files_dir(cfg.model.checkpoint)
    raise ValueError("data.processor_dir: needed with model.preset (a directory with the tokenizer files)")


def load_backbone(cfg: ModelConfig, max_image_patches: int = 0, vocab_size: int = 0) -> qwen2_vl.Qwen2VL:
    """The backbone ``cfg`` names; ``max_image_patches`` (the processor's per-image cap) lets the vision
    tower attend within blocks of patches rather than across the whole batch (0: across the batch). A
    token embedding with fewer than ``vocab_size`` rows (tokens the processor added) is grown to it,
    new rows drawn from ``cfg.seed`` (``mmret.models.qwen2_vl.hf.grow_vocab``)."""
    from mmret.models.qwen2_vl.hf import grow_vocab

    options = dict(
        scan_layers=cfg.scan_layers,
        remat=cfg.remat,
        attention_impl=cfg.attention_impl,
        max_image_patches=max_image_patches,
    )
    if cfg.hf_dir:
        model = qwen2_vl.from_hf(cfg.hf_dir, dtype=cfg.dtype, param_dtype=cfg.param_dtype, **options)
    elif cfg.checkpoint:
        from mmret.convert.checkpoint import load_model

        model = load_model(cfg.checkpoint, dtype=cfg.dtype, param_dtype=cfg.param_dtype, **options)
    else:
        from mmret.models.qwen2_vl.presets import hf_config

        model_cfg = qwen2_vl.Qwen2VLConfig.from_hf_dict(
            hf_config(cfg.preset), dtype=cfg.dtype, param_dtype=cfg.param_dtype, **options
        )
        model = qwen2_vl.create(model_cfg, seed=cfg.seed)
    return grow_vocab(model, vocab_size, seed=cfg.seed)


def backbone_vocab_size(cfg: TrainerConfig) -> int:
    """The token rows the run's processor needs when its template adds tokens (``umarvel_exact``), else 0."""
    if not cfg.data.processor.template_spec().added_tokens():
        return 0
    return Processor(processor_dir(cfg), cfg.data.processor).vocab_size


def build_retriever(cfg: TrainerConfig, max_image_patches: int = 0) -> Retriever:
    """The model a run of ``cfg`` starts from (backbone, LoRA adapters, temperature), in host memory;
    ``max_image_patches``: see :func:`load_backbone`."""
    with _host_memory():
        backbone = load_backbone(cfg.model, max_image_patches, backbone_vocab_size(cfg))
        if cfg.lora.rank > 0:
            apply_lora(
                backbone,
                rank=cfg.lora.rank,
                alpha=cfg.lora.alpha,
                dropout=cfg.lora.dropout,
                target=cfg.lora.target,
                rngs=cfg.seed,
            )
        t = cfg.temperature
        return Retriever(
            Encoder(backbone, cfg.encoder),
            Temperature(t.init, learnable=t.learnable, min_temperature=t.min, max_temperature=t.max),
        )


def _host_memory() -> contextlib.AbstractContextManager[Any]:
    """Make new arrays on the host CPU (a whole model rarely fits one accelerator before sharding)."""
    try:
        return jax.default_device(jax.local_devices(backend="cpu")[0])
    except RuntimeError:  # no CPU backend
        return contextlib.nullcontext()


def trainable_filter(cfg: TrainerConfig) -> Any:
    """What trains: every parameter (or, with LoRA ``lora_only``, the adapters and ``also_train``),
    minus those matching a ``freeze`` pattern. Patterns match the dot-joined path from the backbone
    (``visual\\..*``) or from the Retriever (``encoder.backbone.visual\\..*``, ``temperature.log_tau``)."""

    def relative(patterns: Sequence[str]) -> tuple[str, ...]:
        return tuple(f"(?:{BACKBONE_PREFIX})?(?:{p})" for p in patterns)

    wrt = lora_trainable_filter(
        lora_only=cfg.lora.rank > 0 and cfg.lora.lora_only, also_train=relative(cfg.lora.also_train)
    )
    if cfg.freeze:
        wrt = nnx.All(wrt, nnx.Not(PathRegex(relative(cfg.freeze))))
    return wrt


def _count(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _update_count(opt_state: Any, fallback: jax.Array) -> jax.Array:
    """How many updates the optimiser has applied (its schedule's step): the first ``count`` leaf."""
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    return found[0][1] if found else fallback


def global_positive_mask(local: np.ndarray, n_chunks: int, process_index: int, process_count: int) -> np.ndarray:
    """This process's block of the global ``positive_mask``, laid out [chunks, queries, chunks,
    candidates] so that the blocks of all processes, concatenated along axis 1 (the query rows) and
    reshaped to 2-D, index queries and candidates in the order of the global embeddings: chunk-major,
    then process, then row (with one chunk: process-major). Other processes' candidates get False
    (only this process knows its own labelled positives)."""
    rows, cols = local.shape
    qc, cc = rows // n_chunks, cols // n_chunks
    out = np.zeros((n_chunks, qc, n_chunks, process_count, cc), dtype=bool)
    out[:, :, :, process_index] = local.reshape(n_chunks, qc, n_chunks, cc)
    return out.reshape(n_chunks, qc, n_chunks, process_count * cc)


def _tokens(batch: Mapping[str, Any]) -> int:
    return int(np.sum(batch["query"]["attention_mask"])) + int(np.sum(batch["candidates"]["attention_mask"]))


class DataStateHandler(ocp.CheckpointHandler):
    """Each process's data state (grain iterator state and bad-record counts, JSON) in its own file
    ``process_<i>-of-<n>.json``: orbax's JSON handler writes from the primary process only, and every
    host reads its own slice of the data. The state is captured when the save is requested."""

    @staticmethod
    def _name() -> str:
        return f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        (epath.Path(directory) / self._name()).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> Any:
        del args
        path = epath.Path(directory) / self._name()
        if not path.exists():
            raise FileNotFoundError(f"{path}: no data state for this process (saved by another process count?)")
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def _first_line(error: BaseException, limit: int = 500) -> str:
    """The gist of a (TensorStore) error: its first line without the specs, at most ``limit`` characters."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = re.sub(r" ?\[tensorstore_spec(\[\d+\])?='.*?'\]", "", text).split(" See full TensorStore details")[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _RestoreNoise(logging.Filter):
    """What the reads of a failed restore print besides its error: the other reads in flight fail too,
    and their asyncio tasks log "Task exception was never retrieved" (asyncio logger) or their
    TensorStore callbacks find orbax's event loop closed (``sys.unraisablehook``), hundreds of lines.
    From the first restore on, those are dropped: task errors naming a checkpoint that failed (or is
    being read), and closed-loop errors."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []
        self._hook: Any = None

    def watch(self, path: Path) -> None:
        self.paths.append(f"{path}/")
        if sys.unraisablehook != self._unraisable:  # (again, if something replaced it since)
            self._hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        logging.getLogger("asyncio").addFilter(self)  # (once: a logger holds a filter once)

    def unwatch(self, path: Path) -> None:
        self.paths.remove(f"{path}/")

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        text = f"{record.getMessage()} {error}"
        return not any(p in text for p in self.paths)

    def _unraisable(self, unraisable: Any) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        self._hook(unraisable)


_RESTORE_NOISE = _RestoreNoise()


class Checkpoints:
    """orbax ``CheckpointManager`` over ``directory``: async saves, keep N, restore with fallback.

    Items of a checkpoint: ``state`` (step, trainable parameters, optimiser state), ``data`` (per
    process: iterator state, bad-record counts), ``info`` (run counters), ``frozen`` (optional)."""

    def __init__(self, directory: Path, cfg: CheckpointConfig):
        self.cfg = cfg
        self.directory = directory
        self.unreadable = directory.parent / f"{directory.name}_unreadable"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=True,  # a save torn by a kill
            create=True,
        )
        self.manager = ocp.CheckpointManager(directory, options=options)

    def save(self, step: int, items: dict[str, Any], data: dict[str, Any], info: dict[str, Any]) -> None:
        args = dict(
            state=ocp.args.StandardSave(items["trainable"]),
            data=DataStateSave(data),
            info=ocp.args.JsonSave(info),
        )
        if "frozen" in items:
            args["frozen"] = ocp.args.StandardSave(items["frozen"])
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore_latest(self, abstract: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        """The newest readable checkpoint as (step, items), moving unreadable ones aside with a
        warning; None when there is none. Raises if every checkpoint is unreadable."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        errors = []
        for step in steps:
            args = dict(
                state=ocp.args.StandardRestore(abstract["trainable"]),
                data=DataStateRestore(),
                info=ocp.args.JsonRestore(),
            )
            if "frozen" in abstract:
                args["frozen"] = ocp.args.StandardRestore(abstract["frozen"])
            path = self.directory / str(step)
            _RESTORE_NOISE.watch(path)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**args))
                _RESTORE_NOISE.unwatch(path)
                return step, dict(restored)
            except Exception as e:  # noqa: BLE001 (any failure to read means: try the previous one)
                target = self._move_aside(step)
                msg = f"checkpoint {path} is unreadable ({type(e).__name__}: {_first_line(e)}); moved to {target}"
                log.warning(msg + ("; trying the previous one" if step != steps[-1] else ""))
                errors.append(msg)
        if steps:
            raise RuntimeError(f"no readable checkpoint in {self.directory}: " + "; ".join(errors))
        return None

    def _move_aside(self, step: int) -> Path:
        """Move checkpoint ``step`` to ``checkpoints_unreadable/<step>.<time>`` (process 0 moves it)."""
        target = self.unreadable / f"{step}.{int(time.time())}"
        if jax.process_index() == 0:
            self.unreadable.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"mmret_ckpt_move_{step}")
        self.manager.reload()
        return target if jax.process_index() == 0 else self.unreadable

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


class Preemption:
    """A preemption notice (SIGTERM) -> stop and save at a step boundary that every process agrees on.

    Multi-process jobs under ``jax.distributed`` with its preemption service (the default) use it:
    its notifier owns SIGTERM and ``reached_preemption_sync_point`` names the same step on every host
    without a device collective. Otherwise a Python SIGTERM handler sets a flag, read every step (and
    all-gathered across processes when there are several)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self.jax_service = jax.process_count() > 1 and _jax_preemption_service()

    def install(self) -> None:
        if self.jax_service:
            return
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            log.warning("not in the main thread: no SIGTERM handler (no save on preemption)")

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.requested = True
        print(f"signal {signum}: saving a checkpoint at the next step boundary", file=sys.stderr, flush=True)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after ``step`` (call it at every step, on every process)."""
        if self.jax_service:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))


def _jax_preemption_service() -> bool:
    try:
        from jax._src import distributed

        return (
            distributed.global_state.client is not None and distributed.global_state.preemption_sync_manager is not None
        )
    except (ImportError, AttributeError):
        return False


class Meter:
    """Averages the finite steps' metrics over a log interval; examples/s and tokens/s over the
    steps timed since the last log point (the clock restarts after the first, compiling step).

    Each record says how many steps its averages cover, ``averaged_steps``: ``log_every`` in a steady
    run; fewer in the first interval after a resume (only the steps since the checkpoint, which need
    not be a log point), at the last step of a preempted run, or when non-finite steps were skipped
    (they are left out of the averages)."""

    def __init__(self, global_batch: int, total_steps: int):
        self.global_batch, self.total_steps = global_batch, total_steps
        self.interval: list[dict[str, float]] = []
        self.restart_clock()

    def restart_clock(self) -> None:
        self.clock, self.steps, self.tokens = time.perf_counter(), 0, 0

    def add(self, metrics: dict[str, float] | None, tokens: int) -> None:
        """One step: its metrics (None for a skipped step) and its global token count."""
        if metrics is not None:
            self.interval.append(metrics)
        self.steps += 1
        self.tokens += tokens

    def record(self, step: int) -> dict[str, float]:
        """The log record at ``step``; starts the next interval."""
        now = time.perf_counter()
        out = {
            key: float(np.mean([m[key] for m in self.interval])) for key in (self.interval[0] if self.interval else ())
        }
        out["averaged_steps"] = len(self.interval)
        if self.steps and now > self.clock:
            seconds = now - self.clock
            out["examples_per_s"] = self.steps * self.global_batch / seconds
            out["tokens_per_s"] = self.tokens / seconds
            out["eta_s"] = (self.total_steps - step) * seconds / self.steps
        self.interval.clear()
        self.restart_clock()
        return out


# ============================================================================================== train


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


@dataclasses.dataclass
class TrainInputs:
    """What a run reads before it writes anything: the processor and the training record store."""

    processor: Processor
    store: Any
    bad: BadRecords  # the records the store skipped while reading


def open_inputs(cfg: TrainerConfig) -> TrainInputs:
    """Open the run's processor and training store: every record is read and checked here (under
    ``on_bad_record="error"`` the first bad one raises :class:`~mmret.data.bad_records.BadRecordError`)."""
    bad = BadRecords(step_pipeline(cfg).on_bad_record)
    processor = Processor(processor_dir(cfg), cfg.data.processor)
    return TrainInputs(processor, open_store(cfg.data, bad), bad)


def train(
    config: TrainerConfig | Mapping[str, Any] | Any, workdir: str | Path, *, inputs: TrainInputs | None = None
) -> dict[str, Any]:
    """Train (or resume) the run in ``workdir``; returns the last logged metrics plus a summary.
    ``inputs``: :func:`open_inputs` of ``config``, when the caller opened them already. Nothing is
    written to ``workdir`` before the inputs and the model are read."""
    cfg = as_trainer_config(config)
    workdir = Path(workdir).absolute()
    is_primary = jax.process_index() == 0

    # ---------------------------------------------------------------------------------------- mesh
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.make_rules(overrides=cfg.rules)
    global_batch = cfg.data.pipeline.batch_size * jax.process_count()

    # ---------------------------------------------------------------------------------------- data
    pipeline = step_pipeline(cfg)
    n_chunks = 1 if pipeline.grad_cache_chunk is None else pipeline.batch_size // pipeline.grad_cache_chunk
    inputs = open_inputs(cfg) if inputs is None else inputs
    processor, store, bad_read = inputs.processor, inputs.store, inputs.bad  # bad_read: counted every run
    bad = BadRecords(pipeline.on_bad_record)  # examples the pipeline skipped (checkpointed with the data)
    cfg = with_epochs(cfg, len(store.queries), global_batch)  # the schedule's length from the file's size
    total_steps = cfg.steps
    data_iter = iter(train_dataset(store, processor, pipeline))

    # --------------------------------------------------------------------------------------- model
    # In host memory, then placed on the mesh (shard section).
    model = build_retriever(cfg, max_image_patches=processor.patcher.max_patches)
    wrt = trainable_filter(cfg)

    # --------------------------------------------------------------------------------------- shard
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
        sharding.place_model(model, mesh, rules)
    graphdef, params, rest = nnx.split(model, wrt, ...)
    del model
    tx = make_optimizer(cfg.optimizer)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    p_sh = jax.tree.map(lambda x: x.sharding, params)
    abstract_opt = jax.eval_shape(tx.init, params)  # nothing allocated until we know there is no checkpoint
    o_sh = sharding.opt_state_shardings(abstract_opt, p_sh, mesh)
    state_sh = TrainState(replicated, p_sh, jax.tree.map(lambda x: x.sharding, rest), o_sh)
    abstract_state = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        params,
        rest,
        jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_opt, o_sh),
    )
    n_train, n_all = _count(params), _count(params) + _count(rest)

    # ---------------------------------------------------------------------------------------- step
    step_cfg = StepConfig(
        symmetric=cfg.symmetric,
        symmetric_reduction=cfg.symmetric_reduction,
        mask_false_negatives=cfg.mask_false_negatives,
        grad_cache=n_chunks > 1,
    )
    step_fn = make_train_step(graphdef, tx, step_cfg)
    schedule = lr_schedule(cfg.optimizer)
    guarded = _guarded_step(step_fn, graphdef, wrt, schedule, cfg)
    jitted: Callable[..., Any] | None = None  # built at the first batch (its shardings come from the batch)

    def prepare(host_batch: dict[str, Any]) -> dict[str, Any]:
        """This process's batch -> global arrays (``meta`` stays on the host); chunked batches
        (GradCache) have their examples on axis 1 (``position_ids``: 2)."""
        arrays = {k: v for k, v in host_batch.items() if k != "meta"}
        arrays["positive_mask"] = global_positive_mask(
            arrays["positive_mask"], n_chunks, jax.process_index(), jax.process_count()
        )
        batch_axes = {"positive_mask": 1, **sharding.BATCH_AXES}
        if n_chunks > 1:
            batch_axes |= {k: 1 for k in arrays["query"]} | {"position_ids": 2}
        return sharding.put_batch(arrays, mesh, rules, batch_axes)

    # ---------------------------------------------------------------------------------- checkpoint
    if is_primary:  # the first write: the inputs and the model are read
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config_to_json(cfg), indent=1) + "\n")
    ckpt = Checkpoints(workdir / "checkpoints", cfg.checkpoint)

    def checkpoint_items(st: TrainState) -> dict[str, Any]:
        items = {"trainable": {"step": st.step, "params": st.params, "opt_state": st.opt_state}}
        if cfg.checkpoint.save_frozen:
            items["frozen"] = st.rest
        return items

    info: dict[str, Any] = {"nonfinite_steps": 0, "consecutive_nonfinite": 0}
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), checkpoint_items(abstract_state)
    )
    restored = ckpt.restore_latest(abstract)
    start = 0
    if restored is None:
        opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
        state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), replicated), params, rest, opt_state)
    else:
        start, items = restored
        trainable = items["state"]
        state = TrainState(trainable["step"], trainable["params"], items.get("frozen", rest), trainable["opt_state"])
        data_iter.set_state(items["data"]["iterator"])
        bad.counts.update(items["data"]["bad_records"])
        info.update(items["info"])
        if int(state.step) != start:
            raise RuntimeError(f"checkpoint {start} holds step {int(state.step)}")
    del params, rest, abstract_state

    # ---------------------------------------------------------------------------------------- loop
    writers = MetricWriters(workdir, total_steps=total_steps, resume_step=start, primary=is_primary)
    where = f"resuming from step {start}" if restored else "starting"
    writers.print(
        f"{where}: {total_steps} steps, global batch {global_batch}, mesh {dict(mesh.shape)}, "
        f"{n_train / 1e6:.2f}M of {n_all / 1e6:.2f}M parameters train"
    )
    preemption = Preemption()
    preemption.install()
    meter = Meter(global_batch, total_steps)
    last: dict[str, Any] = {}
    started_at = time.perf_counter()
    preempted = finished = False

    def absorb(step_number: int, device_metrics: Any, tokens: int) -> None:
        """Read a finished step's metrics (one step late, so the host never waits on the step just
        dispatched), apply the non-finite guard's count, log every ``log_every`` steps."""
        nonlocal last
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        finite = bool(metrics.pop("finite"))
        if finite:
            info["consecutive_nonfinite"] = 0
        else:
            info["nonfinite_steps"] += 1
            info["consecutive_nonfinite"] += 1
            writers.print(
                f"step {step_number}: non-finite loss or gradient, step skipped "
                f"({info['consecutive_nonfinite']} in a row, {info['nonfinite_steps']} in all)"
            )
            if info["consecutive_nonfinite"] >= cfg.max_nonfinite_steps:
                raise NonFiniteError(
                    f"{info['consecutive_nonfinite']} steps in a row (up to step {step_number}) had a non-finite "
                    f"loss or gradient (max_nonfinite_steps={cfg.max_nonfinite_steps}); the parameters are "
                    "those from before the first of them; lower the learning rate or check the data"
                )
        meter.add(metrics if finite else None, tokens * jax.process_count())
        if step_number == start + 1:
            meter.restart_clock()  # the first step compiled
        if step_number % cfg.log_every == 0 or step_number == total_steps or preempted:  # preempted: the last step
            last = {"step": step_number, **meter.record(step_number), "skipped_steps": info["nonfinite_steps"]}
            writers.write(step_number, last)

    pending: tuple[int, Any, int] | None = None  # the dispatched step not yet absorbed
    try:
        with jax.set_mesh(mesh), sharding.axis_rules(rules):
            for step in range(start, total_steps):
                host_batch = next(data_iter)
                bad.merge([host_batch["meta"]["bad_records"]])
                batch = prepare(host_batch)
                if jitted is None:
                    batch_sh = jax.tree.map(lambda x: x.sharding, batch)
                    jitted = jax.jit(
                        guarded, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0
                    )
                state, metrics = jitted(state, batch)
                if pending is not None:
                    absorb(*pending)
                done = step + 1
                pending = (done, metrics, _tokens(host_batch))
                preempted = preemption.should_stop(done)
                if done % cfg.checkpoint.every == 0 or done == total_steps or preempted:
                    absorb(*pending)  # never checkpoint a step that should stop the run
                    pending = None
                    data_state = {"iterator": data_iter.get_state(), "bad_records": dict(bad.counts)}
                    ckpt.save(done, checkpoint_items(state), data_state, dict(info))
                if preempted:
                    writers.print(f"preempted: saved step {done}; exiting")
                    break
            if pending is not None:
                absorb(*pending)
        ckpt.wait()
        finished = True
    finally:
        preemption.uninstall()
        ckpt.close()
        prefix = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
        report = BadRecords(pipeline.on_bad_record).merge([bad_read, bad])
        if finished or report.total:  # not "none" just before an error (a bad record's among them) ends the run
            writers.print(*(prefix + line for line in report.report()), every_process=True)
        writers.close()

    return {
        **last,
        "final_step": int(state.step),
        "preempted": preempted,
        "nonfinite_steps": info["nonfinite_steps"],
        "bad_records": bad_read.total + bad.total,
        "seconds": time.perf_counter() - started_at,
    }


def _guarded_step(
    step_fn: Callable[[TrainState, dict[str, Any]], tuple[TrainState, dict[str, jax.Array]]],
    graphdef: nnx.GraphDef,
    wrt: Any,
    schedule: optax.Schedule,
    cfg: TrainerConfig,
) -> Callable[[TrainState, dict[str, Any]], tuple[TrainState, dict[str, jax.Array]]]:
    """The step plus: LoRA dropout keys for this step, the learning rate it applied, and the
    non-finite guard (a step whose loss or gradient norm is not finite changes neither parameters
    nor optimiser state; the step counter still advances: it counts batches)."""
    dropout = cfg.lora.rank > 0 and cfg.lora.dropout > 0
    inject = tuple(int(s) for s in cfg.inject_nonfinite_steps)

    def guarded(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
        mask = batch["positive_mask"]  # [chunks, queries, chunks, candidates]: see global_positive_mask
        batch = {**batch, "positive_mask": mask.reshape(mask.shape[0] * mask.shape[1], -1)}
        params, rest = state.params, state.rest
        if dropout:
            model = nnx.merge(graphdef, params, rest)
            set_dropout_key(model, jax.random.fold_in(jax.random.key(cfg.seed), state.step))
            _, params, rest = nnx.split(model, wrt, ...)
        if inject:
            poison = jnp.isin(state.step + 1, jnp.asarray(inject))  # step numbers as logged (1-based)
            params = jax.tree.map(
                lambda x: jnp.where(poison, jnp.nan, x) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
            )
        count = _update_count(state.opt_state, state.step)
        new, metrics = step_fn(TrainState(state.step, params, rest, state.opt_state), batch)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])

        def keep(new_tree: Any, old_tree: Any) -> Any:
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_tree, old_tree)

        out = TrainState(new.step, keep(new.params, state.params), state.rest, keep(new.opt_state, state.opt_state))
        metrics = {**metrics, "learning_rate": schedule(count), "finite": finite}
        return out, metrics

    return guarded


# ============================================================================================== main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train a retriever from a JSON trainer config (see TrainerConfig).")
    p.add_argument("--config", type=Path, required=True, help="a JSON file with the TrainerConfig fields")
    p.add_argument("--workdir", type=Path, required=True)
    args = p.parse_args(argv)
    summary = train(json.loads(args.config.read_text()), args.workdir)
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, int | float | str | bool)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
