"""Throughput of jitted ContraCAM on this machine (not a test).

    python -m ocl_jax.bench_contracam [--quick] [--repeats N]

Prints images/s per configuration (compile time excluded, median of repeats)
next to the official PyTorch code's figures on the development CPU
(PERF_NOTES.md; T=10 only). Parameters are random, drawn in NumPy
(initialising under jit compiles for a long time on CPU); the speed does not
depend on their values.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from ocl_jax import contracam as cc
from ocl_jax import models

# (image size, expand_res, batch, T) -> official PyTorch img/s (PERF_NOTES.md).
PYTORCH_IMG_PER_S = {(96, 1, 64, 10): 28.7, (224, 2, 32, 10): 3.45}
CONFIGS = [(96, 1, 64, 1), (96, 1, 64, 10), (224, 2, 32, 1), (224, 2, 32, 10)]


def _resnet18_spec() -> models.ModelSpec:
  return models.ModelSpec(arch="resnet18", width=64, small_stem=False, proj_hidden_dim=512,
                          proj_dim=128, pred_hidden_dim=0)


def bench_one(size: int, expand_res: int, batch: int, iterations: int, repeats: int) -> tuple[float, float]:
  """(compile + first run seconds, median images/s) of one configuration."""
  settings = cc.CamSettings(iterations=iterations, expand_res=expand_res)
  net = cc.cam_network(_resnet18_spec(), settings)
  images = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3), jnp.float32)
  variables = models.random_variables(net, images)
  start = time.perf_counter()
  jax.block_until_ready(cc.contracam(net, variables, images, settings))
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(cc.contracam(net, variables, images, settings))
    times.append(time.perf_counter() - start)
  return first, batch / statistics.median(times)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--quick", action="store_true", help="96 px configurations only")
  args = parser.parse_args(argv)
  configs = [c for c in CONFIGS if not args.quick or c[0] == 96]
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, ResNet-18 width 64, "
        f"median of {args.repeats}")
  print(f"{'size':>5} {'expand':>6} {'batch':>5} {'T':>3} {'compile+1st s':>14} "
        f"{'img/s':>8} {'PyTorch img/s':>14} {'ratio':>6}")
  for size, expand_res, batch, iterations in configs:
    first, ips = bench_one(size, expand_res, batch, iterations, args.repeats)
    ref = PYTORCH_IMG_PER_S.get((size, expand_res, batch, iterations))
    ref_s = f"{ref:14.2f}" if ref else f"{'-':>14}"
    ratio = f"{ips / ref:6.2f}" if ref else f"{'-':>6}"
    print(f"{size:5d} {expand_res:6d} {batch:5d} {iterations:3d} {first:14.1f} {ips:8.2f} {ref_s} {ratio}",
          flush=True)


if __name__ == "__main__":
  main()
