"""Data parallelism: the named device axis, replication and global example indices.

The per-device step is written once against `AXIS`; `jax.pmap` maps it over
the local devices and, in a multi-process job, its collectives span every
device of every process.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

AXIS = "batch"


def replicate(tree: Any) -> Any:
  """Copy a host pytree onto every local device (leading device axis)."""
  return jax.device_put_replicated(tree, jax.local_devices())


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a replicated pytree, as NumPy on the host."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x[0]), jax.device_get(tree))


def global_offset(local_batch: int) -> jax.Array:
  """Index of this device's first example in the global batch (inside pmap).

  Keys derived from global indices make augmentation independent of how the
  global batch is split over devices and processes.
  """
  return jax.lax.axis_index(AXIS) * local_batch
