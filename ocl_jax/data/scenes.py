"""`scenes`: a procedurally generated multi-object benchmark as a TFDS builder.

Real scene datasets (COCO, ImageNet-9) cannot be downloaded on a fresh
machine, so this builder renders 1-3 textured shapes on textured backgrounds
with NumPy. It carries two controllable biases (background and context) and
exact annotations (union mask, visible-pixel boxes), so localisation and bias
claims can be measured on a CPU. It has no download step: `tfds.load` simply
generates it once into the data_dir.

Scenes are rendered in batches whose random streams are keyed by
(config seed, split, batch index), so the output depends only on the config.
The shifted test splits re-render the `test` objects with another background,
so scene `k` (``image/id % ID_STRIDE``) holds the same objects in `test`,
`test_mixed_same`, `test_mixed_rand` and `test_only_fg`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import struct
import zlib
from typing import Iterator

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from ocl_jax.data.scenes_render import (
    CLASS_NAMES,
    FAMILY_NAMES,
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


@dataclasses.dataclass(eq=False)
class ScenesConfig(tfds.core.BuilderConfig):
  """Sizes and biases of one `scenes` variant (`num_test` is per test split)."""

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


def encode_png(images: np.ndarray, level: int = 1) -> list[bytes]:
  """Encodes uint8 (n, H, W, C) images, C in {1, 3}, as PNG bytes.

  TFDS would otherwise encode each image through a TF graph call, which
  dominates generation time; the Sub filter is applied batch-wise in NumPy
  and zlib (which releases the GIL) only compresses.
  """
  n, h, w, c = images.shape
  rows = images.reshape(n, h, w * c)
  filtered = rows.copy()
  filtered[:, :, c:] -= rows[:, :, :-c]  # Sub filter, wraps mod 256
  raw = np.concatenate([np.ones((n, h, 1), np.uint8), filtered], axis=2)

  def chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + tag + data + struct.pack('>I', zlib.crc32(tag + data))

  color_type = {1: 0, 3: 2}[c]
  head = b'\x89PNG\r\n\x1a\n' + chunk(
      b'IHDR', struct.pack('>IIBBBBB', w, h, 8, color_type, 0, 0, 0)
  )
  tail = chunk(b'IEND', b'')
  return [head + chunk(b'IDAT', zlib.compress(r.tobytes(), level)) + tail for r in raw]


def _encoded_batch(config: ScenesConfig, split: str, batch: int) -> list[tuple[int, dict]]:
  """One batch as ready-to-write TFDS examples (images pre-encoded)."""
  b = generate_batch(config, split, batch)
  images = encode_png(b['image'])
  masks = encode_png(b['mask'][..., None])
  examples = []
  for i in range(len(images)):
    keep = b['areas'][i] > 0
    examples.append(
        (
            int(b['id'][i] % ID_STRIDE),
            {
                'image': images[i],
                'image/id': int(b['id'][i]),
                'label': int(b['label'][i]),
                'objects': {'label': b['classes'][i][keep], 'bbox': b['boxes'][i][keep]},
                'mask': masks[i],
                'background': int(b['background'][i]),
            },
        )
    )
  return examples


def iter_examples(config: ScenesConfig, split: str) -> Iterator[tuple]:
  """Yields (key, example) for a split in order.

  Helper threads render and encode the next batches while TFDS serialises
  the current one; NumPy and zlib release the GIL, so both cores work.
  Batches are independent, so the result does not depend on the threading.
  """
  num_batches = -(-split_size(config, split) // BATCH)
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    pending = collections.deque()
    for batch in range(num_batches):
      pending.append(pool.submit(_encoded_batch, config, split, batch))
      if len(pending) > 3:
        yield from pending.popleft().result()
    while pending:
      yield from pending.popleft().result()


# --------------------------------------------------------------------------
# TFDS builder.


class Scenes(tfds.core.GeneratorBasedBuilder):
  """Procedurally generated multi-object scenes with background/context bias."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
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
  ]
  DEFAULT_CONFIG_NAME = 'default'

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """Path of this file.

    Overridden because the TFDS 4.9 lookup imports `importlib_resources`, a
    dependency TFDS does not declare, for every builder inside a package.
    """
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    size = config.image_size
    classes = tfds.features.ClassLabel(names=CLASS_NAMES)
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'Procedural multi-object scenes: 1-3 textured shapes of 10 '
            'classes on 10 background texture families, with background '
            f'bias {config.background_bias} and context bias '
            f'{config.context_bias}. label = class of the largest visible '
            'object; objects are listed back to front; background = -1 '
            'in test_only_fg. Scene k of test, test_mixed_same, '
            'test_mixed_rand and test_only_fg has the same objects '
            f'(k = image/id % {ID_STRIDE}).'
        ),
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(shape=(size, size, 3)),
                'image/id': np.int64,
                'label': classes,
                'objects': tfds.features.Sequence(
                    {
                        'label': tfds.features.ClassLabel(names=CLASS_NAMES),
                        'bbox': tfds.features.BBoxFeature(),
                    }
                ),
                'mask': tfds.features.Image(shape=(size, size, 1)),
                'background': tfds.features.ClassLabel(names=FAMILY_NAMES),
            }
        ),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    config = self.builder_config
    for split in SPLITS:
      if not 0 < split_size(config, split) < ID_STRIDE:
        raise ValueError(f'split {split} needs 1..{ID_STRIDE - 1} examples')
    for bias in (config.background_bias, config.context_bias):
      if not 0.0 <= bias <= 1.0:
        raise ValueError(f'biases are probabilities, got {bias}')
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    return iter_examples(self.builder_config, split)
