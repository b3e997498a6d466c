"""Frozen-encoder evaluation (docs/method.md#evaluation): features, probes, one results table.

`--config.mode=eval` evaluates every encoder of `config.evaluation.checkpoints`
on every dataset of `config.evaluation.datasets` with every protocol of
`config.evaluation.protocols`, and writes WORKDIR/eval_results.{json,md}: one
row per checkpoint, one column per (dataset, protocol, test split). The
pipeline (`ocl_jax.pipeline`) calls the same functions for its final table.

Features are the global-average-pooled layer4 map of the encoder in inference
mode, extracted by a pmapped forward over the local devices; each process
reads its own shard and the per-process features are gathered (uneven shards
padded and masked), so no example is dropped or counted twice.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Iterator

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from ocl_jax import console, export, parallel, paths
from ocl_jax.data import eval_data
from ocl_jax.data import eval_datasets
from ocl_jax.evaluation import linear_eval
from ocl_jax.evaluation import scene_features
from ocl_jax.views import augment

PROTOCOLS = ("linear", "knn", "feature")  # feature: scene_features, `scenes` only
RESULTS_NAME = "eval_results"


@functools.lru_cache(maxsize=8)
def _pmapped_features(module):
  def features(variables, images):
    x = augment.normalize(images.astype(jnp.float32) / 255.0)
    return module.apply(variables, x, train=False).mean(axis=(1, 2))

  return jax.pmap(features, axis_name=parallel.AXIS, in_axes=(None, 0))


def extract_features(
    module: Any,
    variables: Any,
    batches: Iterator[dict[str, np.ndarray]],
    total: int | None = None,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray]:
  """(features (N, D) float32, labels (N,)) of every valid example, over all processes.

  `batches` are this process's host batches (image uint8, label, valid) of a
  size divisible by the local device count. Batch k+1 is dispatched before batch k's
  features are fetched, so reading the next batch overlaps the forward pass.
  """
  n_dev = jax.local_device_count()
  forward = _pmapped_features(module)
  feats, labels, shape = [], [], None

  def keep_valid(out: jax.Array, batch: dict[str, np.ndarray]) -> None:
    keep = batch["valid"] > 0
    feats.append(np.asarray(out).reshape(keep.shape[0], -1)[keep])
    labels.append(batch["label"][keep])

  pending = None
  for batch in console.progress(batches, total=total, desc=desc, unit="batch", leave=False):
    b = batch["image"].shape[0]
    if b % n_dev:
      raise ValueError(f"evaluation batch {b} is not divisible by the {n_dev} local devices")
    shape = (n_dev, b // n_dev) + batch["image"].shape[1:]
    out = forward(variables, batch["image"].reshape(shape))
    if pending is not None:
      keep_valid(*pending)
    pending = out, batch
  if pending is not None:
    keep_valid(*pending)
  if jax.process_count() > 1:
    # Every process runs the multi-process pmap equally often: shorter shards run
    # padding batches whose outputs are dropped.
    counts = np.asarray(multihost_utils.process_allgather(np.array([len(feats)], np.int32)))
    if shape is not None:
      for _ in range(int(counts.max()) - len(feats)):
        forward(variables, np.zeros(shape, np.uint8)).block_until_ready()
  if not feats:
    raise ValueError(f"{desc}: no examples")
  return gather_over_processes(
      np.concatenate(feats).astype(np.float32), np.concatenate(labels).astype(np.int32)
  )


def gather_over_processes(
    features: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Concatenate every process's (features, labels), however many each holds."""
  if jax.process_count() == 1:
    return features, labels
  counts = multihost_utils.process_allgather(np.array([len(labels)], np.int32))
  most = int(np.max(counts))
  pad = most - len(labels)
  f = np.concatenate([features, np.zeros((pad,) + features.shape[1:], features.dtype)])
  lab = np.concatenate([labels, np.full((pad,), -1, labels.dtype)])
  all_f = multihost_utils.process_allgather(f)
  all_l = multihost_utils.process_allgather(lab)
  counts = np.asarray(counts).reshape(-1)
  return (
      np.concatenate([all_f[p, :c] for p, c in enumerate(counts)]),
      np.concatenate([all_l[p, :c] for p, c in enumerate(counts)]),
  )


def _eval_batch_size(config: ml_collections.ConfigDict) -> int:
  n = jax.local_device_count()
  b = max(config.evaluation.batch_size // jax.process_count(), n)
  return b - b % n


def _dataset(config: ml_collections.ConfigDict, name: str) -> eval_datasets.EvalDataset:
  e = config.evaluation
  scenes = config.dataset.name if config.dataset.name.startswith("scenes") else "scenes/default"
  return eval_datasets.get_eval_dataset(
      name, scenes_name=scenes, folders=dict(e.folders), data_dir=_data_dir(config)
  )


def _data_dir(config: ml_collections.ConfigDict) -> str | None:
  return config.evaluation.data_dir or config.dataset.data_dir


def _split_features(config, module, variables, ds, split, with_ids=False) -> tuple:
  """(features, labels) of a split, and the image ids as a third item `with_ids`."""
  e = config.evaluation
  bs = _eval_batch_size(config)
  limit = e.max_examples if e.max_examples > 0 else None
  batches = eval_data.split_batches(
      ds,
      split,
      image_size=e.image_size,
      crop_fraction=e.crop_fraction,
      batch_size=bs,
      data_dir=_data_dir(config),
      max_examples=limit,
      with_ids=with_ids,
  )
  ids: list[np.ndarray] = []

  def record_ids(batches):
    for batch in batches:
      ids.append(batch["id"][batch["valid"] > 0])
      yield batch

  batches = record_ids(batches) if with_ids else batches
  out = extract_features(module, variables, batches, desc=f"{ds.name} {split}")
  if with_ids:
    own = np.concatenate(ids)
    out = (*out, gather_over_processes(np.zeros((len(own), 0), np.float32), own)[1])
  skipped = eval_data.last_skipped(ds, split)
  if skipped:
    logging.warning(
        "%s %s: %d unreadable images skipped (not counted in the accuracy)",
        ds.name,
        split,
        len(skipped),
    )
  return out


def _head_labels(
    labels: np.ndarray, ds: eval_datasets.EvalDataset, head: eval_datasets.EvalDataset
) -> np.ndarray:
  """Relabel a test-only set in the class indices of the dataset whose probe is applied."""
  index = {n: i for i, n in enumerate(head.class_names)}
  missing = [n for n in ds.class_names if n not in index]
  if missing:
    raise ValueError(
        f"{ds.name}: classes {missing} are not classes of {head.name} "
        f"({list(head.class_names)}), whose probe it is evaluated with"
    )
  mapping = np.array([index[n] for n in ds.class_names])
  return np.where(labels >= 0, mapping[np.maximum(labels, 0)], -1)


def evaluate_encoder(
    config: ml_collections.ConfigDict, module: Any, variables: Any
) -> dict[str, float]:
  """Every configured (dataset, protocol, test split) of one encoder: {column: accuracy}."""
  e = config.evaluation
  results: dict[str, float] = {}
  fitted: dict[str, tuple[eval_datasets.EvalDataset, Any, tuple]] = {}
  datasets = {n: _dataset(config, n) for n in e.datasets}
  for name in sorted(e.datasets, key=lambda n: datasets[n].head_from is not None):
    ds = datasets[name]
    start = time.time()
    if ds.head_from is not None:
      if ds.head_from not in fitted:
        raise ValueError(
            f"config.evaluation.datasets: {name} is evaluated with the probe of "
            f"{ds.head_from}; add {ds.head_from!r} to the list"
        )
      head, classifier, train = fitted[ds.head_from]
      for test_name, split in ds.tests.items():
        f, lab = _split_features(config, module, variables, ds, split)
        lab = _head_labels(lab, ds, head)
        if "linear" in e.protocols:
          results[f"{name}/linear/{test_name}"] = linear_eval.accuracy(classifier, f, lab)
        if "knn" in e.protocols:
          results[f"{name}/knn/{test_name}"] = linear_eval.knn_accuracy(
              *train, f, lab, head.num_classes, k=e.knn_k, temperature=e.knn_temperature
          )
      continue
    probes = {"linear", "knn"} & set(e.protocols)  # the ones that need train / val features
    train = _split_features(config, module, variables, ds, ds.train) if probes else None
    val = _split_features(config, module, variables, ds, ds.val) if "linear" in probes else None
    paired = "feature" in e.protocols and scene_features.applies(ds.tests, ds.tfds_name)
    tests = {
        t: _split_features(config, module, variables, ds, s, with_ids=paired)
        for t, s in ds.tests.items()
    }
    if paired:
      measures = scene_features.feature_metrics(tests)
      results.update({f"{name}/feature/{k}": v for k, v in measures.items()})
      tests = {t: v[:2] for t, v in tests.items()}
    classifier = None
    if "linear" in e.protocols:
      l2_values = np.logspace(-6, 5, e.num_l2_values)
      probe = linear_eval.linear_probe(
          train, val, tests, ds.num_classes, l2_values=l2_values, max_iters=e.lbfgs_max_iters
      )
      classifier = probe.classifier
      results[f"{name}/linear/val"] = probe.val_accuracy
      for t, acc in probe.test_accuracy.items():
        results[f"{name}/linear/{t}"] = acc
      logging.info(
          "%s linear probe: best l2 %.3g, val %.4f", name, probe.best_l2, probe.val_accuracy
      )
    if "knn" in e.protocols:
      for t, (f, lab) in tests.items():
        results[f"{name}/knn/{t}"] = linear_eval.knn_accuracy(
            *train, f, lab, ds.num_classes, k=e.knn_k, temperature=e.knn_temperature
        )
    fitted[name] = (ds, classifier, train)
    logging.info("Evaluated %s in %.1f s", name, time.time() - start)
  for name in e.datasets:  # background gap (ImageNet-9 style): original - mixed_rand
    for proto in e.protocols:
      first = (
          f"{name}/{proto}/test"
          if f"{name}/{proto}/test" in results
          else f"{name}/{proto}/original"
      )
      if first in results and f"{name}/{proto}/mixed_rand" in results:
        results[f"{name}/{proto}/bg_gap"] = results[first] - results[f"{name}/{proto}/mixed_rand"]
  return results


def results_table(rows: dict[str, dict[str, float]], title: str = "") -> str:
  """Markdown: one row per checkpoint, one column per metric (accuracies in %)."""
  cols: list[str] = []
  for r in rows.values():
    cols += [c for c in r if c not in cols]
  lines = ([title, ""] if title else []) + [
      "| checkpoint | " + " | ".join(cols) + " |",
      "|---|" + "---|" * len(cols),
  ]
  for name, r in rows.items():
    cells = [_fmt(c, r[c]) if c in r else "–" for c in cols]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _fmt(column: str, value: float) -> str:
  if column.startswith("loc/") or not math.isfinite(value):
    return f"{value:.3f}"
  return f"{100 * value:.1f}"


def write_results(
    workdir: str,
    rows: dict[str, dict[str, float]],
    meta: dict[str, Any],
    name: str = RESULTS_NAME,
    title: str = "",
) -> str:
  """WORKDIR/<name>.json (rows and meta) and <name>.md, written atomically; returns the table."""
  table = results_table(rows, title)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    for ext, text in (("json", json.dumps({"rows": rows, **meta}, indent=2)), ("md", table + "\n")):
      path = os.path.join(workdir, f"{name}.{ext}")
      with open(path + ".tmp", "w") as f:
        f.write(text)
      os.replace(path + ".tmp", path)
  return table


def row_names(sources: list[str]) -> list[str]:
  """A distinct row name per checkpoint: the shortest trailing part of its path that no other
  source shares ('runs/a/export', 'runs/b/export' -> 'a', 'b'; an `export` folder is named by
  the run that holds it). The same path twice is a ValueError."""
  paths = [os.path.normpath(s) for s in sources]
  seen: dict[str, int] = {}
  for i, p in enumerate(paths):
    if p in seen:
      raise ValueError(
          f"config.evaluation.checkpoints lists {sources[seen[p]]!r} twice (entries "
          f"{seen[p]} and {i}): each checkpoint is one row"
      )
    seen[p] = i
  full = [[x for x in p.split(os.sep) if x] or [p] for p in paths]
  short = [f[:-1] if len(f) > 1 and f[-1] == "export" else f for f in full]
  # A run and its own export folder, both listed: the export keeps its `export`.
  parts = [f if short.count(sh) > 1 else sh for f, sh in zip(full, short)]
  names = []
  for items in parts:
    for k in range(1, len(items) + 1):
      name = "/".join(items[-k:])
      others = ["/".join(o[-k:]) for o in parts if o is not items]
      if name not in others:
        break
    names.append(name)
  return names


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, float]]:
  """--config.mode=eval: evaluate the configured checkpoints (default: the workdir's export).

  Rows of earlier evaluations in the workdir are kept; a row name that an earlier evaluation
  gave to another checkpoint is refused rather than overwritten."""
  workdir, config = paths.resolve(workdir), paths.resolve_config(config)
  sources = list(config.evaluation.checkpoints) or [workdir]
  names = row_names(sources)
  path = os.path.join(workdir, f"{RESULTS_NAME}.json")
  rows: dict[str, dict[str, float]] = {}
  origins: dict[str, str] = {}
  if os.path.exists(path):
    try:
      with open(path) as f:
        earlier = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(
          f"{path} (the earlier evaluations of this workdir) cannot be read ({e}); move it "
          "away to start a new table"
      ) from e
    rows, origins = earlier.get("rows", {}), earlier.get("sources", {})
  for name, source in zip(names, sources):
    previous = origins.get(name)
    if previous is not None and os.path.normpath(previous) != os.path.normpath(source):
      raise ValueError(
          f"row {name!r} of {path} holds {previous}; {source} would get the same name. "
          "Evaluate it into another workdir or pass a longer path"
      )
  for name, source in zip(names, sources):
    module, variables = export.load_model(source)[:2]
    logging.info("Evaluating %s (%s)", name, source)
    rows[name] = evaluate_encoder(config, module, variables)
    origins[name] = source
    table = write_results(
        workdir,
        rows,
        {
            "datasets": list(config.evaluation.datasets),
            "protocols": list(config.evaluation.protocols),
            "sources": origins,
        },
    )
  console.say(table)
  return rows
