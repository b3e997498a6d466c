"""The tf.data readers: TFDS datasets and local image folders.

The only modules that need TensorFlow and TFDS are this one and preprocess.py
(the decode-side preprocessing they share); sources, train_data, eval_data and
prechecks import them only when a TFDS dataset or an image folder is read, so
`scenes` (array_reader) and the whole compute path run on a plain JAX install.
Every function here returns host batches of the same layout the array reader
gives (see train_data.TrainData and eval_data).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ocl_jax.data import sources
from ocl_jax.data import train_data
from ocl_jax.data.array_reader import MAX_GT_BOXES
from ocl_jax.data.array_reader import pad_batch
from ocl_jax.data.errors import DatasetNotFoundError
from ocl_jax.data.folders import decode_image_file
from ocl_jax.data.folders import FolderFiles
from ocl_jax.data.preprocess import example_id
from ocl_jax.data.preprocess import make_preprocess
from ocl_jax.data.preprocess import raise_lookup_errors
from ocl_jax.data.preprocess import xyxy

# tf.data only feeds the host: TensorFlow stays off every accelerator, and TFDS prints one line
# per prepared dataset instead of progress bars.
try:
  tf.config.experimental.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow's devices were already initialised by the caller
  pass
tfds.disable_progress_bar()

COCO_CROP_MIN_AREA = 0.01  # COCO-Crop, docs/method.md#coco-crop
COCO_CROP_MARGIN = 0.2

# ----------------------------------------------------------------------------
# TFDS builders and splits.


def _prepare_hint(name: str, data_dir: str) -> str:
  base = name.split("/")[0]
  if base == "coco":
    return (
        f"Download the COCO 2017 zips (train2017, val2017, annotations_trainval2017) and run "
        f"`tfds build {name} --data_dir={data_dir} --manual_dir=<folder with the zips>` "
        f"on a machine with the files, or copy an existing TFDS coco/2017 folder into "
        f"{data_dir}."
    )
  return f"Prepare it with `tfds build {name} --data_dir={data_dir}` or copy a prepared copy there."


def get_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `name` in data_dir."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotFoundError(f"Unknown TFDS dataset {name!r} (config.dataset.name): {e}") from e
  return builder


def open_split(
    builder: Any,
    split: Any,
    *,
    shuffle_seed: int | None = None,
    decoders: Any = None,
    add_tfds_id: bool = False,
) -> tf.data.Dataset:
  """builder.as_dataset with a clear error when the data is not where the config says.

  For a FolderSource: the file records of `split` (image/filename, label,
  image/id), listed order, not decoded; its cardinality is the listed count.
  """
  if sources.kind(builder) == "folder":
    del shuffle_seed  # folder streams are ordered by TrainData
    return builder.records(split)
  # Ordered reads are often cut short (.take(n) of an evaluation split); TFDS's automatic cache
  # of small splits would then warn that the cache was not filled. The data are the same.
  read_config = tfds.ReadConfig(
      shuffle_seed=shuffle_seed,
      interleave_cycle_length=16,
      skip_prefetch=True,
      add_tfds_id=add_tfds_id,
      try_autocache=shuffle_seed is not None,
  )
  try:
    return builder.as_dataset(
        split=split,
        shuffle_files=shuffle_seed is not None,
        read_config=read_config,
        decoders=decoders,
    )
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


def class_names(builder: tfds.core.DatasetBuilder, key: str) -> tuple[str, ...]:
  """The names of the ClassLabel at `key` ('label', 'objects/label')."""
  feature = builder.info.features
  for part in key.split("/"):
    feature = feature[part]
    if isinstance(feature, tfds.features.Sequence):
      feature = feature.feature
  return tuple(feature.names)


def open_process_shard(builder: Any, split: str) -> tf.data.Dataset:
  """This process's shard of a TFDS split, in order (evaluation reads every example once)."""
  return open_split(builder, tfds.split_for_jax_process(split, drop_remainder=False))


def whole_split(split: str) -> Any:
  """`split` as one process reads it (the training stream's global order)."""
  return tfds.split_for_jax_process(split, process_index=0, process_count=1, drop_remainder=True)


def image_features(builder: Any) -> list[str]:
  """Top-level Image features of a TFDS dataset: the ones worth decoding only when kept."""
  if sources.kind(builder) == "folder":
    return []
  return [k for k, f in builder.info.features.items() if isinstance(f, tfds.features.Image)]


def base_split_name(split: Any) -> str:
  """'train[:50%]' -> 'train' (the split whose files a tfds_id names)."""
  return str(split).split("[", 1)[0].strip()


def tfds_example_index(
    builder: "tfds.core.DatasetBuilder", split: Any
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
      default_value=-1,
  )

  def index_of(tfds_id: tf.Tensor) -> tf.Tensor:
    parts = tf.strings.split(tfds_id, "__")
    offset = table.lookup(parts[0])
    check = tf.debugging.assert_non_negative(
        offset, message="tfds_id names a shard file the split's metadata does not list"
    )
    with tf.control_dependencies([check]):
      return tf.cast(offset + tf.strings.to_number(parts[-1], tf.int64), tf.int32)

  return index_of, int(info.num_examples)


# ----------------------------------------------------------------------------
# Training epochs (train_data.TrainData of a TFDS dataset or a folder).


def train_host_batches(data: Any, epoch: int, skip_batches: int) -> Iterator[dict[str, np.ndarray]]:
  """This process's host batches of `epoch` from batch `skip_batches` on."""
  return raise_lookup_errors(tfds.as_numpy(train_epoch(data, epoch, skip_batches)))


def _own_slice(data: Any, ds: tf.data.Dataset) -> tf.data.Dataset:
  """The elements of this process's slice of each global batch (all on one process)."""
  if data.process_count == 1:
    return ds
  b, g, p = data.local_batch, data.global_batch, data.process_index
  return ds.enumerate().filter(lambda i, _: i % g // b == p).map(lambda _, ex: ex)


def _preprocess(data: Any):
  return make_preprocess(
      data.builder, data.image_size, data.region_boxes, data.fg_masks, data.mask_ids
  )


def train_epoch(data: Any, epoch: int, skip_batches: int = 0) -> tf.data.Dataset:
  """The tf.data pipeline of one epoch of `data` (a train_data.TrainData)."""
  if data.files is not None:
    return _folder_epoch(data, epoch, skip_batches)
  seed = train_data.epoch_seed(data.seed, epoch)
  # Several processes: images are decoded after the slice, only by the process that keeps them.
  deferred = image_features(data.builder) if data.process_count > 1 else []
  ds = open_split(
      data.builder,
      data.split,
      shuffle_seed=seed,
      decoders={k: tfds.decode.SkipDecoding() for k in deferred} or None,
      add_tfds_id=data.with_index,
  )
  ds = ds.shuffle(data.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
  ds = ds.take(data.steps_per_epoch * data.global_batch)
  ds = ds.skip(skip_batches * data.global_batch)
  ds = _own_slice(data, ds)
  preprocess, feats = _preprocess(data), sources.features(data.builder)
  if data.with_index:
    index_of = tfds_example_index(data.builder, data.index_split)[0]
    base_preprocess = preprocess
    preprocess = lambda ex: {**base_preprocess(ex), "index": index_of(ex["tfds_id"])}
  if deferred:
    decode = lambda ex: {**ex, **{k: feats[k].decode_example(ex[k]) for k in deferred}}
    ds = ds.map(
        lambda ex: preprocess(decode(ex)), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
  else:
    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(data.local_batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def _folder_epoch(data: Any, epoch: int, skip_batches: int) -> tf.data.Dataset:
  n, k = len(data.files), train_data.FALLBACK_CANDIDATES
  order, alt = (tf.constant(x, tf.int64) for x in data.folder_order(epoch))
  load = data.files.loader()

  def slot_example(slot):
    fallbacks = tf.gather(alt, (slot + tf.range(k, dtype=tf.int64)) % n)
    candidates = tf.concat([order[slot][None], fallbacks], 0)
    ds = tf.data.Dataset.from_tensor_slices(candidates).map(load).ignore_errors().take(1)
    return ds.map(lambda ex: {**ex, "slot": slot})

  ds = tf.data.Dataset.range(data.steps_per_epoch * data.global_batch)
  ds = _own_slice(data, ds.skip(skip_batches * data.global_batch))  # before decoding
  ds = ds.interleave(
      slot_example,
      cycle_length=tf.data.AUTOTUNE,
      block_length=1,
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
  )
  preprocess = _preprocess(data)
  ds = ds.map(
      lambda ex: {
          **preprocess(ex),
          "id": ex["image/id"],
          "slot": ex["slot"],
          "file_index": ex["file_index"],
      },
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
  )
  ds = ds.batch(data.local_batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def training_ids(data: Any) -> list[str]:
  """The ids (example_id) of every training example of a TFDS dataset, read without images."""
  feats = sources.features(data.builder)
  # Images stay encoded (SkipDecoding; tfds' PartialDecoding would print a deprecation warning).
  skip = {k: tfds.decode.SkipDecoding() for k in image_features(data.builder)}
  ds = open_split(data.builder, data.split, decoders=skip or None)
  ds = ds.map(lambda ex: example_id(ex, feats)).batch(4096)
  return [i.decode() for batch in tfds.as_numpy(ds) for i in batch]


def decodable(path: str) -> bool:
  """Whether an image file can be read and decoded (what folder training replaces if not)."""
  try:
    decode_image_file(tf.constant(path))
    return True
  except tf.errors.OpError:
    return False


# ----------------------------------------------------------------------------
# Ordered evaluation reads (eval_data).


def _longest_shard(builder: Any, split: str) -> int:
  """Examples in the largest process shard of `split` (listed files for folders)."""
  n = jax.process_count()
  if sources.kind(builder) == "folder":
    return -(-len(builder.files(split)) // n)  # shard 0 of every n-th file
  return max(
      builder.info.splits[s].num_examples for s in tfds.even_splits(split, n, drop_remainder=False)
  )


def eval_batches(
    config: Any,
    builder: Any,
    split: str,
    local_batch: int,
    max_batches: int | None,
) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's shard of `split`, in order; the last batch is padded and
  every batch carries `valid` (1 for real examples), so no example is dropped or counted twice.

  With several processes (shards of one example more or less) each yields the same number
  of batches, the longest shard's, padding with empty ones: the pmapped step that consumes
  them has collectives, which every process must run equally often.
  """
  d = config.dataset
  files = None
  if sources.kind(builder) == "folder":
    files = builder.files(split).shard(jax.process_index(), jax.process_count())
    ds = files.decoded()
  else:
    ds = open_process_shard(builder, split)
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
    yield pad_batch(batch, local_batch)
  empty = {
      k: np.zeros((local_batch,) + tuple(spec.shape[1:]), spec.dtype.as_numpy_dtype)
      for k, spec in ds.element_spec.items()
      if k not in keep
  }
  for _ in range(i, num_batches or 0):  # this shard ran out before the longest one
    yield empty


def localization_batches(
    config: Any, builder: Any, split: str, batch_size: int, max_examples: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
  """This process's shard of `split` in order, with ids and whatever ground truth exists.

  Yields host batches (the last one smaller): image (B,S,S,3) uint8, id (B,) str,
  and when the dataset has them gt_mask (B,S,S) float32 in {0,1} (scenes `mask`,
  CUB `segmentation_mask`), gt_boxes (B,K,4) x1,y1,x2,y2 with gt_box_valid (B,K).
  """
  d = config.dataset
  if sources.kind(builder) == "folder":
    yield from _folder_localization_batches(builder, split, d.image_size, batch_size, max_examples)
    return
  feats = builder.info.features
  size = d.image_size
  ds = open_process_shard(builder, split)
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
    source: Any, split: str, size: int, batch_size: int, max_examples: int | None
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
# Evaluation datasets (eval_datasets.EvalDataset) of TFDS and folders: the evaluation view.


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


def folder_shard(ds: Any, split: str, max_examples: int | None = None) -> FolderFiles:
  """This process's share of a folder split (every process_count-th file), at most
  max_examples of them."""
  if split not in ds.files:
    raise ValueError(f"{ds.name} has no split {split!r}; it has {sorted(ds.files)}")
  return FolderFiles.from_pairs(ds.files[split]).shard(
      jax.process_index(), jax.process_count(), max_examples
  )


def split_batches(
    ds: Any,
    split: str,
    *,
    image_size: int,
    crop_fraction: float,
    batch_size: int,
    data_dir: str | None = None,
    max_examples: int | None = None,
    with_ids: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
  """eval_data.split_batches of a TFDS dataset, COCO-Crop or a folder (the same batches)."""
  limit = max_examples is not None and max_examples >= 0
  files = None
  if ds.source == "folder":
    files = folder_shard(ds, split, max_examples)
    data = files.decoded(
        lambda ex: {
            "image": resize_center_crop(ex["image"], image_size, crop_fraction),
            "label": ex["label"],
            "file_index": ex["file_index"],
        }
    )
  else:
    builder = get_builder(ds.tfds_name, data_dir or ds.data_dir)
    data = open_process_shard(builder, split)
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


def tfds_split_size(ds: Any, split: str, data_dir: str | None) -> int | None:
  """Examples in this process's shard of a TFDS split, from its metadata."""
  builder = get_builder(ds.tfds_name, data_dir or ds.data_dir)
  n = int(open_process_shard(builder, split).cardinality())
  return n if n >= 0 else None
