"""Contrastive methods by name: each one module implementing `Method`, registered here.

The train step (ocl_jax/train/step.py) is written once against this protocol and
never names a method: which views go through the online and the target network,
the per-pair losses of the global and local crops, and what changes after the
update (EMA target, MoCo queue) all come from the method object chosen by
`config.method`. docs/extending.md shows how to add one.
"""

from ocl_jax.methods import byol, moco, simclr  # noqa: F401  the built-in methods register
from ocl_jax.methods.base import (
    REGISTRY,
    Method,
    Outputs,
    create,
    ema,
    get,
    names,
    register,
    unregister,
)

__all__ = [
    "REGISTRY",
    "Method",
    "Outputs",
    "create",
    "ema",
    "get",
    "names",
    "register",
    "unregister",
]
