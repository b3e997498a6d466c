"""Optimiser and learning-rate schedule of docs/method.md#pretraining.

SGD with momentum 0.9 and weight decay 1e-4 as in PyTorch (decay added to the
gradient before momentum, applied to every parameter as the release does),
lr = base_lr * global_batch / 256, cosine decay to an absolute final lr
(the release's `final_lr`), optional linear warm-up; LARS as an option.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Peak lr scaled by the global batch; cosine from the peak to `final_lr` (absolute)."""
  o = config.optim
  peak = o.base_lr * config.batch_size / 256.0
  final = o.final_lr
  warmup = int(o.warmup_steps)
  decay_steps = max(total_steps - warmup, 1)

  def schedule(step):
    t = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    cosine = final + 0.5 * (peak - final) * (1.0 + jnp.cos(jnp.pi * t))
    if warmup > 0:
      return jnp.where(step < warmup, peak * (step + 1) / warmup, cosine)
    return cosine

  return schedule


def _is_matrix(params):
  """Mask: True for kernels (ndim > 1); BN scales/biases and dense biases excluded."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def create_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
  o = config.optim
  schedule = learning_rate_schedule(config, total_steps)
  if o.name == "sgd":
    return optax.chain(
        optax.add_decayed_weights(o.weight_decay),
        optax.sgd(schedule, momentum=o.momentum, nesterov=False),
    )
  if o.name == "lars":
    return optax.lars(
        schedule,
        weight_decay=o.weight_decay,
        weight_decay_mask=_is_matrix,
        trust_coefficient=o.lars_trust_coefficient,
        trust_ratio_mask=_is_matrix,
        momentum=o.momentum,
    )
  raise ValueError(f"config.optim.name={o.name!r}: expected 'sgd' or 'lars'")
