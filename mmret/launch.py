"""The one entry point for jobs.

    python -m mmret.launch --config=configs/umarvel.py[:preset] --workdir=DIR [--config.a.b=value ...]
        [--mode=train|embed|eval|mine|rerank|export] [--step=N] [--stage=NAME] [--out=DIR]

``--config`` takes a Python config file exposing ``get_config(arg)`` (a bare name such as
``umarvel.py`` resolves to ``configs/umarvel.py``); ``--config.a.b=value`` overrides one field, and
unknown keys or values of the wrong type are rejected before anything starts. When the environment
says the job spans several hosts (a coordinator address, or SLURM / TPU pod variables), JAX's
distributed runtime is initialised first.

Modes: ``train`` (default) trains, evaluating the model before (``eval.at_start``) and after
(``eval.at_end``) training and printing the before/after table; ``embed`` writes the embeddings of
checkpoint ``--step`` (default: the latest; 0: before training) under ``DIR/eval/<step>/embeddings``;
``eval`` embeds, searches and reports it under ``DIR/eval/<step>/<pool>/`` (see :mod:`mmret.eval`);
``mine`` mines hard negatives with it (``mining.*``) into ``DIR/mined/<step>/`` (see :mod:`mmret.mining`);
``rerank`` (a reranker config) reranks the retrieval run ``rerank.retrieval`` with it into
``DIR/rerank/<step>/`` (0: the untrained model source, zero-shot; see :mod:`mmret.eval.rerank`);
``export`` writes it as a plain Hugging Face directory (``--out``, default ``DIR/export/<step>/``; LoRA
merged, tokenizer and processor files, ``mmret_embedding.json`` or ``mmret_reranker.json``, a model card;
see :mod:`mmret.export`).

A config with ``stages`` is a chain (:mod:`mmret.chain`): ``train`` runs its stages in order, each in
``DIR/<stage>/`` (mining where a stage says ``mine_from``), skipping finished ones, and closes with a
table of every stage's evaluation; ``--stage=NAME`` trains only that stage, or names the stage whose run
``embed`` / ``eval`` / ``mine`` / ``export`` read (default: the last).

Errors in what the job was given are checked before anything is written to ``DIR`` (config values,
the paths the config names, the model directory's weights, every record of the training data) and
reported as one line on stderr, naming the config key, file or ``file:line``; the exit status is 1.
``--verbose`` (or absl's ``--verbosity=1``) shows their traceback too. Errors of any other kind keep
theirs. The metrics table that closes a run lists its first and last log points; each log point
says how many steps it averages (``averaged_steps``: fewer than ``log_every`` after a resume, a
preemption or skipped steps).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmret.atomic_dir import PathLike, as_path

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
    if int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1:
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def distributed_options() -> dict[str, int]:
    """``jax.distributed.initialize``'s process count and id from ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` where
    the environment sets them (a Kubernetes JobSet: ``launch/k8s_jobset.yaml``); else none, and JAX detects them
    (SLURM's variables, a TPU pod's metadata)."""
    names = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
    out = {}
    for key, var in names.items():
        if os.environ.get(var):
            try:
                out[key] = int(os.environ[var])
            except ValueError:
                raise ValueError(f"{var}={os.environ[var]!r} is not an integer") from None
    return out


_started = False  # set once flags are parsed: later errors are the job's own, not the command line's


def main(argv: list[str]) -> None:
    global _started
    _started = True
    import jax

    if multihost():
        jax.distributed.initialize(**distributed_options())
    from absl import flags, logging

    from mmret import tasks
    from mmret.recipe import as_trainer_config
    from mmret.train.trainer import train

    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; keep the progress readable
        logging.set_verbosity(logging.WARNING)

    cfg = flags.FLAGS.config
    workdir = flags.FLAGS.workdir
    mode = flags.FLAGS.mode
    step = None if flags.FLAGS.step < 0 else flags.FLAGS.step
    only = flags.FLAGS.stage
    with one_line_errors(ValueError, TypeError, prefix="bad config: "):
        trainer_cfg = as_trainer_config(cfg)  # unknown keys, wrong types, values outside a Literal
        if trainer_cfg.stages:
            from mmret import chain

            chain.check_stages(trainer_cfg)
            names = [s.name for s in trainer_cfg.stages]
            if only is not None:
                chain.stage(trainer_cfg, only)  # names the stages when there is no such one
            configs = {n: chain.stage_config(trainer_cfg, n, workdir) for n in names}
        elif only is not None:
            raise ValueError(f"--stage={only}: the config has no stages")
        else:
            configs = {"": trainer_cfg}
        for c in configs.values():
            tasks.get(c.task).check(c)
    chained = bool(trainer_cfg.stages)
    with one_line_errors(ValueError, OSError):  # nothing is written before these pass
        for name, c in configs.items():
            mined = chained and chain.stage(trainer_cfg, name).mine_from is not None
            try:
                check_paths(c, negatives=not mined, train=mode == "train")  # a mined file: the chain writes it
            except (ValueError, OSError) as e:
                if not chained:
                    raise
                raise type(e)(f"stage {name}: {e}") from e
        inputs = None
        if mode == "train" and not chained:
            inputs = tasks.get(trainer_cfg.task).open_inputs(trainer_cfg)  # reads (and checks) every record
    from mmret.eval import run as eval_run

    with one_line_errors(*input_errors()):
        if chained and mode == "train":
            records = chain.run_chain(trainer_cfg, workdir, only=only)
            if jax.process_index() == 0:
                print("\n" + chain.chain_table(records, trainer_cfg.eval.pools))
            return
        if chained:  # embed / eval / mine one stage's run: --stage, default the last
            name = only or names[-1]
            trainer_cfg, workdir = configs[name], str(chain.stage_dir(workdir, name))
        if mode == "embed":
            from mmret.checkpoints import resolve_step
            from mmret.eval.embed import embed

            step = resolve_step(workdir, step)
            out = eval_run.eval_dir(workdir, step, trainer_cfg.eval.split) / "embeddings"
            embed(trainer_cfg, out, workdir=workdir, step=step)
            return
        if mode == "eval":
            eval_run.evaluate_run(trainer_cfg, workdir, step)
            return
        if mode == "mine":
            from mmret.checkpoints import resolve_step
            from mmret.mining.mine import mine

            step = resolve_step(workdir, step)
            mine(trainer_cfg, as_path(workdir) / "mined" / str(step), workdir=workdir, step=step)
            return
        if mode == "rerank":
            rerank(trainer_cfg, workdir, step)
            return
        if mode == "export":
            from mmret.checkpoints import resolve_step
            from mmret.export import export_run
            from mmret.progress import StepsBar

            step = resolve_step(workdir, step)
            bar = StepsBar("export", out=sys.stdout)
            out = export_run(workdir, flags.FLAGS.out or as_path(workdir) / "export" / str(step), step, progress=bar)
            bar.close()
            print(f"exported step {step} of {workdir} to {out}")
            return
        ecfg = trainer_cfg.eval
        if ecfg.at_start:
            eval_run.evaluate_run(trainer_cfg, workdir, 0)
        summary = train(trainer_cfg, workdir, task=tasks.get(trainer_cfg.task), inputs=inputs)
        after = summary["final_step"]
        evaluated = ecfg.at_end and not summary["preempted"]
        if evaluated:
            eval_run.evaluate_run(trainer_cfg, workdir, after)
    if jax.process_index() == 0:
        print("\n".join(summary_table(as_path(workdir) / "metrics.jsonl")))
        if evaluated and ecfg.at_start:
            print(eval_run.before_after(workdir, 0, after, ecfg.pools))


def rerank(cfg: Any, workdir: str, step: int | None) -> None:
    """``--mode=rerank``: the reranker run in ``workdir`` at ``step`` (0: its untrained model source, a
    zero-shot reranker) reranks ``rerank.retrieval`` into ``workdir/rerank/<step>/`` (:mod:`mmret.eval.rerank`)."""
    import jax

    from mmret.checkpoints import load_trained_reranker, resolve_step
    from mmret.eval.rerank import markdown, rerank_run

    if cfg.task != "reranker":
        raise ValueError(f"--mode=rerank needs a reranker config (task='reranker'), got task={cfg.task!r}")
    if not cfg.rerank.retrieval:
        raise ValueError("rerank.retrieval: give the retrieval run to rerank (a directory of <task>.trec files)")
    from mmret import build
    from mmret.data.processor import Processor

    step = 0 if step == 0 else resolve_step(workdir, step)
    # the vision tower attends within each image's block of patches (not across the batch's: the same scores)
    patches = Processor(build.processor_dir(cfg), cfg.data.processor).patcher.max_patches
    model = load_trained_reranker(cfg, workdir if step else None, step, max_image_patches=patches)
    label = (
        f"{workdir} step {step}"
        if step
        else f"{cfg.model.hf_dir or cfg.model.checkpoint or cfg.model.preset} (zero-shot)"
    )
    out = as_path(workdir) / "rerank" / str(step)
    report = rerank_run(
        cfg, out, model=model, checkpoint=label, retrieval=cfg.rerank.retrieval, select_on=cfg.rerank.select_on
    )
    if jax.process_index() == 0:
        print(markdown(report) + f"\nreranked runs and report in {out}", flush=True)


# ------------------------------------------------------------------------------------ input errors


def input_errors() -> tuple[type[BaseException], ...]:
    """What a job raises about its inputs (a record, the model's files, a path), not about itself."""
    from mmret.convert.hf import ConversionError
    from mmret.data.bad_records import BadRecordError

    return (BadRecordError, ConversionError, FileNotFoundError, NotADirectoryError, PermissionError)


def verbose() -> bool:
    """Whether errors keep their traceback: ``--verbose`` or absl's ``--verbosity`` of 1 or more."""
    from absl import flags

    f = flags.FLAGS
    return bool(f["verbose"].value) or (f["verbosity"].present and f["verbosity"].value >= 1)


def one_line(error: BaseException) -> str:
    """``error``'s message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(error).split()) or type(error).__name__


@contextlib.contextmanager
def one_line_errors(*kinds: type[BaseException], prefix: str = "") -> Iterator[None]:
    """An error of ``kinds`` (raised, or the cause of what was raised) exits the job with one line
    on stderr, ``mmret.launch: <prefix><message>``; with :func:`verbose`, it propagates as it is."""
    try:
        yield
    except Exception as e:
        found = next((c for c in _causes(e) if isinstance(c, kinds)), None)
        if found is None or verbose():
            raise
        sys.exit(f"mmret.launch: {prefix}{one_line(found)}")


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    node: BaseException | None = error
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        yield node
        node = node.__cause__ or node.__context__


def check_paths(cfg: Any, *, negatives: bool = True, train: bool = True) -> None:
    """The paths the config names exist (directories; ``data.negatives_file`` a file; with ``train``, a
    ``data.root`` is given), and a ``model.hf_dir`` holds safetensors weights; the error names the config key
    and the path."""
    from mmret.convert.hf import SafetensorsCheckpoint

    if train and not cfg.data.root:
        raise ValueError("data.root: no data root given")

    dirs = {
        "model.hf_dir": cfg.model.hf_dir,
        "model.checkpoint": cfg.model.checkpoint,
        "data.processor_dir": cfg.data.processor_dir,
        "data.root": cfg.data.root,
        "eval.root": cfg.eval.root,
        **{f"data.mix[{i}].root": source.root for i, source in enumerate(cfg.data.mix)},
    }
    for key, path in dirs.items():
        if path and not as_path(path).is_dir():  # local, or gs:// and other file systems
            if as_path(path).exists():
                raise NotADirectoryError(f"{key}: {path}: not a directory")
            raise FileNotFoundError(f"{key}: {path}: no such directory")
    files = {"data.negatives_file": cfg.data.negatives_file if negatives else None}
    files |= {f"data.mix[{i}].negatives_file": s.negatives_file for i, s in enumerate(cfg.data.mix)}
    for key, path in files.items():
        if path and not as_path(path).is_file():
            raise FileNotFoundError(f"{key}: {path}: no such file")
    if cfg.model.hf_dir:
        try:
            SafetensorsCheckpoint(cfg.model.hf_dir)  # reads the headers only
        except ValueError as e:
            raise ValueError(f"model.hf_dir: {e}") from e


def summary_table(metrics_file: PathLike, rows: int = 6) -> list[str]:
    """A short table of the run's logged metrics: the first and the last log points."""
    import json

    records = []
    metrics_file = as_path(metrics_file)
    for line in metrics_file.read_text().splitlines() if metrics_file.is_file() else ():
        with contextlib.suppress(ValueError):  # a torn last line
            records.append(json.loads(line))
    if not records:
        return ["", f"no metrics logged ({metrics_file})"]
    if len(records) > rows:
        records = records[: rows // 2] + records[-(rows - rows // 2) :]
    cols = ("step", "loss", "accuracy", "temperature", "learning_rate", "examples_per_s", "averaged_steps")
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
    flags.DEFINE_enum(
        "mode",
        "train",
        ["train", "embed", "eval", "mine", "rerank", "export"],
        "Train (and evaluate per eval.at_*), or embed/eval/mine/rerank/export.",
    )
    flags.DEFINE_string("out", None, "--mode=export: the Hugging Face directory to write (default DIR/export/<step>).")
    flags.DEFINE_string("stage", None, "A chained config's stage: run only it (train), or embed/eval/mine its run.")
    flags.DEFINE_integer("step", -1, "Checkpoint to embed/evaluate/mine: -1 the latest, 0 the model before training.")
    flags.DEFINE_bool("verbose", False, "Show the traceback of input errors (else one line on stderr).")
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
