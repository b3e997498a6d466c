"""Per-image annotations the training views need: OA-crop boxes and BG-mixup masks.

Box files and mask folders written by ContraCAM (--config.mode=save_boxes /
save_masks) are keyed by the image id. This module holds them as NumPy tables
and reads them without TensorFlow: the array reader (`scenes`) looks boxes and
masks up here, and the tf.data readers (preprocess.py) build their in-graph
lookups from the same tables. A missing id fails with a BoxLookupError /
MaskLookupError naming the image and the file. Training checks every id before
its first step (prechecks.check_coverage); the lookups keep their own checks for
streams used without it.
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging
import ml_collections
import numpy as np
from PIL import Image

from ocl_jax.data import sources
from ocl_jax.discovery import localization

# ----------------------------------------------------------------------------
# Errors.

MISSING_ID_MARK = "is not in box file"
MISSING_MASK_MARK = "has no BG-mixup mask"
MASK_MODES = ("L", "1", "I", "I;16", "P")  # PIL modes of a one-channel mask PNG


class BoxLookupError(KeyError):
  """A training image has no line in the OA-crop box file (and errors are not tolerated)."""

  def __str__(self) -> str:
    return str(self.args[0])


class MaskLookupError(FileNotFoundError):
  """A training image has no <image id>.png in the BG-mixup mask folder."""


class MaskFileError(ValueError):
  """A BG-mixup mask PNG that exists but cannot be a mask of its image (damaged, wrong size)."""


def missing_box_message(image_id: str, path: str) -> str:
  return (
      f"image id {image_id} {MISSING_ID_MARK} {path} (set "
      "--config.object_aware.tolerate_box_errors=True to crop such images from the whole image)"
  )


# ----------------------------------------------------------------------------
# OA-crop boxes (docs/method.md#oa-crop).


def gt_region_boxes(
    boxes_xyxy: np.ndarray, present: np.ndarray, max_boxes: int, min_area: float, margin: float
) -> tuple[np.ndarray, np.ndarray]:
  """Ground-truth OA-crop regions of a batch: boxes of area > min_area, grown by
  margin*(w, h) per side.

  boxes_xyxy (B, N, 4) and present (B, N) (the image's objects, in annotation
  order). Returns the first `max_boxes` kept boxes per image, clipped to the
  image, as (B, K, 4) x1, y1, x2, y2 zero-padded, and (B, K) validity.
  """
  b = np.asarray(boxes_xyxy, np.float32)
  w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
  keep = np.asarray(present, bool) & (w * h > min_area)
  grow = np.float32(margin) * np.stack([-w, -h, w, h], -1)
  grown = np.clip(b + grow, 0.0, 1.0)
  out = np.zeros((b.shape[0], max_boxes, 4), np.float32)
  count = np.zeros((b.shape[0],), np.int64)
  for i in range(b.shape[0]):
    kept = grown[i][keep[i]][:max_boxes]
    out[i, : len(kept)] = kept
    count[i] = len(kept)
  return out, np.arange(max_boxes)[None] < count[:, None]


@dataclasses.dataclass
class RegionBoxes:
  """Where each training image's OA-crop boxes come from: 'gt' or a box file.

  A box file is read once on the host into a padded (N+1, K, 4) table plus
  counts, with a row per id; row N is "no boxes" (the whole image), used for ids
  the file lacks when errors are tolerated.
  """

  max_boxes: int
  min_area: float = 0.0
  margin: float = 0.0
  path: str | None = None  # None: ground truth
  tolerate_errors: bool = False
  feats: object = None  # the dataset's features, for the id (tf.data readers)
  ids: tuple[str, ...] = ()  # the box file's ids, in table order
  boxes: np.ndarray | None = None  # (len(ids) + 1, K, 4) x1, y1, x2, y2
  counts: np.ndarray | None = None  # (len(ids) + 1,)
  row_of: dict[str, int] = dataclasses.field(default_factory=dict, repr=False)
  # The tf.data readers' in-graph lookup, built once per object (not per epoch) by preprocess.
  graph_lookup: object = dataclasses.field(default=None, repr=False, compare=False)

  def __post_init__(self):
    self.row_of = {image_id: row for row, image_id in enumerate(self.ids)}

  @classmethod
  def from_box_file(
      cls, path: str, max_boxes: int, tolerate_errors: bool, feats: object = None
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
    ids = tuple(table)
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
          "Box file %s: %d images have more than max_boxes=%d boxes; the first %d are used",
          path,
          truncated,
          max_boxes,
          max_boxes,
      )
    logging.info("OA-crop boxes of %d images from %s", len(ids), path)
    return cls(
        max_boxes=max_boxes,
        path=path,
        tolerate_errors=tolerate_errors,
        feats=feats,
        ids=ids,
        boxes=boxes,
        counts=counts,
    )

  @property
  def id_set(self) -> frozenset[str]:
    return frozenset(self.ids)

  def rows(self, image_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(table rows, missing) of `image_ids`; a missing id raises unless errors are tolerated."""
    rows = np.array([self.row_of.get(i, -1) for i in image_ids], np.int64)
    missing = rows < 0
    if missing.any() and not self.tolerate_errors:
      raise BoxLookupError(missing_box_message(image_ids[int(missing.argmax())], self.path))
    return np.where(missing, len(self.ids), rows), missing

  def lookup(self, image_ids: list[str]) -> dict[str, np.ndarray]:
    """The batch's boxes (B, K, 4), box_valid (B, K) and box_missing (B,) from the box file."""
    rows, missing = self.rows(image_ids)
    return {
        "boxes": self.boxes[rows],
        "box_valid": np.arange(self.max_boxes)[None] < self.counts[rows][:, None],
        "box_missing": missing,
    }


def create_region_boxes(
    config: ml_collections.ConfigDict, builder: sources.Builder
) -> RegionBoxes | None:
  """The OA-crop box source of `config.object_aware`, or None when OA-crop is off."""
  oa = config.get("object_aware")
  if oa is None or not oa.crop:
    return None
  name = sources.full_name(builder)
  if oa.boxes == "gt":
    if not sources.has_feature(builder, "objects/bbox"):
      hint = (
          "give a box file (--config.mode=save_boxes)"
          if sources.kind(builder) == "folder"
          else "give a box file instead"
      )
      raise ValueError(
          f"config.object_aware.boxes='gt' needs objects/bbox, which dataset {name} does "
          f"not have; {hint}"
      )
    return RegionBoxes(max_boxes=oa.max_boxes, min_area=oa.gt_min_area, margin=oa.gt_margin)
  if not (
      sources.has_feature(builder, "image/id") or sources.has_feature(builder, "image/filename")
  ):
    raise ValueError(
        f"config.object_aware.boxes is a box file, but dataset {name} has neither image/id "
        "nor image/filename to match"
    )
  return RegionBoxes.from_box_file(
      oa.boxes, oa.max_boxes, oa.tolerate_box_errors, sources.features(builder)
  )


# ----------------------------------------------------------------------------
# BG-mixup foreground masks (docs/method.md#bg-mixup).


@dataclasses.dataclass
class MaskIds:
  """The image ids a BG-mixup mask folder has a <id>.png for."""

  folder: str
  count: int
  ids: frozenset[str] = frozenset()
  # The tf.data readers' in-graph check, built once per object (not per epoch) by preprocess.
  graph_check: object = dataclasses.field(default=None, repr=False, compare=False)

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
    return cls(folder=folder, count=len(ids), ids=frozenset(ids))

  def missing_message(self, image_id: str) -> str:
    return (
        f"image id {image_id} {MISSING_MASK_MARK} {image_id}.png in {self.folder} "
        f"(config.bg_mixup.masks, {self.count} masks); write the masks of this dataset's "
        "training images with --config.mode=save_masks"
    )


def read_mask_png(path: str, aspect: float | None = None) -> np.ndarray:
  """A saved BG-mixup mask as float32 (H, W) in 0..255; MaskFileError naming the file when it
  is not a whole one-channel PNG, or is neither square (what save_masks writes) nor of the
  image's aspect ratio W / H (then it cannot belong to the image)."""
  try:
    with Image.open(path) as im:
      if im.format != "PNG" or im.mode not in MASK_MODES:
        raise MaskFileError(
            f"BG-mixup mask {path} is a {im.format} image in mode {im.mode}, not a one-channel "
            "PNG (config.bg_mixup.masks: write it again with --config.mode=save_masks)"
        )
      mask = np.asarray(im.convert("L"), np.float32)
  except FileNotFoundError:
    raise
  except MaskFileError:
    raise
  except (OSError, SyntaxError, ValueError) as e:
    raise MaskFileError(
        f"BG-mixup mask {path} cannot be decoded ({e}); write it again with "
        "--config.mode=save_masks"
    ) from e
  if aspect is not None:
    h, w = mask.shape
    if abs(w / h - 1.0) >= 0.02 and abs(w / h / aspect - 1.0) >= 0.02:
      raise MaskFileError(
          f"BG-mixup mask {path} has shape {(h, w)}, which is neither square nor of the "
          f"image's aspect {aspect:.3f} (config.bg_mixup.masks: a mask folder of another "
          "dataset?)"
      )
  return mask
