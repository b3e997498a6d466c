"""The per-device train step, written once for every method and augmentation.

One pure function of (state, batch) against the named device axis
`parallel.AXIS`: views are composed on device from per-image keys
(views/compose.py), the method object (methods/) says which views go through
which network and what the losses are, gradients and BatchNorm statistics are
averaged over every device, and `jax.pmap` drives it (train/loop.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ocl_jax import methods, parallel
from ocl_jax.methods import objectives
from ocl_jax.models import ContrastiveNet
from ocl_jax.train.state import StepContext, TrainState, target_subset
from ocl_jax.views import augment, compose, saliency

Online = tuple[jax.Array, Any, Any, jax.Array]  # SGCL: (maps, bank, stamp, refreshed)


def forward(
    net: ContrastiveNet, params: Any, batch_stats: Any, x: jax.Array
) -> tuple[dict[str, jax.Array], Any]:
  """Train-mode forward that threads BatchNorm running statistics."""
  out, mutated = net.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
  )
  return out, mutated["batch_stats"]


def saliency_variables(state: TrainState, ctx: StepContext) -> dict[str, Any]:
  """The variables whose saliency SGCL uses: the EMA target, or the online network without one."""
  if ctx.method.uses_target:
    return {"params": state.target_params, "batch_stats": state.target_batch_stats}
  return {"params": target_subset(state.params), "batch_stats": target_subset(state.batch_stats)}


def online_saliency(state: TrainState, batch: dict[str, jax.Array], ctx: StepContext) -> Online:
  """SGCL maps (B, m, m) of this batch's un-augmented images, with the updated bank.

  ContraCAM T=1 of saliency_variables in stop-gradient. Returns (maps, bank,
  stamp, refreshed 0/1).
  """
  settings = ctx.saliency
  variables = saliency_variables(state, ctx)
  compute = lambda: saliency.compute_saliency(
      ctx.net, variables, batch["image"], settings, parallel.AXIS
  )
  if not settings.uses_bank:
    return compute(), None, None, jnp.ones((), jnp.float32)
  return saliency.saliency_from_bank(
      state.saliency_bank,
      state.saliency_stamp,
      batch["index"],
      state.step,
      settings.every_k_steps,
      compute,
      parallel.AXIS,
  )


def augment_views(
    state: TrainState,
    batch: dict[str, jax.Array],
    ctx: StepContext,
    saliency_maps: jax.Array | None = None,
) -> compose.AugmentedViews:
  """The step's views: keys from the step and each image's global index."""
  step_key = jax.random.fold_in(state.rng, state.step)
  return compose.augment_views(step_key, batch, ctx.views, state.bg_fifo, saliency_maps)


def train_step(
    state: TrainState, batch: dict[str, jax.Array], ctx: StepContext
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on this device's slice of the global batch (inside pmap)."""
  online = online_saliency(state, batch, ctx) if ctx.saliency else None
  aug = augment_views(state, batch, ctx, online[0] if online else None)
  return update_from_views(state, batch, aug, ctx, online)


def update_from_views(
    state: TrainState,
    batch: dict[str, jax.Array],
    aug: compose.AugmentedViews,
    ctx: StepContext,
    online: Online | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """The step after augmentation: losses, gradients, optimiser, target, queue and probe.

  Split from train_step so the benchmark can time exactly the work a PyTorch
  step on ready views does. `online` is online_saliency's output with SGCL.
  """
  method, net, axis, sal = ctx.method, ctx.net, parallel.AXIS, ctx.saliency
  maps = bank = stamp = None
  if sal:
    maps, bank, stamp, refreshed = online
  views = (aug.x1, aug.x2)

  # Targets: the EMA network in train mode (its own BN statistics), no gradient.
  target_net = dataclasses.replace(net, pred_hidden_dim=0)
  target_stats, targets = state.target_batch_stats, []
  for v in method.target_views:
    y, target_stats = forward(target_net, state.target_params, target_stats, views[v])
    targets.append(jax.lax.stop_gradient(y["embedding"]))

  # Positive pairs as (query view, key view); views 0, 1 are global, 2.. local (SGCL).
  pairs = [(0, 1)]
  for j in range(len(aug.local_views)):
    pairs += method.local_pairs(2 + j)
  weights = scores = None
  if sal:
    scores = [saliency.crop_scores(b, maps) for b in aug.crop_boxes]
    weights = saliency.normalize_weights(
        jnp.concatenate([saliency.pair_weights(scores[u], scores[v], sal.gamma) for u, v in pairs]),
        axis,
    )

  def loss_fn(params):
    stats, outs = state.batch_stats, {}
    for v in method.online_views:
      outs[v], stats = forward(net, params, stats, views[v])
    losses, aux = method.global_loss(state, outs, targets, aug.mix, axis)
    losses = [losses]
    for xl in aug.local_views:  # multi-crop: each local crop against the global views
      out, stats = forward(net, params, stats, xl)
      losses += method.local_losses(state, out, outs, targets, axis)
    per_pair = losses[0] if len(losses) == 1 else jnp.concatenate(losses)
    loss = objectives.weighted_mean(per_pair, weights, axis_name=axis)
    return loss, (stats, outs[0]["features"], aux)

  (loss, (batch_stats, features, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params
  )
  grads = jax.lax.pmean(grads, axis)
  updates, opt_state = ctx.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  # Online linear probe on stop-gradient features of view 0.
  probe_loss, probe_grads, probe_acc = probe_loss_and_grad(
      state.probe_params, jax.lax.stop_gradient(features), batch["label"], ctx.num_classes
  )
  probe_grads = jax.lax.pmean(probe_grads, axis)
  probe_updates, probe_opt_state = ctx.probe_tx.update(
      probe_grads, state.probe_opt_state, state.probe_params
  )
  probe_params = optax.apply_updates(state.probe_params, probe_updates)

  new = state.replace(
      step=state.step + 1,
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
      probe_params=probe_params,
      probe_opt_state=probe_opt_state,
      target_batch_stats=target_stats,
      bg_fifo=aug.bg_fifo,
      saliency_bank=bank,
      saliency_stamp=stamp,
  )
  if method.uses_target:
    new = new.replace(
        target_params=jax.tree_util.tree_map(
            methods.ema(method.ema_momentum), state.target_params, target_subset(params)
        )
    )
  new = new.replace(**method.after_update(state, targets, axis))

  # A non-finite loss or gradient (identical on every device after the pmean) leaves the
  # state as it was; only the step (and with it the data) moves on.
  finite = jnp.isfinite(loss) & jnp.all(
      jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)])
  )
  finite = jax.lax.pmin(finite.astype(jnp.int32), axis) > 0
  new = jax.tree_util.tree_map(
      lambda n, o: jnp.where(finite, n, o), new, state.replace(step=new.step)
  )

  metrics = {
      "loss": loss,
      "learning_rate": ctx.schedule(state.step),
      "probe_loss": probe_loss,
      "probe_accuracy": probe_acc,
      "nonfinite": 1.0 - finite.astype(jnp.float32),
      **aux,
  }
  n = batch["image"].shape[0]
  metrics.update({k: v.astype(jnp.float32) / n for k, v in aug.bg_stats.items()})
  metrics = jax.lax.pmean(metrics, axis)
  if sal:  # already global (collectives inside)
    metrics.update(saliency.weight_statistics(weights, axis))
    metrics["saliency_refreshed"] = refreshed
    if "fg_mask" in batch:  # true object coverage of the two global crops (scenes: 'gt' masks)
      fg = augment.to_float(batch["fg_mask"])
      cover = [saliency.crop_scores(b, fg) for b in aug.crop_boxes[:2]]
      metrics["sgcl_score_coverage_spearman"] = saliency.spearman(
          scores[0] * scores[1], cover[0] * cover[1], axis
      )
  return new, metrics


# ---------------------------------------------------------------------------
# The online linear probe
# ---------------------------------------------------------------------------


def probe_logits(probe_params: Any, features: jax.Array) -> jax.Array:
  return features @ probe_params["kernel"] + probe_params["bias"]


def probe_loss_and_grad(
    probe_params: Any, features: jax.Array, labels: jax.Array, num_classes: int
) -> tuple[jax.Array, Any, jax.Array]:
  """Cross-entropy of the linear probe over the examples that have a label (label >= 0)."""
  valid = (labels >= 0) & (num_classes > 0)
  n_valid = jnp.maximum(jax.lax.psum(valid.sum(), parallel.AXIS), 1)

  def loss_fn(p):
    logits = probe_logits(p, features)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    # Per device: local sum / global count, times devices, so pmean gives the global mean.
    return jnp.sum(jnp.where(valid, ce, 0.0)) / n_valid * jax.lax.psum(1, parallel.AXIS), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(probe_params)
  correct = jnp.sum(jnp.where(valid, jnp.argmax(logits, -1) == labels, False))
  acc = jax.lax.psum(correct, parallel.AXIS) / n_valid  # global already: the pmean keeps it
  return loss, grads, acc


def probe_eval_step(
    state: TrainState, batch: dict[str, jax.Array], ctx: StepContext
) -> dict[str, jax.Array]:
  """Online-probe correct/count on a held-out batch: full image resized to the crop size."""
  images = batch["image"].astype(jnp.float32) / 255.0
  size = ctx.view.crop_size
  images = jax.image.resize(images, (images.shape[0], size, size, 3), "bilinear", antialias=True)
  out = ctx.net.apply(
      {"params": state.params, "batch_stats": state.batch_stats},
      augment.normalize(images),
      train=False,
  )
  pred = jnp.argmax(probe_logits(state.probe_params, out["features"]), -1)
  valid = (batch["valid"] > 0) & (batch["label"] >= 0)
  return jax.lax.psum(
      {"correct": jnp.sum(valid & (pred == batch["label"])), "count": jnp.sum(valid)}, parallel.AXIS
  )
