"""ContraCAM against NumPy references of docs/method.md#contracam and the release.

The network's layer4 maps come from the real (tiny) ResNet; everything after
them (score, its gradient through GAP + projector, weights, bicubic
upsampling, normalisation, union, masking, the T-step loop) is recomputed in
float64 NumPy by hand and compared with the jitted ContraCAM.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ocl_jax.discovery import contracam as cc
from ocl_jax import models

SPEC = models.ModelSpec(
    arch="resnet10", width=4, small_stem=True, proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=0
)
BATCH, SIZE = 6, 32
BN_EPS = 1e-5


# ----------------------------------------------------------------------------
# NumPy references.


def np_cubic(x, a=-0.75):
  x = abs(x)
  if x <= 1:
    return (a + 2) * x**3 - (a + 3) * x**2 + 1
  if x < 2:
    return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
  return 0.0


def np_bicubic(img, out_h, out_w):
  """PyTorch upsample_bicubic2d (align_corners=False), pixel by pixel, 16 taps."""
  in_h, in_w = img.shape[-2:]
  out = np.zeros(img.shape[:-2] + (out_h, out_w))

  def src(dst, in_size, out_size):
    real = in_size / out_size * (dst + 0.5) - 0.5  # cubic: no clamp at 0
    i = min(int(np.floor(real)), in_size - 1)
    return i, min(max(real - i, 0.0), 1.0)

  for oy in range(out_h):
    iy, ty = src(oy, in_h, out_h)
    for ox in range(out_w):
      ix, tx = src(ox, in_w, out_w)
      acc = 0.0
      for m in range(-1, 3):
        for n in range(-1, 3):
          yy = min(max(iy + m, 0), in_h - 1)  # border replicate
          xx = min(max(ix + n, 0), in_w - 1)
          acc = acc + np_cubic(m - ty) * np_cubic(n - tx) * img[..., yy, xx]
      out[..., oy, ox] = acc
  return out


def np_logsumexp(x, axis):
  m = np.max(x, axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def np_score_and_grad(q, k, negs, official):
  """Score (B,) and d(sum score)/dq (B, D); negs: list of (B, D) sets so far."""
  b = q.shape[0]
  eye = np.eye(b)
  if official:  # the release's formula, written the way it computes it
    pos = np.exp(np.sum(q * k, 1)).sum()
    logits = np.concatenate([(q @ n.T) * (1 - eye) for n in negs], axis=1)
    score = np.log(pos / np.exp(logits).sum(1))
    soft_pos = np.exp(np.sum(q * k, 1)) / pos
    grad = b * soft_pos[:, None] * k
    soft = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for s, n in enumerate(negs):
      grad -= (soft[:, s * b : (s + 1) * b] * (1 - eye)) @ n  # diagonal entries are constants
    return score, grad
  logits = np.concatenate([q @ n.T for n in negs], axis=1)
  valid = np.concatenate([1 - eye] * len(negs), axis=1) > 0
  lse = np_logsumexp(np.where(valid, logits, -np.inf), 1)
  score = np.sum(q * k, 1) - lse
  soft = np.where(valid, np.exp(logits - lse[:, None]), 0.0)
  grad = k - sum(soft[:, s * b : (s + 1) * b] @ n for s, n in enumerate(negs))
  return score, grad


def np_head(variables, fmap):
  """Projector on GAP(A) (inference BN) and L2 normalisation; returns q and a VJP."""
  p, st = variables["params"]["projector"], variables["batch_stats"]["projector"]
  hw = fmap.shape[1] * fmap.shape[2]
  pooled = fmap.mean(axis=(1, 2))
  w1 = np.asarray(p["fc1"]["kernel"], np.float64)
  gain = np.asarray(p["bn1"]["scale"], np.float64) / np.sqrt(
      np.asarray(st["bn1"]["var"], np.float64) + BN_EPS
  )
  v = (pooled @ w1 - np.asarray(st["bn1"]["mean"])) * gain + np.asarray(p["bn1"]["bias"])
  r = np.maximum(v, 0)
  w2 = np.asarray(p["fc2"]["kernel"], np.float64)
  o = r @ w2 + np.asarray(p["fc2"]["bias"])
  norm = np.linalg.norm(o, axis=1, keepdims=True)
  q = o / norm

  def vjp(dq):
    do = (dq - q * np.sum(q * dq, 1, keepdims=True)) / norm
    dv = (do @ w2.T) * (v > 0)
    dpooled = (dv * gain) @ w1.T
    return np.broadcast_to(dpooled[:, None, None, :] / hw, fmap.shape)

  return q, vjp


def np_contracam(fmap_fn, variables, images, iterations, official=False, clamp=True):
  """docs/method.md#contracam step by step; only the layer4 maps come from the network."""
  images = np.asarray(images, np.float64)
  b, h, w, _ = images.shape
  colour = images.mean(axis=(0, 1, 2))
  x, union, key, negs, cams = images, np.zeros((b, h, w)), None, [], []
  for _ in range(iterations):
    fmap = np.asarray(fmap_fn(jnp.asarray(x, jnp.float32)), np.float64)
    q, vjp = np_head(variables, fmap)
    key = q if key is None else key
    negs.append(q)
    _, dq = np_score_and_grad(q, key, negs, official)
    weights = vjp(dq).mean(axis=(1, 2))
    if clamp:
      weights = np.maximum(weights, 0)
    cam = np.maximum(np.einsum("bhwc,bc->bhw", fmap, weights), 0)
    cam = np_bicubic(cam, h, w)
    cam = cam - cam.min(axis=(1, 2), keepdims=True)
    cam = cam / (cam.max(axis=(1, 2), keepdims=True) + 1e-20)
    union = np.maximum(union, cam)
    x = images * (1 - union[..., None]) + colour * union[..., None]
    cams.append(cam)
  return union, np.stack(cams)


# ----------------------------------------------------------------------------
# Fixtures: one tiny network, compiled functions shared across tests.


@pytest.fixture(scope="module")
def tiny():
  images = jax.random.normal(jax.random.PRNGKey(0), (BATCH, SIZE, SIZE, 3), jnp.float32)
  net = cc.cam_network(SPEC, cc.CamSettings())
  variables = models.random_variables(net, images, seed=1, shift_std=0.2)
  fmap_fn = jax.jit(lambda x: net.apply(variables, x, False, method="feature_map"))
  return net, variables, images, fmap_fn


@pytest.fixture(scope="module")
def runs(tiny):
  net, variables, images, _ = tiny
  out = {}
  for name, settings in [
      ("t1", cc.CamSettings(iterations=1)),
      ("t3", cc.CamSettings(iterations=3)),
      ("t3_official", cc.CamSettings(iterations=3, official_score=True)),
  ]:
    out[name] = jax.tree_util.tree_map(np.asarray, cc.contracam(net, variables, images, settings))
  return out


# ----------------------------------------------------------------------------
# Bicubic upsampling.


def test_bicubic_hand_computed_pytorch_values():
  # torch.nn.functional.interpolate([[0, 1]], size=4, mode='bicubic', align_corners=False):
  # Keys a=-0.75, source x = (dst + 0.5) / 2 - 0.5, border taps replicated.
  m = cc.bicubic_matrix(2, 4)
  np.testing.assert_allclose(
      m @ np.array([0.0, 1.0]), [-0.10546875, 0.2265625, 0.7734375, 1.10546875], atol=1e-7
  )


@pytest.mark.parametrize(
    "in_hw,out_hw", [((3, 4), (17, 23)), ((4, 4), (32, 32)), ((7, 5), (3, 5)), ((1, 2), (3, 4))]
)
def test_bicubic_matches_pytorch_formula_reference(in_hw, out_hw):
  maps = np.random.default_rng(0).normal(size=(2,) + in_hw)
  got = cc.upsample_bicubic(jnp.asarray(maps, jnp.float32), out_hw)
  np.testing.assert_allclose(np.asarray(got), np_bicubic(maps, *out_hw), rtol=1e-5, atol=1e-5)


def test_bicubic_is_not_jax_cubic_and_preserves_constants():
  maps = np.random.default_rng(1).normal(size=(1, 4, 4)).astype(np.float32)
  ours = np.asarray(cc.upsample_bicubic(jnp.asarray(maps), (16, 16)))
  jaxs = np.asarray(jax.image.resize(jnp.asarray(maps), (1, 16, 16), "cubic"))
  assert np.abs(ours - jaxs).max() > 1e-2  # a=-0.5 and edge handling differ
  np.testing.assert_allclose(cc.bicubic_matrix(5, 13).sum(axis=1), 1.0, atol=1e-6)
  np.testing.assert_allclose(cc.bicubic_matrix(6, 6), np.eye(6), atol=1e-7)


# ----------------------------------------------------------------------------
# Score, weights, normalisation.


def _random_unit(rng, *shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("official", [False, True])
def test_contrastive_score_and_gradient_match_numpy(official):
  rng = np.random.default_rng(2)
  b, d, sets = 5, 7, 4
  q, k = _random_unit(rng, b, d), _random_unit(rng, b, d)
  buffer = _random_unit(rng, sets, b, d)
  buffer[3] = 99.0  # an invalid (not yet filled) set must not count
  valid = 3
  fn = lambda q_: cc.contrastive_score(q_, jnp.asarray(k), jnp.asarray(buffer), valid, official)
  score = fn(jnp.asarray(q))
  grad = jax.grad(lambda q_: fn(q_).sum())(jnp.asarray(q))
  ref_score, ref_grad = np_score_and_grad(q, k, list(buffer[:valid]), official)
  np.testing.assert_allclose(np.asarray(score), ref_score, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-5)


def test_default_score_is_the_per_image_formula_by_hand():
  # B=2, one set: score_i = q_i.k_i - log exp(q_i.n_j) = q_i.k_i - q_i.n_j, j the other image.
  q = np.array([[1.0, 0.0], [0.0, 1.0]])
  k = np.array([[0.6, 0.8], [0.0, 1.0]])
  n = np.array([[[0.0, 1.0], [0.8, 0.6]]])
  score = cc.contrastive_score(jnp.asarray(q), jnp.asarray(k), jnp.asarray(n), 1)
  np.testing.assert_allclose(np.asarray(score), [0.6 - 0.8, 1.0 - 1.0], atol=1e-6)
  # Official: log(sum_j exp(q_j.k_j)) - log(exp(0) + exp(q_i.n_j)), j != i.
  official = cc.contrastive_score(jnp.asarray(q), jnp.asarray(k), jnp.asarray(n), 1, official=True)
  pos = np.log(np.exp(0.6) + np.exp(1.0))
  np.testing.assert_allclose(
      np.asarray(official),
      [pos - np.log(1 + np.exp(0.8)), pos - np.log(1 + np.exp(1.0))],
      atol=1e-6,
  )


def test_official_and_default_gradients_agree_at_t0_and_not_after():
  """At t=0 q = k = the only negative set: the positive term's gradient vanishes
  through the L2 normalisation, and the self-pair's exp(0) only rescales each
  image's negative term, so Grad-CAM after per-image normalisation is equal.
  At t>=1 the batch-summed positive term reweights images: directions differ."""
  rng = np.random.default_rng(3)
  b, d = 6, 5
  q0 = _random_unit(rng, b, d)
  project = lambda q, g: g - q * np.sum(q * g, 1, keepdims=True)  # tangent part = what reaches A
  _, g_def = np_score_and_grad(q0, q0, [q0], official=False)
  _, g_off = np_score_and_grad(q0, q0, [q0], official=True)
  t_def, t_off = project(q0, g_def), project(q0, g_off)
  ratio = np.sum(t_off * t_def, 1) / np.sum(t_def * t_def, 1)
  assert np.all(ratio > 0)
  np.testing.assert_allclose(t_off, ratio[:, None] * t_def, atol=1e-10)
  q1 = _random_unit(rng, b, d)
  _, g_def = np_score_and_grad(q1, q0, [q0, q1], official=False)
  _, g_off = np_score_and_grad(q1, q0, [q0, q1], official=True)
  t_def, t_off = project(q1, g_def), project(q1, g_off)
  cos = np.sum(t_off * t_def, 1) / np.linalg.norm(t_off, axis=1) / np.linalg.norm(t_def, axis=1)
  assert np.min(cos) < 0.999


def test_channel_weights_clamp_and_weighted_map():
  grad = np.zeros((1, 2, 2, 3))
  grad[0, :, :, 0] = [[1.0, 3.0], [0.0, 0.0]]  # mean 1
  grad[0, :, :, 1] = -2.0
  grad[0, :, :, 2] = [[0.5, 0.5], [0.5, 0.5]]
  np.testing.assert_allclose(
      np.asarray(cc.channel_weights(jnp.asarray(grad), True)), [[1.0, 0.0, 0.5]]
  )
  np.testing.assert_allclose(
      np.asarray(cc.channel_weights(jnp.asarray(grad), False)), [[1.0, -2.0, 0.5]]
  )
  fmap = np.zeros((1, 2, 2, 3))
  fmap[0, 0, 0] = [1.0, 1.0, 0.0]  # 1 - 2 = -1 -> ReLU 0
  fmap[0, 1, 1] = [2.0, 0.0, 2.0]  # 2 + 1 = 3
  cam = cc.weighted_map(jnp.asarray(fmap), jnp.asarray([[1.0, -2.0, 0.5]]))
  np.testing.assert_allclose(np.asarray(cam), [[[0.0, 0.0], [0.0, 3.0]]])


def test_normalize_per_image():
  maps = jnp.asarray([[[-1.0, 1.0], [3.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
  got = np.asarray(cc.normalize_per_image(maps))
  np.testing.assert_allclose(got[0], [[0.0, 0.5], [1.0, 0.25]])
  np.testing.assert_array_equal(got[1], 0.0)  # flat map: 0 / (0 + eps)


# ----------------------------------------------------------------------------
# Settings.


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"iterations": 0}, "iterations"),
        ({"iterations": 1.5}, "iterations"),
        ({"expand_res": 3}, "expand_res"),
        ({"mode": "sup"}, "mode"),
        ({"temperature": 0.0}, "temperature"),
        ({"clamp_weights": 1}, "clamp_weights"),
    ],
)
def test_settings_validation_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    cc.CamSettings(**kwargs)


def test_settings_defaults_and_clamp():
  assert cc.CamSettings().clamp and not cc.CamSettings(mode="supervised").clamp
  assert not cc.CamSettings(clamp_weights=False).clamp
  assert hash(cc.CamSettings(iterations=3)) == hash(cc.CamSettings(iterations=3))


def test_network_mismatch_and_batch_of_one_are_rejected(tiny):
  net, variables, images, _ = tiny
  with pytest.raises(ValueError, match="expand_res"):
    cc.contracam(net, variables, images, cc.CamSettings(expand_res=2))
  with pytest.raises(ValueError, match="at least 2"):
    cc.contracam(net, variables, images[:1], cc.CamSettings())
  with pytest.raises(ValueError, match="classifier"):
    cc.contracam(net, variables, images, cc.CamSettings(mode="supervised"))


# ----------------------------------------------------------------------------
# The full refinement against the NumPy reference.


def _check_range(out):
  assert np.all(out["mask"] >= 0) and np.all(out["mask"] <= 1)
  assert np.all(out["cams"] >= 0) and np.all(out["cams"] <= 1)
  np.testing.assert_allclose(out["cams"].max(axis=(2, 3)), 1.0, atol=1e-5)  # min-max normalised


def test_outputs_shapes_and_range(runs):
  for out in runs.values():
    t = out["cams"].shape[0]
    assert out["mask"].shape == (BATCH, SIZE, SIZE)
    assert out["cams"].shape == (t, BATCH, SIZE, SIZE)
    assert out["scores"].shape == (t, BATCH)
    assert out["embedding"].shape == (BATCH, SPEC.proj_dim)
    _check_range(out)


def test_one_step_matches_numpy_reference(tiny, runs):
  net, variables, images, fmap_fn = tiny
  mask, cams = np_contracam(fmap_fn, variables, images, 1)
  np.testing.assert_allclose(runs["t1"]["cams"], cams, atol=2e-4)
  np.testing.assert_allclose(runs["t1"]["mask"], mask, atol=2e-4)
  # The key is the embedding of the original images.
  q, _ = np_head(variables, np.asarray(fmap_fn(images), np.float64))
  np.testing.assert_allclose(runs["t1"]["embedding"], q, atol=1e-5)


@pytest.mark.parametrize("official", [False, True])
def test_three_steps_match_numpy_reference(tiny, runs, official):
  net, variables, images, fmap_fn = tiny
  mask, cams = np_contracam(fmap_fn, variables, images, 3, official=official)
  out = runs["t3_official" if official else "t3"]
  np.testing.assert_allclose(out["cams"], cams, atol=5e-4)
  np.testing.assert_allclose(out["mask"], mask, atol=5e-4)


def test_t1_is_the_first_step_and_union_never_shrinks(runs):
  t1, t3 = runs["t1"], runs["t3"]
  np.testing.assert_allclose(t3["cams"][0], t1["cams"][0], atol=1e-4)  # two compilations: rounding
  np.testing.assert_allclose(t1["mask"], t1["cams"][0], atol=1e-7)
  np.testing.assert_allclose(t3["mask"], t3["cams"].max(axis=0), atol=1e-7)
  assert np.all(t3["mask"] >= t1["mask"] - 1e-4)
  # Later steps find new regions: the union grows somewhere.
  assert t3["mask"].sum() > t1["mask"].sum() + 1.0


def test_official_and_default_agree_at_t0_and_differ_later(runs):
  default, official = runs["t3"], runs["t3_official"]
  np.testing.assert_allclose(official["cams"][0], default["cams"][0], atol=1e-4)
  assert np.abs(official["cams"][1] - default["cams"][1]).max() > 1e-2
  # Scores themselves differ already at t=0 (by the batch-sum and the exp(0) terms).
  assert np.abs(official["scores"][0] - default["scores"][0]).min() > 1e-3


def test_signed_weights_without_clamp_match_numpy(tiny):
  net, variables, images, fmap_fn = tiny
  out = cc.contracam(net, variables, images, cc.CamSettings(clamp_weights=False))
  mask, _ = np_contracam(fmap_fn, variables, images, 1, clamp=False)
  np.testing.assert_allclose(np.asarray(out["mask"]), mask, atol=2e-4)
  clamped, _ = np_contracam(fmap_fn, variables, images, 1, clamp=True)
  assert np.abs(mask - clamped).max() > 1e-2  # the clamp matters for this network


def test_expand_res_2_doubles_the_map_with_the_same_parameters(tiny):
  net, variables, images, fmap_fn = tiny
  settings = cc.CamSettings(expand_res=2)
  net2 = cc.cam_network(SPEC, settings)
  fmap2_fn = jax.jit(lambda x: net2.apply(variables, x, False, method="feature_map"))
  assert fmap_fn(images).shape == (BATCH, SIZE // 8, SIZE // 8, 8 * SPEC.width)
  assert fmap2_fn(images).shape == (BATCH, SIZE // 4, SIZE // 4, 8 * SPEC.width)
  # Same parameter tree: the stride change adds and removes nothing.
  shapes = jax.eval_shape(lambda: net2.init(jax.random.PRNGKey(0), images[:1], False))
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(variables)
  out = jax.tree_util.tree_map(np.asarray, cc.contracam(net2, variables, images, settings))
  assert out["mask"].shape == (BATCH, SIZE, SIZE)
  _check_range(out)
  mask, _ = np_contracam(fmap2_fn, variables, images, 1)
  np.testing.assert_allclose(out["mask"], mask, atol=2e-4)


def test_supervised_gradcam_uses_signed_class_weights(tiny):
  net, variables, images, fmap_fn = tiny
  rng = np.random.default_rng(4)
  c, classes = 8 * SPEC.width, 5
  classifier = {
      "kernel": jnp.asarray(rng.normal(size=(c, classes)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=classes), jnp.float32),
  }
  fmap = np.asarray(fmap_fn(images), np.float64)
  kernel = np.asarray(classifier["kernel"], np.float64)

  def reference(labels):
    # d logit_y / dA = W[:, y] / (h w) at every position: weights W[:, y] / (h w), not clamped.
    weights = kernel[:, labels].T / (fmap.shape[1] * fmap.shape[2])
    cam = np_bicubic(np.maximum(np.einsum("bhwc,bc->bhw", fmap, weights), 0), SIZE, SIZE)
    cam = cam - cam.min(axis=(1, 2), keepdims=True)
    return cam / (cam.max(axis=(1, 2), keepdims=True) + 1e-20)

  settings = cc.CamSettings(mode="supervised")
  predicted = np.argmax(fmap.mean(axis=(1, 2)) @ kernel + np.asarray(classifier["bias"]), axis=1)
  out = cc.contracam(net, variables, images, settings, classifier=classifier)
  np.testing.assert_array_equal(np.asarray(out["labels"]), predicted)
  np.testing.assert_allclose(np.asarray(out["mask"]), reference(predicted), atol=2e-4)
  labels = (predicted + 1) % classes
  out = cc.contracam(
      net, variables, images, settings, classifier=classifier, labels=jnp.asarray(labels)
  )
  np.testing.assert_allclose(np.asarray(out["mask"]), reference(labels), atol=2e-4)


def test_contracam_apply_runs_inside_a_caller_jit(tiny, runs):
  """The unjitted function composes with the caller's jit (e.g. a train step)."""
  net, variables, images, _ = tiny
  settings = cc.CamSettings(iterations=1)
  fn = jax.jit(lambda v, x: cc.contracam_apply(net, settings, v, x)["mask"].mean())
  np.testing.assert_allclose(float(fn(variables, images)), runs["t1"]["mask"].mean(), rtol=1e-5)


def test_score_across_devices_equals_the_score_of_the_concatenated_batch():
  """With axis_name every device's images are negatives: 4 devices x 3 = one batch of 12."""
  rng = np.random.default_rng(7)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q, k = unit(rng.normal(size=(2, 12, 5))).astype(np.float32)
  negs = unit(rng.normal(size=(2, 12, 5))).astype(np.float32)  # 2 sets, the second not yet valid
  want = cc.contrastive_score(jnp.asarray(q), jnp.asarray(k), jnp.asarray(negs), 1)
  split = lambda x, axis: np.stack(np.split(x, 4, axis=axis))
  got = jax.pmap(
      lambda a, b, n: cc.contrastive_score(a, b, n, 1, axis_name="d"),
      axis_name="d",
      devices=jax.local_devices()[:4],
  )(split(q, 0), split(k, 0), split(negs, 1))
  np.testing.assert_allclose(np.asarray(got).reshape(-1), want, rtol=1e-5)


def test_contracam_split_over_local_devices_equals_one_device(tiny, runs):
  """The 4 test devices each take a share of the batch; the maps are the whole batch's.
  A batch that does not split evenly, and the release's score, run on one device."""
  net, variables, images, _ = tiny
  images8 = jnp.concatenate(
      [images, jax.random.normal(jax.random.PRNGKey(3), (2,) + images.shape[1:])]
  )
  assert jax.local_device_count() == 4
  settings = cc.CamSettings(iterations=3)
  got = cc.contracam_on_local_devices(net, variables, images8, settings)
  want = cc.contracam(net, variables, images8, settings)
  for k in ("mask", "cams", "scores", "embedding"):
    assert got[k].shape == want[k].shape, k
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-4, atol=1e-5)
  odd = cc.contracam_on_local_devices(net, variables, images, settings)  # 6 images, 4 devices
  np.testing.assert_array_equal(np.asarray(odd["mask"]), runs["t3"]["mask"])
  official = cc.contracam_on_local_devices(
      net, variables, images8, cc.CamSettings(iterations=3, official_score=True)
  )
  np.testing.assert_array_equal(
      np.asarray(official["mask"]),
      np.asarray(
          cc.contracam(net, variables, images8, cc.CamSettings(iterations=3, official_score=True))[
              "mask"
          ]
      ),
  )
