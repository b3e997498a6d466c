"""Local image folders: the one implementation of listing, ids, decoding and skip accounting.

Training (`folder:<root>` as config.dataset.name), ContraCAM's box and mask
writers and the evaluation registry (imagenet9, objectnet9, si_score,
`folder:<path>`) all read <root>/<class>/<image files> through this module, so
the files, their order, their ids and which files count as unreadable agree
everywhere. Nothing here keeps state between calls: a listing is made when
asked for, and the files skipped by a pass are handed to the caller.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Iterator, TYPE_CHECKING

from absl import logging
import numpy as np

from ocl_jax.data.errors import DatasetNotFoundError
from ocl_jax.data.sources import FOLDER_PREFIX

if TYPE_CHECKING:  # TensorFlow is imported where a folder is read, not to list one
  import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def folder_image_id(relative_path: str) -> str:
  """The id of a folder image: its path relative to the split folder, without extension,
  '/' replaced by '__' and whitespace by '_' (ids name mask PNGs in one flat folder and
  must be single tokens in box files). E.g. '02_wheeled vehicle/n0402_77.JPEG' ->
  '02_wheeled_vehicle__n0402_77'."""
  stem = os.path.splitext(relative_path.replace(os.sep, "/"))[0]
  return re.sub(r"\s", "_", stem.replace("/", "__"))


# ----------------------------------------------------------------------------
# Listing.


def subfolders(path: str) -> list[str]:
  """Sorted names of the non-hidden folders in `path` (class or factor folders)."""
  return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def image_files(path: str) -> list[str]:
  """Image files below `path` (recursively), sorted, hidden files and folders left out."""
  out = []
  for dirpath, dirnames, filenames in os.walk(path):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    out.extend(
        os.path.join(dirpath, f)
        for f in sorted(filenames)
        if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
    )
  return out


def require_dir(path: str, what: str) -> None:
  """Fail early, naming the setting (`what`), when a folder the layout needs is missing."""
  if not os.path.isdir(path):
    raise ValueError(f"{what}: folder {path} does not exist")


def class_folder_files(
    path: str, classes: tuple[str, ...], what: str
) -> tuple[tuple[str, int], ...]:
  """(file, index in `classes`) of every image in <path>/<class>/, classes in sorted order."""
  require_dir(path, what)
  found = subfolders(path)
  unknown = [c for c in found if c not in classes]
  if unknown:
    raise ValueError(
        f"{what}: class folders {unknown} in {path} are not among the classes " f"{list(classes)}"
    )
  files = tuple((f, classes.index(c)) for c in found for f in image_files(os.path.join(path, c)))
  if not files:
    raise ValueError(
        f"{what}: no images ({', '.join(IMAGE_EXTENSIONS)}) in <class> folders " f"of {path}"
    )
  return files


# ----------------------------------------------------------------------------
# Reading.


def decode_image_file(path: tf.Tensor) -> tf.Tensor:
  """uint8 (H, W, 3): grayscale becomes RGB, alpha is dropped, an animation gives its first
  frame; fails on unreadable or undecodable files (the callers skip those)."""
  import tensorflow as tf  # only where a folder is read

  return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)


@dataclasses.dataclass(frozen=True)
class FolderFiles:
  """Image files of a folder split in a fixed order, with labels and ids."""

  paths: tuple[str, ...]
  labels: tuple[int, ...]
  ids: tuple[str, ...]

  @classmethod
  def from_pairs(cls, pairs: tuple[tuple[str, int], ...]) -> "FolderFiles":
    """Files of an evaluation split ((path, label), ...); evaluation needs no ids, so the
    paths stand in for them."""
    paths = tuple(p for p, _ in pairs)
    return cls(paths, tuple(int(label) for _, label in pairs), paths)

  def __len__(self) -> int:
    return len(self.paths)

  def shard(self, index: int, count: int, limit: int | None = None) -> "FolderFiles":
    """Every count-th file from `index` (this process's share), at most `limit` of them."""
    end = None if limit is None or limit < 0 else limit
    return FolderFiles(
        self.paths[index::count][:end],
        self.labels[index::count][:end],
        self.ids[index::count][:end],
    )

  def records(self) -> tf.data.Dataset:
    """Undecoded records (image/filename, label, image/id, file_index), in order."""
    import tensorflow as tf  # only where a folder is read

    return tf.data.Dataset.from_tensor_slices(
        {
            "image/filename": tf.constant(self.paths, tf.string, shape=(len(self),)),
            "label": tf.constant(self.labels, tf.int32, shape=(len(self),)),
            "image/id": tf.constant(self.ids, tf.string, shape=(len(self),)),
            "file_index": tf.range(len(self), dtype=tf.int64),
        }
    )

  def loader(self) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    """file index -> decoded example (image, label, image/id, file_index); fails on files
    that cannot be read or decoded."""
    import tensorflow as tf  # only where a folder is read

    paths = tf.constant(self.paths, tf.string, shape=(len(self),))
    labels = tf.constant(self.labels, tf.int32, shape=(len(self),))
    ids = tf.constant(self.ids, tf.string, shape=(len(self),))

    def load(index):
      return {
          "image": decode_image_file(tf.gather(paths, index)),
          "label": tf.gather(labels, index),
          "image/id": tf.gather(ids, index),
          "file_index": tf.cast(index, tf.int64),
      }

    return load

  def decoded(self, transform: Callable[[dict], dict] | None = None) -> tf.data.Dataset:
    """Decoded examples in order, passed through `transform` if given; files that cannot be
    read, decoded or transformed are left out (their file_index is then missing from the
    stream, see track_unreadable)."""
    import tensorflow as tf  # only where a folder is read

    load = self.loader()
    fn = load if transform is None else (lambda index: transform(load(index)))
    ds = tf.data.Dataset.range(len(self))
    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()

  def track_unreadable(
      self,
      batches: Iterator[dict[str, np.ndarray]],
      what: str,
      on_complete: Callable[[tuple[str, ...]], None] | None = None,
  ) -> Iterator[dict[str, np.ndarray]]:
    """Pass `batches` on without their file_index; after a complete pass, log the files that
    were skipped (count and first names) and hand them to `on_complete`."""
    seen = []
    for batch in batches:
      seen.append(batch.pop("file_index"))
      yield batch
    used = np.concatenate(seen) if seen else np.zeros((0,), np.int64)
    skipped = tuple(self.paths[i] for i in np.setdiff1d(np.arange(len(self)), used))
    if on_complete is not None:
      on_complete(skipped)
    if skipped:
      logging.warning(
          "%s: skipped %d of %d image files that could not be read or decoded; " "first: %s",
          what,
          len(skipped),
          len(self),
          ", ".join(skipped[:5]),
      )


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
  replaced (training, see train_data.TrainData), and logged with their count.
  """

  FEATURES = ("image", "label", "image/id")  # what make_preprocess and example_id key on
  SOURCE_KIND = "folder"

  name: str  # 'folder:<root>', as in config.dataset.name
  root: str
  class_names: tuple[str, ...]

  @classmethod
  def open(cls, name: str) -> "FolderSource":
    root = os.path.expanduser(name[len(FOLDER_PREFIX) :])
    root = os.path.normpath(root) if root else ""
    if not root or not os.path.isdir(root):
      raise DatasetNotFoundError(
          f"config.dataset.name={name!r}: {root!r} is not a folder of " f"<class>/<image> folders"
      )
    source = cls(name=name, root=root, class_names=tuple(subfolders(root)))
    source.files("train")  # an empty folder fails here, when the dataset is chosen
    return source

  def split_dir(self, split: str) -> str:
    if not isinstance(split, str) or not split:
      raise ValueError(
          f"config.dataset.name={self.name!r}: folder splits are folder names, " f"got {split!r}"
      )
    if split in ("train", os.path.basename(self.root)):
      return self.root
    path = os.path.join(os.path.dirname(self.root), split)
    if os.sep in split or "/" in split or not os.path.isdir(path):
      raise DatasetNotFoundError(
          f"config.dataset.name={self.name!r} has no split {split!r}: a folder dataset's split "
          f"is 'train' (the folder itself) or the name of a sibling folder of {self.root} "
          f"({path} does not exist)"
      )
    return path

  def files(self, split: str) -> FolderFiles:
    """Every image file of `split`, sorted by class then path (a fresh listing)."""
    path = self.split_dir(split)
    what = f"config.dataset.name={self.name!r}" + ("" if path == self.root else f" split {split!r}")
    pairs = class_folder_files(path, self.class_names, what)
    ids = tuple(folder_image_id(os.path.relpath(p, path)) for p, _ in pairs)
    if len(set(ids)) < len(ids):
      seen, dups = set(), []
      for p, i in zip(pairs, ids):
        if i in seen:
          dups.append(f"{p[0]} ({i})")
        seen.add(i)
      raise ValueError(
          f"{what}: {len(dups)} image files have the id of another file (same path "
          f"up to extension or whitespace), e.g. {', '.join(dups[:3])}; rename them"
      )
    return FolderFiles(tuple(p for p, _ in pairs), tuple(int(label) for _, label in pairs), ids)

  def records(self, split: str) -> tf.data.Dataset:
    return self.files(split).records()
