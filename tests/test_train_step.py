"""The pmapped train step: device-count invariance, objectives, EMA, queue, probe."""

import functools

import jax
import numpy as np
import pytest

from ocl_jax import parallel
from ocl_jax import train
from ocl_jax.configuration import load_sibling_config

CONFIGS = __file__.rsplit("/tests/", 1)[0] + "/configs/default.py"


def tiny_config(method, sgcl=()):
  """The tiny setting; `sgcl` (field, value) pairs switch SGCL on with those saliency fields."""
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
  if sgcl:
    c.saliency.enabled = True
    c.saliency.resolution, c.saliency.expand_res, c.saliency.map_size = 32, 1, 8
    c.saliency.local_crop_size = 16
    for field, value in sgcl:
      c.saliency[field] = value
  return c


def fake_batch(n, size=32, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
      "aspect": rng.uniform(0.75, 1.33, n).astype(np.float32),
      "label": rng.integers(0, 5, n).astype(np.int32),
      "index": np.arange(n, dtype=np.int32),
  }


@functools.lru_cache(maxsize=None)
def compiled(method, num_devices, sgcl=()):
  """(config, initial state, pmapped step) per method, device count and SGCL setting,
  compiled once per module."""
  config = tiny_config(method, sgcl)
  ctx = train.make_context(config, 10, num_classes=5, num_examples=16)
  state = train.create_train_state(0, config, ctx)
  devices = jax.local_devices()[:num_devices]
  p_step = jax.pmap(
      functools.partial(train.train_step, ctx=ctx), axis_name=parallel.AXIS, devices=devices
  )
  return config, state, p_step, devices


def run_steps(method, num_devices, num_steps=2, constant_images=False, sgcl=(), history=None):
  config, state, p_step, devices = compiled(method, num_devices, sgcl)
  state = parallel.replicate(state, devices)
  losses = []
  for s in range(num_steps):
    batch = fake_batch(config.batch_size, seed=s)
    if constant_images:  # one flat colour per image: both views share it
      batch["image"][:] = batch["image"][:, :1, :1, :]
    batch = {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in batch.items()}
    state, metrics = p_step(state, batch)
    losses.append(float(metrics["loss"][0]))
    if history is not None:
      history.append(parallel.unreplicate(metrics))
  return parallel.unreplicate(state), losses, parallel.unreplicate(metrics)


# SimCLR's split invariance is in the slow suite here and in test_device_invariance: its
# step is MoCo's without the queue and the target network, both checked here by moco / byol.
@pytest.mark.parametrize("method", ["moco", "byol", pytest.param("simclr", marks=pytest.mark.slow)])
def test_four_devices_equal_one_device(method):
  """Same global batch: identical loss, params, BN statistics, EMA target and queue."""
  state1, losses1, _ = run_steps(method, 1)
  state4, losses4, _ = run_steps(method, 4)
  np.testing.assert_allclose(losses4, losses1, rtol=1e-4, atol=1e-5)
  for name in (
      "params",
      "batch_stats",
      "target_params",
      "target_batch_stats",
      "queue",
      "probe_params",
  ):
    a, b = getattr(state1, name), getattr(state4, name)
    if a is None:
      assert b is None
      continue
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-3, atol=2e-5), a, b
    )
  assert int(state4.step) == 2


def test_step_updates_params_ema_and_queue():
  config, init, _, _ = compiled("moco", 1)
  state, _, metrics = run_steps("moco", 1, num_steps=1)
  # The online network moved; the target is exactly the EMA of the new online params.
  m = config.moco.momentum
  w0 = np.asarray(init.params["encoder"]["conv1"]["kernel"])
  w1 = np.asarray(state.params["encoder"]["conv1"]["kernel"])
  assert not np.allclose(w0, w1)
  np.testing.assert_allclose(
      state.target_params["encoder"]["conv1"]["kernel"], m * w0 + (1 - m) * w1, rtol=1e-5, atol=1e-7
  )
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


# ---- SGCL (docs/method.md#sgcl) --------------------------------------------------------

STATE_FIELDS = (
    "params",
    "batch_stats",
    "opt_state",
    "target_params",
    "target_batch_stats",
    "queue",
    "probe_params",
)


@pytest.mark.parametrize("method", ["moco", "byol", "simclr"])
def test_sgcl_with_gamma_and_temperature_zero_is_the_baseline_bit_for_bit(method):
  """Online saliency is computed, but crops are plain and every pair weighs exactly 1."""
  base, base_losses, _ = run_steps(method, 1)
  sgcl, sgcl_losses, metrics = run_steps(
      method, 1, sgcl=(("gamma", 0.0), ("crop_temperature", 0.0))
  )
  assert sgcl_losses == base_losses
  for name in STATE_FIELDS:
    for a, b in zip(
        jax.tree_util.tree_leaves(getattr(base, name)),
        jax.tree_util.tree_leaves(getattr(sgcl, name)),
    ):
      np.testing.assert_array_equal(a, b)
  assert float(metrics["sgcl_weight_min"]) == float(metrics["sgcl_weight_max"]) == 1.0
  assert float(metrics["saliency_refreshed"]) == 1.0


SGCL_ON = (("gamma", 1.0), ("crop_temperature", 1.0), ("num_local_crops", 2), ("every_k_steps", 2))


def test_sgcl_step_with_bank_and_local_crops_is_device_count_invariant():
  """Saliency negatives, pair-weight normalisation and the bank span all 4 devices."""
  h1, h4 = [], []
  state1, losses1, _ = run_steps("moco", 1, num_steps=3, sgcl=SGCL_ON, history=h1)
  state4, losses4, _ = run_steps("moco", 4, num_steps=3, sgcl=SGCL_ON, history=h4)
  np.testing.assert_allclose(losses4, losses1, rtol=1e-4, atol=1e-5)
  for name in ("params", "queue", "saliency_bank"):
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(
            np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=2e-3, atol=2e-2
        ),
        getattr(state1, name),
        getattr(state4, name),
    )
  np.testing.assert_array_equal(state4.saliency_stamp, [2] * 8 + [-1] * 8)
  # Indices 0..7 every step with k = 2: computed at step 0, reused at 1, recomputed at 2.
  assert [float(m["saliency_refreshed"]) for m in h4] == [1.0, 0.0, 1.0]
  for m1, m4 in zip(h1, h4):
    np.testing.assert_allclose(m4["sgcl_weight_mean"], 1.0, rtol=1e-5)
    assert float(m4["sgcl_weight_max"]) > float(m4["sgcl_weight_min"])
    for k in ("sgcl_weight_min", "sgcl_weight_max", "sgcl_weight_entropy"):
      np.testing.assert_allclose(m4[k], m1[k], rtol=2e-3)


# BYOL's local crops are in the default suite through its golden losses (byol-sgcl_local).
@pytest.mark.parametrize("method", [pytest.param("byol", marks=pytest.mark.slow), "simclr"])
def test_sgcl_multi_crop_pairs_train(method):
  _, base_losses, _ = run_steps(method, 1, num_steps=1)
  _, losses, metrics = run_steps(method, 1, num_steps=1, sgcl=(("num_local_crops", 1),))
  assert np.isfinite(losses[0]) and losses[0] != base_losses[0]
  np.testing.assert_allclose(metrics["sgcl_weight_mean"], 1.0, rtol=1e-5)


@pytest.mark.parametrize("devices", [1, 4])
def test_online_probe_loss_and_accuracy_are_the_global_batch_means(devices):
  """After the step's pmean, the probe's loss and accuracy are those of the whole batch
  (NumPy), on one device or split over four; unlabelled examples (-1) do not count."""
  from ocl_jax.train import step as step_lib

  rng = np.random.default_rng(0)
  feats = rng.normal(size=(16, 5)).astype(np.float32)
  labels = rng.integers(-1, 3, size=16).astype(np.int32)
  params = {"kernel": rng.normal(size=(5, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)}

  def run(f, lab):
    loss, _, acc = step_lib.probe_loss_and_grad(params, f, lab, 3)
    return jax.lax.pmean(loss, parallel.AXIS), jax.lax.pmean(acc, parallel.AXIS)

  shape = lambda x: x.reshape((devices, -1) + x.shape[1:])
  loss, acc = jax.pmap(run, axis_name=parallel.AXIS, devices=jax.devices()[:devices])(
      shape(feats), shape(labels)
  )
  logits = feats @ params["kernel"]
  keep = labels >= 0
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  want_loss = -np.mean(logp[keep, labels[keep]])
  want_acc = np.mean(np.argmax(logits[keep], 1) == labels[keep])
  np.testing.assert_allclose(np.asarray(loss), want_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(acc), want_acc, rtol=1e-6)
