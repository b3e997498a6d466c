"""The training stream: this process's slice of each global batch, resumable at any step.

Datasets held as arrays (`scenes`) are read by array_reader without TensorFlow;
TFDS datasets and image folders by the tf.data readers (tf_readers), imported
only for them. Both follow the rules below and give the same batch layout.

The training stream is a pure function of (seed, step): epoch e is shuffled
with a seed derived from (seed, e), and a run resumed at step s starts at
batch s exactly (the examples before it are skipped before decoding). In a
multi-process job every process walks the same global order and keeps its
contiguous slice of each global batch (process p: examples [p*b, (p+1)*b)
of it, b = batch_size / processes), decoding only those; so the global batch
of a step is the one a single process would see, whatever the process count.

Besides TFDS names, config.dataset.name may be `folder:<root>`, a local folder
of <class>/<image files> (e.g. ImageNet-9's bg_challenge/original/train); see
folders.FolderSource. Its images are keyed by an id derived from their path
(`folders.folder_image_id`), which ContraCAM's box files and mask PNGs use too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np

from ocl_jax import parallel
from ocl_jax.data import sources
from ocl_jax.data.annotations import create_region_boxes
from ocl_jax.data.annotations import MaskIds
from ocl_jax.data.annotations import RegionBoxes
from ocl_jax.data.folders import FolderFiles

# An unreadable file's slot takes the first readable of this many other files.
FALLBACK_CANDIDATES = 16


def train_image_size(config: ml_collections.ConfigDict) -> int:
  """The square side of the training batches: dataset.train_image_size, or image_size if 0.

  Only training reads at this size; the online probe and the ContraCAM modes keep
  dataset.image_size, so a sharper training input leaves them as they were.
  """
  d = config.dataset
  return int(d.get("train_image_size", 0) or d.image_size)


def epoch_seed(seed: int, epoch: int, *extra: int) -> int:
  """The seed of epoch `epoch`'s order (extra: further streams of the same epoch)."""
  return int(np.random.SeedSequence([seed, epoch, *extra]).generate_state(1)[0] % (2**31))


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

  builder: sources.Builder
  split: Any
  local_batch: int
  num_examples: int  # in the split (every process walks all of it)
  steps_per_epoch: int
  image_size: int
  shuffle_buffer: int
  seed: int
  region_boxes: RegionBoxes | None = None  # OA-crop boxes (config.object_aware)
  fg_masks: str | None = None  # BG-mixup masks: 'gt' or a folder (config.bg_mixup.masks)
  missing_box_count: int = 0  # examples streamed so far that the box file lacks (tolerant mode)
  mask_ids: MaskIds | None = None  # the ids the BG-mixup mask folder has
  files: FolderFiles | None = None  # folder datasets: all the files (every process)
  unreadable_count: int = 0  # folder datasets: slots streamed so far whose file was unreadable
  unreadable_files: set[str] = dataclasses.field(default_factory=set)  # ... those files
  process_index: int = 0  # this process's slice of each global batch ...
  process_count: int = 1  # ... out of this many
  with_index: bool = False  # batches carry `index`, the image's position in the split (SGCL bank)
  index_size: int = 0  # ... indices are < this (the whole base split / folder)
  index_split: str = "train"  # the TFDS split named in the config (its base split is indexed)

  @property
  def global_batch(self) -> int:
    return self.local_batch * self.process_count

  def folder_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Folder datasets: (order, alt), the permutations of the files in `epoch`."""
    n = len(self.files)
    return (
        np.random.default_rng(epoch_seed(self.seed, epoch)).permutation(n),
        np.random.default_rng(epoch_seed(self.seed, epoch, 1)).permutation(n),
    )

  def epoch(self, epoch: int, skip_batches: int = 0):
    """The tf.data pipeline of `epoch` (TFDS datasets and folders only)."""
    from ocl_jax.data import tf_readers

    return tf_readers.train_epoch(self, epoch, skip_batches)

  def host_batches(self, epoch: int, skip_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This process's host batches of `epoch` from batch `skip_batches` on, from its reader."""
    if sources.kind(self.builder) == "arrays":
      from ocl_jax.data import array_reader

      return array_reader.train_host_batches(self, epoch, skip_batches)
    from ocl_jax.data import tf_readers  # TensorFlow only for TFDS datasets and folders

    return tf_readers.train_host_batches(self, epoch, skip_batches)

  def _folder_bookkeeping(
      self,
      batch: dict[str, np.ndarray],
      order: np.ndarray,
      step_in_epoch: int,
      unreadable: list[str],
  ) -> None:
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
          f"unreadable?"
      )
    for slot, index in zip(slots, used):
      if order[slot] != index:
        unreadable.append(self.files.paths[order[slot]])

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches from global step `start_step` on, forever, shaped (local_devices, per_device,
    ...)."""
    epoch, skip = divmod(start_step, self.steps_per_epoch)
    while True:
      missing = 0
      unreadable: list[str] = []
      order = self.folder_order(epoch)[0] if self.files is not None else None
      batches = self.host_batches(epoch, skip)
      for i, batch in enumerate(batches, start=skip):
        if "box_missing" in batch:  # host-side bookkeeping only, not sent to the devices
          missing += int(batch.pop("box_missing").sum())
        if order is not None:
          seen = len(unreadable)
          self._folder_bookkeeping(batch, order, i, unreadable)
          if len(unreadable) > seen and not self.unreadable_files:
            logging.warning(
                "%s: image file %s cannot be read or decoded; it is replaced by "
                "another image of the folder (counted and logged per epoch)",
                self.builder.name,
                unreadable[seen],
            )
          self.unreadable_count += len(unreadable) - seen
          self.unreadable_files.update(unreadable[seen:])
        yield parallel.shard_for_devices(batch)
      if missing:
        self.missing_box_count += missing
        logging.warning(
            "Epoch %d: %d training images are not in box file %s; they were "
            "cropped from the whole image (object_aware.tolerate_box_errors)",
            epoch,
            missing,
            self.region_boxes.path,
        )
      if unreadable:
        logging.warning(
            "Epoch %d: %d image files of %s could not be read or decoded and were "
            "replaced by other images of the folder (%d distinct so far); first: %s",
            epoch,
            len(unreadable),
            self.builder.name,
            len(self.unreadable_files),
            ", ".join(sorted(set(unreadable))[:5]),
        )
      epoch, skip = epoch + 1, 0


def create_train_data(config: ml_collections.ConfigDict) -> TrainData:
  d = config.dataset
  builder = sources.get_builder(d.name, d.data_dir)
  local_batch = config.batch_size // jax.process_count()
  fg_masks = config.bg_mixup.masks if config.bg_mixup.enabled else None
  sal = config.get("saliency")
  if fg_masks is None and sal is not None and sal.enabled and sal.coverage_masks == "gt":
    fg_masks = "gt"  # SGCL diagnostics: true object coverage of the crops
  with_index = bool(sal is not None and sal.enabled and sal.every_k_steps > 1)
  mask_ids = MaskIds.from_folder(fg_masks) if fg_masks not in (None, "gt") else None
  kind = sources.kind(builder)
  if kind == "folder":
    data = _create_folder_train_data(config, builder, local_batch, fg_masks, mask_ids)
    return dataclasses.replace(data, with_index=with_index, index_size=data.num_examples)
  if kind == "arrays":
    split = d.train_split
    n = builder.num_examples(split)
    index_size = builder.num_examples(builder.locate(split)[0])
  else:
    from ocl_jax.data import tf_readers  # TensorFlow only for TFDS datasets

    # The whole split, as one process reads it: every process walks the same global order.
    split = tf_readers.whole_split(d.train_split)
    n = sources.num_examples(builder, split)
    index_size = tf_readers.tfds_example_index(builder, d.train_split)[1] if with_index else n
  if n is None or n < 0:
    raise ValueError(f"Cannot count the examples of {d.name} split {d.train_split!r}")
  if n < config.batch_size:
    raise ValueError(
        f"config.batch_size={config.batch_size} is larger than the {n} examples of "
        f"{d.name} split {d.train_split!r}"
    )
  return TrainData(
      builder=builder,
      split=split,
      local_batch=local_batch,
      num_examples=n,
      steps_per_epoch=n // config.batch_size,
      image_size=train_image_size(config),
      shuffle_buffer=d.shuffle_buffer,
      seed=config.seed,
      region_boxes=create_region_boxes(config, builder),
      fg_masks=fg_masks,
      mask_ids=mask_ids,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      with_index=with_index,
      index_split=d.train_split,
      index_size=index_size if with_index else n,
  )


def _create_folder_train_data(
    config: ml_collections.ConfigDict,
    source: sources.Builder,
    local_batch: int,
    fg_masks: str | None,
    mask_ids: MaskIds | None,
) -> TrainData:
  """The whole folder is the training set; every process permutes all its files alike and
  reads only the slots of its slice of each global batch."""
  d = config.dataset
  if d.train_split != "train":
    raise ValueError(
        f"config.dataset.train_split={d.train_split!r}: a folder dataset "
        f"({d.name}) trains on its whole folder; set it to 'train'"
    )
  files = source.files("train")
  n = len(files)
  if n < config.batch_size:
    raise ValueError(
        f"config.batch_size={config.batch_size} is larger than the {n} images of " f"{d.name}"
    )
  logging.info("%s: %d image files in %d classes", d.name, n, len(source.class_names))
  return TrainData(
      builder=source,
      split="train",
      local_batch=local_batch,
      num_examples=n,
      steps_per_epoch=n // config.batch_size,
      image_size=train_image_size(config),
      shuffle_buffer=d.shuffle_buffer,
      seed=config.seed,
      region_boxes=create_region_boxes(config, source),
      fg_masks=fg_masks,
      mask_ids=mask_ids,
      files=files,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
  )
