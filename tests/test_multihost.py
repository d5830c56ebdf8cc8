"""Two processes on localhost (jax.distributed, gloo CPU collectives) train three steps and agree with
one process given the same global batch."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from mmret.models.qwen2_vl.processor_files import write_processor_files

WORKER = Path(__file__).with_name("_multihost_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
    write_processor_files(tmp_path)
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(pid), "2", port, "2", str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "devices 4" in outs[0]
    single = subprocess.run(
        [sys.executable, str(WORKER), "0", "1", port, "4", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    two, one = np.load(tmp_path / "result_2.npz"), np.load(tmp_path / "result_1.npz")
    assert one["losses"][0] > 0.1 and one["losses"][2] < one["losses"][0]  # it really trains
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    keys = [k for k in one.files if k != "losses"]
    assert len(keys) > 10 and sorted(keys) == sorted(k for k in two.files if k != "losses")
    for k in keys:
        np.testing.assert_allclose(two[k], one[k], atol=1e-5, err_msg=k)
