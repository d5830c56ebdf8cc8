"""One process of the multi-host embedding test (run by tests/test_multihost.py, not collected by pytest).

    python tests/_multihost_embed_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES MBEIR PROCESSOR_DIR OUT

Embeds the test queries and local pools of two tasks of the synthetic corpus in MBEIR with the tiny
random model (processor files in PROCESSOR_DIR) into OUT, in shards of 40 and batches of 8 per host; then
mines hard negatives for cirr_task7's training queries (U-MARVEL's rule, its local pool, top 20, 3
negatives) into OUT/mined.
"""

from __future__ import annotations

import sys

pid, nproc, port, local_devices = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
mbeir, processor_dir, out = sys.argv[5], sys.argv[6], sys.argv[7]
from helpers import eval_trainer_config, start_worker  # noqa: E402  (tests/ is this script's directory)

start_worker(pid, nproc, port, local_devices)

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

from mmret.eval.embed import embed  # noqa: E402
from mmret.mining.mine import mine  # noqa: E402
from mmret.recipe import MiningConfig  # noqa: E402

TASKS = ["cirr_task7", "webqa_task1"]  # (image, text) -> image and text -> text


def main() -> None:
    cfg = eval_trainer_config(mbeir, processor_dir, TASKS)
    embed(cfg, out)
    print(f"process {pid}/{nproc}: devices {jax.device_count()} embedded into {out}", flush=True)
    mining = MiningConfig(rule="umarvel", negatives=3, top_k=20, pool="local", tasks=("cirr_task7",))
    mine(dataclasses.replace(cfg, mining=mining), Path(out) / "mined", workdir=None, step=0)
    print(f"process {pid}/{nproc}: mined", flush=True)


if __name__ == "__main__":
    main()
