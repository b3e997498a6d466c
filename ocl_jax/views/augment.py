"""Per-view image augmentation of docs/method.md#pretraining, run on device.

Everything here is a pure function of an explicit PRNG key, safe under
jit/vmap/pmap: augmentation runs inside the train step, vmapped over one key
per image (the DeepMind BYOL style), so the host input pipeline only decodes
and resizes. Random "apply with probability p" steps are computed and then
selected with `jnp.where`, because under vmap a `lax.cond` becomes a select
anyway.

Conventions: images HWC float32 in [0, 1]; boxes normalised (x1, y1, x2, y2)
with the pixel-edge convention, so (0, 0, 1, 1) is the whole image. Crops are
sampled in real pixel units (the original aspect ratio is passed in, since
the pipeline stores every image resized to a square), optionally inside a
`region` box, which is what object-aware crops (docs/method.md#oa-crop) and
saliency-guided crops (docs/method.md#sgcl) need. The colour and blur ops
the views apply live in color.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from ocl_jax.views import color

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_CROP_TRIALS = 10

_PROB_FIELDS = ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob")
_STRENGTH_FIELDS = ("brightness", "contrast", "saturation", "hue")
_TUPLE_FIELDS = ("scale", "ratio", "blur_sigma")


@dataclasses.dataclass(frozen=True)
class ViewConfig:
  """One view's augmentation; defaults are MoCo v2 (docs/method.md#pretraining).

  Frozen and hashable so it can be a static argument of a jitted function.
  """

  crop_size: int = 224
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip_prob: float = 0.5
  jitter_prob: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.4
  hue: float = 0.1
  grayscale_prob: float = 0.2
  blur_prob: float = 0.5
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  blur_kernel_frac: float = 0.1  # kernel ≈ this fraction of crop_size, odd, >= 3

  def __post_init__(self):
    # Normalise sequences (config files give lists) so the config stays hashable.
    for name in _TUPLE_FIELDS:
      value = getattr(self, name)
      try:
        value = tuple(float(v) for v in value)
      except TypeError as e:
        raise ValueError(f"ViewConfig.{name} must be a pair of numbers, got {value!r}") from e
      if len(value) != 2:
        raise ValueError(f"ViewConfig.{name} must be a pair of numbers, got {value!r}")
      object.__setattr__(self, name, value)
    self._validate()

  def _validate(self) -> None:
    if int(self.crop_size) != self.crop_size or self.crop_size < 1:
      raise ValueError(f"ViewConfig.crop_size must be an integer >= 1, got {self.crop_size!r}")
    object.__setattr__(self, "crop_size", int(self.crop_size))
    for name in _PROB_FIELDS:
      p = getattr(self, name)
      if not 0.0 <= p <= 1.0:
        raise ValueError(f"ViewConfig.{name} is a probability and must be in [0, 1], got {p!r}")
    lo, hi = self.scale
    if not 0.0 < lo <= hi <= 1.0:
      raise ValueError(f"ViewConfig.scale must satisfy 0 < a <= b <= 1, got {self.scale!r}")
    lo, hi = self.ratio
    if not 0.0 < lo <= hi:
      raise ValueError(f"ViewConfig.ratio must satisfy 0 < a <= b, got {self.ratio!r}")
    for name in _STRENGTH_FIELDS:
      s = getattr(self, name)
      if not s >= 0.0:
        raise ValueError(f"ViewConfig.{name} must be >= 0, got {s!r}")
    if self.hue > 0.5:
      raise ValueError(f"ViewConfig.hue must be <= 0.5, got {self.hue!r}")
    lo, hi = self.blur_sigma
    if not 0.0 < lo <= hi:
      raise ValueError(f"ViewConfig.blur_sigma must satisfy 0 < a <= b, got {self.blur_sigma!r}")
    if not self.blur_kernel_frac >= 0.0:
      raise ValueError(f"ViewConfig.blur_kernel_frac must be >= 0, got {self.blur_kernel_frac!r}")

  @classmethod
  def from_config(cls, cfg: Any) -> "ViewConfig":
    """Build from a ConfigDict (or mapping) holding a subset of the fields.

    Unknown fields are an error rather than ignored, so a typo in a config
    file cannot silently fall back to a default.
    """
    items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    for name in items:
      if name not in known:
        raise ValueError(f"Unknown ViewConfig field {name!r}; known fields: {sorted(known)}")
    return cls(**items)

  @property
  def blur_kernel_size(self) -> int:
    """Static blur kernel size: int(frac * crop_size), forced odd, >= 3."""
    k = int(self.blur_kernel_frac * self.crop_size)
    if k % 2 == 0:
      k += 1
    return max(k, 3)


# ----------------------------------------------------------------------------
# Crops.


_CROP_UNIFORMS = 2 * NUM_CROP_TRIALS + 2


def sample_crop_params(
    key: jax.Array, aspect, scale, ratio, region=None
) -> tuple[jax.Array, jax.Array]:
  """`sample_crop_box` that also says whether a trial was accepted (for tests)."""
  u = jax.random.uniform(key, (_CROP_UNIFORMS,))
  return _crop_from_uniforms(u, aspect, scale, ratio, region)


def _crop_from_uniforms(
    u: jax.Array, aspect, scale, ratio, region=None
) -> tuple[jax.Array, jax.Array]:
  """RandomResizedCrop box from U(0,1) draws u (22,): areas, log-ratios, position.

  Taking the uniforms rather than a key lets augment_view make one random
  draw per image: each jax.random call is a separate threefry computation,
  and together they dominated compile time.
  """
  num_trials = NUM_CROP_TRIALS
  if region is None:
    region = jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32)
  region = jnp.asarray(region, jnp.float32)
  rw = jnp.maximum(region[2] - region[0], 1e-6)
  rh = jnp.maximum(region[3] - region[1], 1e-6)
  # Pixel aspect of the region: ratios and areas are relative to it.
  a = jnp.asarray(aspect, jnp.float32) * rw / rh

  s = scale[0] + (scale[1] - scale[0]) * u[:num_trials]
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  r = jnp.exp(log_lo + (log_hi - log_lo) * u[num_trials : 2 * num_trials])
  w = jnp.sqrt(s * r / a)
  h = jnp.sqrt(s * a / r)
  # Small tolerance: torchvision compares rounded pixel sizes, so a crop that
  # is the full side up to float error must count as fitting.
  fits = (w <= 1.0 + 1e-6) & (h <= 1.0 + 1e-6)
  first = jnp.argmax(fits)
  accepted = jnp.any(fits)
  w_t = jnp.minimum(w[first], 1.0)
  h_t = jnp.minimum(h[first], 1.0)
  x_t = u[-2] * (1.0 - w_t)
  y_t = u[-1] * (1.0 - h_t)

  # Central fallback crop with the ratio clamped into range.
  rmin, rmax = float(ratio[0]), float(ratio[1])
  w_f = jnp.where(a > rmax, rmax / a, 1.0)
  h_f = jnp.where(a < rmin, a / rmin, 1.0)
  x_f = (1.0 - w_f) / 2.0
  y_f = (1.0 - h_f) / 2.0

  x1 = jnp.where(accepted, x_t, x_f)
  y1 = jnp.where(accepted, y_t, y_f)
  bw = jnp.where(accepted, w_t, w_f)
  bh = jnp.where(accepted, h_t, h_f)
  box = jnp.stack(
      [
          region[0] + x1 * rw,
          region[1] + y1 * rh,
          region[0] + jnp.minimum(x1 + bw, 1.0) * rw,
          region[1] + jnp.minimum(y1 + bh, 1.0) * rh,
      ]
  )
  return jnp.clip(box, 0.0, 1.0), accepted


def saliency_centred_box(
    box: jax.Array, saliency: jax.Array, u: jax.Array, temperature: float
) -> jax.Array:
  """Move `box` (keeping its size) so its centre is drawn from saliency^temperature.

  Saliency-guided crop of docs/method.md#sgcl: `saliency` (m, m) is a
  piecewise-constant map on the image's normalised square; a cell is drawn
  with probability ∝ s^temperature (inverse CDF of u[0]) and the centre
  uniformly inside it (u[1], u[2]); the box is then shifted to lie inside
  the image. An all-zero map gives uniform cells. temperature 0 is plain
  RandomResizedCrop and never reaches here (augment_view keeps the box).
  """
  m_rows, m_cols = saliency.shape
  s = jnp.maximum(saliency.astype(jnp.float32), 0.0).reshape(-1)
  p = jnp.where(s > 0, jnp.power(jnp.where(s > 0, s, 1.0), temperature), 0.0)
  p = jnp.where(jnp.sum(p) > 0, p, jnp.ones_like(p))
  cdf = jnp.cumsum(p)
  cell = jnp.minimum(jnp.searchsorted(cdf, u[0] * cdf[-1], side="right"), s.size - 1)
  # Never a zero-probability cell (u[0] * total can land on a flat stretch of the CDF).
  cell = jnp.where(p[cell] > 0, cell, jnp.argmax(p > 0))
  cx = (cell % m_cols + u[1]) / m_cols
  cy = (cell // m_cols + u[2]) / m_rows
  w, h = box[2] - box[0], box[3] - box[1]
  x1 = jnp.clip(cx - w / 2, 0.0, 1.0 - w)
  y1 = jnp.clip(cy - h / 2, 0.0, 1.0 - h)
  return jnp.clip(jnp.stack([x1, y1, x1 + w, y1 + h]), 0.0, 1.0)


def sample_crop_box(
    key: jax.Array, aspect, scale: tuple[float, float], ratio: tuple[float, float], region=None
) -> jax.Array:
  """RandomResizedCrop box (torchvision get_params), vectorised over 10 trials.

  Each trial draws an area fraction ~ U(scale) and a log pixel ratio ~
  U(log ratio); the first trial that fits is used, at a uniform position,
  else the central crop with the ratio clamped into range. `aspect` is the
  original image's width/height in pixels, so in normalised coordinates
  w = sqrt(s*r/aspect), h = sqrt(s*aspect/r). With `region` the crop is
  sampled inside it, scale and ratio relative to it (its pixel aspect is
  aspect*rw/rh); the returned box is in whole-image normalised coordinates.
  """
  return sample_crop_params(key, aspect, scale, ratio, region)[0]


# From the crop to the blur a view is planar (C, H, W); see color.py for why.


def _resize_weights(in_size: int, out_size: int, start, length) -> jax.Array:
  """(in_size, out_size) linear-interpolation weights for one axis.

  Output pixel j covers input interval start + [j, j+1] * length/out_size
  (pixel-edge convention); its centre is sampled with a triangle kernel that
  is widened by the shrink factor when shrinking (antialiasing), and the
  weights are renormalised where the kernel leaves the image (edge clamp).
  Same maths as jax.image.scale_and_translate(method='linear', antialias=True).
  """
  inv_scale = length / out_size
  kernel_scale = jnp.maximum(inv_scale, 1.0)
  centres = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * inv_scale + start - 0.5
  dist = jnp.abs(centres[None, :] - jnp.arange(in_size, dtype=jnp.float32)[:, None])
  w = jnp.maximum(0.0, 1.0 - dist / kernel_scale)
  total = jnp.sum(w, axis=0, keepdims=True)
  return w / jnp.where(total > 0, total, 1.0)


def crop_resize_flip_chw(image: jax.Array, box: jax.Array, size: int, do_flip) -> jax.Array:
  """HWC image -> planar (C, size, size) crop, optionally mirrored.

  Two small matmuls per image (separable resampling beats per-pixel
  gathers); the flip is folded into the column weights, reversing a
  (W, size) matrix instead of the image.
  """
  height, width = image.shape[0], image.shape[1]
  box = jnp.asarray(box, jnp.float32)
  bw = jnp.maximum((box[2] - box[0]) * width, 1e-6)
  bh = jnp.maximum((box[3] - box[1]) * height, 1e-6)
  wy = _resize_weights(height, size, box[1] * height, bh)
  wx = _resize_weights(width, size, box[0] * width, bw)
  if do_flip is not None:
    wx = jnp.where(do_flip, wx[:, ::-1], wx)
  hp = jax.lax.Precision.HIGHEST
  rows = jnp.einsum("hwc,hy->ywc", image, wy, precision=hp)
  out = jnp.einsum("cyw,wx->cyx", jnp.transpose(rows, (2, 0, 1)), wx, precision=hp)
  return jnp.clip(out, 0.0, 1.0)


def crop_and_resize(image: jax.Array, box: jax.Array, size: int) -> jax.Array:
  """Bilinear crop of `box` resized to (size, size), antialiased when shrinking.

  Pixel-edge convention: the box (0, 0, 1, 1) maps the image's outer edges
  onto the output's outer edges, so a full box at the same size is the
  identity.
  """
  return color.to_hwc(crop_resize_flip_chw(to_float(image), box, size, None))


def flip_left_right(image: jax.Array, do_flip) -> jax.Array:
  """Mirror an HWC image horizontally where `do_flip` (a traced bool) is true."""
  return jnp.where(do_flip, image[:, ::-1], image)


# ----------------------------------------------------------------------------
# Views.


def to_float(images: jax.Array) -> jax.Array:
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def augment_view(
    key: jax.Array,
    image: jax.Array,
    aspect,
    cfg: ViewConfig,
    region=None,
    saliency=None,
    centre_key=None,
    temperature: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One augmented view of one HWC image.

  crop box -> crop_and_resize -> flip -> jitter (p) -> grayscale (p) -> blur (p).
  Returns (view in [0, 1], not normalised; crop box (4,); flipped bool): the
  box and flip let later code (BG-mixup masks) transform a mask identically.
  With a `saliency` map (m, m) and temperature > 0 the crop keeps its
  RandomResizedCrop size but is re-centred on the map (saliency_centred_box),
  drawing from `centre_key`, so every other random number stays as without.
  """
  image = to_float(image)
  # Every random number of the view in one draw (see _crop_from_uniforms).
  u = jax.random.uniform(key, (_CROP_UNIFORMS + color.JITTER_UNIFORMS + 5,))
  u_crop, u_jit, u = u[:_CROP_UNIFORMS], u[_CROP_UNIFORMS:-5], u[-5:]
  box, _ = _crop_from_uniforms(u_crop, aspect, cfg.scale, cfg.ratio, region)
  if saliency is not None and temperature > 0:
    box = saliency_centred_box(box, saliency, jax.random.uniform(centre_key, (3,)), temperature)
  flipped = u[0] < cfg.flip_prob
  view = crop_resize_flip_chw(image, box, cfg.crop_size, flipped)  # planar from here

  if cfg.jitter_prob > 0:
    factors, order = color.jitter_from_uniforms(
        u_jit, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue
    )
    jittered = color.color_ops_planar(view, factors, order, with_hue=cfg.hue > 0)
    view = jnp.where(u[1] < cfg.jitter_prob, jittered, view)
  if cfg.grayscale_prob > 0:
    gray = jnp.broadcast_to(color.luma_planar(view), view.shape)
    view = jnp.where(u[2] < cfg.grayscale_prob, gray, view)
  if cfg.blur_prob > 0:
    lo, hi = cfg.blur_sigma
    view = color.maybe_blur_to_hwc(
        view, lo + (hi - lo) * u[4], cfg.blur_kernel_size, u[3] < cfg.blur_prob
    )
  else:
    view = color.to_hwc(view)
  return jnp.clip(view, 0.0, 1.0), box, flipped


def augment_batch(
    key: jax.Array,
    images: jax.Array,
    aspects,
    cfg: ViewConfig,
    index_offset=0,
    regions=None,
    saliency=None,
    centre_key=None,
    temperature: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Augment a (B, H, W, 3) batch (uint8 or float), one key per image.

  Image i uses fold_in(key, index_offset + i), so with index_offset =
  device_index * local_batch the result for an image does not depend on how
  the global batch is split across devices. `aspects` (B,) are the original
  width/height; `regions` (B, 4) optional crop regions (OA-crop); `saliency`
  (B, m, m) optional maps that re-centre the crops (SGCL; image i's centre
  draws from fold_in(centre_key, index_offset + i)).
  Returns (views (B, S, S, 3), boxes (B, 4), flips (B,)).
  """
  images = to_float(images)
  batch = images.shape[0]
  aspects = jnp.broadcast_to(jnp.asarray(aspects, jnp.float32), (batch,))
  idx = jnp.asarray(index_offset, jnp.int32) + jnp.arange(batch, dtype=jnp.int32)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)
  if saliency is not None and temperature > 0:
    if regions is not None:
      raise ValueError("saliency-guided crops and OA-crop regions cannot be combined")
    centre_keys = jax.vmap(lambda i: jax.random.fold_in(centre_key, i))(idx)
    fn = lambda k, x, a, s, c: augment_view(k, x, a, cfg, None, s, c, temperature)
    return jax.vmap(fn)(keys, images, aspects, jnp.asarray(saliency, jnp.float32), centre_keys)
  if regions is None:
    fn = lambda k, x, a: augment_view(k, x, a, cfg)
    return jax.vmap(fn)(keys, images, aspects)
  fn = lambda k, x, a, r: augment_view(k, x, a, cfg, r)
  return jax.vmap(fn)(keys, images, aspects, jnp.asarray(regions, jnp.float32))


def transform_masks(masks: jax.Array, boxes: jax.Array, flips: jax.Array, size: int) -> jax.Array:
  """Crop, resize and flip (B, H, W) masks exactly as augment_batch did their images.

  `boxes` and `flips` are augment_batch's outputs, so BG-mixup's foreground
  masks stay aligned with view 1. uint8 masks are read as 0..255 -> [0, 1].
  """

  def one(mask, box, flip):
    return flip_left_right(crop_and_resize(mask[..., None], box, size), flip)[..., 0]

  return jax.vmap(one)(to_float(masks), boxes, flips)


FULL_IMAGE = (0.0, 0.0, 1.0, 1.0)


def choose_regions(
    key: jax.Array, boxes: jax.Array, box_valid: jax.Array, index_offset=0
) -> jax.Array:
  """OA-crop regions (docs/method.md#oa-crop): one valid box per image, uniformly.

  `boxes` (B, K, 4) x1, y1, x2, y2 with `box_valid` (B, K). Image i draws from
  fold_in(key, index_offset + i), as augment_batch does, so the choice does not
  depend on how the global batch is split over devices. An image with no
  valid box gets the whole image. Returns (B, 4) regions for augment_batch;
  the caller passes the same regions to both views so they share the object.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  box_valid = jnp.asarray(box_valid, bool)
  idx = jnp.asarray(index_offset, jnp.int32) + jnp.arange(boxes.shape[0], dtype=jnp.int32)

  def one(i, b, valid):
    count = jnp.sum(valid.astype(jnp.int32))
    # j-th valid box, j ~ U{0..count-1}: the valid slot whose running count is j + 1.
    j = jax.random.randint(jax.random.fold_in(key, i), (), 0, jnp.maximum(count, 1))
    slot = jnp.argmax(valid & (jnp.cumsum(valid.astype(jnp.int32)) == j + 1))
    return jnp.where(count > 0, b[slot], jnp.asarray(FULL_IMAGE, jnp.float32))

  return jax.vmap(one)(idx, boxes, box_valid)


def normalize(images: jax.Array) -> jax.Array:
  """ImageNet mean/std normalisation of [0, 1] images (channels last)."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (images - mean) / std


def denormalize(images: jax.Array) -> jax.Array:
  """Inverse of `normalize`."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return images * std + mean
