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

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ocl_jax import localization

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


def make_preprocess(builder: tfds.core.DatasetBuilder, image_size: int,
                    region_boxes: "RegionBoxes | None" = None, fg_masks: str | None = None):
  """Decode-side preprocessing: fixed-size uint8 image, aspect, label.

  With `region_boxes` (OA-crop) each example also carries its candidate crop
  regions: boxes (K, 4), box_valid (K,) and, for box files, box_missing.
  With `fg_masks` (BG-mixup: 'gt' or a folder of <id>.png) it carries fg_mask
  (S, S) uint8 0..255, the soft foreground mask resized like the image.
  """
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
    out = {"image": image, "aspect": aspect,
           "label": _image_label(example, has_label, has_objects)}
    if region_boxes is not None:
      out.update(region_boxes(example))
    if fg_masks is not None:
      out["fg_mask"] = _foreground_mask(example, feats, fg_masks, image_size)
    return out

  return preprocess


def _foreground_mask(example: dict[str, Any], feats: Any, source: str, size: int) -> tf.Tensor:
  """BG-mixup's soft mask: the dataset's 0/1 `mask`, or <source>/<image id>.png (save_masks)."""
  if source == "gt":
    if "mask" not in feats:
      raise ValueError("config.bg_mixup.masks='gt' needs a `mask` feature (scenes); give a folder "
                       "of ContraCAM masks written by --config.mode=save_masks instead")
    mask = tf.cast(example["mask"], tf.float32) * 255.0
  else:
    path = tf.strings.join([source.rstrip("/"), "/", _example_id(example, feats), ".png"])
    mask = tf.cast(tf.io.decode_png(tf.io.read_file(path), channels=1), tf.float32)
  mask = tf.image.resize(mask, (size, size), method="bilinear")[..., 0]
  return tf.cast(tf.clip_by_value(tf.round(mask), 0, 255), tf.uint8)


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
  region_boxes: "RegionBoxes | None" = None  # OA-crop boxes (config.object_aware)
  fg_masks: str | None = None  # BG-mixup masks: 'gt' or a folder (config.bg_mixup.masks)
  missing_box_count: int = 0  # examples streamed so far that the box file lacks (tolerant mode)

  def epoch(self, epoch: int, skip_batches: int = 0) -> tf.data.Dataset:
    seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0] % (2**31))
    ds = open_split(self.builder, self.split, shuffle_seed=seed)
    ds = ds.shuffle(self.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
    ds = ds.take(self.steps_per_epoch * self.local_batch)
    ds = ds.skip(skip_batches * self.local_batch)
    ds = ds.map(make_preprocess(self.builder, self.image_size, self.region_boxes, self.fg_masks),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(self.local_batch, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches from global step `start_step` on, forever, shaped (local_devices, per_device, ...)."""
    epoch, skip = divmod(start_step, self.steps_per_epoch)
    while True:
      missing = 0
      for batch in _raise_box_lookup_errors(tfds.as_numpy(self.epoch(epoch, skip))):
        if "box_missing" in batch:  # host-side bookkeeping only, not sent to the devices
          missing += int(batch.pop("box_missing").sum())
        yield _shard_for_devices(batch)
      if missing:
        self.missing_box_count += missing
        logging.warning("Epoch %d: %d training images are not in box file %s; they were "
                        "cropped from the whole image (object_aware.tolerate_box_errors)",
                        epoch, missing, self.region_boxes.path)
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
                   shuffle_buffer=d.shuffle_buffer, seed=config.seed,
                   region_boxes=create_region_boxes(config, builder),
                   fg_masks=config.bg_mixup.masks if config.bg_mixup.enabled else None)


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
    out["id"] = _example_id(ex, feats)
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


# ----------------------------------------------------------------------------
# OA-crop boxes (METHOD.md section 4).

_MISSING_ID_MARK = "is not in box file"


class BoxLookupError(KeyError):
  """A training image has no line in the OA-crop box file (and errors are not tolerated)."""

  def __str__(self) -> str:
    return str(self.args[0])


def _example_id(example: dict[str, Any], feats: Any) -> tf.Tensor:
  """The id box files use: `image/id` as a decimal string, else `image/filename`."""
  if "image/id" in feats:
    return tf.strings.as_string(example["image/id"])
  return example["image/filename"]


def gt_region_boxes(bbox_yxyx: tf.Tensor, max_boxes: int, min_area: float, margin: float
                    ) -> tuple[tf.Tensor, tf.Tensor]:
  """Ground-truth OA-crop regions: boxes of area > min_area, expanded by margin*(w, h) per side.

  Returns the first `max_boxes` of them, clipped to the image, as (K, 4)
  x1, y1, x2, y2 zero-padded, and (K,) validity.
  """
  b = _xyxy(tf.cast(tf.reshape(bbox_yxyx, [-1, 4]), tf.float32))
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
  path: str | None = None             # None: ground truth
  tolerate_errors: bool = False
  feats: Any = None
  _table: Any = None
  _boxes: Any = None
  _counts: Any = None

  @classmethod
  def from_box_file(cls, path: str, max_boxes: int, tolerate_errors: bool, feats: Any
                    ) -> "RegionBoxes":
    table = localization.read_box_file(path, tolerate_errors=tolerate_errors)
    if table.errors:
      logging.warning("Box file %s: %d malformed lines skipped (their images use the whole "
                      "image); first: %s", path, len(table.errors), table.errors[0])
    ids = list(table)
    boxes = np.zeros((len(ids) + 1, max_boxes, 4), np.float32)
    counts = np.zeros((len(ids) + 1,), np.int32)
    truncated = 0
    for row, image_id in enumerate(ids):
      b = np.asarray(table[image_id], np.float32).reshape(-1, 4)
      truncated += len(b) > max_boxes
      b = b[:max_boxes]
      boxes[row, :len(b)] = b
      counts[row] = len(b)
    if truncated:
      logging.info("Box file %s: %d images have more than max_boxes=%d boxes; the first %d are used",
                   path, truncated, max_boxes, max_boxes)
    logging.info("OA-crop boxes of %d images from %s", len(ids), path)
    lookup = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(ids, tf.string) if ids else
                                            tf.zeros((0,), tf.string),
                                            tf.range(len(ids), dtype=tf.int64)),
        default_value=-1)
    return cls(max_boxes=max_boxes, path=path, tolerate_errors=tolerate_errors, feats=feats,
               _table=lookup, _boxes=tf.constant(boxes), _counts=tf.constant(counts))

  def __call__(self, example: dict[str, Any]) -> dict[str, tf.Tensor]:
    if self.path is None:
      boxes, valid = gt_region_boxes(example["objects"]["bbox"], self.max_boxes, self.min_area,
                                     self.margin)
      return {"boxes": boxes, "box_valid": valid}
    image_id = _example_id(example, self.feats)
    row = self._table.lookup(image_id)
    missing = row < 0
    if not self.tolerate_errors:
      message = tf.strings.join(["image id ", image_id, f" {_MISSING_ID_MARK} {self.path} (set "
                                 "--config.object_aware.tolerate_box_errors=True to crop such "
                                 "images from the whole image)"])
      check = tf.debugging.Assert(tf.logical_not(missing), [message])
      with tf.control_dependencies([check]):
        row = tf.identity(row)
    row = tf.where(missing, tf.cast(tf.shape(self._counts)[0] - 1, tf.int64), row)
    count = tf.gather(self._counts, row)
    return {"boxes": tf.gather(self._boxes, row), "box_valid": tf.range(self.max_boxes) < count,
            "box_missing": missing}


def create_region_boxes(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder
                        ) -> RegionBoxes | None:
  """The OA-crop box source of `config.object_aware`, or None when OA-crop is off."""
  oa = config.get("object_aware")
  if oa is None or not oa.crop:
    return None
  feats = builder.info.features
  if oa.boxes == "gt":
    if not ("objects" in feats and "bbox" in feats["objects"].feature):
      raise ValueError(f"config.object_aware.boxes='gt' needs objects/bbox, which dataset "
                       f"{builder.info.full_name} does not have; give a box file instead")
    return RegionBoxes(max_boxes=oa.max_boxes, min_area=oa.gt_min_area, margin=oa.gt_margin)
  if "image/id" not in feats and "image/filename" not in feats:
    raise ValueError(f"config.object_aware.boxes is a box file, but dataset "
                     f"{builder.info.full_name} has neither image/id nor image/filename to match")
  return RegionBoxes.from_box_file(oa.boxes, oa.max_boxes, oa.tolerate_box_errors, feats)


def _raise_box_lookup_errors(batches: Iterator[dict[str, np.ndarray]]
                             ) -> Iterator[dict[str, np.ndarray]]:
  """Turn the tf.data assertion of a missing box-file id into a BoxLookupError."""
  try:
    yield from batches
  except tf.errors.InvalidArgumentError as e:
    if _MISSING_ID_MARK not in e.message:
      raise
    text = e.message.split("[", 1)[-1].split("]")[0] if "[" in e.message else e.message
    raise BoxLookupError(text) from e
