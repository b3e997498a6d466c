"""The probe-free `scenes` measures on constructed features whose answer is known."""

import numpy as np
import pytest

from ocl_jax.data.scenes import ID_STRIDE
from ocl_jax.evaluation import scene_features as sf

N, D, CLASSES = 300, 64, 10


def constructed(alpha: float, seed: int = 0):
  """{split: (features, labels, ids)}: alpha * foreground + (1 - alpha) * background.

  A scene's foreground (a class prototype plus the instance's own part) is the
  same in every split; backgrounds are drawn per image (`test`, `mixed_rand`)
  or are one constant (`only_fg`, the black background). Splits come shuffled,
  with their own id prefix, as `scenes` stores them.
  """
  rng = np.random.default_rng(seed)
  labels = np.arange(N) % CLASSES
  prototypes = rng.normal(size=(CLASSES, D))
  fg = prototypes[labels] + 0.7 * rng.normal(size=(N, D))
  black = rng.normal(size=D)
  backgrounds = {
      "test": rng.normal(size=(N, D)),
      "mixed_rand": rng.normal(size=(N, D)),
      "only_fg": np.broadcast_to(black, (N, D)),
  }
  out = {}
  for i, (split, bg) in enumerate(backgrounds.items()):
    order = rng.permutation(N)
    feats = alpha * fg + (1 - alpha) * bg
    out[split] = (feats[order], labels[order], i * ID_STRIDE + order)
  return out


def test_pure_foreground_features_ignore_the_background():
  m = sf.feature_metrics(constructed(alpha=1.0))
  assert m["mixed_rand_top1"] == 1.0
  assert m["only_fg_top1"] == 1.0
  assert m["mixed_rand_consistency"] == pytest.approx(1.0, abs=1e-12)
  assert m["only_fg_class_p20"] > 0.9


def test_pure_background_features_are_at_chance():
  m = sf.feature_metrics(constructed(alpha=0.0))
  assert m["mixed_rand_top1"] < 5 / N  # chance is 1/N
  assert m["only_fg_top1"] < 5 / N  # every only_fg image looks the same
  assert abs(m["mixed_rand_consistency"]) < 0.03
  assert m["only_fg_class_p20"] < 0.2  # chance is 1/CLASSES


def test_measures_grow_with_the_foreground_share():
  alphas = (0.0, 0.3, 0.45, 0.6, 1.0)
  rows = [sf.feature_metrics(constructed(a)) for a in alphas]
  for key in ("mixed_rand_top1", "mixed_rand_consistency", "only_fg_top1"):
    values = [r[key] for r in rows]
    assert values == sorted(values), (key, values)
    assert values[0] < values[2] < values[-1], (key, values)


def test_swap_consistency_and_top1_by_hand():
  a = np.array([[1.0, 0], [0, 1], [-1, 0]])
  b = np.array([[1.0, 0], [0, 1], [0, -1]])
  # c = a b^T: diagonal 1, 1, 0 (mean 2/3); the six others sum to -2 (mean -1/3).
  assert sf.swap_consistency(a, b) == pytest.approx((2 / 3 + 1 / 3) / (1 + 1 / 3))
  # b2 = (0, -1) is as close to a0 as to a2 (0): the first wins, a miss.
  assert sf.own_scene_top1(b, a) == pytest.approx(2 / 3)


def test_class_precision_by_hand():
  g = np.array([[1.0, 0], [0.9, 0.436], [0, 1], [0.1, 0.995]])
  labels = np.array([0, 0, 1, 0])
  # Row 0's nearest other row is row 1 (label 0: hit), row 1's is row 0 (hit), row 2's is
  # row 3 (label 0, row 2 is 1: miss), row 3's is row 2 (miss).
  assert sf.class_precision(g, g, labels, k=1) == pytest.approx(0.5)


def test_align_matches_scenes_across_splits_and_rejects_mismatches():
  data = constructed(alpha=1.0)
  aligned = sf.align(data)
  for split in ("mixed_rand", "only_fg"):
    np.testing.assert_array_equal(aligned[split][1], aligned["test"][1])
  f, lab, ids = data["mixed_rand"]
  with pytest.raises(ValueError, match="same scenes"):
    sf.align({"test": data["test"], "mixed_rand": (f[:-1], lab[:-1], ids[:-1])})
  with pytest.raises(ValueError, match="twice"):
    sf.align({"test": (f, lab, np.zeros_like(ids))})
  with pytest.raises(ValueError, match="missing"):
    sf.feature_metrics({"test": data["test"]})


def test_applies_only_to_scenes_with_the_paired_splits():
  tests = {"test": "test", "mixed_rand": "test_mixed_rand", "only_fg": "test_only_fg"}
  assert sf.applies(tests, "scenes/small")
  assert not sf.applies(tests, "cifar10")
  assert not sf.applies({"test": "test"}, "scenes/small")
