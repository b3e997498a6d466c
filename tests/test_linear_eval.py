"""Linear probe and weighted kNN (docs/method.md#evaluation) against references and hand cases.

Most probe tests share the (200, 5) x 3-class training shape so the L-BFGS
solver compiles once for the file.
"""

import numpy as np
import pytest
from scipy import optimize

from ocl_jax.evaluation import linear_eval as le

N, D, C = 200, 5, 3


def _blobs(seed, n=N, scale=1.0):
  """Overlapping Gaussian classes: a well-posed, non-separable problem."""
  rng = np.random.default_rng(seed)
  means = np.array([[1.0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0], [0, 0, 1.0, 0, 0]])
  y = rng.integers(0, C, n)
  x = means[y] + rng.normal(size=(n, D))
  return (scale * x + 3.0).astype(np.float32), y


def _np_objective(theta, z, y, l2):
  """Mean softmax CE + 0.5 * l2 * ||W||^2 (bias free) and its gradient, float64."""
  w, b = theta[: D * C].reshape(D, C), theta[D * C :]
  logits = z @ w + b
  m = logits.max(axis=1, keepdims=True)
  lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
  n = len(y)
  value = np.mean(lse - logits[np.arange(n), y]) + 0.5 * l2 * np.sum(w**2)
  dlogits = np.exp(logits - lse[:, None])
  dlogits[np.arange(n), y] -= 1.0
  dlogits /= n
  return value, np.concatenate([(z.T @ dlogits + l2 * w).ravel(), dlogits.sum(axis=0)])


# ----------------------------------------------------------------------------
# Linear probe


def test_lbfgs_matches_scipy_reference():
  x, y = _blobs(0)
  l2 = 1e-2
  clf = le.fit_logistic_regression(x, y, C, l2, tol=0.0)  # to float32 precision
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(clf.mean, x64.mean(axis=0), atol=1e-5)
  np.testing.assert_allclose(clf.std, x64.std(axis=0), rtol=1e-5)
  z = (x64 - np.asarray(clf.mean, np.float64)) / np.asarray(clf.std, np.float64)
  ref = optimize.minimize(
      _np_objective,
      np.zeros(D * C + C),
      args=(z, y, l2),
      jac=True,
      method="L-BFGS-B",
      options=dict(maxiter=10_000, ftol=1e-15, gtol=1e-10),
  )
  assert ref.success
  w_ref, b_ref = ref.x[: D * C].reshape(D, C), ref.x[D * C :]
  np.testing.assert_allclose(clf.kernel, w_ref, atol=2e-6)
  # The bias is determined up to a constant shift (softmax): compare centred.
  np.testing.assert_allclose(clf.bias - np.mean(clf.bias), b_ref - b_ref.mean(), atol=2e-6)
  theta = np.concatenate([np.asarray(clf.kernel, np.float64).ravel(), np.asarray(clf.bias)])
  assert _np_objective(theta, z, y, l2)[0] == pytest.approx(ref.fun, rel=1e-10)
  np.testing.assert_array_equal(clf.predict(x), np.argmax(z @ w_ref + b_ref, axis=1))
  np.testing.assert_allclose(clf.logits(x), z @ w_ref + b_ref, atol=1e-4)


def test_separable_problem_reaches_full_train_accuracy():
  rng = np.random.default_rng(1)
  y = rng.integers(0, C, N)
  x = rng.uniform(-1, 1, size=(N, D))
  x[np.arange(N), y] += 3.0  # the label's coordinate >= 2, every other one <= 1
  clf = le.fit_logistic_regression(x.astype(np.float32), y, C, l2=1e-6)
  assert le.accuracy(clf, x, y) == 1.0


def test_standardisation_makes_the_fit_invariant_to_affine_feature_maps():
  x, y = _blobs(2)
  first = le.fit_logistic_regression(x, y, C, l2=1e-1, tol=0.0)
  second = le.fit_logistic_regression(4.0 * x - 7.0, y, C, l2=1e-1, tol=0.0)
  np.testing.assert_allclose(second.logits(4.0 * x - 7.0), first.logits(x), atol=1e-5)
  np.testing.assert_allclose(second.kernel, first.kernel, atol=1e-5)


def test_warm_start_keeps_the_init_logits_under_another_standardisation():
  x, y = _blobs(2)
  first = le.fit_logistic_regression(x, y, C, l2=1e-1)
  mean, std = np.linspace(-1, 1, D).astype(np.float32), np.linspace(0.5, 2, D).astype(np.float32)
  kernel, bias = le.warm_start(first, mean, std, D, C)
  moved = le.LinearClassifier(kernel, bias, mean, std)
  np.testing.assert_allclose(moved.logits(x), first.logits(x), rtol=1e-5, atol=1e-5)
  # A warm start from the optimum stays there.
  again = le.fit_logistic_regression(x, y, C, l2=1e-1, init=first)
  np.testing.assert_allclose(again.kernel, first.kernel, atol=1e-5)


def test_padding_rows_are_ignored():
  x, y = _blobs(3)
  clf = le.fit_logistic_regression(x, y, C, l2=1e-2, tol=0.0)  # to float32 precision
  rng = np.random.default_rng(4)
  pad_x = rng.normal(scale=100.0, size=(20, D)).astype(np.float32)
  order = rng.permutation(N + 20)
  xp = np.concatenate([x, pad_x])[order]
  yp = np.concatenate([y, -np.ones(20, int)])[order]
  padded = le.fit_logistic_regression(xp, yp, C, l2=1e-2, tol=0.0)
  np.testing.assert_allclose(padded.mean, clf.mean, atol=1e-5)
  np.testing.assert_allclose(padded.std, clf.std, rtol=1e-5)
  np.testing.assert_allclose(padded.kernel, clf.kernel, atol=5e-6)
  np.testing.assert_allclose(padded.bias, clf.bias, atol=5e-6)
  np.testing.assert_array_equal(padded.predict(x), clf.predict(x))
  assert le.accuracy(clf, xp, yp) == le.accuracy(clf, x, y)


def test_sweep_prefers_large_l2_when_features_are_noise():
  # Pure-noise features, 70/30 labels: any weight on the features only fits
  # noise, so the best validation accuracy is the majority class, reached by
  # every large l2 (W ~ 0, bias = log prior); the tie goes to the largest l2.
  rng = np.random.default_rng(5)

  def split(n):
    return rng.normal(size=(n, D)).astype(np.float32), (rng.uniform(size=n) < 0.3).astype(int)

  train, val, test = split(N), split(500), split(400)
  train[1][20:] = -1  # 20 examples (padded to the shared shape): small l2 overfits
  result = le.linear_probe(train, val, {"test": test, "again": val}, num_classes=C)
  assert result.l2_values == list(le.L2_VALUES)
  assert len(result.val_accuracy_per_l2) == len(result.iterations_per_l2) == 45
  assert all(1 <= it <= 1000 for it in result.iterations_per_l2)
  assert result.best_l2 == le.L2_VALUES[-1]
  majority_val = np.mean(val[1] == 0)
  assert result.val_accuracy == pytest.approx(majority_val)
  assert result.val_accuracy == max(result.val_accuracy_per_l2)
  assert result.val_accuracy - result.val_accuracy_per_l2[0] > 0.05  # l2 = 1e-6 overfits
  assert result.test_accuracy["test"] == pytest.approx(np.mean(test[1] == 0))
  assert result.test_accuracy["test"] == le.accuracy(result.classifier, *test)
  assert result.test_accuracy["again"] == result.val_accuracy


def test_sweep_picks_the_validation_argmax_on_informative_features():
  train, val, test = _blobs(6), _blobs(7, n=300), _blobs(8, n=300)
  l2_values = [1e-4, 1e-1, 1e4]
  result = le.linear_probe(train, val, {"test": test}, C, l2_values=l2_values)
  best = max(result.val_accuracy_per_l2)
  assert result.val_accuracy == best
  assert result.best_l2 == max(
      l2 for l2, acc in zip(l2_values, result.val_accuracy_per_l2) if acc == best
  )  # ties: the larger l2
  assert result.best_l2 < 1e4
  assert result.val_accuracy_per_l2[2] < result.val_accuracy - 0.2  # W ~ 0: near chance
  assert result.val_accuracy == le.accuracy(result.classifier, *val)
  assert result.test_accuracy["test"] == le.accuracy(result.classifier, *test)


@pytest.mark.parametrize(
    "case, match",
    [
        ("length", "features has 200 rows but labels has 199"),
        ("label_range", "num_classes=3"),
        ("no_valid", "no valid example"),
        ("non_finite", "NaN or inf"),
        ("float_labels", "integers"),
    ],
)
def test_fit_errors(case, match):
  x, y = _blobs(9)
  if case == "length":
    y = y[:-1]
  elif case == "label_range":
    y = y.copy()
    y[0] = C
  elif case == "no_valid":
    y = -np.ones_like(y)
  elif case == "non_finite":
    x = x.copy()
    x[3, 1] = np.nan
  elif case == "float_labels":
    y = y.astype(np.float32)
  with pytest.raises(ValueError, match=match):
    le.fit_logistic_regression(x, y, C, l2=1.0)


def test_probe_errors_name_the_split():
  x, y = _blobs(10)
  with pytest.raises(ValueError, match="val: features has 200 rows"):
    le.linear_probe((x, y), (x, y[:-1]), {}, C)
  with pytest.raises(ValueError, match=r"tests\['ood'\]: label 3"):
    le.linear_probe((x, y), (x, y), {"ood": (x, y + 1)}, C)
  with pytest.raises(ValueError, match="val: features have dimension 4"):
    le.linear_probe((x, y), (x[:, :4], y), {}, C)
  with pytest.raises(ValueError, match="train: no valid example"):
    le.linear_probe((x, -np.ones_like(y)), (x, y), {}, C)
  with pytest.raises(ValueError, match="l2 values"):
    le.linear_probe((x, y), (x, y), {}, C, l2_values=[])
  with pytest.raises(ValueError, match="max_iters"):
    le.linear_probe((x, y), (x, y), {}, C, max_iters=0)


# ----------------------------------------------------------------------------
# Weighted kNN


def _unit(deg):
  return [np.cos(np.radians(deg)), np.sin(np.radians(deg))]


# One class-0 point on the query's direction, two class-1 points 30 degrees off,
# one class-2 point orthogonal (and a padding row identical to the query).
KNN_TRAIN = np.array([_unit(0), _unit(30), _unit(-30), _unit(90), _unit(0)], np.float32) * [
    [1.0],
    [2.0],
    [0.5],
    [3.0],
    [1.0],
]  # norms do not matter (cosine)
KNN_LABELS = np.array([0, 1, 1, 2, -1])
KNN_QUERY = np.array([[5.0, 0.0]], np.float32)


@pytest.mark.parametrize("temperature", [0.07, 10.0])
def test_knn_weighted_vote_by_hand(temperature):
  # k = 3: the neighbours are the class-0 point (sim 1) and the two class-1
  # points (sim cos 30); the padding row is skipped although it is closest.
  votes = np.array([np.exp(1.0 / temperature), 2 * np.exp(np.cos(np.radians(30)) / temperature), 0])
  expected = int(np.argmax(votes))
  # At T = 0.07 the single closer neighbour outweighs the majority; at T = 10
  # the weights are near-uniform and the majority (class 1) wins.
  assert expected == (0 if temperature == 0.07 else 1)
  pred = le.knn_predict(
      KNN_TRAIN, KNN_LABELS, KNN_QUERY, num_classes=3, k=3, temperature=temperature
  )
  np.testing.assert_array_equal(pred, [expected])


def test_knn_k_is_clamped_to_the_valid_training_rows():
  # k = 100 > 4 valid rows: clamped to 4, which adds the class-2 point (sim 0).
  queries = np.array([[5.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
  clamped = le.knn_predict(KNN_TRAIN, KNN_LABELS, queries, 3, k=100)
  np.testing.assert_array_equal(clamped, le.knn_predict(KNN_TRAIN, KNN_LABELS, queries, 3, k=4))
  np.testing.assert_array_equal(clamped, [0, 2, 2])


def test_knn_ties_go_to_the_lowest_class_and_batches_agree():
  train = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  labels = np.array([1, 0])  # class 1 listed first: the tie must still pick class 0
  rng = np.random.default_rng(11)
  queries = rng.normal(size=(7, 2)).astype(np.float32)
  queries[0] = [1.0, 1.0]  # equidistant from both training rows
  pred = le.knn_predict(train, labels, queries, 2, k=2, batch_size=3)
  assert pred[0] == 0
  np.testing.assert_array_equal(pred, le.knn_predict(train, labels, queries, 2, k=2, batch_size=7))
  # k = 1: nearest neighbour by angle.
  nearest = np.where(queries[:, 0] > queries[:, 1], 1, 0)
  np.testing.assert_array_equal(le.knn_predict(train, labels, queries[1:], 2, k=1), nearest[1:])
  query_labels = le.knn_predict(train, labels, queries, 2, k=1)
  query_labels[1] = 1 - query_labels[1]  # one wrong
  query_labels[2] = -1  # one padded: not counted
  assert le.knn_accuracy(train, labels, queries, query_labels, 2, k=1) == pytest.approx(5 / 6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k must be >= 1"),
        (dict(train_labels=KNN_LABELS[:-1]), "train_features/train_labels: features has 5 rows"),
        (dict(train_labels=np.array([0, 1, 1, 3, -1])), "num_classes=3"),
        (dict(train_labels=-np.ones(5, int)), "no valid example"),
        (dict(query_features=np.array([[np.inf, 0.0]], np.float32)), "query_features contain"),
        (
            dict(query_features=np.zeros((1, 3), np.float32)),
            "query_features: features have dimension 3",
        ),
        (dict(temperature=0.0), "temperature"),
    ],
)
def test_knn_errors(kwargs, match):
  args = dict(
      train_features=KNN_TRAIN, train_labels=KNN_LABELS, query_features=KNN_QUERY, num_classes=3
  )
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    le.knn_predict(**args)
