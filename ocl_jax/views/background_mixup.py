"""Background mixup (BG-mixup) of docs/method.md#bg-mixup, run on device.

Pure, jit/vmap-safe functions with static shapes: no Python control flow on
traced values, tiling by modulo index arithmetic on coordinate vectors.
Images are HWC float32 in [0, 1]; masks are soft foreground masks (H, W) in
[0, 1] (ContraCAM, T=1), already cropped/flipped like the view they belong to.

Semantics follow the authors' release (alinlab/object-aware-contrastive,
models/bg_mixup.py), with the differences listed here:

* Rectangle: hard = mask >= threshold; the tight, inclusive bounding box
  [h_min, h_max] x [w_min, w_max] of `hard`. An empty hard mask counts as
  "whole image" (as in the release), so it has no background.
* Strip: the largest (by area) of top (h_min rows), left (w_min columns),
  right (W-1-w_max columns), bottom (H-1-h_max rows); ties go to the first in
  that order (the release's `list.index(max(...))`). The strip is repeated
  periodically from the image origin (bg[r] = strip[r mod strip_h] for
  top/bottom, likewise columns for left/right), which is exactly what the
  release's tile-then-fill-remainder does.
  DIFFERENCE: the release's right/bottom strips start at w_max / h_max (they
  include the rectangle's last column/row, an off-by-one against its own area
  formula) and it pastes the tiling into [h_min:h_max, w_min:w_max) (excluding
  the last row/column). Here strips lie strictly outside the rectangle and the
  tiling fills the whole inclusive rectangle.
* Gating (as the release): image i gets a "valid background" iff its rectangle
  is not the whole image AND its own coin (u_i < prob) comes up. Image i is
  mixed iff it has a valid background; its donor is bg_{perm[i]} if perm[i]
  has a valid background, otherwise a uniformly random FIFO entry, otherwise
  (pool empty) x_i is kept. So with prob < 1 donors are also gated by their
  coin (the release couples the two); `gate_donors=False` makes every
  image with a background a donor regardless of its coin.
* FIFO (as the release): the valid backgrounds of the batch are pushed in
  batch order; the release interleaves mixing and pushing, so image i may draw
  from the FIFO *plus the valid backgrounds of images 0..i-1 of this batch*
  (the last `capacity` of them). That is reproduced exactly here.
* Mixing: m_i * x_i + (1 - m_i) * donor with the soft mask m_i (clipped to
  [0, 1]), as the release.
* Global batch (DIFFERENCE: the release works per GPU, its `randperm`, pool
  and FIFO per device). Inside `pmap` with `axis_name`, every device's
  backgrounds are gathered: the permutation is one draw over the global batch
  (from `key` alone, each device taking its slice), "images 0..i-1" are the
  global batch's, and every device pushes the global batch's valid
  backgrounds, so the FIFO is the same on every device. Per-image draws (coin
  and FIFO choice) use fold_in(key_img, index_offset + i). So the result does
  not depend on how the global batch is split over devices or processes.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class BgFifo:
  """Fixed-capacity FIFO of background images (a pytree for the train state).

  images: (capacity, H, W, 3); count: number of filled slots (<= capacity);
  ptr: next slot to write. The most recent entry is at (ptr - 1) % capacity.
  """

  images: jax.Array
  count: jax.Array
  ptr: jax.Array

  @property
  def capacity(self) -> int:
    return self.images.shape[0]


def fifo_init(height: int, width: int, capacity: int = 50, channels: int = 3) -> BgFifo:
  return BgFifo(
      images=jnp.zeros((capacity, height, width, channels), jnp.float32),
      count=jnp.zeros((), jnp.int32),
      ptr=jnp.zeros((), jnp.int32),
  )


def fifo_push(fifo: BgFifo, bgs: jax.Array, has_bg: jax.Array) -> BgFifo:
  """Pushes bgs[i] for which has_bg[i], in batch order (oldest evicted first)."""
  cap = fifo.capacity
  valid = jnp.asarray(has_bg, bool)
  rank = jnp.cumsum(valid.astype(jnp.int32)) - 1
  n_valid = jnp.sum(valid.astype(jnp.int32))
  # Only the last `cap` valid entries survive; dropping the others keeps
  # scatter indices unique (duplicate-index scatter order is unspecified).
  keep = valid & (rank >= n_valid - cap)
  slot = jnp.where(keep, (fifo.ptr + rank) % cap, cap)  # cap = out of bounds -> dropped
  images = fifo.images.at[slot].set(bgs.astype(fifo.images.dtype), mode="drop")
  return BgFifo(
      images=images,
      count=jnp.minimum(fifo.count + n_valid, cap).astype(jnp.int32),
      ptr=((fifo.ptr + n_valid) % cap).astype(jnp.int32),
  )


def _fifo_slot_of_age(fifo: BgFifo, age: jax.Array) -> jax.Array:
  """Slot of the entry pushed `age` pushes ago (0 = most recent)."""
  return (fifo.ptr - 1 - age) % fifo.capacity


def fifo_sample(key: jax.Array, fifo: BgFifo, n: int) -> tuple[jax.Array, jax.Array]:
  """n entries drawn uniformly (with replacement) from the filled slots.

  Returns (images (n, H, W, 3), ok); ok is False when the FIFO is empty (the
  images are then zeros-or-stale and must not be used).
  """
  u = jax.random.uniform(key, (n,))
  age = jnp.minimum(jnp.floor(u * fifo.count).astype(jnp.int32), jnp.maximum(fifo.count - 1, 0))
  return fifo.images[_fifo_slot_of_age(fifo, age)], fifo.count > 0


def bounding_rectangle(mask: jax.Array, threshold: float = 0.2):
  """Inclusive (h_min, h_max, w_min, w_max) of mask >= threshold; whole image if empty."""
  h, w = mask.shape
  hard = mask >= threshold
  rows, cols = jnp.any(hard, axis=1), jnp.any(hard, axis=0)
  nonempty = jnp.any(rows)
  h_min = jnp.where(nonempty, jnp.argmax(rows), 0)
  h_max = jnp.where(nonempty, h - 1 - jnp.argmax(rows[::-1]), h - 1)
  w_min = jnp.where(nonempty, jnp.argmax(cols), 0)
  w_max = jnp.where(nonempty, w - 1 - jnp.argmax(cols[::-1]), w - 1)
  return h_min, h_max, w_min, w_max


# Strip ids, in the release's tie-breaking order.
TOP, LEFT, RIGHT, BOTTOM = 0, 1, 2, 3


def background_image(
    image: jax.Array, mask: jax.Array, threshold: float = 0.2, return_strip: bool = False
):
  """Background-only image of one view: (bg (H, W, C), has_bg bool scalar).

  Inside the mask's tight rectangle the largest outside strip, tiled
  periodically from the image origin; outside it, the image itself. When the
  rectangle is the whole image (or the hard mask is empty) has_bg is False and
  bg is the image unchanged. With return_strip, also returns the strip id.
  """
  h, w = mask.shape
  h_min, h_max, w_min, w_max = bounding_rectangle(mask, threshold)
  top_h, bot_h = h_min, h - 1 - h_max
  left_w, right_w = w_min, w - 1 - w_max
  areas = jnp.stack([top_h * w, left_w * h, right_w * h, bot_h * w])
  strip = jnp.argmax(areas)  # first maximum on ties
  has_bg = areas[strip] > 0
  r = jnp.arange(h)
  c = jnp.arange(w)
  src_r = jnp.where(
      strip == TOP,
      r % jnp.maximum(top_h, 1),
      jnp.where(strip == BOTTOM, h_max + 1 + r % jnp.maximum(bot_h, 1), r),
  )
  src_c = jnp.where(
      strip == LEFT,
      c % jnp.maximum(left_w, 1),
      jnp.where(strip == RIGHT, w_max + 1 + c % jnp.maximum(right_w, 1), c),
  )
  src_r = jnp.clip(src_r, 0, h - 1)
  src_c = jnp.clip(src_c, 0, w - 1)
  tiled = image[src_r][:, src_c]
  in_rect = ((r >= h_min) & (r <= h_max))[:, None] & ((c >= w_min) & (c <= w_max))[None, :]
  bg = jnp.where((in_rect & has_bg)[..., None], tiled, image)
  if return_strip:
    return bg, has_bg, strip
  return bg, has_bg


def mix_with(
    views: jax.Array,
    masks: jax.Array,
    perm: jax.Array,
    coin_u: jax.Array,
    fifo_u: jax.Array,
    fifo: BgFifo,
    prob: float = 0.4,
    threshold: float = 0.2,
    gate_donors: bool = True,
    axis_name: str | None = None,
    index_offset=0,
):
  """BG-mixup with explicit randomness (the deterministic core, for tests).

  perm: (B,) donor index per image, into the global batch; coin_u, fifo_u: (B,)
  uniforms in [0, 1). With `axis_name` (inside pmap) this device's images are
  the global batch's [index_offset, index_offset + B); without, the batch is
  the global batch. Returns (mixed_views, new_fifo, stats) as `background_mixup`.
  """
  b = views.shape[0]
  cap = fifo.capacity
  bgs, has_rect_bg = jax.vmap(lambda x, m: background_image(x, m, threshold))(views, masks)
  coin = coin_u < prob
  valid = has_rect_bg & coin  # image i is mixed / pushed (release gating)
  donor_ok = valid if gate_donors else has_rect_bg
  if axis_name is None:
    all_bgs, all_valid, all_donor_ok, mine = bgs, valid, donor_ok, jnp.arange(b)
  else:  # every device sees the global batch's backgrounds, in global order
    gather = lambda x: jax.lax.all_gather(x, axis_name, tiled=True)
    all_bgs, all_valid, all_donor_ok = gather(bgs), gather(valid), gather(donor_ok)
    mine = index_offset + jnp.arange(b)
  g = all_bgs.shape[0]
  own = all_donor_ok[perm]
  # The release mixes image i, then pushes bg_i: image i's pool is the FIFO
  # plus the valid backgrounds of images 0..i-1 (the last `cap` of them).
  all_valid_i32 = all_valid.astype(jnp.int32)
  n_before = (jnp.cumsum(all_valid_i32) - all_valid_i32)[mine]
  pool = jnp.minimum(fifo.count + n_before, cap)
  age = jnp.minimum(jnp.floor(fifo_u * pool).astype(jnp.int32), jnp.maximum(pool - 1, 0))
  from_batch = age < n_before
  valid_idx = jnp.nonzero(all_valid, size=g, fill_value=0)[0]  # global indices of valid, in order
  batch_src = valid_idx[jnp.clip(n_before - 1 - age, 0, g - 1)]
  fifo_src = fifo.images[_fifo_slot_of_age(fifo, jnp.maximum(age - n_before, 0))]
  queued = jnp.where(from_batch[:, None, None, None], all_bgs[batch_src], fifo_src)
  use_fifo = valid & ~own & (pool > 0)
  mixed = valid & (own | (pool > 0))
  donor = jnp.where(own[:, None, None, None], all_bgs[perm], queued)
  m = jnp.clip(masks, 0.0, 1.0)[..., None]
  out = jnp.where(mixed[:, None, None, None], m * views + (1.0 - m) * donor, views)
  new_fifo = fifo_push(fifo, all_bgs, all_valid)  # the same on every device
  n_mixed = jnp.sum(mixed.astype(jnp.int32))
  stats = {
      "bg_mixup/mixed": n_mixed,
      "bg_mixup/from_fifo": jnp.sum(use_fifo.astype(jnp.int32)),
      "bg_mixup/kept": b - n_mixed,
      "bg_mixup/with_background": jnp.sum(has_rect_bg.astype(jnp.int32)),
  }
  return out, new_fifo, stats


def background_mixup(
    key: jax.Array,
    views: jax.Array,
    masks: jax.Array,
    index_offset,
    fifo: BgFifo,
    prob: float = 0.4,
    threshold: float = 0.2,
    gate_donors: bool = True,
    axis_name: str | None = None,
):
  """BG-mixup of this device's views, donors from the global batch: (mixed, new_fifo, stats).

  views: (B, H, W, 3) in [0, 1] (view 1, after colour augmentation); masks:
  (B, H, W) soft foreground masks aligned with the views. With probability
  `prob` (per image, key fold_in(.., index_offset + i)) an image that has a
  background becomes m_i x_i + (1 - m_i) bg_{perm[i]}, perm a random
  permutation of the global batch (every device's, with `axis_name` inside
  pmap); donors without a (valid) background are replaced by a random FIFO
  entry; with an empty pool x_i is kept. stats counts this device's mixed,
  from_fifo (subset of mixed), kept (= B - mixed), with_background.
  """
  b = views.shape[0]
  k_img, k_perm = jax.random.split(key)
  offset = jnp.asarray(index_offset, jnp.int32)
  idx = offset + jnp.arange(b, dtype=jnp.int32)
  u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(k_img, i), (2,)))(idx)
  g = b if axis_name is None else b * jax.lax.axis_size(axis_name)
  perm = jax.random.permutation(jax.random.fold_in(k_perm, 0), g)
  if axis_name is not None:
    perm = jax.lax.dynamic_slice_in_dim(perm, offset, b)
  return mix_with(
      views, masks, perm, u[:, 0], u[:, 1], fifo, prob, threshold, gate_donors, axis_name, offset
  )
