#!/usr/bin/env bash
# Run one multi-process job on this machine: NUM_PROCESSES CPU processes, each with
# DEVICES_PER_PROCESS fake devices, joined over localhost (a free port) with gloo collectives.
# It behaves like a multi-host job (each process feeds its slice of the global batch,
# all-reduces span processes, checkpoints are coordinated), so the multi-host paths can be
# checked without a cluster:
#   launch/local_multiprocess.sh 2 2 --config=configs/demo.py --workdir=/tmp/demo_2x2
# 1 process x 4 devices (launch/local.sh 4 ...) trains on the same global batches, with the
# same losses. Process i's output is prefixed "[pI] ". The script exits with the first
# failing process's status (the others are then killed), 0 when all succeed; SIGTERM / ^C
# are passed on to every process as SIGTERM (they checkpoint and stop, ocl_jax/preemption.py).
# PYTHON selects the interpreter (default: python).
set -uo pipefail
usage="usage: launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS --config=... --workdir=... [main flags]"
n="${1:?$usage}"
d="${2:?$usage}"
shift 2
python="${PYTHON:-python}"
port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')" || exit 1
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${d}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"

declare -A alive=()
stop_all() {
  for pid in "${!alive[@]}"; do kill -s "$1" "$pid" 2>/dev/null; done
}
stopping=0
trap 'stopping=1; stop_all TERM' TERM INT

for ((i = 0; i < n; i++)); do
  "$python" -m ocl_jax.main --coordinator_address="localhost:${port}" --num_processes="$n" \
      --process_id="$i" "$@" > >(sed -u "s/^/[p${i}] /" >&2) 2>&1 &
  alive[$!]=$i
done

status=0
while ((${#alive[@]})); do
  sleep 1
  for pid in "${!alive[@]}"; do
    kill -0 "$pid" 2>/dev/null && continue
    wait "$pid"
    code=$?
    i=${alive[$pid]}
    unset "alive[$pid]"
    if ((code != 0 && status == 0)); then
      status=$code
      if ((!stopping)); then  # after SIGTERM the others are checkpointing and stopping too
        echo "launch/local_multiprocess.sh: process $i failed with exit status $code; killing the others" >&2
        stop_all KILL  # they would wait for it in their next collective
      fi
    fi
  done
done
wait  # the output filters
exit "$status"
