#!/usr/bin/env bash
# Creates a Cloud TPU VM pod slice and installs unialign_jax on every worker.
#
#   scripts/tpu_create.sh NAME [ZONE] [ACCELERATOR] [RUNTIME]
#   scripts/tpu_create.sh unialign-v5e64 us-west4-a v5litepod-64 v2-alpha-tpuv5-lite
#
# Copies this source tree to all workers (gcloud ... scp --worker=all) and installs it
# with its `tpu` extra (libtpu; gcsfs and google-cloud-storage for the work dir on gs://).
# Needs: gcloud authenticated, a project set (gcloud config set project), TPU quota in ZONE.
# Set SPOT=1 for a preemptible (spot) slice: training resumes from its checkpoints (see
# tpu_launch.sh).
set -euo pipefail
NAME=${1:?usage: tpu_create.sh NAME [ZONE] [ACCELERATOR] [RUNTIME]}
ZONE=${2:-us-west4-a}
ACCELERATOR=${3:-v5litepod-64}
RUNTIME=${4:-v2-alpha-tpuv5-lite}
REPO=$(cd "$(dirname "$0")/.." && pwd)

extra=()
[[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${extra[@]}"

tarball=$(mktemp -d)/unialign_jax.tar.gz
tar -C "$REPO" --exclude=.git --exclude='*.egg-info' -czf "$tarball" .
gcloud compute tpus tpu-vm scp "$tarball" "$NAME":~/unialign_jax.tar.gz \
    --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command='
set -e
mkdir -p ~/unialign_jax && tar -C ~/unialign_jax -xzf ~/unialign_jax.tar.gz
python3 -m pip install -q --upgrade pip
python3 -m pip install -q -e "$HOME/unialign_jax[tpu]"
python3 -c "import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())"
'
echo "created $NAME ($ACCELERATOR in $ZONE); launch with scripts/tpu_launch.sh $NAME ..."
