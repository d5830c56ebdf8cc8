"""Building a run's parts from its recipe: the backbone (with LoRA), the retriever, the processor, the
record store, and what trains. Train, evaluation and the tools build through here, so a run is built
the same way wherever it is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from mmret import models
from mmret.data.bad_records import BadRecords
from mmret.data.processor import Processor
from mmret.data.rerank_pairs import PairRenderer
from mmret.data.rerank_prompts import get_prompt
from mmret.data.sources import open_source
from mmret.data.stores import ArrayRecordStore, RawStore
from mmret.lora import PathRegex, apply_lora
from mmret.lora import trainable_filter as lora_trainable_filter
from mmret.losses import Temperature
from mmret.models.encoder import Encoder
from mmret.models.reranker import Reranker
from mmret.models.retriever import Retriever
from mmret.models.vocab import grow_vocab
from mmret.recipe import DataConfig, ModelConfig, RerankConfig, SourceConfig, TrainerConfig, step_pipeline

#: Paths (dot-joined, from the Retriever) of what a ``freeze`` pattern may also match relative to.
BACKBONE_PREFIX = r"encoder\.backbone\."


def check_model_source(cfg: ModelConfig) -> None:
    """``ValueError`` unless exactly one of ``hf_dir``, ``checkpoint``, ``preset`` is given."""
    sources = cfg.sources()
    if len(sources) != 1:
        raise ValueError(f"model: give exactly one of hf_dir, checkpoint, preset (got {sources or 'none'})")


def open_store(cfg: DataConfig | SourceConfig, bad: BadRecords, key: str = "data") -> Any:
    """The record store of ``cfg`` (raw M-BEIR root or ArrayRecord build); ``key`` names it in errors."""
    if not cfg.root:
        raise ValueError(f"{key}.root: no data root given")
    if cfg.layout != "mbeir":  # text pairs, caption pairs, text retrieval: mmret.data.sources
        if cfg.format != "raw":
            raise ValueError(f"{key}.format: {cfg.format!r} is for M-BEIR roots only ({key}.layout={cfg.layout!r})")
        return open_source(cfg.layout, cfg.root, split=cfg.split, bad=bad, negatives_file=cfg.negatives_file)
    if cfg.format == "raw":
        return RawStore(
            cfg.root, cfg.split, cfg.tasks, negatives_file=cfg.negatives_file, bad=bad, query_file=cfg.query_file
        )
    return ArrayRecordStore(
        cfg.root, cfg.split, cfg.tasks, negatives_file=cfg.negatives_file, bad=bad, query_file=cfg.query_file
    )


def processor_dir(cfg: TrainerConfig) -> Path:
    """The directory of the run's tokenizer and image-processor files."""
    if cfg.data.processor_dir:
        return Path(cfg.data.processor_dir)
    if cfg.model.hf_dir:
        return Path(cfg.model.hf_dir)
    if cfg.model.checkpoint:
        from mmret.convert.checkpoint import hf_files_dir

        return hf_files_dir(cfg.model.checkpoint)
    raise ValueError("data.processor_dir: needed with model.preset (a directory with the tokenizer files)")


@dataclasses.dataclass
class TrainInputs:
    """What a run reads before it writes anything: the processor and the training record store."""

    processor: Processor
    store: Any  # data's own store
    bad: BadRecords  # the records the stores skipped while reading
    sources: list[tuple[Any, float]] = dataclasses.field(default_factory=list)  # (store, weight): data's, then mix

    def __post_init__(self) -> None:
        if not self.sources:
            self.sources = [(self.store, 1.0)]


def open_inputs(cfg: TrainerConfig) -> TrainInputs:
    """Open the run's processor and training store: every record is read and checked here (under
    ``on_bad_record="error"`` the first bad one raises :class:`~mmret.data.bad_records.BadRecordError`)."""
    bad = BadRecords(step_pipeline(cfg).on_bad_record)
    processor = Processor(processor_dir(cfg), cfg.data.processor)
    own = open_store(cfg.data, bad)
    mixed = [(open_store(s, bad, f"data.mix[{i}]"), s.weight) for i, s in enumerate(cfg.data.mix)]
    return TrainInputs(processor, own, bad, [(own, cfg.data.weight), *mixed])


def load_backbone(
    cfg: ModelConfig, max_image_patches: int = 0, vocab_size: int = 0, *, with_lm_head: bool = False
) -> Any:
    """The backbone ``cfg`` names (its family from the Hugging Face ``model_type``: :mod:`mmret.models`);
    ``max_image_patches`` (the processor's per-image cap) lets the vision tower attend within blocks of
    patches rather than across the whole batch (0: across the batch). A token embedding with fewer than
    ``vocab_size`` rows (tokens the processor added) is grown to it, new rows drawn from ``cfg.seed``.
    ``with_lm_head``: with the LM head (a reranker; an untied head is loaded from the source)."""
    check_model_source(cfg)
    options = dict(
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        scan_layers=cfg.scan_layers,
        remat=cfg.remat,
        attention_impl=cfg.attention_impl,
        max_image_patches=max_image_patches,
        with_lm_head=with_lm_head,
    )
    if cfg.hf_dir:
        model = models.from_hf(cfg.hf_dir, **options)
    elif cfg.checkpoint:
        from mmret.convert.checkpoint import load_model

        model = load_model(cfg.checkpoint, **options)
    else:
        model = models.from_preset(cfg.preset, seed=cfg.seed, **options)
    return grow_vocab(model, vocab_size, seed=cfg.seed)


def backbone_vocab_size(cfg: TrainerConfig) -> int:
    """The token rows the run's processor needs when its template adds tokens (``umarvel_exact``), else 0."""
    if not cfg.data.processor.template_spec().added_tokens():
        return 0
    return Processor(processor_dir(cfg), cfg.data.processor).vocab_size


def build_retriever(cfg: TrainerConfig, max_image_patches: int = 0, *, start: Retriever | None = None) -> Retriever:
    """The model a run of ``cfg`` starts from (backbone, LoRA adapters, temperature), in host memory;
    ``max_image_patches``: see :func:`load_backbone`. ``start``: a trained retriever (LoRA merged) whose
    weights replace the model source's before the adapters are added, and whose temperature is kept
    with ``temperature.carry`` (a chained stage: :func:`mmret.checkpoints.initial_model`)."""
    with host_memory():
        backbone = load_backbone(cfg.model, max_image_patches, backbone_vocab_size(cfg))
        if start is not None:
            _take_weights(backbone, start.encoder.backbone, cfg.model.init_from)
        add_lora(backbone, cfg)
        t = cfg.temperature
        temperature = Temperature(t.init, learnable=t.learnable, min_temperature=t.min, max_temperature=t.max)
        if start is not None and t.carry:
            temperature.log_tau.set_value(start.temperature.log_tau[...])
        return Retriever(Encoder(backbone, cfg.encoder), temperature)


def add_lora(backbone: nnx.Module, cfg: TrainerConfig) -> None:
    """The run's LoRA adapters (``lora.*``) on ``backbone``, in place (none with ``lora.rank`` 0)."""
    if cfg.lora.rank > 0:
        apply_lora(
            backbone,
            rank=cfg.lora.rank,
            alpha=cfg.lora.alpha,
            dropout=cfg.lora.dropout,
            target=cfg.lora.target,
            rngs=cfg.seed,
        )


def build_reranker(cfg: TrainerConfig, max_image_patches: int = 0) -> Reranker:
    """The reranker a run of ``cfg`` starts from: the model source's backbone with its LM head, LoRA added;
    in host memory."""
    with host_memory():
        backbone = load_backbone(cfg.model, max_image_patches, backbone_vocab_size(cfg), with_lm_head=True)
        add_lora(backbone, cfg)
        return Reranker(backbone)


def pair_renderer(processor: Processor, r: RerankConfig) -> PairRenderer:
    """The reranker's pair renderer of ``rerank.*`` (``prompt``, ``max_text_tokens``, ``loss_on``)."""
    return PairRenderer(processor, get_prompt(r.prompt), max_text_tokens=r.max_text_tokens, loss_on=r.loss_on)


def _take_weights(backbone: nnx.Module, trained: nnx.Module, where: str | None) -> None:
    """Copy ``trained``'s parameters into ``backbone`` (same architecture and layout)."""
    mine, theirs = nnx.state(backbone, nnx.Param), nnx.state(trained, nnx.Param)
    a = {p: (v.shape, v.dtype) for p, v in nnx.to_flat_state(mine)}
    b = {p: (v.shape, v.dtype) for p, v in nnx.to_flat_state(theirs)}
    if a.keys() != b.keys() or any(a[p][0] != b[p][0] for p in a):
        diff = sorted(set(a) ^ set(b)) or [p for p in a if a[p][0] != b[p][0]]
        raise ValueError(
            f"model.init_from={where}: that run's model differs from this one's (first: "
            f"{'.'.join(map(str, diff[0]))}); same backbone, scan_layers and vocabulary needed"
        )
    nnx.update(backbone, jax.tree.map(lambda m, t: t.astype(m.dtype), mine, theirs))


def host_memory() -> contextlib.AbstractContextManager[Any]:
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
