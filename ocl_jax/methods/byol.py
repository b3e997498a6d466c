"""BYOL: each view's prediction regresses the EMA target's projection of the other view."""

from __future__ import annotations

import dataclasses

import ml_collections

from ocl_jax.methods import objectives
from ocl_jax.methods.base import Method, register


@register
@dataclasses.dataclass(frozen=True)
class BYOL(Method):
  """docs/method.md#pretraining: symmetric BYOL; a local crop predicts both global targets."""

  name = "byol"
  uses_target = True
  uses_predictor = True
  online_views = (0, 1)
  target_views = (0, 1)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "BYOL":
    return cls(ema_momentum=float(config.byol.momentum))

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    errors = []
    if not config.model.pred_hidden_dim > 0:
      errors.append(("model.pred_hidden_dim", "BYOL needs a predictor (> 0)"))
    if not 0.0 <= config.byol.momentum <= 1.0:
      errors.append(
          ("byol.momentum", f"EMA momentum must be in [0, 1], got {config.byol.momentum}")
      )
    return errors

  def local_pairs(self, local):
    return [(local, 0), (local, 1)]

  def global_loss(self, state, online, targets, mix, axis_name):
    return (
        objectives.byol_per_example(online[0]["prediction"], online[1]["prediction"], *targets),
        {},
    )

  def local_losses(self, state, local, online, targets, axis_name):
    return [objectives.byol_one_way_per_example(local["prediction"], y) for y in targets]
