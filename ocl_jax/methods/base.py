"""The `Method` protocol and the registry of methods by name."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax
import ml_collections

# ---------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------

Outputs = dict[str, jax.Array]  # a network's outputs: features, embedding (, prediction)


@dataclasses.dataclass(frozen=True)
class Method:
  """One contrastive objective. Subclasses set the class variables and override the hooks.

  Views are numbered 0, 1 (the two global crops), then 2.. (SGCL's local crops).
  """

  name: ClassVar[str] = ""
  uses_target: ClassVar[bool] = False  # an EMA copy of encoder + projector
  uses_predictor: ClassVar[bool] = False  # the online network has a prediction head
  supports_mix: ClassVar[bool] = False  # has a two-target loss for Mixup / CutMix view 1
  online_views: ClassVar[tuple[int, ...]] = (0, 1)  # global views through the online network
  target_views: ClassVar[tuple[int, ...]] = ()  # global views through the target network

  ema_momentum: float = 0.0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Method":
    """The method's hyperparameters from the config (its own section)."""
    return cls()

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """(field, message) for each invalid setting of this method's own section."""
    return []

  def init_state(self, key: jax.Array, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Extra TrainState fields at step 0 (e.g. the MoCo queue), besides the target."""
    return {}

  def local_pairs(self, local: int) -> list[tuple[int, int]]:
    """The positive pairs (query view, key view) of local crop view `local` (>= 2)."""
    return [(local, 1)]

  def global_loss(
      self,
      state: Any,
      online: list[Outputs],
      targets: list[jax.Array],
      mix: tuple[jax.Array, jax.Array] | None,
      axis_name: str,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example loss of the global pair (0, 1), and metrics (e.g. MoCo's accuracy)."""
    raise NotImplementedError

  def local_losses(
      self,
      state: Any,
      local: Outputs,
      online: list[Outputs],
      targets: list[jax.Array],
      axis_name: str,
  ) -> list[jax.Array]:
    """Per-example losses of one local crop, one per pair of `local_pairs`, in that order."""
    raise NotImplementedError

  def after_update(self, state: Any, targets: list[jax.Array], axis_name: str) -> dict[str, Any]:
    """State fields that change after the optimiser step, besides the EMA target (the queue)."""
    return {}


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
  """Class decorator: makes `cls` available as `config.method = cls.name`."""
  if not cls.name:
    raise ValueError(f"{cls.__name__} has no `name`")
  REGISTRY[cls.name] = cls
  return cls


def unregister(name: str) -> None:
  """Removes a registered method (tests, notebooks)."""
  del REGISTRY[name]


def names() -> tuple[str, ...]:
  return tuple(REGISTRY)


def get(name: str) -> type[Method]:
  if name not in REGISTRY:
    raise KeyError(f"unknown method {name!r}; registered: {names()}")
  return REGISTRY[name]


def create(config: ml_collections.ConfigDict) -> Method:
  """The method named by `config.method`, with its hyperparameters."""
  return get(config.method).from_config(config)


def ema(momentum: float) -> Callable[[Any, Any], Any]:
  """target <- m * target + (1 - m) * online, leaf by leaf."""
  return lambda t, o: momentum * t + (1.0 - momentum) * o
