"""Per-image annotations the training views need: OA-crop boxes and BG-mixup masks.

Both are looked up inside tf.data by the image id (example_id): box files and
mask folders written by ContraCAM (--config.mode=save_boxes / save_masks) are
keyed by it, and a missing id fails with a BoxLookupError / MaskLookupError
naming the image and the file instead of an opaque tf.data assertion. Training
checks every id before its first step (prechecks.check_coverage); the in-graph
checks stay for streams used without it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ocl_jax.data.folders import FolderSource
from ocl_jax.discovery import localization


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


# ----------------------------------------------------------------------------
# OA-crop boxes (docs/method.md#oa-crop).

_MISSING_ID_MARK = "is not in box file"


class BoxLookupError(KeyError):
  """A training image has no line in the OA-crop box file (and errors are not tolerated)."""

  def __str__(self) -> str:
    return str(self.args[0])


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


@dataclasses.dataclass
class RegionBoxes:
  """Where each training image's OA-crop boxes come from: 'gt' or a box file.

  A box file is read once on the host and turned into a padded (N+1, K, 4)
  constant plus counts, indexed through a string -> row hash table, so the
  lookup runs inside tf.data. Row N is "no boxes" (the whole image), used for
  ids the file lacks when errors are tolerated.
  """

  max_boxes: int
  min_area: float = 0.0
  margin: float = 0.0
  path: str | None = None  # None: ground truth
  tolerate_errors: bool = False
  feats: Any = None
  ids: frozenset[str] = frozenset()  # the box file's ids, for the pre-check (prechecks)
  _table: Any = None
  _boxes: Any = None
  _counts: Any = None

  @classmethod
  def from_box_file(
      cls, path: str, max_boxes: int, tolerate_errors: bool, feats: Any
  ) -> "RegionBoxes":
    table = localization.read_box_file(path, tolerate_errors=tolerate_errors)
    if table.errors:
      logging.warning(
          "Box file %s: %d malformed lines skipped (their images use the whole "
          "image); first: %s",
          path,
          len(table.errors),
          table.errors[0],
      )
    ids = list(table)
    boxes = np.zeros((len(ids) + 1, max_boxes, 4), np.float32)
    counts = np.zeros((len(ids) + 1,), np.int32)
    truncated = 0
    for row, image_id in enumerate(ids):
      b = np.asarray(table[image_id], np.float32).reshape(-1, 4)
      truncated += len(b) > max_boxes
      b = b[:max_boxes]
      boxes[row, : len(b)] = b
      counts[row] = len(b)
    if truncated:
      logging.info(
          "Box file %s: %d images have more than max_boxes=%d boxes; the first %d " "are used",
          path,
          truncated,
          max_boxes,
          max_boxes,
      )
    logging.info("OA-crop boxes of %d images from %s", len(ids), path)
    lookup = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(ids, tf.string) if ids else tf.zeros((0,), tf.string),
            tf.range(len(ids), dtype=tf.int64),
        ),
        default_value=-1,
    )
    return cls(
        max_boxes=max_boxes,
        path=path,
        tolerate_errors=tolerate_errors,
        feats=feats,
        ids=frozenset(ids),
        _table=lookup,
        _boxes=tf.constant(boxes),
        _counts=tf.constant(counts),
    )

  def __call__(self, example: dict[str, Any]) -> dict[str, tf.Tensor]:
    if self.path is None:
      boxes, valid = gt_region_boxes(
          example["objects"]["bbox"], self.max_boxes, self.min_area, self.margin
      )
      return {"boxes": boxes, "box_valid": valid}
    image_id = example_id(example, self.feats)
    row = self._table.lookup(image_id)
    missing = row < 0
    if not self.tolerate_errors:
      message = tf.strings.join(
          [
              "image id ",
              image_id,
              f" {_MISSING_ID_MARK} {self.path} (set "
              "--config.object_aware.tolerate_box_errors=True to crop such "
              "images from the whole image)",
          ]
      )
      check = tf.debugging.Assert(tf.logical_not(missing), [message])
      with tf.control_dependencies([check]):
        row = tf.identity(row)
    row = tf.where(missing, tf.cast(tf.shape(self._counts)[0] - 1, tf.int64), row)
    count = tf.gather(self._counts, row)
    return {
        "boxes": tf.gather(self._boxes, row),
        "box_valid": tf.range(self.max_boxes) < count,
        "box_missing": missing,
    }


def create_region_boxes(
    config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder | FolderSource
) -> RegionBoxes | None:
  """The OA-crop box source of `config.object_aware`, or None when OA-crop is off."""
  oa = config.get("object_aware")
  if oa is None or not oa.crop:
    return None
  if isinstance(builder, FolderSource):
    if oa.boxes == "gt":
      raise ValueError(
          f"config.object_aware.boxes='gt' needs objects/bbox; folder dataset "
          f"{builder.name} has none: give a box file (--config.mode=save_boxes)"
      )
    return RegionBoxes.from_box_file(
        oa.boxes, oa.max_boxes, oa.tolerate_box_errors, FolderSource.FEATURES
    )
  feats = builder.info.features
  if oa.boxes == "gt":
    if not ("objects" in feats and "bbox" in feats["objects"].feature):
      raise ValueError(
          f"config.object_aware.boxes='gt' needs objects/bbox, which dataset "
          f"{builder.info.full_name} does not have; give a box file instead"
      )
    return RegionBoxes(max_boxes=oa.max_boxes, min_area=oa.gt_min_area, margin=oa.gt_margin)
  if "image/id" not in feats and "image/filename" not in feats:
    raise ValueError(
        f"config.object_aware.boxes is a box file, but dataset "
        f"{builder.info.full_name} has neither image/id nor image/filename to match"
    )
  return RegionBoxes.from_box_file(oa.boxes, oa.max_boxes, oa.tolerate_box_errors, feats)


# ----------------------------------------------------------------------------
# BG-mixup foreground masks (docs/method.md#bg-mixup).

_MISSING_MASK_MARK = "has no BG-mixup mask"


class MaskLookupError(FileNotFoundError):
  """A training image has no <image id>.png in the BG-mixup mask folder."""


@dataclasses.dataclass
class MaskIds:
  """The image ids a BG-mixup mask folder has a <id>.png for, as an in-graph lookup table."""

  folder: str
  count: int
  ids: frozenset[str] = frozenset()  # for the pre-check (prechecks)
  _table: Any = None

  @classmethod
  def from_folder(cls, folder: str) -> "MaskIds":
    if not os.path.isdir(folder):
      raise FileNotFoundError(
          f"config.bg_mixup.masks={folder!r} is not a folder of <image id>.png "
          "masks (write one with --config.mode=save_masks)"
      )
    ids = sorted(
        e.name[: -len(".png")]
        for e in os.scandir(folder)
        if e.is_file() and e.name.endswith(".png") and not e.name.startswith(".")
    )
    keys = tf.constant(ids, tf.string) if ids else tf.zeros((0,), tf.string)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(keys, tf.range(len(ids), dtype=tf.int64)),
        default_value=-1,
    )
    return cls(folder=folder, count=len(ids), ids=frozenset(ids), _table=table)

  def check(self, image_id: tf.Tensor) -> tf.Operation:
    message = tf.strings.join(
        [
            "image id ",
            image_id,
            f" {_MISSING_MASK_MARK} ",
            image_id,
            f".png in {self.folder} (config.bg_mixup.masks, {self.count} "
            "masks); write the masks of this dataset's training images with "
            "--config.mode=save_masks",
        ]
    )
    return tf.debugging.Assert(self._table.lookup(image_id) >= 0, [message])


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
    checks = [mask_ids.check(image_id)] if mask_ids is not None else []
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
                (_MISSING_ID_MARK, BoxLookupError),
                (_MISSING_MASK_MARK, MaskLookupError),
            )
            if mark in e.message
        ),
        None,
    )
    if error is None:
      raise
    text = e.message.split("[", 1)[-1].split("]")[0] if "[" in e.message else e.message
    raise error(text) from e
