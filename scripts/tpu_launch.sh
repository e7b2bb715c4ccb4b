#!/usr/bin/env bash
# Starts (or resumes) training on every worker of a TPU pod slice: the same command on
# all hosts, with the work dir on GCS.
#
#   scripts/tpu_launch.sh NAME ZONE gs://BUCKET/run [key=value ...]
#   scripts/tpu_launch.sh unialign-v5e64 us-west4-a gs://my-bucket/unialign_512 \
#       pipeline=/mnt/models/unialign_jax_sd3 \
#       t2i_shards="('/mnt/data/t2i',)" edit_shards="('/mnt/data/edit',)"
#
# Each worker runs `unialign-train --config configs/unialignment_512.py` (CONFIG=... to
# change it) with distributed=True, so jax.distributed.initialize() joins the hosts into
# one mesh; the code path is the one tests/test_parallel_equivalence.py checks on
# simulated devices. The job runs under nohup in a loop that reruns the trainer after a
# preemption exit (143), each time resuming from the latest checkpoint in the work dir.
# Logs: ~/unialign_train.log on each worker (scripts/tpu_monitor.sh NAME ZONE).
set -euo pipefail
NAME=${1:?usage: tpu_launch.sh NAME ZONE WORKDIR [key=value ...]}
ZONE=${2:?zone}
WORKDIR=${3:?work dir, e.g. gs://BUCKET/run}
shift 3
CONFIG=${CONFIG:-configs/unialignment_512.py}
overrides=$(printf ' %q' "$@")

gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="
cd ~/unialign_jax
cat > ~/unialign_run.sh <<'RUN'
#!/usr/bin/env bash
cd ~/unialign_jax
while true; do
  unialign-train --config $CONFIG --workdir $WORKDIR distributed=True ${overrides}
  code=\$?
  [[ \$code == 143 ]] || exit \$code   # 143: preempted after checkpointing -> resume
  echo \"preempted; resuming\"
done
RUN
chmod +x ~/unialign_run.sh
pkill -f unialign_run.sh || true
nohup ~/unialign_run.sh > ~/unialign_train.log 2>&1 &
echo \"worker \$(hostname): started\"
"
echo "launched on all workers of $NAME; work dir $WORKDIR"
