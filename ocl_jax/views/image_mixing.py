"""Mixup and CutMix of view 1 with a permuted batch (MoCo baselines, docs/method.md#mixup-cutmix).

The mixed query must be explained by both its sources' keys, so these
functions return, besides the mixed images, each image's mixing weight
lambda (the share of its own image) and its donor `perm`, which the objective
(`objectives.moco_mix_per_example`) turns into a two-target cross-entropy.

* lambda ~ Beta(alpha, alpha), then lambda <- max(lambda, 1 - lambda), so an
  image is always mostly itself;
* mixup draws lambda per image, CutMix once per batch; CutMix pastes a box of
  area (1 - lambda) of the image from the donor, clipped at the borders, and
  lambda is then corrected to the exact area left of the image's own pixels;
* the donor permutation is over the global batch: inside `pmap` with
  `axis_name`, every device's images are gathered and each device takes its
  slice of one permutation drawn from the step's key, so the donors, and
  with them the losses, do not depend on how the batch is split over devices
  (the release draws its `randperm` per GPU); the per-image lambdas use
  fold_in(key, index_offset + i) like every other per-image draw. The
  returned `perm` indexes the global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("none", "mixup", "cutmix")


def symmetric_beta(key: jax.Array, alpha: float) -> jax.Array:
  """lambda ~ Beta(alpha, alpha) folded to [0.5, 1]; alpha = 1 is the uniform (no gamma draws)."""
  if alpha == 1.0:
    lam = jax.random.uniform(key)
  else:
    lam = jax.random.beta(key, alpha, alpha)
  return jnp.maximum(lam, 1.0 - lam)


def global_donors(
    key: jax.Array, images: jax.Array, index_offset, axis_name: str | None
) -> tuple[jax.Array, jax.Array]:
  """(the global batch's images, this device's donors: indices into it (B,)).

  One permutation of the global batch, drawn from `key` alone (the same on
  every device); each device takes its slice. Without `axis_name` the batch
  passed in is the global batch.
  """
  n = images.shape[0]
  if axis_name is None:
    return images, jax.random.permutation(jax.random.fold_in(key, 0), n)
  everyone = jax.lax.all_gather(images, axis_name, tiled=True)
  perm = jax.random.permutation(jax.random.fold_in(key, 0), everyone.shape[0])
  return everyone, jax.lax.dynamic_slice_in_dim(perm, index_offset, n)


def mixup(
    key: jax.Array,
    images: jax.Array,
    index_offset,
    alpha: float = 1.0,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x_i <- lambda_i x_i + (1 - lambda_i) x_perm(i), one lambda per image: (mixed, lam, perm)."""
  k_perm, k_lam = jax.random.split(key)
  n = images.shape[0]
  everyone, perm = global_donors(k_perm, images, index_offset, axis_name)
  keys = jax.vmap(lambda i: jax.random.fold_in(k_lam, index_offset + i))(jnp.arange(n))
  lam = jax.vmap(lambda k: symmetric_beta(k, alpha))(keys)
  shape = (n,) + (1,) * (images.ndim - 1)
  mixed = lam.reshape(shape) * images + (1.0 - lam.reshape(shape)) * everyone[perm]
  return mixed, lam, perm


def cutmix_box(u: jax.Array, lam, height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """The pasted box from two uniforms (centre) and lambda: (rows [r0, r1), cols [c0, c1)).

  Side lengths are sqrt(1 - lambda) of the image's (rounded down, as the
  reference CutMix), the box centred at a uniform pixel and clipped.
  """
  cut = jnp.sqrt(1.0 - lam)
  ch, cw = jnp.floor(height * cut), jnp.floor(width * cut)
  cy, cx = jnp.floor(u[0] * height), jnp.floor(u[1] * width)
  r0 = jnp.clip(cy - ch // 2, 0, height).astype(jnp.int32)
  r1 = jnp.clip(cy + ch // 2, 0, height).astype(jnp.int32)
  c0 = jnp.clip(cx - cw // 2, 0, width).astype(jnp.int32)
  c1 = jnp.clip(cx + cw // 2, 0, width).astype(jnp.int32)
  return jnp.stack([r0, r1]), jnp.stack([c0, c1])


def cutmix(
    key: jax.Array,
    images: jax.Array,
    index_offset,
    alpha: float = 1.0,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Paste one box of the donor into every image (lambda per global batch, area-corrected).

  Returns (mixed, lam (B,), perm (B,)); lam is the same for every image: the
  fraction of pixels that are the image's own after clipping.
  """
  k_perm, k_lam, k_box = jax.random.split(key, 3)
  n, h, w = images.shape[:3]
  everyone, perm = global_donors(k_perm, images, index_offset, axis_name)
  lam = symmetric_beta(jax.random.fold_in(k_lam, 0), alpha)
  rows, cols = cutmix_box(jax.random.uniform(jax.random.fold_in(k_box, 0), (2,)), lam, h, w)
  r, c = jnp.arange(h), jnp.arange(w)
  inside = ((r >= rows[0]) & (r < rows[1]))[:, None] & ((c >= cols[0]) & (c < cols[1]))[None, :]
  mixed = jnp.where(inside[None, :, :, None], everyone[perm], images)
  own = 1.0 - inside.sum() / (h * w)
  return mixed, jnp.full((n,), own, images.dtype), perm


def mix_images(
    kind: str,
    key: jax.Array,
    images: jax.Array,
    index_offset,
    alpha: float = 1.0,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Dispatch on config.mix.kind ('mixup' | 'cutmix')."""
  if kind == "mixup":
    return mixup(key, images, index_offset, alpha, axis_name)
  if kind == "cutmix":
    return cutmix(key, images, index_offset, alpha, axis_name)
  raise ValueError(f"config.mix.kind={kind!r} is not one of {KINDS[1:]}")
