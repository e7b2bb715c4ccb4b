#!/usr/bin/env bash
# Starts (or resumes) training on every worker of a TPU pod slice: the same command on
# all hosts, with the work dir on GCS.
#
#   scripts/tpu_launch.sh NAME ZONE gs://BUCKET/run [section.key=value ...]
#   scripts/tpu_launch.sh unialign-v5e64 us-west4-a gs://my-bucket/unialign_512 \
#       models.pipeline=/mnt/models/unialign_jax_sd3 \
#       data.t2i_shards="('/mnt/data/t2i',)" data.edit_shards="('/mnt/data/edit',)"
#
# Each worker runs scripts/tpu_worker.sh (CONFIG=... picks the config, default
# unialignment_512): `unialign-train ... mesh.distributed=True`, so
# jax.distributed.initialize() joins the hosts into one mesh, in a loop that reruns the
# trainer after a preemption exit (143), each time resuming from the work dir's newest
# intact checkpoint. tests/test_faults_multihost.py runs that same script as several
# processes on one machine. Logs: ~/unialign_train.log on each worker
# (scripts/tpu_monitor.sh NAME ZONE).
#
# PLAN: the per-chip settings that go before your overrides (yours win). Default:
# RECOMMENDED_64, for unialignment_512 on a 64-chip slice (v5e-64, v6e-64, v5p with 64
# chips): the config's micro-batch of 4 does not divide the 6 rows per chip of a 384 batch,
# so each chip takes its 6 rows in one pass (no accumulation). scripts/tpu_plan.py's sweep
# compiled it for all three slices, t2i, edit and compose, under 16 GiB per chip (README
# "TPU plan of the full-size step"). The contrastive loss then contrasts 6 rows per chip
# where the release contrasts 4 (README "Fidelity"); slices whose chip count divides 96
# keep the config's 4 exactly (PLAN=""). Other slice sizes need a micro-batch of at least
# 2 that divides 384 / chips: plan it, then set PLAN.
set -euo pipefail
NAME=${1:?usage: tpu_launch.sh NAME ZONE WORKDIR [section.key=value ...]}
ZONE=${2:?zone}
WORKDIR=${3:?work dir, e.g. gs://BUCKET/run}
shift 3
CONFIG=${CONFIG:-unialignment_512}
RECOMMENDED_64="run.micro_batch_per_device=6"
PLAN=${PLAN-$RECOMMENDED_64}
overrides=""
for arg in $PLAN "$@"; do overrides+=" $(printf '%q' "$arg")"; done

gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="
cd ~/unialign_jax
pkill -f scripts/tpu_worker.sh || true
CONFIG=$(printf '%q' "$CONFIG") nohup scripts/tpu_worker.sh $(printf '%q' "$WORKDIR") \
    ${overrides} > ~/unialign_train.log 2>&1 &
echo \"worker \$(hostname): started\"
"
echo "launched on all workers of $NAME; work dir $WORKDIR"
