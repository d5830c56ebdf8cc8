"""The errors a user meets first: one line on stderr naming the key, file or ``file:line``, exit status 1,
the traceback only with ``--verbose``, and nothing written to the workdir before the inputs are checked;
an unreadable checkpoint falls back with one warning line; the closing metrics table of a preempted run
and the first log point after a resume (``averaged_steps``).

The launch runs are subprocesses that stop before any model is built (a few seconds each); the rest run
in-process on a model directory holding the processor files and an empty safetensors file.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path

import helpers
import numpy as np
import pytest

from mmret import build, checkpoints, launch, recipe
from mmret.convert.hf import ConversionError, SafetensorsCheckpoint
from mmret.data.bad_records import BadRecordError
from mmret.train.meter import Meter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, processor_dir, tiny_mbeir) -> dict[str, Path]:
    """The tiny synthetic corpus (the session's, read only: tests break copies) and a model directory:
    config, processor files, an empty model.safetensors."""
    from mmret.models.qwen2_vl.presets import hf_config

    base = tmp_path_factory.mktemp("errors")
    model = base / "model"
    shutil.copytree(processor_dir, model)
    (model / "config.json").write_text(json.dumps(hf_config("tiny")))
    header = b'{"__metadata__":{}}'
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return {"base": base, "mbeir": tiny_mbeir, "model": model}


def corpus_copy(inputs: dict[str, Path], name: str) -> Path:
    """A copy of the corpus (images linked, not copied) to break."""
    root = inputs["base"] / name
    shutil.copytree(inputs["mbeir"], root, ignore=shutil.ignore_patterns("mbeir_images"))
    (root / "mbeir_images").symlink_to(inputs["mbeir"] / "mbeir_images")
    return root


def break_training_queries(root: Path, lineno: int, edit) -> list[Path]:
    """Replace line ``lineno`` of every training query file (per-task and union) by ``edit(line)``."""
    files = sorted(p for p in (root / "query").rglob("*train*.jsonl"))
    for path in files:
        lines = path.read_text().splitlines(keepends=True)
        lines[lineno - 1] = edit(lines[lineno - 1]) + "\n"
        path.write_text("".join(lines))
    return files


DEMO = [sys.executable, "-m", "mmret.launch", "--config=umarvel.py:mbeir_demo"]


def launch_demo(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DEMO, f"--workdir={workdir}", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def one_line(r: subprocess.CompletedProcess) -> str:
    """The error line of a failed run, checking it is the only thing on stderr."""
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mmret.launch: "), r.stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------- through the launcher


def test_bad_record_is_one_line_and_nothing_is_written(inputs):
    """The demo preset evaluates before training: the training records are still checked first."""
    root = corpus_copy(inputs, "bad_json")
    files = break_training_queries(root, 2, lambda _: '{"qid": "9:2", "query_txt": "a\tb"}')  # a raw tab
    workdir = inputs["base"] / "run_bad_json"
    command = [*DEMO, f"--workdir={workdir}", f"--config.model.hf_dir={inputs['model']}", f"--config.data.root={root}"]
    r, verbose = helpers.run_at_once(command, [*command, "--verbose"], timeout=300, cwd=ROOT)  # independent runs
    line = one_line(r)
    where, detail = line.removeprefix("mmret.launch: ").split(":2: ", 1)
    assert Path(where) in files and detail == "invalid_json: Invalid control character at column 31", line
    assert "bad records" not in r.stdout
    assert not workdir.exists()  # by either run

    assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1].startswith("mmret.data.bad_records.BadRecordError: ")


def test_missing_model_directory_is_one_line(inputs):
    workdir = inputs["base"] / "run_no_model"
    r = launch_demo(workdir, "--config.model.hf_dir=/nonexistent", f"--config.data.root={inputs['mbeir']}")
    assert one_line(r) == "mmret.launch: model.hf_dir: /nonexistent: no such directory"
    assert not workdir.exists()


# ------------------------------------------------------------------------------- the checks themselves


def config(inputs: dict[str, Path], **overrides: object) -> recipe.TrainerConfig:
    cfg: dict = {
        "model": {"hf_dir": str(inputs["model"])},
        "data": {"root": str(inputs["mbeir"]), "pipeline": {"on_bad_record": "error"}},
    }
    for key, value in overrides.items():
        *parents, leaf = key.split("__")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return recipe.as_trainer_config(cfg)


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("data__format", "foo", "('raw', 'array_record')"),
        ("model__remat", "foo", "('none', 'full', 'dots', 'dots_with_no_batch_dims')"),
        ("model__dtype", "bf16", "('float32', 'bfloat16', 'float16')"),
        ("data__pipeline__on_bad_record", "ignore", "('error', 'skip')"),  # Literal-typed
        ("data__processor__pool_scope", "all", "('sequence', 'content')"),
    ],
)
def test_choices_name_the_key_and_the_allowed_values(inputs, key, value, allowed):
    dotted = key.replace("__", ".")
    with pytest.raises(ValueError) as e:
        config(inputs, **{key: value})  # the Literal-typed fields are checked when the config is parsed
    assert str(e.value) == f"{dotted} must be one of {allowed}, got {value!r}"
    config(inputs)  # the defaults pass
    with pytest.raises(ValueError, match=r"^encoder\.pooling must be one of \('mean', 'last'\), got 'foo'$"):
        config(inputs, encoder__pooling="foo")  # checked by EncoderConfig itself


def test_paths_name_the_key_and_the_path(inputs, tmp_path):
    launch.check_paths(config(inputs))
    with pytest.raises(FileNotFoundError, match=r"^data\.root: /nonexistent: no such directory$"):
        launch.check_paths(config(inputs, data__root="/nonexistent"))
    a_file = inputs["model"] / "config.json"
    with pytest.raises(NotADirectoryError, match=rf"^model\.hf_dir: {a_file}: not a directory$"):
        launch.check_paths(config(inputs, model__hf_dir=str(a_file)))
    with pytest.raises(FileNotFoundError, match=r"^data\.negatives_file: /no/negs\.jsonl: no such file$"):
        launch.check_paths(config(inputs, data__negatives_file="/no/negs.jsonl"))
    pickled = tmp_path / "pickled"
    shutil.copytree(inputs["model"], pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    (pickled / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError) as e:
        launch.check_paths(config(inputs, model__hf_dir=str(pickled)))
    assert str(e.value).startswith(f"model.hf_dir: {pickled / 'pytorch_model.bin'}: ")
    assert "weights are read from safetensors only" in str(e.value) and "\n" not in str(e.value)


def test_model_and_processor_loaders_check_the_directory_first(inputs, tmp_path):
    from mmret.data.processor import Processor
    from mmret.models import qwen2_vl

    with pytest.raises(ConversionError, match="^/nonexistent: no such directory$"):
        qwen2_vl.from_hf("/nonexistent")
    with pytest.raises(FileNotFoundError, match="^/nonexistent: no such directory"):
        Processor("/nonexistent")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text("{}")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"PK")
    with pytest.raises(ConversionError, match="weights are read from safetensors only"):
        qwen2_vl.from_hf(tmp_path / "bin")
    assert SafetensorsCheckpoint(inputs["model"]).keys() == []


def test_missing_field_names_file_and_line(inputs):
    root = corpus_copy(inputs, "missing_field")
    files = break_training_queries(
        root, 3, lambda line: json.dumps({k: v for k, v in json.loads(line).items() if k != "qid"})
    )
    with pytest.raises(BadRecordError) as e:
        build.open_inputs(config(inputs, data__root=str(root)))
    where, detail = str(e.value).split(":3: ", 1)
    assert Path(where) in files and detail == "missing_field: field 'qid' is missing"


@pytest.mark.parametrize(
    ("line", "detail"),
    [
        ('{"qid": "x', "Unterminated string starting at column 9"),
        ('{"qid": x}', "Expecting value at column 9"),
        ('{"qid": "1"} x', "Extra data at column 14"),
    ],
)
def test_invalid_json_detail_reads_once(tmp_path, line, detail):
    from mmret.data.bad_records import BadRecords
    from mmret.data.mbeir import iter_jsonl

    path = tmp_path / "q.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(BadRecordError) as e:
        list(iter_jsonl(path, BadRecords("error")))
    assert str(e.value) == f"{path}:1: invalid_json: {detail}"


def test_one_line_errors_finds_the_cause_and_verbose_keeps_the_traceback(monkeypatch):
    monkeypatch.setattr(launch, "verbose", lambda: False)
    with pytest.raises(SystemExit) as e, launch.one_line_errors(BadRecordError):
        try:
            raise BadRecordError("f.jsonl:3", "bad_image", "not an image\n(truncated)")
        except BadRecordError as inner:
            raise RuntimeError("worker failed") from inner
    assert e.value.code == "mmret.launch: f.jsonl:3: bad_image: not an image (truncated)"
    with pytest.raises(KeyError), launch.one_line_errors(BadRecordError):  # not an input error: as it is
        raise KeyError("x")
    monkeypatch.setattr(launch, "verbose", lambda: True)
    with pytest.raises(BadRecordError), launch.one_line_errors(BadRecordError):
        raise BadRecordError("f.jsonl:3", "bad_image")


# ------------------------------------------------------------------------------------- checkpoints


def test_unreadable_checkpoint_falls_back_with_one_warning_line(tmp_path, caplog, capfd, monkeypatch):
    """The reads still in flight when the first fails report to sys.unraisablehook and the asyncio logger
    (caplog would see the latter): neither hears of them."""
    import jax.numpy as jnp

    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    ckpts = checkpoints.Checkpoints(tmp_path, recipe.CheckpointConfig(every=1, keep=3, async_save=False))
    tree = {f"w{i}": jnp.full((16, 16), float(i)) for i in range(200)}  # many arrays: many reads in flight
    for step in (1, 2):
        ckpts.save(step, {"trainable": tree}, {"iterator": step, "bad_records": {}}, {"n": step})
    ckpts.wait()
    for f in (tmp_path / "checkpoints" / "2" / "state").rglob("manifest.ocdbt"):
        f.write_bytes(b"xx")
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        step, items = ckpts.restore_latest({"trainable": tree})
        ckpts.close()
        gc.collect()  # tasks whose error nobody retrieved log it when collected
    assert step == 1 and items["info"] == {"n": 1} and float(items["state"]["w3"][0, 0]) == 3.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    moved = [p.name for p in (tmp_path / "checkpoints_unreadable").iterdir()]
    assert len(moved) == 1 and moved[0].startswith("2.")
    assert warnings[0].startswith(f"checkpoint {tmp_path / 'checkpoints' / '2'} is unreadable (")
    assert f"moved to {tmp_path / 'checkpoints_unreadable' / moved[0]}; trying the previous one" in warnings[0]
    assert "tensorstore_spec" not in warnings[0] and len(warnings[0]) < 800
    err = capfd.readouterr().err
    assert "Event loop is closed" not in err and "Task exception" not in err and "Traceback" not in err, err
    assert unraisable == []


def test_restore_noise_filter_drops_only_the_failed_reads(tmp_path):
    noise = checkpoints._RestoreNoise()
    seen: list[object] = []
    previous = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        noise.watch(tmp_path / "checkpoints" / "4")
        closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
        other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
        sys.unraisablehook(closed)
        sys.unraisablehook(other)
        assert seen == [other]
    finally:
        sys.unraisablehook = previous
        logging.getLogger("asyncio").removeFilter(noise)

    def record(text: str) -> logging.LogRecord:
        error = ValueError(f'DATA_LOSS: reading local file "{text}state/manifest.ocdbt"')
        return logging.LogRecord(
            "asyncio", logging.ERROR, "", 0, "Task exception was never retrieved", (), (None, error, None)
        )

    assert not noise.filter(record(f"{tmp_path}/checkpoints/4/"))
    assert noise.filter(record(f"{tmp_path}/checkpoints/40/"))  # another checkpoint's error stays


# ----------------------------------------------------------------------- preemption, resume, metrics


def test_meter_records_say_how_many_steps_they_average():
    meter = Meter(global_batch=8, total_steps=10)
    for loss in (1.0, 2.0, 3.0):
        meter.add({"loss": loss}, tokens=100)
    record = meter.record(3)
    assert record["loss"] == 2.0 and record["averaged_steps"] == 3
    meter.add({"loss": 5.0}, tokens=100)  # a resumed run's first interval: only the steps since the checkpoint
    meter.add(None, tokens=100)  # a skipped (non-finite) step: not averaged
    record = meter.record(6)
    assert record["loss"] == 5.0 and record["averaged_steps"] == 1


PREEMPT_THEN_RESUME = """
import json, sys
from pathlib import Path
from mmret import launch
from mmret.train import trainer
from mmret.train.preemption import Preemption

cfg, workdir = json.loads(sys.argv[1]), sys.argv[2]
should_stop = Preemption.should_stop
Preemption.should_stop = lambda self, step: step >= 1  # a SIGTERM during step 1
first = trainer.train(cfg, workdir)
table = launch.summary_table(Path(workdir) / "metrics.jsonl")
Preemption.should_stop = should_stop
second = trainer.train(cfg, workdir)
print("RESULT " + json.dumps({"first": first, "table": table, "second": second}))
"""


def test_preempted_run_shows_its_metrics_and_the_resumed_first_point_says_what_it_averages(inputs, tmp_path):
    """Preempted at step 1, before the first log point (3): the step is logged and the closing table shows it;
    the resumed run's first point (3) averages steps 2-3 and says so."""
    cfg = {
        "model": {"preset": "tiny", "seed": 0},
        "data": {
            "root": str(inputs["mbeir"]),
            "processor_dir": str(inputs["model"]),
            "processor": {"max_pixels": 64 * 28 * 28, "max_text_tokens": 48},
            "pipeline": {
                "batch_size": 2,
                "max_query_length": 96,
                "max_candidate_length": 96,
                "max_query_patches": 2 * 64,
                "max_candidate_patches": 2 * 64,
            },
        },
        "optimizer": {"learning_rate": 1e-3, "total_steps": 3, "warmup_steps": 1},
        "mesh": {"data": 1},
        "log_every": 3,
        "checkpoint": {"every": 100, "keep": 2, "async_save": False},
    }
    workdir = tmp_path / "run"
    # The session's compilation cache (tests/conftest.py) comes with os.environ: the resumed run reuses the step.
    env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(1))
    r = subprocess.run(
        [sys.executable, "-c", PREEMPT_THEN_RESUME, json.dumps(cfg), str(workdir)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert out["first"]["preempted"] and out["first"]["final_step"] == 1
    table = out["table"]
    assert table[1].startswith("| step | loss |") and table[1].endswith("| averaged_steps |")
    assert len(table) == 4 and table[3].startswith("| 1 | ") and table[3].endswith("| 1 |"), table
    assert not out["second"]["preempted"] and out["second"]["final_step"] == 3
    assert "resuming from step 1" in r.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["averaged_steps"]) for r in records] == [(1, 1), (3, 2)]
    assert all(np.isfinite(r["loss"]) for r in records)
