"""The training loop: data, the pmapped step, logging, evaluation, checkpoints, pictures.

The state and the step live in train/state.py and train/step.py; this module
runs them for `config.num_train_steps` and writes everything a run leaves.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image

from ocl_jax import (
    checkpointing,
    console,
    export,
    metric_writers,
    parallel,
    paths,
    pictures,
    preemption,
    workdir_lock,
)
from ocl_jax.configuration import save_config_json
from ocl_jax.data import eval_data, prechecks, sources, train_data
from ocl_jax.data.prefetch import BackgroundPrefetch
from ocl_jax.models import ModelSpec
from ocl_jax.train import step as step_lib
from ocl_jax.train.device_idle import DeviceIdleMeter
from ocl_jax.train.divergence import DivergenceError, DivergenceGuard
from ocl_jax.train.state import StepContext, TrainState, create_train_state, make_context
from ocl_jax.train.step import augment_views, probe_eval_step, train_step
from ocl_jax.views import augment, saliency


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'optim': {'base_lr': 0.03}} -> {'optim.base_lr': 0.03}, for the hyperparameter log."""
  flat = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      flat.update(_flatten(v, f"{prefix}{k}."))
    else:
      flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return flat


def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(config.num_epochs * steps_per_epoch)


def evaluate_probe(p_eval, state, config, ctx) -> float:
  max_batches = None if config.probe.eval_batches < 0 else config.probe.eval_batches
  correct = count = 0
  for batch in eval_data.eval_batches(config, config.dataset.eval_split, max_batches=max_batches):
    r = p_eval(state, batch)
    correct += int(r["correct"][0])
    count += int(r["count"][0])
  return correct / max(count, 1)


def write_view_pictures(
    state: TrainState,
    batch: dict[str, jax.Array],
    ctx: StepContext,
    count: int,
    workdir: str,
    writer: metric_writers.MetricWriter,
    step: int,
) -> str:
  """The first `count` images of a (device-sharded) batch as the step sees them: source with
  the OA-crop region and both crops drawn, view 1 (after BG-mixup / Mixup), view 2, mask.

  Written to WORKDIR/views.png and to TensorBoard as `views`.
  """

  def payload(st, b):
    a = augment_views(st, b, ctx)
    out = {
        "x1": augment.denormalize(a.x1),
        "x2": augment.denormalize(a.x2),
        "box1": a.crop_boxes[0],
        "box2": a.crop_boxes[1],
    }
    if a.regions is not None:
      out["regions"] = a.regions
    if a.fg_masks is not None:
      out["masks"] = a.fg_masks
    return out

  out = jax.device_get(jax.pmap(payload, axis_name=parallel.AXIS)(state, batch))
  flat = lambda x: _flat_batch(x, count)
  out = {k: flat(v) for k, v in out.items()}
  grid = pictures.views_grid(
      flat(batch["image"]),
      pictures.to_uint8(out["x1"]),
      pictures.to_uint8(out["x2"]),
      (out["box1"], out["box2"]),
      out.get("regions"),
      out.get("masks"),
  )
  return _save_picture(grid, "views", workdir, writer, step)


def _flat_batch(x: Any, count: int) -> np.ndarray:
  """(devices, per_device, ...) -> the first `count` of (devices * per_device, ...)."""
  x = np.asarray(x)
  return x.reshape((-1,) + x.shape[2:])[:count]


def _save_picture(
    grid: np.ndarray, name: str, workdir: str, writer: metric_writers.MetricWriter, step: int
) -> str:
  """WORKDIR/<name>.png and TensorBoard image `name`, from process 0; returns the path."""
  path = os.path.join(workdir, f"{name}.png")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    Image.fromarray(grid).save(path)
    writer.write_images(step, {name: grid[None]})
  return path


def write_saliency_pictures(
    state: TrainState,
    batch: dict[str, jax.Array],
    ctx: StepContext,
    count: int,
    workdir: str,
    writer: metric_writers.MetricWriter,
    step: int,
) -> str:
  """SGCL: the first `count` images with their online saliency maps and the crops sampled
  from them, to WORKDIR/saliency.png and TensorBoard `saliency`."""

  def payload(st, b):
    net, variables = ctx.net, step_lib.saliency_variables(st, ctx)
    maps = saliency.compute_saliency(net, variables, b["image"], ctx.saliency, parallel.AXIS)
    return maps, augment_views(st, b, ctx, maps).crop_boxes

  maps, boxes = jax.device_get(jax.pmap(payload, axis_name=parallel.AXIS)(state, batch))
  flat = lambda x: _flat_batch(x, count)
  grid = pictures.saliency_grid(flat(batch["image"]), flat(maps), [flat(b) for b in boxes])
  return _save_picture(grid, "saliency", workdir, writer, step)


def measure_saliency_refresh(
    state: TrainState, batch: dict[str, jax.Array], ctx: StepContext, repeats: int = 3
) -> float:
  """Seconds one refresh of the online saliency takes for a global batch (median after warm-up)."""

  def refresh(st, b):
    net, variables = ctx.net, step_lib.saliency_variables(st, ctx)
    return saliency.compute_saliency(net, variables, b["image"], ctx.saliency, parallel.AXIS)

  fn = jax.pmap(refresh, axis_name=parallel.AXIS)
  jax.block_until_ready(fn(state, batch))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(state, batch))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


class NonFiniteError(FloatingPointError):
  """A step's loss or gradients were NaN/inf and config.nonfinite is 'stop'."""


def check_finite(
    host_metrics: list[dict[str, Any]],
    first_step: int,
    policy: str,
    ckpt: checkpointing.Checkpointer,
) -> int:
  """Count the non-finite steps among `host_metrics` (steps first_step, ...); with policy
  'stop' raise NonFiniteError naming the first (no checkpoint after it is written)."""
  bad = [first_step + i for i, m in enumerate(host_metrics) if float(m["nonfinite"][0]) > 0]
  if bad and policy == "stop":
    ckpt.close()
    latest = ckpt.latest_step()
    kept = (
        f"keeping the last good checkpoint (step {latest}) in {ckpt.directory}"
        if latest is not None
        else f"before any checkpoint was written (none in {ckpt.directory})"
    )
    raise NonFiniteError(
        f"non-finite loss or gradients at step {bad[0]} (steps {bad[:5]}...); the update was not "
        f"applied and the run stopped, {kept}. Lower optim.base_lr, or set "
        "--config.nonfinite=skip to skip such steps."
    )
  for s in bad:
    logging.warning("Step %d: non-finite loss or gradients; update skipped", s)
  return len(bad)


class RunTiming:
  """Where a run's time went, for WORKDIR/train_timing.json: the first step (which compiles
  the step) on its own, then the steady rate and the devices' idle share of the rest."""

  FILE = "train_timing.json"

  def __init__(self, start_step: int):
    self.start_step = start_step
    self.start = time.perf_counter()
    self.first_done: float | None = None
    self.idle_seconds = 0.0

  def first_step_done(self, metrics: Any) -> None:
    jax.block_until_ready(metrics)
    self.first_done = time.perf_counter()
    self.idle_seconds = 0.0  # the compile is not idleness

  def write(self, workdir: str, total_steps: int) -> None:
    if jax.process_index() != 0 or self.first_done is None:
      return
    end = time.perf_counter()
    rest = total_steps - self.start_step - 1
    steady = max(end - self.first_done, 1e-9)
    record = {
        "steps": total_steps - self.start_step,
        "seconds": end - self.start,
        "first_step_seconds": self.first_done - self.start,
        "steps_per_second": rest / steady if rest > 0 else None,
        "device_idle_fraction": min(self.idle_seconds / steady, 1.0) if rest > 0 else None,
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
    }
    with open(os.path.join(workdir, self.FILE), "w") as f:
      json.dump(record, f, indent=1)
    logging.info(
        "Run timing: first step (compiles) %.1f s, then %s steps/s, device idle %s",
        record["first_step_seconds"],
        "-" if rest <= 0 else f"{record['steps_per_second']:.2f}",
        "-" if rest <= 0 else f"{record['device_idle_fraction']:.2f}",
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Pretrain with `config`, resuming from the newest checkpoint in `workdir`.

  Holds the workdir's lock for the whole run, and on any error finishes the pending
  checkpoint save before the error propagates, so what is on disk is complete.
  """
  workdir, config = paths.resolve(workdir), paths.resolve_config(config)
  data = train_data.create_train_data(config)
  prechecks.check_training_inputs(config, workdir, data)  # before anything is written or compiled
  with workdir_lock.WorkdirLock(workdir, enabled=jax.process_index() == 0):
    ckpt = checkpointing.Checkpointer(workdir, ModelSpec.from_config(config), config)
    try:
      return _train(config, workdir, ckpt, data)
    except BaseException:
      ckpt.abort()
      raise


def _train(
    config: ml_collections.ConfigDict,
    workdir: str,
    ckpt: checkpointing.Checkpointer,
    data: train_data.TrainData,
) -> TrainState:
  total_steps = total_train_steps(config, data.steps_per_epoch)
  ctx = make_context(config, total_steps, sources.num_classes(data.builder), data.index_size)
  spec = ckpt.spec

  # Metrics to the log and (process 0) TensorBoard; the full hyperparameters to TensorBoard and
  # WORKDIR/config.json only, not to the log.
  writer = metric_writers.create_writer(
      workdir, just_logging=jax.process_index() > 0, log_hparams=False
  )
  if jax.process_index() == 0:
    writer.write_hparams(_flatten(config.to_dict()))
    save_config_json(config, os.path.join(workdir, "config.json"))
  state = create_train_state(config.seed, config, ctx)
  state = ckpt.restore_or(state)
  start_step = int(state.step)
  if start_step:
    logging.info("Resumed from step %d", start_step)

  p_step = jax.pmap(
      functools.partial(train_step, ctx=ctx), axis_name=parallel.AXIS, donate_argnums=(0,)
  )
  p_eval = jax.pmap(functools.partial(probe_eval_step, ctx=ctx), axis_name=parallel.AXIS)
  state = parallel.replicate(state)
  host = data.iterate(start_step)
  if config.host_prefetch > 0:
    host = BackgroundPrefetch(host, config.host_prefetch)
  batches = parallel.prefetch_to_device(host, config.prefetch_to_device)
  if config.view_pictures > 0 and start_step == 0:
    first = next(batches)
    path = write_view_pictures(state, first, ctx, config.view_pictures, workdir, writer, 0)
    logging.info("Wrote the first batch's views to %s", path)
    batches = itertools.chain([first], batches)
  if ctx.saliency is not None and start_step == 0:
    first = next(batches)
    seconds = measure_saliency_refresh(state, first, ctx)
    logging.info(
        "Online saliency: one refresh takes %.1f ms per global batch of %d (every %d " "step(s))",
        1e3 * seconds,
        config.batch_size,
        ctx.saliency.every_k_steps,
    )
    writer.write_scalars(0, {"saliency_refresh_ms": 1e3 * seconds})
    batches = itertools.chain([first], batches)

  report = metric_writers.ReportProgress(num_train_steps=total_steps, writer=writer)
  logging.info(
      "Training %s for %d steps (%d per epoch), global batch %d on %d devices, %d " "per process",
      config.method,
      total_steps,
      data.steps_per_epoch,
      config.batch_size,
      jax.device_count(),
      data.local_batch,
  )
  pending: list[dict[str, jax.Array]] = []
  last_log = time.time()
  skipped = 0
  # Seconds the loop blocked on the input pipeline since the last log. Steps are dispatched
  # asynchronously, so this mostly overlaps queued steps; device_idle_fraction is whether the
  # devices actually ran dry (train/device_idle.py).
  input_wait = 0.0
  timing = RunTiming(start_step)
  guard = DivergenceGuard(
      config.get("max_param_norm_growth", 0.0), parallel.unreplicate(state).params, start_step
  )
  bar = console.progress(
      total=total_steps,
      initial=start_step,
      unit="step",
      desc=f"{os.path.basename(workdir)} ({config.method})",
  )
  with preemption.PreemptionWatcher() as watcher, bar, DeviceIdleMeter() as idle:
    for step in range(start_step + 1, total_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        waited = time.perf_counter()
        batch = next(batches)
        input_wait += time.perf_counter() - waited
        state, metrics = idle.run_step(p_step, state, batch)
      if step == start_step + 1:
        timing.first_step_done(metrics)  # compiles the step: timed on its own
      pending.append(metrics)
      ckpt.check_for_errors()  # a failed background save stops the run at the next step
      report(step)
      bar.update()
      log_now = step % config.log_every_steps == 0 or step == total_steps
      save_now = step % config.checkpoint_every_steps == 0 or step == total_steps
      stop_now = watcher.should_stop(sync=log_now)
      if log_now or save_now or stop_now:
        # Before anything is saved: were any of these steps non-finite?
        host = jax.device_get(pending)
        skipped += check_finite(host, step - len(host) + 1, config.nonfinite, ckpt)
      if log_now:
        summary = {
            k: float(np.mean([m[k][0] for m in host])) for k in pending[0] if k != "nonfinite"
        }
        now = time.time()
        summary["steps_per_second"] = len(pending) / (now - last_log)
        interval = max(now - last_log, 1e-9)
        summary["input_wait_fraction"] = input_wait / interval
        # > 0: the devices waited for the host (input, logging, saves) between steps.
        idle_seconds = idle.take(flush=True)
        timing.idle_seconds += idle_seconds
        summary["device_idle_fraction"] = idle_seconds / interval
        summary["skipped_steps"] = skipped
        last_log, input_wait = now, 0.0
        writer.write_scalars(step, summary)
        bar.set_postfix(loss=f"{summary['loss']:.4f}", refresh=False)
      if log_now or save_now or stop_now:
        pending = []
      if (
          config.eval_every_steps
          and config.dataset.eval_split
          and config.probe.enabled
          and (step % config.eval_every_steps == 0 or step == total_steps)
      ):
        writer.write_scalars(
            step, {"eval_probe_accuracy": evaluate_probe(p_eval, state, config, ctx)}
        )
      if save_now or stop_now:
        host_state = parallel.unreplicate(state)
        try:
          guard.check(host_state.params, step, ckpt.latest_step(), ckpt.directory)
        except DivergenceError:
          ckpt.close()  # the saves before this one finish; this state is not saved
          raise
        ckpt.save(step, host_state)
      if stop_now and step < total_steps:
        ckpt.close()
        writer.flush()
        logging.warning("Termination requested: saved step %d to %s", step, ckpt.directory)
        raise preemption.Preempted(step, ckpt.directory, watcher.signum)
  ckpt.close()
  timing.write(workdir, total_steps)
  if ctx.saliency is not None and config.saliency.picture_images > 0:
    # Drawn at the end: the trained model's saliency (at step 0 it is a random network's).
    path = write_saliency_pictures(
        state, next(batches), ctx, config.saliency.picture_images, workdir, writer, total_steps
    )
    logging.info("Wrote a batch's saliency maps and crops after training to %s", path)
  if isinstance(host, BackgroundPrefetch):
    host.close()
  final = parallel.unreplicate(state)
  if config.export_encoder:
    export.export_encoder(f"{workdir}/export", final.params, final.batch_stats, spec, config)
  writer.flush()
  return final
