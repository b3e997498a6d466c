"""User paths made absolute once, where they enter: flags, config fields, public functions.

Orbax refuses relative paths, and a path written into a checkpoint, an export's
model.json or a pipeline stage's config must mean the same file when it is read
back from another directory. So every path a user types (relative to the
current directory, or starting with `~`) is resolved here, at the entry point
(`ocl_jax.main`) and at the public functions that take paths; the code behind
them only ever sees absolute paths.
"""

from __future__ import annotations

import copy
import os

import ml_collections

FOLDER_PREFIX = "folder:"
# Values of path fields that name no file: the dataset's own annotations, or "use --workdir".
SENTINELS = frozenset({"", "gt"})

# Config fields holding one path (or a sentinel above).
PATH_FIELDS = (
    "dataset.data_dir",
    "evaluation.data_dir",
    "contracam.checkpoint",
    "object_aware.boxes",
    "bg_mixup.masks",
    "study.results_dir",
    "study.perturbed",
)
# Config fields holding a tuple of paths.
PATH_TUPLE_FIELDS = ("evaluation.checkpoints",)
# Config fields holding a dataset name, or folder:<path> (a tuple of them for the second).
DATASET_NAME_FIELDS = ("dataset.name",)
DATASET_NAME_TUPLE_FIELDS = ("evaluation.datasets",)
# Config dicts whose every value is a folder path.
PATH_DICT_FIELDS = ("evaluation.folders",)


def resolve(path: str | os.PathLike) -> str:
  """`path` absolute and normalised, with `~` expanded, against the current directory."""
  return os.path.abspath(os.path.expanduser(os.fspath(path)))


def resolve_optional(path: str | None) -> str | None:
  """`resolve`, except that None and the sentinels ('' and 'gt') are kept as they are."""
  if path is None or not isinstance(path, (str, os.PathLike)) or os.fspath(path) in SENTINELS:
    return path
  return resolve(path)


def resolve_dataset_name(name: str) -> str:
  """folder:<path> with its path resolved; a TFDS name is returned unchanged."""
  if isinstance(name, str) and name.startswith(FOLDER_PREFIX) and name[len(FOLDER_PREFIX) :]:
    return FOLDER_PREFIX + resolve(name[len(FOLDER_PREFIX) :])
  return name


def _parent_and_key(config: ml_collections.ConfigDict, field: str):
  *parents, key = field.split(".")
  node = config
  for p in parents:
    node = node.get(p) if node is not None else None
  if node is None or key not in node:
    return None, key
  return node, key


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with every path field absolute (PATH_FIELDS and the lists above).

  Fields a config does not have are skipped; placeholders (None), '' and 'gt'
  stay; a value that is not a string is left for validation to report.
  """
  c = copy.deepcopy(config)
  with c.unlocked():
    for field in PATH_FIELDS:
      node, key = _parent_and_key(c, field)
      if node is not None and isinstance(node[key], str):
        node[key] = resolve_optional(node[key])
    for field in PATH_TUPLE_FIELDS:
      node, key = _parent_and_key(c, field)
      if node is not None and isinstance(node[key], (tuple, list)):
        node[key] = tuple(resolve_optional(p) if isinstance(p, str) else p for p in node[key])
    for field in DATASET_NAME_FIELDS:
      node, key = _parent_and_key(c, field)
      if node is not None:
        node[key] = resolve_dataset_name(node[key])
    for field in DATASET_NAME_TUPLE_FIELDS:
      node, key = _parent_and_key(c, field)
      if node is not None and isinstance(node[key], (tuple, list)):
        node[key] = tuple(resolve_dataset_name(n) for n in node[key])
    for field in PATH_DICT_FIELDS:
      node, key = _parent_and_key(c, field)
      if node is not None and isinstance(node[key], ml_collections.ConfigDict):
        for k, v in node[key].items():
          # 'REQUIRED: ...' placeholders (configs/in9*.py) are left for validation to report.
          if isinstance(v, str) and not v.startswith("REQUIRED:"):
            node[key][k] = resolve_optional(v)
  return c
