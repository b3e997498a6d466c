"""Tests of ocl_jax.views.color against NumPy/SciPy/colorsys references and identities."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from ocl_jax.views import color as C


def _rand_image(seed, h, w, c=3):
  return np.random.RandomState(seed).rand(h, w, c).astype(np.float32)


def _keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


# Jitted once per shape: eager dispatch compiles every primitive separately,
# which is slower than compiling the fused function.
_blur = jax.jit(C.gaussian_blur, static_argnums=2)
_kernel = jax.jit(C.gaussian_kernel1d, static_argnums=1)
_jitter = jax.jit(C.color_jitter, static_argnums=(2, 3, 4, 5))


# ----------------------------------------------------------------------------
# Colour


def _np_luma(x):
  return (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]


def _np_hue(x, f):
  out = np.empty_like(x)
  for idx in np.ndindex(x.shape[:-1]):
    h, s, v = colorsys.rgb_to_hsv(*x[idx])
    out[idx] = colorsys.hsv_to_rgb((h + f) % 1.0, s, v)
  return out


def _colour_test_image():
  img = _rand_image(5, 10, 12)
  # Include greys, black, white and saturated primaries/secondaries.
  img[0, :8] = [
      [0, 0, 0],
      [1, 1, 1],
      [0.5, 0.5, 0.5],
      [1, 0, 0],
      [0, 1, 0],
      [0, 0, 1],
      [1, 1, 0],
      [0, 1, 1],
  ]
  return img


NP_OPS = {
    "brightness": lambda x, f: np.clip(f * x, 0, 1),
    "contrast": lambda x, f: np.clip(f * x + (1 - f) * _np_luma(x).mean(), 0, 1),
    "saturation": lambda x, f: np.clip(f * x + (1 - f) * _np_luma(x), 0, 1),
    "hue": _np_hue,
}
JAX_OPS = {
    "brightness": jax.jit(C.adjust_brightness),
    "contrast": jax.jit(C.adjust_contrast),
    "saturation": jax.jit(C.adjust_saturation),
    "hue": jax.jit(C.adjust_hue),
}


@pytest.mark.parametrize(
    "name,factors",
    [
        ("brightness", [0.0, 0.6, 1.4, 3.0]),
        ("contrast", [0.0, 0.6, 1.4, 3.0]),
        ("saturation", [0.0, 0.6, 1.4, 3.0]),
        ("hue", [-0.5, -0.1, 0.07, 0.33, 0.5]),
    ],
)
def test_adjust_matches_numpy(name, factors):
  img = _colour_test_image()
  for f in factors:
    out = np.asarray(JAX_OPS[name](jnp.asarray(img), f))
    np.testing.assert_allclose(out, NP_OPS[name](img, f), atol=2e-5, err_msg=f"{name} {f}")
    assert out.min() >= 0 and out.max() <= 1


def test_adjust_identity_factors():
  img = jnp.asarray(_colour_test_image())
  for name in ("brightness", "contrast", "saturation"):
    np.testing.assert_array_equal(JAX_OPS[name](img, 1.0), img)
  np.testing.assert_allclose(JAX_OPS["hue"](img, 0.0), img, atol=1e-6)
  np.testing.assert_allclose(JAX_OPS["hue"](img, 1.0), img, atol=1e-5)  # full turn


def test_color_jitter_zero_strength_is_identity():
  img = jnp.asarray(_colour_test_image())
  for seed in range(3):
    np.testing.assert_array_equal(_jitter(jax.random.key(seed), img, 0.0, 0.0, 0.0, 0.0), img)


def test_apply_color_ops_follows_order_and_order_matters():
  img = _colour_test_image()
  factors = np.array([1.3, 0.6, 1.7, 0.2], np.float32)
  names = ["brightness", "contrast", "saturation", "hue"]
  apply = jax.jit(C.apply_color_ops)
  outs = []
  for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]):
    ref = img
    for op in order:
      ref = NP_OPS[names[op]](ref, factors[op])
    out = np.asarray(apply(jnp.asarray(img), jnp.asarray(factors), jnp.array(order)))
    np.testing.assert_allclose(out, ref, atol=3e-5, err_msg=str(order))
    outs.append(out)
  assert np.abs(outs[0] - outs[1]).max() > 0.05  # the order changes the result


def test_color_jitter_samples_ranges_and_random_orders():
  sample = jax.jit(jax.vmap(lambda k: C.sample_color_jitter(k, 0.4, 0.3, 0.2, 0.1)))
  factors, orders = map(np.asarray, sample(_keys(500, 7)))
  lo, hi = np.array([0.6, 0.7, 0.8, -0.1]), np.array([1.4, 1.3, 1.2, 0.1])
  assert np.all(factors >= lo - 1e-6) and np.all(factors <= hi + 1e-6)
  np.testing.assert_allclose(factors.mean(0), (lo + hi) / 2, atol=0.02)
  assert np.all(np.sort(orders, axis=1) == np.arange(4))
  assert len({tuple(o) for o in orders}) == 24  # all 4! orders occur
  # color_jitter is apply_color_ops of those samples.
  img = jnp.asarray(_colour_test_image())
  key = jax.random.key(11)
  f, o = C.sample_color_jitter(key, 0.4, 0.3, 0.2, 0.1)
  np.testing.assert_allclose(
      _jitter(key, img, 0.4, 0.3, 0.2, 0.1), jax.jit(C.apply_color_ops)(img, f, o), atol=1e-6
  )


def test_grayscale_weighted_sum():
  img = _colour_test_image()
  g = np.asarray(C.to_grayscale(jnp.asarray(img)))
  assert g.shape == img.shape
  np.testing.assert_array_equal(g[..., 0], g[..., 1])
  np.testing.assert_array_equal(g[..., 0], g[..., 2])
  np.testing.assert_allclose(g[..., 0], img @ np.array([0.299, 0.587, 0.114]), atol=1e-6)


# ----------------------------------------------------------------------------
# Blur


def _np_kernel(sigma, k):
  x = np.arange(k) - (k - 1) / 2
  p = np.exp(-0.5 * (x / sigma) ** 2)
  return p / p.sum()


def test_gaussian_kernel_sums_to_one_and_matches_formula():
  for sigma, k in [(0.1, 3), (1.0, 5), (2.0, 9), (1.7, 23)]:
    kern = np.asarray(_kernel(sigma, k))
    np.testing.assert_allclose(kern.sum(), 1.0, atol=1e-6)
    np.testing.assert_allclose(kern, _np_kernel(sigma, k), atol=1e-6)


def test_gaussian_blur_constant_and_scipy_reference():
  const = np.full((12, 14, 3), 0.37, np.float32)
  np.testing.assert_allclose(_blur(jnp.asarray(const), 1.5, 5), const, atol=1e-6)
  img = _rand_image(6, 20, 24)
  for sigma, k in [(1.3, 5), (0.7, 7), (2.0, 9)]:
    # torch 'reflect' padding (edge not repeated) is scipy 'mirror'.
    kern = _np_kernel(sigma, k)
    ref = ndimage.correlate1d(img.astype(np.float64), kern, axis=0, mode="mirror")
    ref = ndimage.correlate1d(ref, kern, axis=1, mode="mirror")
    np.testing.assert_allclose(_blur(jnp.asarray(img), sigma, k), ref, atol=1e-5)


def test_view_tail_blurs_by_matrix_choice_and_returns_hwc():
  """augment_view's last step: blurred (as gaussian_blur) or left exactly as it was, then HWC."""
  img = _rand_image(7, 20, 24)
  planar = jnp.asarray(np.moveaxis(img, -1, 0))
  tail = jax.jit(C.maybe_blur_to_hwc, static_argnums=2)
  np.testing.assert_array_equal(tail(planar, 1.3, 5, False), img)
  kern = _np_kernel(1.3, 5)  # torch 'reflect' padding is scipy 'mirror'
  ref = ndimage.correlate1d(img.astype(np.float64), kern, axis=0, mode="mirror")
  ref = ndimage.correlate1d(ref, kern, axis=1, mode="mirror")
  np.testing.assert_allclose(tail(planar, 1.3, 5, True), ref, atol=1e-5)
