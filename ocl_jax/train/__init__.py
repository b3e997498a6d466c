"""Contrastive pretraining: the train state, the per-device step and the loop.

The public API in one place: `from ocl_jax import train; train.make_context(...)`.
"""

from ocl_jax.train.loop import NonFiniteError, RunTiming, train_and_evaluate
from ocl_jax.train.state import StepContext, TrainState, create_train_state, make_context
from ocl_jax.train.step import augment_views, probe_eval_step, train_step, update_from_views

__all__ = [
    "NonFiniteError",
    "RunTiming",
    "StepContext",
    "TrainState",
    "augment_views",
    "create_train_state",
    "make_context",
    "probe_eval_step",
    "train_and_evaluate",
    "train_step",
    "update_from_views",
]
