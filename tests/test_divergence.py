"""train/divergence: the parameter-norm guard, by hand and in a resumed run that blows up."""

import logging
import os

import numpy as np
import pytest

from ocl_jax import train
from ocl_jax.train import divergence
from tests.conftest import make_tiny_config


def test_param_norm_by_hand():
  tree = {"a": np.array([3.0, 0.0]), "b": {"c": np.array([[4.0]], np.float32)}}
  assert divergence.param_norm(tree) == 5.0


def test_guard_raises_past_the_growth_and_moves_its_reference():
  guard = divergence.DivergenceGuard(10.0, {"w": np.ones(4)}, step=0)  # norm 2
  guard.check({"w": np.full(4, 5.0)}, 10, None, "/c")  # 10 = 5x: fine, the new reference
  assert guard.norm == 10.0 and guard.step == 10
  with pytest.raises(divergence.DivergenceError, match=r"step 20 .* 20x its 10 at step 10"):
    guard.check({"w": np.full(4, 100.0)}, 20, 10, "/c")
  off = divergence.DivergenceGuard(0.0, {"w": np.ones(4)}, step=0)
  off.check({"w": np.full(4, 1e30)}, 5, None, "/c")  # 0: off


def test_a_resumed_run_with_a_huge_learning_rate_stops_before_overwriting(
    scenes_data_dir, tmp_path, caplog
):
  """Train 4 steps; resume to 8 with base_lr=1e6: the run stops with DivergenceError at its
  next save, and the checkpoints of steps 2 and 4 are still there, untouched."""
  c = make_tiny_config(scenes_data_dir)
  c.num_train_steps, c.eval_every_steps, c.export_encoder = 4, 0, True
  work = str(tmp_path / "run")
  train.train_and_evaluate(c, work)
  ckpts = os.path.join(work, "checkpoints")
  before = sorted(os.listdir(ckpts))
  export_mtime = os.path.getmtime(os.path.join(work, "export", "model.json"))
  c.num_train_steps, c.optim.base_lr, c.nonfinite = 8, 1e6, "skip"
  with caplog.at_level(logging.WARNING), pytest.raises(divergence.DivergenceError) as e:
    train.train_and_evaluate(c, work)
  assert "training diverged" in str(e.value) and "checkpoints up to step 4" in str(e.value)
  assert sorted(os.listdir(ckpts)) == before  # nothing new saved, nothing rotated away
  assert os.path.getmtime(os.path.join(work, "export", "model.json")) == export_mtime
  assert "optim.base_lr" in caplog.text  # and the resume named the changed field
