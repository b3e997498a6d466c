"""ocl_jax: object-aware contrastive self-supervised learning in JAX/Flax."""

from ocl_jax.data import scenes  # noqa: F401  registers the `scenes` TFDS builder
