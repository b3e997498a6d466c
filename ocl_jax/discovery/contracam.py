"""ContraCAM (docs/method.md#contracam): Grad-CAM with a contrastive score, on device.

The whole T-step refinement is one pure function of arrays (`contracam_apply`),
so it can run inside another jitted function (e.g. a train step that needs
online saliency, docs/method.md#sgcl) or through the cached jitted wrapper `contracam`.
Shapes are static: the growing negative set is a fixed (T, B, D) buffer with
a count of valid entries, and the T steps are a `lax.scan`.

Only the head (GAP -> projector -> L2 normalisation, or a linear classifier)
is differentiated: the gradient is taken with respect to the layer4 map A, so
the encoder runs forward only, once per step, with BatchNorm in inference
mode.

Conventions: images normalised NHWC float32 (as `augment.normalize` gives);
maps and masks (B, H, W) in [0, 1].
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ocl_jax import models

MODES = ("contrastive", "supervised")
# PyTorch's bicubic kernel parameter (Keys' a); jax.image.resize uses -0.5.
BICUBIC_A = -0.75


@dataclasses.dataclass(frozen=True)
class CamSettings:
  """Static ContraCAM options; frozen and hashable so jit can key on it.

  iterations: T refinement steps (T=10 for boxes, T=1 for background masks).
  expand_res: 1, 2 or 4; must match the network's `expand_res`.
  official_score: reproduce the release's score (batch-summed positive,
    self-pairs kept as exp(0)) instead of the per-image formula of
    docs/method.md#contracam (see docs/method.md#release-quirks).
  mode: 'contrastive' (ContraCAM) or 'supervised' (Grad-CAM of a class logit).
  clamp_weights: keep only positive channel weights; None picks the method
    default (True for contrastive, False = signed weights for supervised).
  temperature: tau of the contrastive score (docs/method.md#contracam and the
    release: 1).
  eps: added to the per-image maximum in the min-max normalisation.
  """

  iterations: int = 1
  expand_res: int = 1
  official_score: bool = False
  mode: str = "contrastive"
  clamp_weights: bool | None = None
  temperature: float = 1.0
  eps: float = 1e-20

  def __post_init__(self):
    if (
        isinstance(self.iterations, bool)
        or int(self.iterations) != self.iterations
        or self.iterations < 1
    ):
      raise ValueError(f"CamSettings.iterations must be an integer >= 1, got {self.iterations!r}")
    object.__setattr__(self, "iterations", int(self.iterations))
    models.check_expand_res(self.expand_res, "CamSettings.expand_res")
    object.__setattr__(self, "expand_res", int(self.expand_res))
    if self.mode not in MODES:
      raise ValueError(f"CamSettings.mode must be one of {MODES}, got {self.mode!r}")
    if self.clamp_weights is not None and not isinstance(self.clamp_weights, bool):
      raise ValueError(
          f"CamSettings.clamp_weights must be True, False or None, got {self.clamp_weights!r}"
      )
    if not isinstance(self.official_score, bool):
      raise ValueError(f"CamSettings.official_score must be a bool, got {self.official_score!r}")
    if not (self.temperature > 0 and math.isfinite(self.temperature)):
      raise ValueError(
          f"CamSettings.temperature must be a finite number > 0, got {self.temperature!r}"
      )
    if not (self.eps >= 0 and math.isfinite(self.eps)):
      raise ValueError(f"CamSettings.eps must be a finite number >= 0, got {self.eps!r}")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, **overrides: Any) -> "CamSettings":
    """config.contracam's settings, `overrides` replacing fields; ValueError naming every bad
    field of the section, one a line, with the box / mask options the modes read beside it."""
    c = config.contracam
    errors = []
    checks = [
        (c.mask_iterations >= 1, "mask_iterations", f"T must be >= 1, got {c.mask_iterations}"),
        (c.batch_size >= 2, "batch_size", "the contrastive score needs >= 2 images"),
        (c.box_margin >= 0, "box_margin", f"must be >= 0, got {c.box_margin}"),
    ]
    for f in (
        "clean_threshold",
        "box_min_obj_scale",
        "eval_min_obj_scale",
        "box_threshold",
        "box_min_area",
    ):
      checks.append((0.0 <= c[f] <= 1.0, f, f"must be in [0, 1], got {c[f]}"))
    for ok, field, message in checks:
      if not ok:
        errors.append(f"config.contracam.{field}: {message}")
    fields = dict(iterations=c.iterations, expand_res=c.expand_res, official_score=c.official_score)
    fields.update(overrides)
    try:
      settings = cls(**fields)
    except ValueError as err:
      errors.insert(0, f"config.contracam: {err}")
    if errors:
      raise ValueError("\n".join(errors))
    return settings

  @property
  def clamp(self) -> bool:
    """The effective positive-weight clamp."""
    return self.mode == "contrastive" if self.clamp_weights is None else self.clamp_weights


def cam_network(spec: models.ModelSpec, settings: CamSettings) -> models.ContrastiveNet:
  """The network ContraCAM runs: same parameters, settings.expand_res, no BN axis."""
  return spec.build(expand_res=settings.expand_res, axis_name=None)


# ----------------------------------------------------------------------------
# Building blocks (pure, batched).


def _cubic_weights(t: np.ndarray, a: float) -> tuple[np.ndarray, ...]:
  """Keys' cubic convolution weights for taps at offsets -1, 0, 1, 2 from floor."""

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return far(t + 1), near(t), near(1 - t), far(2 - t)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, a: float = BICUBIC_A) -> np.ndarray:
  """(out, in) matrix of PyTorch's bicubic resize, align_corners=False.

  Source coordinate (dst + 0.5) * in/out - 0.5 without clamping (PyTorch's
  cubic path), floor index capped at in-1, fraction clipped to [0, 1], taps
  outside the input replicate the border. Read-only, cached per size.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be >= 1, got in={in_size}, out={out_size}")
  scale = in_size / out_size
  real = scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5
  idx = np.minimum(np.floor(real), in_size - 1).astype(np.int64)
  t = np.clip(real - idx, 0.0, 1.0)
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  for k, w in enumerate(_cubic_weights(t, a)):
    np.add.at(m, (rows, np.clip(idx - 1 + k, 0, in_size - 1)), w)
  m = m.astype(np.float32)
  m.flags.writeable = False
  return m


def upsample_bicubic(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(B, h, w) -> (B, H, W) as torch `interpolate(mode='bicubic', align_corners=False)`."""
  rows = jnp.asarray(bicubic_matrix(maps.shape[-2], size[0]))
  cols = jnp.asarray(bicubic_matrix(maps.shape[-1], size[1]))
  return jnp.einsum("Hh,bhw,Ww->bHW", rows, maps, cols, precision=jax.lax.Precision.HIGHEST)


def normalize_per_image(maps: jax.Array, eps: float = 1e-20) -> jax.Array:
  """Per image: subtract the minimum, then divide by (maximum + eps)."""
  maps = maps - maps.min(axis=(-2, -1), keepdims=True)
  return maps / (maps.max(axis=(-2, -1), keepdims=True) + eps)


def contrastive_score(
    query: jax.Array,
    key: jax.Array,
    negatives: jax.Array,
    num_valid: Any,
    official: bool = False,
    temperature: float = 1.0,
    axis_name: str | None = None,
) -> jax.Array:
  """Per-image contrastive score (B,) of docs/method.md#contracam.

  query, key: (B, D) unit vectors; negatives: (S, B, D) buffer of which the
  first `num_valid` sets count. Default:
    score_i = q_i.k_i/tau - log sum_{s<num_valid, j!=i} exp(q_i.n_sj/tau).
  official=True is the release's `_contrastive_score`:
    score_i = log sum_j exp(q_j.k_j) - log sum_{s<num_valid, j} exp(l_isj),
    l_isj = q_i.n_sj/tau for j != i and 0 for j == i (masked, then exp'd).
  With `axis_name` (inside pmap) the negatives are every device's images, so
  the score is that of the global batch (default score only).
  """
  b = query.shape[0]
  pos = jnp.sum(query * key, axis=-1) / temperature
  offset = 0
  if axis_name is not None:
    if official:
      raise ValueError("the official score sums over its batch; it has no cross-device form here")
    negatives = jax.lax.all_gather(negatives, axis_name, axis=1, tiled=True)
    offset = jax.lax.axis_index(axis_name) * b
  logits = jnp.einsum("id,sjd->isj", query, negatives) / temperature
  set_valid = (jnp.arange(negatives.shape[0]) < num_valid)[None, :, None]
  self_pair = (offset + jnp.arange(b)[:, None] == jnp.arange(negatives.shape[1])[None, :])[
      :, None, :
  ]
  if official:
    logits = jnp.where(self_pair, 0.0, logits)
    neg = jax.nn.logsumexp(jnp.where(set_valid, logits, -jnp.inf), axis=(1, 2))
    return jax.nn.logsumexp(pos) - neg
  neg = jax.nn.logsumexp(jnp.where(set_valid & ~self_pair, logits, -jnp.inf), axis=(1, 2))
  return pos - neg


def channel_weights(grad: jax.Array, clamp: bool) -> jax.Array:
  """Grad-CAM weights (B, C): spatial mean of dscore/dA, optionally max(0, .)."""
  w = grad.mean(axis=(1, 2))
  return jnp.maximum(w, 0.0) if clamp else w


def weighted_map(fmap: jax.Array, weights: jax.Array) -> jax.Array:
  """ReLU(sum_c w_c A_c): (B, h, w, C), (B, C) -> (B, h, w)."""
  return jax.nn.relu(jnp.einsum("bhwc,bc->bhw", fmap, weights, precision=jax.lax.Precision.HIGHEST))


def mask_images(images: jax.Array, mask: jax.Array, colour: jax.Array) -> jax.Array:
  """x (1 - M) + mu M, with M (B, H, W) broadcast over channels."""
  m = mask[..., None]
  return images * (1.0 - m) + colour * m


def classifier_logits(features: jax.Array, classifier: Mapping[str, jax.Array]) -> jax.Array:
  """Linear classifier on pooled features; flax Dense layout {'kernel': (C, K), 'bias': (K,)}."""
  logits = features @ classifier["kernel"]
  return logits + classifier["bias"] if "bias" in classifier else logits


# ----------------------------------------------------------------------------
# The T-step refinement.


def contracam_apply(
    net: models.ContrastiveNet,
    settings: CamSettings,
    variables: Mapping[str, Any],
    images: jax.Array,
    classifier: Mapping[str, jax.Array] | None = None,
    labels: jax.Array | None = None,
    axis_name: str | None = None,
) -> dict[str, jax.Array]:
  """ContraCAM of a batch, unjitted (call inside jit, or use `contracam`).

  Inside pmap, `axis_name` makes every device's images negatives of the
  contrastive score (as one batch), so maps do not depend on the device count.

  Returns mask (B, H, W): the union after T steps; cams (T, B, H, W): each
  step's normalised map; scores (T, B): each step's score; and for the
  contrastive mode `embedding` (B, D), the key z of the original images, or
  for the supervised mode `labels` (B,), the classes explained.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
  if net.expand_res != settings.expand_res:
    raise ValueError(
        f"the network has expand_res={net.expand_res} but CamSettings.expand_res="
        f"{settings.expand_res}; build it with cam_network(spec, settings)"
    )
  b, h, w, _ = images.shape
  t_steps = settings.iterations
  supervised = settings.mode == "supervised"
  if supervised and classifier is None:
    raise ValueError("CamSettings.mode='supervised' needs classifier parameters")
  if not supervised and b < 2:
    raise ValueError(f"the contrastive score needs a batch of at least 2 images, got {b}")
  variables = {k: variables[k] for k in ("params", "batch_stats") if k in variables}

  images = images.astype(jnp.float32)
  colour = images.mean(axis=(0, 1, 2))  # per-channel batch mean (normalised space, as the release)
  if axis_name is not None:
    colour = jax.lax.pmean(colour, axis_name)

  def fmap_of(x):
    return net.apply(variables, x, False, method="feature_map")

  def embed(a):
    return net.apply(variables, a, False, method="embed_from_map")

  if supervised:
    infer_labels = labels is None  # then explain each original image's predicted class
    labels = (
        jnp.zeros((b,), jnp.int32) if infer_labels else jnp.asarray(labels, jnp.int32).reshape(b)
    )

    def score_fn(a, t, labels, negatives):
      logits = classifier_logits(a.mean(axis=(1, 2)), classifier)
      if infer_labels:
        labels = jnp.where(
            t == 0, jnp.argmax(jax.lax.stop_gradient(logits), axis=-1).astype(jnp.int32), labels
        )
      s = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
      return s.sum(), (s, labels, negatives)

    key, negatives = labels, jnp.zeros((1,), jnp.float32)
  else:

    def score_fn(a, t, key, negatives):
      q = embed(a)
      q_sg = jax.lax.stop_gradient(q)
      key = jnp.where(t == 0, q_sg, key)  # step 0 runs on the originals: q_0 is the key
      negatives = jax.lax.dynamic_update_index_in_dim(negatives, q_sg, t, axis=0)
      s = contrastive_score(
          q, key, negatives, t + 1, settings.official_score, settings.temperature, axis_name
      )
      return s.sum(), (s, key, negatives)

    dim = int(jax.eval_shape(embed, jax.eval_shape(fmap_of, images)).shape[-1])
    key, negatives = jnp.zeros((b, dim), jnp.float32), jnp.zeros((t_steps, b, dim), jnp.float32)

  def step(carry, t):  # key: the key embeddings, or the class labels (supervised)
    x, union, key, negatives = carry
    a = fmap_of(x)
    grad, (s, key, negatives) = jax.grad(score_fn, has_aux=True)(a, t, key, negatives)
    cam = weighted_map(a, channel_weights(grad, settings.clamp))
    cam = normalize_per_image(upsample_bicubic(cam, (h, w)), settings.eps)
    union = jnp.maximum(union, cam)
    x = mask_images(images, union, colour)
    return (x, union, key, negatives), (cam, s)

  carry = (images, jnp.zeros((b, h, w), jnp.float32), key, negatives)
  (_, union, key, _), (cams, scores) = jax.lax.scan(step, carry, jnp.arange(t_steps))
  out = {"mask": union, "cams": cams, "scores": scores}
  out["labels" if supervised else "embedding"] = key
  return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _contracam_jit(net, settings, variables, images, classifier, labels):
  return contracam_apply(net, settings, variables, images, classifier, labels)


def contracam(
    net: models.ContrastiveNet,
    variables: Mapping[str, Any],
    images: jax.Array,
    settings: CamSettings = CamSettings(),
    classifier: Mapping[str, jax.Array] | None = None,
    labels: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """Jitted `contracam_apply`: one compilation per (net, settings, shapes)."""
  return _contracam_jit(net, settings, variables, images, classifier, labels)


@functools.lru_cache(maxsize=16)
def _contracam_pmap(net: models.ContrastiveNet, settings: CamSettings, num_devices: int):
  axis = "contracam_images"
  return jax.pmap(
      lambda v, x: contracam_apply(net, settings, v, x, axis_name=axis),
      axis_name=axis,
      in_axes=(None, 0),
      devices=jax.local_devices()[:num_devices],
  )


def contracam_on_local_devices(
    net: models.ContrastiveNet,
    variables: Mapping[str, Any],
    images: jax.Array,
    settings: CamSettings = CamSettings(),
) -> dict[str, jax.Array]:
  """`contracam` split over this process's devices: the same maps, each device a share.

  Every device's images are negatives of every other's (global-batch score), so
  the maps are those of the whole batch on one device, up to rounding. A batch
  that does not split into shares of >= 2 images, the release's score (which
  has no cross-device form) and the supervised mode run on one device.
  """
  n, b = jax.local_device_count(), images.shape[0]
  if n == 1 or b % n or b // n < 2 or settings.official_score or settings.mode == "supervised":
    return contracam(net, variables, images, settings)
  out = _contracam_pmap(net, settings, n)(variables, images.reshape((n, b // n) + images.shape[1:]))
  merged = {}
  for k, v in out.items():  # (devices, [T,] b/n, ...) -> ([T,] b, ...)
    if k in ("cams", "scores"):
      v = jnp.moveaxis(v, 0, 1)
      merged[k] = v.reshape((v.shape[0], b) + v.shape[3:])
    else:
      merged[k] = v.reshape((b,) + v.shape[2:])
  return merged
