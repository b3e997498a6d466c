"""Contrastive pretraining: the train state, the per-device train step and the loop.

The step is one pure function of (state, batch) written against the named
device axis `parallel.AXIS`: views are augmented on device from per-image
keys, the objective is chosen by `config.method`, gradients and BatchNorm
statistics are averaged over every device, and `jax.pmap` drives it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import time
from typing import Any, NamedTuple

from absl import logging
from clu import metric_writers, periodic_actions
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image

from ocl_jax import checkpointing, console, export, optimizers, parallel, paths, pictures, preemption
from ocl_jax.data import input_pipeline
from ocl_jax.methods import objectives
from ocl_jax.views import augment
from ocl_jax.views import background_mixup
from ocl_jax.views import image_mixing
from ocl_jax.views import saliency
from ocl_jax.configuration import save_config_json
from ocl_jax.models import ContrastiveNet, ModelSpec, l2_normalize


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue, in one pytree."""
  step: jax.Array
  params: Any               # online network: encoder, projector (, predictor)
  batch_stats: Any
  target_params: Any        # EMA target (encoder, projector); None for SimCLR
  target_batch_stats: Any
  opt_state: Any
  probe_params: Any         # online linear probe on stop-gradient features
  probe_opt_state: Any
  queue: Any                # MoCo negatives (K, D); None otherwise
  queue_ptr: Any
  rng: jax.Array            # base key; per-step / per-image keys are folded from it
  bg_fifo: Any = None       # BG-mixup's recent backgrounds (the global batch's); None when off
  saliency_bank: Any = None   # SGCL maps per training image (N, m, m); None unless every_k_steps > 1
  saliency_stamp: Any = None  # ... the step each was computed at (N,), -1 = never


@dataclasses.dataclass(frozen=True)
class StepContext:
  """The static parts of a step: networks, optimisers and settings."""
  net: ContrastiveNet
  tx: optax.GradientTransformation
  probe_tx: optax.GradientTransformation
  schedule: optax.Schedule
  view: augment.ViewConfig
  method: str
  temperature: float
  ema_momentum: float
  num_classes: int
  bg_mixup: tuple[float, float] | None = None  # (prob, threshold) when BG-mixup is on
  mix: tuple[str, float] | None = None         # (kind, alpha) of the Mixup / CutMix baseline
  saliency: saliency.SaliencySettings | None = None  # SGCL (docs/method.md#sgcl) when on


def uses_target(method: str) -> bool:
  return method in ("moco", "byol")


def _target_subset(params: Any) -> Any:
  return {k: v for k, v in params.items() if k != "predictor"}


def create_train_state(seed: int, config: ml_collections.ConfigDict, ctx: StepContext) -> TrainState:
  """A fresh state, compiled once.

  Parameters and the queue are drawn with the 'rbg' generator: XLA:CPU compiles
  one threefry hash per initialiser, several seconds for a ResNet, and rbg cuts
  that ~4x. The training key stays threefry, whose per-image streams do not
  depend on how the batch is split over devices.
  """
  return jax.jit(functools.partial(_init_state, config=config, ctx=ctx))(
      jax.random.key(seed, impl="rbg"), jax.random.PRNGKey(seed))


def _init_state(init_rng: jax.Array, train_rng: jax.Array, config: ml_collections.ConfigDict,
                ctx: StepContext) -> TrainState:
  init_key, queue_key = jax.random.split(init_rng)
  size = config.augment.crop_size
  dummy = jnp.zeros((2, size, size, 3), jnp.float32)
  variables = ctx.net.init(init_key, dummy, train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  target_params = target_stats = queue = queue_ptr = None
  if uses_target(ctx.method):
    target_params = jax.tree_util.tree_map(jnp.copy, _target_subset(params))
    target_stats = jax.tree_util.tree_map(jnp.copy, _target_subset(batch_stats))
  if ctx.method == "moco":
    queue = l2_normalize(jax.random.normal(queue_key, (config.moco.queue_size, config.model.proj_dim)))
    queue_ptr = jnp.zeros((), jnp.int32)
  feat_dim = jax.eval_shape(lambda v: ctx.net.apply(v, dummy, train=False), variables)["features"].shape[-1]
  probe_params = {"kernel": jnp.zeros((feat_dim, max(ctx.num_classes, 1))),
                  "bias": jnp.zeros((max(ctx.num_classes, 1),))}
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      target_params=target_params, target_batch_stats=target_stats,
      opt_state=ctx.tx.init(params), probe_params=probe_params,
      probe_opt_state=ctx.probe_tx.init(probe_params), queue=queue, queue_ptr=queue_ptr,
      rng=train_rng,
      bg_fifo=background_mixup.fifo_init(size, size, config.bg_mixup.fifo_size)
      if config.bg_mixup.enabled else None,
      **dict(zip(("saliency_bank", "saliency_stamp"),
                 saliency.bank_init(ctx.saliency) if ctx.saliency else (None, None))))


def _forward(net, params, batch_stats, x):
  """Train-mode forward that threads BatchNorm running statistics."""
  out, mutated = net.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                           mutable=["batch_stats"])
  return out, mutated["batch_stats"]


class AugmentedViews(NamedTuple):
  """The normalised views of a batch and what produced them (for the loss and pictures)."""
  x1: jax.Array
  x2: jax.Array
  bg_fifo: Any                    # the new BG-mixup FIFO (None when off)
  bg_stats: dict[str, jax.Array]  # BG-mixup counts
  mix: tuple[jax.Array, jax.Array] | None  # Mixup / CutMix (lambda, perm)
  regions: jax.Array | None       # OA-crop region of each image (B, 4)
  crop_boxes: tuple[jax.Array, ...]  # each view's crop box (B, 4), x1 y1 x2 y2; then the local crops'
  fg_masks: jax.Array | None      # BG-mixup masks aligned with view 1
  local_views: tuple[jax.Array, ...] = ()  # SGCL's M local crops, normalised


def _saliency_net_and_variables(state: TrainState, ctx: StepContext) -> tuple[ContrastiveNet, Any]:
  """The network whose saliency SGCL uses: the EMA target (MoCo, BYOL) or the online one (SimCLR)."""
  if uses_target(ctx.method):
    return ctx.net, {"params": state.target_params, "batch_stats": state.target_batch_stats}
  return ctx.net, {"params": _target_subset(state.params), "batch_stats": _target_subset(state.batch_stats)}


def online_saliency(state: TrainState, batch: dict[str, jax.Array], ctx: StepContext
                    ) -> tuple[jax.Array, Any, Any, jax.Array]:
  """SGCL maps (B, m, m) of this batch's un-augmented images, with the updated bank.

  ContraCAM T=1 of the target (EMA) network, or of the online one for SimCLR,
  in stop-gradient. Returns (maps, bank, stamp, refreshed 0/1).
  """
  settings = ctx.saliency
  variables = _saliency_net_and_variables(state, ctx)[1]
  compute = lambda: saliency.compute_saliency(ctx.net, variables, batch["image"], settings, parallel.AXIS)
  if not settings.uses_bank:
    return compute(), None, None, jnp.ones((), jnp.float32)
  return saliency.saliency_from_bank(state.saliency_bank, state.saliency_stamp, batch["index"],
                                     state.step, settings.every_k_steps, compute, parallel.AXIS)


def augment_views(state: TrainState, batch: dict[str, jax.Array], ctx: StepContext,
                  saliency_maps: jax.Array | None = None) -> AugmentedViews:
  """Two normalised views of every image, plus the BG-mixup FIFO and mixing information.

  Keys depend on the step and the image's global index. With OA-crop the
  batch carries `boxes` / `box_valid`: one box per image is chosen per step
  (key stream 2, apart from the views' 0 and 1) and both views crop inside it.
  With BG-mixup the batch carries `fg_mask`, cropped and flipped like view 1,
  which is mixed with other images' backgrounds after its colour
  augmentation (key stream 3; docs/method.md#bg-mixup). With Mixup / CutMix,
  view 1 is then mixed with a permuted batch (key stream 4). With SGCL
  `saliency_maps` re-centre the crops (centre streams 5, 6; local crops 7, 8).
  """
  step_key = jax.random.fold_in(state.rng, state.step)
  offset = parallel.global_offset(batch["image"].shape[0])
  regions = None
  if "boxes" in batch:
    regions = augment.choose_regions(jax.random.fold_in(step_key, 2), batch["boxes"],
                                     batch["box_valid"], index_offset=offset)
  sal = ctx.saliency
  guide = dict(saliency=saliency_maps, temperature=sal.crop_temperature) if sal else {}
  views, crop_boxes, fifo, stats, mix, masks = [], [], state.bg_fifo, {}, None, None
  for v in range(2):
    if sal:
      guide["centre_key"] = jax.random.fold_in(step_key, 5 + v)
    images, boxes, flips = augment.augment_batch(jax.random.fold_in(step_key, v), batch["image"],
                                                 batch["aspect"], ctx.view, index_offset=offset,
                                                 regions=regions, **guide)
    if v == 0 and ctx.bg_mixup is not None:
      masks = augment.transform_masks(batch["fg_mask"], boxes, flips, ctx.view.crop_size)
      prob, threshold = ctx.bg_mixup
      images, fifo, stats = background_mixup.background_mixup(
          jax.random.fold_in(step_key, 3), images, masks, offset, fifo, prob, threshold,
          axis_name=parallel.AXIS)
    if v == 0 and ctx.mix is not None:
      kind, alpha = ctx.mix
      images, lam, perm = image_mixing.mix_images(kind, jax.random.fold_in(step_key, 4), images,
                                                  offset, alpha, axis_name=parallel.AXIS)
      mix = (lam, perm)
    views.append(augment.normalize(images))
    crop_boxes.append(boxes)
  local_views = []
  for j in range(sal.num_local_crops if sal else 0):
    guide["centre_key"] = jax.random.fold_in(jax.random.fold_in(step_key, 8), j)
    images, boxes, _ = augment.augment_batch(
        jax.random.fold_in(jax.random.fold_in(step_key, 7), j), batch["image"], batch["aspect"],
        sal.local_view(ctx.view), index_offset=offset, **guide)
    local_views.append(augment.normalize(images))
    crop_boxes.append(boxes)
  return AugmentedViews(views[0], views[1], fifo, stats, mix, regions, tuple(crop_boxes), masks,
                        tuple(local_views))


def train_step(state: TrainState, batch: dict[str, jax.Array], ctx: StepContext
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on this device's slice of the global batch (inside pmap)."""
  online = online_saliency(state, batch, ctx) if ctx.saliency else None
  aug = augment_views(state, batch, ctx, online[0] if online else None)
  return update_from_views(state, batch, aug, ctx, online)


def update_from_views(state: TrainState, batch: dict[str, jax.Array], aug: AugmentedViews,
                      ctx: StepContext, online: tuple[jax.Array, Any, Any, jax.Array] | None = None,
                      ) -> tuple[TrainState, dict[str, jax.Array]]:
  """The step after augmentation: losses, gradients, optimiser, target, queue and probe.

  Split from train_step so the benchmark can time exactly the work a PyTorch
  step on ready views does. `online` is online_saliency's output with SGCL.
  """
  sal = ctx.saliency
  maps = bank = stamp = None
  if sal:
    maps, bank, stamp, refreshed = online
  x1, x2, bg_fifo, bg_stats, mix = aug.x1, aug.x2, aug.bg_fifo, aug.bg_stats, aug.mix
  net, axis = ctx.net, parallel.AXIS
  target_net = dataclasses.replace(net, pred_hidden_dim=0)

  # Targets: the EMA network in train mode (its own BN statistics), no gradient.
  target_stats = state.target_batch_stats
  targets = []
  if ctx.method == "moco":
    k, target_stats = _forward(target_net, state.target_params, target_stats, x2)
    targets = [jax.lax.stop_gradient(k["embedding"])]
  elif ctx.method == "byol":
    for x in (x1, x2):
      y, target_stats = _forward(target_net, state.target_params, target_stats, x)
      targets.append(jax.lax.stop_gradient(y["embedding"]))

  # Positive pairs as (query view, key view); views 0, 1 are global, 2.. local (SGCL).
  pairs = [(0, 1)]
  for j in range(len(aug.local_views)):
    pairs += [(2 + j, 0), (2 + j, 1)] if ctx.method == "byol" else [(2 + j, 1)]
  weights = scores = None
  if sal:
    scores = [saliency.crop_scores(b, maps) for b in aug.crop_boxes]
    weights = saliency.normalize_weights(jnp.concatenate(
        [saliency.pair_weights(scores[u], scores[v], sal.gamma) for u, v in pairs]), axis)

  def loss_fn(params):
    out1, stats = _forward(net, params, state.batch_stats, x1)
    aux = {"features": out1["features"]}
    if ctx.method == "moco" and mix is not None:
      lam, perm = mix  # perm: donors' indices in the global batch, like the gathered keys
      offset = parallel.global_offset(x1.shape[0])
      per_example = objectives.moco_mix_per_example(
          out1["embedding"], jax.lax.all_gather(targets[0], axis, tiled=True), state.queue,
          offset + jnp.arange(x1.shape[0]), perm, lam, ctx.temperature)
      aux["moco_acc"] = objectives.moco_accuracy(out1["embedding"], targets[0], state.queue)
    elif ctx.method == "moco":
      per_example = objectives.moco_per_example(out1["embedding"], targets[0], state.queue,
                                                ctx.temperature)
      aux["moco_acc"] = objectives.moco_accuracy(out1["embedding"], targets[0], state.queue)
    else:
      out2, stats = _forward(net, params, stats, x2)
      if ctx.method == "byol":
        per_example = objectives.byol_per_example(out1["prediction"], out2["prediction"], *targets)
      else:
        per_example = objectives.nt_xent_per_example(out1["embedding"], out2["embedding"],
                                                      ctx.temperature, axis)
    losses = [per_example]
    for xl in aug.local_views:  # multi-crop: each local crop against the global views' keys
      out, stats = _forward(net, params, stats, xl)
      if ctx.method == "moco":
        losses.append(objectives.moco_per_example(out["embedding"], targets[0], state.queue,
                                                  ctx.temperature))
      elif ctx.method == "byol":
        losses += [objectives.byol_one_way_per_example(out["prediction"], y) for y in targets]
      else:
        losses.append(objectives.nt_xent_per_example(out["embedding"], out2["embedding"],
                                                     ctx.temperature, axis))
    per_pair = losses[0] if len(losses) == 1 else jnp.concatenate(losses)
    return objectives.weighted_mean(per_pair, weights, axis_name=axis), (stats, aux)

  (loss, (batch_stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, axis)
  updates, opt_state = ctx.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  # Online linear probe on stop-gradient features of view 1.
  features = jax.lax.stop_gradient(aux["features"])
  probe_loss, probe_grads, probe_acc = _probe_loss_and_grad(state.probe_params, features,
                                                            batch["label"], ctx.num_classes)
  probe_grads = jax.lax.pmean(probe_grads, axis)
  probe_updates, probe_opt_state = ctx.probe_tx.update(probe_grads, state.probe_opt_state,
                                                       state.probe_params)
  probe_params = optax.apply_updates(state.probe_params, probe_updates)

  new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                      opt_state=opt_state, probe_params=probe_params,
                      probe_opt_state=probe_opt_state, target_batch_stats=target_stats,
                      bg_fifo=bg_fifo, saliency_bank=bank, saliency_stamp=stamp)
  if uses_target(ctx.method):
    m = ctx.ema_momentum
    new = new.replace(target_params=jax.tree_util.tree_map(
        lambda t, o: m * t + (1.0 - m) * o, state.target_params, _target_subset(params)))
  if ctx.method == "moco":
    keys = jax.lax.all_gather(targets[0], axis, tiled=True)
    queue, ptr = objectives.enqueue(state.queue, state.queue_ptr, keys)
    new = new.replace(queue=queue, queue_ptr=ptr)

  # A non-finite loss or gradient (identical on every device after the pmean) leaves the
  # state as it was; only the step (and with it the data) moves on.
  finite = jnp.isfinite(loss) & jnp.all(jnp.array(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
  finite = jax.lax.pmin(finite.astype(jnp.int32), axis) > 0
  new = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, state.replace(step=new.step))

  metrics = {"loss": loss, "learning_rate": ctx.schedule(state.step),
             "probe_loss": probe_loss, "probe_accuracy": probe_acc,
             "nonfinite": 1.0 - finite.astype(jnp.float32)}
  if "moco_acc" in aux:
    metrics["moco_accuracy"] = aux["moco_acc"]
  metrics.update({k: v.astype(jnp.float32) / batch["image"].shape[0] for k, v in bg_stats.items()})
  metrics = jax.lax.pmean(metrics, axis)
  if sal:  # already global (collectives inside)
    metrics.update(saliency.weight_statistics(weights, axis))
    metrics["saliency_refreshed"] = refreshed
    if "fg_mask" in batch:  # true object coverage of the two global crops (scenes: 'gt' masks)
      fg = augment._to_float(batch["fg_mask"])
      cover = [saliency.crop_scores(b, fg) for b in aug.crop_boxes[:2]]
      metrics["sgcl_score_coverage_spearman"] = saliency.spearman(
          scores[0] * scores[1], cover[0] * cover[1], axis)
  return new, metrics


def _probe_logits(probe_params, features):
  return features @ probe_params["kernel"] + probe_params["bias"]


def _probe_loss_and_grad(probe_params, features, labels, num_classes):
  """Cross-entropy of the linear probe over the examples that have a label (label >= 0)."""
  valid = (labels >= 0) & (num_classes > 0)
  n_valid = jnp.maximum(jax.lax.psum(valid.sum(), parallel.AXIS), 1)

  def loss_fn(p):
    logits = _probe_logits(p, features)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    # Per device: local sum / global count, times devices, so pmean gives the global mean.
    return jnp.sum(jnp.where(valid, ce, 0.0)) / n_valid * jax.lax.psum(1, parallel.AXIS), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(probe_params)
  correct = jnp.sum(jnp.where(valid, jnp.argmax(logits, -1) == labels, False))
  acc = jax.lax.psum(correct, parallel.AXIS) / n_valid * jax.lax.psum(1, parallel.AXIS)
  return loss, grads, acc


def probe_eval_step(state: TrainState, batch: dict[str, jax.Array], ctx: StepContext) -> dict[str, jax.Array]:
  """Online-probe correct/count on a held-out batch: full image resized to the crop size."""
  images = batch["image"].astype(jnp.float32) / 255.0
  size = ctx.view.crop_size
  images = jax.image.resize(images, (images.shape[0], size, size, 3), "bilinear", antialias=True)
  out = ctx.net.apply({"params": state.params, "batch_stats": state.batch_stats},
                      augment.normalize(images), train=False)
  pred = jnp.argmax(_probe_logits(state.probe_params, out["features"]), -1)
  valid = (batch["valid"] > 0) & (batch["label"] >= 0)
  return jax.lax.psum({"correct": jnp.sum(valid & (pred == batch["label"])),
                       "count": jnp.sum(valid)}, parallel.AXIS)


def make_context(config: ml_collections.ConfigDict, total_steps: int, num_classes: int,
                 num_examples: int = 0) -> StepContext:
  """The step's static context; `num_examples` (the train split) sizes SGCL's saliency bank."""
  spec = ModelSpec.from_config(config)
  sal = config.get("saliency")
  method = config.method
  return StepContext(
      net=spec.build(axis_name=parallel.AXIS),
      tx=optimizers.create_optimizer(config, total_steps),
      probe_tx=optax.adam(config.probe.learning_rate if config.probe.enabled else 0.0),
      schedule=optimizers.learning_rate_schedule(config, total_steps),
      view=augment.ViewConfig.from_config(config.augment),
      method=method,
      temperature=float(config.moco.temperature if method == "moco" else config.simclr.temperature),
      ema_momentum=float(config.moco.momentum if method == "moco" else config.byol.momentum),
      num_classes=num_classes if config.probe.enabled else 0,
      bg_mixup=(float(config.bg_mixup.prob), float(config.bg_mixup.threshold))
      if config.bg_mixup.enabled else None,
      mix=(config.mix.kind, float(config.mix.alpha)) if config.mix.kind != "none" else None,
      saliency=saliency.SaliencySettings.from_config(sal, num_examples)
      if sal is not None and sal.enabled else None,
  )


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
  for batch in input_pipeline.eval_batches(config, config.dataset.eval_split, max_batches=max_batches):
    r = p_eval(state, batch)
    correct += int(r["correct"][0])
    count += int(r["count"][0])
  return correct / max(count, 1)


def write_view_pictures(state: TrainState, batch: dict[str, jax.Array], ctx: StepContext,
                        count: int, workdir: str, writer: metric_writers.MetricWriter, step: int) -> str:
  """The first `count` images of a (device-sharded) batch as the step sees them: source with
  the OA-crop region and both crops drawn, view 1 (after BG-mixup / Mixup), view 2, mask.

  Written to WORKDIR/views.png and to TensorBoard as `views`.
  """
  def payload(st, b):
    a = augment_views(st, b, ctx)
    out = {"x1": augment.denormalize(a.x1), "x2": augment.denormalize(a.x2),
           "box1": a.crop_boxes[0], "box2": a.crop_boxes[1]}
    if a.regions is not None:
      out["regions"] = a.regions
    if a.fg_masks is not None:
      out["masks"] = a.fg_masks
    return out
  out = jax.device_get(jax.pmap(payload, axis_name=parallel.AXIS)(state, batch))
  flat = lambda x: _flat_batch(x, count)
  out = {k: flat(v) for k, v in out.items()}
  grid = pictures.views_grid(flat(batch["image"]), pictures.to_uint8(out["x1"]),
                             pictures.to_uint8(out["x2"]), (out["box1"], out["box2"]),
                             out.get("regions"), out.get("masks"))
  return _save_picture(grid, "views", workdir, writer, step)


def _flat_batch(x: Any, count: int) -> np.ndarray:
  """(devices, per_device, ...) -> the first `count` of (devices * per_device, ...)."""
  x = np.asarray(x)
  return x.reshape((-1,) + x.shape[2:])[:count]


def _save_picture(grid: np.ndarray, name: str, workdir: str, writer: metric_writers.MetricWriter,
                  step: int) -> str:
  """WORKDIR/<name>.png and TensorBoard image `name`, from process 0; returns the path."""
  path = os.path.join(workdir, f"{name}.png")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    Image.fromarray(grid).save(path)
    writer.write_images(step, {name: grid[None]})
  return path


def write_saliency_pictures(state: TrainState, batch: dict[str, jax.Array], ctx: StepContext,
                            count: int, workdir: str, writer: metric_writers.MetricWriter,
                            step: int) -> str:
  """SGCL: the first `count` images with their online saliency maps and the crops sampled
  from them, to WORKDIR/saliency.png and TensorBoard `saliency`."""
  def payload(st, b):
    net, variables = _saliency_net_and_variables(st, ctx)
    maps = saliency.compute_saliency(net, variables, b["image"], ctx.saliency, parallel.AXIS)
    return maps, augment_views(st, b, ctx, maps).crop_boxes
  maps, boxes = jax.device_get(jax.pmap(payload, axis_name=parallel.AXIS)(state, batch))
  flat = lambda x: _flat_batch(x, count)
  grid = pictures.saliency_grid(flat(batch["image"]), flat(maps), [flat(b) for b in boxes])
  return _save_picture(grid, "saliency", workdir, writer, step)


def measure_saliency_refresh(state: TrainState, batch: dict[str, jax.Array], ctx: StepContext,
                             repeats: int = 3) -> float:
  """Seconds one refresh of the online saliency takes for a global batch (median after warm-up)."""
  def refresh(st, b):
    net, variables = _saliency_net_and_variables(st, ctx)
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


def check_finite(host_metrics: list[dict[str, Any]], first_step: int, policy: str,
                 ckpt: checkpointing.Checkpointer) -> int:
  """Count the non-finite steps among `host_metrics` (steps first_step, ...); with policy
  'stop' raise NonFiniteError naming the first (no checkpoint after it is written)."""
  bad = [first_step + i for i, m in enumerate(host_metrics) if float(m["nonfinite"][0]) > 0]
  if bad and policy == "stop":
    ckpt.close()
    raise NonFiniteError(
        f"non-finite loss or gradients at step {bad[0]} (steps {bad[:5]}...); the update was not "
        f"applied and the run stopped, keeping the last good checkpoint (step "
        f"{ckpt.latest_step()}) in {ckpt.directory}. Lower optim.base_lr, or set "
        "--config.nonfinite=skip to skip such steps.")
  for s in bad:
    logging.warning("Step %d: non-finite loss or gradients; update skipped", s)
  return len(bad)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Pretrain with `config`, resuming from the newest checkpoint in `workdir`."""
  workdir, config = paths.resolve(workdir), paths.resolve_config(config)
  data = input_pipeline.create_train_data(config)
  total_steps = total_train_steps(config, data.steps_per_epoch)
  ctx = make_context(config, total_steps, input_pipeline.num_classes(data.builder), data.index_size)
  spec = ModelSpec.from_config(config)

  # Metrics to the log and (process 0) TensorBoard; the full hyperparameters to TensorBoard and
  # WORKDIR/config.json only, not to the log.
  tensorboard = metric_writers.SummaryWriter(workdir) if jax.process_index() == 0 else None
  writer = metric_writers.AsyncMultiWriter(
      [metric_writers.LoggingWriter()] + ([tensorboard] if tensorboard is not None else []))
  if tensorboard is not None:
    tensorboard.write_hparams(_flatten(config.to_dict()))
    save_config_json(config, os.path.join(workdir, "config.json"))
  ckpt = checkpointing.Checkpointer(workdir, spec, config)
  state = create_train_state(config.seed, config, ctx)
  state = ckpt.restore_or(state)
  start_step = int(state.step)
  if start_step:
    logging.info("Resumed from step %d", start_step)

  p_step = jax.pmap(functools.partial(train_step, ctx=ctx), axis_name=parallel.AXIS,
                    donate_argnums=(0,))
  p_eval = jax.pmap(functools.partial(probe_eval_step, ctx=ctx), axis_name=parallel.AXIS)
  state = parallel.replicate(state)
  batches = parallel.prefetch_to_device(data.iterate(start_step), config.prefetch_to_device)
  if config.view_pictures > 0 and start_step == 0:
    first = next(batches)
    path = write_view_pictures(state, first, ctx, config.view_pictures, workdir, writer, 0)
    logging.info("Wrote the first batch's views to %s", path)
    batches = itertools.chain([first], batches)
  if ctx.saliency is not None and start_step == 0:
    first = next(batches)
    seconds = measure_saliency_refresh(state, first, ctx)
    logging.info("Online saliency: one refresh takes %.1f ms per global batch of %d (every %d "
                 "step(s))", 1e3 * seconds, config.batch_size, ctx.saliency.every_k_steps)
    writer.write_scalars(0, {"saliency_refresh_ms": 1e3 * seconds})
    batches = itertools.chain([first], batches)

  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  logging.info("Training %s for %d steps (%d per epoch), global batch %d on %d devices, %d "
               "per process", config.method, total_steps, data.steps_per_epoch, config.batch_size,
               jax.device_count(), data.local_batch)
  pending: list[dict[str, jax.Array]] = []
  last_log = time.time()
  skipped = 0
  input_wait = 0.0  # seconds the loop blocked on the input pipeline since the last log
  bar = console.progress(total=total_steps, initial=start_step, unit="step",
                         desc=f"{os.path.basename(workdir)} ({config.method})")
  with preemption.PreemptionWatcher() as watcher, bar:
    for step in range(start_step + 1, total_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        waited = time.perf_counter()
        batch = next(batches)
        input_wait += time.perf_counter() - waited
        state, metrics = p_step(state, batch)
      pending.append(metrics)
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
        summary = {k: float(np.mean([m[k][0] for m in host])) for k in pending[0] if k != "nonfinite"}
        now = time.time()
        summary["steps_per_second"] = len(pending) / (now - last_log)
        # Fraction of wall time the loop waited for input: > 0 means the pipeline starves the step.
        summary["input_wait_fraction"] = input_wait / max(now - last_log, 1e-9)
        summary["skipped_steps"] = skipped
        last_log, input_wait = now, 0.0
        writer.write_scalars(step, summary)
        bar.set_postfix(loss=f"{summary['loss']:.4f}", refresh=False)
      if log_now or save_now or stop_now:
        pending = []
      if config.eval_every_steps and config.dataset.eval_split and config.probe.enabled and (
          step % config.eval_every_steps == 0 or step == total_steps):
        writer.write_scalars(step, {"eval_probe_accuracy": evaluate_probe(p_eval, state, config, ctx)})
      if save_now or stop_now:
        ckpt.save(step, parallel.unreplicate(state))
      if stop_now and step < total_steps:
        ckpt.close()
        writer.flush()
        logging.warning("Termination requested: saved step %d to %s", step, ckpt.directory)
        raise preemption.Preempted(step, ckpt.directory)
  ckpt.close()
  if ctx.saliency is not None and config.saliency.picture_images > 0:
    # Drawn at the end: the trained model's saliency (at step 0 it is a random network's).
    path = write_saliency_pictures(state, next(batches), ctx, config.saliency.picture_images,
                                   workdir, writer, total_steps)
    logging.info("Wrote a batch's saliency maps and crops after training to %s", path)
  final = parallel.unreplicate(state)
  if config.export_encoder:
    export.export_encoder(f"{workdir}/export", final.params, final.batch_stats, spec, config)
  writer.flush()
  return final
