"""Where datasets come from, behind one interface: `scenes` arrays, local image folders, TFDS.

Every reader (training, evaluation, ContraCAM) opens data through get_builder,
so a dataset missing from the configured data dir fails with the same
DatasetNotFoundError and a hint how to prepare it, and `folder:<root>` names
work wherever a TFDS name does (see folders.FolderSource). This module needs no
TensorFlow: `scenes` is NumPy arrays (array_reader.ArraySource), a folder is a
file listing, and only a TFDS name imports the tf.data readers (tf_readers).
"""

from __future__ import annotations

from typing import Any

from ocl_jax.data import scenes

FOLDER_PREFIX = "folder:"

# What get_builder returns: a TFDS builder, a folders.FolderSource or an array_reader.ArraySource.
Builder = Any


def is_folder_dataset(name: str) -> bool:
  """Whether config.dataset.name names a local image folder ('folder:<root>')."""
  return isinstance(name, str) and name.startswith(FOLDER_PREFIX)


def get_builder(name: str, data_dir: str | None) -> Builder:
  """The dataset `name` names: `scenes[/<config>]` (rendered into data_dir on first use),
  `folder:<root>` or a TFDS dataset in data_dir."""
  if is_folder_dataset(name):
    from ocl_jax.data.folders import FolderSource

    return FolderSource.open(name)
  if scenes.is_scenes_name(name):
    from ocl_jax.data.array_reader import ArraySource

    return ArraySource.scenes(name, data_dir)
  from ocl_jax.data import tf_readers  # TensorFlow only for TFDS datasets

  return tf_readers.get_builder(name, data_dir)


def kind(builder: Builder) -> str:
  """'arrays', 'folder' or 'tfds': which reader reads `builder`."""
  return getattr(builder, "SOURCE_KIND", "tfds")


def full_name(builder: Builder) -> str:
  return builder.name if kind(builder) != "tfds" else builder.info.full_name


def features(builder: Builder) -> Any:
  """The feature dict (TFDS) or the feature names (arrays, folders) the readers key on."""
  return builder.FEATURES if kind(builder) != "tfds" else builder.info.features


def has_feature(builder: Builder, key: str) -> bool:
  """Whether examples carry `key` ('label', 'mask', 'image/id', 'objects/bbox', ...)."""
  feats = features(builder)
  if kind(builder) != "tfds":
    return key in feats
  head, _, rest = key.partition("/")
  if key in feats:
    return True
  return bool(rest) and head in feats and rest in getattr(feats[head], "feature", {})


def num_classes(builder: Builder) -> int:
  """Classes of the per-image label used by the online probe (0 if none)."""
  if kind(builder) != "tfds":
    return len(builder.class_names)
  from ocl_jax.data import tf_readers

  return tf_readers.num_classes(builder)


def num_examples(builder: Builder, split: str) -> int | None:
  """Examples in `split` (all processes), None when unknown without reading it."""
  if kind(builder) == "arrays":
    return builder.num_examples(split)
  if kind(builder) == "folder":
    return len(builder.files(split))
  from ocl_jax.data import tf_readers

  n = int(tf_readers.open_split(builder, split).cardinality())
  return n if n >= 0 else None
