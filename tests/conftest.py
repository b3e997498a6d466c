"""Test setup: 4 fake CPU devices so every pmap path runs multi-device, quiet TF."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def scenes_data_dir(tmp_path_factory):
  """A data dir holding the rendered `scenes/tiny` arrays (32 px, a few hundred images)."""
  from ocl_jax.data import scenes

  data_dir = str(tmp_path_factory.mktemp("data"))
  scenes.prepare(scenes.CONFIGS["tiny"], data_dir)
  return data_dir


def tiny_split(data_dir, split):
  """The arrays of a `scenes/tiny` split (image, mask, label, id, boxes, classes, ...)."""
  from ocl_jax.data import scenes

  return scenes.load_split(scenes.CONFIGS["tiny"], data_dir, split)


@pytest.fixture
def tiny_config(scenes_data_dir):
  """configs/scenes.py shrunk to scenes/tiny and a very small ResNet: seconds per run."""
  return make_tiny_config(scenes_data_dir)


def make_tiny_config(scenes_data_dir):
  from ocl_jax.configuration import load_sibling_config
  import pathlib

  c = load_sibling_config(
      str(pathlib.Path(__file__).parents[1] / "configs" / "scenes.py"), "scenes.py"
  )
  c.dataset.name = "scenes/tiny"
  c.dataset.data_dir = scenes_data_dir
  c.dataset.image_size = 32
  c.augment.crop_size = 32
  c.model.arch = "resnet10"
  c.model.width = 4
  c.model.small_stem = True
  c.model.proj_dim = 8
  c.model.pred_hidden_dim = 16
  c.batch_size = 16
  c.moco.queue_size = 64
  c.num_train_steps = 4
  c.log_every_steps = 2
  c.eval_every_steps = 4
  c.checkpoint_every_steps = 2
  c.probe.eval_batches = 2
  c.view_pictures = 0
  return c


def pipeline_test_config(c):
  """`c` (the tiny config) set up for the pipeline and the ContraCAM / evaluation modes: two
  steps per stage, one-step ContraCAM, a short probe sweep, a small SGCL saliency map."""
  c.mode = "pipeline"
  c.num_train_steps = 2
  c.log_every_steps = c.checkpoint_every_steps = 2
  c.eval_every_steps = 0
  c.contracam.iterations = 1
  c.contracam.expand_res = 1
  c.contracam.batch_size = 32
  c.evaluation.image_size = 32
  c.evaluation.batch_size = 32
  c.evaluation.num_l2_values = 3
  c.evaluation.lbfgs_max_iters = 20
  c.evaluation.knn_k = 5
  c.evaluation.protocols = ("linear",)
  c.pipeline.localization_images = 16
  c.saliency.resolution, c.saliency.expand_res, c.saliency.map_size = 32, 1, 8
  c.saliency.coverage_masks, c.saliency.picture_images = "gt", 2
  return c


def train_two_steps(config, workdir, caplog):
  """Train `config` for 2 steps (log and checkpoint at 2, no eval/export): (state, log text).

  Checks what every such run must satisfy: the step count and finite parameters.
  """
  import logging
  import numpy as np
  from ocl_jax import train

  config.num_train_steps = 2
  config.log_every_steps = config.checkpoint_every_steps = 2
  config.eval_every_steps = 0
  config.export_encoder = False
  with caplog.at_level(logging.INFO):
    state = train.train_and_evaluate(config, str(workdir))
  assert int(state.step) == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state.params))
  return state, caplog.text


def export_random_init(config, workdir):
  """A random-init model of `config` exported to WORKDIR/export, as a finished run leaves it:
  (host state, export dir)."""
  import os
  from ocl_jax import export
  from ocl_jax import train
  from ocl_jax.models import ModelSpec

  ctx = train.make_context(config, 4, 10)
  state = jax.device_get(train.create_train_state(0, config, ctx))
  export_dir = export.export_encoder(
      os.path.join(workdir, "export"),
      state.params,
      state.batch_stats,
      ModelSpec.from_config(config),
      config,
  )
  return state, export_dir
