"""SGCL's pieces (docs/method.md#sgcl) against NumPy / SciPy references and hand cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from ocl_jax import parallel
from ocl_jax.views import augment
from ocl_jax.views import saliency


def _supersampled_means(boxes, maps, n=400):
  """Mean of each piecewise-constant map over its box by dense point sampling."""
  out = []
  for (x1, y1, x2, y2), m in zip(boxes, maps):
    xs = x1 + (np.arange(n) + 0.5) / n * (x2 - x1)
    ys = y1 + (np.arange(n) + 0.5) / n * (y2 - y1)
    cols = np.minimum((xs * m.shape[1]).astype(int), m.shape[1] - 1)
    rows = np.minimum((ys * m.shape[0]).astype(int), m.shape[0] - 1)
    out.append(m[rows][:, cols].mean())
  return np.array(out)


def test_crop_scores_are_the_exact_mean_of_the_map_inside_the_box():
  rng = np.random.default_rng(0)
  maps = rng.uniform(size=(32, 8, 8)).astype(np.float32)
  a, b = rng.uniform(size=(2, 32, 2))
  boxes = np.stack(
      [
          np.minimum(a[:, 0], b[:, 0]),
          np.minimum(a[:, 1], b[:, 1]),
          np.maximum(a[:, 0], b[:, 0]),
          np.maximum(a[:, 1], b[:, 1]),
      ],
      1,
  ).astype(np.float32)
  got = np.asarray(saliency.crop_scores(jnp.asarray(boxes), jnp.asarray(maps)))
  np.testing.assert_allclose(got, _supersampled_means(boxes, maps), atol=3e-3)
  # Hand case: the left half of a map that is 1 on its left column of 2 -> 1; the whole map -> 0.5.
  m = jnp.asarray([[[1.0, 0.0], [1.0, 0.0]]] * 2)
  np.testing.assert_allclose(
      saliency.crop_scores(jnp.asarray([[0, 0, 0.5, 1], [0, 0, 1, 1]]), m), [1.0, 0.5], rtol=1e-6
  )


def test_pooled_maps_are_block_means():
  maps = np.random.default_rng(1).uniform(size=(2, 12, 12)).astype(np.float32)
  want = maps.reshape(2, 4, 3, 4, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(saliency.pool_maps(jnp.asarray(maps), 4), want, rtol=1e-6)
  with pytest.raises(ValueError, match="multiple of saliency.map_size"):
    saliency.pool_maps(jnp.asarray(maps), 5)


def _centred(boxes, maps, temperature, seed=0):
  u = jax.random.uniform(jax.random.PRNGKey(seed), (len(boxes), 3))
  fn = jax.vmap(lambda b, m, uu: augment.saliency_centred_box(b, m, uu, temperature))
  return np.asarray(fn(jnp.asarray(boxes, jnp.float32), jnp.asarray(maps, jnp.float32), u))


def test_saliency_centres_follow_the_map_to_the_temperature():
  n = 20000
  sal = np.zeros((n, 2, 2), np.float32)
  sal[:, 0, 0], sal[:, 1, 1] = 1.0, 3.0  # top-left 1, bottom-right 3, others 0
  tiny = np.tile([[0.4, 0.4, 0.41, 0.41]], (n, 1))  # a 0.01 box: never shifted
  for temperature, want in ((1.0, 0.75), (2.0, 0.9)):  # P(bottom-right) = 3^t / (1 + 3^t)
    boxes = _centred(tiny, sal, temperature)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    top_left, bottom_right = (cx < 0.5) & (cy < 0.5), (cx >= 0.5) & (cy >= 0.5)
    assert np.all(top_left | bottom_right)  # never a zero-saliency cell
    assert abs(bottom_right.mean() - want) < 0.015
    # Uniform inside the chosen cell.
    assert abs(np.mean(cx[bottom_right]) - 0.75) < 0.01
  # An all-zero map falls back to uniform cells.
  boxes = _centred(tiny, np.zeros_like(sal), 1.0)
  assert abs(np.mean((boxes[:, 0] + boxes[:, 2]) / 2) - 0.5) < 0.01


def test_saliency_crops_keep_their_size_and_stay_inside_the_image():
  rng = np.random.default_rng(2)
  n = 2000
  w, h = rng.uniform(0.05, 1.0, n), rng.uniform(0.05, 1.0, n)
  boxes = np.stack([np.zeros(n), np.zeros(n), w, h], 1)
  maps = rng.uniform(size=(n, 4, 4)) ** 4
  out = _centred(boxes, maps, 3.0)
  assert out.min() >= 0.0 and out.max() <= 1.0
  np.testing.assert_allclose(out[:, 2] - out[:, 0], w, atol=1e-6)
  np.testing.assert_allclose(out[:, 3] - out[:, 1], h, atol=1e-6)


def test_augment_batch_at_temperature_zero_is_plain_random_resized_crop():
  images = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  key, cfg = jax.random.PRNGKey(0), augment.ViewConfig(crop_size=16)
  plain = augment.augment_batch(key, images, 1.0, cfg)
  maps = jnp.ones((4, 4, 4)).at[:, 0, 0].set(100.0)
  zero = augment.augment_batch(
      key, images, 1.0, cfg, saliency=maps, centre_key=jax.random.PRNGKey(1), temperature=0.0
  )
  guided = augment.augment_batch(
      key, images, 1.0, cfg, saliency=maps, centre_key=jax.random.PRNGKey(1), temperature=1.0
  )
  for a, b in zip(plain, zero):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(plain[1], guided[1])
  # Same crop sizes, same flips: only the position moved.
  np.testing.assert_allclose(
      plain[1][:, 2] - plain[1][:, 0], guided[1][:, 2] - guided[1][:, 0], atol=1e-6
  )
  np.testing.assert_array_equal(plain[2], guided[2])


def test_pair_weights_gamma_zero_is_exactly_one_and_normalised_weights_have_mean_one():
  a, b = jnp.asarray([0.0, 0.2, 1.0]), jnp.asarray([0.5, 0.0, 1.0])
  np.testing.assert_array_equal(saliency.normalize_weights(saliency.pair_weights(a, b, 0.0)), 1.0)
  w = saliency.normalize_weights(saliency.pair_weights(a, b, 2.0))
  np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(w[2] / w[0], (1.0 + 1e-6) ** 2 / (1e-6) ** 2, rtol=1e-3)


def test_weight_statistics_by_hand():
  uniform = saliency.weight_statistics(jnp.ones(8))
  np.testing.assert_allclose(uniform["sgcl_weight_entropy"], 1.0, rtol=1e-6)
  # All the weight on 1 of 4 pairs: entropy 0; two equal of 4: log 2 / log 4 = 0.5.
  np.testing.assert_allclose(
      saliency.weight_statistics(jnp.asarray([4.0, 0, 0, 0]))["sgcl_weight_entropy"], 0.0, atol=1e-7
  )
  st = saliency.weight_statistics(jnp.asarray([2.0, 2.0, 0, 0]))
  np.testing.assert_allclose(st["sgcl_weight_entropy"], 0.5, rtol=1e-6)
  assert float(st["sgcl_weight_min"]) == 0 and float(st["sgcl_weight_max"]) == 2
  np.testing.assert_allclose(st["sgcl_weight_mean"], 1.0)


def test_spearman_matches_scipy_with_ties():
  rng = np.random.default_rng(4)
  x = rng.integers(0, 5, 50).astype(np.float32)  # many ties
  y = x + rng.normal(0, 2, 50).astype(np.float32)
  want = scipy.stats.spearmanr(x, y).statistic
  np.testing.assert_allclose(saliency.spearman(jnp.asarray(x), jnp.asarray(y)), want, rtol=1e-5)
  assert float(saliency.spearman(jnp.ones(5), jnp.arange(5.0))) == 0.0


def test_weights_and_statistics_span_the_global_batch_on_four_devices():
  """Normalised per device inside pmap = normalised once over the concatenated batch."""
  assert jax.local_device_count() >= 4
  rng = np.random.default_rng(5)
  a, b = rng.uniform(size=(2, 4, 6)).astype(np.float32)  # 4 devices x 6 pairs, unequal per device
  a[0] *= 10.0

  @functools.partial(jax.pmap, axis_name=parallel.AXIS, devices=jax.local_devices()[:4])
  def per_device(a, b):
    w = saliency.normalize_weights(saliency.pair_weights(a, b, 1.5), parallel.AXIS)
    return w, saliency.weight_statistics(w, parallel.AXIS), saliency.spearman(a, b, parallel.AXIS)

  w4, stats4, rho4 = per_device(a, b)
  w1 = saliency.normalize_weights(saliency.pair_weights(a.reshape(-1), b.reshape(-1), 1.5))
  np.testing.assert_allclose(np.asarray(w4).reshape(-1), w1, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(w4).mean(), 1.0, rtol=1e-5)
  assert not np.allclose(np.asarray(w4).mean(axis=1), 1.0)  # NOT mean 1 per device
  stats1 = saliency.weight_statistics(w1)
  for k, v in stats1.items():
    np.testing.assert_allclose(np.asarray(stats4[k]), float(v), rtol=1e-5)
  np.testing.assert_allclose(
      np.asarray(rho4), scipy.stats.spearmanr(a.reshape(-1), b.reshape(-1)).statistic, rtol=1e-5
  )


def test_bank_reuses_maps_until_they_are_k_steps_old():
  bank, stamp = saliency.bank_init(
      saliency.SaliencySettings(every_k_steps=3, map_size=2, bank_size=6)
  )
  calls = []

  def run(step, index, value):
    def compute():
      calls.append(step)
      return jnp.full((len(index), 2, 2), value, jnp.float32)

    return saliency.saliency_from_bank(
        bank, stamp, jnp.asarray(index), jnp.asarray(step), 3, compute, None
    )

  maps, bank, stamp, refreshed = run(0, [0, 1], 0.5)
  assert float(refreshed) == 1 and np.all(np.asarray(maps) == 0.5)
  maps, bank, stamp, refreshed = run(2, [0, 1], 0.75)  # 2 steps old: reused
  assert float(refreshed) == 0 and np.all(np.asarray(maps) == 0.5)
  maps, bank, stamp, refreshed = run(
      2, [1, 4], 0.75
  )  # image 4 never computed: refresh all (bfloat16-exact values)
  assert float(refreshed) == 1 and np.all(np.asarray(maps) == 0.75)
  maps, bank, stamp, refreshed = run(3, [0, 1], 0.625)  # image 0 is 3 steps old
  assert float(refreshed) == 1
  np.testing.assert_array_equal(np.asarray(stamp), [3, 3, -1, -1, 2, -1])
