"""The one entry point for jobs.

    python -m mmret.launch --config=configs/umarvel.py[:preset] --workdir=DIR [--config.a.b=value ...]
        [--mode=train|embed|eval] [--step=N]

``--config`` takes a Python config file exposing ``get_config(arg)`` (a bare name such as
``umarvel.py`` resolves to ``configs/umarvel.py``); ``--config.a.b=value`` overrides one field, and
unknown keys or values of the wrong type are rejected before anything starts. When the environment
says the job spans several hosts (a coordinator address, or SLURM / TPU pod variables), JAX's
distributed runtime is initialised first.

Modes: ``train`` (default) trains, evaluating the model before (``eval.at_start``) and after
(``eval.at_end``) training and printing the before/after table; ``embed`` writes the embeddings of
checkpoint ``--step`` (default: the latest; 0: before training) under ``DIR/eval/<step>/embeddings``;
``eval`` embeds, searches and reports it under ``DIR/eval/<step>/<pool>/`` (see :mod:`mmret.eval`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
_COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def resolve_config_arg(argv: list[str]) -> list[str]:
    """Map ``--config=NAME.py[:arg]`` to ``configs/NAME.py`` when NAME.py is not a path that exists."""
    out = []
    for a in argv:
        if a.startswith("--config=") and "/" not in a.split("=", 1)[1].split(":", 1)[0]:
            name, _, rest = a.split("=", 1)[1].partition(":")
            if not Path(name).exists() and (CONFIGS / name).exists():
                a = f"--config={CONFIGS / name}" + (f":{rest}" if rest else "")
        out.append(a)
    return out


def multihost() -> bool:
    """Whether the environment describes a job over several hosts."""
    if any(os.environ.get(k) for k in _COORDINATOR_ENV):
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


_started = False  # set once flags are parsed: later errors are the job's own, not the command line's


def main(argv: list[str]) -> None:
    global _started
    _started = True
    import jax

    if multihost():
        jax.distributed.initialize()
    from absl import flags, logging

    from mmret.train.trainer import as_trainer_config, train

    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; keep the progress readable
        logging.set_verbosity(logging.WARNING)

    cfg = flags.FLAGS.config
    workdir = flags.FLAGS.workdir
    mode = flags.FLAGS.mode
    step = None if flags.FLAGS.step < 0 else flags.FLAGS.step
    try:
        trainer_cfg = as_trainer_config(cfg)
    except (ValueError, TypeError) as e:
        sys.exit(f"mmret.launch: bad config: {e}")
    from mmret.eval import run as eval_run

    if mode == "embed":
        from mmret.eval.embed import embed, resolve_step

        step = resolve_step(workdir, step)
        embed(trainer_cfg, eval_run.eval_dir(workdir, step) / "embeddings", workdir=workdir, step=step)
        return
    if mode == "eval":
        eval_run.evaluate_run(trainer_cfg, workdir, step)
        return
    ecfg = trainer_cfg.eval
    if ecfg.at_start:
        eval_run.evaluate_run(trainer_cfg, workdir, 0)
    summary = train(trainer_cfg, workdir)
    after = summary["final_step"]
    evaluated = ecfg.at_end and not summary["preempted"]
    if evaluated:
        eval_run.evaluate_run(trainer_cfg, workdir, after)
    if jax.process_index() == 0:
        print("\n".join(summary_table(Path(workdir) / "metrics.jsonl")))
        if evaluated and ecfg.at_start:
            print(eval_run.before_after(workdir, 0, after, ecfg.pools))


def summary_table(metrics_file: Path, rows: int = 6) -> list[str]:
    """A short table of the run's logged metrics: the first and the last log points."""
    if not metrics_file.is_file():
        return []
    import json

    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if len(records) > rows:
        records = records[: rows // 2] + records[-(rows - rows // 2) :]
    cols = ("step", "loss", "accuracy", "temperature", "learning_rate", "examples_per_s")
    lines = ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for rec in records:
        cells = [f"{rec[c]:.4g}" if isinstance(rec.get(c), float) else str(rec.get(c, "")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def run() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Python config file (get_config(arg)); path[:preset].")
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
    flags.DEFINE_enum("mode", "train", ["train", "embed", "eval"], "Train (and evaluate per eval.at_*), or embed/eval.")
    flags.DEFINE_integer("step", -1, "Checkpoint to embed/evaluate: -1 the latest, 0 the model before training.")
    flags.mark_flags_as_required(["config", "workdir"])
    sys.argv = resolve_config_arg(sys.argv)
    try:
        app.run(main)
    except (AttributeError, KeyError) as e:  # ml_collections rejects an override of an unknown key
        if _started:
            raise
        detail = str(e.args[0] if e.args else e)
        detail = " ".join(detail.replace("\\n", " ").replace("\\", "").replace("'", "").split())
        sys.exit(f"mmret.launch: unknown config key: {detail}")


if __name__ == "__main__":
    run()
