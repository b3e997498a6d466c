"""Data parallelism: the named device axis, replication and global example indices.

The per-device step is written once against `AXIS`; `jax.pmap` maps it over
the local devices and, in a multi-process job, its collectives span every
device of every process.
"""

from __future__ import annotations

from typing import Any

import flax.jax_utils
import jax
import numpy as np

AXIS = "batch"


def replicate(tree: Any, devices: list[jax.Device] | None = None) -> Any:
  """Copy a pytree onto every local device (leading device axis), as pmap expects."""
  # The mesh axis is named like pmap's, so pmap outputs and inputs share one sharding
  # and the step compiles once.
  return flax.jax_utils.replicate(tree, devices or jax.local_devices(), axis_name=AXIS)


def prefetch_to_device(iterator, size: int, devices: list[jax.Device] | None = None):
  """Stage `size` batches on the devices ahead of the step (leading axis = local devices)."""
  return flax.jax_utils.prefetch_to_device(iterator, size, devices, axis_name=AXIS)


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a replicated pytree, as NumPy on the host."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x[0]), jax.device_get(tree))


def global_offset(local_batch: int) -> jax.Array:
  """Index of this device's first example in the global batch (inside pmap).

  Keys derived from global indices make augmentation independent of how the
  global batch is split over devices and processes. With several processes
  the axis index is global and process-major (process p holds devices
  p*D ... p*D+D-1), matching the input pipeline's per-process slices.
  """
  return jax.lax.axis_index(AXIS) * local_batch
