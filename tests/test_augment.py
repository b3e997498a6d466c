"""Tests of ocl_jax.views.augment against NumPy/JAX references and identities."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ocl_jax.views import augment as A
from ocl_jax.views import color as C

RATIO = (3 / 4, 4 / 3)


def _rand_image(seed, h, w, c=3):
  return np.random.RandomState(seed).rand(h, w, c).astype(np.float32)


def _keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


# Jitted once per shape: eager dispatch compiles every primitive separately,
# which is slower than compiling the fused function.
_crop = jax.jit(A.crop_and_resize, static_argnums=2)
_crop_flip = jax.jit(A.crop_resize_flip_chw, static_argnums=2)
_blur = jax.jit(C.gaussian_blur, static_argnums=2)
_view = jax.jit(A.augment_view, static_argnums=3)
_box = jax.jit(A.sample_crop_box, static_argnums=(2, 3))
_box_params = jax.jit(A.sample_crop_params, static_argnums=(2, 3))


N_BOXES = 4000
WHOLE = np.array([0.0, 0.0, 1.0, 1.0], np.float32)
# One compiled sampler for all statistical tests: (keys, aspect, scale, ratio, regions).
_boxes = jax.jit(
    jax.vmap(A.sample_crop_params, in_axes=(0, None, None, None, 0)), static_argnums=(2, 3)
)


def _sample_boxes(aspect, region=WHOLE, seed=0, scale=(0.08, 1.0), ratio=RATIO):
  regions = jnp.broadcast_to(jnp.asarray(region, jnp.float32), (N_BOXES, 4))
  boxes, accepted = _boxes(_keys(N_BOXES, seed), aspect, scale, ratio, regions)
  return np.asarray(boxes), np.asarray(accepted)


@pytest.mark.parametrize("aspect", [1.0, 1.7, 0.4])
def test_crop_box_inside_image_and_trial_ranges(aspect):
  boxes, accepted = _sample_boxes(aspect)
  assert np.all(boxes >= 0) and np.all(boxes <= 1)
  w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  assert np.all(w > 0) and np.all(h > 0)
  assert accepted.mean() > 0.95  # these aspects fit within 10 trials almost always
  area, pix_ratio = (w * h)[accepted], (w * aspect / h)[accepted]
  assert area.min() >= 0.08 - 1e-5 and area.max() <= 1 + 1e-5
  assert pix_ratio.min() >= RATIO[0] - 1e-4 and pix_ratio.max() <= RATIO[1] + 1e-4
  # The largest area that fits: w = sqrt(s*r/aspect) <= 1 and h = sqrt(s*aspect/r) <= 1.
  r = np.exp(np.linspace(np.log(RATIO[0]), np.log(RATIO[1]), 1001))
  max_fit = np.max(np.minimum(np.minimum(aspect / r, r / aspect), 1.0))
  assert area.max() <= max_fit + 1e-5
  # Both ends of the feasible ranges are actually reached.
  assert area.min() < 0.1 and area.max() > 0.9 * max_fit
  assert pix_ratio.min() < 0.8 and pix_ratio.max() > 1.25


def test_crop_box_inside_region_with_relative_scale_and_ratio():
  r = np.array([0.2, 0.1, 0.7, 0.9], np.float32)
  aspect = 1.5
  boxes, accepted = _sample_boxes(aspect, r, seed=1)
  tol = 1e-6
  assert np.all(boxes[:, 0] >= r[0] - tol) and np.all(boxes[:, 2] <= r[2] + tol)
  assert np.all(boxes[:, 1] >= r[1] - tol) and np.all(boxes[:, 3] <= r[3] + tol)
  w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  rel_area = (w * h / ((r[2] - r[0]) * (r[3] - r[1])))[accepted]
  pix_ratio = (w * aspect / h)[accepted]  # a crop's real pixel ratio
  assert rel_area.min() >= 0.08 - 1e-4 and rel_area.max() <= 1 + 1e-4
  assert pix_ratio.min() >= RATIO[0] - 1e-4 and pix_ratio.max() <= RATIO[1] + 1e-4
  # Crops spread over the whole region (both corners approached).
  assert boxes[:, 0].min() < r[0] + 0.02 and boxes[:, 2].max() > r[2] - 0.02


def test_crop_box_full_image_and_full_region():
  box = _box(jax.random.key(3), 1.0, (1.0, 1.0), (1.0, 1.0))
  np.testing.assert_allclose(box, [0, 0, 1, 1], atol=1e-6)
  # Region of pixel aspect 2 * (0.5 / 1) = 1: the square crop of scale 1 is the region.
  region = jnp.array([0.25, 0.0, 0.75, 1.0])
  box = _box(jax.random.key(4), 2.0, (1.0, 1.0), (1.0, 1.0), region)
  np.testing.assert_allclose(box, region, atol=1e-6)


def test_crop_area_is_uniform_where_it_always_fits():
  # aspect 1, ratio in [3/4, 4/3]: every trial with area <= 0.75 fits, so the
  # returned area, restricted to [0.08, 0.75], is uniform there.
  boxes, accepted = _sample_boxes(1.0, seed=5)
  area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[accepted]
  inside = area[area <= 0.75]
  counts, _ = np.histogram(inside, bins=5, range=(0.08, 0.75))
  expected = len(inside) / 5
  assert np.all(np.abs(counts - expected) < 0.15 * expected), counts
  # P(area <= 0.75) for one trial is (0.75-0.08)/0.92 ≈ 0.73 and failures
  # (rare) are retried, so at least that fraction lands there.
  assert len(inside) / len(area) > 0.7


@pytest.mark.parametrize(
    "aspect,expected",
    [
        (4.0, [0.375, 0.0, 0.625, 1.0]),  # too wide: full height, width = h * max ratio
        (0.25, [0.0, 0.375, 1.0, 0.625]),  # too tall: full width, height = w / min ratio
    ],
)
def test_crop_box_fallback_is_centred_clamped_crop(aspect, expected):
  # Square crops of area >= 0.9 never fit an image of pixel aspect 4 or 1/4.
  box, accepted = _box_params(jax.random.key(0), aspect, (0.9, 1.0), (1.0, 1.0))
  assert not bool(accepted)
  np.testing.assert_allclose(box, expected, atol=1e-6)
  # The same crop inside a region, in whole-image coordinates.
  region = jnp.array([0.2, 0.2, 0.6, 0.6])
  box = _box(jax.random.key(0), aspect, (0.9, 1.0), (1.0, 1.0), region)
  np.testing.assert_allclose(box, 0.2 + 0.4 * np.asarray(expected), atol=1e-6)


# ----------------------------------------------------------------------------
# crop_and_resize


def _np_bilinear_crop(img, box, size):
  """Reference: half-pixel centres, edge clamp, no antialiasing (upscaling only)."""
  h, w = img.shape[:2]

  def axis(start, length, n_in):
    c = (np.arange(size) + 0.5) * (length / size) + start - 0.5
    c = np.clip(c, 0, n_in - 1)
    i0 = np.floor(c).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, c - i0

  y0, y1, fy = axis(box[1] * h, (box[3] - box[1]) * h, h)
  x0, x1, fx = axis(box[0] * w, (box[2] - box[0]) * w, w)
  top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
  bot = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
  return top * (1 - fy)[:, None, None] + bot * fy[:, None, None]


def test_crop_full_box_same_size_is_identity():
  img = _rand_image(0, 20, 28)
  out = _crop(img, jnp.array([0.0, 0.0, 1.0, 1.0]), 20)
  assert out.shape == (20, 20, 3)  # square output: resize 28 -> 20 wide
  img = _rand_image(0, 24, 24)
  out = _crop(img, jnp.array([0.0, 0.0, 1.0, 1.0]), 24)
  np.testing.assert_allclose(out, img, atol=1e-5)


def test_crop_integer_window_is_exact():
  img = _rand_image(1, 32, 40)
  y0, x0, s = 5, 7, 16
  box = jnp.array([x0 / 40, y0 / 32, (x0 + s) / 40, (y0 + s) / 32])
  np.testing.assert_allclose(_crop(img, box, s), img[y0 : y0 + s, x0 : x0 + s], atol=1e-5)


def test_crop_upscaling_matches_numpy_bilinear():
  img = _rand_image(2, 20, 24)
  box = np.array([0.1, 0.2, 0.6, 0.7])
  out = _crop(img, jnp.asarray(box), 32)
  np.testing.assert_allclose(out, _np_bilinear_crop(img, box, 32), atol=1e-5)


def test_crop_downscaling_antialiased_like_jax_image():
  # Independent implementation of the same maths (triangle kernel widened by
  # the shrink factor) for a shrinking crop.
  img = _rand_image(3, 40, 36)
  box = jnp.array([0.05, 0.1, 0.95, 0.8])
  size = 12
  resample = jax.jit(
      lambda im, scale, shift: jax.image.scale_and_translate(
          im, (size, size, 3), (0, 1), scale, shift, method="linear", antialias=True
      )
  )
  ref = resample(
      jnp.asarray(img),
      jnp.array([size / (0.7 * 40), size / (0.9 * 36)]),
      -jnp.array([0.1 * 40 * size / (0.7 * 40), 0.05 * 36 * size / (0.9 * 36)]),
  )
  np.testing.assert_allclose(_crop(img, box, size), ref, atol=1e-5)
  # Antialiasing: shrinking a pixel checkerboard by 3x gives ~ its mean, not aliasing.
  checker = (np.indices((36, 36)).sum(0) % 2).astype(np.float32)[..., None].repeat(3, -1)
  out = _crop(checker, jnp.array([0.0, 0.0, 1.0, 1.0]), 12)
  assert np.abs(np.asarray(out) - 0.5).max() < 0.15


def test_flip_and_folded_flip():
  img = _rand_image(4, 16, 16)
  np.testing.assert_array_equal(A.flip_left_right(img, jnp.array(True)), img[:, ::-1])
  np.testing.assert_array_equal(A.flip_left_right(img, jnp.array(False)), img)
  box = jnp.array([0.1, 0.2, 0.7, 0.9])
  flipped = np.moveaxis(np.asarray(_crop_flip(jnp.asarray(img), box, 20, jnp.array(True))), 0, -1)
  np.testing.assert_allclose(flipped, np.asarray(_crop(img, box, 20))[:, ::-1], atol=1e-6)


# ----------------------------------------------------------------------------
# Blur


def test_blur_kernel_size_rule():
  assert A.ViewConfig(crop_size=224).blur_kernel_size == 23
  assert A.ViewConfig(crop_size=96).blur_kernel_size == 9
  assert A.ViewConfig(crop_size=16).blur_kernel_size == 3


# ----------------------------------------------------------------------------
# Views and batches

NO_AUG = dict(
    scale=(1.0, 1.0),
    ratio=(1.0, 1.0),
    flip_prob=0.0,
    jitter_prob=0.0,
    grayscale_prob=0.0,
    blur_prob=0.0,
)


def test_augment_view_without_augmentation_is_resize():
  img = _rand_image(8, 24, 24)
  cfg = A.ViewConfig(crop_size=24, **NO_AUG)
  view, box, flipped = _view(jax.random.key(0), jnp.asarray(img), 1.0, cfg)
  np.testing.assert_allclose(view, img, atol=1e-5)
  np.testing.assert_allclose(box, [0, 0, 1, 1], atol=1e-6)
  assert not bool(flipped)
  # uint8 input converted on device; other size = plain resize of the whole image.
  img8 = (img * 255).astype(np.uint8)
  cfg = A.ViewConfig(crop_size=16, **NO_AUG)
  view, _, _ = _view(jax.random.key(0), jnp.asarray(img8), 1.0, cfg)
  ref = jax.image.resize(
      jnp.asarray(img8, jnp.float32) / 255, (16, 16, 3), "linear", antialias=True
  )
  np.testing.assert_allclose(view, ref, atol=1e-5)
  # Flip with probability 1 mirrors.
  cfg = A.ViewConfig(crop_size=24, **{**NO_AUG, "flip_prob": 1.0})
  view, _, flipped = _view(jax.random.key(0), jnp.asarray(img), 1.0, cfg)
  assert bool(flipped)
  np.testing.assert_allclose(view, img[:, ::-1], atol=1e-5)


def test_augment_view_grayscale_and_blur_always_applied():
  img = _rand_image(9, 16, 16)
  cfg = A.ViewConfig(
      crop_size=16, **{**NO_AUG, "grayscale_prob": 1.0, "blur_prob": 1.0, "blur_sigma": (1.0, 1.0)}
  )
  view, _, _ = _view(jax.random.key(1), jnp.asarray(img), 1.0, cfg)
  ref = _blur(C.to_grayscale(jnp.asarray(img)), 1.0, 3)
  np.testing.assert_allclose(view, ref, atol=1e-5)


_augment_batch = jax.jit(A.augment_batch, static_argnames="cfg")
SMALL_CFG = A.ViewConfig(crop_size=16)
BATCH_KEY = jax.random.key(42)


@pytest.fixture(scope="module")
def batch():
  """One 8-image batch and its augmentations, compiled once per shape for the module."""
  x = np.random.RandomState(10).randint(0, 256, (8, 24, 24, 3)).astype(np.uint8)
  x[5] = x[2]  # a repeated image must still get its own crop
  aspects = jnp.linspace(0.6, 1.6, 8)
  lo = np.random.RandomState(11).uniform(0, 0.4, (8, 2))
  regions = jnp.asarray(
      np.concatenate([lo, lo + np.random.RandomState(12).uniform(0.2, 0.6, (8, 2))], 1), jnp.float32
  )
  return dict(
      x=x,
      aspects=aspects,
      regions=regions,
      plain=_augment_batch(BATCH_KEY, x, aspects, cfg=SMALL_CFG),
      with_regions=_augment_batch(BATCH_KEY, x, aspects, cfg=SMALL_CFG, regions=regions),
  )


def test_augment_batch_shapes_range_and_distinct_crops(batch):
  views, boxes, flips = batch["plain"]
  assert views.shape == (8, 16, 16, 3) and views.dtype == jnp.float32
  assert boxes.shape == (8, 4) and flips.shape == (8,) and flips.dtype == jnp.bool_
  assert float(views.min()) >= 0 and float(views.max()) <= 1
  assert len(np.unique(np.round(np.asarray(boxes), 5), axis=0)) == 8  # incl. the repeated image
  # Per-image keys are fold_in(key, i): image 3 alone (offset 3) is augmented identically.
  one = _view(
      jax.random.fold_in(BATCH_KEY, 3), jnp.asarray(batch["x"][3]), batch["aspects"][3], SMALL_CFG
  )
  np.testing.assert_allclose(one[0], views[3], atol=1e-5)
  np.testing.assert_allclose(one[1], boxes[3], atol=1e-6)


def test_augment_batch_independent_of_device_split(batch):
  x, aspects, regions = batch["x"], batch["aspects"], batch["regions"]
  a = _augment_batch(
      BATCH_KEY, x[:4], aspects[:4], cfg=SMALL_CFG, index_offset=0, regions=regions[:4]
  )
  b = _augment_batch(
      BATCH_KEY, x[4:], aspects[4:], cfg=SMALL_CFG, index_offset=4, regions=regions[4:]
  )
  for whole, p, q in zip(batch["with_regions"], a, b):
    np.testing.assert_array_equal(np.concatenate([p, q]), whole)  # bit-exact


def test_augment_batch_crops_inside_regions(batch):
  _, boxes, _ = batch["with_regions"]
  b, r = np.asarray(boxes), np.asarray(batch["regions"])
  assert np.all(b[:, :2] >= r[:, :2] - 1e-6) and np.all(b[:, 2:] <= r[:, 2:] + 1e-6)
  assert not np.allclose(b, np.asarray(batch["plain"][1]))


def test_normalize_roundtrip():
  img = jnp.asarray(_rand_image(12, 4, 5))
  n = A.normalize(img)
  np.testing.assert_allclose(n[..., 1], (img[..., 1] - 0.456) / 0.224, atol=1e-6)
  np.testing.assert_allclose(A.denormalize(n), img, atol=1e-6)


# ----------------------------------------------------------------------------
# Config


def test_from_config_subset_and_defaults():
  cfg = A.ViewConfig.from_config(
      ml_collections.ConfigDict({"crop_size": 96, "scale": [0.2, 1.0], "blur_prob": 0.1})
  )
  assert cfg == dataclasses.replace(A.ViewConfig(), crop_size=96, scale=(0.2, 1.0), blur_prob=0.1)
  hash(cfg)  # usable as a static jit argument
  assert A.ViewConfig.from_config(ml_collections.ConfigDict()) == A.ViewConfig()


@pytest.mark.parametrize(
    "field,value",
    [
        ("crop_sise", 96),
        ("crop_size", 0),
        ("flip_prob", 1.5),
        ("jitter_prob", -0.1),
        ("grayscale_prob", 2.0),
        ("blur_prob", -1.0),
        ("scale", (0.5, 0.2)),
        ("scale", (0.0, 1.0)),
        ("scale", (0.5, 1.2)),
        ("ratio", (0.0, 1.0)),
        ("ratio", (2.0, 1.0)),
        ("brightness", -0.1),
        ("contrast", -1.0),
        ("saturation", -0.5),
        ("hue", 0.6),
        ("hue", -0.1),
        ("blur_sigma", (2.0, 0.1)),
    ],
)
def test_from_config_errors_name_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    A.ViewConfig.from_config(ml_collections.ConfigDict({field: value}))
