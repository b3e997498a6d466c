"""The NumPy reader: datasets held as arrays (`scenes`), read without TensorFlow.

An ArraySource is a dataset whose splits are arrays in memory or memory-mapped
`.npy` files: `scenes` (rendered once into the data dir, see scenes.py) is
one. Training, the online probe, ContraCAM and the frozen-encoder evaluation
read it here, through the same host preprocessing whether TensorFlow is
installed or not, and get the batch layouts the tf.data readers
(tf_readers.py) give for TFDS datasets and image folders:

- training: epoch e is a permutation seeded by (seed, e); process p keeps
  its contiguous slice of each global batch, so a global batch does not
  depend on the process count, and resuming skips whole batches;
- ordered reads: this process's contiguous shard of a split, in order.

The host work is a gather from the arrays plus, when the configured side
differs from the stored one, the antialiased bilinear resize tf.image.resize
does (resize), so a config reads the same pixels from either reader.

Array fields: image (N, S, S, 3) uint8, label (N,), id (N,) int, and optionally
mask (N, S, S) 0/1, boxes (N, K, 4) normalised (ymin, xmin, ymax, xmax) with
classes (N, K) (-1 where a slot holds no object).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Iterator

import numpy as np

from ocl_jax.data import scenes
from ocl_jax.data import scenes_render
from ocl_jax.data.annotations import gt_region_boxes
from ocl_jax.data.annotations import MaskIds
from ocl_jax.data.annotations import MaskLookupError
from ocl_jax.data.annotations import read_mask_png
from ocl_jax.data.annotations import RegionBoxes
from ocl_jax.data.errors import DatasetNotFoundError

MAX_GT_BOXES = 16  # localization batches pad their ground-truth boxes to this many

# ----------------------------------------------------------------------------
# The source.

_SLICE = re.compile(r"^\s*([\w-]+)\s*(?:\[\s*(-?\d*)\s*(%?)\s*:\s*(-?\d*)\s*(%?)\s*\])?\s*$")


@dataclasses.dataclass
class ArraySource:
  """A dataset held as arrays: split name -> {field: array} (see the module docstring).

  Splits may be sliced as in TFDS: 'train[:1000]', 'train[10%:]' (percent
  boundaries round to the nearest example).
  """

  SOURCE_KIND = "arrays"

  name: str
  class_names: tuple[str, ...]
  split_names: tuple[str, ...]
  load: Callable[[str], dict[str, np.ndarray]]
  FEATURES: tuple[str, ...] = ("image", "label", "image/id")
  cache: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def scenes(cls, name: str, data_dir: str | None) -> "ArraySource":
    """`scenes[/<config>]`, rendered into data_dir first if it is not there."""
    try:
      config = scenes.config_of(name)
    except ValueError as e:
      raise DatasetNotFoundError(str(e)) from e
    scenes.prepare(config, data_dir)
    return cls(
        name=name,
        class_names=scenes_render.CLASS_NAMES,
        split_names=tuple(scenes.SPLITS),
        load=lambda split: scenes.load_split(config, data_dir, split),
        FEATURES=("image", "label", "image/id", "mask", "objects/bbox", "objects/label"),
    )

  def locate(self, split: str) -> tuple[str, int, int]:
    """(base split, start, stop) of a split name, or a ValueError naming the known splits."""
    m = _SLICE.match(str(split))
    if not m or m.group(1) not in self.split_names:
      raise ValueError(
          f"dataset {self.name} has no split {split!r}; it has {list(self.split_names)} "
          "(optionally sliced, e.g. 'train[:50%]')"
      )
    base, lo, lo_pct, hi, hi_pct = m.groups()
    n = len(self.base_arrays(base)["label"])

    def bound(text, pct, default):
      if text in (None, ""):
        return default
      v = int(text)
      v = int(np.floor(n * v / 100 + 0.5)) if pct else v
      return min(max(v + n if v < 0 else v, 0), n)

    start, stop = bound(lo, lo_pct, 0), bound(hi, hi_pct, n)
    return base, start, max(start, stop)

  def base_arrays(self, base: str) -> dict[str, np.ndarray]:
    if base not in self.cache:
      self.cache[base] = self.load(base)
    return self.cache[base]

  def arrays(self, split: str) -> dict[str, np.ndarray]:
    """The fields of `split` (views, not copies)."""
    base, start, stop = self.locate(split)
    return {k: v[start:stop] for k, v in self.base_arrays(base).items()}

  def num_examples(self, split: str) -> int:
    _, start, stop = self.locate(split)
    return stop - start

  def ids(self, split: str) -> list[str]:
    """The image ids of `split` as box files and mask folders write them."""
    return [str(int(i)) for i in self.arrays(split)["id"]]


def process_shard(n: int, index: int, count: int) -> tuple[int, int]:
  """[start, stop) of process `index`'s contiguous shard of n examples (sizes differ by <= 1)."""
  base, extra = divmod(n, count)
  start = index * base + min(index, extra)
  return start, start + base + (index < extra)


# ----------------------------------------------------------------------------
# Resizing (tf.image.resize's bilinear arithmetic, half-pixel centres).


def resize_weights(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
  """(n_out, n_in) interpolation matrix of a bilinear resize along one axis.

  A triangle kernel at each output pixel's centre in input coordinates; with
  antialias, shrinking widens it by the scale (as tf.image.resize's
  scale_and_translate does), so every input pixel contributes. Rows sum to 1;
  taps outside the image are dropped and the rest renormalised, which equals
  clamping at the border for the plain bilinear kernel.
  """
  scale = n_out / n_in
  width = max(1.0 / scale, 1.0) if antialias else 1.0
  centre = (np.arange(n_out) + 0.5) / scale  # in input pixel units (edges at integers)
  taps = np.arange(n_in) + 0.5
  w = np.maximum(0.0, 1.0 - np.abs(taps[None, :] - centre[:, None]) / width)
  return (w / w.sum(1, keepdims=True)).astype(np.float32)


def resize(images: np.ndarray, height: int, width: int, antialias: bool = True) -> np.ndarray:
  """(B, H, W[, C]) -> float32 (B, height, width[, C]) bilinear; identity at the same size."""
  x = np.asarray(images, np.float32)
  h, w = x.shape[1], x.shape[2]
  if (h, w) == (height, width):
    return x
  x = np.einsum("oh,bhw...->bow...", resize_weights(h, height, antialias), x)
  return np.einsum("pw,bow...->bop...", resize_weights(w, width, antialias), x)


def to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def resize_center_crop(images: np.ndarray, size: int, crop_fraction: float) -> np.ndarray:
  """Evaluation view of a batch of equal-shape images: uint8 (B, size, size, 3).

  The shorter side is resized to round(size / crop_fraction) and the longer one in
  proportion (truncated), bilinear with antialiasing, then the centre size x size is kept
  (offset (new - size) // 2): the arithmetic of tf_readers.resize_center_crop.
  """
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
  target = max(int(round(size / crop_fraction)), size)
  h, w = images.shape[1:3]
  short = min(h, w)
  new_h, new_w = (target, target * w // short) if h <= w else (target * h // short, target)
  out = resize(images, new_h, new_w)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return to_uint8(out[:, top : top + size, left : left + size])


# ----------------------------------------------------------------------------
# Host preprocessing of one batch of rows.


def _xyxy(boxes_yxyx: np.ndarray) -> np.ndarray:
  return boxes_yxyx[..., [1, 0, 3, 2]]


def _fg_masks(
    arrays: dict[str, np.ndarray],
    rows: np.ndarray,
    source: str,
    size: int,
    mask_ids: MaskIds | None,
) -> np.ndarray:
  """BG-mixup's soft masks (B, size, size) uint8 0..255: the dataset's 0/1 `mask`, or the
  <id>.png that --config.mode=save_masks wrote, resized like tf.image.resize (bilinear)."""
  if source == "gt":
    if "mask" not in arrays:
      raise ValueError(
          "config.bg_mixup.masks='gt' (or config.saliency.coverage_masks='gt') needs "
          "a `mask` feature (scenes); for BG-mixup give a folder of ContraCAM masks "
          "written by --config.mode=save_masks instead, for SGCL set "
          "saliency.coverage_masks=''"
      )
    return to_uint8(resize(arrays["mask"][rows].astype(np.float32) * 255.0, size, size, False))
  out = np.empty((len(rows), size, size), np.uint8)
  for j, image_id in enumerate(int(i) for i in arrays["id"][rows]):
    if mask_ids is not None and str(image_id) not in mask_ids.ids:
      raise MaskLookupError(mask_ids.missing_message(str(image_id)))
    path = os.path.join(source, f"{image_id}.png")
    try:
      mask = read_mask_png(path, aspect=1.0)
    except FileNotFoundError as e:
      raise MaskLookupError(
          f"image id {image_id} has no BG-mixup mask {path} (config.bg_mixup.masks); write "
          "the masks of this dataset's training images with --config.mode=save_masks"
      ) from e
    out[j] = to_uint8(resize(mask[None], size, size, False)[0])
  return out


def example_batch(
    arrays: dict[str, np.ndarray],
    rows: np.ndarray,
    image_size: int,
    region_boxes: RegionBoxes | None = None,
    fg_masks: str | None = None,
    mask_ids: MaskIds | None = None,
) -> dict[str, np.ndarray]:
  """The training preprocessing of `rows`: image (B, S, S, 3) uint8 at image_size, aspect,
  label, and the OA-crop regions / BG-mixup masks when configured (as make_preprocess)."""
  rows = np.asarray(rows)
  image = arrays["image"][rows]
  out = {
      "image": to_uint8(resize(image, image_size, image_size)),
      "aspect": np.ones((len(rows),), np.float32),  # stored squares: W / H of the original
      "label": np.asarray(arrays["label"][rows], np.int32),
  }
  if region_boxes is not None:
    if region_boxes.path is None:
      boxes, valid = gt_region_boxes(
          _xyxy(arrays["boxes"][rows]),
          arrays["classes"][rows] >= 0,
          region_boxes.max_boxes,
          region_boxes.min_area,
          region_boxes.margin,
      )
      out.update(boxes=boxes, box_valid=valid)
    else:
      out.update(region_boxes.lookup([str(int(i)) for i in arrays["id"][rows]]))
  if fg_masks is not None:
    out["fg_mask"] = _fg_masks(arrays, rows, fg_masks, image_size, mask_ids)
  return out


# ----------------------------------------------------------------------------
# The readers.


def train_host_batches(data, epoch: int, skip_batches: int) -> Iterator[dict[str, np.ndarray]]:
  """This process's host batches of `epoch` of `data` (train_data.TrainData) from batch
  `skip_batches` on: the permutation's slots [i * G + p * b, i * G + (p + 1) * b) for
  global batch G, local batch b, process p."""
  from ocl_jax.data.train_data import epoch_seed  # the one seed rule of both readers

  source: ArraySource = data.builder
  _, offset, _ = source.locate(data.split)
  arrays = source.arrays(data.split)
  g, b, p = data.global_batch, data.local_batch, data.process_index
  order = np.random.default_rng(epoch_seed(data.seed, epoch)).permutation(data.num_examples)
  for i in range(skip_batches, data.steps_per_epoch):
    rows = order[i * g + p * b : i * g + (p + 1) * b]
    batch = example_batch(
        arrays, rows, data.image_size, data.region_boxes, data.fg_masks, data.mask_ids
    )
    if data.with_index:
      batch["index"] = (rows + offset).astype(np.int32)
    yield batch


def _shard(source: ArraySource, split: str, process_index: int, process_count: int):
  arrays = source.arrays(split)
  start, stop = process_shard(len(arrays["label"]), process_index, process_count)
  return {k: v[start:stop] for k, v in arrays.items()}


def _ordered_rows(
    arrays: dict[str, np.ndarray], batch_size: int, max_examples: int | None
) -> Iterator[np.ndarray]:
  """Row indices of consecutive batches of an ordered pass, at most max_examples in all."""
  n = len(arrays["label"])
  if max_examples is not None and max_examples >= 0:
    n = min(n, max_examples)
  for start in range(0, n, batch_size):
    yield np.arange(start, min(start + batch_size, n))


def eval_batches(
    source: ArraySource,
    split: str,
    image_size: int,
    local_batch: int,
    max_batches: int | None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """The online probe's pass: image, aspect, label and valid, padded batches of local_batch;
  every process yields the longest shard's number of batches (empty ones at the end)."""
  arrays = _shard(source, split, process_index, process_count)
  n = len(arrays["label"])
  longest = process_shard(source.num_examples(split), 0, process_count)[1]
  num_batches = -(-longest // local_batch)
  if max_batches is not None:
    num_batches = min(num_batches, max_batches)
  for i in range(num_batches):
    rows = np.arange(i * local_batch, min((i + 1) * local_batch, n))
    batch = example_batch(arrays, rows, image_size)
    batch["valid"] = np.ones((len(rows),), np.int32)
    yield pad_batch(batch, local_batch)


def localization_batches(
    source: ArraySource,
    split: str,
    image_size: int,
    batch_size: int,
    max_examples: int | None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """ContraCAM's pass: image, aspect, label, id (str), and the ground truth the arrays have:
  gt_mask (B, S, S) float32 {0, 1} (nearest resize), gt_boxes (B, 16, 4) x1, y1, x2, y2 with
  gt_box_valid; the last batch is smaller."""
  arrays = _shard(source, split, process_index, process_count)
  for rows in _ordered_rows(arrays, batch_size, max_examples):
    batch = example_batch(arrays, rows, image_size)
    batch["id"] = np.array([str(int(i)) for i in arrays["id"][rows]])
    if "mask" in arrays:
      mask = arrays["mask"][rows]
      s = mask.shape[1]
      # nearest, with tf.image.resize's half-pixel centres
      pick = np.minimum(((np.arange(image_size) + 0.5) * s / image_size).astype(np.int64), s - 1)
      batch["gt_mask"] = (mask[:, pick][:, :, pick] > 0).astype(np.float32)
    if "boxes" in arrays:
      # Every object, as it is: the OA-crop region rule with no area floor and no margin.
      boxes, valid = gt_region_boxes(
          _xyxy(arrays["boxes"][rows]), arrays["classes"][rows] >= 0, MAX_GT_BOXES, -np.inf, 0.0
      )
      batch.update(gt_boxes=boxes, gt_box_valid=valid)
    yield batch


def split_batches(
    source: ArraySource,
    split: str,
    *,
    image_size: int,
    crop_fraction: float,
    batch_size: int,
    max_examples: int | None,
    with_ids: bool,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """The frozen-encoder evaluation view (resize_center_crop): image, label, valid and with
  `with_ids` id int64; batches of batch_size, the last one padded (label -1, valid 0)."""
  arrays = _shard(source, split, process_index, process_count)
  for rows in _ordered_rows(arrays, batch_size, max_examples):
    batch = {
        "image": resize_center_crop(arrays["image"][rows], image_size, crop_fraction),
        "label": np.asarray(arrays["label"][rows], np.int32),
    }
    if with_ids:
      batch["id"] = np.asarray(arrays["id"][rows], np.int64)
    batch["valid"] = np.ones((len(rows),), np.int32)
    yield pad_batch(batch, batch_size, label_fill=-1)


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
