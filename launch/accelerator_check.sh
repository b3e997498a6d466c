#!/usr/bin/env bash
# The README's main job and the train-step benchmark on an accelerator image that has JAX but
# not TensorFlow, TFDS or clu, as one prepared run (e.g. on a lent GPU):
#   launch/accelerator_check.sh OUT_DIR
# Run from the repository root. Missing pure-Python packages (ml-collections, tqdm, PyYAML,
# absl-py) are installed from wheels in .whl/ when that folder exists (no internet needed),
# into /tmp/site; the package itself runs from the checkout (PYTHONPATH), nothing else is
# installed. Writes into OUT_DIR: main_job.txt (its console), time.txt (the whole process),
# stage_times.{json,md} (per stage: wall time, first step = compile, steps/s after it,
# device idle share), log.txt (the main job's full log) and bench.{json,md} (ResNet-50, 224 px
# crops of 256 px squares, global batch 256, bf16, through the bench's own CLI).
# PYTHON selects the interpreter (default python3); BENCH_CASES the bench cases (default: the
# MoCo, BYOL, SimCLR, BG-mixup and SGCL steps, ContraCAM at T=1 and T=10, the peak matmuls).
set -euo pipefail
out="${1:?usage: launch/accelerator_check.sh OUT_DIR}"
python="${PYTHON:-python3}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
if [ -d .whl ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
"$python" -c 'import jax; print("JAX", jax.__version__, jax.devices())' | tee "$out/devices.txt"

workdir="$out/demo"
start=$(date +%s.%N)
"$python" -m ocl_jax.main --config=configs/demo.py --workdir="$workdir" 2>&1 | tee "$out/main_job.txt"
end=$(date +%s.%N)
seconds=$("$python" -c "print(round($end - $start, 1))")
echo "whole process: $seconds s" | tee "$out/time.txt"
cp "$workdir/log.txt" "$out/log.txt"
"$python" -m ocl_jax.tools.stage_times "$workdir" --process_seconds="$seconds" \
  --out="$out/stage_times.json" --table="$out/stage_times.md"

# configs/in9.py's shapes; its data paths are never read by these synthetic-batch cases.
"$python" -m ocl_jax.tools.bench --config=configs/in9.py --set=dataset.name=scenes/small \
  --set=evaluation.folders.imagenet9=unused --arch=resnet50 --batch_size=256 \
  --dtype=bfloat16 --cases="${BENCH_CASES:-moco,byol,simclr,moco+bgmix,moco+sgcl,contracam_T1_x1,contracam_T10_x1,peak}" \
  --cpu_devices=-1 --reference=off --out="$out/bench.json" --table="$out/bench.md"
