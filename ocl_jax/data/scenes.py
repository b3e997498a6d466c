"""`scenes`: a procedurally generated multi-object benchmark, cached as NumPy arrays.

Real scene datasets (COCO, ImageNet-9) cannot be downloaded on a fresh
machine, so `scenes` renders 1-3 textured shapes on textured backgrounds with
NumPy. It carries two controllable biases (background and context) and exact
annotations (union mask, visible-pixel boxes), so localisation and bias
claims can be measured on a CPU. It has no download step and needs no
TensorFlow: the first reader renders it once into the data dir as plain
`.npy` files (<data_dir>/scenes/<config>/<VERSION>/<split>/<field>.npy), and
every reader (training, evaluation, ContraCAM, the feature measures) memory-maps
those, whether TensorFlow is installed or not.

Scenes are rendered in batches whose random streams are keyed by
(config seed, split, batch index), so the output depends only on the config.
The shifted test splits re-render the `test` objects with another background,
so scene `k` (``id % ID_STRIDE``) holds the same objects in `test`,
`test_mixed_same`, `test_mixed_rand` and `test_only_fg`. A split's arrays are
in scene order.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import shutil
import tempfile
import uuid

from absl import logging
import numpy as np

from ocl_jax.data.scenes_render import (
    MAX_OBJECTS,
    choose_families,
    paint,
    render_backgrounds,
    render_objects,
    sample_layout,
    visible_objects,
)

ID_STRIDE = 10_000_000  # image/id = split index * ID_STRIDE + scene index

# split -> (split whose objects it shows, background mode)
SPLITS = {
    'train': ('train', 'biased'),
    'train_labeled': ('train_labeled', 'biased'),
    'val': ('val', 'biased'),
    'test': ('test', 'biased'),
    'test_mixed_same': ('test', 'same'),
    'test_mixed_rand': ('test', 'rand'),
    'test_only_fg': ('test', 'black'),
    'test_single': ('test_single', 'biased'),
}
_SPLIT_INDEX = {name: i for i, name in enumerate(SPLITS)}
BATCH = 256  # scenes per random stream: changing it changes the data


@dataclasses.dataclass(frozen=True)
class ScenesConfig:
  """Sizes and biases of one `scenes` variant (`num_test` is per test split)."""

  name: str
  description: str = ''
  image_size: int = 96
  num_train: int = 20_000
  num_train_labeled: int = 5_000
  num_val: int = 1_000
  num_test: int = 2_000
  background_bias: float = 0.9
  context_bias: float = 0.8
  seed: int = 0


def split_size(config: ScenesConfig, split: str) -> int:
  """Number of examples the config puts in `split`."""
  source = SPLITS[split][0]
  if source in ('train', 'train_labeled', 'val'):
    return getattr(config, f'num_{source}')
  return config.num_test


# --------------------------------------------------------------------------
# Whole scenes.


def _rng(config: ScenesConfig, split: str, batch: int, stream: int) -> np.random.Generator:
  """Independent stream per (seed, split, batch, purpose)."""
  return np.random.default_rng([config.seed, _SPLIT_INDEX[split], batch, stream])


def generate_batch(config: ScenesConfig, split: str, batch: int) -> dict[str, np.ndarray]:
  """Renders scenes [batch * BATCH, ...) of `split` as NumPy arrays.

  Returns image (n,S,S,3) uint8, mask (n,S,S) uint8, label (n,),
  background (n,), id (n,), and per paint-order slot: classes (n,3),
  areas (n,3) visible pixels and boxes (n,3,4); a slot is an annotated
  object iff its area is > 0.
  """
  source, mode = SPLITS[split]
  start = batch * BATCH
  n = min(BATCH, split_size(config, split) - start)
  if n <= 0:
    raise ValueError(f'batch {batch} is past the end of split {split}')
  size = config.image_size
  layout = sample_layout(
      _rng(config, source, batch, 0), n, size, config.context_bias, single=source == 'test_single'
  )
  index, obj_shade = render_objects(layout, size)
  areas, boxes = visible_objects(index)
  classes = np.where(areas > 0, layout.classes, -1)
  labels = np.take_along_axis(classes, areas.argmax(1)[:, None], 1)[:, 0]

  rng = _rng(config, split, batch, 1)
  families = choose_families(rng, labels, mode, config.background_bias)
  bg_shade, bg_colors = render_backgrounds(rng, families, size)
  fg = index >= 0
  image = paint(index, np.where(fg, obj_shade, bg_shade), layout.colors, bg_colors)
  ids = _SPLIT_INDEX[split] * ID_STRIDE + start + np.arange(n)
  return dict(
      image=image,
      mask=fg.astype(np.uint8),
      label=labels,
      background=families,
      id=ids,
      classes=classes,
      areas=areas,
      boxes=boxes,
  )


# --------------------------------------------------------------------------
# Variants and names.

CONFIGS = {
    c.name: c
    for c in (
        ScenesConfig(
            name='default',
            image_size=96,
            num_train=20_000,
            num_train_labeled=5_000,
            num_val=1_000,
            num_test=2_000,
            description='96 px, 20k unlabelled training images.',
        ),
        ScenesConfig(
            name='small',
            image_size=96,
            num_train=4_000,
            num_train_labeled=2_000,
            num_val=500,
            num_test=1_000,
            description='96 px, 4k training images, for quick demos.',
        ),
        ScenesConfig(
            name='tiny',
            image_size=32,
            num_train=256,
            num_train_labeled=64,
            num_val=64,
            num_test=64,
            description='32 px, a few hundred images, for unit tests.',
        ),
    )
}
# The data a config renders; a renderer change that alters any pixel or annotation bumps it,
# so a cache of older data is never read as the new one.
VERSION = '1.0.0'
# Field -> (dtype, per-example shape given the image side S).
FIELDS = {
    'image': (np.uint8, lambda s: (s, s, 3)),
    'mask': (np.uint8, lambda s: (s, s)),
    'label': (np.int64, lambda s: ()),
    'background': (np.int64, lambda s: ()),
    'id': (np.int64, lambda s: ()),
    'classes': (np.int64, lambda s: (MAX_OBJECTS,)),
    'areas': (np.int64, lambda s: (MAX_OBJECTS,)),
    'boxes': (np.float32, lambda s: (MAX_OBJECTS, 4)),
}


def is_scenes_name(name: str) -> bool:
  """'scenes', 'scenes/tiny' or 'scenes/tiny:1.0.0' (the TFDS-style names configs use)."""
  return name.split('/', 1)[0].split(':', 1)[0] == 'scenes'


def config_of(name: str) -> ScenesConfig:
  """The variant a `scenes[/<config>][:<version>]` name asks for, or a ValueError naming the
  known ones."""
  base, _, version = name.partition(':')
  parts = base.split('/')
  variant = parts[1] if len(parts) > 1 else 'default'
  if parts[0] != 'scenes' or len(parts) > 2 or variant not in CONFIGS:
    raise ValueError(
        f'Unknown scenes dataset {name!r} (config.dataset.name); known: '
        + ', '.join(f'scenes/{c}' for c in CONFIGS)
    )
  if version and version != VERSION:
    raise ValueError(f'{name!r}: scenes is at version {VERSION}, not {version}')
  return CONFIGS[variant]


def default_data_dir() -> str:
  """Where data lives when config.dataset.data_dir is unset: TFDS's default, so one folder
  holds both kinds of dataset."""
  return os.path.expanduser(os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))


def cache_dir(config: ScenesConfig, data_dir: str | None) -> str:
  root = os.path.abspath(os.path.expanduser(data_dir)) if data_dir else default_data_dir()
  return os.path.join(root, 'scenes', config.name, VERSION)


# --------------------------------------------------------------------------
# The array cache.


def write_split(config: ScenesConfig, split: str, folder: str) -> None:
  """Renders `split` batch by batch straight into memory-mapped .npy files."""
  n, s = split_size(config, split), config.image_size
  os.makedirs(folder)
  out = {
      k: np.lib.format.open_memmap(
          os.path.join(folder, f'{k}.npy'), mode='w+', dtype=dtype, shape=(n,) + shape(s)
      )
      for k, (dtype, shape) in FIELDS.items()
  }
  num_batches = -(-n // BATCH)
  # NumPy releases the GIL in the heavy parts: two threads keep both cores rendering.
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    for b, arrays in enumerate(
        pool.map(lambda b: generate_batch(config, split, b), range(num_batches))
    ):
      for k, v in arrays.items():
        out[k][b * BATCH : b * BATCH + len(v)] = v
  for v in out.values():
    v.flush()


def prepare(config: ScenesConfig, data_dir: str | None) -> str:
  """Renders every split of `config` into the data dir unless it is there; returns its folder.

  The splits are written into a temporary sibling folder that is renamed into place when
  complete, so an interrupted run leaves no half-written cache and several processes that
  prepare at once end with one whole copy.
  """
  final = cache_dir(config, data_dir)
  if os.path.isdir(final):
    return final
  for split in SPLITS:
    if not 0 < split_size(config, split) < ID_STRIDE:
      raise ValueError(f'split {split} needs 1..{ID_STRIDE - 1} examples')
  for bias in (config.background_bias, config.context_bias):
    if not 0.0 <= bias <= 1.0:
      raise ValueError(f'biases are probabilities, got {bias}')
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  logging.info('Rendering scenes/%s into %s (once; later runs read the arrays)', config.name, final)
  tmp = tempfile.mkdtemp(prefix=f'.{VERSION}.incomplete-{uuid.uuid4().hex[:8]}-', dir=parent)
  try:
    for split in SPLITS:
      write_split(config, split, os.path.join(tmp, split))
    try:
      os.rename(tmp, final)
    except OSError:
      if not os.path.isdir(final):  # not a concurrent writer that finished first
        raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return final


def load_split(config: ScenesConfig, data_dir: str | None, split: str) -> dict[str, np.ndarray]:
  """The arrays of one split (read-only memory maps), rendered first if the cache lacks them."""
  if split not in SPLITS:
    raise ValueError(f'scenes/{config.name} has no split {split!r}; it has {list(SPLITS)}')
  folder = os.path.join(prepare(config, data_dir), split)
  n, s = split_size(config, split), config.image_size
  arrays = {}
  for k, (dtype, shape) in FIELDS.items():
    path = os.path.join(folder, f'{k}.npy')
    try:
      a = np.load(path, mmap_mode='r')
    except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
      raise ValueError(
          f'scenes cache file {path} cannot be read ({e}); delete {os.path.dirname(folder)} '
          'and it is rendered again'
      ) from e
    if a.shape != (n,) + shape(s) or a.dtype != dtype:
      raise ValueError(
          f'scenes cache file {path} holds {a.dtype} {a.shape}, not {np.dtype(dtype)} '
          f'{(n,) + shape(s)}; delete {os.path.dirname(folder)} and it is rendered again'
      )
    arrays[k] = a
  return arrays
