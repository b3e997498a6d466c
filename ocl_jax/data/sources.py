"""Where datasets come from: TFDS builders and local image folders, behind one interface.

Every reader (training, evaluation, ContraCAM) opens data through get_builder
and open_split, so a dataset missing from the configured data dir fails with the
same DatasetNotFoundError and a hint how to prepare it, and `folder:<root>`
names work wherever a TFDS name does (see folders.FolderSource).
"""

from __future__ import annotations

from typing import Any, Callable, Union

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ocl_jax.data.errors import DatasetNotFoundError
from ocl_jax.data.folders import FolderSource
from ocl_jax.data.folders import is_folder_dataset

# Datasets generated locally by their builder (no download): prepared on first use.
LOCALLY_GENERATED = ("scenes",)

# What get_builder returns: a TFDS builder or a local image folder.
Builder = Union[tfds.core.DatasetBuilder, FolderSource]


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


def get_builder(name: str, data_dir: str | None) -> Builder:
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


def open_split(
    builder: Builder,
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
  if isinstance(builder, FolderSource):
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


def num_classes(builder: Builder) -> int:
  """Classes of the per-image label used by the online probe (0 if none)."""
  if isinstance(builder, FolderSource):
    return len(builder.class_names)
  feats = builder.info.features
  if "label" in feats and isinstance(feats["label"], tfds.features.ClassLabel):
    return feats["label"].num_classes
  if "objects" in feats and "label" in feats["objects"].feature:
    return feats["objects"].feature["label"].num_classes
  return 0


def open_process_shard(builder: Builder, split: str) -> tf.data.Dataset:
  """This process's shard of a TFDS split, in order (evaluation reads every example once)."""
  return open_split(builder, tfds.split_for_jax_process(split, drop_remainder=False))


def features(builder: Builder) -> Any:
  """The feature dict (TFDS) or the feature names (folders) that the preprocessing keys on."""
  if isinstance(builder, FolderSource):
    return FolderSource.FEATURES
  return builder.info.features


def image_features(builder: Builder) -> list[str]:
  """Top-level Image features of a TFDS dataset: the ones worth decoding only when kept."""
  if isinstance(builder, FolderSource):
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
