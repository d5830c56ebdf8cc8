"""A run's checkpoints, written and read in one place (train writes them; evaluation, export and the next
stage read them).

Layout under a run's ``workdir``::

    checkpoints/<step>/state/     orbax: step, trainable parameters, optimiser state
    checkpoints/<step>/data/      per process: the data iterator's state (grain's checkpoint handler;
                                  ``process_<i>-of-<n>.json``: the grain iterator state and bad-record counts)
    checkpoints/<step>/info/      run counters (JSON)
    checkpoints/<step>/frozen/    the frozen parameters (only with ``checkpoint.save_frozen``)
    checkpoints_unreadable/       checkpoints that failed to restore, moved aside

orbax writes a step beside its directory and renames it into place when complete, so a listed step is a
finished one (:func:`steps`, through orbax's own listing). :func:`load_trained`
rebuilds a run's model from its recipe and restores a step's parameters into it, LoRA merged.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import time
from typing import Any

import grain.checkpoint
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mmret.atomic_dir import PathLike, absolute, as_path, is_local, stamp
from mmret.build import build_reranker, build_retriever, trainable_filter
from mmret.lora import merge_lora
from mmret.models.reranker import Reranker
from mmret.models.retriever import Retriever
from mmret.recipe import CheckpointConfig, TrainerConfig, as_trainer_config, config_to_json

log = logging.getLogger("mmret.checkpoints")

CHECKPOINTS = "checkpoints"
CONFIG = "config.json"  # the resolved config a run was trained with (written by the trainer)


def checkpoint_dir(workdir: PathLike) -> epath.Path:
    """A run's checkpoint directory (local, or gs:// and other file systems through etils.epath)."""
    return as_path(absolute(workdir)) / CHECKPOINTS


def step_dir(workdir: PathLike, step: int) -> epath.Path:
    """Where checkpoint ``step`` of the run in ``workdir`` lives."""
    return checkpoint_dir(workdir) / str(step)


def steps(workdir: PathLike) -> list[int]:
    """The finished checkpoints of the run in ``workdir``, oldest first: orbax's own listing of finalized
    steps (what the ``CheckpointManager`` restores from; a save in flight or torn is not one)."""
    directory = checkpoint_dir(workdir)
    return sorted(ocp.utils.checkpoint_steps(directory)) if directory.is_dir() else []


def resolve_step(workdir: PathLike, step: int | None) -> int:
    """``step`` (0: the model the run started from), or the run's latest checkpoint when None."""
    have = steps(workdir)
    if step is None:
        if not have:
            raise FileNotFoundError(f"{checkpoint_dir(workdir)}: no finished checkpoint to evaluate (give --step 0?)")
        return have[-1]
    if step != 0 and step not in have:
        raise FileNotFoundError(f"{step_dir(workdir, step)}: no such checkpoint (have: {have or 'none'})")
    return step


# ============================================================================================ reading


def restore_params(model: nnx.Module, wrt: Any, item_dir: PathLike) -> None:
    """Read the variables of ``model`` selected by ``wrt`` from an orbax item of a run checkpoint
    (``{"params": ...}``; the optimiser state beside them is not read)."""
    _, state, _ = nnx.split(model, wrt, ...)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract)
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(
            item_dir,
            args=ocp.args.PyTreeRestore(
                item={"params": abstract}, restore_args={"params": restore_args}, partial_restore=True
            ),
        )
    nnx.update(model, out["params"])  # a State shaped like the template


def run_config(workdir: PathLike) -> TrainerConfig:
    """The config a run was trained with (its ``config.json``)."""
    path = as_path(workdir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (not a training run's directory?)")
    return as_trainer_config(json.loads(path.read_text()))


def initial_model(cfg: TrainerConfig, max_image_patches: int = 0) -> Retriever:
    """The model a run of ``cfg`` starts from: :func:`mmret.build.build_retriever`, with the weights of
    ``model.init_from`` (that run's checkpoint ``model.init_step``, default its latest, LoRA merged; its
    own ``init_from`` followed in turn) when given."""
    if not cfg.model.init_from:
        return build_retriever(cfg, max_image_patches)
    source = cfg.model.init_from
    step = resolve_step(source, cfg.model.init_step)
    if step == 0:
        raise FileNotFoundError(f"model.init_from={source}: step 0 is that run's own start, not a trained step")
    start = load_trained(run_config(source), source, step, max_image_patches=max_image_patches)
    return build_retriever(cfg, max_image_patches, start=start)


def load_trained(
    cfg: TrainerConfig, workdir: PathLike | None = None, step: int = 0, *, max_image_patches: int = 0
) -> Retriever:
    """The retriever of a run of ``cfg`` at ``step`` (0: before training, i.e. the model it started from:
    :func:`initial_model`), LoRA adapters merged into plain weights; in host memory.
    ``max_image_patches``: the processor's per-image cap (:func:`mmret.build.load_backbone`).

    The last retriever restored from a checkpoint is kept (one, a copy handed out): a chain's stage k starts
    from stage k-1's model, which started from k-2's, so without it every stage, its mining and its evaluation
    would rebuild and restore every stage before it (quadratic in the stages). The kept one is a copy with its
    own buffers (one more copy of the weights in host memory: :func:`forget_trained` drops it), as is each
    one handed out from it: a step may donate a model's buffers."""
    key = _trained_key(cfg, workdir, step, max_image_patches)
    if key is not None and _LAST_TRAINED and _LAST_TRAINED[0][0] == key:
        return _copy(_LAST_TRAINED[0][1])
    model = _trained(initial_model(cfg, max_image_patches), cfg, workdir, step)
    if key is None or any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(nnx.state(model))):
        return model  # nothing to key on, or an abstract model (nnx.eval_shape: the fit check)
    _LAST_TRAINED[:] = [(key, _copy(model))]
    return model


def _copy(model: Retriever) -> Retriever:
    """``model`` with its own buffers: what is handed out may be donated to a step (on CPU its buffers then go)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state))


#: :func:`load_trained`'s last restored retriever: [(key, model)], or empty.
_LAST_TRAINED: list[tuple[tuple[Any, ...], Retriever]] = []


def forget_trained() -> None:
    """Drop the retriever :func:`load_trained` keeps (its host memory is freed once no copy is in use)."""
    _LAST_TRAINED.clear()


def _trained_key(cfg: TrainerConfig, workdir: PathLike | None, step: int, max_image_patches: int) -> tuple | None:
    """What a restored retriever depends on: the recipe, the checkpoint (a local one's modification times too:
    a step rewritten in place is read again) and the image cap; None for step 0 (nothing restored)."""
    if not step or workdir is None:
        return None
    ckpt = step_dir(workdir, step)
    stamps: tuple[int, ...] = ()
    if is_local(ckpt):
        stamps = tuple(stamp(p)[1] for p in (ckpt, ckpt / "state") if p.exists())
    recipe = json.dumps(config_to_json(cfg), sort_keys=True, default=str)
    return (str(ckpt), stamps, max_image_patches, recipe)


def load_trained_reranker(
    cfg: TrainerConfig, workdir: PathLike | None = None, step: int = 0, *, max_image_patches: int = 0
) -> Reranker:
    """The reranker of a run of ``cfg`` (task ``reranker``) at ``step`` (0: the untrained model source, a
    zero-shot reranker), LoRA merged; in host memory."""
    return _trained(build_reranker(cfg, max_image_patches), cfg, workdir, step)


def _trained(model: Any, cfg: TrainerConfig, workdir: PathLike | None, step: int) -> Any:
    """``model`` with checkpoint ``step``'s parameters (none for 0), LoRA merged."""
    if step:
        if workdir is None:
            raise ValueError("a checkpoint step needs the run's workdir")
        ckpt = step_dir(workdir, step)
        restore_params(model, trainable_filter(cfg), ckpt / "state")
        if (ckpt / "frozen").is_dir():  # checkpoint.save_frozen: the frozen weights too
            restore_params(model, nnx.Not(trainable_filter(cfg)), ckpt / "frozen")
    merge_lora(model)
    return model


# ============================================================================================ writing


class JsonState:
    """A JSON-able data state (e.g. ``{"iterator": <grain state>, "bad_records": {...}}``) in the shape
    grain's checkpoint handler saves and restores (``get_state`` / ``set_state`` as bytes), captured when
    the save is requested. The file it writes, ``process_<i>-of-<n>.json``, is the one mmret's own handler
    wrote before, so older checkpoints restore unchanged."""

    def __init__(self, state: Any = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:  # grain's handler calls it after a restore
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

    def watch(self, path: PathLike) -> None:
        self.paths.append(f"{path}/")
        if sys.unraisablehook != self._unraisable:  # (again, if something replaced it since)
            self._hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        logging.getLogger("asyncio").addFilter(self)  # (once: a logger holds a filter once)

    def unwatch(self, path: PathLike) -> None:
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
    """The run checkpoints of ``workdir``: orbax ``CheckpointManager`` with async saves, keep N, and a
    restore that falls back past unreadable checkpoints (moved aside with one warning line)."""

    def __init__(self, workdir: PathLike, cfg: CheckpointConfig):
        self.cfg = cfg
        self.directory = checkpoint_dir(workdir)
        self.unreadable = self.directory.parent / f"{self.directory.name}_unreadable"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=True,  # a save torn by a kill
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, items: dict[str, Any], data: Any, info: dict[str, Any]) -> None:
        """Save ``items`` (``trainable``, optionally ``frozen``: pytrees of arrays), this process's data
        state ``data`` (JSON-able) and the run counters ``info`` as checkpoint ``step``."""
        args = dict(
            state=ocp.args.StandardSave(items["trainable"]),
            data=grain.checkpoint.CheckpointSave(JsonState(data)),
            info=ocp.args.JsonSave(info),
        )
        if "frozen" in items:
            args["frozen"] = ocp.args.StandardSave(items["frozen"])
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore_latest(self, abstract: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        """The newest readable checkpoint as (step, items: ``state``, ``data`` (the data state),
        ``info``[, ``frozen``]), moving unreadable ones aside with a warning; None when there is none.
        Raises if every checkpoint is unreadable."""
        all_steps = sorted(self.manager.all_steps(), reverse=True)
        errors = []
        for step in all_steps:
            args = dict(
                state=ocp.args.StandardRestore(abstract["trainable"]),
                data=grain.checkpoint.CheckpointRestore(JsonState()),
                info=ocp.args.JsonRestore(),
            )
            if "frozen" in abstract:
                args["frozen"] = ocp.args.StandardRestore(abstract["frozen"])
            path = self.directory / str(step)
            _RESTORE_NOISE.watch(path)
            try:
                restored = dict(self.manager.restore(step, args=ocp.args.Composite(**args)))
                _RESTORE_NOISE.unwatch(path)
                restored["data"] = restored["data"].state
                return step, restored
            except Exception as e:  # noqa: BLE001 (any failure to read means: try the previous one)
                target = self._move_aside(step)
                msg = f"checkpoint {path} is unreadable ({type(e).__name__}: {_first_line(e)}); moved to {target}"
                log.warning(msg + ("; trying the previous one" if step != all_steps[-1] else ""))
                errors.append(msg)
        if all_steps:
            raise RuntimeError(f"no readable checkpoint in {self.directory}: " + "; ".join(errors))
        return None

    def reached_preemption(self, step: int) -> bool:
        """orbax's preemption check (multi-process jobs under ``jax.distributed``'s preemption service):
        True on every process at the same step once a preemption notice arrived."""
        return self.manager.reached_preemption(step)

    def _move_aside(self, step: int) -> epath.Path:
        """Move checkpoint ``step`` to ``checkpoints_unreadable/<step>.<time>`` (process 0 moves it; on an
        object store the move is a copy of its objects, then a delete)."""
        target = self.unreadable / f"{step}.{int(time.time())}"
        if jax.process_index() == 0:
            self.unreadable.mkdir(parents=True, exist_ok=True)
            source = self.directory / str(step)
            if is_local(source):
                shutil.move(source, target)
            else:
                for item in source.rglob("*"):
                    if item.is_file():
                        (target / item.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                        item.copy(target / item.relative_to(source))
                source.rmtree()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"mmret_ckpt_move_{step}")
        self.manager.reload()
        return target if jax.process_index() == 0 else self.unreadable

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
