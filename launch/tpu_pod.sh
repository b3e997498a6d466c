#!/usr/bin/env bash
# Run the job on every worker (host) of a Cloud TPU VM pod slice, one process per host:
#   launch/tpu_pod.sh my-v4-32 us-central2-b --config=configs/coco.py --workdir=/mnt/nfs/coco
# Each worker runs `python -m ocl_jax.main --distributed=auto ...`; JAX finds the pod's
# coordinator, process count and index from the TPU metadata. config.batch_size is the global
# batch (split over all hosts). Before the first run, on every worker (--worker=all):
# - this repository at the same path, REPO_DIR (default ~/ocl_jax), with its Python
#   environment installed (PYTHON, default python3; e.g. pip install -e . "jax[tpu]");
# - the TFDS data dir (--config.dataset.data_dir) readable: every host reads the train split;
# - the workdir on a file system all workers share (NFS / Filestore, or a gcsfuse mount):
#   process 0 writes the checkpoints and every process reads them when resuming.
# Extra gcloud flags (e.g. --project=P) go in GCLOUD_FLAGS. ^C stops the local ssh sessions
# only; stop the remote processes with
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command "pkill -f ocl_jax.main"
set -euo pipefail
name="${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE --config=... --workdir=... [main flags]}"
zone="${2:?usage: launch/tpu_pod.sh TPU_NAME ZONE --config=... --workdir=... [main flags]}"
shift 2
repo="${REPO_DIR:-~/ocl_jax}"
python="${PYTHON:-python3}"
args="$(printf ' %q' "$@")"  # quoted for the workers' shell
# shellcheck disable=SC2086  # GCLOUD_FLAGS is a list of flags
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all ${GCLOUD_FLAGS:-} \
  --command "cd $repo && $python -m ocl_jax.main --distributed=auto$args"
