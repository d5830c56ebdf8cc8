"""The trainer: ``train(config, workdir)`` reads top to bottom in labelled sections (big_vision style):
config, mesh, data, model, shard, step, checkpoint, loop. It knows no task's details: what the examples
are, what the model is, how a host batch becomes global arrays and what the step computes come from the
run's task (:mod:`mmret.tasks`; the bi-encoder by default).

What a run leaves in ``workdir``::

    config.json          the resolved config
    metrics.jsonl        one record per log point (loss, accuracy, temperature, grad_norm,
                         learning_rate, examples_per_s, tokens_per_s, skipped steps, ...)
    tb/                  TensorBoard event files (mmret.train.metrics)
    checkpoints/<step>/  the run checkpoints (layout: mmret.checkpoints)

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
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mmret import checkpoints, sharding, tasks
from mmret.atomic_dir import PathLike, absolute, as_path
from mmret.checkpoints import Checkpoints
from mmret.lora import set_dropout_key
from mmret.optim import lr_schedule, make_optimizer
from mmret.recipe import TrainerConfig, as_trainer_config, config_to_json, with_epochs
from mmret.tasks.base import StepFn, Task, TrainState
from mmret.train.meter import Meter
from mmret.train.metrics import MetricWriters
from mmret.train.preemption import Preemption


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def _count(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _update_count(opt_state: Any, fallback: jax.Array) -> jax.Array:
    """How many updates the optimiser has applied (its schedule's step): the first ``count`` leaf."""
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    return found[0][1] if found else fallback


# ============================================================================================== train


def train(
    config: TrainerConfig | Mapping[str, Any] | Any,
    workdir: PathLike,
    *,
    task: Task | None = None,
    inputs: Any = None,
) -> dict[str, Any]:
    """Train (or resume) the run in ``workdir``; returns the last logged metrics plus a summary.
    ``task``: the kind of training (default: the one ``config.task`` names). ``inputs``: the task's
    ``open_inputs(config)``, when the caller opened them already. Nothing is written to ``workdir``
    before the inputs and the model are read."""
    cfg = as_trainer_config(config)
    task = tasks.get(cfg.task) if task is None else task
    task.check(cfg)
    workdir = as_path(absolute(workdir))  # local, or gs:// and other file systems (etils.epath)
    is_primary = jax.process_index() == 0

    # ---------------------------------------------------------------------------------------- mesh
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.make_rules(overrides=cfg.rules)
    global_batch = task.global_batch_size(cfg)

    # ---------------------------------------------------------------------------------------- data
    inputs = task.open_inputs(cfg) if inputs is None else inputs
    data = task.data(cfg, inputs)
    cfg = with_epochs(cfg, data.examples, global_batch)  # the schedule's length from the data's size
    total_steps = cfg.steps

    # --------------------------------------------------------------------------------------- model
    # In host memory, then placed on the mesh (shard section).
    model = task.model(cfg, inputs)
    wrt = task.trainable(cfg)

    # --------------------------------------------------------------------------------------- shard
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
        sharding.place_model(model, mesh, rules)
    graphdef, params, rest = nnx.split(model, wrt, ...)
    del model
    tx = make_optimizer(cfg.optimizer)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_sh, abstract_state = state_layout(params, rest, tx, mesh)  # nothing allocated before the restore
    o_sh = state_sh.opt_state
    n_train, n_all = _count(params), _count(params) + _count(rest)

    # ---------------------------------------------------------------------------------------- step
    guarded = guarded_step(task.step(graphdef, tx, cfg), graphdef, wrt, lr_schedule(cfg.optimizer), cfg)
    jitted: Callable[..., Any] | None = None  # built at the first batch (its shardings come from the batch)

    # ---------------------------------------------------------------------------------- checkpoint
    if is_primary:  # the first write: the inputs and the model are read
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / checkpoints.CONFIG).write_text(json.dumps(config_to_json(cfg), indent=1) + "\n")
    ckpt = Checkpoints(workdir, cfg.checkpoint)

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
        data.set_state(items["data"])
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
    preemption = Preemption(ckpt.reached_preemption)
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
                host_batch = next(data)
                batch = task.global_arrays(host_batch, mesh, rules)
                if jitted is None:
                    jitted = jit_step(guarded, state_sh, jax.tree.map(lambda x: x.sharding, batch))
                state, metrics = jitted(state, batch)
                if pending is not None:
                    absorb(*pending)
                done = step + 1
                pending = (done, metrics, task.tokens(host_batch))
                preempted = preemption.should_stop(done)
                if done % cfg.checkpoint.every == 0 or done == total_steps or preempted:
                    absorb(*pending)  # never checkpoint a step that should stop the run
                    pending = None
                    ckpt.save(done, checkpoint_items(state), data.get_state(), dict(info))
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
        lines = data.report(finished)
        if lines:
            writers.print(*(prefix + line for line in lines), every_process=True)
        writers.close()

    return {
        **last,
        "final_step": int(state.step),
        "preempted": preempted,
        "nonfinite_steps": info["nonfinite_steps"],
        "bad_records": data.skipped(),
        "seconds": time.perf_counter() - started_at,
    }


def state_layout(
    params: nnx.State, rest: nnx.State, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> tuple[TrainState, TrainState]:
    """The train state's shardings and its abstract value (``jax.ShapeDtypeStruct`` s carrying them: a restore
    target, or what :func:`mmret.train.aot` compiles for) from ``params`` / ``rest`` placed on ``mesh`` (arrays,
    or ``ShapeDtypeStruct`` s with shardings); the optimiser state follows its parameters' shardings."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    p_sh = jax.tree.map(lambda x: x.sharding, params)
    abstract_opt = jax.eval_shape(tx.init, params)
    o_sh = sharding.opt_state_shardings(abstract_opt, p_sh, mesh)
    state_sh = TrainState(replicated, p_sh, jax.tree.map(lambda x: x.sharding, rest), o_sh)
    abstract_state = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params),
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), rest),
        jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_opt, o_sh),
    )
    return state_sh, abstract_state


def jit_step(guarded: StepFn, state_sh: TrainState, batch_sh: Any) -> Callable[..., Any]:
    """The jitted step the loop runs (the state donated): one definition for the trainer and the fit check."""
    return jax.jit(guarded, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)


def guarded_step(
    step_fn: StepFn,
    graphdef: nnx.GraphDef,
    wrt: Any,
    schedule: optax.Schedule,
    cfg: TrainerConfig,
) -> StepFn:
    """The task's step plus: LoRA dropout keys for this step, the learning rate it applied, and the
    non-finite guard (a step whose loss or gradient norm is not finite changes neither parameters
    nor optimiser state; the step counter still advances: it counts batches)."""
    dropout = cfg.lora.rank > 0 and cfg.lora.dropout > 0
    inject = tuple(int(s) for s in cfg.inject_nonfinite_steps)

    def guarded(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
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
    p = argparse.ArgumentParser(description="Train from a JSON config (see mmret.recipe.TrainerConfig).")
    p.add_argument("--config", type=as_path, required=True, help="a JSON file with the TrainerConfig fields")
    p.add_argument("--workdir", type=str, required=True, help="the run's directory (local, gs://, ...)")
    args = p.parse_args(argv)
    summary = train(json.loads(args.config.read_text()), args.workdir)
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, int | float | str | bool)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
