"""Labelled datasets that frozen encoders are evaluated on (linear probe, kNN), by name.

Every dataset, whatever its source (a TFDS builder, COCO instances cropped on
the fly, or a local image folder), is read the same way: this process's shard
of a split, in a fixed order, resized on its shorter side and centre-cropped
(docs/method.md#evaluation), as host uint8 batches padded to a fixed size with a
`valid` mask, so every example is counted exactly once.

Registry (`get_eval_dataset(name)`):
  scenes             TFDS `scenes_name`: train_labeled / val / test + shifted tests
  coco_crop          COCO 2017 instances (area >= 1%, margin 0.2), 80 classes
  caltech_birds2011, oxford_flowers102, food101, oxford_iiit_pet, cifar10, cifar100
  imagenet9          ImageNet-9 backgrounds challenge folder (`bg_challenge`)
  objectnet9         test only, scored with the imagenet9 probe
  si_score           test only, one test per factor folder, imagenet9 probe
  folder:<path>      <path>/{train,val,test}/<class>/*, val optional

Local image folders may hold undecodable files (truncated downloads, stray
non-images): they are skipped, not fatal. After a complete pass over a split
the skipped files are logged as a warning and returned by `last_skipped`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Mapping

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ocl_jax.data import input_pipeline

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# ImageNet-9 (Xiao et al. 2020) class folders; the head of objectnet9 / si_score
# when config.evaluation.folders.imagenet9 is not given.
IMAGENET9_CLASSES = ("00_dog", "01_bird", "02_wheeled vehicle", "03_reptile", "04_carnivore",
                     "05_insect", "06_musical instrument", "07_primate", "08_fish")
IMAGENET9_VARIANTS = ("original", "mixed_same", "mixed_rand", "only_fg")
VAL_EVERY = 10  # folder datasets without a val split: every 10th file of each class is val
COCO_CROP_MIN_AREA = 0.01  # COCO-Crop, docs/method.md#coco-crop
COCO_CROP_MARGIN = 0.2

# TFDS transfer sets -> (train, val, test) in the builder's real split names; a
# missing validation split is the last 10% of train, a missing test split is
# `validation` (food101).
TFDS_TRANSFER = {
    "caltech_birds2011": ("train[:90%]", "train[90%:]", "test"),
    "oxford_flowers102": ("train", "validation", "test"),
    "food101": ("train[:90%]", "train[90%:]", "validation"),
    "oxford_iiit_pet": ("train[:90%]", "train[90%:]", "test"),
    "cifar10": ("train[:90%]", "train[90%:]", "test"),
    "cifar100": ("train[:90%]", "train[90%:]", "test"),
}
SCENES_TESTS = {"test": "test", "mixed_same": "test_mixed_same", "mixed_rand": "test_mixed_rand",
                "only_fg": "test_only_fg", "single": "test_single"}
KNOWN_NAMES = ("scenes", "coco_crop", *TFDS_TRANSFER, "imagenet9", "objectnet9", "si_score",
               "folder:<path>")


@dataclasses.dataclass(frozen=True)
class EvalDataset:
  """A labelled evaluation dataset: its classes, which split plays which role, where it lives.

  For folder datasets the file lists are made once here, so a missing or
  empty folder fails when the dataset is chosen, not halfway through an
  evaluation, and every pass reads the same files in the same order.
  """
  name: str                      # registry name, e.g. 'scenes', 'cifar10', 'imagenet9'
  class_names: tuple[str, ...]
  train: str | None              # split used to fit the probe (None for test-only sets)
  val: str | None                # split used to choose the L2 weight
  tests: dict[str, str] = dataclasses.field(hash=False)  # display name -> split
  head_from: str | None = None   # test-only sets: dataset whose probe is applied; the labels
                                 # here already index its class_names (matched by name)
  source: str = "tfds"           # 'tfds' | 'coco_crop' | 'folder'
  tfds_name: str | None = None   # tfds and coco_crop: the builder name
  data_dir: str | None = None    # tfds and coco_crop: default TFDS data dir
  root: str | None = None        # folder: the root folder
  files: Mapping[str, tuple[tuple[str, int], ...]] = dataclasses.field(
      default_factory=dict, repr=False, hash=False)  # folder: split -> ((path, label), ...)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def splits(self) -> tuple[str, ...]:
    """Every split this dataset uses (train, val, tests), without repeats."""
    names = [s for s in (self.train, self.val, *self.tests.values()) if s is not None]
    return tuple(dict.fromkeys(names))


# ----------------------------------------------------------------------------
# Registry.


def get_eval_dataset(name: str, *, scenes_name: str = "scenes/default",
                     folders: Mapping[str, str] | None = None, data_dir: str | None = None
                     ) -> EvalDataset:
  """The evaluation dataset registered as `name` (see the module docstring).

  folders: roots of the local image-folder datasets by name
  (config.evaluation.folders); data_dir: the TFDS data dir.
  """
  folders = folders if folders is not None else {}
  if name == "scenes":
    builder = input_pipeline.get_builder(scenes_name, data_dir)
    return EvalDataset(name=name, class_names=_class_names(builder, "label"),
                       train="train_labeled", val="val", tests=dict(SCENES_TESTS),
                       tfds_name=scenes_name, data_dir=data_dir)
  if name == "coco_crop":
    builder = input_pipeline.get_builder("coco/2017", data_dir)
    return EvalDataset(name=name, class_names=_class_names(builder, "objects/label"),
                       train="train[:90%]", val="train[90%:]", tests={"test": "validation"},
                       source="coco_crop", tfds_name="coco/2017", data_dir=data_dir)
  if name in TFDS_TRANSFER:
    train, val, test = TFDS_TRANSFER[name]
    builder = input_pipeline.get_builder(name, data_dir)
    return EvalDataset(name=name, class_names=_class_names(builder, "label"), train=train,
                       val=val, tests={"test": test}, tfds_name=name, data_dir=data_dir)
  if name == "imagenet9":
    return _imagenet9(_folder_root(name, folders))
  if name == "objectnet9":
    root = _folder_root(name, folders)
    head = _imagenet9_classes(folders)
    files = _class_folder_files(root, head, f"{name} ({root})")
    return EvalDataset(name=name, class_names=head, train=None, val=None,
                       tests={"test": "test"}, head_from="imagenet9", source="folder",
                       root=root, files={"test": files})
  if name == "si_score":
    root = _folder_root(name, folders)
    head = _imagenet9_classes(folders)
    factors = _subfolders(root)
    if not factors:
      raise ValueError(f"si_score folder {root} has no factor folders (e.g. area, location, "
                       f"rotation), each holding <class>/<image> files")
    files = {f: _class_folder_files(os.path.join(root, f), head, f"si_score factor {f!r}")
             for f in factors}
    return EvalDataset(name=name, class_names=head, train=None, val=None,
                       tests={f: f for f in factors}, head_from="imagenet9", source="folder",
                       root=root, files=files)
  if name.startswith("folder:"):
    return _generic_folder(name, name[len("folder:"):])
  raise ValueError(f"Unknown evaluation dataset {name!r}; known: {', '.join(KNOWN_NAMES)}")


def _class_names(builder: tfds.core.DatasetBuilder, key: str) -> tuple[str, ...]:
  feature = builder.info.features
  for part in key.split("/"):
    feature = feature[part]
    if isinstance(feature, tfds.features.Sequence):
      feature = feature.feature
  return tuple(feature.names)


def _folder_root(name: str, folders: Mapping[str, str]) -> str:
  root = folders.get(name)
  if not root:
    raise ValueError(f"Evaluation dataset {name!r} reads a local image folder: set "
                     f"config.evaluation.folders.{name} to its root")
  root = os.path.expanduser(str(root))
  if not os.path.isdir(root):
    raise ValueError(f"config.evaluation.folders.{name}={root!r} is not a directory")
  return root


def _subfolders(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _image_files(path: str) -> list[str]:
  """Image files below `path` (recursively), sorted, hidden files and folders left out."""
  out = []
  for dirpath, dirnames, filenames in os.walk(path):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
               if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
  return out


def _require_dir(path: str, what: str) -> None:
  if not os.path.isdir(path):
    raise ValueError(f"{what}: folder {path} does not exist")


def _class_folder_files(path: str, classes: tuple[str, ...], what: str
                        ) -> tuple[tuple[str, int], ...]:
  """(file, index in `classes`) of every image in <path>/<class>/, classes in sorted order."""
  _require_dir(path, what)
  found = _subfolders(path)
  unknown = [c for c in found if c not in classes]
  if unknown:
    raise ValueError(f"{what}: class folders {unknown} in {path} are not among the classes "
                     f"{list(classes)}")
  files = tuple((f, classes.index(c)) for c in found for f in _image_files(os.path.join(path, c)))
  if not files:
    raise ValueError(f"{what}: no images ({', '.join(IMAGE_EXTENSIONS)}) in <class> folders "
                     f"of {path}")
  return files


def _hold_out_val(files: tuple[tuple[str, int], ...], what: str
                  ) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]:
  """Deterministic train/val split: every VAL_EVERY-th file of each class (sorted) is val."""
  train, val, seen = [], [], {}
  for path, label in files:
    k = seen[label] = seen.get(label, -1) + 1
    (val if k % VAL_EVERY == VAL_EVERY - 1 else train).append((path, label))
  if not val:
    raise ValueError(f"{what}: too few images to hold out a validation split (every "
                     f"{VAL_EVERY}th image of a class); add images or a val folder")
  return tuple(train), tuple(val)


def _imagenet9_classes(folders: Mapping[str, str]) -> tuple[str, ...]:
  """Classes of the imagenet9 probe: its train folders when configured, else the canonical 9."""
  if folders.get("imagenet9"):
    train = os.path.join(_folder_root("imagenet9", folders), "original", "train")
    _require_dir(train, "imagenet9")
    return tuple(_subfolders(train))
  return IMAGENET9_CLASSES


def _imagenet9(root: str) -> EvalDataset:
  missing = [p for p in [os.path.join(root, "original", "train")] +
             [os.path.join(root, v, "val") for v in IMAGENET9_VARIANTS] if not os.path.isdir(p)]
  if missing:
    raise ValueError(f"imagenet9 (config.evaluation.folders.imagenet9={root}) expects the "
                     f"bg_challenge layout; missing: {', '.join(missing)}")
  classes = tuple(_subfolders(os.path.join(root, "original", "train")))
  files = _class_folder_files(os.path.join(root, "original", "train"), classes,
                              "imagenet9 original/train")
  train, val = _hold_out_val(files, "imagenet9 original/train")
  splits = {"train": train, "val": val}
  for v in IMAGENET9_VARIANTS:
    splits[v] = _class_folder_files(os.path.join(root, v, "val"), classes, f"imagenet9 {v}/val")
  return EvalDataset(name="imagenet9", class_names=classes, train="train", val="val",
                     tests={v: v for v in IMAGENET9_VARIANTS}, source="folder", root=root,
                     files=splits)


def _generic_folder(name: str, root: str) -> EvalDataset:
  root = os.path.expanduser(root)
  if not root or not os.path.isdir(root):
    raise ValueError(f"Evaluation dataset {name!r}: {root!r} is not a directory")
  for split in ("train", "test"):
    _require_dir(os.path.join(root, split), name)
  classes = tuple(_subfolders(os.path.join(root, "train")))
  train = _class_folder_files(os.path.join(root, "train"), classes, f"{name} train")
  if os.path.isdir(os.path.join(root, "val")):
    val = _class_folder_files(os.path.join(root, "val"), classes, f"{name} val")
  else:
    train, val = _hold_out_val(train, f"{name} train")
  test = _class_folder_files(os.path.join(root, "test"), classes, f"{name} test")
  return EvalDataset(name=name, class_names=classes, train="train", val="val",
                     tests={"test": "test"}, source="folder", root=root,
                     files={"train": train, "val": val, "test": test})


# ----------------------------------------------------------------------------
# Preprocessing.


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
  out = resized[top:top + size, left:left + size]
  out = tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
  return tf.ensure_shape(out, (size, size, 3))


def coco_crop_boxes(bbox_yxyx: tf.Tensor, labels: tf.Tensor, min_area: float = COCO_CROP_MIN_AREA,
                    margin: float = COCO_CROP_MARGIN) -> tuple[tf.Tensor, tf.Tensor]:
  """COCO-Crop instances of one image (docs/method.md#coco-crop).

  Keeps every box with area >= `min_area` of the image (normalised w * h;
  degenerate boxes never), grows it by margin * (w, h) on each side and clips
  it to the image. Returns (N, 4) x1, y1, x2, y2 in [0, 1] and (N,) int32
  labels, in annotation order.
  """
  bbox = tf.cast(tf.reshape(bbox_yxyx, [-1, 4]), tf.float32)
  labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
  n = tf.minimum(tf.shape(bbox)[0], tf.shape(labels)[0])  # equal in real records
  b, labels = input_pipeline._xyxy(bbox[:n]), labels[:n]
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


def _coco_crops(size: int, crop_fraction: float):
  def per_image(ex: dict[str, Any]) -> dict[str, tf.Tensor]:
    image = ex["image"]
    boxes, labels = coco_crop_boxes(ex["objects"]["bbox"], ex["objects"]["label"])
    shape = tf.shape(image)

    def crop(box):
      top, left, h, w = tf.unstack(box_pixels(box, shape[0], shape[1]))
      return resize_center_crop(image[top:top + h, left:left + w], size, crop_fraction)

    crops = tf.map_fn(crop, boxes, fn_output_signature=tf.TensorSpec((size, size, 3), tf.uint8))
    return {"image": crops, "label": labels}
  return per_image


# ----------------------------------------------------------------------------
# Reading.

_LAST_SKIPPED: dict[tuple[str, str | None, str], tuple[str, ...]] = {}


def last_skipped(ds: EvalDataset, split: str) -> tuple[str, ...] | None:
  """Files of this process's shard of `split` that the last complete `split_batches` pass
  could not decode and skipped (len() is the count); None before any complete pass.
  Always () for TFDS datasets, whose records are validated when they are built."""
  if ds.source != "folder":
    return ()
  return _LAST_SKIPPED.get((ds.name, ds.root, split))


def _shard_files(ds: EvalDataset, split: str) -> tuple[tuple[str, int], ...]:
  if split not in ds.files:
    raise ValueError(f"{ds.name} has no split {split!r}; it has {sorted(ds.files)}")
  return ds.files[split][jax.process_index()::jax.process_count()]


def split_size(ds: EvalDataset, split: str, *, data_dir: str | None = None,
               max_examples: int | None = None) -> int | None:
  """Examples in this process's shard of `split` when known without reading it, else None.

  TFDS: the recorded count. coco_crop: None (instances are found while
  reading). Folders: the files listed, an upper bound when some cannot be
  decoded (see last_skipped).
  """
  if ds.source == "folder":
    n = len(_shard_files(ds, split))
  elif ds.source == "coco_crop":
    return None
  else:
    builder = input_pipeline.get_builder(ds.tfds_name, data_dir or ds.data_dir)
    n = int(input_pipeline.open_split(
        builder, tfds.split_for_jax_process(split, drop_remainder=False)).cardinality())
    if n < 0:
      return None
  return n if max_examples is None or max_examples < 0 else min(n, max_examples)


def split_batches(ds: EvalDataset, split: str, *, image_size: int, crop_fraction: float,
                  batch_size: int, data_dir: str | None = None, max_examples: int | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's shard of `split`, in a fixed order.

  Yields host batches of exactly `batch_size` (examples of this process):
  image uint8 (B, S, S, 3) (see resize_center_crop), label int32 (B,),
  valid int32 (B,) 1 for real examples; the last batch is padded with zeros,
  valid 0 and label -1. max_examples: read at most that many (files for
  folders, instances for coco_crop). Folder files that cannot be decoded are
  skipped; after the pass they are logged and kept for `last_skipped`.
  """
  limit = max_examples is not None and max_examples >= 0
  files = None
  if ds.source == "folder":
    files = _shard_files(ds, split)
    if limit:
      files = files[:max_examples]
    data = _folder_dataset(files, image_size, crop_fraction)
  else:
    builder = input_pipeline.get_builder(ds.tfds_name, data_dir or ds.data_dir)
    data = input_pipeline.open_split(builder, tfds.split_for_jax_process(split,
                                                                         drop_remainder=False))
    if ds.source == "coco_crop":
      data = data.map(_coco_crops(image_size, crop_fraction), num_parallel_calls=tf.data.AUTOTUNE,
                      deterministic=True).unbatch()
    else:
      data = data.map(lambda ex: {"image": resize_center_crop(ex["image"], image_size,
                                                              crop_fraction),
                                  "label": tf.cast(ex["label"], tf.int32)},
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if limit:
      data = data.take(max_examples)
  data = data.map(lambda ex: {**ex, "valid": tf.constant(1, tf.int32)})
  data = data.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  seen = []
  for batch in tfds.as_numpy(data):
    if files is not None:
      seen.append(batch.pop("index"))
    pad = batch_size - batch["valid"].shape[0]
    if pad:
      batch = {k: np.concatenate([v, np.full((pad,) + v.shape[1:], -1 if k == "label" else 0,
                                             v.dtype)]) for k, v in batch.items()}
    yield batch
  if files is not None:
    _record_skipped(ds, split, files, np.concatenate(seen) if seen else np.zeros((0,), np.int32))


def _folder_dataset(files: tuple[tuple[str, int], ...], size: int, crop_fraction: float
                    ) -> tf.data.Dataset:
  """Decoded folder images; an element whose file fails to read or decode is dropped, and
  its `index` (position in `files`) is then missing from the stream."""
  paths = [p for p, _ in files]
  labels = np.array([label for _, label in files], np.int32)

  def load(index, path, label):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return {"image": resize_center_crop(image, size, crop_fraction), "label": label,
            "index": index}

  data = tf.data.Dataset.from_tensor_slices(
      (np.arange(len(files), dtype=np.int32), tf.constant(paths, tf.string), labels))
  data = data.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return data.ignore_errors()


def _record_skipped(ds: EvalDataset, split: str, files: tuple[tuple[str, int], ...],
                    seen: np.ndarray) -> None:
  missing = np.setdiff1d(np.arange(len(files)), seen)
  skipped = tuple(files[i][0] for i in missing)
  _LAST_SKIPPED[(ds.name, ds.root, split)] = skipped
  if skipped:
    logging.warning("%s split %r: skipped %d of %d image files that could not be read or "
                    "decoded; first: %s", ds.name, split, len(skipped), len(files),
                    ", ".join(skipped[:5]))
