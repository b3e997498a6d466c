"""Evaluation readers: one ordered pass over this process's shard of a split.

Three views of the same read (open_process_shard / folders.FolderFiles, then
pad_batch): eval_batches (the online probe during training: the training
preprocessing, device-shaped), localization_batches (ContraCAM: ids and ground
truth masks and boxes) and split_batches (frozen-encoder evaluation of an
eval_datasets.EvalDataset: resized on the shorter side and centre-cropped,
docs/method.md#evaluation). Every example is read exactly once: the last batch
is padded and carries `valid`. Image-folder files that cannot be decoded are
skipped, counted and logged after a complete pass (see last_skipped).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ocl_jax.data import sources
from ocl_jax.data.annotations import example_id
from ocl_jax.data.annotations import xyxy
from ocl_jax.data.eval_datasets import EvalDataset
from ocl_jax.data.folders import FolderFiles
from ocl_jax.data.folders import FolderSource
from ocl_jax.data.preprocess import make_preprocess
from ocl_jax.data.preprocess import shard_for_devices

MAX_GT_BOXES = 16
COCO_CROP_MIN_AREA = 0.01  # COCO-Crop, docs/method.md#coco-crop
COCO_CROP_MARGIN = 0.2


def pad_batch(
    batch: dict[str, np.ndarray], size: int, label_fill: int = 0
) -> dict[str, np.ndarray]:
  """A short last batch padded to `size` with zeros (`label` with label_fill), so batch
  shapes are fixed and `valid` (0 in the padding) tells real examples apart."""
  pad = size - batch["valid"].shape[0]
  if not pad:
    return batch
  return {
      k: np.concatenate(
          [v, np.full((pad,) + v.shape[1:], label_fill if k == "label" else 0, v.dtype)]
      )
      for k, v in batch.items()
  }


# ----------------------------------------------------------------------------
# The training dataset of a config: online probe and ContraCAM.


def _longest_shard(builder: sources.Builder, split: str) -> int:
  """Examples in the largest process shard of `split` (listed files for folders)."""
  n = jax.process_count()
  if isinstance(builder, FolderSource):
    return -(-len(builder.files(split)) // n)  # shard 0 of every n-th file
  return max(
      builder.info.splits[s].num_examples for s in tfds.even_splits(split, n, drop_remainder=False)
  )


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
  files = None
  if isinstance(builder, FolderSource):
    files = builder.files(split).shard(jax.process_index(), jax.process_count())
    ds = files.decoded()
  else:
    ds = sources.open_process_shard(builder, split)
  num_batches = None
  if jax.process_count() > 1:
    num_batches = -(-_longest_shard(builder, split) // local_batch)
    if max_batches is not None:
      num_batches = min(num_batches, max_batches)
  pre = make_preprocess(builder, d.image_size)
  keep = ("file_index",) if files is not None else ()
  ds = ds.map(
      lambda ex: {**pre(ex), **{k: ex[k] for k in keep}, "valid": tf.constant(1, tf.int32)},
      num_parallel_calls=tf.data.AUTOTUNE,
  )
  ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)
  batches = tfds.as_numpy(ds)
  if files is not None:
    batches = files.track_unreadable(batches, f"{d.name} split {split!r}")
  i = 0
  for i, batch in enumerate(batches, start=1):
    if max_batches is not None and i > max_batches:
      break
    yield shard_for_devices(pad_batch(batch, local_batch))
  empty = {
      k: np.zeros((local_batch,) + tuple(spec.shape[1:]), spec.dtype.as_numpy_dtype)
      for k, spec in ds.element_spec.items()
      if k not in keep
  }
  for _ in range(i, num_batches or 0):  # this shard ran out before the longest one
    yield shard_for_devices(empty)


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
  if isinstance(builder, FolderSource):
    yield from _folder_localization_batches(builder, split, d.image_size, batch_size, max_examples)
    return
  feats = builder.info.features
  size = d.image_size
  ds = sources.open_process_shard(builder, split)
  if max_examples is not None and max_examples >= 0:
    ds = ds.take(max_examples)
  mask_key = next((k for k in ("mask", "segmentation_mask") if k in feats), None)
  base = make_preprocess(builder, size)

  def preprocess(ex):
    out = base(ex)
    out["id"] = example_id(ex, feats)
    if mask_key is not None:
      m = tf.image.resize(tf.cast(ex[mask_key], tf.float32), (size, size), method="nearest")[..., 0]
      out["gt_mask"] = tf.cast(m > 0, tf.float32)
    if "objects" in feats and "bbox" in feats["objects"].feature:
      boxes = xyxy(ex["objects"]["bbox"])[:MAX_GT_BOXES]
    elif "bbox" in feats:
      boxes = xyxy(ex["bbox"])[None]
    else:
      boxes = None
    if boxes is not None:
      n = tf.shape(boxes)[0]
      out["gt_boxes"] = tf.pad(boxes, [[0, MAX_GT_BOXES - n], [0, 0]])
      out["gt_box_valid"] = tf.range(MAX_GT_BOXES) < n
    return out

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
  for batch in tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)):
    batch["id"] = _decode_ids(batch["id"])
    yield batch


def _decode_ids(ids: np.ndarray) -> np.ndarray:
  return np.array([i.decode() if isinstance(i, bytes) else str(i) for i in ids])


def _folder_localization_batches(
    source: FolderSource, split: str, size: int, batch_size: int, max_examples: int | None
) -> Iterator[dict[str, np.ndarray]]:
  """localization_batches of a folder: image, aspect, label and id (folders have no ground
  truth masks or boxes); unreadable files are skipped, counted and logged after the pass."""
  files = source.files(split).shard(jax.process_index(), jax.process_count())
  if max_examples is not None and max_examples >= 0:
    files = files.shard(0, 1, max_examples)
  pre = make_preprocess(source, size)
  ds = files.decoded().map(
      lambda ex: {**pre(ex), "id": ex["image/id"], "file_index": ex["file_index"]},
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
  )
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  for batch in files.track_unreadable(tfds.as_numpy(ds), f"{source.name} split {split!r}"):
    batch["id"] = _decode_ids(batch["id"])
    yield batch


# ----------------------------------------------------------------------------
# Evaluation datasets (eval_datasets.EvalDataset): the evaluation view.


def resize_center_crop(image: tf.Tensor, size: int, crop_fraction: float) -> tf.Tensor:
  """Evaluation view of one image: uint8 (size, size, 3).

  The shorter side is resized to round(size / crop_fraction) and the longer
  one in proportion (truncated, like torchvision's Resize(int)), bilinear with
  antialiasing; then the centre size x size is kept (offset (new - size) // 2).
  Grayscale becomes RGB, an alpha channel is dropped.
  """
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  elif image.shape[-1] == 4:
    image = image[..., :3]
  target = max(int(round(size / crop_fraction)), size)
  shape = tf.shape(image, out_type=tf.int64)
  h, w = shape[0], shape[1]
  short = tf.minimum(h, w)
  new_h = tf.where(h <= w, tf.constant(target, tf.int64), target * h // short)
  new_w = tf.where(h <= w, target * w // short, tf.constant(target, tf.int64))
  new_size = tf.cast(tf.stack([new_h, new_w]), tf.int32)
  resized = tf.image.resize(image, new_size, method="bilinear", antialias=True)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  out = resized[top : top + size, left : left + size]
  out = tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
  return tf.ensure_shape(out, (size, size, 3))


def coco_crop_boxes(
    bbox_yxyx: tf.Tensor,
    labels: tf.Tensor,
    min_area: float = COCO_CROP_MIN_AREA,
    margin: float = COCO_CROP_MARGIN,
) -> tuple[tf.Tensor, tf.Tensor]:
  """COCO-Crop instances of one image (docs/method.md#coco-crop).

  Keeps every box with area >= `min_area` of the image (normalised w * h;
  degenerate boxes never), grows it by margin * (w, h) on each side and clips
  it to the image. Returns (N, 4) x1, y1, x2, y2 in [0, 1] and (N,) int32
  labels, in annotation order.
  """
  bbox = tf.cast(tf.reshape(bbox_yxyx, [-1, 4]), tf.float32)
  labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
  n = tf.minimum(tf.shape(bbox)[0], tf.shape(labels)[0])  # equal in real records
  b, labels = xyxy(bbox[:n]), labels[:n]
  w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
  keep = (w > 0) & (h > 0) & (w * h >= min_area)
  b, w, h = tf.boolean_mask(b, keep), tf.boolean_mask(w, keep), tf.boolean_mask(h, keep)
  b = tf.clip_by_value(b + margin * tf.stack([-w, -h, w, h], -1), 0.0, 1.0)
  return b, tf.boolean_mask(labels, keep)


def box_pixels(box_xyxy: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  """Pixel window (top, left, h, w) covering a normalised box: rounded outwards (with a
  1e-4 pixel tolerance for float noise), inside the image, at least 1 x 1."""
  height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
  scale = tf.cast(tf.stack([width, height]), tf.float32)
  low = tf.cast(tf.floor(box_xyxy[:2] * scale + 1e-4), tf.int32)
  high = tf.cast(tf.math.ceil(box_xyxy[2:] * scale - 1e-4), tf.int32)
  x1, y1 = tf.clip_by_value(low[0], 0, width - 1), tf.clip_by_value(low[1], 0, height - 1)
  x2, y2 = tf.clip_by_value(high[0], x1 + 1, width), tf.clip_by_value(high[1], y1 + 1, height)
  return tf.stack([y1, x1, y2 - y1, x2 - x1])


def _coco_crops(
    size: int, crop_fraction: float
) -> Callable[[dict[str, Any]], dict[str, tf.Tensor]]:
  def per_image(ex: dict[str, Any]) -> dict[str, tf.Tensor]:
    image = ex["image"]
    boxes, labels = coco_crop_boxes(ex["objects"]["bbox"], ex["objects"]["label"])
    shape = tf.shape(image)

    def crop(box):
      top, left, h, w = tf.unstack(box_pixels(box, shape[0], shape[1]))
      return resize_center_crop(image[top : top + h, left : left + w], size, crop_fraction)

    crops = tf.map_fn(crop, boxes, fn_output_signature=tf.TensorSpec((size, size, 3), tf.uint8))
    return {"image": crops, "label": labels}

  return per_image


def last_skipped(ds: EvalDataset, split: str) -> tuple[str, ...] | None:
  """Files of this process's shard of `split` that the last complete `split_batches` pass
  over `ds` could not decode and skipped (len() is the count); None before any complete
  pass. Always () for TFDS datasets, whose records are validated when they are built."""
  if ds.source != "folder":
    return ()
  return ds.skipped.get(split)


def _folder_shard(ds: EvalDataset, split: str, max_examples: int | None = None) -> FolderFiles:
  """This process's share of a folder split (every process_count-th file), at most
  max_examples of them."""
  if split not in ds.files:
    raise ValueError(f"{ds.name} has no split {split!r}; it has {sorted(ds.files)}")
  return FolderFiles.from_pairs(ds.files[split]).shard(
      jax.process_index(), jax.process_count(), max_examples
  )


def split_size(
    ds: EvalDataset, split: str, *, data_dir: str | None = None, max_examples: int | None = None
) -> int | None:
  """Examples in this process's shard of `split` when known without reading it, else None.

  TFDS: the recorded count. coco_crop: None (instances are found while
  reading). Folders: the files listed, an upper bound when some cannot be
  decoded (see last_skipped).
  """
  if ds.source == "folder":
    n = len(_folder_shard(ds, split))
  elif ds.source == "coco_crop":
    return None
  else:
    builder = sources.get_builder(ds.tfds_name, data_dir or ds.data_dir)
    n = int(sources.open_process_shard(builder, split).cardinality())
    if n < 0:
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
  image uint8 (B, S, S, 3) (see resize_center_crop), label int32 (B,),
  valid int32 (B,) 1 for real examples, and with `with_ids` (TFDS datasets with an
  `image/id`, such as `scenes`) id int64 (B,); the last batch is padded with zeros,
  valid 0 and label -1. max_examples: read at most that many (files for
  folders, instances for coco_crop). Folder files that cannot be decoded are
  skipped; after the pass they are logged and kept for `last_skipped`.
  """
  limit = max_examples is not None and max_examples >= 0
  files = None
  if ds.source == "folder":
    files = _folder_shard(ds, split, max_examples)
    data = files.decoded(
        lambda ex: {
            "image": resize_center_crop(ex["image"], image_size, crop_fraction),
            "label": ex["label"],
            "file_index": ex["file_index"],
        }
    )
  else:
    builder = sources.get_builder(ds.tfds_name, data_dir or ds.data_dir)
    data = sources.open_process_shard(builder, split)
    if ds.source == "coco_crop":
      data = data.map(
          _coco_crops(image_size, crop_fraction),
          num_parallel_calls=tf.data.AUTOTUNE,
          deterministic=True,
      ).unbatch()
    else:
      data = data.map(
          lambda ex: {
              "image": resize_center_crop(ex["image"], image_size, crop_fraction),
              "label": tf.cast(ex["label"], tf.int32),
              **({"id": tf.cast(ex["image/id"], tf.int64)} if with_ids else {}),
          },
          num_parallel_calls=tf.data.AUTOTUNE,
          deterministic=True,
      )
    if limit:
      data = data.take(max_examples)
  data = data.map(lambda ex: {**ex, "valid": tf.constant(1, tf.int32)})
  data = data.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  batches = tfds.as_numpy(data)
  if files is not None:

    def remember(skipped: tuple[str, ...]) -> None:
      ds.skipped[split] = skipped

    batches = files.track_unreadable(batches, f"{ds.name} split {split!r}", on_complete=remember)
  for batch in batches:
    yield pad_batch(batch, batch_size, label_fill=-1)
