"""Checks of a run's inputs before its first step, so a bad input fails in seconds, not hours in.

Inside tf.data a training image without a box-file line or a mask PNG is only found when
that image is streamed (possibly hours into a run, or on resume), a missing eval split at
the first evaluation, and an unwritable workdir after the work it was to hold is done.
These functions look at all of that up front: one pass over the training split's ids (no
image is decoded), every mask PNG decoded once (a PNG damaged in its middle would otherwise
stop training at the step that reads it, at every resume), a listing of the eval split and a
file written and removed in each output folder.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import tempfile
import time

from absl import logging
import ml_collections
from PIL import Image

from ocl_jax.data import sources
from ocl_jax.data.annotations import BoxLookupError
from ocl_jax.data.annotations import MaskFileError
from ocl_jax.data.annotations import MASK_MODES
from ocl_jax.data.annotations import MaskLookupError
from ocl_jax.data.errors import DatasetNotFoundError
from ocl_jax.data.train_data import TrainData

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC: the last bytes of a whole PNG
FIRST = 5  # ids / files named in a message


class NotWritableError(PermissionError):
  """An output folder cannot be created or written to."""


def _first(items: list[str]) -> str:
  more = f", ... ({len(items) - FIRST} more)" if len(items) > FIRST else ""
  return ", ".join(items[:FIRST]) + more


def check_writable(folder: str, what: str) -> None:
  """Create `folder` if needed and write (then remove) a file in it; NotWritableError if not.

  A real write, not os.access: it also catches read-only mounts, ACLs and full disks.
  """
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".write_check.", dir=folder)
    os.close(fd)
    os.unlink(tmp)
  except OSError as e:
    raise NotWritableError(
        f"{what} {folder} is not writable ({type(e).__name__}: {e.strerror or e}); choose "
        "another folder or fix its permissions"
    ) from e


def training_ids(data: TrainData) -> list[str]:
  """The ids (box files, mask folders) of every training example, read without the images."""
  if data.files is not None:
    return list(data.files.ids)
  if sources.kind(data.builder) == "arrays":
    return data.builder.ids(data.split)
  from ocl_jax.data import tf_readers  # TensorFlow only for TFDS datasets

  return tf_readers.training_ids(data)


def _needed(data: TrainData, missing: list[str]) -> list[str]:
  """`missing` less the folder images that cannot be decoded: training replaces those, and
  ContraCAM skips them, so its box files and mask folders never have them."""
  if data.files is None or not missing:
    return missing
  from ocl_jax.data import tf_readers  # folders are decoded by tf.data

  path_of = dict(zip(data.files.ids, data.files.paths))
  return [image_id for image_id in missing if tf_readers.decodable(path_of[image_id])]


def _incomplete_png(path: str) -> str:
  """'' for a file that starts and ends like a whole PNG, else what is wrong with it."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(len(PNG_SIGNATURE))
      f.seek(max(0, size - 64))
      tail = f.read()
  except OSError as e:
    return f"{path} (unreadable: {e.strerror or e})"
  if size == 0:
    return f"{path} (empty)"
  if head != PNG_SIGNATURE:
    return f"{path} (not a PNG, {size} bytes)"
  if PNG_END not in tail:
    return f"{path} (truncated, {size} bytes)"
  return ""


def _mask_problem(path: str, side: int = 0) -> str:
  """'' for a mask PNG that decodes whole to one channel (and, with `side`, is the side x side
  square save_masks writes), else what is wrong with it."""
  problem = _incomplete_png(path)
  if problem:
    return problem
  try:
    with Image.open(path) as image:
      if image.mode not in MASK_MODES:
        return f"{path} ({image.mode} image, not one channel)"
      image.load()  # decodes every row: damage inside the data shows here
      w, h = image.size
      if side and (w, h) != (side, side):
        return f"{path} ({w}x{h}: not the {side}x{side} that save_masks writes)"
  except (OSError, SyntaxError, ValueError) as e:
    return f"{path} (damaged: {e})"
  return ""


def check_mask_files(folder: str, ids: list[str], side: int = 0) -> None:
  """MaskFileError naming the <id>.png of `ids` in `folder` that are empty, truncated,
  damaged, not one-channel or (with `side`: datasets of square images such as `scenes`, whose
  masks save_masks writes at dataset.image_size) of another size. Other datasets' masks may
  also have their image's own size, checked when streamed."""
  paths = [os.path.join(folder, f"{i}.png") for i in ids]
  check = functools.partial(_mask_problem, side=side)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    bad = [p for p in pool.map(check, paths, chunksize=256) if p]
  if bad:
    raise MaskFileError(
        f"{len(bad)} of the {len(paths)} BG-mixup mask PNGs of the training images in "
        f"{folder} (config.bg_mixup.masks) are not whole one-channel PNG masks: "
        f"{_first(bad)}; write them again with --config.mode=save_masks"
    )


def check_coverage(config: ml_collections.ConfigDict, data: TrainData) -> None:
  """Every training id has a box in the OA-crop box file and a whole mask PNG in the BG-mixup
  mask folder (whichever are configured); missing boxes only warn under tolerate_box_errors."""
  boxes = data.region_boxes if data.region_boxes and data.region_boxes.path else None
  masks = data.mask_ids
  if boxes is None and masks is None:
    return
  start = time.perf_counter()
  ids = training_ids(data)
  what = f"{config.dataset.name} split {config.dataset.train_split!r}"
  if boxes is not None:
    missing = _needed(data, [i for i in ids if i not in boxes.id_set])
    if missing and not boxes.tolerate_errors:
      raise BoxLookupError(
          f"{len(missing)} of the {len(ids)} training images of {what} are not in box file "
          f"{boxes.path} (config.object_aware.boxes); first ids: {_first(missing)}. Write the "
          "boxes of this split with --config.mode=save_boxes, or set "
          "--config.object_aware.tolerate_box_errors=True to crop them from the whole image"
      )
    if missing:
      logging.warning(
          "%d of the %d training images of %s are not in box file %s; they are cropped from "
          "the whole image (object_aware.tolerate_box_errors); first ids: %s",
          len(missing),
          len(ids),
          what,
          boxes.path,
          _first(missing),
      )
  if masks is not None:
    missing = _needed(data, [i for i in ids if i not in masks.ids])
    if missing:
      raise MaskLookupError(
          f"{len(missing)} of the {len(ids)} training images of {what} have no <image id>.png "
          f"in BG-mixup mask folder {masks.folder} (config.bg_mixup.masks, {masks.count} "
          f"masks); first ids: {_first(missing)}. Write the masks of this split with "
          "--config.mode=save_masks"
      )
    check_mask_files(
        masks.folder,
        [i for i in ids if i in masks.ids],
        side=config.dataset.image_size if sources.kind(data.builder) == "arrays" else 0,
    )
  logging.info(
      "Pre-check: the %d training images have their boxes / masks (%.1f s)",
      len(ids),
      time.perf_counter() - start,
  )


def check_eval_split(config: ml_collections.ConfigDict, data: TrainData) -> None:
  """The online probe's eval split exists (when the probe evaluates during training)."""
  split = config.dataset.eval_split
  if not (config.eval_every_steps and split and config.probe.enabled):
    return
  builder = data.builder
  hint = (
      f"the online probe evaluates on config.dataset.eval_split={split!r} every "
      f"{config.eval_every_steps} steps (set --config.eval_every_steps=0 to train without it)"
  )
  if sources.kind(builder) == "folder":
    try:
      builder.files(split)
    except (DatasetNotFoundError, ValueError) as e:
      raise DatasetNotFoundError(f"{e}; {hint}") from e
    return
  try:
    sources.num_examples(builder, split)
  except (ValueError, KeyError) as e:
    raise DatasetNotFoundError(
        f"dataset {sources.full_name(builder)} has no usable split {split!r} ({e}): {hint}"
    ) from e


def check_training_inputs(config: ml_collections.ConfigDict, workdir: str, data: TrainData) -> None:
  """Everything training reads or writes besides the images: run before the first step."""
  check_writable(workdir, "Workdir (checkpoints, config.json, TensorBoard events)")
  check_eval_split(config, data)
  check_coverage(config, data)
