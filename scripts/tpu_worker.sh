#!/usr/bin/env bash
# The training command of one host of a multi-host run: every TPU VM worker of a pod slice
# runs it (scripts/tpu_launch.sh starts it there), and tests/test_faults_multihost.py runs
# it as several processes on one machine. It trains with mesh.distributed=True (so
# jax.distributed.initialize() joins the hosts into one mesh) and reruns the trainer after
# a preemption exit (143: checkpointed), each time resuming from the work dir's newest
# intact checkpoint; any other exit (0: done, 2: a clear error, such as another host
# dying) ends it.
#
#   scripts/tpu_worker.sh WORKDIR [section.key=value ...]
#   CONFIG=tiny scripts/tpu_worker.sh /tmp/run run.num_steps=4
#
# Environment: CONFIG (a shipped config's name or a .py file; default unialignment_512),
# PYTHON (default python3). On Cloud TPU JAX finds the other hosts by itself; elsewhere set
# JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID.
set -uo pipefail
WORKDIR=${1:?usage: tpu_worker.sh WORKDIR [section.key=value ...]}
shift
CONFIG=${CONFIG:-unialignment_512}
PYTHON=${PYTHON:-python3}

while true; do
  "$PYTHON" -m unialign_jax.training.cli --config "$CONFIG" --workdir "$WORKDIR" \
      mesh.distributed=True "$@"
  code=$?
  [[ $code == 143 ]] || exit "$code"   # 143: preempted after checkpointing -> resume
  echo "preempted; resuming"
done
