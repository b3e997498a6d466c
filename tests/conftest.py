"""Test setup: 4 fake CPU devices so every pmap path runs multi-device, quiet TF."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
