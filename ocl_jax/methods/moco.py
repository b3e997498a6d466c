"""MoCo v2: the query view against its momentum-encoder key and a queue of past keys."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ocl_jax import parallel
from ocl_jax.methods import objectives
from ocl_jax.methods.base import Method, register
from ocl_jax.models import l2_normalize


@register
@dataclasses.dataclass(frozen=True)
class MoCo(Method):
  """docs/method.md#pretraining: InfoNCE of view 0's query vs view 1's key and the queue."""

  name = "moco"
  uses_target = True
  supports_mix = True
  online_views = (0,)
  target_views = (1,)

  temperature: float = 0.2
  queue_size: int = 65536

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "MoCo":
    return cls(
        ema_momentum=float(config.moco.momentum),
        temperature=float(config.moco.temperature),
        queue_size=int(config.moco.queue_size),
    )

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    errors = []
    b, q, t, m = (
        config.batch_size,
        config.moco.queue_size,
        config.moco.temperature,
        config.moco.momentum,
    )
    if isinstance(b, int) and b > 0 and not (q > 0 and q % b == 0):
      errors.append(
          (
              "moco.queue_size",
              f"{q} must be a positive multiple of batch_size={b} (whole batches are enqueued)",
          )
      )
    if not t > 0:
      errors.append(("moco.temperature", f"must be > 0, got {t}"))
    if not 0.0 <= m <= 1.0:
      errors.append(("moco.momentum", f"EMA momentum must be in [0, 1], got {m}"))
    return errors

  def init_state(self, key: jax.Array, config: ml_collections.ConfigDict) -> dict[str, Any]:
    queue = l2_normalize(jax.random.normal(key, (self.queue_size, config.model.proj_dim)))
    return {"queue": queue, "queue_ptr": jnp.zeros((), jnp.int32)}

  def global_loss(self, state, online, targets, mix, axis_name):
    q, k = online[0]["embedding"], targets[0]
    if mix is None:
      per_example = objectives.moco_per_example(q, k, state.queue, self.temperature)
    else:  # Mixup / CutMix view 0: perm holds the donors' indices in the global batch
      lam, perm = mix
      offset = parallel.global_offset(q.shape[0])
      per_example = objectives.moco_mix_per_example(
          q,
          jax.lax.all_gather(k, axis_name, tiled=True),
          state.queue,
          offset + jnp.arange(q.shape[0]),
          perm,
          lam,
          self.temperature,
      )
    return per_example, {"moco_accuracy": objectives.moco_accuracy(q, k, state.queue)}

  def local_losses(self, state, local, online, targets, axis_name):
    return [
        objectives.moco_per_example(local["embedding"], targets[0], state.queue, self.temperature)
    ]

  def after_update(self, state, targets, axis_name):
    keys = jax.lax.all_gather(targets[0], axis_name, tiled=True)
    queue, ptr = objectives.enqueue(state.queue, state.queue_ptr, keys)
    return {"queue": queue, "queue_ptr": ptr}
