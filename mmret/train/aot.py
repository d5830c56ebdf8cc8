"""Ahead-of-time fit check: the train step of a config lowered and compiled for a target mesh without its
hardware, and the bytes it needs on each device.

The step is the trainer's own (:func:`mmret.train.trainer.guarded_step` of the task's step, jitted by
:func:`~mmret.train.trainer.jit_step` with :func:`~mmret.train.trainer.state_layout`'s shardings); the model is
built abstractly (``nnx.eval_shape``: nothing is allocated, no weights are read) and the batch is the shape the
pipeline collates for the config (:func:`mmret.data.pipeline.collate_train` of stand-in examples; a packed side
at its largest bucket), laid out as :mod:`mmret.tasks.bi_encoder.task` lays it over ``processes`` hosts.

Targets: a TPU topology through jax's topology API (``v5p:2x4x4``: libtpu installed, no TPU needed; the
compiler is the real one, so its memory figures are the run's), or this machine's CPU devices (``cpu``;
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` for N of them: the CPU compiler's buffer assignment,
a proxy). ``tools/aot_compile.py`` is the command line.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from mmret import checkpoints, models, sharding
from mmret.data.bad_records import BadRecords
from mmret.data.pipeline import TrainExample, collate_train
from mmret.data.processor import ImagePatcher, ProcessedExample, collate
from mmret.optim import lr_schedule, make_optimizer
from mmret.recipe import TrainerConfig, step_pipeline
from mmret.tasks.bi_encoder.task import BiEncoder, batch_axes, chunks, global_positive_mask
from mmret.train.trainer import guarded_step, jit_step, state_layout

#: High-bandwidth memory per device (GiB) by ``device_kind`` (a jax device's), for the default budget.
HBM_GIB: dict[str, float] = {
    "TPU v4": 32,
    "TPU v5 lite": 16,
    "TPU v5e": 16,
    "TPU v5": 95,  # v5p
    "TPU v5p": 95,
    "TPU v6 lite": 32,  # v6e (Trillium)
    "NVIDIA H100 80GB HBM3": 80,
    "NVIDIA H200": 141,
}


@dataclasses.dataclass
class FitReport:
    """Per-device bytes of a compiled train step (``*_bytes``), from the shardings (state, batch) and from the
    compiler's buffer assignment (argument / output / alias / temporary)."""

    target: str
    device_kind: str
    devices: int
    processes: int
    mesh: dict[str, int]
    global_batch: int
    batch_shapes: dict[str, list[int]]
    trainable_params: int
    frozen_params: int
    params_bytes: int  # trainable parameters, per device
    frozen_bytes: int  # everything else in the model (frozen weights, LoRA bases), per device
    opt_state_bytes: int
    batch_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    peak_bytes: int  # argument + output - alias (donated) + temporary
    hbm_bytes: int | None
    fits: bool | None
    lower_seconds: float
    compile_seconds: float
    compile_error: str | None = None  # the compiler refused the program: its message (the largest allocations)

    def lines(self) -> list[str]:
        """A readable summary, one figure a line."""

        def gib(n: int) -> str:
            return f"{n / 2**30:.2f} GiB"

        verdict = "unknown (no HBM size: --hbm_gib)" if self.fits is None else ("yes" if self.fits else "NO")
        return [
            f"target {self.target} ({self.device_kind}): {self.devices} devices, {self.processes} processes, "
            f"mesh {self.mesh}, global batch {self.global_batch}",
            f"parameters: {self.trainable_params / 1e6:.1f}M trainable, {self.frozen_params / 1e6:.1f}M frozen",
            f"per device: trainable {gib(self.params_bytes)}, frozen {gib(self.frozen_bytes)}, "
            f"optimizer state {gib(self.opt_state_bytes)}, batch {gib(self.batch_bytes)}",
            f"compiled: arguments {gib(self.argument_bytes)}, outputs {gib(self.output_bytes)}, "
            f"donated {gib(self.alias_bytes)}, temporaries {gib(self.temp_bytes)}, "
            f"code {self.code_bytes / 2**20:.1f} MiB",
            f"peak {gib(self.peak_bytes)} of HBM {gib(self.hbm_bytes) if self.hbm_bytes else '?'}: fits {verdict}",
            f"lowered in {self.lower_seconds:.1f} s, compiled in {self.compile_seconds:.1f} s",
            *([f"the compiler refused it: {self.compile_error.strip().splitlines()[0]}"] if self.compile_error else []),
        ]


def target_devices(target: str) -> list[Any]:
    """The devices of ``target``: ``cpu`` (this process's CPU devices) or a TPU topology name as jax's topology
    API takes it (``v5p:2x4x4``, ``v5e:4x4``; libtpu must be installed)."""
    if target == "cpu":
        return list(jax.devices("cpu"))
    if ":" not in target:
        raise ValueError(f"target {target!r}: 'cpu' or a TPU topology such as v5p:2x4x4 (chip generation:shape)")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=target, platform="tpu").devices)
    except Exception as e:  # no libtpu, or a shape the generation does not have
        raise RuntimeError(
            f"target {target}: jax's TPU topology API failed ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
            "it needs libtpu (pip install 'jax[tpu]') and a valid shape"
        ) from e


def _message_bytes(message: str, what: str) -> int:
    """The size the compiler's out-of-memory message gives for ``what`` (``... HLO temporaries (409.39G) ...``);
    0 when it gives none."""
    found = re.search(rf"{what}\s*\((\d+(?:\.\d+)?)([KMGT]?)\)", message)
    if not found:
        return 0
    return int(float(found.group(1)) * 1024 ** "BKMGT".index(found.group(2) or "B"))


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of ``tree`` (``ShapeDtypeStruct`` s with shardings, or arrays): each leaf's shard
    shape times its item size (a replicated leaf counts whole on every device)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


class _ShapeOnlyProcessor:
    """What :func:`collate_train` reads of a processor (the pad id, the patch width): the batch's shapes do
    not depend on the tokenizer, so none is loaded."""

    def __init__(self, patcher: ImagePatcher, pad_token_id: int = 0):
        self.patcher, self.pad_token_id = patcher, pad_token_id

    def collate(self, examples: list[ProcessedExample], **kwargs: Any) -> dict[str, np.ndarray]:
        kwargs.setdefault("patch_dim", self.patcher.patch_dim)
        return collate(examples, pad_token_id=self.pad_token_id, **kwargs)


def _stand_in() -> ProcessedExample:
    """A one-token text example: the smallest input (a packed side is grown to its largest bucket after)."""
    one = np.ones(1, np.int32)
    return ProcessedExample(
        input_ids=one, attention_mask=one, pool_mask=one, position_ids=np.zeros((3, 1), np.int32),
        pixel_values=None, image_grid_thw=None, num_text_tokens=1, num_instruction_tokens=0, num_image_tokens=0,
        truncated=False,
    )  # fmt: skip


def _largest_bucket(side: dict[str, Any], packs: Any, patch_budget: int, pad: int) -> dict[str, Any]:
    """A packed side (or chunked side) grown to its largest bucket's rows and patch rows."""
    from mmret.data import packing

    if not packing.is_packed(side):
        return side
    rows = packs.rows[-1]
    patches = packs.patches[-1] if packs.patches else patch_budget
    return packing.grow_chunks(side, rows, patches, pad)


def host_batch(cfg: TrainerConfig, patcher: ImagePatcher, pad_token_id: int = 0) -> dict[str, Any]:
    """One process's batch as the pipeline collates it for ``cfg`` (static shapes; packed sides at their largest
    bucket), ``meta`` dropped."""
    p = step_pipeline(cfg)
    ex = _stand_in()
    examples = [
        TrainExample(
            ex,
            [ex] * (1 + p.num_negatives),
            f"q{i}",
            [f"q{i}c{j}" for j in range(1 + p.num_negatives)],
            frozenset({f"q{i}c0"}),
            BadRecords(p.on_bad_record),
        )
        for i in range(p.batch_size)
    ]
    batch = collate_train(examples, _ShapeOnlyProcessor(patcher, pad_token_id), p)
    n = 1 if p.grad_cache_chunk is None else p.batch_size // p.grad_cache_chunk
    batch["query"] = _largest_bucket(batch["query"], p.query_packing, p.max_query_patches // n, pad_token_id)
    batch["candidates"] = _largest_bucket(
        batch["candidates"], p.candidate_packing, p.max_candidate_patches // n, pad_token_id
    )
    return {k: v for k, v in batch.items() if k != "meta"}


def fit_check(
    cfg: TrainerConfig,
    devices: list[Any],
    *,
    processes: int | None = None,
    hbm_bytes: int | None = None,
    target: str = "",
) -> FitReport:
    """Lower and compile ``cfg``'s train step (task ``bi_encoder``) for ``devices`` (``processes`` hosts, each
    collating ``cfg``'s per-host batch; default: the devices' process count) and report its per-device bytes;
    ``hbm_bytes`` (default :data:`HBM_GIB` of the device kind) decides ``fits``."""
    if cfg.task != "bi_encoder":
        raise ValueError(f"task={cfg.task!r}: the fit check compiles the bi-encoder's step only")
    if processes is None:
        processes = len({getattr(d, "process_index", 0) for d in devices})
    kind = str(getattr(devices[0], "device_kind", devices[0].platform))
    if hbm_bytes is None and kind in HBM_GIB:
        hbm_bytes = int(HBM_GIB[kind] * 2**30)
    task = BiEncoder()
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = sharding.make_rules(overrides=cfg.rules)
    if not cfg.model.preset or cfg.model.hf_dir or cfg.model.checkpoint:
        raise ValueError(
            "model.preset: the fit check builds the model from a preset (no weights are read), e.g. "
            f"--preset=qwen2vl-7b; got preset={cfg.model.preset!r}, hf_dir={cfg.model.hf_dir!r}, "
            f"checkpoint={cfg.model.checkpoint!r}"
        )
    pcfg = cfg.data.processor
    backbone = models.find_preset(cfg.model.preset)
    patcher = ImagePatcher.for_backbone(backbone, None, min_pixels=pcfg.min_pixels, max_pixels=pcfg.max_pixels)

    # the model, abstract, its variables carrying the rules' shardings
    model_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=None))  # same architecture
    abstract = nnx.eval_shape(lambda: checkpoints.initial_model(model_cfg, max_image_patches=patcher.max_patches))
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
        nnx.update(abstract, sharding.sharded_abstract(abstract, mesh, rules))
    wrt = task.trainable(cfg)
    graphdef, params, rest = nnx.split(abstract, wrt, ...)
    tx = make_optimizer(cfg.optimizer)
    state_sh, abstract_state = state_layout(params, rest, tx, mesh)

    # the batch: one host's, laid out over the processes as BiEncoder.global_arrays lays it
    host = host_batch(cfg, patcher)
    n_chunks = chunks(host)
    host["positive_mask"] = global_positive_mask(host["positive_mask"], n_chunks, 0, processes)
    axes = batch_axes(host, n_chunks)
    shapes = sharding.global_shapes(host, processes, axes)
    batch_sh = sharding.batch_shardings(shapes, mesh, rules, axes)
    abstract_batch = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, batch_sh)

    guarded = guarded_step(task.step(graphdef, tx, cfg), graphdef, wrt, lr_schedule(cfg.optimizer), cfg)
    error = None
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
        t0 = time.perf_counter()
        lowered = jit_step(guarded, state_sh, batch_sh).lower(abstract_state, abstract_batch)
        t1 = time.perf_counter()
        try:
            m = lowered.compile().memory_analysis()
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program over its HBM
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            error, m = str(e), None
        t2 = time.perf_counter()
    state_bytes = per_device_bytes(abstract_state)
    if m is not None:
        argument, output, alias, temp = (
            int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.alias_size_in_bytes),
            int(m.temp_size_in_bytes),
        )  # fmt: skip
        code = int(m.generated_code_size_in_bytes)
    else:  # what the compiler's message says the temporaries need; the arguments from the shardings
        argument, output, alias, code = state_bytes + per_device_bytes(abstract_batch), state_bytes, state_bytes, 0
        temp = _message_bytes(error, "temporaries")
    peak = argument + output - alias + temp
    leaves = jax.tree_util.tree_leaves_with_path(shapes)
    return FitReport(
        target=target or devices[0].platform,
        device_kind=kind,
        devices=len(devices),
        processes=processes,
        mesh={k: int(v) for k, v in mesh.shape.items()},
        global_batch=step_pipeline(cfg).batch_size * processes,
        batch_shapes={jax.tree_util.keystr(p): list(x.shape) for p, x in leaves},
        trainable_params=sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
        frozen_params=sum(math.prod(x.shape) for x in jax.tree.leaves(rest)),
        params_bytes=per_device_bytes(abstract_state.params),
        frozen_bytes=per_device_bytes(abstract_state.rest),
        opt_state_bytes=per_device_bytes(abstract_state.opt_state),
        batch_bytes=per_device_bytes(abstract_batch),
        argument_bytes=argument,
        output_bytes=output,
        alias_bytes=alias,
        temp_bytes=temp,
        code_bytes=code,
        peak_bytes=peak,
        hbm_bytes=hbm_bytes,
        fits=False if error else (None if hbm_bytes is None else peak <= hbm_bytes),
        compile_error=error,
        lower_seconds=t1 - t0,
        compile_seconds=t2 - t1,
    )
