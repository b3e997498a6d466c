"""A checkpoint written by an earlier version of the code restores and resumes.

tests/data/checkpoint_fixture holds the checkpoints of a 2-step run of the tiny scenes config
(MoCo v2 with BG-mixup: queue and FIFO in the state; tests/make_checkpoint_fixture.py). The
current code must restore it into its own TrainState and train on to step 4.
"""

import logging
import shutil

import jax
import numpy as np
import pytest

from ocl_jax import train
from ocl_jax.checkpointing import CheckpointMismatchError
from tests import make_checkpoint_fixture


def test_fixture_restores_and_resumes(scenes_data_dir, tmp_path, caplog):
  workdir = tmp_path / "work"
  shutil.copytree(make_checkpoint_fixture.PATH, workdir / "checkpoints")
  config = make_checkpoint_fixture.fixture_config(scenes_data_dir)
  config.num_train_steps = 4
  with caplog.at_level(logging.INFO):
    state = train.train_and_evaluate(config, str(workdir))
  assert "Restored checkpoint" in caplog.text and "/2" in caplog.text
  assert int(state.step) == 4
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state.params))
  assert state.queue is not None and state.bg_fifo is not None
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == "4"


def test_fields_added_since_take_their_defaults_and_are_still_compared(scenes_data_dir, tmp_path):
  """The fixture's model record predates model.proj_batch_norm: it reads as True (the only
  projector then), so a config asking for the BatchNorm-free projector is refused, naming it."""
  workdir = tmp_path / "work"
  shutil.copytree(make_checkpoint_fixture.PATH, workdir / "checkpoints")
  config = make_checkpoint_fixture.fixture_config(scenes_data_dir)
  config.model.proj_batch_norm = False
  with pytest.raises(CheckpointMismatchError, match=r"model\.proj_batch_norm True .* vs False"):
    train.train_and_evaluate(config, str(workdir))
