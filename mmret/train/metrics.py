"""Where training metrics go: a progress line on stdout, ``metrics.jsonl`` and TensorBoard event files.

The TensorBoard writer needs no TensorFlow: an event file is a TFRecord file (length, masked CRC-32C,
payload, masked CRC-32C) of ``tensorflow.Event`` protocol buffers, and the few fields a scalar needs are
encoded here by hand (``Event.wall_time`` 1, ``step`` 2, ``file_version`` 3, ``summary`` 5;
``Summary.value`` 1; ``Summary.Value.tag`` 1, ``simple_value`` 2). :func:`read_scalars` reads them back
(CRC-checked), for tests and quick looks without TensorBoard.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

# ----------------------------------------------------------------------------------- TFRecord framing


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord uses it (event files are small: pure Python is enough)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the payload, its masked CRC."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc32c(length)) + payload + struct.pack("<I", masked_crc32c(payload))


def read_tfrecords(path: str | Path) -> Iterator[bytes]:
    """The payloads of a TFRecord file; ``ValueError`` on a bad checksum. A torn last record (a writer
    killed mid-write) ends the iteration."""
    data = Path(path).read_bytes()
    pos = 0
    while pos + 12 <= len(data):
        length_bytes = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", length_bytes)
        (crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        if crc != masked_crc32c(length_bytes):
            raise ValueError(f"{path}: bad length checksum at byte {pos}")
        end = pos + 12 + length + 4
        if end > len(data):
            return
        payload = data[pos + 12 : pos + 12 + length]
        (crc,) = struct.unpack("<I", data[end - 4 : end])
        if crc != masked_crc32c(payload):
            raise ValueError(f"{path}: bad payload checksum at byte {pos}")
        yield payload
        pos = end


# ------------------------------------------------------------------------------ protocol buffers


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # int64 fields: negative numbers as 10-byte two's complement
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def scalar_event(step: int, values: Mapping[str, float], wall_time: float | None = None) -> bytes:
    """A serialised ``Event`` with a ``Summary`` of ``simple_value`` scalars."""
    summary = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5) + struct.pack("<f", float(v)))
        for tag, v in values.items()
    )
    return (
        _field(1, 1)
        + struct.pack("<d", time.time() if wall_time is None else wall_time)
        + _field(2, 0)
        + _varint(int(step))
        + _length_delimited(5, summary)
    )


def restart_event(step: int, wall_time: float | None = None) -> bytes:
    """``SessionLog.START`` at ``step``: TensorBoard drops earlier-written points at steps >= ``step``
    (those of a run that was killed after its last checkpoint and resumed from it)."""
    return (
        _field(1, 1)
        + struct.pack("<d", time.time() if wall_time is None else wall_time)
        + _field(2, 0)
        + _varint(int(step))
        + _length_delimited(6, _field(1, 0) + _varint(1))
    )


def version_event(wall_time: float | None = None) -> bytes:
    return (
        _field(1, 1)
        + struct.pack("<d", time.time() if wall_time is None else wall_time)
        + (_length_delimited(3, b"brain.Event:2"))
    )


def _parse(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a serialised message (varint, 64-bit, bytes, 32-bit)."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while pos < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire == 1:
            yield number, wire, buf[pos : pos + 8]
            pos += 8
        elif wire == 2:
            n = varint()
            yield number, wire, buf[pos : pos + n]
            pos += n
        elif wire == 5:
            yield number, wire, buf[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under ``logdir``: tag -> [(step, value), ...] in file order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        for record in read_tfrecords(path):
            step, summaries = 0, []
            for number, _, value in _parse(record):
                if number == 2:
                    step = value - (1 << 64) if value >= 1 << 63 else value
                elif number == 5:
                    summaries.append(value)
            for summary in summaries:
                for number, _, value in _parse(summary):
                    if number != 1:
                        continue
                    tag, simple = None, None
                    for n, _, v in _parse(value):
                        if n == 1:
                            tag = v.decode()
                        elif n == 2:
                            (simple,) = struct.unpack("<f", v)
                    if tag is not None and simple is not None:
                        out.setdefault(tag, []).append((step, simple))
    return out


class EventWriter:
    """Scalars to a TensorBoard event file (``logdir/events.out.tfevents.<time>.<host>.<pid>``)."""

    def __init__(self, logdir: str | Path):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = self.logdir / name
        self._file = open(self.path, "ab")  # noqa: SIM115 (closed in close())
        self._file.write(tfrecord(version_event()))
        self._file.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        finite = {k: float(v) for k, v in values.items() if v is not None}
        if finite:
            self._file.write(tfrecord(scalar_event(step, finite)))

    def restart(self, step: int) -> None:
        self._file.write(tfrecord(restart_event(step)))
        self._file.flush()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


# ---------------------------------------------------------------------------------- the writers


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line: drop it


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(step: int, total: int, metrics: Mapping[str, Any], width: int = 20) -> str:
    """``step  12/100 [##------] loss 1.2345 acc 0.500 tau 0.0500 |g| 1.2 lr 1.0e-04 3.1 ex/s 812 tok/s eta 1m05s``"""
    done = min(max(step / max(total, 1), 0.0), 1.0)
    bar = "#" * int(round(done * width))
    digits = len(str(total))
    parts = [f"step {step:>{digits}}/{total} [{bar:-<{width}}]"]
    fmt = (
        ("loss", "loss", ".4f"),
        ("accuracy", "acc", ".3f"),
        ("temperature", "tau", ".4f"),
        ("grad_norm", "|g|", ".3g"),
        ("learning_rate", "lr", ".2e"),
    )
    for key, label, spec in fmt:
        if metrics.get(key) is not None:
            parts.append(f"{label} {metrics[key]:{spec}}")
    if metrics.get("examples_per_s"):
        parts.append(f"{metrics['examples_per_s']:.1f} ex/s")
    if metrics.get("tokens_per_s"):
        parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
    if metrics.get("skipped_steps"):
        parts.append(f"skipped {metrics['skipped_steps']}")
    if "eta_s" in metrics:
        parts.append(f"eta {format_duration(metrics['eta_s'])}")
    return " ".join(parts)


class MetricWriters:
    """stdout progress lines, ``workdir/metrics.jsonl`` and TensorBoard under ``workdir/tb``.

    ``resume_step``: the run continues from that checkpoint, so records of later steps (written by a
    run that died after it) are dropped from the jsonl and TensorBoard is told to drop them too.
    Only the primary process (process 0 of a multi-host job) prints progress and writes files.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        total_steps: int,
        resume_step: int = 0,
        primary: bool = True,
        out: TextIO | None = None,
    ):
        self.workdir = Path(workdir)
        self.total_steps = total_steps
        self.out = sys.stdout if out is None else out
        self.primary = primary
        self.events: EventWriter | None = None
        self._jsonl: TextIO | None = None
        if primary:
            self.workdir.mkdir(parents=True, exist_ok=True)
            path = self.workdir / "metrics.jsonl"
            if path.exists():
                keep = [
                    line
                    for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                    if _step_of(line) <= resume_step
                ]
                path.write_text(
                    "".join(line if line.endswith("\n") else line + "\n" for line in keep), encoding="utf-8"
                )
            self.events = EventWriter(self.workdir / "tb")
            if resume_step:
                self.events.restart(resume_step + 1)
            self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One log point: a progress line, a jsonl record and TensorBoard scalars (numbers only)."""
        if not self.primary:
            return
        print(progress_line(step, self.total_steps, metrics), file=self.out, flush=True)
        numbers = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"
        }
        assert self._jsonl is not None and self.events is not None
        record = {"step": int(step), **{k: (v if math.isfinite(v) else str(v)) for k, v in numbers.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self.events.scalars(step, {k: v for k, v in numbers.items() if k != "eta_s"})
        self.events.flush()

    def print(self, *lines: str, every_process: bool = False) -> None:
        """Print on the primary process (or on every process: what differs between them)."""
        if self.primary or every_process:
            for line in lines:
                print(line, file=self.out, flush=True)

    def close(self) -> None:
        if self._jsonl is not None and not self._jsonl.closed:
            self._jsonl.close()
        if self.events is not None:
            self.events.close()
