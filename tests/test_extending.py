"""docs/extending.md, executed: a method and a view transform registered from outside the
package (here, in the test file) train and evaluate through the normal entry point."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest

from ocl_jax import main, methods
from ocl_jax.views import compose
from tests.conftest import pipeline_test_config


@dataclasses.dataclass(frozen=True)
class Align(methods.Method):
  """A toy objective: each online embedding moves toward the other view's (stop-gradient), as
  SimSiam without its predictor; a local crop aligns with view 1."""

  name = "toy_align"
  online_views = (0, 1)

  def global_loss(self, state, online, targets, mix, axis_name):
    z0, z1 = online[0]["embedding"], online[1]["embedding"]
    sg = jax.lax.stop_gradient
    return 2.0 - jnp.sum(z0 * sg(z1), -1) - jnp.sum(z1 * sg(z0), -1), {}

  def local_losses(self, state, local, online, targets, axis_name):
    z = jax.lax.stop_gradient(online[1]["embedding"])
    return [2.0 - 2.0 * jnp.sum(local["embedding"] * z, -1)]


def invert(key, images, params, inp, carried):
  """A toy view-0 transform: inverts the colours of each image with probability `params`."""
  flip = jax.random.bernoulli(key, params, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, 1.0 - images, images), {}


@pytest.fixture
def registered():
  """Align and `invert` (on when the config has `toy_invert`) for one test, then removed."""
  methods.register(Align)
  compose.register_transform("invert", lambda c: c.get("toy_invert"), stream=100)(invert)
  yield
  methods.unregister("toy_align")
  compose.unregister_transform("invert")


def test_the_toy_method_and_transform_are_chosen_by_the_config(registered, tiny_config):
  tiny_config.method, tiny_config.toy_invert = "toy_align", 0.5
  assert isinstance(methods.create(tiny_config), Align)
  plan = compose.ViewPlan.from_config(tiny_config)
  assert plan.transforms[-1] == ("invert", 0.5)


def test_a_method_registered_outside_trains_and_evaluates(registered, tiny_config, tmp_path):
  c = pipeline_test_config(tiny_config)
  c.mode, c.method, c.toy_invert = "train", "toy_align", 0.5
  c.evaluation.protocols = ("knn",)
  c.evaluation.max_examples = 64
  workdir = str(tmp_path / "toy")
  state = main.run_mode(c, workdir)
  assert int(state.step) == 2 and state.target_params is None and state.queue is None
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(state.params))
  c.mode = "eval"
  rows = main.run_mode(c, workdir)
  (row,) = rows.values()
  assert 0.0 <= row["scenes/knn/test"] <= 100.0 and not math.isnan(row["scenes/knn/test"])
