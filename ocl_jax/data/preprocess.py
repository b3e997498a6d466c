"""Decode-side preprocessing shared by the training and evaluation readers.

Images are only decoded and resized to a fixed square on the host; every
random augmentation runs on device inside the train step. The original
aspect ratio travels with each image, so on-device RandomResizedCrop samples
its ratio in real pixel units as torchvision does. Training and evaluation
batches go through the same make_preprocess, so they see identical pixels.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ocl_jax.data import sources
from ocl_jax.data.annotations import BoxLookupError
from ocl_jax.data.annotations import MaskIds
from ocl_jax.data.annotations import MaskLookupError
from ocl_jax.data.annotations import MISSING_ID_MARK
from ocl_jax.data.annotations import MISSING_MASK_MARK
from ocl_jax.data.annotations import RegionBoxes


def _image_label(example: dict[str, Any], has_label: bool, has_objects: bool) -> tf.Tensor:
  """The image label, or for object datasets (COCO) the class of its largest box; -1 if none."""
  if has_label:
    return tf.cast(example["label"], tf.int32)
  if has_objects:
    bbox = example["objects"]["bbox"]
    labels = tf.cast(example["objects"]["label"], tf.int32)
    n = tf.minimum(tf.shape(bbox)[0], tf.shape(labels)[0])  # equal in valid records
    bbox, labels = bbox[:n], labels[:n]
    area = (bbox[:, 2] - bbox[:, 0]) * (bbox[:, 3] - bbox[:, 1])
    return tf.cond(
        n > 0, lambda: tf.gather(labels, tf.argmax(area)), lambda: tf.constant(-1, tf.int32)
    )
  return tf.constant(-1, tf.int32)


def resize_to_square(image: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(H, W, 1 or 3) image -> ((size, size, 3) uint8, its original aspect W / H, float32).

  The one host resize of every batch: bilinear, antialiased when shrinking. The
  square loses the shape, so the aspect goes along for the crops drawn on device.
  """
  image = tf.convert_to_tensor(image)
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  shape = tf.shape(image)
  aspect = tf.cast(shape[1], tf.float32) / tf.cast(shape[0], tf.float32)
  resized = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8), aspect


def make_preprocess(
    builder: sources.Builder,
    image_size: int,
    region_boxes: RegionBoxes | None = None,
    fg_masks: str | None = None,
    mask_ids: MaskIds | None = None,
) -> Callable[[dict[str, Any]], dict[str, tf.Tensor]]:
  """Decode-side preprocessing: fixed-size uint8 image, aspect, label.

  With `region_boxes` (OA-crop) each example also carries its candidate crop
  regions: boxes (K, 4), box_valid (K,) and, for box files, box_missing.
  With `fg_masks` (BG-mixup: 'gt' or a folder of <id>.png) it carries fg_mask
  (S, S) uint8 0..255, the soft foreground mask resized like the image;
  `mask_ids` (the ids that folder has) turns a missing mask into a clear error.
  For a FolderSource the examples are its decoded records (see folders.FolderFiles).
  """
  feats = sources.features(builder)
  # Lookup tables are built here, eagerly, once per object: inside the traced map function
  # they would belong to that epoch's graph alone.
  boxes_of = None if region_boxes is None else region_boxes_fn(region_boxes)
  if mask_ids is not None:
    mask_check_fn(mask_ids)
  if sources.kind(builder) == "folder":
    has_label, has_objects = True, False
  else:
    has_label = "label" in feats and isinstance(feats["label"], tfds.features.ClassLabel)
    has_objects = "objects" in feats and "bbox" in feats["objects"].feature

  def preprocess(example: dict[str, Any]) -> dict[str, tf.Tensor]:
    image, aspect = resize_to_square(example["image"], image_size)
    out = {"image": image, "aspect": aspect, "label": _image_label(example, has_label, has_objects)}
    if region_boxes is not None:
      out.update(boxes_of(example))
    if fg_masks is not None:
      out["fg_mask"] = foreground_mask(example, feats, fg_masks, image_size, mask_ids, aspect)
    return out

  return preprocess


# ----------------------------------------------------------------------------
# Annotations in the graph: ids, OA-crop boxes and BG-mixup masks (tables from annotations.py).


def xyxy(bbox_yxyx: tf.Tensor) -> tf.Tensor:
  """TFDS BBoxFeature (ymin, xmin, ymax, xmax) -> (x1, y1, x2, y2) of docs/method.md#conventions."""
  return tf.stack([bbox_yxyx[..., 1], bbox_yxyx[..., 0], bbox_yxyx[..., 3], bbox_yxyx[..., 2]], -1)


def example_id(example: dict[str, Any], feats: Any) -> tf.Tensor:
  """The id box files use: `image/id` as a decimal string (folders: their string id, see
  folders.folder_image_id), else `image/filename`."""
  if "image/id" in feats:
    image_id = example["image/id"]
    return image_id if image_id.dtype == tf.string else tf.strings.as_string(image_id)
  return example["image/filename"]


def gt_region_boxes(
    bbox_yxyx: tf.Tensor, max_boxes: int, min_area: float, margin: float
) -> tuple[tf.Tensor, tf.Tensor]:
  """Ground-truth OA-crop regions: boxes of area > min_area, expanded by margin*(w, h) per side.

  Returns the first `max_boxes` of them, clipped to the image, as (K, 4)
  x1, y1, x2, y2 zero-padded, and (K,) validity.
  """
  b = xyxy(tf.cast(tf.reshape(bbox_yxyx, [-1, 4]), tf.float32))
  w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
  keep = w * h > min_area
  b, w, h = tf.boolean_mask(b, keep), tf.boolean_mask(w, keep), tf.boolean_mask(h, keep)
  grow = margin * tf.stack([-w, -h, w, h], -1)
  b = tf.clip_by_value(b + grow, 0.0, 1.0)[:max_boxes]
  n = tf.shape(b)[0]
  return tf.pad(b, [[0, max_boxes - n], [0, 0]]), tf.range(max_boxes) < n


def region_boxes_fn(rb: RegionBoxes) -> Callable[[dict[str, Any]], dict[str, tf.Tensor]]:
  """example -> its OA-crop regions: boxes (K, 4), box_valid (K,) and, for box files,
  box_missing; the box file's table becomes a string -> row hash table in the graph, built
  on the first call and kept on `rb` (every epoch's pipeline uses the same one)."""
  if rb.graph_lookup is None:
    rb.graph_lookup = _build_region_boxes_fn(rb)
  return rb.graph_lookup


def _build_region_boxes_fn(rb: RegionBoxes) -> Callable[[dict[str, Any]], dict[str, tf.Tensor]]:
  if rb.path is None:

    def gt(example):
      boxes, valid = gt_region_boxes(
          example["objects"]["bbox"], rb.max_boxes, rb.min_area, rb.margin
      )
      return {"boxes": boxes, "box_valid": valid}

    return gt
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(
          tf.constant(rb.ids, tf.string) if rb.ids else tf.zeros((0,), tf.string),
          tf.range(len(rb.ids), dtype=tf.int64),
      ),
      default_value=-1,
  )
  all_boxes, counts = tf.constant(rb.boxes), tf.constant(rb.counts)

  def lookup(example):
    image_id = example_id(example, rb.feats)
    row = table.lookup(image_id)
    missing = row < 0
    if not rb.tolerate_errors:
      message = tf.strings.join(
          [
              "image id ",
              image_id,
              f" {MISSING_ID_MARK} {rb.path} (set "
              "--config.object_aware.tolerate_box_errors=True to crop such images from the whole "
              "image)",
          ]
      )
      check = tf.debugging.Assert(tf.logical_not(missing), [message])
      with tf.control_dependencies([check]):
        row = tf.identity(row)
    row = tf.where(missing, tf.cast(tf.shape(counts)[0] - 1, tf.int64), row)
    count = tf.gather(counts, row)
    return {
        "boxes": tf.gather(all_boxes, row),
        "box_valid": tf.range(rb.max_boxes) < count,
        "box_missing": missing,
    }

  return lookup


def mask_check_fn(mask_ids: MaskIds) -> Callable[[tf.Tensor], tf.Operation]:
  """image id -> an assertion that the mask folder has <id>.png (a clear message if not);
  its table is built on the first call and kept on `mask_ids`."""
  if mask_ids.graph_check is None:
    mask_ids.graph_check = _build_mask_check_fn(mask_ids)
  return mask_ids.graph_check


def _build_mask_check_fn(mask_ids: MaskIds) -> Callable[[tf.Tensor], tf.Operation]:
  ids = sorted(mask_ids.ids)
  keys = tf.constant(ids, tf.string) if ids else tf.zeros((0,), tf.string)
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(keys, tf.range(len(ids), dtype=tf.int64)),
      default_value=-1,
  )

  def check(image_id):
    message = tf.strings.join(
        [
            "image id ",
            image_id,
            f" {MISSING_MASK_MARK} ",
            image_id,
            f".png in {mask_ids.folder} (config.bg_mixup.masks, {mask_ids.count} "
            "masks); write the masks of this dataset's training images with "
            "--config.mode=save_masks",
        ]
    )
    return tf.debugging.Assert(table.lookup(image_id) >= 0, [message])

  return check


def foreground_mask(
    example: dict[str, Any],
    feats: Any,
    source: str,
    size: int,
    mask_ids: MaskIds | None = None,
    aspect: tf.Tensor | None = None,
) -> tf.Tensor:
  """BG-mixup's soft mask: the dataset's 0/1 `mask`, or <source>/<image id>.png (save_masks).

  A mask covers the whole image, so it is resized to the square like the image. A mask PNG
  that is neither square (what save_masks writes: the resized image) nor of the image's own
  aspect ratio cannot belong to the image: an InvalidArgumentError names the file.
  """
  if source == "gt":
    if "mask" not in feats:
      raise ValueError(
          "config.bg_mixup.masks='gt' (or config.saliency.coverage_masks='gt') needs "
          "a `mask` feature (scenes); for BG-mixup give a folder of ContraCAM masks "
          "written by --config.mode=save_masks instead, for SGCL set "
          "saliency.coverage_masks=''"
      )
    mask = tf.cast(example["mask"], tf.float32) * 255.0
  else:
    image_id = example_id(example, feats)
    path = tf.strings.join([source.rstrip("/"), "/", image_id, ".png"])
    checks = [mask_check_fn(mask_ids)(image_id)] if mask_ids is not None else []
    with tf.control_dependencies(checks):
      path = tf.identity(path)
    mask = tf.cast(tf.io.decode_png(tf.io.read_file(path), channels=1), tf.float32)
    if aspect is not None:
      hw = tf.cast(tf.shape(mask)[:2], tf.float32)
      mask_aspect = hw[1] / hw[0]
      fits = (tf.abs(mask_aspect - 1.0) < 0.02) | (tf.abs(mask_aspect / aspect - 1.0) < 0.02)
      check = tf.debugging.Assert(
          fits,
          [
              "BG-mixup mask",
              path,
              "has shape",
              tf.shape(mask)[:2],
              "which is neither square nor of the image's aspect",
              aspect,
              "(config.bg_mixup.masks: a mask folder of another dataset?)",
          ],
      )
      with tf.control_dependencies([check]):
        mask = tf.identity(mask)
  mask = tf.image.resize(mask, (size, size), method="bilinear")[..., 0]
  return tf.cast(tf.clip_by_value(tf.round(mask), 0, 255), tf.uint8)


def raise_lookup_errors(
    batches: Iterator[dict[str, np.ndarray]],
) -> Iterator[dict[str, np.ndarray]]:
  """Turn the tf.data assertion of a missing box-file id into a BoxLookupError, and that of
  a missing BG-mixup mask into a MaskLookupError."""
  try:
    yield from batches
  except tf.errors.InvalidArgumentError as e:
    error = next(
        (
            cls
            for mark, cls in (
                (MISSING_ID_MARK, BoxLookupError),
                (MISSING_MASK_MARK, MaskLookupError),
            )
            if mark in e.message
        ),
        None,
    )
    if error is None:
      raise
    text = e.message.split("[", 1)[-1].split("]")[0] if "[" in e.message else e.message
    raise error(text) from e
