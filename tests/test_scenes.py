"""Tests of the `scenes` TFDS builder and its NumPy generation functions.

The TFDS-level tests share one `scenes/tiny` generation (module fixture);
statistical tests call the pure generation functions on a larger custom
config, which is much faster than writing it through TFDS.
"""

import dataclasses
import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import ocl_jax  # noqa: F401  (registers the builder through the package)
from ocl_jax.tools import contact_sheet
from ocl_jax.data import scenes, scenes_render

TINY = scenes.Scenes.builder_configs['tiny']
TEST_VARIANTS = ('test_mixed_same', 'test_mixed_rand', 'test_only_fg')


def _scene(example: dict) -> int:
  return int(example['image/id']) % scenes.ID_STRIDE


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """scenes/tiny generated through TFDS; {split: [examples in scene order]}."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  builder = tfds.builder('scenes/tiny', data_dir=data_dir)
  builder.download_and_prepare()
  splits = {}
  for split in scenes.SPLITS:
    examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
    splits[split] = sorted(examples, key=_scene)
  return builder, splits


BIG = dataclasses.replace(TINY, name='big', num_train=2048, num_test=2048)


def _batches(config, split):
  """All generate_batch outputs of a split, concatenated."""
  n = scenes.split_size(config, split)
  parts = [scenes.generate_batch(config, split, b) for b in range(-(-n // scenes.BATCH))]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture(scope='module')
def big_train():
  """2048 biased 32 px scenes for binomial tests, rendered without TFDS."""
  return _batches(BIG, 'train')


# ---------------------------------------------------------------- TFDS level


def test_registered_configs():
  for name, size, train in [('default', 96, 20_000), ('small', 96, 4_000), ('tiny', 32, 256)]:
    config = tfds.builder(f'scenes/{name}').builder_config
    assert isinstance(config, scenes.ScenesConfig)
    assert (config.image_size, config.num_train) == (size, train)
    assert (config.background_bias, config.context_bias) == (0.9, 0.8)
  assert tfds.builder('scenes').builder_config.name == 'default'


def test_split_sizes(tiny):
  builder, splits = tiny
  expected = {
      'train': 256,
      'train_labeled': 64,
      'val': 64,
      'test': 64,
      'test_mixed_same': 64,
      'test_mixed_rand': 64,
      'test_only_fg': 64,
      'test_single': 64,
  }
  assert {s: len(ex) for s, ex in splits.items()} == expected
  assert {s: builder.info.splits[s].num_examples for s in expected} == expected


def test_feature_types(tiny):
  _, splits = tiny
  ex = splits['train'][0]
  assert ex['image'].shape == (32, 32, 3) and ex['image'].dtype == np.uint8
  assert ex['mask'].shape == (32, 32, 1) and ex['mask'].dtype == np.uint8
  assert ex['objects']['bbox'].dtype == np.float32
  assert ex['objects']['bbox'].shape[1] == 4
  for examples in splits.values():
    for ex in examples:
      assert set(np.unique(ex['mask'])) <= {0, 1}
      assert 1 <= len(ex['objects']['label']) <= scenes_render.MAX_OBJECTS
      assert 0 <= ex['label'] < 10


def test_ids_unique_and_encode_split(tiny):
  _, splits = tiny
  ids = [int(ex['image/id']) for exs in splits.values() for ex in exs]
  assert len(ids) == len(set(ids))
  for i, (split, examples) in enumerate(splits.items()):
    assert [_scene(ex) for ex in examples] == list(range(len(examples)))
    assert all(int(ex['image/id']) // scenes.ID_STRIDE == i for ex in examples)


def test_tfds_examples_equal_generated_arrays(tiny):
  """What TFDS stores (PNG, boxes, labels) is exactly what NumPy rendered."""
  _, splits = tiny
  for split in ('train', 'test_mixed_rand', 'test_single'):
    ref = scenes.generate_batch(TINY, split, 0)
    for k, ex in enumerate(splits[split]):
      keep = ref['areas'][k] > 0
      np.testing.assert_array_equal(ex['image'], ref['image'][k])
      np.testing.assert_array_equal(ex['mask'][..., 0], ref['mask'][k])
      assert ex['label'] == ref['label'][k]
      assert ex['background'] == ref['background'][k]
      np.testing.assert_array_equal(ex['objects']['label'], ref['classes'][k][keep])
      np.testing.assert_array_equal(ex['objects']['bbox'], ref['boxes'][k][keep])


def test_boxes_and_mask_agree(tiny):
  _, splits = tiny
  for examples in splits.values():
    for ex in examples:
      mask = ex['mask'][..., 0].astype(bool)
      ys, xs = np.nonzero(mask)
      support = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]) / 32
      covered = np.zeros_like(mask)
      for box in ex['objects']['bbox']:
        ymin, xmin, ymax, xmax = np.rint(box * 32).astype(int)
        assert ymin < ymax and xmin < xmax
        # inside the mask's support, and the box edges touch the mask
        assert np.all(box[:2] >= support[:2]) and np.all(box[2:] <= support[2:])
        inner = mask[ymin:ymax, xmin:xmax]
        assert inner[0].any() and inner[-1].any()
        assert inner[:, 0].any() and inner[:, -1].any()
        covered[ymin:ymax, xmin:xmax] = True
      assert not np.any(mask & ~covered), 'union of boxes must cover the mask'


def test_label_is_one_of_the_objects(tiny):
  _, splits = tiny
  for examples in splits.values():
    for ex in examples:
      assert ex['label'] in ex['objects']['label']


def test_shifted_splits_share_objects_with_test(tiny):
  _, splits = tiny
  for variant in TEST_VARIANTS:
    differs = 0
    for ex, ref in zip(splits[variant], splits['test']):
      assert _scene(ex) == _scene(ref)
      np.testing.assert_array_equal(ex['mask'], ref['mask'])
      np.testing.assert_array_equal(ex['objects']['label'], ref['objects']['label'])
      np.testing.assert_array_equal(ex['objects']['bbox'], ref['objects']['bbox'])
      assert ex['label'] == ref['label']
      fg = ref['mask'][..., 0] == 1
      np.testing.assert_array_equal(ex['image'][fg], ref['image'][fg])
      differs += not np.array_equal(ex['image'][~fg], ref['image'][~fg])
    assert differs == len(splits['test'])  # every background is redrawn


def test_only_fg_background_is_black(tiny):
  _, splits = tiny
  for ex in splits['test_only_fg']:
    bg = ex['mask'][..., 0] == 0
    assert bg.any()
    assert np.all(ex['image'][bg] == 0)
    assert ex['background'] == -1


def test_mixed_same_uses_class_family(tiny):
  _, splits = tiny
  for ex in splits['test_mixed_same']:
    assert ex['background'] == scenes_render.CLASS_FAMILY[ex['label']]


def test_test_single_has_one_object(tiny):
  _, splits = tiny
  assert all(len(ex['objects']['label']) == 1 for ex in splits['test_single'])
  assert all(ex['label'] == ex['objects']['label'][0] for ex in splits['test_single'])


def test_tfds_load_with_shuffled_files(tiny):
  builder, splits = tiny
  ds = tfds.load(
      'scenes/tiny',
      split='test',
      data_dir=builder.data_dir_root,
      shuffle_files=True,
      download=False,
  )
  ids = sorted(int(ex['image/id']) for ex in tfds.as_numpy(ds))
  assert ids == [int(ex['image/id']) for ex in splits['test']]


def test_mock_data_uses_builder_features():
  with tfds.testing.mock_data(num_examples=3):
    ds = tfds.load('scenes/tiny', split='train')
    ex = next(iter(tfds.as_numpy(ds)))
  assert ex['image'].shape == (32, 32, 3)
  assert ex['mask'].shape == (32, 32, 1)
  assert ex['objects']['bbox'].shape[-1] == 4


def test_contact_sheet(tiny):
  _, splits = tiny
  rows = [(split, exs[:3]) for split, exs in splits.items()]
  sheet = contact_sheet.contact_sheet(rows, scale=2)
  assert sheet.size[1] == len(rows) * (64 + 14 + 4)
  outline = contact_sheet.mask_outline(np.pad(np.ones((3, 3)), 1))
  assert outline.sum() == 8 and not outline[2, 2]


# ------------------------------------------------------------- NumPy level


def test_generation_is_deterministic_in_the_seed():
  a = scenes.generate_batch(TINY, 'test_mixed_rand', 0)
  b = scenes.generate_batch(TINY, 'test_mixed_rand', 0)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  other = scenes.generate_batch(dataclasses.replace(TINY, seed=1), 'test_mixed_rand', 0)
  assert not np.array_equal(a['image'], other['image'])
  assert not np.array_equal(a['label'], other['label'])
  # splits draw from different streams
  train = scenes.generate_batch(TINY, 'train_labeled', 0)
  assert not np.array_equal(train['label'], a['label'])


def test_boxes_match_object_pixels():
  """Vectorised boxes/areas against a per-object loop over the index map."""
  layout = scenes_render.sample_layout(np.random.default_rng(3), 200, 48, 0.8)
  index, _ = scenes_render.render_objects(layout, 48)
  areas, boxes = scenes_render.visible_objects(index)
  for i in range(200):
    for slot in range(scenes_render.MAX_OBJECTS):
      ys, xs = np.nonzero(index[i] == slot)
      assert areas[i, slot] == len(ys)
      if len(ys):
        expect = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]) / 48
        np.testing.assert_allclose(boxes[i, slot], expect, atol=1e-6)
      else:
        assert not boxes[i, slot].any()


def test_label_is_largest_visible_object(big_train):
  out = big_train
  for i in range(len(out['label'])):
    slot = int(np.argmax(out['areas'][i]))
    assert out['label'][i] == out['classes'][i, slot]
    assert out['areas'][i, slot] == out['areas'][i].max()


def test_later_objects_occlude_earlier_ones():
  layout = scenes_render.sample_layout(np.random.default_rng(2), 300, 48, 0.8)
  index, _ = scenes_render.render_objects(layout, 48)
  visible, _ = scenes_render.visible_objects(index)
  top = (layout.classes >= 0).sum(1) - 1  # last painted slot
  for slot in range(scenes_render.MAX_OBJECTS):
    alone = dataclasses.replace(layout, classes=np.where(np.arange(3) == slot, layout.classes, -1))
    full, _ = scenes_render.visible_objects(scenes_render.render_objects(alone, 48)[0])
    assert np.all(visible[:, slot] <= full[:, slot])
    on_top = top == slot
    np.testing.assert_array_equal(visible[on_top, slot], full[on_top, slot])
    if slot < 2:  # objects painted before another are sometimes covered
      assert np.any(visible[:, slot] < full[:, slot])


def _binomial_ok(hits: int, n: int, p: float) -> bool:
  return abs(hits - n * p) <= 4.5 * np.sqrt(n * p * (1 - p))


def test_background_bias(big_train):
  train = big_train
  match = train['background'] == scenes_render.CLASS_FAMILY[train['label']]
  assert _binomial_ok(match.sum(), match.size, 0.9), match.mean()
  rand = _batches(BIG, 'test_mixed_rand')
  match = rand['background'] == scenes_render.CLASS_FAMILY[rand['label']]
  assert _binomial_ok(match.sum(), match.size, 0.1), match.mean()
  # without bias every family is used about equally often
  counts = np.bincount(rand['background'], minlength=10)
  assert counts.min() > 0.6 * counts.mean()


def test_context_bias():
  layout = scenes_render.sample_layout(np.random.default_rng(0), 4000, 96, 0.8)
  valid = layout.classes >= 0
  pairs = valid.sum(1) == 2
  primary = np.argmax(np.where(valid, layout.radii, -1), axis=1)
  rows = np.nonzero(pairs)[0]
  p_cls = layout.classes[rows, primary[rows]]
  other = layout.classes[rows, 1 - primary[rows]]  # two objects: slots 0, 1
  hits = (other == scenes_render.PARTNER[p_cls]).sum()
  assert _binomial_ok(hits, len(rows), 0.8), hits / len(rows)
  assert np.all(scenes_render.PARTNER != np.arange(10))


def test_class_counts_roughly_uniform(big_train):
  labels = big_train['label']
  counts = np.bincount(labels, minlength=10)
  assert counts.min() > 0.6 * counts.mean()


def test_shapes_are_distinct():
  """Class shapes of equal radius overlap by IoU < 0.85 at any rotation.

  The closest pair is circle / hexagon (0.83); their textures and hues
  differ as well.
  """
  c = (np.arange(64, dtype=np.float32) + 0.5) / 32 - 1
  v, u = np.meshgrid(c, c, indexing='ij')
  masks = []
  for cls in range(scenes_render.NUM_CLASSES):
    rot = []
    for a in np.linspace(0, 2 * np.pi, 24, endpoint=False):
      ru, rv = np.cos(a) * u + np.sin(a) * v, np.cos(a) * v - np.sin(a) * u
      rot.append(scenes_render.shape_mask(cls, ru, rv))
    masks.append(np.stack(rot))
    assert rot[0].mean() > 0.05  # no degenerate shape
  for i in range(scenes_render.NUM_CLASSES):
    for j in range(i + 1, scenes_render.NUM_CLASSES):
      inter = (masks[i][:1] & masks[j]).sum((1, 2))
      union = (masks[i][:1] | masks[j]).sum((1, 2))
      assert (inter / union).max() < 0.85, (
          scenes_render.CLASS_NAMES[i],
          scenes_render.CLASS_NAMES[j],
      )


def test_objects_stay_in_the_image_and_scale_range():
  layout = scenes_render.sample_layout(np.random.default_rng(1), 1000, 96, 0.8)
  valid = layout.classes >= 0
  r = layout.radii[valid]
  assert r.min() >= scenes_render.MIN_SCALE * 48 - 1e-6
  assert r.max() <= scenes_render.MAX_SCALE * 48 + 1e-6
  centers = layout.centers[valid]
  assert np.all(centers >= r[:, None] - 1e-6)
  assert np.all(centers <= 96 - r[:, None] + 1e-6)


def test_encode_png_roundtrip():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (3, 17, 23, 3), dtype=np.uint8)
  gray = rng.integers(0, 2, (2, 9, 5, 1), dtype=np.uint8)
  for batch in (rgb, gray):
    for img, png in zip(batch, scenes.encode_png(batch)):
      decoded = np.asarray(Image.open(io.BytesIO(png)))
      np.testing.assert_array_equal(decoded.reshape(img.shape), img)


def test_paint_uses_the_palette():
  index = np.array([[[-1, 0], [1, 2]]], np.int8)
  shade = np.array([[[0, scenes_render.SHADES - 1], [0, scenes_render.SHADES - 1]]], np.uint8)
  obj = np.zeros((1, 3, 2, 3))
  obj[0, 0] = [[1, 0, 0], [0, 1, 0]]
  obj[0, 1] = [[0, 0, 1], [1, 1, 1]]
  obj[0, 2] = [[0, 0, 0], [0.5, 0.5, 0.5]]
  bg = np.array([[[0.2, 0.4, 0.6], [0, 0, 0]]])
  img = scenes_render.paint(index, shade, obj, bg)
  expect = np.array([[[51, 102, 153], [0, 255, 0]], [[0, 0, 255], [128, 128, 128]]], np.uint8)
  np.testing.assert_array_equal(img[0], expect)
