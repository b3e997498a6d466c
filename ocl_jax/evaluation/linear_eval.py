"""Frozen-feature evaluation (docs/method.md#evaluation): L-BFGS linear probe and weighted kNN.

Both work on features already extracted (and gathered to the host) as NumPy
arrays, so they run under plain `jit` on one device.

Linear probe: for every L2 weight of `L2_VALUES` (45 log-spaced values
1e-6 ... 1e5) a multinomial logistic regression is fitted full-batch with
L-BFGS (`optax.lbfgs`, zoom line search), the weight with the best validation
accuracy is kept and that classifier is reported on the test set(s). The
weights are swept from large to small, each solve warm-started from the
previous solution, and one compiled solver serves all of them (l2 is a traced
argument).

kNN: the weighted kNN of InstDisc / DINO: cosine similarity, the k nearest
training examples vote with weight exp(sim / temperature).

Labels < 0 mark padding rows (gathered batches padded to a fixed size) and are
ignored everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

L2_VALUES = np.logspace(-6, 5, 45)

_STD_FLOOR = 1e-6
# Stop after this many L-BFGS iterations in a row without progress: float32
# precision can be reached before any gradient tolerance.
_STALL_PATIENCE = 5

FeaturesAndLabels = tuple[np.ndarray, np.ndarray]


# ---------------------------------------------------------------------------
# Argument checks.


def _check_features_labels(
    features, labels, num_classes: int, name: str, require_valid: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """(float32 (N, D) features, int32 (N,) labels), or a ValueError that names `name`."""
  features = np.asarray(features)
  labels = np.asarray(labels)
  if features.ndim != 2:
    raise ValueError(f"{name}: features must be (N, D), got shape {features.shape}")
  if labels.ndim != 1:
    raise ValueError(f"{name}: labels must be (N,), got shape {labels.shape}")
  if features.shape[0] != labels.shape[0]:
    raise ValueError(
        f"{name}: features has {features.shape[0]} rows but labels has " f"{labels.shape[0]}"
    )
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name}: labels must be integers, got dtype {labels.dtype}")
  if labels.size and labels.max() >= num_classes:
    raise ValueError(f"{name}: label {labels.max()} >= num_classes={num_classes}")
  if require_valid and not np.any(labels >= 0):
    raise ValueError(f"{name}: no valid example (every label is < 0, i.e. padding)")
  features = features.astype(np.float32, copy=False)
  if not np.all(np.isfinite(features)):
    raise ValueError(f"{name}: features contain NaN or inf")
  return features, labels.astype(np.int32, copy=False)


def _check_num_classes(num_classes: int) -> None:
  if int(num_classes) < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")


def _check_same_dim(dim: int, features: np.ndarray, name: str) -> None:
  if features.shape[1] != dim:
    raise ValueError(
        f"{name}: features have dimension {features.shape[1]}, the training " f"features {dim}"
    )


# ---------------------------------------------------------------------------
# Linear probe.


@flax.struct.dataclass
class LinearClassifier:
  """A linear classifier on standardised features: ((x - mean) / std) @ kernel + bias.

  kernel: (D, C), bias: (C,), mean / std: (D,), the training set's feature
  statistics; keeping them here applies the same transform to val/test.
  """

  kernel: jax.Array
  bias: jax.Array
  mean: jax.Array
  std: jax.Array

  def logits(self, features: np.ndarray) -> np.ndarray:
    """(N, C) logits of raw (unstandardised) features."""
    return np.asarray(_logits(self, jnp.asarray(features, jnp.float32)))

  def predict(self, features: np.ndarray) -> np.ndarray:
    """(N,) predicted classes; ties go to the lowest class index (argmax)."""
    return np.asarray(_predict(self, jnp.asarray(features, jnp.float32)))


@jax.jit
def _logits(classifier: LinearClassifier, features: jax.Array) -> jax.Array:
  x = (features - classifier.mean) / classifier.std
  return x @ classifier.kernel + classifier.bias


@jax.jit
def _predict(classifier: LinearClassifier, features: jax.Array) -> jax.Array:
  return jnp.argmax(_logits(classifier, features), axis=-1).astype(jnp.int32)


@jax.jit
def _standardize(features: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Standardised features (padding rows zeroed, so they are inert), mean, std."""
  m = mask[:, None]
  n = jnp.maximum(jnp.sum(mask), 1.0)
  mean = jnp.sum(features * m, axis=0) / n
  var = jnp.sum(jnp.square((features - mean) * m), axis=0) / n
  std = jnp.maximum(jnp.sqrt(var), _STD_FLOOR)
  return (features - mean) / std * m, mean, std


def _max_abs(tree) -> jax.Array:
  return jnp.max(jnp.stack([jnp.max(jnp.abs(leaf)) for leaf in jax.tree.leaves(tree)]))


@jax.jit
def _lbfgs_solve(
    x: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    l2: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    max_iters: jax.Array,
    tol: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Minimises the probe objective from (kernel, bias): (kernel, bias, iterations).

  Every argument is traced, so one compilation per data shape serves all l2,
  max_iters and tol values. Stops at max_iters, when max |gradient| <= tol, or
  after _STALL_PATIENCE iterations in a row that set neither a new lowest
  objective nor a new lowest max |gradient|. The objective alone is a poor
  progress signal: in float32 it stops resolving decreases (~1e-7 relative)
  while the gradient, and the weights, still improve by orders of magnitude.
  """
  n_valid = jnp.maximum(jnp.sum(mask), 1.0)
  labels = jnp.maximum(labels, 0)  # padding rows carry mask 0

  def objective(params):
    w, b = params
    ce = optax.softmax_cross_entropy_with_integer_labels(x @ w + b, labels)
    return jnp.sum(ce * mask) / n_valid + 0.5 * l2 * jnp.sum(jnp.square(w))

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def body(carry):
    params, state, stalls, best_value, best_grad = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=objective)
    params = optax.apply_updates(params, updates)
    # The line search leaves the value and gradient at the new params in `state`.
    new_value = optax.tree.get(state, "value")
    new_grad = _max_abs(optax.tree.get(state, "grad"))
    progress = (new_value < best_value) | (new_grad < best_grad)
    return (
        params,
        state,
        jnp.where(progress, 0, stalls + 1),
        jnp.minimum(new_value, best_value),
        jnp.minimum(new_grad, best_grad),
    )

  def cond(carry):
    _, state, stalls, _, _ = carry
    count = optax.tree.get(state, "count")
    grad_max = _max_abs(optax.tree.get(state, "grad"))
    keep_going = (count < max_iters) & (grad_max > tol) & (stalls < _STALL_PATIENCE)
    return (count == 0) | keep_going  # the state holds no gradient before the first step

  params = (kernel, bias)
  inf = jnp.float32(jnp.inf)
  init = (params, opt.init(params), jnp.zeros((), jnp.int32), inf, inf)
  params, state, _, _, _ = jax.lax.while_loop(cond, body, init)
  return params[0], params[1], optax.tree.get(state, "count")


def warm_start(
    init: LinearClassifier, mean: jax.Array, std: jax.Array, dim: int, num_classes: int
) -> tuple[jax.Array, jax.Array]:
  """`init`'s (kernel, bias) re-expressed for the standardisation (mean, std): same logits."""
  if init.kernel.shape != (dim, num_classes):
    raise ValueError(
        f"init: kernel has shape {init.kernel.shape}, expected " f"{(dim, num_classes)}"
    )
  raw_kernel = init.kernel / init.std[:, None]  # acts on raw features
  raw_bias = init.bias - (init.mean / init.std) @ init.kernel
  return raw_kernel * std[:, None], raw_bias + mean @ raw_kernel


@dataclasses.dataclass(frozen=True)
class _ProbeData:
  """Training data standardised once (on device) and shared by every solve."""

  x: jax.Array
  labels: jax.Array
  mask: jax.Array
  mean: jax.Array
  std: jax.Array
  num_classes: int


def _prepare(features: np.ndarray, labels: np.ndarray, num_classes: int) -> _ProbeData:
  mask = jnp.asarray(labels >= 0, jnp.float32)
  x, mean, std = _standardize(jnp.asarray(features), mask)
  return _ProbeData(x, jnp.asarray(labels), mask, mean, std, int(num_classes))


def _fit(
    data: _ProbeData, l2: float, max_iters: int, tol: float, init: LinearClassifier | None
) -> tuple[LinearClassifier, int]:
  dim = data.x.shape[1]
  if init is None:
    kernel = jnp.zeros((dim, data.num_classes), jnp.float32)
    bias = jnp.zeros((data.num_classes,), jnp.float32)
  else:
    kernel, bias = warm_start(init, data.mean, data.std, dim, data.num_classes)
  kernel, bias, iters = _lbfgs_solve(
      data.x,
      data.labels,
      data.mask,
      jnp.float32(l2),
      kernel.astype(jnp.float32),
      bias.astype(jnp.float32),
      jnp.int32(max_iters),
      jnp.float32(tol),
  )
  return LinearClassifier(kernel, bias, data.mean, data.std), int(iters)


def _check_solver_args(l2_values, max_iters: int, tol: float) -> None:
  l2_values = np.asarray(l2_values, np.float64)
  if l2_values.ndim != 1 or l2_values.size == 0:
    raise ValueError(f"l2 values must be a non-empty 1-D sequence, got {l2_values!r}")
  if not np.all(np.isfinite(l2_values) & (l2_values >= 0)):
    raise ValueError(f"l2 values must be finite and >= 0, got {l2_values!r}")
  if int(max_iters) < 1:
    raise ValueError(f"max_iters must be >= 1, got {max_iters}")
  if not tol >= 0:
    raise ValueError(f"tol must be >= 0, got {tol}")


def fit_logistic_regression(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    l2: float,
    max_iters: int = 1000,
    tol: float = 1e-6,
    init: LinearClassifier | None = None,
) -> LinearClassifier:
  """L2-regularised multinomial logistic regression, fitted full-batch with L-BFGS.

  Features are standardised with the mean/std of the valid training rows
  (std floored at 1e-6); with z the standardised features the objective is

      mean_{i: labels_i >= 0} CE(softmax(z_i @ W + b), labels_i) + 0.5 * l2 * ||W||_F^2

  (bias not regularised; rows with labels < 0 are padding and ignored). L-BFGS
  stops after `max_iters` iterations, when max |gradient| <= `tol`, or when
  neither the objective nor the gradient improves any more (float32
  precision; tol=0 iterates to that point). `init` warm-starts from
  another classifier (its logits are kept exactly, whatever its standardisation).
  """
  _check_num_classes(num_classes)
  _check_solver_args([l2], max_iters, tol)
  features, labels = _check_features_labels(features, labels, num_classes, "features/labels")
  classifier, _ = _fit(_prepare(features, labels, num_classes), l2, max_iters, tol, init)
  return classifier


def accuracy(classifier: LinearClassifier, features: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy over the rows with labels >= 0."""
  num_classes = classifier.kernel.shape[1]
  features, labels = _check_features_labels(features, labels, num_classes, "features/labels")
  _check_same_dim(classifier.kernel.shape[0], features, "features/labels")
  valid = labels >= 0
  return float(np.mean(classifier.predict(features)[valid] == labels[valid]))


@dataclasses.dataclass(frozen=True)
class ProbeResult:
  """Outcome of the l2 sweep; the per-l2 lists follow the order of `l2_values`."""

  best_l2: float
  val_accuracy: float
  test_accuracy: dict[str, float]
  l2_values: list[float]
  val_accuracy_per_l2: list[float]
  iterations_per_l2: list[int]
  classifier: LinearClassifier


def linear_probe(
    train: FeaturesAndLabels,
    val: FeaturesAndLabels,
    tests: Mapping[str, FeaturesAndLabels],
    num_classes: int,
    l2_values=L2_VALUES,
    max_iters: int = 1000,
    tol: float = 1e-6,
) -> ProbeResult:
  """Fits one probe per l2 on `train`, keeps the best on `val`, reports it on each of `tests`.

  The sweep runs from the largest l2 to the smallest, each fit warm-started
  from the previous one (the solutions move smoothly with l2, so later fits
  take few iterations). Ties in validation accuracy go to the larger l2, the
  simpler model.
  """
  _check_num_classes(num_classes)
  _check_solver_args(l2_values, max_iters, tol)
  train_x, train_y = _check_features_labels(*train, num_classes, "train")
  val_x, val_y = _check_features_labels(*val, num_classes, "val")
  _check_same_dim(train_x.shape[1], val_x, "val")
  checked_tests = {}
  for name, pair in tests.items():
    checked_tests[name] = _check_features_labels(*pair, num_classes, f"tests[{name!r}]")
    _check_same_dim(train_x.shape[1], checked_tests[name][0], f"tests[{name!r}]")

  data = _prepare(train_x, train_y, num_classes)
  val_valid = val_y >= 0
  l2_list = [float(v) for v in np.asarray(l2_values, np.float64)]
  val_acc = [0.0] * len(l2_list)
  iters = [0] * len(l2_list)
  best, best_index, classifier = None, -1, None
  for i in sorted(range(len(l2_list)), key=lambda j: -l2_list[j]):
    classifier, iters[i] = _fit(data, l2_list[i], max_iters, tol, classifier)
    val_acc[i] = float(np.mean(classifier.predict(val_x)[val_valid] == val_y[val_valid]))
    if best is None or val_acc[i] > val_acc[best_index]:  # strict: ties keep the larger l2
      best, best_index = classifier, i
  test_acc = {name: accuracy(best, x, y) for name, (x, y) in checked_tests.items()}
  return ProbeResult(
      best_l2=l2_list[best_index],
      val_accuracy=val_acc[best_index],
      test_accuracy=test_acc,
      l2_values=l2_list,
      val_accuracy_per_l2=val_acc,
      iterations_per_l2=iters,
      classifier=best,
  )


# ---------------------------------------------------------------------------
# Weighted kNN.


def _l2_normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


_normalize_rows = jax.jit(_l2_normalize)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _knn_batch(
    train_n: jax.Array,
    train_labels: jax.Array,
    queries: jax.Array,
    temperature: jax.Array,
    k: int,
    num_classes: int,
) -> jax.Array:
  """Predictions for one batch of queries; train_n is already L2-normalised."""
  sims = _l2_normalize(queries) @ train_n.T  # (B, N)
  sims = jnp.where(train_labels[None, :] >= 0, sims, -jnp.inf)
  top_sims, top_idx = jax.lax.top_k(sims, k)
  # exp(sim / T) up to the common factor exp(-max sim / T): same votes, no overflow.
  # (A max, not top_sims[:, :1]: XLA CPU turns that slice of top_k into a full sort.)
  weights = jnp.exp((top_sims - jnp.max(top_sims, axis=1, keepdims=True)) / temperature)
  votes = jnp.einsum("bk,bkc->bc", weights, jax.nn.one_hot(train_labels[top_idx], num_classes))
  return jnp.argmax(votes, axis=-1).astype(jnp.int32)  # ties: lowest class index


def knn_predict(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    query_features: np.ndarray,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 256,
) -> np.ndarray:
  """Weighted kNN (InstDisc / DINO) class predictions for each query row.

  Cosine similarity; each of the k most similar training rows votes for its
  class with weight exp(sim / temperature); the class with the largest total
  wins, ties going to the lowest class index. Training rows with labels < 0
  are ignored, and k is clamped to the number of valid training rows. Queries
  are processed `batch_size` at a time (the last batch padded), so memory
  stays at batch_size x N similarities and there is one compilation.
  """
  _check_num_classes(num_classes)
  if int(k) < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if int(batch_size) < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  train_x, train_y = _check_features_labels(
      train_features, train_labels, num_classes, "train_features/train_labels"
  )
  query_x = np.asarray(query_features)
  if query_x.ndim != 2:
    raise ValueError(f"query_features must be (Q, D), got shape {query_x.shape}")
  _check_same_dim(train_x.shape[1], query_x, "query_features")
  query_x = query_x.astype(np.float32, copy=False)
  if not np.all(np.isfinite(query_x)):
    raise ValueError("query_features contain NaN or inf")

  k = min(int(k), int(np.sum(train_y >= 0)))
  num_queries = query_x.shape[0]
  batch = min(int(batch_size), max(num_queries, 1))
  train_n = _normalize_rows(jnp.asarray(train_x))
  labels = jnp.asarray(train_y)
  temp = jnp.float32(temperature)
  out = []
  for start in range(0, num_queries, batch):
    chunk = query_x[start : start + batch]
    padded = np.zeros((batch, chunk.shape[1]), np.float32)
    padded[: len(chunk)] = chunk
    out.append(
        np.asarray(
            _knn_batch(
                train_n, labels, jnp.asarray(padded), temp, k=k, num_classes=int(num_classes)
            )
        )[: len(chunk)]
    )
  return np.concatenate(out) if out else np.zeros((0,), np.int32)


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    query_features: np.ndarray,
    query_labels: np.ndarray,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 256,
) -> float:
  """Top-1 accuracy of `knn_predict` over the queries with labels >= 0."""
  query_x, query_y = _check_features_labels(
      query_features, query_labels, num_classes, "query_features/query_labels"
  )
  valid = query_y >= 0
  pred = knn_predict(
      train_features,
      train_labels,
      query_x[valid],
      num_classes,
      k=k,
      temperature=temperature,
      batch_size=batch_size,
  )
  return float(np.mean(pred == query_y[valid]))
