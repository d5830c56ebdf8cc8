#!/usr/bin/env python
"""Will a config's train step fit the accelerators? Lower and compile it ahead of time for a target mesh,
from this machine, without the hardware (``mmret.train.aot``), and print the bytes each device needs.

    python tools/aot_compile.py --config=configs/umarvel.py:mbeir --preset=qwen2vl-7b --target=v5p:2x4x4
    python tools/aot_compile.py --config=configs/umarvel.py --stage=hardneg --preset=qwen2vl-7b \\
        --target=v5p:2x4x4 --config.mesh.fsdp=32
    python tools/aot_compile.py --config=configs/umarvel.py:demo --stage=mbeir --preset=tiny --target=cpu \\
        --cpu_devices=8 --processes=2 --hbm_gib=1

``--config`` and ``--config.a.b=value`` as ``python -m mmret.launch`` takes them (``--stage``: a chain's stage;
default its last bi-encoder stage). ``--preset`` builds the model from a preset (no weights are read; the run's
``model.hf_dir`` is the same architecture). ``--target``: a TPU topology as jax's topology API names it
(``v5p:2x4x4`` is a v5p-64 slice: 32 chips, 8 hosts; needs libtpu: ``pip install 'jax[tpu]'``, no TPU), or
``cpu`` (this machine's CPU devices, ``--cpu_devices`` of them: the CPU compiler's figures, a proxy).
``--processes``: hosts, each collating the config's per-host batch (default: the topology's hosts; 1 on cpu).
``--hbm_gib``: memory per device (default: the device kind's). ``--json``: write the figures there too.
Exit status 0 when it fits (or no HBM size is known), 3 when it does not, 1 on a bad input (one line on stderr;
``--verbose``: with its traceback).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not


def _early_environment(argv: list[str]) -> None:
    """Before jax is imported: the CPU device count, and the CPU platform for the host (a TPU target is
    compiled for through the topology API, not run)."""
    for a in argv:
        if a.startswith("--cpu_devices="):
            n = int(a.split("=", 1)[1])
            flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(_argv: list[str]) -> int:
    import dataclasses

    from absl import flags

    from mmret.launch import one_line_errors
    from mmret.recipe import as_trainer_config
    from mmret.train import aot

    f = flags.FLAGS
    with one_line_errors(ValueError, TypeError, RuntimeError, OSError, prefix="aot_compile: "):
        cfg = as_trainer_config(f.config)
        if cfg.stages:
            from mmret import chain

            chain.check_stages(cfg)
            names = [s.name for s in cfg.stages]
            name = f.stage or [n for n in names if chain.stage_config(cfg, n, "/nonexistent").task == "bi_encoder"][-1]
            chain.stage(cfg, name)  # names the stages when there is no such one
            cfg = chain.stage_config(cfg, name, "/nonexistent")  # the paths are never read
        elif f.stage:
            raise ValueError(f"--stage={f.stage}: the config has no stages")
        if f.preset:
            model = dataclasses.replace(cfg.model, preset=f.preset, hf_dir=None, checkpoint=None, init_from=None)
            cfg = dataclasses.replace(cfg, model=model)
        devices = aot.target_devices(f.target)
        hbm = None if f.hbm_gib is None else int(f.hbm_gib * 2**30)
        report = aot.fit_check(cfg, devices, processes=f.processes, hbm_bytes=hbm, target=f.target)
    print("\n".join(report.lines()), flush=True)
    if f.json:
        Path(f.json).parent.mkdir(parents=True, exist_ok=True)
        Path(f.json).write_text(json.dumps(dataclasses.asdict(report), indent=1) + "\n")
    return 3 if report.fits is False else 0


def run() -> None:
    _early_environment(sys.argv[1:])
    from absl import app, flags
    from ml_collections import config_flags

    from mmret.launch import resolve_config_arg

    config_flags.DEFINE_config_file("config", None, "Python config file (get_config(arg)); path[:preset].")
    flags.DEFINE_string("stage", None, "A chained config's stage (default: its last bi-encoder stage).")
    flags.DEFINE_string("preset", None, "Build the model from this preset (e.g. qwen2vl-7b); no weights read.")
    flags.DEFINE_string("target", "cpu", "A TPU topology (v5p:2x4x4; needs libtpu) or cpu.")
    flags.DEFINE_integer("cpu_devices", None, "--target=cpu: simulated CPU devices (XLA_FLAGS).")
    flags.DEFINE_integer("processes", None, "Hosts of the run (default: the target's; 1 on cpu).")
    flags.DEFINE_float("hbm_gib", None, "Memory per device in GiB (default: the device kind's).")
    flags.DEFINE_string("json", None, "Also write the figures as JSON here.")
    flags.DEFINE_bool("verbose", False, "Show the traceback of input errors (else one line on stderr).")
    flags.mark_flags_as_required(["config"])
    sys.argv = resolve_config_arg(sys.argv)
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
