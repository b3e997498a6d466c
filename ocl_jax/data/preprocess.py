"""Decode-side preprocessing shared by the training and evaluation readers.

Images are only decoded and resized to a fixed square on the host; every
random augmentation runs on device inside the train step. The original
aspect ratio travels with each image, so on-device RandomResizedCrop samples
its ratio in real pixel units as torchvision does. Training and evaluation
batches go through the same make_preprocess, so they see identical pixels.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ocl_jax.data import sources
from ocl_jax.data.annotations import foreground_mask
from ocl_jax.data.annotations import MaskIds
from ocl_jax.data.annotations import RegionBoxes
from ocl_jax.data.folders import FolderSource


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
  if isinstance(builder, FolderSource):
    has_label, has_objects = True, False
  else:
    has_label = "label" in feats and isinstance(feats["label"], tfds.features.ClassLabel)
    has_objects = "objects" in feats and "bbox" in feats["objects"].feature

  def preprocess(example: dict[str, Any]) -> dict[str, tf.Tensor]:
    image, aspect = resize_to_square(example["image"], image_size)
    out = {"image": image, "aspect": aspect, "label": _image_label(example, has_label, has_objects)}
    if region_boxes is not None:
      out.update(region_boxes(example))
    if fg_masks is not None:
      out["fg_mask"] = foreground_mask(example, feats, fg_masks, image_size, mask_ids, aspect)
    return out

  return preprocess


def shard_for_devices(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """(B, ...) host batch -> (local devices, B / devices, ...), the layout pmap expects."""
  n = jax.local_device_count()
  return {k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in batch.items()}
