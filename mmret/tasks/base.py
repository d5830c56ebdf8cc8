"""What a kind of training is, as the trainer sees it: the :class:`Task` protocol and the :class:`TrainState`
its step reads and writes.

The trainer (:mod:`mmret.train.trainer`) owns the mesh, the optimiser, the non-finite guard, checkpoints,
preemption and metrics; a task owns everything about its examples and its model: the inputs it reads, the
model it builds, what trains, how a host batch becomes global arrays (and along which axes), the step and
its metrics. A new task is one module and a line in :data:`mmret.tasks.TASKS`; the trainer never changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx

if TYPE_CHECKING:
    from mmret.recipe import TrainerConfig


@dataclasses.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree, so it can be sharded, donated and checkpointed."""

    step: jax.Array
    params: nnx.State  # trainable
    rest: nnx.State  # frozen parameters and other variables
    opt_state: optax.OptState


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "params", "rest", "opt_state"], meta_fields=[])

#: ``step(state, batch) -> (state, metrics)``; metrics hold at least ``loss`` and ``grad_norm``.
StepFn = Callable[[TrainState, dict[str, Any]], tuple[TrainState, dict[str, jax.Array]]]


def split_model(model: nnx.Module, trainable: Any = nnx.Param) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable state, everything else)."""
    return nnx.split(model, trainable, ...)


def init_state(params: nnx.State, rest: nnx.State, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params))


def apply_gradients(
    state: TrainState, grads: nnx.State, tx: optax.GradientTransformation, loss: jax.Array, metrics: dict[str, Any]
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The optimiser update every task's step ends with; adds ``loss`` and ``grad_norm`` to ``metrics``."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
    return TrainState(state.step + 1, params, state.rest, opt_state), metrics


class TaskData(Protocol):
    """A task's training stream on this process: host batches (dicts of numpy arrays), checkpointable."""

    examples: int  # examples in one pass over the training data (what ``epochs`` counts)

    def __next__(self) -> dict[str, Any]: ...

    def get_state(self) -> Any:
        """A JSON-able state from which :meth:`set_state` continues exactly."""
        ...

    def set_state(self, state: Any) -> None: ...

    def report(self, finished: bool) -> list[str]:
        """Closing lines for the run's log (e.g. skipped records); ``finished``: the run ended normally."""
        ...

    def skipped(self) -> int:
        """Examples skipped so far (0 where the task skips none)."""
        ...


class Task(Protocol):
    """A kind of training (see the module docstring)."""

    name: str

    def check(self, cfg: TrainerConfig) -> None:
        """``ValueError`` (naming the config key) for a config this task cannot run; nothing is read."""
        ...

    def open_inputs(self, cfg: TrainerConfig) -> Any:
        """Read and check everything the run reads (records, tokenizer) before anything is written."""
        ...

    def global_batch_size(self, cfg: TrainerConfig) -> int:
        """Examples per step over all processes."""
        ...

    def data(self, cfg: TrainerConfig, inputs: Any) -> TaskData: ...

    def model(self, cfg: TrainerConfig, inputs: Any) -> nnx.Module:
        """The model the run starts from, in host memory (the trainer places it on the mesh)."""
        ...

    def trainable(self, cfg: TrainerConfig) -> Any:
        """An ``nnx`` filter of what trains."""
        ...

    def step(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: TrainerConfig) -> StepFn: ...

    def global_arrays(self, host_batch: dict[str, Any], mesh: jax.sharding.Mesh, rules: Any) -> dict[str, Any]:
        """This process's host batch as global arrays on ``mesh`` (host-only parts dropped)."""
        ...

    def tokens(self, host_batch: dict[str, Any]) -> int:
        """Real (unpadded) tokens in this process's batch (for tokens/s)."""
        ...
