"""Objectives against NumPy references, on one device and over 4 fake devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ocl_jax.methods import objectives


def _normalized(rng, *shape):
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_ce(logits, target):
  m = logits.max(axis=1, keepdims=True)
  lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
  return lse - logits[np.arange(len(target)), target]


def np_moco(q, k, queue, t):
  logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ queue.T], 1) / t
  return _np_ce(logits, np.zeros(len(q), int))


def np_nt_xent(z1, z2, t):
  z = np.concatenate([z1, z2])
  n = len(z1)
  sim = z @ z.T / t
  np.fill_diagonal(sim, -np.inf)
  target = np.concatenate([np.arange(n) + n, np.arange(n)])
  per_anchor = _np_ce(sim, target)
  return 0.5 * (per_anchor[:n] + per_anchor[n:])


def test_moco_matches_numpy():
  rng = np.random.default_rng(0)
  q, k, queue = _normalized(rng, 8, 16), _normalized(rng, 8, 16), _normalized(rng, 32, 16)
  got = objectives.moco_per_example(jnp.array(q), jnp.array(k), jnp.array(queue), 0.2)
  np.testing.assert_allclose(got, np_moco(q, k, queue, 0.2), rtol=1e-5, atol=1e-5)


def test_moco_gradient_ignores_keys_and_queue():
  rng = np.random.default_rng(1)
  q, k, queue = _normalized(rng, 4, 8), _normalized(rng, 4, 8), _normalized(rng, 16, 8)
  gk, gqueue = jax.grad(
      lambda k, qu: objectives.moco_per_example(q, k, qu, 0.2).sum(), argnums=(0, 1)
  )(k, queue)
  assert np.all(gk == 0) and np.all(gqueue == 0)


def test_moco_accuracy_hand_case():
  q = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  k = jnp.array([[1.0, 0.0], [1.0, 0.0]])  # second query's key is orthogonal
  queue = jnp.array([[0.0, 1.0], [-1.0, 0.0]])  # ... and the queue holds its own direction
  assert float(objectives.moco_accuracy(q, k, queue)) == 0.5


def test_enqueue_is_fifo_ring():
  queue = jnp.zeros((6, 2))
  ptr = jnp.array(0)
  for i in range(4):
    keys = jnp.full((2, 2), float(i + 1))
    queue, ptr = objectives.enqueue(queue, ptr, keys)
  # 4 batches of 2 into 6 slots: batch 4 overwrote batch 1's slots.
  np.testing.assert_array_equal(queue[:, 0], [4, 4, 2, 2, 3, 3])
  assert int(ptr) == 2


def test_byol_matches_numpy():
  rng = np.random.default_rng(2)
  p1, p2, y1, y2 = (rng.normal(size=(5, 12)).astype(np.float32) for _ in range(4))
  cos = lambda a, b: np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
  expected = -2 * (cos(p1, y2) + cos(p2, y1))
  np.testing.assert_allclose(objectives.byol_per_example(p1, p2, y1, y2), expected, rtol=1e-5)
  # Identical predictions and targets reach the minimum, -4.
  np.testing.assert_allclose(objectives.byol_per_example(p1, p1, p1, p1), -4.0, rtol=1e-6)


def test_nt_xent_matches_numpy_single_device():
  rng = np.random.default_rng(3)
  z1, z2 = _normalized(rng, 6, 8), _normalized(rng, 6, 8)
  got = objectives.nt_xent_per_example(jnp.array(z1), jnp.array(z2), 0.2)
  np.testing.assert_allclose(got, np_nt_xent(z1, z2, 0.2), rtol=1e-5, atol=1e-5)


def test_nt_xent_over_devices_equals_global_batch():
  """Loss and gradients over 4 devices (negatives all-gathered) = one device, same global batch."""
  n_dev = 4
  assert jax.local_device_count() >= n_dev
  rng = np.random.default_rng(4)
  z1, z2 = _normalized(rng, 8, 8), _normalized(rng, 8, 8)

  def global_loss(z1, z2):
    return objectives.weighted_mean(objectives.nt_xent_per_example(z1, z2, 0.2))

  loss, (g1, g2) = jax.value_and_grad(global_loss, argnums=(0, 1))(z1, z2)

  def device_loss(a, b):
    per = objectives.nt_xent_per_example(a, b, 0.2, axis_name="d")
    return objectives.weighted_mean(per, axis_name="d")

  def step(a, b):
    loss, g = jax.value_and_grad(device_loss, argnums=(0, 1))(a, b)
    # Parameter gradients are pmean'd in training; the embedding gradients here are
    # per-device rows, so scale the same way: 1/devices of the summed cotangent.
    return jax.lax.pmean(loss, "d"), jax.tree_util.tree_map(lambda x: x / n_dev, g)

  shard = lambda x: x.reshape(n_dev, -1, x.shape[-1])
  dl, (dg1, dg2) = jax.pmap(step, axis_name="d", devices=jax.local_devices()[:n_dev])(
      shard(z1), shard(z2)
  )
  np.testing.assert_allclose(dl[0], loss, rtol=1e-5)
  np.testing.assert_allclose(dg1.reshape(g1.shape), g1, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(dg2.reshape(g2.shape), g2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("use_weights", [False, True])
def test_weighted_mean_over_devices(use_weights):
  rng = np.random.default_rng(5)
  losses = rng.normal(size=8).astype(np.float32)
  weights = (
      rng.uniform(0.1, 2.0, size=8).astype(np.float32) if use_weights else np.ones(8, np.float32)
  )
  expected = np.sum(weights * losses) / np.sum(weights)
  out = jax.pmap(
      lambda per, w: jax.lax.pmean(objectives.weighted_mean(per, w, "d"), "d"),
      axis_name="d",
      devices=jax.local_devices()[:4],
  )(losses.reshape(4, 2), weights.reshape(4, 2))
  np.testing.assert_allclose(out[0], expected, rtol=1e-5)
  np.testing.assert_allclose(objectives.weighted_mean(losses, weights), expected, rtol=1e-5)


def test_moco_mix_matches_numpy_and_reduces_to_one_target():
  rng = np.random.default_rng(5)
  q, keys, queue = _normalized(rng, 4, 8), _normalized(rng, 8, 8), _normalized(rng, 16, 8)
  own, donor = np.array([4, 5, 6, 7]), np.array([6, 4, 7, 5])  # this device holds keys 4..7
  lam = np.array([1.0, 0.5, 0.75, 0.9], np.float32)
  got = objectives.moco_mix_per_example(
      jnp.array(q),
      jnp.array(keys),
      jnp.array(queue),
      jnp.array(own),
      jnp.array(donor),
      jnp.array(lam),
      0.2,
  )
  logits = np.concatenate([q @ keys.T, q @ queue.T], 1) / 0.2
  want = lam * _np_ce(logits, own) + (1 - lam) * _np_ce(logits, donor)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # lam = 1: plain InfoNCE with the other batch keys as extra negatives.
  assert np.isclose(float(got[0]), _np_ce(logits, own)[0], atol=1e-5)
