"""SimCLR: NT-Xent between the two views, the rest of the global batch as negatives."""

from __future__ import annotations

import dataclasses

import ml_collections

from ocl_jax.methods import objectives
from ocl_jax.methods.base import Method, register


@register
@dataclasses.dataclass(frozen=True)
class SimCLR(Method):
  """docs/method.md#pretraining: NT-Xent; a local crop is paired with global view 1."""

  name = "simclr"
  online_views = (0, 1)

  temperature: float = 0.5

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "SimCLR":
    return cls(temperature=float(config.simclr.temperature))

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    t = config.simclr.temperature
    return [] if t > 0 else [("simclr.temperature", f"must be > 0, got {t}")]

  def global_loss(self, state, online, targets, mix, axis_name):
    return (
        objectives.nt_xent_per_example(
            online[0]["embedding"], online[1]["embedding"], self.temperature, axis_name
        ),
        {},
    )

  def local_losses(self, state, local, online, targets, axis_name):
    return [
        objectives.nt_xent_per_example(
            local["embedding"], online[1]["embedding"], self.temperature, axis_name
        )
    ]
