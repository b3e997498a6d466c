"""A guard against training that blows up with finite weights, before it overwrites good
checkpoints.

A run resumed with a far too large learning rate can stay finite while its weights grow by
orders of magnitude and its features collapse; the non-finite check never fires, the next
saves rotate the good checkpoints away and the final export replaces the good one. Before
each save the loop compares the parameters' global L2 norm with the norm at the last
checkpoint (or at the start of the run); a growth by more than
`config.max_param_norm_growth` (0: off) stops the run without saving, keeping every
checkpoint written so far.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


class DivergenceError(FloatingPointError):
  """The parameters' norm grew past config.max_param_norm_growth since the last checkpoint."""


def param_norm(params: Any) -> float:
  """Global L2 norm of a parameter tree (host or device arrays), in float64."""
  leaves = jax.tree_util.tree_leaves(jax.device_get(params))
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in leaves)))


class DivergenceGuard:
  """Tracks the parameters' norm at the last good point; `check` raises DivergenceError."""

  def __init__(self, max_growth: float, params: Any, step: int):
    self.max_growth = float(max_growth)
    self.norm = param_norm(params) if self.max_growth > 0 else 0.0
    self.step = step

  def check(self, params: Any, step: int, last_checkpoint: int | None, directory: str) -> None:
    """Before saving `step`: raise if the norm grew too much, else make it the reference."""
    if self.max_growth <= 0:
      return
    norm = param_norm(params)
    if self.norm > 0 and norm > self.max_growth * self.norm:
      kept = (
          f"the checkpoints up to step {last_checkpoint} in {directory} are kept"
          if last_checkpoint is not None
          else f"no checkpoint was written to {directory}"
      )
      raise DivergenceError(
          f"training diverged: at step {step} the parameters' norm is {norm:.3g}, "
          f"{norm / self.norm:.3g}x its {self.norm:.3g} at step {self.step} (more than "
          f"config.max_param_norm_growth={self.max_growth:g}); the run stopped without saving, "
          f"{kept}. Lower optim.base_lr (a resumed run keeps the checkpoint's weights but takes "
          "the new config's), or raise config.max_param_norm_growth if this growth is meant."
      )
    self.norm, self.step = norm, step
