#!/usr/bin/env bash
# Run the main job on this machine with N fake CPU devices (data parallel, pmap),
# e.g. to check multi-device behaviour without an accelerator:
#   launch/local.sh 4 --config=configs/demo.py --workdir=/tmp/demo4
# (several processes on this machine: launch/local_multiprocess.sh; PYTHON selects the
# interpreter, default python)
set -euo pipefail
n="${1:?usage: launch/local.sh NUM_DEVICES --config=... --workdir=... [--config.X=Y ...]}"
shift
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${n}"
exec "${PYTHON:-python}" -m ocl_jax.main "$@"
