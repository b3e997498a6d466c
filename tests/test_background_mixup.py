"""BG-mixup (ocl_jax/views/background_mixup.py) against NumPy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ocl_jax.views import background_mixup as bgm

H = W = 16
B = 6

# One jitted function each, fixed shapes, so each compiles once per module.
_bg = jax.jit(jax.vmap(functools.partial(bgm.background_image, return_strip=True)))
_mix = jax.jit(bgm.mix_with, static_argnames=("prob", "threshold", "gate_donors"))
_push = jax.jit(bgm.fifo_push)
_sample = jax.jit(bgm.fifo_sample, static_argnums=2)
_bm = jax.jit(bgm.background_mixup, static_argnames=("prob", "threshold", "gate_donors"))


def _rect_mask(h0, h1, w0, w1, value=0.9):
  """Soft mask: `value` on the inclusive rectangle, a faint 0.1 (< threshold) elsewhere."""
  m = np.full((H, W), 0.1, np.float32)
  m[h0 : h1 + 1, w0 : w1 + 1] = value
  return m


def _images(n, seed=0):
  return np.random.default_rng(seed).uniform(size=(n, H, W, 3)).astype(np.float32)


def _np_background(img, mask, thr=0.2):
  """Independent reference: np.nonzero box, np.tile, slice, paste (inclusive box)."""
  ys, xs = np.nonzero(mask >= thr)
  if ys.size == 0:
    return img, False, None
  h0, h1, w0, w1 = ys.min(), ys.max(), xs.min(), xs.max()
  strips = [img[:h0], img[:, :w0], img[:, w1 + 1 :], img[h1 + 1 :]]
  areas = [s.shape[0] * s.shape[1] for s in strips]
  k = int(np.argmax(areas))
  if areas[k] == 0:
    return img, False, None
  s = strips[k]
  reps = (-(-H // s.shape[0]), -(-W // s.shape[1]), 1)
  tiled = np.tile(s, reps)[:H, :W]
  bg = img.copy()
  bg[h0 : h1 + 1, w0 : w1 + 1] = tiled[h0 : h1 + 1, w0 : w1 + 1]
  return bg, True, k


CASES = [  # (mask, expected strip)
    (_rect_mask(5, 10, 5, 10), bgm.TOP),  # centred: top (ties -> first)
    (_rect_mask(0, 3, 0, 4), bgm.BOTTOM),  # top-left, wide gap below
    (_rect_mask(0, 12, 0, 2), bgm.RIGHT),  # tall at the left edge
    (_rect_mask(2, 15, 9, 15), bgm.LEFT),  # bottom-right
    (_rect_mask(0, 15, 0, 15), None),  # whole image
    (np.zeros((H, W), np.float32), None),  # empty hard mask
]


def test_background_image_matches_numpy():
  imgs = _images(len(CASES))
  masks = np.stack([c[0] for c in CASES])
  bg, has, strip = jax.device_get(_bg(imgs, masks))
  for i, (mask, want_strip) in enumerate(CASES):
    ref, ref_has, ref_strip = _np_background(imgs[i], mask)
    assert bool(has[i]) == ref_has == (want_strip is not None), i
    if ref_has:
      assert int(strip[i]) == ref_strip == want_strip, i
    np.testing.assert_array_equal(bg[i], ref)
  # The centred square: outside the rectangle untouched, inside = rows tiled from the top strip.
  np.testing.assert_array_equal(bg[0][:5], imgs[0][:5])
  np.testing.assert_array_equal(bg[0][5:11, 5:11], imgs[0][np.arange(5, 11) % 5][:, 5:11])
  np.testing.assert_array_equal(bg[0][:, :5], imgs[0][:, :5])


def test_bounding_rectangle():
  got = [int(v) for v in bgm.bounding_rectangle(jnp.asarray(_rect_mask(3, 9, 4, 12)))]
  assert got == [3, 9, 4, 12]
  got = [int(v) for v in bgm.bounding_rectangle(jnp.zeros((H, W)))]
  assert got == [0, H - 1, 0, W - 1]


def _np_release_mix(views, masks, perm, coin_u, fifo_u, queue, prob, thr=0.2):
  """The release's loop (mix image i, then push bg_i) with a Python list queue."""
  queue = list(queue)
  out, n_fifo = [], 0
  info = [_np_background(v, m, thr) for v, m in zip(views, masks)]
  valid = [inf[1] and coin_u[i] < prob for i, inf in enumerate(info)]
  for i in range(len(views)):
    x, m = views[i], masks[i][..., None]
    if not valid[i]:
      out.append(x)
    elif valid[perm[i]]:
      out.append(m * x + (1 - m) * info[perm[i]][0])
    elif queue:
      age = min(int(np.floor(fifo_u[i] * len(queue))), len(queue) - 1)
      out.append(m * x + (1 - m) * queue[len(queue) - 1 - age])
      n_fifo += 1
    else:
      out.append(x)
    if valid[i]:
      queue.append(info[i][0])
      queue = queue[-50:]
  return np.stack(out), queue, n_fifo


def _batch():
  masks = np.stack(
      [
          _rect_mask(5, 10, 5, 10),
          _rect_mask(0, 15, 0, 15),
          _rect_mask(0, 3, 0, 4),
          np.zeros((H, W), np.float32),
          _rect_mask(2, 15, 9, 15),
          _rect_mask(0, 12, 0, 2),
      ]
  )
  # Soft gradient inside the masks so the mixing weights are not just 0.9/0.1.
  masks = masks * np.linspace(0.5, 1.0, W, dtype=np.float32)[None, None, :]
  masks[1] = 1.0  # full foreground: no background
  return _images(B, seed=1), masks.astype(np.float32)


@pytest.mark.parametrize(
    "perm,prefill",
    [
        ([1, 0, 3, 2, 5, 4], 0),  # donors 1 and 3 have no background -> FIFO or keep
        ([5, 3, 4, 1, 2, 0], 3),  # prefilled FIFO
        ([0, 1, 2, 3, 4, 5], 0),  # self-donors
    ],
)
def test_mix_formula_matches_release_loop(perm, prefill):
  views, masks = _batch()
  rng = np.random.default_rng(7)
  coin_u = np.array([0.1, 0.1, 0.1, 0.1, 0.1, 0.9], np.float32)  # image 5 loses its coin
  fifo_u = rng.uniform(size=B).astype(np.float32)
  fifo = bgm.fifo_init(H, W, capacity=50)
  old = _images(prefill, seed=3)
  fifo = _push(fifo, old, np.ones(prefill, bool)) if prefill else fifo
  out, new_fifo, stats = _mix(views, masks, np.array(perm), coin_u, fifo_u, fifo, prob=0.5)
  ref, ref_queue, n_fifo = _np_release_mix(views, masks, perm, coin_u, fifo_u, list(old), 0.5)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-6)
  assert int(stats["bg_mixup/from_fifo"]) == n_fifo
  n_mixed = sum(not np.array_equal(ref[i], views[i]) for i in range(B))
  assert int(stats["bg_mixup/mixed"]) == n_mixed
  assert int(stats["bg_mixup/kept"]) == B - n_mixed
  assert int(new_fifo.count) == len(ref_queue)
  got_queue = [
      np.asarray(new_fifo.images[(int(new_fifo.ptr) - len(ref_queue) + k) % 50])
      for k in range(len(ref_queue))
  ]
  np.testing.assert_array_equal(np.stack(got_queue), np.stack(ref_queue))


def test_empty_fifo_no_background_keeps_image():
  views, masks = _batch()
  # Image 0 (has a background) is first and its donor (1) has none: pool is empty -> kept.
  perm = np.array([1, 0, 3, 2, 5, 4])
  out, _, stats = _mix(
      views,
      masks,
      perm,
      np.zeros(B, np.float32),
      np.zeros(B, np.float32),
      bgm.fifo_init(H, W),
      prob=0.5,
  )
  np.testing.assert_array_equal(np.asarray(out[0]), views[0])
  np.testing.assert_array_equal(np.asarray(out[1]), views[1])  # no background of its own


def test_prob_zero_identity_prob_one_mixes_all_with_background():
  views, masks = _batch()
  key = jax.random.PRNGKey(0)
  fifo = bgm.fifo_init(H, W)
  out0, f0, s0 = _bm(key, views, masks, 0, fifo, prob=0.0)
  np.testing.assert_array_equal(np.asarray(out0), views)
  assert int(s0["bg_mixup/mixed"]) == 0 and int(f0.count) == 0
  # A FIFO with entries so every image with a background has a donor.
  fifo = _push(fifo, _images(B, seed=4), np.ones(B, bool))
  out1, f1, s1 = _bm(key, views, masks, 0, fifo, prob=1.0)
  has = np.array([_np_background(v, m)[1] for v, m in zip(views, masks)])
  assert int(s1["bg_mixup/mixed"]) == has.sum() == int(s1["bg_mixup/with_background"])
  for i in range(B):
    assert np.array_equal(np.asarray(out1[i]), views[i]) != has[i]
  assert int(f1.count) == B + has.sum()
  for o in (out0, out1):
    assert float(o.min()) >= 0.0 and float(o.max()) <= 1.0


def test_deterministic_and_independent_of_device_split():
  views, masks = _batch()
  fifo = _push(bgm.fifo_init(H, W), _images(B, seed=4), np.ones(B, bool))
  key = jax.random.PRNGKey(1)
  a, _, _ = _bm(key, views, masks, 0, fifo, prob=0.5)
  b, _, _ = _bm(key, views, masks, 0, fifo, prob=0.5)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  # Two devices of 3 images each draw donors from the global batch: the same mixed images,
  # and every device ends with the same FIFO, that of the whole batch on one device.
  whole_fifo = _bm(key, views, masks, 0, fifo, prob=0.5)[1]
  split = jax.pmap(
      lambda v, m, off, f: bgm.background_mixup(key, v, m, off, f, prob=0.5, axis_name="d")[:2],
      axis_name="d",
      in_axes=(0, 0, 0, None),
      devices=jax.local_devices()[:2],
  )
  c, fifos = split(
      views.reshape(2, 3, H, W, 3), masks.reshape(2, 3, H, W), np.array([0, 3], np.int32), fifo
  )
  # (Up to the last bit: the two compilations fuse m*x + (1-m)*bg differently.)
  np.testing.assert_allclose(np.asarray(c).reshape(B, H, W, 3), np.asarray(a), atol=1e-6)
  for d in range(2):
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x)[d], y, atol=1e-6), fifos, whole_fifo
    )
  changed_a = [not np.array_equal(np.asarray(a[i]), views[i]) for i in range(B)]
  assert any(changed_a) and not all(changed_a)


def test_fifo_order_wraparound_and_sampling():
  cap = 5
  fifo = bgm.fifo_init(2, 2, capacity=cap)
  push = jax.jit(bgm.fifo_push)
  val = lambda vs: np.stack([np.full((2, 2, 3), v, np.float32) for v in vs])
  fifo = push(fifo, val([1, 2, 3, 4]), np.array([True, False, True, True]))
  assert int(fifo.count) == 3 and int(fifo.ptr) == 3
  np.testing.assert_array_equal(np.asarray(fifo.images[:3, 0, 0, 0]), [1, 3, 4])
  # Sampling only hits filled slots.
  s, ok = _sample(jax.random.PRNGKey(0), fifo, 64)
  assert bool(ok) and set(np.asarray(s[:, 0, 0, 0]).tolist()) <= {1.0, 3.0, 4.0}
  assert len(set(np.asarray(s[:, 0, 0, 0]).tolist())) == 3
  # Wrap-around: 4 more -> slots 3,4,0,1; count capped; oldest evicted.
  fifo = push(fifo, val([5, 6, 7, 8]), np.ones(4, bool))
  assert int(fifo.count) == cap and int(fifo.ptr) == 2
  np.testing.assert_array_equal(np.asarray(fifo.images[:, 0, 0, 0]), [7, 8, 4, 5, 6])
  # A push larger than the capacity keeps the last `cap` valid entries, in order.
  fifo = push(fifo, val([10, 11, 12, 13, 14, 15, 16]), np.array([1, 1, 1, 0, 1, 1, 1], bool))
  assert int(fifo.ptr) == (2 + 6) % cap
  order = [float(fifo.images[(int(fifo.ptr) + k) % cap, 0, 0, 0]) for k in range(cap)]
  assert order == [11, 12, 14, 15, 16]
  # Empty FIFO: ok is False.
  _, ok = _sample(jax.random.PRNGKey(0), bgm.fifo_init(2, 2, capacity=cap), 64)
  assert not bool(ok)
