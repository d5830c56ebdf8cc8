"""The task interface: a task defined here, outside mmret/, trains with the unchanged trainer (checkpoints,
resume bitwise equal to an uninterrupted run, metrics), and the task registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mmret import sharding, tasks
from mmret.checkpoints import steps
from mmret.recipe import TrainerConfig, as_trainer_config
from mmret.tasks.base import TrainState, apply_gradients
from mmret.train.trainer import train

BATCH, DIM = 8, 4
TRUE_W = np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)


class Stream:
    """Batches of a noiseless linear problem, the i-th drawn from seed (0, i): its state is i."""

    examples = 64

    def __init__(self) -> None:
        self.index = 0

    def __next__(self) -> dict[str, Any]:
        rng = np.random.default_rng((0, self.index))
        self.index += 1
        x = rng.normal(size=(BATCH, DIM)).astype(np.float32)
        return {"x": x, "y": x @ TRUE_W}

    def get_state(self) -> dict[str, int]:
        return {"index": self.index}

    def set_state(self, state: dict[str, int]) -> None:
        self.index = state["index"]

    def report(self, finished: bool) -> list[str]:
        return [f"least squares: {self.index} batches read"] if finished else []

    def skipped(self) -> int:
        return 0


class LeastSquares:
    """A task the trainer has never heard of: a linear layer fit by mean squared error."""

    name = "least_squares"

    def check(self, cfg: TrainerConfig) -> None:
        pass

    def open_inputs(self, cfg: TrainerConfig) -> None:
        return None

    def global_batch_size(self, cfg: TrainerConfig) -> int:
        return BATCH

    def data(self, cfg: TrainerConfig, inputs: Any) -> Stream:
        return Stream()

    def model(self, cfg: TrainerConfig, inputs: Any) -> nnx.Module:
        return nnx.Linear(DIM, 1, rngs=nnx.Rngs(0))

    def trainable(self, cfg: TrainerConfig) -> Any:
        return nnx.Param

    def step(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: TrainerConfig):
        def step(state: TrainState, batch: dict[str, Any]):
            def loss_fn(params):
                model = nnx.merge(graphdef, params, state.rest)
                return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)

            loss, grads = jax.value_and_grad(loss_fn)(state.params)
            return apply_gradients(state, grads, tx, loss, {"mse": loss})

        return step

    def global_arrays(self, host_batch: dict[str, Any], mesh: jax.sharding.Mesh, rules: Any) -> dict[str, Any]:
        return sharding.put_batch(host_batch, mesh, rules, {"x": 0, "y": 0})

    def tokens(self, host_batch: dict[str, Any]) -> int:
        return 0


def config(total_steps: int) -> TrainerConfig:
    return as_trainer_config(
        {
            "task": "least_squares",
            "optimizer": {"learning_rate": 0.3, "total_steps": 12, "warmup_steps": 0, "clip_grad_norm": None},
            "total_steps": total_steps,
            "log_every": 2,
            "checkpoint": {"every": 4, "keep": 5, "async_save": False},
        }
    )


def params_at(workdir: Path, step: int) -> list[np.ndarray]:
    import orbax.checkpoint as ocp

    restored = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, train(config(12), workdir, task=LeastSquares())


def test_an_outside_task_trains_checkpoints_and_logs(straight, capsys):
    workdir, summary = straight
    assert summary["final_step"] == 12 and not summary["preempted"]
    assert steps(workdir) == [4, 8, 12]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    assert records[-1]["mse"] < 0.5 * records[0]["mse"]  # it learns
    assert records[0]["averaged_steps"] == 2 and "learning_rate" in records[0]


def test_an_outside_task_resumes_bitwise(straight, tmp_path, capsys):
    workdir, _ = straight
    first = train(config(6), tmp_path, task=LeastSquares())  # stops at 6, with checkpoints at 4 and 6
    assert first["final_step"] == 6 and steps(tmp_path) == [4, 6]
    second = train(config(12), tmp_path, task=LeastSquares())  # resumes from 6: data state and all
    assert "resuming from step 6" in capsys.readouterr().out
    assert second["final_step"] == 12
    for a, b in zip(params_at(tmp_path, 12), params_at(workdir, 12), strict=True):
        np.testing.assert_array_equal(a, b)
    assert second["mse"] == straight[1]["mse"]


def test_a_registered_task_is_found_by_name(tmp_path, capsys):
    tasks.TASKS["least_squares"] = LeastSquares
    try:
        summary = train(config(4), tmp_path)  # no task object: the config's name
    finally:
        del tasks.TASKS["least_squares"]
    assert summary["final_step"] == 4
    assert "least squares: 4 batches read" in capsys.readouterr().out
    known = r"\('bi_encoder', 'reranker', 'distill'\)"
    with pytest.raises(ValueError, match=rf"task must be one of {known}, got 'least_squares'"):
        tasks.get("least_squares")


def test_the_bi_encoder_mixes_its_sources_by_weight(tmp_path):
    """``data.mix``: data's own source and one more, 1:3, each read in its own order; the epoch of a mix ends
    when its first source runs out."""
    from mmret.data.synthetic import write_synthetic_mbeir
    from mmret.models.qwen2_vl.processor_files import write_processor_files
    from mmret.tasks.bi_encoder.task import BiEncoder

    write_synthetic_mbeir(tmp_path / "mbeir", scale="tiny", seed=0)
    write_processor_files(tmp_path / "proc")
    a, b = "mscoco_task0", "fashioniq_task7"
    cfg = as_trainer_config(
        {
            "model": {"preset": "tiny"},
            "data": {
                "root": str(tmp_path / "mbeir"),
                "processor_dir": str(tmp_path / "proc"),
                "tasks": [a],
                "mix": [{"root": str(tmp_path / "mbeir"), "tasks": [b], "weight": 3}],
                "pipeline": {"batch_size": 4, "max_query_patches": 4 * 1200, "max_candidate_patches": 4 * 1200},
            },
        }
    )
    task = BiEncoder()
    inputs = task.open_inputs(cfg)
    assert [w for _, w in inputs.sources] == [1.0, 3.0]
    sizes = [len(store.queries) for store, _ in inputs.sources]
    data = task.data(cfg, inputs)
    qids = [q for _ in range(6) for q in next(data)["meta"]["qids"]]
    from_a = {q.qid for q in inputs.sources[0][0].queries}
    from_b = {q.qid for q in inputs.sources[1][0].queries}
    assert from_a.isdisjoint(from_b) and set(qids) <= from_a | from_b
    n_a = sum(q in from_a for q in qids)
    assert abs(n_a - len(qids) / 4) <= 1  # 1:3, within one example of the proportion
    # One epoch: the mix ends when its first source runs out (a gives 1/4 of the stream, b 3/4).
    assert abs(data.examples - min(sizes[0] * 4, sizes[1] * 4 / 3)) <= 4, (data.examples, sizes)
