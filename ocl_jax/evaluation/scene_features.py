"""Probe-free measures of background reliance on `scenes` (docs/method.md#feature-metrics).

A linear probe fit on biased data decides by itself how much background it
uses, so its shifted-split accuracies move with small changes of the features.
These measures read the features directly. They rest on one guarantee of
`scenes`: scene k of `test`, `test_mixed_same`, `test_mixed_rand` and
`test_only_fg` holds the same objects (k = image/id % ID_STRIDE); only the
background differs. Features are centred on the mean `test` feature and
compared by cosine similarity. Like accuracies, the values are fractions
(tables print them in %).

- `mixed_rand_top1`: the fraction of `test_mixed_rand` images whose nearest `test` image
  is their own scene (chance: 1/N). Features of the objects keep it high;
  features of the background, which was swapped, bring it to chance.
- `mixed_rand_consistency`: how much closer a scene stays to itself across the
  swap than to other scenes, (mean_k c_kk - mean_{k!=j} c_kj) / (1 - mean_{k!=j}
  c_kj): 1 when the swap leaves the features unchanged, about 0 when
  they follow the background.
- `only_fg_top1`: the fraction of `test_only_fg` images whose nearest `test` image is their
  own scene.
- `only_fg_class_p20`: of the 20 nearest `test` images of a `test_only_fg` image,
  its own scene excluded, the fraction of the scene's class (chance: about 1/classes).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ocl_jax.data.scenes import ID_STRIDE

# The test splits (display names of the `scenes` evaluation dataset) the measures pair up.
PAIRED = ("test", "mixed_rand", "only_fg")
CLASS_NEIGHBOURS = 20


def applies(tests: Mapping[str, str], tfds_name: str | None) -> bool:
  """Whether a dataset has the paired `scenes` splits these measures need."""
  return bool(tfds_name) and tfds_name.startswith("scenes") and set(PAIRED) <= set(tests)


def align(
    split_features: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{split: (features, labels)} with row k of every split the same scene.

  `split_features`: {split: (features (N, D), labels (N,), image ids (N,))}.
  Every split must hold the same scenes, each once.
  """
  order, scenes = {}, None
  for name, (_, _, ids) in split_features.items():
    scene = np.asarray(ids, np.int64) % ID_STRIDE
    if len(np.unique(scene)) != len(scene):
      raise ValueError(f"scenes split {name!r}: a scene index occurs twice")
    if scenes is None:
      scenes = np.sort(scene)
    elif not np.array_equal(np.sort(scene), scenes):
      raise ValueError(
          f"scenes split {name!r} does not hold the same scenes as the others "
          f"({len(scene)} vs {len(scenes)} images; were they capped by evaluation.max_examples?)"
      )
    order[name] = np.argsort(scene, kind="stable")
  return {n: (f[order[n]], lab[order[n]]) for n, (f, lab, _) in split_features.items()}


def _unit(x: np.ndarray, centre: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64) - centre
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def own_scene_top1(query: np.ndarray, gallery: np.ndarray) -> float:
  """Fraction of rows whose most similar gallery row is the same row (both already unit length)."""
  sims = query @ gallery.T
  return float(np.mean(np.argmax(sims, axis=1) == np.arange(len(query))))


def swap_consistency(a: np.ndarray, b: np.ndarray) -> float:
  """(mean c_kk - mean_{k!=j} c_kj) / (1 - mean_{k!=j} c_kj), c = a @ b.T (unit rows)."""
  sims = a @ b.T
  n = len(a)
  same = float(np.trace(sims)) / n
  other = (float(sims.sum()) - float(np.trace(sims))) / (n * (n - 1))
  return (same - other) / (1.0 - other)


def class_precision(
    query: np.ndarray, gallery: np.ndarray, labels: np.ndarray, k: int = CLASS_NEIGHBOURS
) -> float:
  """Fraction of the k nearest gallery rows (row i's own excluded) sharing row i's label."""
  sims = query @ gallery.T
  np.fill_diagonal(sims, -np.inf)
  k = min(k, len(gallery) - 1)
  nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
  return float(np.mean(labels[nearest] == labels[:, None]))


def feature_metrics(
    split_features: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> dict[str, float]:
  """The measures of the module docstring from {split: (features, labels, image ids)}."""
  missing = [s for s in PAIRED if s not in split_features]
  if missing:
    raise ValueError(f"scene feature measures need the splits {PAIRED}; missing {missing}")
  aligned = align({s: split_features[s] for s in PAIRED})
  centre = np.asarray(aligned["test"][0], np.float64).mean(axis=0)
  test, labels = _unit(aligned["test"][0], centre), aligned["test"][1]
  rand = _unit(aligned["mixed_rand"][0], centre)
  fg = _unit(aligned["only_fg"][0], centre)
  return {
      "mixed_rand_top1": own_scene_top1(rand, test),
      "mixed_rand_consistency": swap_consistency(test, rand),
      "only_fg_top1": own_scene_top1(fg, test),
      "only_fg_class_p20": class_precision(fg, test, labels),
  }
