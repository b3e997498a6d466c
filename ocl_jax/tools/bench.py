"""Throughput benchmark (not a test): train steps, ContraCAM, input pipeline, feature extraction.

    python -m ocl_jax.tools.bench                 # every case, demo size -> workdirs/bench.json
    python -m ocl_jax.tools.bench --quick         # tiny sizes: a smoke test of every case
    python -m ocl_jax.tools.bench --cases=train,contracam --repeats=7 --out=/tmp/bench.json
    python -m ocl_jax.tools.bench --profile=moco        # + where the time goes, per XLA op

Why: a step time alone says little on a CPU. Every case reports images/s
(median of --repeats timed repeats after --warmup untimed ones, compile
excluded), the FLOPs one call implies (XLA's cost analysis of the compiled
function, else an analytic count) and the fraction of this device's measured
peak (a large float32 matmul timed in the same run). When PyTorch is installed
(`pip install ".[reference]"`) the same network, batch and step, and ContraCAM
as the official code computes it, are timed in plain PyTorch in the same run
(`ocl_jax/tools/torch_reference.py`) and the ratio is printed.

Train steps are the project's own: `train.make_context` / `create_train_state`
/ `train_step`, pmapped with donated state and replicated with
`parallel.replicate` as `train_and_evaluate` does, built from configs/demo.py
(or --config) with per-case overrides, and fed device-resident synthetic
batches (random pixels, OA-crop boxes, BG-mixup masks), so they time the step
alone; the `input` cases time the input pipeline alone (the NumPy reader for
`scenes`, tf.data for TFDS datasets and folders) and the step fed by it, with the
time the loop waits for input.

On a CPU the CLI first splits the host into one JAX device per core
(`parallel.use_cpu_devices`; --cpu_devices=-1 keeps one device): the step is pmapped
over them and ContraCAM also runs split over them (`@pmap` cases).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import functools
import glob
import json
import math
import os
import pathlib
import platform
import re
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ocl_jax import methods, parallel
from ocl_jax.train.device_idle import DeviceIdleMeter

REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "demo.py"

# Train cases: config overrides on top of the base config (dotted keys).
TRAIN_CASES: dict[str, dict[str, Any]] = {
    "moco": {},
    "byol": {"method": "byol"},
    "simclr": {"method": "simclr"},
    "moco+oacrop": {"object_aware.crop": True},
    "moco+bgmix": {"bg_mixup.enabled": True},
    "moco+mixup": {"mix.kind": "mixup"},
    "moco+sgcl": {
        "saliency.enabled": True,
        "saliency.coverage_masks": "",
    },  # if config.saliency exists
    "moco+bf16": {"model.dtype": "bfloat16"},
}
# ContraCAM cases: (iterations T, expand_res).
CAM_CASES: dict[str, tuple[int, int]] = {
    "contracam_T1_x1": (1, 1),
    "contracam_T10_x1": (10, 1),
    "contracam_T1_x2": (1, 2),
    "contracam_T10_x2": (10, 2),
}
GROUPS = ("peak", "train", "contracam", "input", "features")
# Compute the step of these train cases in plain PyTorch too (the others share moco's model work).
REFERENCE_METHODS = {"moco": "moco", "byol": "byol", "simclr": "simclr"}


@dataclasses.dataclass
class Result:
  """One benchmarked case."""

  name: str
  group: str
  images_per_s: float
  seconds_per_call: float  # median over repeats
  images_per_call: int
  times: list[float]  # every timed repeat, seconds per call
  compile_s: float | None = None
  flops_per_call: float | None = None
  flops_source: str = "none"  # 'xla' (cost analysis of the compiled function) or 'analytic'
  gflops_per_s: float | None = None
  peak_fraction: float | None = None
  reference_images_per_s: float | None = None  # plain PyTorch, same run
  ratio: float | None = None  # images_per_s / reference_images_per_s
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------
# Timing and FLOPs.


@dataclasses.dataclass
class Timer:
  """A timed call: `call()` starts the work, `sync(out)` waits for it."""

  call: Callable[[], Any]
  sync: Callable[[Any], Any] = jax.block_until_ready
  calls_per_repeat: int = 1


def time_interleaved(timers: list[Timer], repeats: int, warmup: int) -> list[list[float]]:
  """Seconds per call of each timer's timed repeats, the timers taking turns repeat by repeat
  (so a JAX case and its PyTorch reference see the same machine load). A repeat dispatches
  `calls_per_repeat` calls back to back and waits once at the end: no host round trip
  between calls."""
  for t in timers:
    for _ in range(warmup):
      t.sync(t.call())
  times: list[list[float]] = [[] for _ in timers]
  for _ in range(repeats):
    for t, out_times in zip(timers, times):
      start = time.perf_counter()
      out = None
      for _ in range(t.calls_per_repeat):
        out = t.call()
      t.sync(out)
      out_times.append((time.perf_counter() - start) / t.calls_per_repeat)
  return times


def time_calls(
    call: Callable[[], Any], repeats: int, warmup: int, calls_per_repeat: int = 1
) -> list[float]:
  """Seconds per call of each timed repeat of one JAX call (see time_interleaved)."""
  return time_interleaved([Timer(call, calls_per_repeat=calls_per_repeat)], repeats, warmup)[0]


def xla_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a compiled function from XLA's cost analysis, None if unavailable."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops is not None and flops > 0 else None


def conv_out(size: int, kernel: int, stride: int) -> int:
  return (size + 2 * (kernel // 2) - kernel) // stride + 1


def _valid_taps(size: int, kernel: int, stride: int) -> int:
  """Kernel taps inside the (unpadded) input, summed over one axis's output positions."""
  pad = kernel // 2
  return sum(
      sum(0 <= o * stride - pad + t < size for t in range(kernel))
      for o in range(conv_out(size, kernel, stride))
  )


def resnet_forward_flops(
    arch: str,
    width: int,
    small_stem: bool,
    size: int,
    expand_res: int = 1,
    head: tuple[int, int] | None = None,
) -> float:
  """Analytic FLOPs (2 per multiply-add, padding excluded as XLA counts them) of one image's
  forward: every convolution, the RGB stem as the 4 channels ocl_jax.models feeds it, and
  the projector's two dense layers when `head` = (hidden, out) is given. BN, ReLU and
  pooling are not counted."""
  from ocl_jax.models import ARCHITECTURES, block_stride

  stages, block = ARCHITECTURES[arch]
  flops = 0.0

  def conv(s, k, stride, cin, cout):
    nonlocal flops
    flops += 2.0 * _valid_taps(s, k, stride) ** 2 * cin * cout
    return conv_out(s, k, stride)

  if small_stem:
    s = conv(size, 3, 1, 4, width)
  else:
    s = conv(size, 7, 2, 4, width)
    s = conv_out(s, 3, 2)  # max-pool
  cin = width
  for stage, n in enumerate(stages):
    f = width * 2**stage
    for b in range(n):
      stride = block_stride(stage, b, expand_res)
      if block == "basic":
        out = f
        o = conv(s, 3, stride, cin, f)
        conv(o, 3, 1, f, f)
      else:
        out = 4 * f
        conv(s, 1, 1, cin, f)
        o = conv(s, 3, stride, f, f)
        conv(o, 1, 1, f, out)
      if stride != 1 or cin != out:
        conv(s, 1, stride, cin, out)
      s, cin = o, out
  if head is not None:
    hidden, out_dim = head
    flops += 2.0 * cin * hidden + 2.0 * hidden * out_dim
  return flops


def _finish(r: Result, peak_flops: float | None) -> Result:
  if r.flops_per_call:
    r.gflops_per_s = r.flops_per_call / r.seconds_per_call / 1e9
    if peak_flops:
      r.peak_fraction = r.flops_per_call / r.seconds_per_call / peak_flops
  return r


def _result(name: str, group: str, times: list[float], images: int, **kw) -> Result:
  med = statistics.median(times)
  return Result(
      name=name,
      group=group,
      images_per_s=images / med,
      seconds_per_call=med,
      images_per_call=images,
      times=[round(t, 6) for t in times],
      **kw,
  )


def bench_peak(size: int, repeats: int, warmup: int) -> Result:
  """A (size x size) @ (size x size) float32 matmul: the device's attainable peak."""
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.standard_normal((size, size)), jnp.float32) for _ in range(2))
  start = time.perf_counter()
  compiled = jax.jit(jnp.dot).lower(a, b).compile()
  compile_s = time.perf_counter() - start
  times = time_calls(lambda: compiled(a, b), repeats, warmup)
  flops = 2.0 * size**3
  r = _result(
      f"matmul_{size}",
      "peak",
      times,
      0,
      compile_s=compile_s,
      flops_per_call=flops,
      flops_source="analytic",
  )
  r.images_per_s = 0.0
  r.extra["xla_flops"] = xla_flops(compiled)
  return _finish(r, flops / r.seconds_per_call)


# ----------------------------------------------------------------------------
# Configs and synthetic batches.


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
  from ocl_jax.configuration import load_sibling_config

  path = pathlib.Path(path).resolve()
  if not path.is_file():
    raise FileNotFoundError(f"config {path} not found: run from a source checkout or pass --config")
  return load_sibling_config(str(path), path.name)


def set_dotted(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


def base_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """The base config (demo) with the size options applied; --quick shrinks everything."""
  c = load_config(args.config)
  c.view_pictures = 0
  for item in args.set:
    key, sep, text = item.partition("=")
    if not sep:
      raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. dataset.name=scenes/small")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text  # a plain string
    set_dotted(c, key, value)
  if args.quick or args.image_size:
    c.dataset.train_image_size = 0  # the size options set the training batches' side too
  if args.quick:
    c.dataset.image_size = c.augment.crop_size = 32
    c.model.arch, c.model.width, c.model.small_stem = "resnet10", 4, True
    c.model.proj_dim, c.model.pred_hidden_dim = 8, 16
    c.batch_size, c.moco.queue_size = 8, 32
    if "saliency" in c:
      c.saliency.resolution, c.saliency.map_size, c.saliency.expand_res = 16, 4, 1
  if args.batch_size:
    c.batch_size = args.batch_size
  if args.image_size:
    c.dataset.image_size = c.augment.crop_size = args.image_size
  if args.width:
    c.model.width = args.width
  if args.arch:
    c.model.arch = args.arch
  if args.small_stem is not None:
    c.model.small_stem = args.small_stem
  if args.dtype:
    c.model.dtype = args.dtype
  if c.method == "moco" and c.moco.queue_size % c.batch_size:
    c.moco.queue_size = max(1, c.moco.queue_size // c.batch_size) * c.batch_size
  return c


def case_config(
    base: ml_collections.ConfigDict, overrides: dict[str, Any]
) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(base.to_dict())
  for k, v in overrides.items():
    set_dotted(c, k, v)
  return c


def synthetic_batch(
    config: ml_collections.ConfigDict, n_dev: int, seed: int
) -> dict[str, np.ndarray]:
  """A host batch shaped (devices, per device, ...) as the input pipeline yields it."""
  from ocl_jax.data.train_data import train_image_size

  rng = np.random.default_rng(seed)
  per, s = config.batch_size // n_dev, train_image_size(config)
  shape = (n_dev, per)
  batch = {
      "image": rng.integers(0, 256, shape + (s, s, 3), dtype=np.uint8),
      "aspect": rng.uniform(0.75, 4 / 3, shape).astype(np.float32),
      "label": rng.integers(0, 10, shape).astype(np.int32),
  }
  if config.object_aware.crop:
    k = config.object_aware.max_boxes
    xy = rng.uniform(0.0, 0.6, shape + (k, 2))
    wh = rng.uniform(0.2, 0.4, shape + (k, 2))
    batch["boxes"] = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    batch["box_valid"] = np.arange(k) < rng.integers(0, 4, shape + (1,))
  if config.bg_mixup.enabled:
    mask = np.zeros(shape + (s, s), np.uint8)
    mask[..., s // 4 : 3 * s // 4, s // 3 : 2 * s // 3] = 255
    batch["fg_mask"] = mask
  sal = config.get("saliency")
  if sal is not None and sal.enabled and sal.every_k_steps > 1:
    batch["index"] = rng.integers(0, 1000, shape).astype(np.int32)
  return batch


# ----------------------------------------------------------------------------
# Cases.


def _train_step(config: ml_collections.ConfigDict, num_examples: int = 1000):
  """(ctx, replicated state, pmapped step) exactly as train_and_evaluate builds them."""
  from ocl_jax import train
  from ocl_jax.configuration import validate_config

  validate_config(config)
  ctx = (
      train.make_context(config, 1000, 10, num_examples)
      if "saliency" in config
      else train.make_context(config, 1000, 10)
  )
  state = parallel.replicate(train.create_train_state(config.seed, config, ctx))
  p_step = jax.pmap(
      functools.partial(train.train_step, ctx=ctx), axis_name=parallel.AXIS, donate_argnums=(0,)
  )
  return ctx, state, p_step


def bench_train(
    name: str,
    config: ml_collections.ConfigDict,
    args: argparse.Namespace,
    peak: float | None,
    keep: dict[str, Any] | None = None,
    reference: tuple[str, Timer] | None = None,
) -> list[Result]:
  """The pmapped train step on device-resident batches (two, alternating), state donated;
  with `reference` (name, timer), timed in turns with it (and its Result follows).

  With `keep`, the compiled step and its state are left there for the input cases."""
  from ocl_jax.models import ModelSpec

  n_dev = jax.local_device_count()
  _, state, p_step = _train_step(config)
  batches = [_to_devices(synthetic_batch(config, n_dev, i)) for i in range(2)]
  start = time.perf_counter()
  compiled = p_step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state, "i": 0}

  def call():
    holder["state"], metrics = compiled(holder["state"], batches[holder["i"] % 2])
    holder["i"] += 1
    return metrics["loss"]

  timers = [Timer(call, calls_per_repeat=args.steps_per_repeat)]
  sal = config.get("saliency")
  views_given = name in REFERENCE_METHODS and not (sal is not None and sal.enabled)
  if views_given:  # the reference's exact work: our step on ready views, timed in the same turns
    views_call, views_compile_s = _views_given_step(config, batches)
    timers.append(Timer(views_call, calls_per_repeat=args.steps_per_repeat))
  if reference:
    timers.append(reference[1])
  times, *other_times = time_interleaved(timers, args.repeats, args.warmup)
  flops, source = xla_flops(compiled), "xla"
  if flops is not None:
    flops *= n_dev  # a pmapped program's cost analysis is one device's
  else:
    spec = ModelSpec.from_config(config)
    fwd = resnet_forward_flops(
        spec.arch,
        spec.width,
        spec.small_stem,
        config.augment.crop_size,
        head=(spec.proj_hidden_dim, spec.proj_dim),
    )
    # Forward + backward (3 forwards' worth) per online view, one forward per target view.
    method = methods.create(config)
    passes = 3 * len(method.online_views) + len(method.target_views)
    flops, source = fwd * passes * config.batch_size, "analytic"
  r = _result(
      name,
      "train",
      times,
      config.batch_size,
      compile_s=compile_s,
      flops_per_call=flops,
      flops_source=source,
  )
  r.extra["loss_finite"] = bool(np.isfinite(np.asarray(call())).all())
  r.extra["overrides"] = dict(TRAIN_CASES.get(name, {}))
  if keep is not None:
    keep.update(config=config, state=holder["state"], step=compiled)
  results = [_finish(r, peak)]
  if views_given:
    v = _result(
        f"{name}/views", "train", other_times.pop(0), config.batch_size, compile_s=views_compile_s
    )
    v.extra["note"] = "the reference's work: the step on ready views, augmentation excluded"
    results.append(v)
  if reference:
    ref_result = _with_reference(r, reference[0], other_times.pop(0))
    if views_given:
      v.reference_images_per_s = ref_result.images_per_s
      v.ratio = v.images_per_s / ref_result.images_per_s
    results.append(ref_result)
  return results


def _views_given_step(
    config: ml_collections.ConfigDict, batches: list[dict[str, jax.Array]]
) -> tuple[Callable[[], Any], float]:
  """A call of `train.update_from_views` (pmapped, state donated) on views augmented once
  beforehand: the same work as the PyTorch reference step, which is handed ready views.
  Not for SGCL configs (bench_train skips them): that step needs the online saliency."""
  from ocl_jax import train

  ctx, state, _ = _train_step(config)
  augment = jax.pmap(functools.partial(train.augment_views, ctx=ctx), axis_name=parallel.AXIS)
  views = [augment(state, b) for b in batches]
  p_update = jax.pmap(
      functools.partial(train.update_from_views, ctx=ctx),
      axis_name=parallel.AXIS,
      donate_argnums=(0,),
  )
  start = time.perf_counter()
  compiled = p_update.lower(state, batches[0], views[0]).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state, "i": 0}

  def call():
    i = holder["i"] % 2
    holder["state"], metrics = compiled(holder["state"], batches[i], views[i])
    holder["i"] += 1
    return metrics["loss"]

  return call, compile_s


def _with_reference(r: Result, name: str, times: list[float]) -> Result:
  """The reference's Result; `r` gets its images/s and the ratio."""
  t = _result(name, "reference", times, r.images_per_call)
  r.reference_images_per_s, r.ratio = t.images_per_s, r.images_per_s / t.images_per_s
  return t


def _to_devices(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  return next(parallel.prefetch_to_device(iter([batch]), 1))


def _compiled_contracam(
    net: Any, settings: Any, variables: Any, images: jax.Array, n_dev: int = 1
) -> Any:
  """ContraCAM compiled for one device (jit, as `contracam.contracam`), or split over `n_dev`
  local devices with the global batch's negatives (pmap, `axis_name`: the same maps)."""
  from ocl_jax.discovery import contracam as cc

  if n_dev == 1:
    return (
        jax.jit(functools.partial(cc.contracam_apply, net, settings))
        .lower(variables, images)
        .compile()
    )
  fn = jax.pmap(
      functools.partial(cc.contracam_apply, net, settings, axis_name=parallel.AXIS),
      axis_name=parallel.AXIS,
      in_axes=(None, 0),
  )
  return fn.lower(variables, images).compile()


def bench_contracam(
    name: str,
    iterations: int,
    expand_res: int,
    config: ml_collections.ConfigDict,
    args: argparse.Namespace,
    peak: float | None,
    reference: tuple[str, Timer] | None = None,
) -> list[Result]:
  """ContraCAM's T-step refinement, one compiled function (lax.scan), the config's model with
  random weights: on one device as `contracam.contracam` runs it, and with several local
  devices also split over them (`name`@pmap; global-batch negatives, the same maps).

  FLOPs: XLA's cost analysis counts a while loop's body once, so the T-step
  count is T times that of the T=1 function (compiled for the purpose)."""
  from ocl_jax.discovery import contracam as cc
  from ocl_jax import models

  spec = models.ModelSpec.from_config(config)
  settings = cc.CamSettings(iterations=iterations, expand_res=expand_res)
  net = cc.cam_network(spec, settings)
  b, s = config.batch_size, config.augment.crop_size
  images = jnp.asarray(np.random.default_rng(0).standard_normal((b, s, s, 3)), jnp.float32)
  variables = models.random_variables(net, images)
  fwd = resnet_forward_flops(
      spec.arch,
      spec.width,
      spec.small_stem,
      s,
      expand_res,
      head=(spec.proj_hidden_dim, spec.proj_dim),
  )
  one = _compiled_contracam(net, dataclasses.replace(settings, iterations=1), variables, images)
  flops, source = xla_flops(one), "xla"
  if flops is None:
    flops, source = fwd * b, "analytic"
  n_dev = jax.local_device_count()
  variants = []
  for devices in sorted({1, n_dev}):
    if b % devices:
      continue
    x = images if devices == 1 else images.reshape((devices, b // devices) + images.shape[1:])
    start = time.perf_counter()
    compiled = (
        one
        if iterations == 1 and devices == 1
        else _compiled_contracam(net, settings, variables, x, devices)
    )
    variants.append(
        (
            devices,
            time.perf_counter() - start,
            Timer(functools.partial(lambda c, x: c(variables, x)["mask"], compiled, x)),
        )
    )
  timers = [v[2] for v in variants] + ([reference[1]] if reference else [])
  all_times = time_interleaved(timers, args.repeats, args.warmup)
  results = []
  for (devices, compile_s, _), times in zip(variants, all_times):
    r = _result(
        name if devices == 1 else f"{name}@pmap",
        "contracam",
        times,
        b,
        compile_s=compile_s,
        flops_per_call=flops * iterations,
        flops_source=source,
    )
    r.extra.update(
        iterations=iterations,
        expand_res=expand_res,
        devices=devices,
        analytic_forward_flops_per_iteration=fwd * b,
    )
    results.append(_finish(r, peak))
  if reference:
    ref = _with_reference(results[0], reference[0], all_times[-1])
    for r in results[1:]:
      r.reference_images_per_s, r.ratio = ref.images_per_s, r.images_per_s / ref.images_per_s
    results.append(ref)
  return results


def bench_features(
    config: ml_collections.ConfigDict, args: argparse.Namespace, peak: float | None
) -> Result:
  """Frozen-encoder feature extraction as evaluation runs it (pmapped forward + host copy)."""
  from ocl_jax import models
  from ocl_jax.evaluation import evaluate

  spec = models.ModelSpec.from_config(config)
  stages, block = models.ARCHITECTURES[spec.arch]
  module = models.ResNet(
      stages, block, spec.width, spec.small_stem, axis_name=None, dtype=spec.dtype
  )
  n_dev = jax.local_device_count()
  b, s = config.batch_size * 2, config.augment.crop_size
  b -= b % n_dev
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)
  variables = models.random_variables(module, jnp.zeros((1, s, s, 3)))
  batch = {"image": images, "label": np.zeros((b,), np.int32), "valid": np.ones((b,), np.int32)}
  start = time.perf_counter()
  evaluate.extract_features(module, variables, iter([batch]), desc="compile")
  compile_s = time.perf_counter() - start

  def call():
    return evaluate.extract_features(
        module, variables, iter([batch] * args.steps_per_repeat), desc="bench"
    )[0]

  times = [t / args.steps_per_repeat for t in time_calls(call, args.repeats, args.warmup)]
  fwd_jit = jax.jit(lambda v, x: module.apply(v, x, train=False).mean(axis=(1, 2)))
  flops = xla_flops(fwd_jit.lower(variables, jnp.zeros((b, s, s, 3))).compile())
  source = "xla"
  if flops is None:
    flops, source = resnet_forward_flops(spec.arch, spec.width, spec.small_stem, s) * b, "analytic"
  r = _result(
      "features",
      "features",
      times,
      b,
      compile_s=compile_s,
      flops_per_call=flops,
      flops_source=source,
  )
  return _finish(r, peak)


def bench_input(
    config: ml_collections.ConfigDict,
    args: argparse.Namespace,
    peak: float | None,
    kept: dict[str, Any] | None = None,
) -> list[Result]:
  """The input pipeline alone (host batches/s: the NumPy reader for `scenes`, tf.data for TFDS
  datasets and folders), then the moco step fed by it through
  prefetch_to_device as train_and_evaluate feeds it, with the time the loop spent waiting
  in next(batches). `kept`: the moco case's compiled step and state, reused if its config fits."""
  from ocl_jax import parallel
  from ocl_jax.data import train_data

  c = ml_collections.ConfigDict(config.to_dict())
  if args.dataset:
    c.dataset.name = args.dataset
  if args.data_dir:
    c.dataset.data_dir = args.data_dir
  data = train_data.create_train_data(c)
  n = max(args.input_batches, 2)
  it = data.iterate(0)
  start = time.perf_counter()
  next(it)
  first_s = time.perf_counter() - start
  times = []
  for _ in range(n):
    start = time.perf_counter()
    next(it)
    times.append(time.perf_counter() - start)
  host = _result("input_pipeline", "input", times, c.batch_size, compile_s=first_s)
  host.extra.update(
      dataset=c.dataset.name,
      note="host input alone: read, decode, resize, batch (augmentation is in the step)",
  )

  if kept and kept.get("step") is not None:
    state, step = kept["state"], kept["step"]
  else:
    _, state, p_step = _train_step(config)
    step = p_step.lower(
        state, _to_devices(synthetic_batch(config, jax.local_device_count(), 0))
    ).compile()
  batches = parallel.prefetch_to_device(it, c.prefetch_to_device)
  for _ in range(max(args.warmup, 1)):
    state, metrics = step(state, next(batches))
  jax.block_until_ready(metrics)
  wait, steps = 0.0, n
  with DeviceIdleMeter() as idle:
    start = time.perf_counter()
    for _ in range(steps):
      t0 = time.perf_counter()
      batch = next(batches)
      wait += time.perf_counter() - t0
      state, metrics = idle.run_step(step, state, batch)
    jax.block_until_ready(metrics)
    total = time.perf_counter() - start
    idle_s = idle.take(flush=True)
  if kept is not None:
    kept["state"] = state
  fed = _result("moco+input", "input", [total / steps], c.batch_size)
  fed.extra.update(
      input_wait_s_per_step=wait / steps,
      input_wait_fraction=wait / total,
      device_idle_fraction=idle_s / total,
      dataset=c.dataset.name,
      prefetch_to_device=c.prefetch_to_device,
      note=f"moco step fed by the input pipeline; mean of {steps} steps",
  )
  return [_finish(host, peak), _finish(fed, peak)]


# ----------------------------------------------------------------------------
# PyTorch reference (same run).


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def _torch_sync(out: Any) -> float:
  """Eager PyTorch on CPU returns when the work is done; reading a value makes sure."""
  return float(out.float().sum().item())


def reference_train(
    method: str, config: ml_collections.ConfigDict, args: argparse.Namespace
) -> tuple[str, Timer]:
  """The same network, batch and step in eager PyTorch on ready views (the official code's
  augmentation runs in data-loader workers), timed like the JAX step."""
  import torch
  from ocl_jax.tools import torch_reference as tr
  from ocl_jax.models import ModelSpec

  spec = ModelSpec.from_config(case_config(config, {"method": method}))
  net = tr.build_net(
      spec.arch,
      spec.width,
      spec.small_stem,
      spec.proj_hidden_dim,
      spec.proj_dim,
      spec.pred_hidden_dim,
  )
  step = tr.TrainStep(
      method,
      net,
      lr=config.optim.base_lr * config.batch_size / 256,
      momentum=config.optim.momentum,
      weight_decay=config.optim.weight_decay,
      temperature=getattr(methods.create(config), "temperature", 1.0),
      ema=methods.create(config).ema_momentum,
      queue_size=config.moco.queue_size,
  )
  b, s = config.batch_size, config.augment.crop_size
  gen = torch.Generator().manual_seed(0)
  x1, x2 = torch.randn(b, 3, s, s, generator=gen), torch.randn(b, 3, s, s, generator=gen)
  return f"torch:{method}", Timer(lambda: step(x1, x2), _torch_sync, args.steps_per_repeat)


def reference_contracam(
    iterations: int, expand_res: int, config: ml_collections.ConfigDict, args: argparse.Namespace
) -> tuple[str, Timer]:
  """ContraCAM as the official code: T x (forward + loss.backward() through the network)."""
  import torch
  from ocl_jax.tools import torch_reference as tr
  from ocl_jax.models import ModelSpec

  del args
  spec = ModelSpec.from_config(config)
  net = tr.build_net(
      spec.arch,
      spec.width,
      spec.small_stem,
      spec.proj_hidden_dim,
      spec.proj_dim,
      expand_res=expand_res,
  )
  b, s = config.batch_size, config.augment.crop_size
  images = torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(0))
  return (
      f"torch:contracam_T{iterations}_x{expand_res}",
      Timer(lambda: tr.contracam(net, images, iterations), _torch_sync),
  )


# ----------------------------------------------------------------------------
# Profile: where a case's time goes, per XLA op.


def profile_train(
    config: ml_collections.ConfigDict, steps: int, trace_dir: str, top: int = 25
) -> dict[str, Any]:
  """Trace `steps` train steps with jax.profiler: per-op time from the trace's XLA op events,
  each op labelled from the optimised HLO (its JAX source and a category); plus the
  on-device augmentation (train.augment_views) timed alone."""
  from ocl_jax import train

  n_dev = jax.local_device_count()
  ctx, state, p_step = _train_step(config)
  batch = _to_devices(synthetic_batch(config, n_dev, 0))
  compiled = p_step.lower(state, batch).compile()
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  jax.profiler.start_trace(trace_dir)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  wall = time.perf_counter() - start
  jax.profiler.stop_trace()
  summary = summarize_trace(trace_dir, compiled.as_text(), wall, steps, top)
  views = jax.pmap(
      lambda st, b: tuple(train.augment_views(st, b, ctx)[:2]), axis_name=parallel.AXIS
  )
  aug = time_calls(lambda: views(state, batch), max(steps, 3), 1)
  summary["augmentation_alone_ms"] = 1e3 * statistics.median(aug)
  return summary


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\(")


def hlo_index(hlo_text: str) -> dict[str, tuple[str, list[str]]]:
  """HLO instruction name -> (opcode[:fusion kind][(convolution)], the JAX op_names it
  computes): a fusion's are those of the instructions of the computation it calls, and
  '(convolution)' marks a fusion that holds a convolution."""
  comp_ops: dict[str, list[str]] = {}
  comp_convs: set[str] = set()
  instrs: dict[str, tuple[str, str, str | None]] = {}
  current = None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and "=" not in line.split("{")[0]:
      current = header.group(1)
      comp_ops[current] = []
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, opcode = m.groups()
    op_name = re.search(r'op_name="([^"]*)"', line)
    kind = re.search(r"kind=(k\w+)", line)
    calls = re.search(r"calls=%?([\w.\-]+)", line)
    if op_name and current is not None:
      comp_ops[current].append(op_name.group(1))
    if opcode == "convolution" and current is not None:
      comp_convs.add(current)
    instrs[name] = (
        opcode + (f":{kind.group(1)}" if kind else ""),
        op_name.group(1) if op_name else "",
        calls.group(1) if calls else None,
    )
  return {
      name: (
          opcode + ("(convolution)" if called in comp_convs else ""),
          ([own] if own else []) + comp_ops.get(called, []),
      )
      for name, (opcode, own, called) in instrs.items()
  }


COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def op_category(op_names: list[str], opcode: str = "") -> str:
  """Where an op belongs: cross-device collectives, the network's forward / backward
  (convolutions, BatchNorm, pooling, other) or the rest of the step (augmentation, loss,
  optimiser, probe)."""
  if opcode.startswith(COLLECTIVES):
    return "cross-device collectives (BatchNorm statistics, gradients)"
  if not op_names and "convolution" in opcode:
    return "network backward: convolutions"  # kernel gradients: XLA's rewrite drops their source
  if not op_names:
    return "unattributed"

  def cat(n: str) -> str:
    if "ContrastiveNet" not in n:
      return "rest of step (augmentation, loss, optimiser, probe)"
    part = "backward" if "transpose(" in n else "forward"
    if "conv_general_dilated" in n or "/dot_general" in n and "/encoder/" in n:
      return f"network {part}: convolutions"
    if "BatchNorm" in n or "/bn" in n:
      return f"network {part}: BatchNorm"
    if "reduce_window" in n or "max_pool" in n or "select_and" in n:
      return f"network {part}: max-pool"
    return f"network {part}: other (ReLU, residual adds, heads)"

  cats = [cat(n) for n in op_names]
  conv = [c for c in cats if c.endswith("convolutions")]
  if conv:
    return max(set(conv), key=conv.count)
  return max(set(cats), key=cats.count)


def summarize_trace(
    trace_dir: str, hlo_text: str, wall: float, steps: int, top: int
) -> dict[str, Any]:
  paths = sorted(
      glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime
  )
  if not paths:
    return {"error": f"no trace written under {trace_dir}"}
  data = jax.profiler.ProfileData.from_file(paths[-1])
  index = hlo_index(hlo_text)
  per_op: dict[str, float] = {}
  for plane in data.planes:
    if not plane.name.startswith("/host:CPU"):
      continue
    for line in plane.lines:
      if line.name == "python":
        continue
      for ev in line.events:
        if ev.name in index:
          per_op[ev.name] = per_op.get(ev.name, 0.0) + ev.duration_ns * 1e-9
  total = sum(per_op.values())
  by_cat: dict[str, float] = {}
  rows = []
  for name, secs in sorted(per_op.items(), key=lambda kv: -kv[1]):
    opcode, op_names = index[name]
    cat = op_category(op_names, opcode)
    by_cat[cat] = by_cat.get(cat, 0.0) + secs
    source = max(set(op_names), key=op_names.count) if op_names else ""
    rows.append(
        {
            "op": name,
            "kind": opcode,
            "category": cat,
            "ms_per_step": 1e3 * secs / steps,
            "share": secs / total if total else 0.0,
            "source": source[-160:],
        }
    )
  return {
      "wall_ms_per_step": 1e3 * wall / steps,
      "op_ms_per_step": 1e3 * total / steps,
      "note": f"op times from the trace, summed over threads: ops overlap, and with "
      f"{jax.local_device_count()} devices each runs its own copy of every op; shares "
      f"are of the op total",
      "by_category": {
          k: {"ms_per_step": 1e3 * v / steps, "share": v / total if total else 0.0}
          for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])
      },
      "top_ops": rows[:top],
      "trace_dir": trace_dir,
  }


# ----------------------------------------------------------------------------
# Environment, output.


def machine_info() -> dict[str, Any]:
  import flax
  import optax

  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      names = [s.split(":", 1)[1].strip() for s in f if s.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  info = {
      "date": datetime.date.today().isoformat(),
      "python": platform.python_version(),
      "platform": platform.platform(),
      "cpu": cpu,
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else "",
      "flax": flax.__version__,
      "optax": optax.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.local_devices()],
      "device_kind": jax.devices()[0].device_kind,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
      "load_average": _load_average(),
  }
  try:
    import jaxlib

    info["jaxlib"] = jaxlib.__version__
  except (ImportError, AttributeError):
    pass
  if torch_available():
    import torch

    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
  return info


def _load_average() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def _fmt(x: float | None, spec: str) -> str:
  return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def table(results: list[Result], config_line: str) -> str:
  """Markdown table of the results."""
  lines = [
      config_line,
      "",
      "| case | img/s | ms/call | GFLOP/call | GFLOP/s | % of peak | PyTorch img/s | ratio "
      "| notes |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    if r.group == "reference":
      continue
    notes = []
    if "device_idle_fraction" in r.extra:
      notes.append(
          f"devices idle {100 * r.extra['device_idle_fraction']:.1f}% of the time (the loop "
          f"blocked on input {100 * r.extra['input_wait_fraction']:.1f}%)"
      )
    if r.flops_source == "analytic":
      notes.append("analytic FLOPs")
    if r.group == "peak":
      notes.append("float32 matmul: the peak")
    if "note" in r.extra:
      notes.append(r.extra["note"])
    ips = "–" if r.group == "peak" else _fmt(r.images_per_s, ".1f")
    lines.append(
        f"| {r.name} | {ips} | {_fmt(1e3 * r.seconds_per_call, '.1f')} | "
        f"{_fmt(r.flops_per_call and r.flops_per_call / 1e9, '.2f')} | "
        f"{_fmt(r.gflops_per_s, '.1f')} | "
        f"{_fmt(r.peak_fraction and 100 * r.peak_fraction, '.1f')} | "
        f"{_fmt(r.reference_images_per_s, '.1f')} | "
        f"{_fmt(r.ratio, '.2f') + '×' if r.ratio is not None else '–'} | {'; '.join(notes)} |"
    )
  return "\n".join(lines)


def select(
    cases: str, sgcl_available: bool
) -> tuple[list[str], list[str], bool, bool, bool, dict[str, str]]:
  """(train case names, ContraCAM case names, peak?, input?, features?, skipped) from --cases."""
  wanted = [w.strip() for w in cases.split(",") if w.strip()]
  if "all" in wanted:
    wanted = list(GROUPS)
  train = [n for n in TRAIN_CASES if "train" in wanted or n in wanted]
  cams = [n for n in CAM_CASES if "contracam" in wanted or n in wanted]
  unknown = [w for w in wanted if w not in GROUPS and w not in TRAIN_CASES and w not in CAM_CASES]
  if unknown:
    raise SystemExit(
        f"unknown --cases {unknown}; groups {GROUPS}, train cases {list(TRAIN_CASES)}, "
        f"ContraCAM cases {list(CAM_CASES)}"
    )
  skipped = {}
  if "moco+sgcl" in train and not sgcl_available:
    skipped["moco+sgcl"] = "the config has no `saliency` block (SGCL not in this version)"
    print(f"note: moco+sgcl skipped: {skipped['moco+sgcl']}")
    train.remove("moco+sgcl")
  return train, cams, "peak" in wanted, "input" in wanted, "features" in wanted, skipped


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
      "--cases", default="all", help=f"comma list of groups {GROUPS} and/or case names, or 'all'"
  )
  p.add_argument(
      "--config", default=str(DEFAULT_CONFIG), help="base config (default configs/demo.py)"
  )
  p.add_argument("--batch_size", type=int, default=0, help="global batch (default: the config's)")
  p.add_argument(
      "--image_size", type=int, default=0, help="image and crop side (default: config's)"
  )
  p.add_argument(
      "--set",
      action="append",
      default=[],
      metavar="KEY=VALUE",
      help="override a config field (dotted key; repeatable), e.g. the data paths of "
      "configs/in9.py, which the synthetic-batch cases never read",
  )
  p.add_argument("--width", type=int, default=0, help="ResNet width (default: config's)")
  p.add_argument("--arch", default="", help="resnet10/18/34/50 (default: config's)")
  p.add_argument("--small_stem", type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
  p.add_argument(
      "--dtype",
      default="",
      choices=["", "float32", "bfloat16"],
      help="model.dtype of every case (moco+bf16 always runs bfloat16)",
  )
  p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
  p.add_argument(
      "--steps_per_repeat",
      type=int,
      default=3,
      help="train steps dispatched back to back per timed repeat",
  )
  p.add_argument("--peak_size", type=int, default=2048, help="side of the peak matmul")
  p.add_argument("--dataset", default="", help="input cases: TFDS name (default: the config's)")
  p.add_argument("--data_dir", default="", help="input cases: TFDS data dir")
  p.add_argument("--input_batches", type=int, default=20, help="input cases: batches timed")
  p.add_argument(
      "--cpu_devices",
      type=int,
      default=0,
      help="split the CPU into this many JAX devices before JAX starts (0: one per "
      "core that divides the batch; -1: leave XLA_FLAGS alone); see parallel.use_cpu_devices",
  )
  p.add_argument(
      "--reference",
      default="auto",
      choices=["auto", "on", "off"],
      help="PyTorch reference in the same run (auto: when torch is importable)",
  )
  p.add_argument("--profile", default="", help="a train case to profile per XLA op (e.g. moco)")
  p.add_argument("--profile_steps", type=int, default=3)
  p.add_argument("--out", default="workdirs/bench.json", help="JSON output path")
  p.add_argument("--table", default="", help="also write the Markdown table here")
  p.add_argument(
      "--quick",
      action="store_true",
      help="tiny sizes (ResNet-10 width 4, 32 px, batch 8), 1 repeat: a smoke test",
  )
  args = p.parse_args(argv)
  if args.quick:
    args.repeats, args.warmup, args.steps_per_repeat = 1, 1, 1
    args.peak_size = min(args.peak_size, 256)
    args.input_batches = min(args.input_batches, 2)
    args.dataset = args.dataset or "scenes/tiny"
  return args


def run(args: argparse.Namespace) -> dict[str, Any]:
  if "torch" not in sys.modules:
    prepare_environment()
  base = base_config(args)
  train_names, cam_names, do_peak, do_input, do_features, skipped = select(
      args.cases, "saliency" in base
  )
  ref = args.reference == "on" or args.reference == "auto" and torch_available()
  if args.reference == "on" and not torch_available():
    raise SystemExit("--reference=on needs PyTorch: pip install '.[reference]'")
  info = machine_info()
  size_line = (
      f"{base.model.arch} width {base.model.width}"
      f"{' small stem' if base.model.small_stem else ''}, "
      f"{base.augment.crop_size} px, batch {base.batch_size}, {jax.local_device_count()} "
      f"{jax.default_backend()} device(s); median of {args.repeats} after {args.warmup} warm-up"
  )
  print(f"jax {info['jax']} on {info['cpu']} ({info['cpu_count']} cores); {size_line}", flush=True)
  results: list[Result] = []

  def report(r: Result) -> Result:
    results.append(r)
    extra = ""
    if r.peak_fraction is not None:
      extra = f", {_fmt(r.gflops_per_s, '.1f')} GFLOP/s = {100 * r.peak_fraction:.1f}% of peak"
    what = "" if r.group == "peak" else f"{r.images_per_s:9.1f} img/s "
    if r.ratio is not None:
      extra += f"; {r.ratio:.2f}x PyTorch"
    print(f"  {r.name:22s} {what}{1e3 * r.seconds_per_call:9.1f} ms/call{extra}", flush=True)
    return r

  peak = None
  if do_peak or train_names or cam_names or do_features:
    peak_r = report(bench_peak(args.peak_size, max(args.repeats, 3), max(args.warmup, 1)))
    peak = peak_r.gflops_per_s * 1e9
  kept: dict[str, Any] = {}
  for name in train_names:
    config = case_config(base, TRAIN_CASES[name])
    timer = (
        reference_train(REFERENCE_METHODS[name], config, args)
        if ref and name in REFERENCE_METHODS
        else None
    )
    for r in bench_train(name, config, args, peak, kept if name == "moco" else None, timer):
      report(r)
  for name in cam_names:
    iterations, expand_res = CAM_CASES[name]
    timer = reference_contracam(iterations, expand_res, base, args) if ref else None
    for r in bench_contracam(name, iterations, expand_res, base, args, peak, timer):
      report(r)
  if do_features:
    report(bench_features(base, args, peak))
  if do_input:
    for r in bench_input(base, args, peak, kept):
      report(r)
  kept.clear()
  profile = None
  if args.profile:
    if args.profile not in TRAIN_CASES:
      raise SystemExit(f"--profile must be a train case, one of {list(TRAIN_CASES)}")
    trace_dir = tempfile.mkdtemp(prefix="ocl_bench_trace_")
    profile = profile_train(
        case_config(base, TRAIN_CASES[args.profile]), args.profile_steps, trace_dir
    )
    print(format_profile(args.profile, profile), flush=True)
  info["load_average_end"] = _load_average()
  text = table(results, f"{size_line}; {info['cpu']}, jax {info['jax']}, {info['date']}")
  print("\n" + text, flush=True)
  out = {
      "machine": info,
      "args": vars(args),
      "config": {
          "arch": base.model.arch,
          "width": base.model.width,
          "small_stem": base.model.small_stem,
          "image_size": base.augment.crop_size,
          "batch_size": base.batch_size,
          "dtype": base.model.get("dtype", "float32"),
      },
      "peak_gflops": peak / 1e9 if peak else None,
      "results": [dataclasses.asdict(r) for r in results],
      "skipped": skipped,
      "profile": profile,
      "table": text,
  }
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
    print(f"wrote {args.out}")
  if args.table:
    with open(args.table, "w") as f:
      f.write(text + "\n")
  return out


def format_profile(case: str, profile: dict[str, Any]) -> str:
  if "error" in profile:
    return f"profile of {case}: {profile['error']}"
  lines = [
      f"\nProfile of {case}: {profile['wall_ms_per_step']:.1f} ms/step wall, "
      f"{profile['op_ms_per_step']:.1f} ms/step in XLA ops ({profile['note']}); the "
      f"augmentation alone (train.augment_views): {profile['augmentation_alone_ms']:.1f} ms",
      "| category | ms/step | share |",
      "|---|---|---|",
  ]
  for k, v in profile["by_category"].items():
    lines.append(f"| {k} | {v['ms_per_step']:.1f} | {100 * v['share']:.1f}% |")
  lines += ["", "| op | kind | ms/step | share | JAX source |", "|---|---|---|---|---|"]
  for row in profile["top_ops"]:
    lines.append(
        f"| {row['op']} | {row['kind']} | {row['ms_per_step']:.2f} | "
        f"{100 * row['share']:.1f}% | {row['source'][-90:]} |"
    )
  return "\n".join(lines)


def prepare_environment() -> dict[str, str]:
  """Process settings the timings depend on, applied before PyTorch / TensorFlow load.

  OMP_WAIT_POLICY=PASSIVE (unless set): PyTorch's OpenMP threads otherwise spin
  at every parallel region's barrier; on a machine whose cores are shared with
  other work a descheduled spinner stalls each of the step's ~500 regions
  (measured on the 2-core development machine under load: torch's MoCo step
  7x slower with the default policy, a tiny step 2.2 s instead of 40 ms).
  Passive waiting is torch's best case there, so the reference is not handicapped.
  """
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return {k: os.environ.get(k, "") for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "XLA_FLAGS")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  prepare_environment()
  if args.cpu_devices >= 0:
    parallel.use_cpu_devices(args.cpu_devices, base_config(args).batch_size)
  return run(args)


if __name__ == "__main__":
  main(sys.argv[1:])
