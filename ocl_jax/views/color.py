"""Colour jitter, grayscale and Gaussian blur, torchvision.transforms.functional semantics.

Split out of augment.py, which composes them into views, so each module stays
short enough to read. Public functions take and return HWC float images in
[0, 1]; the `*_planar` versions (and maybe_blur_to_hwc) work on planar
(C, H, W) arrays, the layout augment_view uses between its crop and its end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# ITU-R 601-2 luma, as PIL's convert('L').
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# Colour-jitter op ids, in the order of `factors` for `apply_color_ops`.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


# Internally a view is planar (C, H, W) between the crop and the end of
# augment_view: channel planes are contiguous, so the colour ops vectorise,
# and the separable resampling passes (crop and blur) are plain matmuls with
# one small transpose in all. That layout was 1.8x faster on CPU than HWC. The
# public functions take and return HWC and wrap the planar versions, so the
# tests exercise the same code as augment_view.


def to_chw(image: jax.Array) -> jax.Array:
  """HWC -> planar (C, H, W)."""
  return jnp.moveaxis(image, -1, 0)


def to_hwc(planes: jax.Array) -> jax.Array:
  """Planar (C, H, W) -> HWC."""
  return jnp.moveaxis(planes, 0, -1)


# ----------------------------------------------------------------------------
# Colour (torchvision.transforms.functional semantics on float images).


def luma_planar(x: jax.Array) -> jax.Array:
  """(H, W) ITU-R 601-2 luma of planar (3, H, W)."""
  w = LUMA_WEIGHTS
  return w[0] * x[0] + w[1] * x[1] + w[2] * x[2]


def _sum_pixels_p(x: jax.Array) -> jax.Array:
  """Per-channel sum over all pixels of planar x, (C,), independent of batch size.

  XLA's reductions (on CPU at least) round differently depending on the
  batch they are vmapped over, which would make an image's augmentation
  depend on how the global batch is split across devices. Pairwise halving
  with elementwise adds is exact per image; the last few columns are summed
  by a tiny dot, which XLA does not fuse into (and recompute in) every pixel
  of the consumer, as it does with an elementwise or reduce tail.
  """
  x = x.reshape(x.shape[0], -1)
  while x.shape[1] % 2 == 0 and x.shape[1] > 16:
    half = x.shape[1] // 2
    x = x[:, :half] + x[:, half:]
  return jnp.einsum(
      "cn,n->c", x, jnp.ones((x.shape[1],), x.dtype), precision=jax.lax.Precision.HIGHEST
  )


def _mean_luma_p(x: jax.Array) -> jax.Array:
  """Mean of the luma image (contrast's blend target)."""
  s = _sum_pixels_p(x)
  w = LUMA_WEIGHTS
  return (w[0] * s[0] + w[1] * s[1] + w[2] * s[2]) / (x.shape[1] * x.shape[2])


def _blend(x: jax.Array, other, factor) -> jax.Array:
  return jnp.clip(factor * x + (1.0 - factor) * other, 0.0, 1.0)


def _hue_p(x: jax.Array, factor) -> jax.Array:
  """Hue shift of planar x; see adjust_hue.

  V (= max) and the chroma C (= max - min) are unchanged by a hue shift, so
  after torchvision's rgb->hue (in sextants, 6H) the HSV -> RGB step is the
  closed form c_n = V - C * clip(min(k, 4 - k), 0, 1), k = (n + 6H) mod 6,
  n = 5, 3, 1 for R, G, B: torchvision's piecewise hsv2rgb without its
  six-way select. Mods use floor, which vectorises where fmod does not.
  """
  r, g, b = x[0], x[1], x[2]
  maxc = jnp.maximum(jnp.maximum(r, g), b)
  chroma = maxc - jnp.minimum(jnp.minimum(r, g), b)
  inv = 1.0 / jnp.where(chroma > 0, chroma, 1.0)  # grey pixels: hue 0, as torchvision
  h6 = jnp.where(
      maxc == r, (g - b) * inv, jnp.where(maxc == g, 2.0 + (b - r) * inv, 4.0 + (r - g) * inv)
  )
  h6 = h6 + 6.0 * factor
  out = []
  for n in (5.0, 3.0, 1.0):
    t = n + h6
    k = t - 6.0 * jnp.floor(t * (1.0 / 6.0))
    out.append(maxc - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
  return jnp.clip(jnp.stack(out), 0.0, 1.0)


def adjust_brightness(image: jax.Array, factor) -> jax.Array:
  """Blend with black: clip(factor * image)."""
  return _blend(image, 0.0, factor)


def adjust_contrast(image: jax.Array, factor) -> jax.Array:
  """Blend with the mean of the grayscale image."""
  return _blend(image, _mean_luma_p(to_chw(image)), factor)


def adjust_saturation(image: jax.Array, factor) -> jax.Array:
  """Blend with the grayscale image."""
  return _blend(image, luma_planar(to_chw(image))[..., None], factor)


def adjust_hue(image: jax.Array, factor) -> jax.Array:
  """Shift the HSV hue by `factor` in [-0.5, 0.5] (mod 1); S and V are kept."""
  return to_hwc(_hue_p(to_chw(image), factor))


def _blend_step_p(x: jax.Array, factors: jax.Array, op: jax.Array, active) -> jax.Array:
  """Brightness, contrast or saturation (by traced `op`) if `active`, else identity.

  The three ops blend towards alpha * luma + beta: (0, 0), (0, mean luma),
  (1, 0), so one code path serves all three without per-op branches.
  """
  alpha = (op == SATURATION).astype(x.dtype)
  beta = jnp.where(op == CONTRAST, _mean_luma_p(x), 0.0)
  f = jnp.sum(factors[:3] * (jnp.arange(3) == op))
  return jnp.where(active, _blend(x, alpha * luma_planar(x) + beta, f), x)


def color_ops_planar(
    x: jax.Array, factors: jax.Array, order: jax.Array, with_hue: bool
) -> jax.Array:
  """Planar apply_color_ops (augment_view's jitter step).

  Under vmap every branch is computed, so instead of four "any op" steps
  (four hue shifts) this runs the blend ops that precede hue, one hue
  shift, then the blend ops that follow it.
  """
  factors = jnp.asarray(factors, jnp.float32)
  order = jnp.asarray(order)
  hue_pos = jnp.argmax(order == HUE)
  for step in range(3):
    x = _blend_step_p(x, factors, order[step], step < hue_pos)
  if with_hue:
    x = _hue_p(x, factors[HUE])
  for step in range(1, 4):
    x = _blend_step_p(x, factors, order[step], step > hue_pos)
  return x


def apply_color_ops(
    image: jax.Array, factors: jax.Array, order: jax.Array, with_hue: bool = True
) -> jax.Array:
  """Apply brightness/contrast/saturation/hue in `order` (a permutation of 0..3).

  `factors` = (brightness, contrast, saturation, hue factor), op ids
  BRIGHTNESS, CONTRAST, SATURATION, HUE. `with_hue=False` (static) skips
  hue, as torchvision skips an op of zero strength.
  """
  return to_hwc(color_ops_planar(to_chw(image), factors, order, with_hue))


JITTER_UNIFORMS = 8


def jitter_from_uniforms(
    u: jax.Array, brightness: float, contrast: float, saturation: float, hue: float
) -> tuple[jax.Array, jax.Array]:
  """ColorJitter factors and order from 8 U(0,1) draws.

  Uniforms rather than a key, so augment_view can make one random draw per
  image (see augment.sample_crop_params).
  """
  lo = jnp.array(
      [max(0.0, 1.0 - brightness), max(0.0, 1.0 - contrast), max(0.0, 1.0 - saturation), -hue],
      jnp.float32,
  )
  hi = jnp.array([1.0 + brightness, 1.0 + contrast, 1.0 + saturation, hue], jnp.float32)
  factors = lo + (hi - lo) * u[:4]
  # Ranking i.i.d. uniforms gives a uniformly random permutation.
  order = jnp.argsort(u[4:]).astype(jnp.int32)
  return factors, order


def sample_color_jitter(
    key: jax.Array, brightness: float, contrast: float, saturation: float, hue: float
) -> tuple[jax.Array, jax.Array]:
  """ColorJitter parameters: (factors (4,), order (4,) random permutation)."""
  return jitter_from_uniforms(
      jax.random.uniform(key, (JITTER_UNIFORMS,)), brightness, contrast, saturation, hue
  )


def color_jitter(
    key: jax.Array,
    image: jax.Array,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
) -> jax.Array:
  """torchvision ColorJitter: factors ~ U[max(0,1-s), 1+s], hue ~ U[-h, h], random order.

  A zero strength gives factor exactly 1 (or hue 0, skipped statically),
  so zero strengths return the input exactly, like torchvision's None.
  """
  factors, order = sample_color_jitter(key, brightness, contrast, saturation, hue)
  return apply_color_ops(image, factors, order, with_hue=hue > 0)


def to_grayscale(image: jax.Array) -> jax.Array:
  """ITU-R 601-2 luma replicated to 3 channels (RandomGrayscale)."""
  return jnp.broadcast_to(luma_planar(to_chw(image))[..., None], image.shape)


# ----------------------------------------------------------------------------
# Blur.


def gaussian_kernel1d(sigma, kernel_size: int) -> jax.Array:
  """torchvision's 1-D Gaussian: taps at -(k-1)/2 .. (k-1)/2, normalised to sum 1."""
  x = jnp.linspace(-(kernel_size - 1) / 2.0, (kernel_size - 1) / 2.0, kernel_size)
  pdf = jnp.exp(-0.5 * jnp.square(x / sigma))
  return pdf / jnp.sum(pdf)


def _blur_matrix(kernel: jax.Array, size: int) -> jax.Array:
  """(size, size) matrix of a 1-D correlation with torch 'reflect' padding.

  Row i holds the taps of output i, with taps that fall off the edge
  reflected back inside (no edge repeat): the 1-D filter applied to the
  identity matrix.
  """
  half = kernel.shape[0] // 2
  eye = jnp.pad(jnp.eye(size, dtype=kernel.dtype), ((half, half), (0, 0)), mode="reflect")
  return sum(kernel[t] * eye[t : t + size] for t in range(kernel.shape[0]))


def maybe_blur_to_hwc(x: jax.Array, sigma, kernel_size: int, do_blur) -> jax.Array:
  """Planar (C, H, W) -> HWC, blurred where `do_blur` (RandomApply of the blur).

  Separable blur as two banded matmuls: on CPU a shifted-slice sum gets fused
  with the colour ops before it and recomputes them once per tap. The choice
  selects the matrices (identity when not blurred, which is exact) rather than
  two images, and the second matmul writes HWC: on XLA:CPU a select plus
  planar->HWC transpose fused into the colour ops ran ~20 ns per output
  value, about 10% of a demo train step.
  """
  kernel = gaussian_kernel1d(sigma, kernel_size).astype(x.dtype)
  rows = _blur_matrix(kernel, x.shape[1])
  cols = rows if x.shape[2] == x.shape[1] else _blur_matrix(kernel, x.shape[2])
  rows = jnp.where(do_blur, rows, jnp.eye(x.shape[1], dtype=x.dtype))
  cols = jnp.where(do_blur, cols, jnp.eye(x.shape[2], dtype=x.dtype))
  hp = jax.lax.Precision.HIGHEST
  out = jnp.einsum("chw,xw->chx", x, cols, precision=hp)
  return jnp.einsum("yh,chx->yxc", rows, out, precision=hp)


def gaussian_blur(image: jax.Array, sigma, kernel_size: int) -> jax.Array:
  """Separable Gaussian blur with torchvision's reflect padding (no edge repeat).

  The kernel size is static, sigma may be traced.
  """
  if kernel_size % 2 != 1:
    raise ValueError(f"kernel_size must be odd, got {kernel_size}")
  if kernel_size // 2 >= min(image.shape[0], image.shape[1]):
    raise ValueError(f"kernel_size {kernel_size} too large for image {image.shape[:2]}")
  return maybe_blur_to_hwc(to_chw(image), sigma, kernel_size, True)
