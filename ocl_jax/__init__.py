"""ocl_jax: object-aware contrastive self-supervised learning in JAX/Flax."""
