"""tf.data input pipelines: TFDS split -> this process's shard -> fixed-size uint8 batches.

Images are only decoded and resized to a fixed square on the host; every
random augmentation runs on device inside the train step. The original
aspect ratio travels with each image, so on-device RandomResizedCrop samples
its ratio in real pixel units as torchvision does.

The training stream is a pure function of (seed, step): epoch e is shuffled
with a seed derived from (seed, e), and a run resumed at step s starts at
batch s exactly (the examples before it are skipped before decoding).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# Datasets generated locally by their builder (no download): prepared on first use.
LOCALLY_GENERATED = ("scenes",)


class DatasetNotFoundError(FileNotFoundError):
  """A TFDS dataset is not prepared in the data dir the config points to."""


def _prepare_hint(name: str, data_dir: str) -> str:
  base = name.split("/")[0]
  if base == "coco":
    return (f"Download the COCO 2017 zips (train2017, val2017, annotations_trainval2017) and run "
            f"`tfds build {name} --data_dir={data_dir} --manual_dir=<folder with the zips>` "
            f"on a machine with the files, or copy an existing TFDS coco/2017 folder into {data_dir}.")
  return f"Prepare it with `tfds build {name} --data_dir={data_dir}` or copy a prepared copy there."


def get_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The TFDS builder; locally generated datasets (scenes) are generated on first use."""
  import ocl_jax.datasets  # noqa: F401  (registers the scenes builder)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotFoundError(f"Unknown TFDS dataset {name!r} (config.dataset.name): {e}") from e
  if name.split("/")[0] in LOCALLY_GENERATED and not builder.is_prepared():
    builder.download_and_prepare()
  return builder


def open_split(builder: tfds.core.DatasetBuilder, split: Any, *, shuffle_seed: int | None = None
               ) -> tf.data.Dataset:
  """builder.as_dataset with a clear error when the data is not where the config says."""
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, interleave_cycle_length=16,
                                skip_prefetch=True)
  try:
    return builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None,
                              read_config=read_config)
  except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
    raise DatasetNotFoundError(
        f"Dataset {builder.info.full_name} split {split!r} was not found in data_dir "
        f"{builder.data_dir_root!s} (set --config.dataset.data_dir). "
        f"{_prepare_hint(builder.info.full_name.rsplit('/', 1)[0], str(builder.data_dir_root))}"
    ) from e


def num_classes(builder: tfds.core.DatasetBuilder) -> int:
  """Classes of the per-image label used by the online probe (0 if none)."""
  feats = builder.info.features
  if "label" in feats and isinstance(feats["label"], tfds.features.ClassLabel):
    return feats["label"].num_classes
  if "objects" in feats and "label" in feats["objects"].feature:
    return feats["objects"].feature["label"].num_classes
  return 0


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
    return tf.cond(n > 0, lambda: tf.gather(labels, tf.argmax(area)),
                   lambda: tf.constant(-1, tf.int32))
  return tf.constant(-1, tf.int32)


def make_preprocess(builder: tfds.core.DatasetBuilder, image_size: int):
  """Decode-side preprocessing: fixed-size uint8 image, aspect, label."""
  feats = builder.info.features
  has_label = "label" in feats and isinstance(feats["label"], tfds.features.ClassLabel)
  has_objects = "objects" in feats and "bbox" in feats["objects"].feature

  def preprocess(example: dict[str, Any]) -> dict[str, tf.Tensor]:
    image = example["image"]
    if image.shape[-1] == 1:
      image = tf.image.grayscale_to_rgb(image)
    shape = tf.shape(image)
    aspect = tf.cast(shape[1], tf.float32) / tf.cast(shape[0], tf.float32)
    resized = tf.image.resize(image, (image_size, image_size), method="bilinear", antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    return {"image": image, "aspect": aspect,
            "label": _image_label(example, has_label, has_objects)}

  return preprocess


def _shard_for_devices(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  n = jax.local_device_count()
  return {k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in batch.items()}


@dataclasses.dataclass
class TrainData:
  """The training stream of this process, its size and how its epochs are cut."""
  builder: tfds.core.DatasetBuilder
  split: Any
  local_batch: int
  num_examples: int  # in this process's shard
  steps_per_epoch: int
  image_size: int
  shuffle_buffer: int
  seed: int

  def epoch(self, epoch: int, skip_batches: int = 0) -> tf.data.Dataset:
    seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0] % (2**31))
    ds = open_split(self.builder, self.split, shuffle_seed=seed)
    ds = ds.shuffle(self.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
    ds = ds.take(self.steps_per_epoch * self.local_batch)
    ds = ds.skip(skip_batches * self.local_batch)
    ds = ds.map(make_preprocess(self.builder, self.image_size),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(self.local_batch, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches from global step `start_step` on, forever, shaped (local_devices, per_device, ...)."""
    epoch, skip = divmod(start_step, self.steps_per_epoch)
    while True:
      for batch in tfds.as_numpy(self.epoch(epoch, skip)):
        yield _shard_for_devices(batch)
      epoch, skip = epoch + 1, 0


def create_train_data(config: ml_collections.ConfigDict) -> TrainData:
  d = config.dataset
  builder = get_builder(d.name, d.data_dir)
  split = tfds.split_for_jax_process(d.train_split, drop_remainder=True)
  local_batch = config.batch_size // jax.process_count()
  n = int(open_split(builder, split).cardinality())
  if n < 0:
    raise ValueError(f"Cannot count the examples of {d.name} split {d.train_split!r}")
  if n < local_batch:
    raise ValueError(f"config.batch_size={config.batch_size} is larger than the {n} examples of "
                     f"{d.name} split {d.train_split!r} available to this process")
  return TrainData(builder=builder, split=split, local_batch=local_batch, num_examples=n,
                   steps_per_epoch=n // local_batch, image_size=d.image_size,
                   shuffle_buffer=d.shuffle_buffer, seed=config.seed)


def eval_batches(config: ml_collections.ConfigDict, split: str, batch_size: int | None = None,
                 max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's shard of `split`, in order; the last batch is padded and
  every batch carries `valid` (1 for real examples), so no example is dropped or counted twice."""
  d = config.dataset
  builder = get_builder(d.name, d.data_dir)
  local_batch = (batch_size or config.batch_size) // jax.process_count()
  ds = open_split(builder, tfds.split_for_jax_process(split, drop_remainder=False))
  ds = ds.map(make_preprocess(builder, d.image_size), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(lambda ex: {**ex, "valid": tf.constant(1, tf.int32)})
  ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)
  for i, batch in enumerate(tfds.as_numpy(ds)):
    if max_batches is not None and i >= max_batches:
      break
    pad = local_batch - batch["valid"].shape[0]
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    yield _shard_for_devices(batch)


MAX_GT_BOXES = 16


def _xyxy(bbox_yxyx: tf.Tensor) -> tf.Tensor:
  """TFDS BBoxFeature (ymin, xmin, ymax, xmax) -> METHOD.md (x1, y1, x2, y2)."""
  return tf.stack([bbox_yxyx[..., 1], bbox_yxyx[..., 0], bbox_yxyx[..., 3], bbox_yxyx[..., 2]], -1)


def localization_batches(config: ml_collections.ConfigDict, split: str, batch_size: int,
                         max_examples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """This process's shard of `split` in order, with ids and whatever ground truth exists.

  Yields host batches (the last one smaller): image (B,S,S,3) uint8, id (B,) str,
  and when the dataset has them gt_mask (B,S,S) float32 in {0,1} (scenes `mask`,
  CUB `segmentation_mask`), gt_boxes (B,K,4) x1,y1,x2,y2 with gt_box_valid (B,K).
  """
  d = config.dataset
  builder = get_builder(d.name, d.data_dir)
  feats = builder.info.features
  size = d.image_size
  ds = open_split(builder, tfds.split_for_jax_process(split, drop_remainder=False))
  if max_examples is not None and max_examples >= 0:
    ds = ds.take(max_examples)
  mask_key = next((k for k in ("mask", "segmentation_mask") if k in feats), None)
  base = make_preprocess(builder, size)

  def preprocess(ex):
    out = base(ex)
    out["id"] = tf.strings.as_string(ex["image/id"]) if "image/id" in feats else ex["image/filename"]
    if mask_key is not None:
      m = tf.image.resize(tf.cast(ex[mask_key], tf.float32), (size, size), method="nearest")[..., 0]
      out["gt_mask"] = tf.cast(m > 0, tf.float32)
    if "objects" in feats and "bbox" in feats["objects"].feature:
      boxes = _xyxy(ex["objects"]["bbox"])[:MAX_GT_BOXES]
    elif "bbox" in feats:
      boxes = _xyxy(ex["bbox"])[None]
    else:
      boxes = None
    if boxes is not None:
      n = tf.shape(boxes)[0]
      out["gt_boxes"] = tf.pad(boxes, [[0, MAX_GT_BOXES - n], [0, 0]])
      out["gt_box_valid"] = tf.range(MAX_GT_BOXES) < n
    return out

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
  for batch in tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)):
    batch["id"] = np.array([i.decode() if isinstance(i, bytes) else str(i) for i in batch["id"]])
    yield batch
