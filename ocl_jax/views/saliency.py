"""Saliency-guided contrastive learning (docs/method.md#sgcl), the parts inside the train step.

1. Online saliency: ContraCAM (T=1) of the target network on the un-augmented
   images, in stop-gradient, pooled to a small `map_size` grid. The grid is the
   saliency s used everywhere below, read as a piecewise-constant function on
   the image's normalised square [0, 1]^2, so crop centres and crop scores are
   exact functions of the same map. With `every_k_steps` > 1 the maps live in
   a per-image bank in the train state and are recomputed when older than k.
2. Saliency-guided crops (`augment.saliency_centred_box`): centres drawn from
   s^temperature (0 = plain RandomResizedCrop).
3. Pair weights: a_v = mean of s inside crop v (`crop_scores`); w ∝ (a_u a_v)^γ,
   normalised to mean 1 over the global batch (every device), and the loss is
   Σ w ℓ / Σ w. γ = 0 gives weights of exactly 1, i.e. the unweighted loss.

Everything is a pure function of arrays, called inside the pmapped step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from ocl_jax import models
from ocl_jax.discovery import contracam
from ocl_jax.views import augment

# Floor added to crop scores before the power, so a crop on an all-zero map gets
# a tiny (not zero, not NaN) weight when gamma > 0.
SCORE_FLOOR = 1e-6


@dataclasses.dataclass(frozen=True)
class SaliencySettings:
  """Static SGCL options (config.saliency); hashable, part of the step's StepContext."""

  resolution: int = 48  # side the un-augmented image is resized to for ContraCAM
  expand_res: int = 1  # ContraCAM's stride-1 layer4 (1, 2 or 4)
  map_size: int = 8  # the saliency grid side (ContraCAM output is area-pooled to it)
  every_k_steps: int = 1  # bank refresh period; 1 = recompute every step, no bank
  crop_temperature: float = 1.0  # centre density ∝ s^temperature; 0 = plain RandomResizedCrop
  gamma: float = 1.0  # pair weight ∝ (a_u a_v)^gamma; 0 = unweighted loss
  num_local_crops: int = 0  # M extra small crops (multi-crop)
  local_crop_size: int = 48
  local_scale: tuple[float, float] = (0.05, 0.4)
  bank_size: int = 0  # images in the bank (the train split), when every_k_steps > 1

  def __post_init__(self):
    object.__setattr__(self, "local_scale", tuple(float(v) for v in self.local_scale))

  @property
  def uses_bank(self) -> bool:
    return self.every_k_steps > 1

  @property
  def guides_crops(self) -> bool:
    return self.crop_temperature > 0

  @classmethod
  def from_config(cls, cfg: Any, bank_size: int = 0) -> "SaliencySettings":
    return cls(
        resolution=int(cfg.resolution),
        expand_res=int(cfg.expand_res),
        map_size=int(cfg.map_size),
        every_k_steps=int(cfg.every_k_steps),
        crop_temperature=float(cfg.crop_temperature),
        gamma=float(cfg.gamma),
        num_local_crops=int(cfg.num_local_crops),
        local_crop_size=int(cfg.local_crop_size),
        local_scale=tuple(cfg.local_scale),
        bank_size=int(bank_size),
    )

  def local_view(self, view: augment.ViewConfig) -> augment.ViewConfig:
    """The local crops' augmentation: the global one at local size and scale."""
    return dataclasses.replace(view, crop_size=self.local_crop_size, scale=self.local_scale)


# ----------------------------------------------------------------------------
# 1. Online saliency.


def pool_maps(maps: jax.Array, size: int) -> jax.Array:
  """(B, H, W) -> (B, size, size) block means; H and W must be multiples of size."""
  b, h, w = maps.shape
  if h % size or w % size:
    raise ValueError(
        f"saliency maps of {h}x{w} cannot be pooled to {size}x{size}: "
        "saliency.resolution must be a multiple of saliency.map_size"
    )
  return maps.reshape(b, size, h // size, size, w // size).mean(axis=(2, 4))


def compute_saliency(
    net: models.ContrastiveNet,
    variables: Mapping[str, Any],
    images: jax.Array,
    settings: SaliencySettings,
    axis_name: str | None = None,
) -> jax.Array:
  """ContraCAM (T=1) maps of the un-augmented images, pooled to (B, m, m), stop-gradient.

  `images` are the batch's uint8 (or [0, 1]) images; `net` / `variables` the
  target network (MoCo / BYOL: the EMA network; SimCLR: the online one). The
  images of the global batch (all devices along `axis_name`) are each other's
  negatives in the score.
  """
  x = augment.to_float(images)
  r = settings.resolution
  if x.shape[1:3] != (r, r):
    x = jax.image.resize(x, (x.shape[0], r, r, x.shape[-1]), "linear", antialias=True)
  cam_net = dataclasses.replace(net, expand_res=settings.expand_res, pred_hidden_dim=0)
  cam_settings = contracam.CamSettings(iterations=1, expand_res=settings.expand_res)
  mask = contracam.contracam_apply(
      cam_net, cam_settings, variables, augment.normalize(x), axis_name=axis_name
  )["mask"]
  return jax.lax.stop_gradient(pool_maps(mask, settings.map_size))


def bank_init(settings: SaliencySettings) -> tuple[jax.Array, jax.Array] | tuple[None, None]:
  """(maps (N, m, m) bfloat16, stamp (N,) int32 = step computed, -1 = never)."""
  if not settings.uses_bank:
    return None, None
  m = settings.map_size
  return (
      jnp.zeros((settings.bank_size, m, m), jnp.bfloat16),
      jnp.full((settings.bank_size,), -1, jnp.int32),
  )


def saliency_from_bank(
    bank: jax.Array,
    stamp: jax.Array,
    index: jax.Array,
    step: jax.Array,
    every_k_steps: int,
    compute: Callable[[], jax.Array],
    axis_name: str | None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """This batch's maps: from the bank, or recomputed for the whole global batch when any of
  its images has no map yet or one older than `every_k_steps` steps.

  The decision is global and the new maps are all-gathered into every device's
  bank, so the (replicated) banks stay identical. Returns (maps, bank, stamp,
  refreshed 0/1).
  """
  age = step - stamp[index]
  stale = jnp.any((stamp[index] < 0) | (age >= every_k_steps))
  if axis_name is not None:
    stale = jax.lax.psum(stale.astype(jnp.int32), axis_name) > 0
  maps = jax.lax.cond(stale, compute, lambda: bank[index].astype(jnp.float32))
  all_index, all_maps = index, maps
  if axis_name is not None:
    all_index = jax.lax.all_gather(index, axis_name, tiled=True)
    all_maps = jax.lax.all_gather(maps, axis_name, tiled=True)
  bank = bank.at[all_index].set(jnp.where(stale, all_maps.astype(bank.dtype), bank[all_index]))
  stamp = stamp.at[all_index].set(jnp.where(stale, step, stamp[all_index]))
  # Read back what the bank holds, so a refreshed step uses the same (bfloat16) maps
  # as the steps that reuse them.
  return bank[index].astype(jnp.float32), bank, stamp, stale.astype(jnp.float32)


# ----------------------------------------------------------------------------
# 3. Crop scores and pair weights.


def _cell_overlaps(lo: jax.Array, hi: jax.Array, cells: int) -> jax.Array:
  """Length of [lo, hi] inside each of `cells` equal cells of [0, 1]: (..., cells)."""
  edges = jnp.arange(cells + 1, dtype=jnp.float32) / cells
  return jnp.clip(
      jnp.minimum(hi[..., None], edges[1:]) - jnp.maximum(lo[..., None], edges[:-1]), 0.0
  )


def crop_scores(boxes: jax.Array, maps: jax.Array) -> jax.Array:
  """Exact mean of each piecewise-constant map over its box: (B, 4), (B, h, w) -> (B,).

  Boxes are normalised x1 y1 x2 y2 on the map's square; a degenerate box scores 0.
  """
  maps = maps.astype(jnp.float32)
  ox = _cell_overlaps(boxes[:, 0], boxes[:, 2], maps.shape[2])
  oy = _cell_overlaps(boxes[:, 1], boxes[:, 3], maps.shape[1])
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  total = jnp.einsum("bh,bhw,bw->b", oy, maps, ox, precision=jax.lax.Precision.HIGHEST)
  return jnp.where(area > 0, total / jnp.maximum(area, 1e-12), 0.0)


def pair_weights(score_u: jax.Array, score_v: jax.Array, gamma: float) -> jax.Array:
  """Unnormalised (a_u a_v + floor)^gamma; exactly 1 for gamma = 0."""
  return jnp.power(score_u * score_v + SCORE_FLOOR, gamma)


def normalize_weights(weights: jax.Array, axis_name: str | None = None) -> jax.Array:
  """Scale to mean 1 over the GLOBAL batch (all devices): w / (Σ_global w / n_global)."""
  total, count = jnp.sum(weights), jnp.asarray(weights.size, jnp.float32)
  if axis_name is not None:
    total, count = jax.lax.psum(total, axis_name), jax.lax.psum(count, axis_name)
  return weights / (total / count)


def weight_statistics(weights: jax.Array, axis_name: str | None = None) -> dict[str, jax.Array]:
  """Global min / mean / max of normalised weights and their entropy as a fraction of the
  uniform's (1 = all pairs weigh the same; the weights read as a distribution p = w / Σw)."""
  lo, hi, total = jnp.min(weights), jnp.max(weights), jnp.sum(weights)
  count = jnp.asarray(weights.size, jnp.float32)
  if axis_name is not None:
    lo, hi = jax.lax.pmin(lo, axis_name), jax.lax.pmax(hi, axis_name)
    total, count = jax.lax.psum(total, axis_name), jax.lax.psum(count, axis_name)
  p = weights / total
  plogp = jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  if axis_name is not None:
    plogp = jax.lax.psum(plogp, axis_name)
  entropy = -plogp / jnp.maximum(jnp.log(count), 1e-12)
  return {
      "sgcl_weight_min": lo,
      "sgcl_weight_mean": total / count,
      "sgcl_weight_max": hi,
      "sgcl_weight_entropy": entropy,
  }


def _average_ranks(x: jax.Array) -> jax.Array:
  """1-based ranks with ties given their average rank (as scipy.stats.rankdata)."""
  less = jnp.sum(x[None, :] < x[:, None], axis=1).astype(jnp.float32)
  equal = jnp.sum(x[None, :] == x[:, None], axis=1).astype(jnp.float32)
  return less + (equal + 1.0) / 2.0


def spearman(x: jax.Array, y: jax.Array, axis_name: str | None = None) -> jax.Array:
  """Spearman rank correlation of x and y over the global batch (0 if either is constant)."""
  if axis_name is not None:
    x = jax.lax.all_gather(x, axis_name, tiled=True)
    y = jax.lax.all_gather(y, axis_name, tiled=True)
  rx, ry = _average_ranks(x), _average_ranks(y)
  rx, ry = rx - rx.mean(), ry - ry.mean()
  den = jnp.sqrt(jnp.sum(rx * rx) * jnp.sum(ry * ry))
  return jnp.where(den > 0, jnp.sum(rx * ry) / jnp.where(den > 0, den, 1.0), 0.0)


def validate(cfg: Any, errors: list[str]) -> None:
  """config.saliency checks, appended to `errors` as 'config.saliency.<field>: ...'."""

  def check(ok, field, msg):
    if not ok:
      errors.append(f"config.saliency.{field}: {msg}")

  check(isinstance(cfg.enabled, bool), "enabled", f"must be True or False, got {cfg.enabled!r}")
  check(cfg.resolution >= 8, "resolution", f"must be >= 8, got {cfg.resolution}")
  try:
    models.check_expand_res(cfg.expand_res, "config.saliency.expand_res")
  except ValueError as err:
    errors.append(str(err))
  check(
      cfg.map_size >= 1 and cfg.resolution % cfg.map_size == 0,
      "map_size",
      f"must divide saliency.resolution={cfg.resolution}, got {cfg.map_size}",
  )
  check(cfg.every_k_steps >= 1, "every_k_steps", f"must be >= 1, got {cfg.every_k_steps}")
  check(
      cfg.crop_temperature >= 0 and math.isfinite(cfg.crop_temperature),
      "crop_temperature",
      f"must be a finite number >= 0, got {cfg.crop_temperature}",
  )
  check(
      cfg.gamma >= 0 and math.isfinite(cfg.gamma),
      "gamma",
      f"must be a finite number >= 0, got {cfg.gamma}",
  )
  check(cfg.num_local_crops >= 0, "num_local_crops", f"must be >= 0, got {cfg.num_local_crops}")
  check(0 < cfg.local_crop_size, "local_crop_size", f"must be > 0, got {cfg.local_crop_size}")
  lo, hi = cfg.local_scale
  check(0 < lo <= hi <= 1, "local_scale", f"must satisfy 0 < a <= b <= 1, got {cfg.local_scale}")
  check(
      cfg.coverage_masks in ("", "gt"),
      "coverage_masks",
      f"must be '' or 'gt', got {cfg.coverage_masks!r}",
  )
  check(cfg.picture_images >= 0, "picture_images", f"must be >= 0, got {cfg.picture_images}")
