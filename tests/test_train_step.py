"""The pmapped train step: device-count invariance, objectives, EMA, queue, probe."""

import functools

import jax
import numpy as np
import pytest

from ocl_jax import parallel, train
from ocl_jax.configuration import load_sibling_config

CONFIGS = __file__.rsplit("/tests/", 1)[0] + "/configs/default.py"


def tiny_config(method):
  c = load_sibling_config(CONFIGS, "default.py")
  c.method = method
  c.model.arch = "resnet10"
  c.model.width = 4
  c.model.small_stem = True
  c.model.proj_dim = 8
  c.model.pred_hidden_dim = 16
  c.augment.crop_size = 24
  c.dataset.image_size = 32
  c.batch_size = 8
  c.moco.queue_size = 32
  c.num_train_steps = 10
  return c


def fake_batch(n, size=32, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
          "aspect": rng.uniform(0.75, 1.33, n).astype(np.float32),
          "label": rng.integers(0, 5, n).astype(np.int32)}


@functools.lru_cache(maxsize=None)
def compiled(method, num_devices):
  """(config, initial state, pmapped step) per method and device count, compiled once per module."""
  config = tiny_config(method)
  ctx = train.make_context(config, 10, num_classes=5)
  state = train.create_train_state(0, config, ctx)
  devices = jax.local_devices()[:num_devices]
  p_step = jax.pmap(functools.partial(train.train_step, ctx=ctx), axis_name=parallel.AXIS,
                    devices=devices)
  return config, state, p_step, devices


def run_steps(method, num_devices, num_steps=2, constant_images=False):
  config, state, p_step, devices = compiled(method, num_devices)
  state = parallel.replicate(state, devices)
  losses = []
  for s in range(num_steps):
    batch = fake_batch(config.batch_size, seed=s)
    if constant_images:  # one flat colour per image: both views share it
      batch["image"][:] = batch["image"][:, :1, :1, :]
    batch = {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in batch.items()}
    state, metrics = p_step(state, batch)
    losses.append(float(metrics["loss"][0]))
  return parallel.unreplicate(state), losses, parallel.unreplicate(metrics)


@pytest.mark.parametrize("method", ["moco", "byol", "simclr"])
def test_four_devices_equal_one_device(method):
  """Same global batch: identical loss, params, BN statistics, EMA target and queue."""
  state1, losses1, _ = run_steps(method, 1)
  state4, losses4, _ = run_steps(method, 4)
  np.testing.assert_allclose(losses4, losses1, rtol=1e-4, atol=1e-5)
  for name in ("params", "batch_stats", "target_params", "target_batch_stats", "queue", "probe_params"):
    a, b = getattr(state1, name), getattr(state4, name)
    if a is None:
      assert b is None
      continue
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-3, atol=2e-5), a, b)
  assert int(state4.step) == 2


def test_step_updates_params_ema_and_queue():
  config, init, _, _ = compiled("moco", 1)
  state, _, metrics = run_steps("moco", 1, num_steps=1)
  # The online network moved; the target is exactly the EMA of the new online params.
  m = config.moco.momentum
  w0 = np.asarray(init.params["encoder"]["conv1"]["kernel"])
  w1 = np.asarray(state.params["encoder"]["conv1"]["kernel"])
  assert not np.allclose(w0, w1)
  np.testing.assert_allclose(state.target_params["encoder"]["conv1"]["kernel"],
                             m * w0 + (1 - m) * w1, rtol=1e-5, atol=1e-7)
  # The global batch's 8 keys were written to queue slots 0..7, unit norm; the rest untouched.
  assert int(state.queue_ptr) == 8
  np.testing.assert_allclose(np.linalg.norm(state.queue[:8], axis=1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(state.queue[8:], np.asarray(init.queue[8:]))
  assert not np.allclose(state.queue[:8], np.asarray(init.queue[:8]))
  # Learning rate is the schedule's value at step 0: the peak.
  np.testing.assert_allclose(metrics["learning_rate"], config.optim.base_lr * 8 / 256, rtol=1e-6)
  assert "moco_accuracy" in metrics and 0 <= metrics["probe_accuracy"] <= 1


def test_simclr_has_no_target_and_finds_positives_at_init():
  state, losses, _ = run_steps("simclr", 1, num_steps=1, constant_images=True)
  assert state.target_params is None and state.queue is None
  # Two views of one flat-colour image are closer than views of different images even
  # at init, so with the right positive index NT-Xent is below chance, log(2N - 1).
  assert 0 < losses[0] < np.log(2 * 8 - 1)
