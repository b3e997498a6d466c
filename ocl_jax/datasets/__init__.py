"""Datasets of ocl_jax; importing this registers their TFDS builders."""

from ocl_jax.datasets import scenes  # noqa: F401  (registers `scenes`)
