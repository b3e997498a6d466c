"""The train state (one pytree) and the step's static context."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ocl_jax import methods, optimizers, parallel
from ocl_jax.models import ContrastiveNet, ModelSpec
from ocl_jax.views import augment, background_mixup, compose, saliency


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue, in one pytree."""

  step: jax.Array
  params: Any  # online network: encoder, projector (, predictor)
  batch_stats: Any
  target_params: Any  # EMA target (encoder, projector); None without one
  target_batch_stats: Any
  opt_state: Any
  probe_params: Any  # online linear probe on stop-gradient features
  probe_opt_state: Any
  queue: Any  # MoCo negatives (K, D); None otherwise
  queue_ptr: Any
  rng: jax.Array  # base key; per-step / per-image keys are folded from it
  bg_fifo: Any = None  # BG-mixup's recent backgrounds (the global batch's); None when off
  saliency_bank: Any = None  # SGCL maps per training image (N, m, m); None unless every_k_steps > 1
  saliency_stamp: Any = None  # ... the step each was computed at (N,), -1 = never


@dataclasses.dataclass(frozen=True)
class StepContext:
  """The static parts of a step: networks, optimisers, the method and the views' recipe."""

  net: ContrastiveNet
  tx: optax.GradientTransformation
  probe_tx: optax.GradientTransformation
  schedule: optax.Schedule
  method: methods.Method
  views: compose.ViewPlan
  num_classes: int

  @property
  def view(self) -> augment.ViewConfig:
    return self.views.view

  @property
  def saliency(self) -> saliency.SaliencySettings | None:
    return self.views.saliency


def target_subset(params: Any) -> Any:
  """The parts of the online network the EMA target copies (all but the predictor)."""
  return {k: v for k, v in params.items() if k != "predictor"}


def make_context(
    config: ml_collections.ConfigDict, total_steps: int, num_classes: int, num_examples: int = 0
) -> StepContext:
  """The step's static context; `num_examples` (the train split) sizes SGCL's saliency bank."""
  return StepContext(
      net=ModelSpec.from_config(config).build(axis_name=parallel.AXIS),
      tx=optimizers.create_optimizer(config, total_steps),
      probe_tx=optax.adam(config.probe.learning_rate if config.probe.enabled else 0.0),
      schedule=optimizers.learning_rate_schedule(config, total_steps),
      method=methods.create(config),
      views=compose.ViewPlan.from_config(config, num_examples),
      num_classes=num_classes if config.probe.enabled else 0,
  )


def create_train_state(
    seed: int, config: ml_collections.ConfigDict, ctx: StepContext
) -> TrainState:
  """A fresh state, compiled once.

  Parameters and the queue are drawn with the 'rbg' generator: XLA:CPU compiles
  one threefry hash per initialiser, several seconds for a ResNet, and rbg cuts
  that ~4x. The training key stays threefry, whose per-image streams do not
  depend on how the batch is split over devices.
  """
  return jax.jit(functools.partial(_init_state, config=config, ctx=ctx))(
      jax.random.key(seed, impl="rbg"), jax.random.PRNGKey(seed)
  )


def _init_state(
    init_rng: jax.Array, train_rng: jax.Array, config: ml_collections.ConfigDict, ctx: StepContext
) -> TrainState:
  init_key, method_key = jax.random.split(init_rng)
  size = config.augment.crop_size
  dummy = jnp.zeros((2, size, size, 3), jnp.float32)
  variables = ctx.net.init(init_key, dummy, train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  extra = {"target_params": None, "target_batch_stats": None, "queue": None, "queue_ptr": None}
  if ctx.method.uses_target:
    extra["target_params"] = jax.tree_util.tree_map(jnp.copy, target_subset(params))
    extra["target_batch_stats"] = jax.tree_util.tree_map(jnp.copy, target_subset(batch_stats))
  extra.update(ctx.method.init_state(method_key, config))
  feat_dim = jax.eval_shape(lambda v: ctx.net.apply(v, dummy, train=False), variables)[
      "features"
  ].shape[-1]
  probe_params = {
      "kernel": jnp.zeros((feat_dim, max(ctx.num_classes, 1))),
      "bias": jnp.zeros((max(ctx.num_classes, 1),)),
  }
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=ctx.tx.init(params),
      probe_params=probe_params,
      probe_opt_state=ctx.probe_tx.init(probe_params),
      rng=train_rng,
      bg_fifo=background_mixup.fifo_init(size, size, config.bg_mixup.fifo_size)
      if config.bg_mixup.enabled
      else None,
      **dict(
          zip(
              ("saliency_bank", "saliency_stamp"),
              saliency.bank_init(ctx.saliency) if ctx.saliency else (None, None),
          )
      ),
      **extra,
  )
