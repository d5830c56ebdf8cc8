"""One process of the multi-host test (run by tests/test_multihost.py, not collected by pytest).

    python tests/_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES PROCESSOR_DIR WORKDIR

Trains 3 SGD steps of the tiny retriever on a fixed global batch of 4 queries + 4 candidates, built
as hosts build it: each host collates its own block of 2 and the blocks are concatenated. With one
process the same blocks are collated locally (padded) and concatenated; the results must agree. The two
processes pack their blocks (mmret.data.packing) into rows of 128 tokens and take different row counts (host 0
one row, host 1 one example a row: its bucket has no room for its images), so the global batch is the hosts' agreement
(``packing.globalize``: the larger count, slots offset per host).
"""

from __future__ import annotations

import dataclasses
import os
import sys

pid, nproc, port, local_devices = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
processor_dir, workdir = sys.argv[5], sys.argv[6]
from helpers import random_pairs, start_worker  # noqa: E402  (tests/ is this script's directory)

start_worker(pid, nproc, port, local_devices)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from mmret import sharding  # noqa: E402
from mmret.data import packing  # noqa: E402
from mmret.data.packing import PackingConfig  # noqa: E402
from mmret.data.processor import Processor, ProcessorConfig  # noqa: E402
from mmret.losses import Temperature  # noqa: E402
from mmret.models import qwen2_vl  # noqa: E402
from mmret.models.encoder import Encoder, EncoderConfig  # noqa: E402
from mmret.models.qwen2_vl.presets import hf_config  # noqa: E402
from mmret.models.retriever import Retriever  # noqa: E402
from mmret.tasks.base import init_state, split_model  # noqa: E402
from mmret.tasks.bi_encoder.step import make_train_step  # noqa: E402

BLOCK, LENGTH, PATCHES = 2, 64, 2 * 64


def block(proc: Processor, exs: list) -> dict:
    if nproc == 1:
        return proc.collate(exs, max_length=LENGTH, max_patches=PATCHES, max_images=2 * len(exs))
    # host 1's bucket has no room for its images: it falls back to one example a row
    cfg = PackingConfig(rows=(1,), patches=() if pid == 0 else (4,), row_length=2 * LENGTH)
    side = packing.pack(
        exs, cfg, row_length=LENGTH, max_patches=PATCHES, max_images=2 * len(exs), pad_token_id=proc.pad_token_id
    )
    assert packing.num_rows(side) == (1 if pid == 0 else 2), packing.num_rows(side)
    return packing.globalize(side)


def main() -> None:
    proc = Processor(processor_dir, ProcessorConfig(max_pixels=16 * 28 * 28, template="plain"))
    queries, cands = random_pairs(proc, 2 * BLOCK)
    mine = range(2 * BLOCK) if nproc == 1 else range(pid * BLOCK, (pid + 1) * BLOCK)
    blocks = [range(b * BLOCK, (b + 1) * BLOCK) for b in range(2)] if nproc == 1 else [mine]
    parts = [
        {
            "query": block(proc, [queries[i] for i in r]),
            "candidates": block(proc, [cands[i] for i in r]),
            "positive_mask": np.eye(2 * BLOCK, dtype=bool)[list(r)],
        }
        for r in blocks
    ]

    def concat(path, *xs):  # hosts' blocks concatenate along each array's batch dim
        return np.concatenate(xs, axis=sharding.BATCH_AXES.get(getattr(path[-1], "key", None), 0))

    local = jax.tree_util.tree_map_with_path(concat, *parts)

    mesh = sharding.make_mesh({"data": -1})
    cfg = qwen2_vl.Qwen2VLConfig.from_hf_dict(hf_config("tiny"))
    model = Retriever(Encoder(qwen2_vl.create(cfg, seed=1), EncoderConfig()), Temperature(0.05))
    sharding.place_model(model, mesh)
    tx = optax.sgd(0.5)
    graphdef, params, rest = split_model(model)
    state = init_state(params, rest, tx)
    # As the trainer jits its step: the state keeps its shardings (the counter replicated), so the first
    # step's output is a valid input and the step compiles once, not again at the second call.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = dataclasses.replace(state, step=jax.device_put(state.step, replicated))
    step = jax.jit(make_train_step(graphdef, tx), out_shardings=(jax.tree.map(lambda x: x.sharding, state), None))
    batch = sharding.put_batch(local, mesh)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    final = multihost_utils.process_allgather(state.params, tiled=True)
    if pid == 0:
        leaves = {str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(final))}
        np.savez(os.path.join(workdir, f"result_{nproc}.npz"), losses=np.array(losses), **leaves)
    print(f"process {pid}/{nproc}: devices {jax.device_count()} losses {losses}", flush=True)


if __name__ == "__main__":
    main()
