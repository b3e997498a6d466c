"""tf.data input pipelines: TFDS split -> this process's shard -> fixed-size uint8 batches.

Images are only decoded and resized to a fixed square on the host; every
random augmentation runs on device inside the train step. The original
aspect ratio travels with each image, so on-device RandomResizedCrop samples
its ratio in real pixel units as torchvision does.

The training stream is a pure function of (seed, step): epoch e is shuffled
with a seed derived from (seed, e), and a run resumed at step s starts at
batch s exactly (the examples before it are skipped before decoding). In a
multi-process job every process walks the same global order and keeps its
contiguous slice of each global batch (process p: examples [p*b, (p+1)*b)
of it, b = batch_size / processes), decoding only those; so the global batch
of a step is the one a single process would see, whatever the process count.

Besides TFDS names, config.dataset.name may be `folder:<root>`, a local folder
of <class>/<image files> (e.g. ImageNet-9's bg_challenge/original/train); see
FolderSource. Its images are keyed by an id derived from their path
(`folder_image_id`), which ContraCAM's box files and mask PNGs use too.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ocl_jax.discovery import localization

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


def get_builder(name: str, data_dir: str | None) -> "tfds.core.DatasetBuilder | FolderSource":
  """The TFDS builder; locally generated datasets (scenes) are generated on first use.

  `folder:<root>` gives a FolderSource instead (data_dir is not used).
  """
  if is_folder_dataset(name):
    return FolderSource.open(name)
  import ocl_jax.data.scenes  # noqa: F401  (registers the scenes builder)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotFoundError(f"Unknown TFDS dataset {name!r} (config.dataset.name): {e}") from e
  if name.split("/")[0] in LOCALLY_GENERATED and not builder.is_prepared():
    builder.download_and_prepare()
  return builder


def open_split(builder: "tfds.core.DatasetBuilder | FolderSource", split: Any, *,
               shuffle_seed: int | None = None, decoders: Any = None,
               add_tfds_id: bool = False) -> tf.data.Dataset:
  """builder.as_dataset with a clear error when the data is not where the config says.

  For a FolderSource: the file records of `split` (image/filename, label,
  image/id), listed order, not decoded; its cardinality is the listed count.
  """
  if isinstance(builder, FolderSource):
    del shuffle_seed  # folder streams are ordered by TrainData
    return builder.records(split)
  # Ordered reads are often cut short (.take(n) of an evaluation split); TFDS's automatic cache
  # of small splits would then warn that the cache was not filled. The data are the same.
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, interleave_cycle_length=16,
                                skip_prefetch=True, add_tfds_id=add_tfds_id,
                                try_autocache=shuffle_seed is not None)
  try:
    return builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None,
                              read_config=read_config, decoders=decoders)
  except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
    raise DatasetNotFoundError(
        f"Dataset {builder.info.full_name} split {split!r} was not found in data_dir "
        f"{builder.data_dir_root!s} (set --config.dataset.data_dir). "
        f"{_prepare_hint(builder.info.full_name.rsplit('/', 1)[0], str(builder.data_dir_root))}"
    ) from e


def num_classes(builder: "tfds.core.DatasetBuilder | FolderSource") -> int:
  """Classes of the per-image label used by the online probe (0 if none)."""
  if isinstance(builder, FolderSource):
    return len(builder.class_names)
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


def make_preprocess(builder: "tfds.core.DatasetBuilder | FolderSource", image_size: int,
                    region_boxes: "RegionBoxes | None" = None, fg_masks: str | None = None,
                    mask_ids: "MaskIds | None" = None):
  """Decode-side preprocessing: fixed-size uint8 image, aspect, label.

  With `region_boxes` (OA-crop) each example also carries its candidate crop
  regions: boxes (K, 4), box_valid (K,) and, for box files, box_missing.
  With `fg_masks` (BG-mixup: 'gt' or a folder of <id>.png) it carries fg_mask
  (S, S) uint8 0..255, the soft foreground mask resized like the image;
  `mask_ids` (the ids that folder has) turns a missing mask into a clear error.
  For a FolderSource the examples are its decoded records (see FolderSource).
  """
  feats = _features(builder)
  if isinstance(builder, FolderSource):
    has_label, has_objects = True, False
  else:
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
      out["fg_mask"] = _foreground_mask(example, feats, fg_masks, image_size, mask_ids, aspect)
    return out

  return preprocess


def _features(builder: "tfds.core.DatasetBuilder | FolderSource") -> Any:
  """The feature dict (TFDS) or the feature names (folders) that the preprocessing keys on."""
  if isinstance(builder, FolderSource):
    return FolderSource.FEATURES
  return builder.info.features


_MISSING_MASK_MARK = "has no BG-mixup mask"


class MaskLookupError(FileNotFoundError):
  """A training image has no <image id>.png in the BG-mixup mask folder."""


@dataclasses.dataclass
class MaskIds:
  """The image ids a BG-mixup mask folder has a <id>.png for, as an in-graph lookup table."""
  folder: str
  count: int
  _table: Any = None

  @classmethod
  def from_folder(cls, folder: str) -> "MaskIds":
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"config.bg_mixup.masks={folder!r} is not a folder of <image id>.png "
                              "masks (write one with --config.mode=save_masks)")
    ids = sorted(e.name[:-len(".png")] for e in os.scandir(folder)
                 if e.is_file() and e.name.endswith(".png") and not e.name.startswith("."))
    keys = tf.constant(ids, tf.string) if ids else tf.zeros((0,), tf.string)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(keys, tf.range(len(ids), dtype=tf.int64)),
        default_value=-1)
    return cls(folder=folder, count=len(ids), _table=table)

  def check(self, image_id: tf.Tensor) -> tf.Operation:
    message = tf.strings.join(["image id ", image_id, f" {_MISSING_MASK_MARK} ", image_id,
                               f".png in {self.folder} (config.bg_mixup.masks, {self.count} "
                               "masks); write the masks of this dataset's training images with "
                               "--config.mode=save_masks"])
    return tf.debugging.Assert(self._table.lookup(image_id) >= 0, [message])


def _foreground_mask(example: dict[str, Any], feats: Any, source: str, size: int,
                     mask_ids: MaskIds | None = None, aspect: tf.Tensor | None = None) -> tf.Tensor:
  """BG-mixup's soft mask: the dataset's 0/1 `mask`, or <source>/<image id>.png (save_masks).

  A mask covers the whole image, so it is resized to the square like the image. A mask PNG
  that is neither square (what save_masks writes: the resized image) nor of the image's own
  aspect ratio cannot belong to the image: an InvalidArgumentError names the file.
  """
  if source == "gt":
    if "mask" not in feats:
      raise ValueError("config.bg_mixup.masks='gt' (or config.saliency.coverage_masks='gt') needs "
                       "a `mask` feature (scenes); for BG-mixup give a folder of ContraCAM masks "
                       "written by --config.mode=save_masks instead, for SGCL set "
                       "saliency.coverage_masks=''")
    mask = tf.cast(example["mask"], tf.float32) * 255.0
  else:
    image_id = _example_id(example, feats)
    path = tf.strings.join([source.rstrip("/"), "/", image_id, ".png"])
    checks = [mask_ids.check(image_id)] if mask_ids is not None else []
    with tf.control_dependencies(checks):
      path = tf.identity(path)
    mask = tf.cast(tf.io.decode_png(tf.io.read_file(path), channels=1), tf.float32)
    if aspect is not None:
      hw = tf.cast(tf.shape(mask)[:2], tf.float32)
      mask_aspect = hw[1] / hw[0]
      fits = (tf.abs(mask_aspect - 1.0) < 0.02) | (tf.abs(mask_aspect / aspect - 1.0) < 0.02)
      check = tf.debugging.Assert(fits, ["BG-mixup mask", path, "has shape", tf.shape(mask)[:2],
                                         "which is neither square nor of the image's aspect", aspect,
                                         "(config.bg_mixup.masks: a mask folder of another dataset?)"])
      with tf.control_dependencies([check]):
        mask = tf.identity(mask)
  mask = tf.image.resize(mask, (size, size), method="bilinear")[..., 0]
  return tf.cast(tf.clip_by_value(tf.round(mask), 0, 255), tf.uint8)


def _shard_for_devices(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  n = jax.local_device_count()
  return {k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in batch.items()}


def _epoch_seed(seed: int, epoch: int, *extra: int) -> int:
  return int(np.random.SeedSequence([seed, epoch, *extra]).generate_state(1)[0] % (2**31))


def _image_features(builder: "tfds.core.DatasetBuilder | FolderSource") -> list[str]:
  """Top-level Image features of a TFDS dataset: the ones worth decoding only when kept."""
  if isinstance(builder, FolderSource):
    return []
  return [k for k, f in builder.info.features.items() if isinstance(f, tfds.features.Image)]


def base_split_name(split: Any) -> str:
  """'train[:50%]' -> 'train' (the split whose files a tfds_id names)."""
  return str(split).split("[", 1)[0].strip()


def tfds_example_index(builder: "tfds.core.DatasetBuilder", split: Any
                       ) -> tuple[Callable[[tf.Tensor], tf.Tensor], int]:
  """(tfds_id -> position in the whole base split, as int32; the base split's size).

  A tfds_id is '<shard file>__<record>'; the position is the shard's offset
  plus the record. It keys SGCL's per-image saliency bank, stable across
  epochs, shuffles and process counts.
  """
  info = builder.info.splits[base_split_name(split)]
  offsets = np.concatenate([[0], np.cumsum(info.shard_lengths)[:-1]]).astype(np.int64)
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(list(info.filenames)), tf.constant(offsets)),
      default_value=-1)

  def index_of(tfds_id: tf.Tensor) -> tf.Tensor:
    parts = tf.strings.split(tfds_id, "__")
    offset = table.lookup(parts[0])
    check = tf.debugging.assert_non_negative(
        offset, message="tfds_id names a shard file the split's metadata does not list")
    with tf.control_dependencies([check]):
      return tf.cast(offset + tf.strings.to_number(parts[-1], tf.int64), tf.int32)

  return index_of, int(info.num_examples)


@dataclasses.dataclass
class TrainData:
  """The training stream of this process, its size and how its epochs are cut.

  Every process reads the whole split in the same order and keeps its slice
  of each global batch (see the module docstring); with one process the slice
  is the whole batch.

  Folder datasets (`files` set): epoch e visits the files in a permutation
  seeded by (seed, e); slot j of the epoch (j < steps_per_epoch *
  global_batch, the rest is dropped) holds file order[j]. A file that cannot be
  read or decoded is replaced in its slot by the first readable file of a
  second seeded permutation (alt[j], alt[j+1], ...), so every epoch has
  exactly steps_per_epoch full batches (computed from the listed count), a
  batch depends only on (seed, epoch, its slots) and resuming skips slots
  before decoding. Replaced files are counted (unreadable_count, per slot
  streamed; unreadable_files, distinct) and logged at the end of each epoch.
  epoch() batches then also carry the host-only `id`, `slot` and `file_index`,
  which iterate() drops.
  """
  builder: "tfds.core.DatasetBuilder | FolderSource"
  split: Any
  local_batch: int
  num_examples: int  # in the split (every process walks all of it)
  steps_per_epoch: int
  image_size: int
  shuffle_buffer: int
  seed: int
  region_boxes: "RegionBoxes | None" = None  # OA-crop boxes (config.object_aware)
  fg_masks: str | None = None  # BG-mixup masks: 'gt' or a folder (config.bg_mixup.masks)
  missing_box_count: int = 0  # examples streamed so far that the box file lacks (tolerant mode)
  mask_ids: MaskIds | None = None  # the ids the BG-mixup mask folder has
  files: "FolderFiles | None" = None  # folder datasets: all the files (every process)
  unreadable_count: int = 0  # folder datasets: slots streamed so far whose file was unreadable
  unreadable_files: set[str] = dataclasses.field(default_factory=set)  # ... those files
  process_index: int = 0  # this process's slice of each global batch ...
  process_count: int = 1  # ... out of this many
  with_index: bool = False  # batches carry `index`, the image's position in the split (SGCL bank)
  index_size: int = 0       # ... indices are < this (the whole base split / folder)
  index_split: str = "train"  # the TFDS split named in the config (its base split is indexed)

  @property
  def global_batch(self) -> int:
    return self.local_batch * self.process_count

  def _own_slice(self, ds: tf.data.Dataset) -> tf.data.Dataset:
    """The elements of this process's slice of each global batch (all on one process)."""
    if self.process_count == 1:
      return ds
    b, g, p = self.local_batch, self.global_batch, self.process_index
    return ds.enumerate().filter(lambda i, _: i % g // b == p).map(lambda _, ex: ex)

  def folder_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Folder datasets: (order, alt), the permutations of the files in `epoch`."""
    n = len(self.files)
    return (np.random.default_rng(_epoch_seed(self.seed, epoch)).permutation(n),
            np.random.default_rng(_epoch_seed(self.seed, epoch, 1)).permutation(n))

  def epoch(self, epoch: int, skip_batches: int = 0) -> tf.data.Dataset:
    if self.files is not None:
      return self._folder_epoch(epoch, skip_batches)
    seed = _epoch_seed(self.seed, epoch)
    # Several processes: images are decoded after the slice, only by the process that keeps them.
    deferred = _image_features(self.builder) if self.process_count > 1 else []
    ds = open_split(self.builder, self.split, shuffle_seed=seed,
                    decoders={k: tfds.decode.SkipDecoding() for k in deferred} or None,
                    add_tfds_id=self.with_index)
    ds = ds.shuffle(self.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
    ds = ds.take(self.steps_per_epoch * self.global_batch)
    ds = ds.skip(skip_batches * self.global_batch)
    ds = self._own_slice(ds)
    preprocess, feats = self._preprocess(), _features(self.builder)
    if self.with_index:
      index_of, base_preprocess = tfds_example_index(self.builder, self.index_split)[0], preprocess
      preprocess = lambda ex: {**base_preprocess(ex), "index": index_of(ex["tfds_id"])}
    if deferred:
      decode = lambda ex: {**ex, **{k: feats[k].decode_example(ex[k]) for k in deferred}}
      ds = ds.map(lambda ex: preprocess(decode(ex)), num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)
    else:
      ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(self.local_batch, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)

  def _preprocess(self):
    return make_preprocess(self.builder, self.image_size, self.region_boxes, self.fg_masks,
                           self.mask_ids)

  def _folder_epoch(self, epoch: int, skip_batches: int) -> tf.data.Dataset:
    n, k = len(self.files), FALLBACK_CANDIDATES
    order, alt = (tf.constant(x, tf.int64) for x in self.folder_order(epoch))
    load = self.files.loader()

    def slot_example(slot):
      fallbacks = tf.gather(alt, (slot + tf.range(k, dtype=tf.int64)) % n)
      candidates = tf.concat([order[slot][None], fallbacks], 0)
      ds = tf.data.Dataset.from_tensor_slices(candidates).map(load).ignore_errors().take(1)
      return ds.map(lambda ex: {**ex, "slot": slot})

    ds = tf.data.Dataset.range(self.steps_per_epoch * self.global_batch)
    ds = self._own_slice(ds.skip(skip_batches * self.global_batch))  # before decoding
    ds = ds.interleave(slot_example, cycle_length=tf.data.AUTOTUNE, block_length=1,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    preprocess = self._preprocess()
    ds = ds.map(lambda ex: {**preprocess(ex), "id": ex["image/id"], "slot": ex["slot"],
                            "file_index": ex["file_index"]},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(self.local_batch, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)

  def _folder_bookkeeping(self, batch: dict[str, np.ndarray], order: np.ndarray, step_in_epoch: int,
                          unreadable: list[str]) -> None:
    """Drop the host-only keys of a folder batch; record the files that were replaced."""
    del batch["id"]
    slots, used = batch.pop("slot"), batch.pop("file_index")
    if self.with_index:
      batch["index"] = used.astype(np.int32)
    start = step_in_epoch * self.global_batch + self.process_index * self.local_batch
    expected = np.arange(start, start + self.local_batch)
    if not np.array_equal(slots, expected):
      lost = sorted(set(expected.tolist()) - set(slots.tolist()))
      raise RuntimeError(
          f"{self.builder.name}: none of the {FALLBACK_CANDIDATES + 1} candidate files of epoch "
          f"slot(s) {lost[:5]} could be read and decoded (first: "
          f"{self.files.paths[order[lost[0]]] if lost else '?'}); is the folder mostly "
          f"unreadable?")
    for slot, index in zip(slots, used):
      if order[slot] != index:
        unreadable.append(self.files.paths[order[slot]])

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches from global step `start_step` on, forever, shaped (local_devices, per_device, ...)."""
    epoch, skip = divmod(start_step, self.steps_per_epoch)
    while True:
      missing = 0
      unreadable: list[str] = []
      order = self.folder_order(epoch)[0] if self.files is not None else None
      batches = _raise_lookup_errors(tfds.as_numpy(self.epoch(epoch, skip)))
      for i, batch in enumerate(batches, start=skip):
        if "box_missing" in batch:  # host-side bookkeeping only, not sent to the devices
          missing += int(batch.pop("box_missing").sum())
        if order is not None:
          seen = len(unreadable)
          self._folder_bookkeeping(batch, order, i, unreadable)
          if len(unreadable) > seen and not self.unreadable_files:
            logging.warning("%s: image file %s cannot be read or decoded; it is replaced by "
                            "another image of the folder (counted and logged per epoch)",
                            self.builder.name, unreadable[seen])
          self.unreadable_count += len(unreadable) - seen
          self.unreadable_files.update(unreadable[seen:])
        yield _shard_for_devices(batch)
      if missing:
        self.missing_box_count += missing
        logging.warning("Epoch %d: %d training images are not in box file %s; they were "
                        "cropped from the whole image (object_aware.tolerate_box_errors)",
                        epoch, missing, self.region_boxes.path)
      if unreadable:
        logging.warning("Epoch %d: %d image files of %s could not be read or decoded and were "
                        "replaced by other images of the folder (%d distinct so far); first: %s",
                        epoch, len(unreadable), self.builder.name, len(self.unreadable_files),
                        ", ".join(sorted(set(unreadable))[:5]))
      epoch, skip = epoch + 1, 0


def create_train_data(config: ml_collections.ConfigDict) -> TrainData:
  d = config.dataset
  builder = get_builder(d.name, d.data_dir)
  local_batch = config.batch_size // jax.process_count()
  fg_masks = config.bg_mixup.masks if config.bg_mixup.enabled else None
  sal = config.get("saliency")
  if fg_masks is None and sal is not None and sal.enabled and sal.coverage_masks == "gt":
    fg_masks = "gt"  # SGCL diagnostics: true object coverage of the crops
  with_index = bool(sal is not None and sal.enabled and sal.every_k_steps > 1)
  mask_ids = MaskIds.from_folder(fg_masks) if fg_masks not in (None, "gt") else None
  if isinstance(builder, FolderSource):
    data = _create_folder_train_data(config, builder, local_batch, fg_masks, mask_ids)
    return dataclasses.replace(data, with_index=with_index, index_size=data.num_examples)
  # The whole split, as one process reads it: every process walks the same global order.
  split = tfds.split_for_jax_process(d.train_split, process_index=0, process_count=1,
                                     drop_remainder=True)
  n = int(open_split(builder, split).cardinality())
  if n < 0:
    raise ValueError(f"Cannot count the examples of {d.name} split {d.train_split!r}")
  if n < config.batch_size:
    raise ValueError(f"config.batch_size={config.batch_size} is larger than the {n} examples of "
                     f"{d.name} split {d.train_split!r}")
  return TrainData(builder=builder, split=split, local_batch=local_batch, num_examples=n,
                   steps_per_epoch=n // config.batch_size, image_size=d.image_size,
                   shuffle_buffer=d.shuffle_buffer, seed=config.seed,
                   region_boxes=create_region_boxes(config, builder),
                   fg_masks=fg_masks, mask_ids=mask_ids, process_index=jax.process_index(),
                   process_count=jax.process_count(), with_index=with_index, index_split=d.train_split,
                   index_size=tfds_example_index(builder, d.train_split)[1] if with_index else n)


def _create_folder_train_data(config: ml_collections.ConfigDict, source: "FolderSource",
                              local_batch: int, fg_masks: str | None, mask_ids: MaskIds | None
                              ) -> TrainData:
  """The whole folder is the training set; every process permutes all its files alike and
  reads only the slots of its slice of each global batch."""
  d = config.dataset
  if d.train_split != "train":
    raise ValueError(f"config.dataset.train_split={d.train_split!r}: a folder dataset "
                     f"({d.name}) trains on its whole folder; set it to 'train'")
  files = source.files("train")
  n = len(files)
  if n < config.batch_size:
    raise ValueError(f"config.batch_size={config.batch_size} is larger than the {n} images of "
                     f"{d.name}")
  logging.info("%s: %d image files in %d classes", d.name, n, len(source.class_names))
  return TrainData(builder=source, split="train", local_batch=local_batch, num_examples=n,
                   steps_per_epoch=n // config.batch_size, image_size=d.image_size,
                   shuffle_buffer=d.shuffle_buffer, seed=config.seed,
                   region_boxes=create_region_boxes(config, source), fg_masks=fg_masks,
                   mask_ids=mask_ids, files=files, process_index=jax.process_index(),
                   process_count=jax.process_count())


def _longest_shard(builder: "tfds.core.DatasetBuilder | FolderSource", split: str) -> int:
  """Examples in the largest process shard of `split` (listed files for folders)."""
  n = jax.process_count()
  if isinstance(builder, FolderSource):
    return -(-len(builder.files(split)) // n)  # shard 0 of every n-th file
  return max(builder.info.splits[s].num_examples
             for s in tfds.even_splits(split, n, drop_remainder=False))


def eval_batches(config: ml_collections.ConfigDict, split: str, batch_size: int | None = None,
                 max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's shard of `split`, in order; the last batch is padded and
  every batch carries `valid` (1 for real examples), so no example is dropped or counted twice.

  With several processes (shards of one example more or less) each yields the same number
  of batches, the longest shard's, padding with empty ones: the pmapped step that consumes
  them has collectives, which every process must run equally often.
  """
  d = config.dataset
  builder = get_builder(d.name, d.data_dir)
  local_batch = (batch_size or config.batch_size) // jax.process_count()
  files = None
  if isinstance(builder, FolderSource):
    files = builder.files(split).shard(jax.process_index(), jax.process_count())
    ds = files.decoded()
  else:
    ds = open_split(builder, tfds.split_for_jax_process(split, drop_remainder=False))
  num_batches = None
  if jax.process_count() > 1:
    num_batches = -(-_longest_shard(builder, split) // local_batch)
    if max_batches is not None:
      num_batches = min(num_batches, max_batches)
  pre = make_preprocess(builder, d.image_size)
  keep = ("file_index",) if files is not None else ()
  ds = ds.map(lambda ex: {**pre(ex), **{k: ex[k] for k in keep}, "valid": tf.constant(1, tf.int32)},
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)
  batches = tfds.as_numpy(ds)
  if files is not None:
    batches = files.track_unreadable(batches, f"{d.name} split {split!r}")
  i = 0
  for i, batch in enumerate(batches, start=1):
    if max_batches is not None and i > max_batches:
      break
    pad = local_batch - batch["valid"].shape[0]
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    yield _shard_for_devices(batch)
  empty = {k: np.zeros((local_batch,) + tuple(spec.shape[1:]), spec.dtype.as_numpy_dtype)
           for k, spec in ds.element_spec.items() if k not in keep}
  for _ in range(i, num_batches or 0):  # this shard ran out before the longest one
    yield _shard_for_devices(empty)


MAX_GT_BOXES = 16


def _xyxy(bbox_yxyx: tf.Tensor) -> tf.Tensor:
  """TFDS BBoxFeature (ymin, xmin, ymax, xmax) -> (x1, y1, x2, y2) of docs/method.md#conventions."""
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
  if isinstance(builder, FolderSource):
    yield from _folder_localization_batches(builder, split, d.image_size, batch_size, max_examples)
    return
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
    batch["id"] = _decode_ids(batch["id"])
    yield batch


def _decode_ids(ids: np.ndarray) -> np.ndarray:
  return np.array([i.decode() if isinstance(i, bytes) else str(i) for i in ids])


def _folder_localization_batches(source: "FolderSource", split: str, size: int, batch_size: int,
                                 max_examples: int | None) -> Iterator[dict[str, np.ndarray]]:
  """localization_batches of a folder: image, aspect, label and id (folders have no ground
  truth masks or boxes); unreadable files are skipped, counted and logged after the pass."""
  files = source.files(split).shard(jax.process_index(), jax.process_count())
  if max_examples is not None and max_examples >= 0:
    files = files.shard(0, 1, max_examples)
  pre = make_preprocess(source, size)
  ds = files.decoded().map(lambda ex: {**pre(ex), "id": ex["image/id"],
                                       "file_index": ex["file_index"]},
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  for batch in files.track_unreadable(tfds.as_numpy(ds), f"{source.name} split {split!r}"):
    batch["id"] = _decode_ids(batch["id"])
    yield batch


# ----------------------------------------------------------------------------
# OA-crop boxes (docs/method.md#oa-crop).

_MISSING_ID_MARK = "is not in box file"


class BoxLookupError(KeyError):
  """A training image has no line in the OA-crop box file (and errors are not tolerated)."""

  def __str__(self) -> str:
    return str(self.args[0])


def _example_id(example: dict[str, Any], feats: Any) -> tf.Tensor:
  """The id box files use: `image/id` as a decimal string (folders: their string id, see
  folder_image_id), else `image/filename`."""
  if "image/id" in feats:
    image_id = example["image/id"]
    return image_id if image_id.dtype == tf.string else tf.strings.as_string(image_id)
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


def create_region_boxes(config: ml_collections.ConfigDict,
                        builder: "tfds.core.DatasetBuilder | FolderSource") -> RegionBoxes | None:
  """The OA-crop box source of `config.object_aware`, or None when OA-crop is off."""
  oa = config.get("object_aware")
  if oa is None or not oa.crop:
    return None
  if isinstance(builder, FolderSource):
    if oa.boxes == "gt":
      raise ValueError(f"config.object_aware.boxes='gt' needs objects/bbox; folder dataset "
                       f"{builder.name} has none: give a box file (--config.mode=save_boxes)")
    return RegionBoxes.from_box_file(oa.boxes, oa.max_boxes, oa.tolerate_box_errors,
                                     FolderSource.FEATURES)
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


def _raise_lookup_errors(batches: Iterator[dict[str, np.ndarray]]
                         ) -> Iterator[dict[str, np.ndarray]]:
  """Turn the tf.data assertion of a missing box-file id into a BoxLookupError, and that of
  a missing BG-mixup mask into a MaskLookupError."""
  try:
    yield from batches
  except tf.errors.InvalidArgumentError as e:
    error = next((cls for mark, cls in ((_MISSING_ID_MARK, BoxLookupError),
                                        (_MISSING_MASK_MARK, MaskLookupError))
                  if mark in e.message), None)
    if error is None:
      raise
    text = e.message.split("[", 1)[-1].split("]")[0] if "[" in e.message else e.message
    raise error(text) from e


# ----------------------------------------------------------------------------
# Local image folders: config.dataset.name = 'folder:<root>'.

FOLDER_PREFIX = "folder:"
# Training: an unreadable file's slot takes the first readable of this many other files.
FALLBACK_CANDIDATES = 16


def is_folder_dataset(name: str) -> bool:
  return isinstance(name, str) and name.startswith(FOLDER_PREFIX)


def folder_image_id(relative_path: str) -> str:
  """The id of a folder image: its path relative to the split folder, without extension,
  '/' replaced by '__' and whitespace by '_' (ids name mask PNGs in one flat folder and
  must be single tokens in box files). E.g. '02_wheeled vehicle/n0402_77.JPEG' ->
  '02_wheeled_vehicle__n0402_77'."""
  stem = os.path.splitext(relative_path.replace(os.sep, "/"))[0]
  return re.sub(r"\s", "_", stem.replace("/", "__"))


def _decode_image_file(path: tf.Tensor) -> tf.Tensor:
  """uint8 (H, W, 3): grayscale becomes RGB, alpha is dropped, an animation gives its first
  frame; fails on unreadable or undecodable files (the callers skip those)."""
  return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)


@dataclasses.dataclass(frozen=True)
class FolderFiles:
  """Image files of a folder split in a fixed order, with labels and ids."""
  paths: tuple[str, ...]
  labels: tuple[int, ...]
  ids: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.paths)

  def shard(self, index: int, count: int, limit: int | None = None) -> "FolderFiles":
    """Every count-th file from `index` (this process's share), at most `limit` of them."""
    end = None if limit is None or limit < 0 else limit
    return FolderFiles(self.paths[index::count][:end], self.labels[index::count][:end],
                       self.ids[index::count][:end])

  def records(self) -> tf.data.Dataset:
    """Undecoded records (image/filename, label, image/id, file_index), in order."""
    return tf.data.Dataset.from_tensor_slices({
        "image/filename": tf.constant(self.paths, tf.string, shape=(len(self),)),
        "label": tf.constant(self.labels, tf.int32, shape=(len(self),)),
        "image/id": tf.constant(self.ids, tf.string, shape=(len(self),)),
        "file_index": tf.range(len(self), dtype=tf.int64)})

  def loader(self):
    """file index -> decoded example (image, label, image/id, file_index); fails on files
    that cannot be read or decoded."""
    paths = tf.constant(self.paths, tf.string, shape=(len(self),))
    labels = tf.constant(self.labels, tf.int32, shape=(len(self),))
    ids = tf.constant(self.ids, tf.string, shape=(len(self),))

    def load(index):
      return {"image": _decode_image_file(tf.gather(paths, index)),
              "label": tf.gather(labels, index), "image/id": tf.gather(ids, index),
              "file_index": tf.cast(index, tf.int64)}
    return load

  def decoded(self) -> tf.data.Dataset:
    """Decoded examples in order; files that cannot be read or decoded are left out (their
    file_index is then missing from the stream, see track_unreadable)."""
    ds = tf.data.Dataset.range(len(self))
    return ds.map(self.loader(), num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True).ignore_errors()

  def track_unreadable(self, batches: Iterator[dict[str, np.ndarray]], what: str
                       ) -> Iterator[dict[str, np.ndarray]]:
    """Pass `batches` on without their file_index; after a complete pass, log the files that
    were skipped (count and first names)."""
    seen = []
    for batch in batches:
      seen.append(batch.pop("file_index"))
      yield batch
    used = np.concatenate(seen) if seen else np.zeros((0,), np.int64)
    skipped = [self.paths[i] for i in np.setdiff1d(np.arange(len(self)), used)]
    if skipped:
      logging.warning("%s: skipped %d of %d image files that could not be read or decoded; "
                      "first: %s", what, len(skipped), len(self), ", ".join(skipped[:5]))


@dataclasses.dataclass(frozen=True)
class FolderSource:
  """A local image folder as a dataset: config.dataset.name = 'folder:<root>'.

  <root>/<class>/<image files> (below a class folder, sub-folders are read
  too; hidden files are not): labels index the sorted class folder names.
  Splits: 'train' (and the root's own name) is the whole root; any other name
  is the sibling folder of that name, with the same class folders, e.g. root
  .../bg_challenge/original/train, split 'val' -> .../original/val. Each image
  has an id (folder_image_id) unique within its split; ContraCAM writes its
  boxes and masks under it and OA-crop / BG-mixup look them up by it. Files
  that cannot be read or decoded are skipped (evaluation, ContraCAM) or
  replaced (training, see TrainData), and logged with their count.
  """
  FEATURES = ("image", "label", "image/id")  # what make_preprocess and _example_id key on

  name: str                        # 'folder:<root>', as in config.dataset.name
  root: str
  class_names: tuple[str, ...]

  @classmethod
  def open(cls, name: str) -> "FolderSource":
    root = os.path.expanduser(name[len(FOLDER_PREFIX):])
    root = os.path.normpath(root) if root else ""
    if not root or not os.path.isdir(root):
      raise DatasetNotFoundError(f"config.dataset.name={name!r}: {root!r} is not a folder of "
                                 f"<class>/<image> folders")
    from ocl_jax.data import eval_datasets
    source = cls(name=name, root=root, class_names=tuple(eval_datasets._subfolders(root)))
    source.files("train")  # an empty folder fails here, when the dataset is chosen
    return source

  def split_dir(self, split: str) -> str:
    if not isinstance(split, str) or not split:
      raise ValueError(f"config.dataset.name={self.name!r}: folder splits are folder names, "
                       f"got {split!r}")
    if split in ("train", os.path.basename(self.root)):
      return self.root
    path = os.path.join(os.path.dirname(self.root), split)
    if os.sep in split or "/" in split or not os.path.isdir(path):
      raise DatasetNotFoundError(
          f"config.dataset.name={self.name!r} has no split {split!r}: a folder dataset's split "
          f"is 'train' (the folder itself) or the name of a sibling folder of {self.root} "
          f"({path} does not exist)")
    return path

  def files(self, split: str) -> FolderFiles:
    """Every image file of `split`, sorted by class then path (a fresh listing)."""
    from ocl_jax.data import eval_datasets
    path = self.split_dir(split)
    what = f"config.dataset.name={self.name!r}" + ("" if path == self.root else f" split {split!r}")
    pairs = eval_datasets._class_folder_files(path, self.class_names, what)
    ids = tuple(folder_image_id(os.path.relpath(p, path)) for p, _ in pairs)
    if len(set(ids)) < len(ids):
      seen, dups = set(), []
      for p, i in zip(pairs, ids):
        if i in seen:
          dups.append(f"{p[0]} ({i})")
        seen.add(i)
      raise ValueError(f"{what}: {len(dups)} image files have the id of another file (same path "
                       f"up to extension or whitespace), e.g. {', '.join(dups[:3])}; rename them")
    return FolderFiles(tuple(p for p, _ in pairs), tuple(int(label) for _, label in pairs), ids)

  def records(self, split: str) -> tf.data.Dataset:
    return self.files(split).records()
