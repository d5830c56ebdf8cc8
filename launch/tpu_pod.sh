#!/usr/bin/env bash
# Run one mmret job on every worker of a Cloud TPU VM pod slice (e.g. v5p-64): the cloud CLI's ssh to all
# workers at once, each worker installing mmret and running the same `python -m mmret.launch` command; JAX finds
# the pod's workers itself (jax.distributed on TPU VMs needs no addresses).
#
#   TPU_NAME=my-v5p ZONE=us-east5-a PROJECT=my-project CONFIG=umarvel.py WORKDIR=gs://bucket/runs/stage3 \
#     ARGS="--config.data.root=gs://bucket/M-BEIR --config.model.hf_dir=/mnt/models/Qwen2-VL-7B" launch/tpu_pod.sh
#
# Variables: TPU_NAME, ZONE, PROJECT (required); CONFIG (a configs/ file[:preset], default umarvel.py), WORKDIR
# (required; a gs:// path keeps checkpoints off the workers' disks), ARGS (more flags for mmret.launch),
# REPO (default https://github.com/mmret/mmret.git), REF (branch or commit, default main), DIR (the checkout on each
# worker, default ~/mmret), LOG (each worker's log, default ~/mmret.log). DRY_RUN=1 prints the command instead.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${PROJECT:?set PROJECT}" "${WORKDIR:?set WORKDIR}"
CONFIG="${CONFIG:-umarvel.py}"
ARGS="${ARGS:-}"
REPO="${REPO:-https://github.com/mmret/mmret.git}"
REF="${REF:-main}"
DIR="${DIR:-~/mmret}"
LOG="${LOG:-~/mmret.log}"

# What every worker runs: the same checkout and environment, then the entry point (its output in LOG and on ssh).
REMOTE="set -e; if [ ! -d $DIR ]; then git clone -q $REPO $DIR; fi; cd $DIR && git fetch -q origin $REF && git checkout -q FETCH_HEAD"
REMOTE+=" && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
REMOTE+=" && .venv/bin/python -m mmret.launch --config=$CONFIG --workdir=$WORKDIR $ARGS 2>&1 | tee $LOG"

COMMAND=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=all --command="$REMOTE")
if [ "${DRY_RUN:-0}" = "1" ]; then
  printf '%q ' "${COMMAND[@]}"
  echo
else
  "${COMMAND[@]}"
fi
