"""Evaluation readers: one ordered pass over this process's shard of a split.

Three views of the same read: eval_batches (the online probe during training:
the training preprocessing, device-shaped), localization_batches (ContraCAM:
ids and ground truth masks and boxes) and split_batches (frozen-encoder
evaluation of an eval_datasets.EvalDataset: resized on the shorter side and
centre-cropped, docs/method.md#evaluation). Every example is read exactly once:
the last batch is padded and carries `valid`. Image-folder files that cannot be
decoded are skipped, counted and logged after a complete pass (see
last_skipped). Datasets held as arrays (`scenes`) are read by array_reader,
TFDS datasets and folders by tf_readers, imported only for them.
"""

from __future__ import annotations

from typing import Iterator

import jax
import ml_collections
import numpy as np

from ocl_jax import parallel
from ocl_jax.data import array_reader
from ocl_jax.data import sources
from ocl_jax.data.eval_datasets import EvalDataset


def _tf_readers():
  from ocl_jax.data import tf_readers  # TensorFlow only for TFDS datasets and folders

  return tf_readers


def eval_batches(
    config: ml_collections.ConfigDict,
    split: str,
    batch_size: int | None = None,
    max_batches: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's shard of `split`, in order; the last batch is padded and
  every batch carries `valid` (1 for real examples), so no example is dropped or counted twice.

  With several processes (shards of one example more or less) each yields the same number
  of batches, the longest shard's, padding with empty ones: the pmapped step that consumes
  them has collectives, which every process must run equally often.
  """
  d = config.dataset
  builder = sources.get_builder(d.name, d.data_dir)
  local_batch = (batch_size or config.batch_size) // jax.process_count()
  if sources.kind(builder) == "arrays":
    batches = array_reader.eval_batches(
        builder,
        split,
        d.image_size,
        local_batch,
        max_batches,
        jax.process_index(),
        jax.process_count(),
    )
  else:
    batches = _tf_readers().eval_batches(config, builder, split, local_batch, max_batches)
  for batch in batches:
    yield parallel.shard_for_devices(batch)


def localization_batches(
    config: ml_collections.ConfigDict, split: str, batch_size: int, max_examples: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
  """This process's shard of `split` in order, with ids and whatever ground truth exists.

  Yields host batches (the last one smaller): image (B,S,S,3) uint8, id (B,) str,
  and when the dataset has them gt_mask (B,S,S) float32 in {0,1} (scenes `mask`,
  CUB `segmentation_mask`), gt_boxes (B,K,4) x1,y1,x2,y2 with gt_box_valid (B,K).
  """
  d = config.dataset
  builder = sources.get_builder(d.name, d.data_dir)
  if sources.kind(builder) == "arrays":
    yield from array_reader.localization_batches(
        builder,
        split,
        d.image_size,
        batch_size,
        max_examples,
        jax.process_index(),
        jax.process_count(),
    )
    return
  yield from _tf_readers().localization_batches(config, builder, split, batch_size, max_examples)


def last_skipped(ds: EvalDataset, split: str) -> tuple[str, ...] | None:
  """Files of this process's shard of `split` that the last complete `split_batches` pass
  over `ds` could not decode and skipped (len() is the count); None before any complete
  pass. Always () for TFDS and array datasets, whose records are whole when they are built."""
  if ds.source != "folder":
    return ()
  return ds.skipped.get(split)


def split_size(
    ds: EvalDataset, split: str, *, data_dir: str | None = None, max_examples: int | None = None
) -> int | None:
  """Examples in this process's shard of `split` when known without reading it, else None.

  Arrays and TFDS: the recorded count. coco_crop: None (instances are found while
  reading). Folders: the files listed, an upper bound when some cannot be
  decoded (see last_skipped).
  """
  if ds.source == "folder":
    n = len(_tf_readers().folder_shard(ds, split))
  elif ds.source == "coco_crop":
    return None
  elif ds.source == "arrays":
    builder = sources.get_builder(ds.tfds_name, data_dir or ds.data_dir)
    start, stop = array_reader.process_shard(
        builder.num_examples(split), jax.process_index(), jax.process_count()
    )
    n = stop - start
  else:
    n = _tf_readers().tfds_split_size(ds, split, data_dir)
    if n is None:
      return None
  return n if max_examples is None or max_examples < 0 else min(n, max_examples)


def split_batches(
    ds: EvalDataset,
    split: str,
    *,
    image_size: int,
    crop_fraction: float,
    batch_size: int,
    data_dir: str | None = None,
    max_examples: int | None = None,
    with_ids: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's shard of `split`, in a fixed order.

  Yields host batches of exactly `batch_size` (examples of this process):
  image uint8 (B, S, S, 3) (resized on the shorter side and centre-cropped), label int32
  (B,), valid int32 (B,) 1 for real examples, and with `with_ids` (datasets with an
  `image/id`, such as `scenes`) id int64 (B,); the last batch is padded with zeros,
  valid 0 and label -1. max_examples: read at most that many (files for
  folders, instances for coco_crop). Folder files that cannot be decoded are
  skipped; after the pass they are logged and kept for `last_skipped`.
  """
  if ds.source == "arrays":
    builder = sources.get_builder(ds.tfds_name, data_dir or ds.data_dir)
    yield from array_reader.split_batches(
        builder,
        split,
        image_size=image_size,
        crop_fraction=crop_fraction,
        batch_size=batch_size,
        max_examples=max_examples,
        with_ids=with_ids,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return
  yield from _tf_readers().split_batches(
      ds,
      split,
      image_size=image_size,
      crop_fraction=crop_fraction,
      batch_size=batch_size,
      data_dir=data_dir,
      max_examples=max_examples,
      with_ids=with_ids,
  )
