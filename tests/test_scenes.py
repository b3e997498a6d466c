"""Tests of the `scenes` array cache and its NumPy generation functions.

The cache-level tests read the session's `scenes/tiny` arrays (conftest);
the tests of prepare itself render a smaller custom config into their own
data dir; statistical tests call the pure generation functions on a larger
custom config.
"""

import dataclasses
import os

import numpy as np
import pytest

from ocl_jax.data import scenes, scenes_render
from ocl_jax.data import sources
from ocl_jax.data.array_reader import ArraySource
from ocl_jax.data.errors import DatasetNotFoundError
from ocl_jax.tools import contact_sheet
from tests.conftest import tiny_split

TINY = scenes.CONFIGS['tiny']
TEST_VARIANTS = ('test_mixed_same', 'test_mixed_rand', 'test_only_fg')
# A few scenes per split: for the tests of prepare, which render into their own data dir.
MINI = dataclasses.replace(
    TINY, name='mini', image_size=16, num_train=12, num_train_labeled=5, num_val=4, num_test=6
)


def _scenes_of(arrays: dict) -> np.ndarray:
  return np.asarray(arrays['id']) % scenes.ID_STRIDE


def _objects(arrays: dict, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(classes, boxes) of the annotated objects of example k, in paint order."""
  keep = arrays['classes'][k] >= 0
  return arrays['classes'][k][keep], arrays['boxes'][k][keep]


@pytest.fixture(scope='module')
def tiny(scenes_data_dir):
  """{split: arrays} of the session's scenes/tiny cache."""
  return {split: tiny_split(scenes_data_dir, split) for split in scenes.SPLITS}


BIG = dataclasses.replace(TINY, name='big', num_train=2048, num_test=2048)


def _batches(config, split):
  """All generate_batch outputs of a split, concatenated."""
  n = scenes.split_size(config, split)
  parts = [scenes.generate_batch(config, split, b) for b in range(-(-n // scenes.BATCH))]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture(scope='module')
def big_train():
  """2048 biased 32 px scenes for binomial tests, rendered without the cache."""
  return _batches(BIG, 'train')


# ---------------------------------------------------------------- names and configs


def test_configs():
  for name, size, train in [('default', 96, 20_000), ('small', 96, 4_000), ('tiny', 32, 256)]:
    config = scenes.config_of(f'scenes/{name}')
    assert config is scenes.CONFIGS[name]
    assert (config.image_size, config.num_train) == (size, train)
    assert (config.background_bias, config.context_bias) == (0.9, 0.8)
  assert scenes.config_of('scenes').name == 'default'
  assert scenes.config_of(f'scenes/tiny:{scenes.VERSION}') is TINY


def test_is_scenes_name():
  for name in ('scenes', 'scenes/tiny', 'scenes/tiny:1.0.0', 'scenes:1.0.0', 'scenes/nope'):
    assert scenes.is_scenes_name(name), name
  for name in ('coco/2017', 'cifar10', 'folder:/data/scenes', 'scenes_v2', 'my_scenes/tiny'):
    assert not scenes.is_scenes_name(name), name


def test_unknown_config_is_a_clear_error(tmp_path):
  for name in ('scenes/huge', 'scenes/tiny/extra', 'scenes/'):
    with pytest.raises(ValueError, match='known: scenes/default, scenes/small, scenes/tiny'):
      scenes.config_of(name)
  with pytest.raises(ValueError, match=f'scenes is at version {scenes.VERSION}, not 9.9.9'):
    scenes.config_of('scenes/tiny:9.9.9')
  # the readers' entry point: a DatasetNotFoundError (what every unknown dataset gives)
  with pytest.raises(DatasetNotFoundError, match="Unknown scenes dataset 'scenes/huge'"):
    sources.get_builder('scenes/huge', str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing rendered


def test_unknown_split_is_a_clear_error(scenes_data_dir):
  with pytest.raises(ValueError, match="no split 'testing'.*'test_single'"):
    scenes.load_split(TINY, scenes_data_dir, 'testing')
  source = ArraySource.scenes('scenes/tiny', scenes_data_dir)
  with pytest.raises(ValueError, match=r"no split 'testing\[:10\]'"):
    source.locate('testing[:10]')


# ---------------------------------------------------------------- the array cache


def test_split_sizes(tiny):
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
  assert {s: len(a['label']) for s, a in tiny.items()} == expected
  assert {s: scenes.split_size(TINY, s) for s in expected} == expected
  for split, arrays in tiny.items():
    assert {k: len(v) for k, v in arrays.items()} == dict.fromkeys(scenes.FIELDS, expected[split])


def test_feature_types(tiny):
  for arrays in tiny.values():
    n = len(arrays['label'])
    assert arrays['image'].shape == (n, 32, 32, 3) and arrays['image'].dtype == np.uint8
    assert arrays['mask'].shape == (n, 32, 32) and arrays['mask'].dtype == np.uint8
    assert arrays['boxes'].shape == (n, scenes_render.MAX_OBJECTS, 4)
    assert arrays['boxes'].dtype == np.float32
    assert arrays['classes'].shape == arrays['areas'].shape == (n, scenes_render.MAX_OBJECTS)
    assert set(np.unique(arrays['mask'])) <= {0, 1}
    present = (arrays['classes'] >= 0).sum(1)
    assert np.all((1 <= present) & (present <= scenes_render.MAX_OBJECTS))
    # a slot is an object iff it has visible pixels; empty slots are all zero
    np.testing.assert_array_equal(arrays['classes'] >= 0, arrays['areas'] > 0)
    assert not arrays['boxes'][arrays['classes'] < 0].any()
    assert np.all((0 <= arrays['label']) & (arrays['label'] < 10))


def test_ids_unique_and_encode_split(tiny):
  ids = np.concatenate([a['id'] for a in tiny.values()])
  assert len(ids) == len(set(ids.tolist()))
  for i, arrays in enumerate(tiny.values()):
    # in scene order
    np.testing.assert_array_equal(_scenes_of(arrays), np.arange(len(arrays['id'])))
    assert np.all(arrays['id'] // scenes.ID_STRIDE == i)


def test_cache_holds_the_generated_arrays(tiny, scenes_data_dir):
  """prepare wrote every split, field for field, as generate_batch renders it."""
  folder = scenes.cache_dir(TINY, scenes_data_dir)
  assert folder == os.path.join(scenes_data_dir, 'scenes', 'tiny', scenes.VERSION)
  assert sorted(os.listdir(folder)) == sorted(scenes.SPLITS)
  for split, arrays in tiny.items():
    assert sorted(os.listdir(os.path.join(folder, split))) == sorted(
        f'{k}.npy' for k in scenes.FIELDS
    )
    ref = _batches(TINY, split)
    assert set(arrays) == set(ref) == set(scenes.FIELDS)
    for k, v in ref.items():
      assert arrays[k].dtype == scenes.FIELDS[k][0], (split, k)
      np.testing.assert_array_equal(arrays[k], v, err_msg=f'{split}/{k}')


def test_prepare_renders_every_split_once(tmp_path, monkeypatch):
  data_dir = str(tmp_path)
  folder = scenes.prepare(MINI, data_dir)
  assert folder == scenes.cache_dir(MINI, data_dir)
  assert os.listdir(os.path.dirname(folder)) == [scenes.VERSION]  # no temp folder left
  for split in scenes.SPLITS:
    arrays = scenes.load_split(MINI, data_dir, split)
    assert len(arrays['label']) == scenes.split_size(MINI, split)
    for k, v in _batches(MINI, split).items():
      np.testing.assert_array_equal(arrays[k], v, err_msg=f'{split}/{k}')

  # A second prepare (and every read) reuses the cache: nothing is rendered again.
  def fail(*args):
    raise AssertionError('rendered again')

  monkeypatch.setattr(scenes, 'write_split', fail)
  monkeypatch.setattr(scenes, 'generate_batch', fail)
  before = {p: os.stat(p).st_mtime_ns for p in _files(folder)}
  assert scenes.prepare(MINI, data_dir) == folder
  np.testing.assert_array_equal(
      scenes.load_split(MINI, data_dir, 'test')['id'], scenes.ID_STRIDE * 3 + np.arange(6)
  )
  assert {p: os.stat(p).st_mtime_ns for p in _files(folder)} == before


def _files(folder):
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)


def test_interrupted_prepare_leaves_no_cache(tmp_path, monkeypatch):
  """A run killed while rendering leaves at most a temp folder, which does not count as
  prepared: the next prepare renders the whole config again."""
  data_dir = str(tmp_path)
  parent = os.path.dirname(scenes.cache_dir(MINI, data_dir))
  write_split = scenes.write_split

  def interrupted(config, split, folder):
    if split == 'test':
      raise KeyboardInterrupt
    write_split(config, split, folder)

  monkeypatch.setattr(scenes, 'write_split', interrupted)
  with pytest.raises(KeyboardInterrupt):
    scenes.prepare(MINI, data_dir)
  assert os.listdir(parent) == []  # the partial splits were removed, no cache
  monkeypatch.setattr(scenes, 'write_split', write_split)

  # A process killed outright leaves its temp folder behind, with some splits in it.
  leftover = os.path.join(parent, f'.{scenes.VERSION}.incomplete-0123abcd-xyz')
  write_split(MINI, 'train', os.path.join(leftover, 'train'))
  arrays = scenes.load_split(MINI, data_dir, 'val')
  np.testing.assert_array_equal(arrays['image'], _batches(MINI, 'val')['image'])
  assert os.path.isdir(os.path.join(scenes.cache_dir(MINI, data_dir), 'test_single'))
  assert sorted(os.listdir(parent)) == sorted([os.path.basename(leftover), scenes.VERSION])


@pytest.mark.parametrize(
    'damage', ['truncated', 'empty', 'missing', 'not_npy', 'wrong_shape', 'wrong_dtype']
)
def test_damaged_cache_file_is_a_clear_error(tmp_path, damage):
  data_dir = str(tmp_path)
  folder = scenes.prepare(MINI, data_dir)
  path = os.path.join(folder, 'val', 'mask.npy')
  if damage == 'truncated':
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  elif damage == 'empty':
    open(path, 'wb').close()
  elif damage == 'missing':
    os.remove(path)
  elif damage == 'not_npy':
    with open(path, 'wb') as f:
      f.write(b'\x89PNG not an array')
  elif damage == 'wrong_shape':
    np.save(path, np.zeros((4, 8, 8), np.uint8))
  else:
    np.save(path, np.zeros((4, 16, 16), np.float32))
  with pytest.raises(ValueError, match=f'scenes cache file {path} .*delete {folder}'):
    scenes.load_split(MINI, data_dir, 'val')
  scenes.load_split(MINI, data_dir, 'test')  # the other splits still read


def test_prepare_rejects_bad_configs(tmp_path):
  for bad in (
      dataclasses.replace(MINI, num_val=0),
      dataclasses.replace(MINI, num_test=scenes.ID_STRIDE),
      dataclasses.replace(MINI, background_bias=1.5),
  ):
    with pytest.raises(ValueError, match='examples|probabilities'):
      scenes.prepare(bad, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, 'scenes', 'mini', scenes.VERSION))


# ---------------------------------------------------------------- what the scenes hold


def test_boxes_and_mask_agree(tiny):
  for arrays in tiny.values():
    for k in range(len(arrays['label'])):
      mask = arrays['mask'][k].astype(bool)
      ys, xs = np.nonzero(mask)
      support = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]) / 32
      covered = np.zeros_like(mask)
      for box in _objects(arrays, k)[1]:
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
  for arrays in tiny.values():
    for k in range(len(arrays['label'])):
      assert arrays['label'][k] in _objects(arrays, k)[0]


def test_shifted_splits_share_objects_with_test(tiny):
  ref = tiny['test']
  fg = ref['mask'] == 1
  for variant in TEST_VARIANTS:
    arrays = tiny[variant]
    np.testing.assert_array_equal(_scenes_of(arrays), _scenes_of(ref))
    for key in ('mask', 'classes', 'boxes', 'areas', 'label'):
      np.testing.assert_array_equal(arrays[key], ref[key], err_msg=f'{variant}/{key}')
    np.testing.assert_array_equal(arrays['image'][fg], ref['image'][fg])
    differs = sum(
        not np.array_equal(arrays['image'][k][~fg[k]], ref['image'][k][~fg[k]])
        for k in range(len(ref['label']))
    )
    assert differs == len(ref['label'])  # every background is redrawn


def test_only_fg_background_is_black(tiny):
  arrays = tiny['test_only_fg']
  bg = arrays['mask'] == 0
  assert bg.any(axis=(1, 2)).all()
  assert np.all(arrays['image'][bg] == 0)
  assert np.all(arrays['background'] == -1)


def test_mixed_same_uses_class_family(tiny):
  arrays = tiny['test_mixed_same']
  np.testing.assert_array_equal(arrays['background'], scenes_render.CLASS_FAMILY[arrays['label']])


def test_test_single_has_one_object(tiny):
  arrays = tiny['test_single']
  for k in range(len(arrays['label'])):
    classes = _objects(arrays, k)[0]
    assert len(classes) == 1 and arrays['label'][k] == classes[0]


def test_contact_sheet(scenes_data_dir, tiny):
  rows = [(split, contact_sheet.first_scenes(scenes_data_dir, 'tiny', split, 3)) for split in tiny]
  for split, examples in rows:
    assert [int(ex['id']) % scenes.ID_STRIDE for ex in examples] == [0, 1, 2]
    np.testing.assert_array_equal(examples[2]['image'], tiny[split]['image'][2])
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
