"""Labelled datasets that frozen encoders are evaluated on (linear probe, kNN), by name.

This module only says what a dataset is (classes, which split plays which
role, where it lives, its folder file lists); eval_data.split_batches reads
every dataset, whatever its source (a TFDS builder, COCO instances cropped on
the fly, or a local image folder), the same way.

Registry (`get_eval_dataset(name)`):
  scenes             `scenes_name` (arrays): train_labeled / val / test + shifted tests
  coco_crop          COCO 2017 instances (area >= 1%, margin 0.2), 80 classes
  caltech_birds2011, oxford_flowers102, food101, oxford_iiit_pet, cifar10, cifar100
  imagenet9          ImageNet-9 backgrounds challenge folder (`bg_challenge`)
  objectnet9         test only, scored with the imagenet9 probe
  si_score           test only, one test per factor folder, imagenet9 probe
  folder:<path>      <path>/{train,val,test}/<class>/*, val optional

Local image folders are listed by folders.class_folder_files; files that cannot
be decoded are skipped when read (see eval_data.last_skipped).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

from ocl_jax.data import sources
from ocl_jax.data.folders import class_folder_files
from ocl_jax.data.folders import require_dir
from ocl_jax.data.folders import subfolders

# ImageNet-9 (Xiao et al. 2020) class folders; the head of objectnet9 / si_score
# when config.evaluation.folders.imagenet9 is not given.
IMAGENET9_CLASSES = (
    "00_dog",
    "01_bird",
    "02_wheeled vehicle",
    "03_reptile",
    "04_carnivore",
    "05_insect",
    "06_musical instrument",
    "07_primate",
    "08_fish",
)
IMAGENET9_VARIANTS = ("original", "mixed_same", "mixed_rand", "only_fg")
VAL_EVERY = 10  # folder datasets without a val split: every 10th file of each class is val

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
SCENES_TESTS = {
    "test": "test",
    "mixed_same": "test_mixed_same",
    "mixed_rand": "test_mixed_rand",
    "only_fg": "test_only_fg",
    "single": "test_single",
}
KNOWN_NAMES = (
    "scenes",
    "coco_crop",
    *TFDS_TRANSFER,
    "imagenet9",
    "objectnet9",
    "si_score",
    "folder:<path>",
)


@dataclasses.dataclass(frozen=True)
class EvalDataset:
  """A labelled evaluation dataset: its classes, which split plays which role, where it lives.

  For folder datasets the file lists are made once here, so a missing or
  empty folder fails when the dataset is chosen, not halfway through an
  evaluation, and every pass reads the same files in the same order.
  """

  name: str  # registry name, e.g. 'scenes', 'cifar10', 'imagenet9'
  class_names: tuple[str, ...]
  train: str | None  # split used to fit the probe (None for test-only sets)
  val: str | None  # split used to choose the L2 weight
  tests: dict[str, str] = dataclasses.field(hash=False)  # display name -> split
  head_from: str | None = None  # test-only sets: dataset whose probe is applied; the labels
  # here already index its class_names (matched by name)
  source: str = "tfds"  # 'tfds' | 'coco_crop' | 'folder' | 'arrays' (scenes)
  tfds_name: str | None = None  # tfds, coco_crop and arrays: the dataset name (sources)
  data_dir: str | None = None  # tfds, coco_crop and arrays: the default data dir
  root: str | None = None  # folder: the root folder
  files: Mapping[str, tuple[tuple[str, int], ...]] = dataclasses.field(
      default_factory=dict, repr=False, hash=False
  )  # folder: split -> ((path, label), ...)
  # folder: split -> files the last complete eval_data.split_batches pass of this object
  # skipped (mutable, so no part of equality or hashing).
  skipped: dict[str, tuple[str, ...]] = dataclasses.field(
      default_factory=dict, repr=False, compare=False
  )

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


def get_eval_dataset(
    name: str,
    *,
    scenes_name: str = "scenes/default",
    folders: Mapping[str, str] | None = None,
    data_dir: str | None = None,
) -> EvalDataset:
  """The evaluation dataset registered as `name` (see the module docstring).

  folders: roots of the local image-folder datasets by name
  (config.evaluation.folders); data_dir: the TFDS data dir.
  """
  folders = folders if folders is not None else {}
  if name == "scenes":
    builder = sources.get_builder(scenes_name, data_dir)
    return EvalDataset(
        name=name,
        class_names=builder.class_names,
        source="arrays",
        train="train_labeled",
        val="val",
        tests=dict(SCENES_TESTS),
        tfds_name=scenes_name,
        data_dir=data_dir,
    )
  if name == "coco_crop":
    builder = sources.get_builder("coco/2017", data_dir)
    return EvalDataset(
        name=name,
        class_names=_class_names(builder, "objects/label"),
        train="train[:90%]",
        val="train[90%:]",
        tests={"test": "validation"},
        source="coco_crop",
        tfds_name="coco/2017",
        data_dir=data_dir,
    )
  if name in TFDS_TRANSFER:
    train, val, test = TFDS_TRANSFER[name]
    builder = sources.get_builder(name, data_dir)
    return EvalDataset(
        name=name,
        class_names=_class_names(builder, "label"),
        train=train,
        val=val,
        tests={"test": test},
        tfds_name=name,
        data_dir=data_dir,
    )
  if name == "imagenet9":
    return _imagenet9(_folder_root(name, folders))
  if name == "objectnet9":
    root = _folder_root(name, folders)
    head = _imagenet9_classes(folders)
    files = class_folder_files(root, head, f"{name} ({root})")
    return EvalDataset(
        name=name,
        class_names=head,
        train=None,
        val=None,
        tests={"test": "test"},
        head_from="imagenet9",
        source="folder",
        root=root,
        files={"test": files},
    )
  if name == "si_score":
    root = _folder_root(name, folders)
    head = _imagenet9_classes(folders)
    factors = subfolders(root)
    if not factors:
      raise ValueError(
          f"si_score folder {root} has no factor folders (e.g. area, location, "
          f"rotation), each holding <class>/<image> files"
      )
    files = {
        f: class_folder_files(os.path.join(root, f), head, f"si_score factor {f!r}")
        for f in factors
    }
    return EvalDataset(
        name=name,
        class_names=head,
        train=None,
        val=None,
        tests={f: f for f in factors},
        head_from="imagenet9",
        source="folder",
        root=root,
        files=files,
    )
  if name.startswith("folder:"):
    return _generic_folder(name, name[len("folder:") :])
  raise ValueError(f"Unknown evaluation dataset {name!r}; known: {', '.join(KNOWN_NAMES)}")


def _class_names(builder: sources.Builder, key: str) -> tuple[str, ...]:
  from ocl_jax.data import tf_readers  # TensorFlow only for TFDS datasets

  return tf_readers.class_names(builder, key)


def _folder_root(name: str, folders: Mapping[str, str]) -> str:
  root = folders.get(name)
  if not root:
    raise ValueError(
        f"Evaluation dataset {name!r} reads a local image folder: set "
        f"config.evaluation.folders.{name} to its root"
    )
  root = os.path.expanduser(str(root))
  if not os.path.isdir(root):
    raise ValueError(f"config.evaluation.folders.{name}={root!r} is not a directory")
  return root


def _hold_out_val(
    files: tuple[tuple[str, int], ...], what: str
) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]:
  """Deterministic train/val split: every VAL_EVERY-th file of each class (sorted) is val."""
  train, val, seen = [], [], {}
  for path, label in files:
    k = seen[label] = seen.get(label, -1) + 1
    (val if k % VAL_EVERY == VAL_EVERY - 1 else train).append((path, label))
  if not val:
    raise ValueError(
        f"{what}: too few images to hold out a validation split (every "
        f"{VAL_EVERY}th image of a class); add images or a val folder"
    )
  return tuple(train), tuple(val)


def _imagenet9_classes(folders: Mapping[str, str]) -> tuple[str, ...]:
  """Classes of the imagenet9 probe: its train folders when configured, else the canonical 9."""
  if folders.get("imagenet9"):
    train = os.path.join(_folder_root("imagenet9", folders), "original", "train")
    require_dir(train, "imagenet9")
    return tuple(subfolders(train))
  return IMAGENET9_CLASSES


def _imagenet9(root: str) -> EvalDataset:
  missing = [
      p
      for p in [os.path.join(root, "original", "train")]
      + [os.path.join(root, v, "val") for v in IMAGENET9_VARIANTS]
      if not os.path.isdir(p)
  ]
  if missing:
    raise ValueError(
        f"imagenet9 (config.evaluation.folders.imagenet9={root}) expects the "
        f"bg_challenge layout; missing: {', '.join(missing)}"
    )
  classes = tuple(subfolders(os.path.join(root, "original", "train")))
  files = class_folder_files(
      os.path.join(root, "original", "train"), classes, "imagenet9 original/train"
  )
  train, val = _hold_out_val(files, "imagenet9 original/train")
  splits = {"train": train, "val": val}
  for v in IMAGENET9_VARIANTS:
    splits[v] = class_folder_files(os.path.join(root, v, "val"), classes, f"imagenet9 {v}/val")
  return EvalDataset(
      name="imagenet9",
      class_names=classes,
      train="train",
      val="val",
      tests={v: v for v in IMAGENET9_VARIANTS},
      source="folder",
      root=root,
      files=splits,
  )


def _generic_folder(name: str, root: str) -> EvalDataset:
  root = os.path.expanduser(root)
  if not root or not os.path.isdir(root):
    raise ValueError(f"Evaluation dataset {name!r}: {root!r} is not a directory")
  for split in ("train", "test"):
    require_dir(os.path.join(root, split), name)
  classes = tuple(subfolders(os.path.join(root, "train")))
  train = class_folder_files(os.path.join(root, "train"), classes, f"{name} train")
  if os.path.isdir(os.path.join(root, "val")):
    val = class_folder_files(os.path.join(root, "val"), classes, f"{name} val")
  else:
    train, val = _hold_out_val(train, f"{name} train")
  test = class_folder_files(os.path.join(root, "test"), classes, f"{name} test")
  return EvalDataset(
      name=name,
      class_names=classes,
      train="train",
      val="val",
      tests={"test": "test"},
      source="folder",
      root=root,
      files={"train": train, "val": val, "test": test},
  )
