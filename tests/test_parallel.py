"""Host-side parallel set-up (the pmapped step itself is tested in test_train_step.py)."""

import os

import pytest

from ocl_jax import parallel


def test_use_cpu_devices_sets_one_device_per_core_dividing_the_batch(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  monkeypatch.setattr(parallel, "usable_cores", lambda: 6)
  assert parallel.use_cpu_devices(0, batch_size=64) == 4  # the largest count <= 6 dividing 64
  assert os.environ["XLA_FLAGS"].split() == [
      "--xla_cpu_enable_fast_math=false",
      "--xla_force_host_platform_device_count=4",
  ]
  assert parallel.use_cpu_devices(2, batch_size=64) == 1  # a count is already set: left alone
  monkeypatch.setenv("XLA_FLAGS", "")
  assert parallel.use_cpu_devices(1, batch_size=64) == 1 and os.environ["XLA_FLAGS"] == ""
  monkeypatch.setattr(parallel, "usable_cores", lambda: 3)
  assert parallel.use_cpu_devices(0, batch_size=64) == 2  # 0: one per core, at most a divisor of 64
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
  with pytest.raises(ValueError, match="cpu_devices must be >= 0"):
    parallel.use_cpu_devices(-1, batch_size=64)
  monkeypatch.setenv("XLA_FLAGS", "")
  with pytest.raises(ValueError, match="cpu_devices=3 does not divide the global batch of 64"):
    parallel.use_cpu_devices(3, batch_size=64)
