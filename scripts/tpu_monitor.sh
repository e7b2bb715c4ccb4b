#!/usr/bin/env bash
# Follows a pod-slice training run.
#
#   scripts/tpu_monitor.sh NAME ZONE [WORKER]       # tail worker 0's log (default)
#   scripts/tpu_monitor.sh NAME ZONE all            # last lines of every worker's log
#   STOP=1 scripts/tpu_monitor.sh NAME ZONE all     # SIGTERM: checkpoint, then stop
#   DELETE=1 scripts/tpu_monitor.sh NAME ZONE       # delete the slice
#
# Metrics also land in WORKDIR/metrics.jsonl and WORKDIR/tensorboard (process 0):
#   tensorboard --logdir gs://BUCKET/run/tensorboard
set -euo pipefail
NAME=${1:?usage: tpu_monitor.sh NAME ZONE [WORKER|all]}
ZONE=${2:?zone}
WORKER=${3:-0}

if [[ "${DELETE:-0}" == 1 ]]; then
  exec gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --quiet
fi
if [[ "${STOP:-0}" == 1 ]]; then
  # Stop the resume loop first, then SIGTERM the trainer: it finishes its step, saves a
  # checkpoint and exits 143; rerunning tpu_launch.sh resumes from it.
  exec gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all \
      --command='pkill -f scripts/tpu_worker.sh || true
                 pkill -TERM -f unialign_jax.training.cli || true'
fi
if [[ "$WORKER" == all ]]; then
  exec gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all \
      --command='echo "== $(hostname)"; tail -n 5 ~/unialign_train.log'
fi
exec gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker="$WORKER" \
    --command='tail -n 50 -f ~/unialign_train.log'
