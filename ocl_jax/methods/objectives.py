"""Contrastive objectives of docs/method.md#pretraining, as per-example losses.

Every objective returns one loss per positive pair (per image of the local
batch), so the caller can average it plainly or with saliency pair weights
(docs/method.md#sgcl) without the objective knowing about weighting.
Embeddings passed in are already L2-normalised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

OBJECTIVES = ("moco", "byol", "simclr")


def moco_per_example(q: jax.Array, k: jax.Array, queue: jax.Array, temperature: float) -> jax.Array:
  """MoCo v2 InfoNCE: query vs its key (positive) and the queue (negatives).

  q, k: (B, D); queue: (K, D). Keys are treated as constants.
  """
  k = jax.lax.stop_gradient(k)
  queue = jax.lax.stop_gradient(queue)
  l_pos = jnp.sum(q * k, axis=-1, keepdims=True)
  l_neg = q @ queue.T
  logits = jnp.concatenate([l_pos, l_neg], axis=1) / temperature
  return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros(q.shape[0], jnp.int32))


def moco_accuracy(q: jax.Array, k: jax.Array, queue: jax.Array) -> jax.Array:
  """Fraction of queries whose positive key beats every queue entry."""
  l_pos = jnp.sum(q * k, axis=-1)
  return jnp.mean(l_pos > jnp.max(q @ queue.T, axis=1))


def enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Write `keys` (the global batch's keys) at `ptr`, FIFO; len(queue) % len(keys) == 0."""
  queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (ptr, 0))
  return queue, (ptr + keys.shape[0]) % queue.shape[0]


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
  b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-8)
  return jnp.sum(a * b, axis=-1)


def byol_per_example(p1: jax.Array, p2: jax.Array, y1: jax.Array, y2: jax.Array) -> jax.Array:
  """The release's symmetric BYOL loss, -2 (cos(p1, y2) + cos(p2, y1)), targets stop-gradient.

  It differs from the BYOL paper's sum of 2 - 2cos terms by the constant 4 only.
  """
  y1, y2 = jax.lax.stop_gradient(y1), jax.lax.stop_gradient(y2)
  return -2.0 * (_cosine(p1, y2) + _cosine(p2, y1))


def byol_one_way_per_example(p: jax.Array, y: jax.Array) -> jax.Array:
  """-2 cos(p, y), target stop-gradient: one direction of the BYOL loss (multi-crop pairs)."""
  return -2.0 * _cosine(p, jax.lax.stop_gradient(y))


def nt_xent_per_example(
    z1: jax.Array, z2: jax.Array, temperature: float, axis_name: str | None = None
) -> jax.Array:
  """SimCLR NT-Xent over the GLOBAL batch: every other view on every device is a negative.

  Returns, per local image, the mean of the losses of its two anchors; the
  mean over the global batch equals the usual mean over all 2N anchors.
  Gradients flow through the all-gather (its transpose sums them back), so a
  pmean of parameter gradients equals the single-device gradient.
  """
  b = z1.shape[0]
  if axis_name is None:
    g1, g2, offset = z1, z2, 0
  else:
    g1 = jax.lax.all_gather(z1, axis_name, tiled=True)
    g2 = jax.lax.all_gather(z2, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * b
  n = g1.shape[0]
  everything = jnp.concatenate([g1, g2], axis=0)  # (2N, D)
  idx = offset + jnp.arange(b)

  def anchor_loss(anchors, self_idx, pos_idx):
    logits = anchors @ everything.T / temperature
    logits = jnp.where(jax.nn.one_hot(self_idx, 2 * n, dtype=bool), -jnp.inf, logits)
    return optax.softmax_cross_entropy_with_integer_labels(logits, pos_idx)

  return 0.5 * (anchor_loss(z1, idx, idx + n) + anchor_loss(z2, idx + n, idx))


def weighted_mean(
    per_example: jax.Array, weights: jax.Array | None = None, axis_name: str | None = None
) -> jax.Array:
  """Mean over the GLOBAL batch of (optionally weighted) per-example losses.

  Returned per device so that pmean(grad) is the gradient of the global
  objective: sum_local(w*l) / sum_global(w) * num_devices.
  """
  if weights is None:
    weights = jnp.ones_like(per_example)
  num = jnp.sum(weights * per_example)
  den = jnp.sum(weights)
  if axis_name is not None:
    den = jax.lax.psum(jax.lax.stop_gradient(den), axis_name)
    num = num * jax.lax.psum(1, axis_name)
  return num / den


def moco_mix_per_example(
    q: jax.Array,
    batch_keys: jax.Array,
    queue: jax.Array,
    own: jax.Array,
    donor: jax.Array,
    lam: jax.Array,
    temperature: float,
) -> jax.Array:
  """The Mixup / CutMix MoCo loss (docs/method.md#mixup-cutmix) of mixed queries.

  logits = [q . keys of the batch ; q . queue] / temperature, and
  loss_i = lam_i CE(logits_i, own_i) + (1 - lam_i) CE(logits_i, donor_i), where
  own_i / donor_i index `batch_keys` (the global batch's keys on every device).
  """
  batch_keys = jax.lax.stop_gradient(batch_keys)
  queue = jax.lax.stop_gradient(queue)
  logits = jnp.concatenate([q @ batch_keys.T, q @ queue.T], axis=1) / temperature
  ce = optax.softmax_cross_entropy_with_integer_labels
  return lam * ce(logits, own) + (1.0 - lam) * ce(logits, donor)
