#!/usr/bin/env python3
"""A stand-in for SLURM's ``srun`` on one machine (used by tests/test_launch_scripts.py, not collected by pytest).

    srun [--option ...] COMMAND [ARGS ...]

Starts ``SLURM_NTASKS`` copies of COMMAND at once with the variables srun gives each task of a one-node step
(``SLURM_PROCID`` and ``SLURM_LOCALID`` = the task's index, ``SLURM_STEP_NODELIST`` = ``SLURM_JOB_NODELIST`` or
localhost, ``SLURM_STEP_NUM_NODES`` = 1, ``SLURM_STEP_NUM_TASKS``), waits for all of them and exits with the first
non-zero status (``--kill-on-bad-exit``: the others are then killed). ``FAKE_SRUN_ENV``, a JSON object, adds
variables to every task (the test's per-task XLA flags).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main() -> int:
    args = sys.argv[1:]
    while args and args[0].startswith("--"):
        args = args[1:]
    n = int(os.environ.get("SLURM_NTASKS", "1"))
    extra = json.loads(os.environ.get("FAKE_SRUN_ENV", "{}"))
    procs = []
    for i in range(n):
        env = dict(os.environ, **extra)
        env.update(
            SLURM_PROCID=str(i),
            SLURM_LOCALID=str(i),
            SLURM_STEP_NODELIST=os.environ.get("SLURM_JOB_NODELIST", "localhost"),
            SLURM_STEP_NUM_NODES="1",
            SLURM_STEP_NUM_TASKS=str(n),
        )
        procs.append(subprocess.Popen(args, env=env))
    while True:
        codes = [p.poll() for p in procs]
        bad = [c for c in codes if c not in (None, 0)]
        if bad:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            return bad[0]
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
