"""The ahead-of-time fit check (mmret.train.aot, tools/aot_compile.py): it compiles the program the trainer runs
(the same memory figures as the trainer's own step compiled on a real batch of the pipeline), on the batch
shapes the pipeline collates, with the rules' shardings (the per-device bytes XLA assigns equal the shard
shapes'), over several hosts and for a TPU topology (libtpu installed)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import helpers
import jax
import numpy as np
import pytest
from flax import nnx

from mmret import build, sharding
from mmret.optim import lr_schedule, make_optimizer
from mmret.recipe import as_trainer_config
from mmret.tasks.bi_encoder.task import BiEncoder
from mmret.train import aot
from mmret.train.trainer import guarded_step, jit_step, state_layout

TASKS = ["mscoco_task0", "cirr_task7"]


def config(root, proc, **pipeline) -> dict:
    """The tiny model on the tiny corpus, 16 queries a host in two GradCache chunks, fsdp over the 8 devices,
    LoRA on the language model with the vision tower frozen (trainable, frozen and optimizer state all there)."""
    return {
        "model": {"preset": "tiny", "seed": 0, "scan_layers": True, "remat": "full"},
        "lora": {"rank": 4, "alpha": 8.0, "lora_only": True},
        "data": {
            "root": str(root),
            "processor_dir": str(proc),
            "tasks": TASKS,
            "processor": {"max_pixels": 64 * 28 * 28, "max_text_tokens": 64},
            "pipeline": {
                "batch_size": 16,
                "max_query_length": 96,
                "max_candidate_length": 96,
                "max_query_patches": 16 * 64,
                "max_candidate_patches": 16 * 64,
                **pipeline,
            },
        },
        "grad_cache_chunk": 8,
        "mesh": {"data": 1, "fsdp": 8, "tensor": 1},
    }


@pytest.fixture(scope="module")
def padded(tiny_mbeir, processor_dir):
    cfg = as_trainer_config(config(tiny_mbeir, processor_dir))
    return cfg, aot.fit_check(cfg, jax.devices())


def test_the_fit_check_compiles_the_trainers_step_on_the_pipelines_batch(padded):
    """The trainer's sections written out here on real inputs (a host batch of the pipeline on the tiny corpus,
    the model built, placed and split as the trainer does): its compiled step's memory figures and its batch
    shapes are the fit check's, which read no record and allocate no weight."""
    cfg, report = padded
    task = BiEncoder()
    inputs = task.open_inputs(cfg)
    host = next(task.data(cfg, inputs))
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.make_rules(overrides=cfg.rules)
    model = task.model(cfg, inputs)
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
        sharding.place_model(model, mesh, rules)
    wrt = task.trainable(cfg)
    graphdef, params, rest = nnx.split(model, wrt, ...)
    tx = make_optimizer(cfg.optimizer)
    state_sh, abstract_state = state_layout(params, rest, tx, mesh)
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
        batch = task.global_arrays(host, mesh, rules)
        step = guarded_step(task.step(graphdef, tx, cfg), graphdef, wrt, lr_schedule(cfg.optimizer), cfg)
        m = jit_step(step, state_sh, jax.tree.map(lambda x: x.sharding, batch)).lower(abstract_state, batch)
        m = m.compile().memory_analysis()

    shapes = {jax.tree_util.keystr(p): list(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(batch)}
    assert report.batch_shapes == shapes
    assert report.global_batch == 16 and report.processes == 1 and report.devices == 8
    got = (report.argument_bytes, report.output_bytes, report.alias_bytes, report.temp_bytes)
    assert got == (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes)
    assert report.peak_bytes == report.argument_bytes + report.output_bytes - report.alias_bytes + report.temp_bytes
    assert report.temp_bytes > 0 and report.fits is None and report.compile_error is None  # no HBM size on CPU


def test_per_device_bytes_are_the_shards_xla_assigns(padded, tiny_mbeir, processor_dir):
    """The state and batch bytes from the shard shapes add up to the compiled step's argument bytes (XLA's own
    count); with fsdp over 8 devices each holds about an eighth of the weights (counted here from the model)."""
    cfg, report = padded
    step_counter = 4  # the int32 step
    ours = report.params_bytes + report.frozen_bytes + report.opt_state_bytes + report.batch_bytes + step_counter
    assert 0 <= ours - report.argument_bytes <= 1e-3 * ours  # jit drops arguments the step never reads
    model = nnx.eval_shape(lambda: build.build_retriever(cfg, 64))
    total = sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in jax.tree.leaves(nnx.state(model)))
    assert report.trainable_params + report.frozen_params == sum(
        math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model))
    )
    per_device = report.params_bytes + report.frozen_bytes
    assert total / 8 <= per_device < total / 8 * 1.25, (per_device, total)  # small leaves stay replicated
    assert report.opt_state_bytes >= 2 * report.params_bytes * 0.9  # AdamW's two moments of what trains
    replicated = aot.fit_check(
        as_trainer_config({**config(tiny_mbeir, processor_dir), "mesh": {"data": 8, "fsdp": 1, "tensor": 1}}),
        jax.devices(),
    )
    assert replicated.params_bytes + replicated.frozen_bytes == total  # data parallel: every device all of it


def test_the_command_line_over_two_hosts_of_packed_batches(tiny_mbeir, processor_dir, tmp_path):
    """tools/aot_compile.py on a packed config for 2 hosts: each side at its largest bucket (rows and patch rows),
    the batch dims of both hosts; an HBM size below the peak: status 3; above it: 0."""
    packed = config(
        tiny_mbeir,
        processor_dir,
        query_packing={"rows": (8, 16), "patches": (256, 512), "row_length": 128},
        candidate_packing={"rows": (8, 24), "patches": (256, 512), "row_length": 128},
    )
    config_file = tmp_path / "packed.py"
    config_file.write_text(
        f"import json\nimport ml_collections\n\n\ndef get_config(arg=None):\n"
        f"    return ml_collections.ConfigDict(json.loads({json.dumps(packed)!r}))\n"
    )
    env = {**os.environ, "XLA_FLAGS": helpers.xla_flags(8), "JAX_PLATFORMS": "cpu"}

    def tool(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(helpers.REPO / "tools" / "aot_compile.py"), f"--config={config_file}", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=helpers.REPO)

    out = tmp_path / "fit.json"
    small = tool("--processes=2", "--hbm_gib=0.001", f"--json={out}")
    assert small.returncode == 3, small.stderr[-2000:]
    r = json.loads(out.read_text())
    assert "fits NO" in small.stdout and r["fits"] is False and r["processes"] == 2 and r["global_batch"] == 32
    s = r["batch_shapes"]
    chunks = 2
    assert s["['query']['input_ids']"] == [chunks, 2 * 16, 128]  # 2 hosts x the largest bucket's 16 rows
    assert s["['query']['position_ids']"] == [chunks, 3, 2 * 16, 128]  # [chunk, M-RoPE axis, rows, tokens]
    assert s["['query']['pixel_values']"] == [chunks, 2 * 512, 3 * 2 * 14 * 14]
    assert s["['candidates']['input_ids']"] == [chunks, 2 * 24, 128]
    assert s["['candidates']['segment_ids']"] == [chunks, 2 * 24, 128]
    assert s["['positive_mask']"] == [chunks, 2 * 8, chunks, 2 * 8]  # [chunk, queries, chunk, candidates]
    roomy = tool("--processes=2", f"--hbm_gib={r['peak_bytes'] * 2 / 2**30}")
    assert roomy.returncode == 0 and "fits yes" in roomy.stdout, roomy.stderr[-2000:]


def test_bad_inputs_are_named(tiny_mbeir, processor_dir):
    cfg = as_trainer_config({**config(tiny_mbeir, processor_dir), "model": {"hf_dir": str(processor_dir)}})
    with pytest.raises(ValueError, match="model.preset"):
        aot.fit_check(cfg, jax.devices())
    with pytest.raises(ValueError, match="task='reranker'"):
        aot.fit_check(as_trainer_config({**config(tiny_mbeir, processor_dir), "task": "reranker"}), jax.devices())
    with pytest.raises(ValueError, match="topology"):
        aot.target_devices("v5p")
    command = [sys.executable, str(helpers.REPO / "tools" / "aot_compile.py"), "--config=configs/umarvel.py:demo"]
    r = subprocess.run([*command, "--stage=nope"], capture_output=True, text=True, timeout=120, cwd=helpers.REPO)
    assert r.returncode == 1 and "nope" in r.stderr and "mbeir" in r.stderr and "Traceback" not in r.stderr


def test_the_compilers_out_of_memory_message_is_read():
    """The TPU compiler's refusal (its wording) gives the temporaries' size."""
    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (409.39G) "
        "exceeds available HBM (95.74G)."
    )
    assert aot._message_bytes(message, "temporaries") == int(409.39 * 2**30)
    assert aot._message_bytes("no sizes here", "temporaries") == 0


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install 'jax[tpu]')")
def test_a_tpu_topology_without_a_tpu(tiny_mbeir, processor_dir):
    """v5p:2x2x1 (4 chips, one host) through jax's topology API: the TPU compiler's figures, v5p's 95 GiB."""
    cfg = as_trainer_config({**config(tiny_mbeir, processor_dir), "mesh": {"data": 1, "fsdp": 4, "tensor": 1}})
    devices = aot.target_devices("v5p:2x2x1")
    report = aot.fit_check(cfg, devices, target="v5p:2x2x1")
    assert report.devices == 4 and report.processes == 1 and report.device_kind.startswith("TPU v5")
    assert report.hbm_bytes == 95 * 2**30 and report.fits is True and report.temp_bytes > 0
