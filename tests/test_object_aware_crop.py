"""Object-aware random crop (OA-crop, docs/method.md#oa-crop): region choice, pipeline, training."""

import functools
import math
import pathlib
import re

import jax
import numpy as np
import pytest

from ocl_jax import parallel
from ocl_jax.data import annotations
from ocl_jax.data import array_reader
from ocl_jax.data import sources
from ocl_jax.data import train_data
from ocl_jax.discovery import localization
from ocl_jax.views import augment, compose
from ocl_jax.configuration import ConfigError, load_sibling_config, validate_config
from tests.conftest import make_tiny_config, train_two_steps

ROOT = pathlib.Path(__file__).parents[1]

BOXES = np.array(
    [
        [[0.0, 0.0, 0.5, 0.5], [0.1, 0.1, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0], [0.2, 0.3, 0.9, 0.6]],
        [[0.3, 0.3, 0.4, 0.4], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
        [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.25, 0.1, 0.75, 0.3]],
    ],
    np.float32,
)
VALID = np.array([[True, False, True, True], [False] * 4, [False, False, False, True]])


@jax.jit
def _regions_over_keys(keys):
  return jax.vmap(lambda k: augment.choose_regions(k, BOXES, VALID))(keys)


def test_choose_regions_picks_valid_boxes_uniformly():
  n = 3000
  regions = np.asarray(_regions_over_keys(jax.random.split(jax.random.PRNGKey(0), n)))
  # Image 0: only its valid boxes 0, 2, 3, each about 1/3 of the time.
  picked = [np.flatnonzero(np.all(np.isclose(BOXES[0], r), axis=1)) for r in regions[:, 0]]
  assert all(len(p) == 1 and VALID[0, p[0]] for p in picked)
  counts = np.bincount([p[0] for p in picked], minlength=4)
  assert counts[1] == 0
  sd = math.sqrt(n * (1 / 3) * (2 / 3))
  np.testing.assert_allclose(counts[[0, 2, 3]], n / 3, atol=4 * sd)
  # Image 1: no valid box -> the whole image; image 2: its single valid box.
  np.testing.assert_array_equal(regions[:, 1], np.broadcast_to([0, 0, 1, 1], (n, 4)))
  np.testing.assert_array_equal(regions[:, 2], np.broadcast_to(BOXES[2, 3], (n, 4)))


def test_choose_regions_independent_of_batch_split():
  key = jax.random.PRNGKey(3)
  whole = augment.choose_regions(key, BOXES, VALID)
  parts = [
      augment.choose_regions(key, BOXES[:1], VALID[:1], index_offset=0),
      augment.choose_regions(key, BOXES[1:], VALID[1:], index_offset=1),
  ]
  np.testing.assert_array_equal(whole, np.concatenate(parts))


def test_crops_lie_inside_chosen_regions():
  cfg = augment.ViewConfig(crop_size=8, scale=(0.08, 1.0))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  aspects = np.array([1.0, 0.75, 1.5], np.float32)
  fn = jax.jit(
      lambda k: augment.augment_batch(
          k,
          images,
          aspects,
          cfg,
          regions=augment.choose_regions(jax.random.fold_in(k, 9), BOXES, VALID),
      )
  )
  for seed in range(20):
    key = jax.random.PRNGKey(seed)
    regions = augment.choose_regions(jax.random.fold_in(key, 9), BOXES, VALID)
    _, crops, _ = fn(key)
    crops, regions = np.asarray(crops), np.asarray(regions)
    assert np.all(crops[:, :2] >= regions[:, :2] - 1e-5)
    assert np.all(crops[:, 2:] <= regions[:, 2:] + 1e-5)


@functools.lru_cache(maxsize=None)
def _pmapped_views(with_boxes: bool):
  """compose.augment_views on one device, with a constant step key."""
  plan = compose.ViewPlan(view=augment.ViewConfig(crop_size=8))
  step_key = jax.random.fold_in(jax.random.PRNGKey(5), 3)

  def views(b):
    a = compose.augment_views(step_key, b, plan)
    return a.x1, a.x2

  return jax.pmap(views, axis_name=parallel.AXIS, devices=jax.local_devices()[:1])


def test_full_image_boxes_equal_plain_views():
  rng = np.random.default_rng(1)
  batch = {
      "image": rng.integers(0, 256, (1, 4, 16, 16, 3), dtype=np.uint8),
      "aspect": rng.uniform(0.75, 1.33, (1, 4)).astype(np.float32),
  }
  plain = _pmapped_views(False)(batch)
  boxes = np.zeros((1, 4, 3, 4), np.float32)
  boxes[..., 1, :] = [0, 0, 1, 1]  # one full-image box per image, in slot 1
  valid = np.zeros((1, 4, 3), bool)
  valid[..., 1] = True
  oa = _pmapped_views(True)({**batch, "boxes": boxes, "box_valid": valid})
  for a, b in zip(plain, oa):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------
# Input pipeline.


def _examples(config, builder, region_boxes, take=None):
  """(raw id, raw yxyx bbox of its objects, preprocessed example) of the train split, in
  order, through the reader's own preprocessing (array_reader.example_batch)."""
  arrays = builder.arrays("train")
  n = len(arrays["label"]) if take is None else take
  batch = array_reader.example_batch(arrays, np.arange(n), config.dataset.image_size, region_boxes)
  return [
      (
          int(arrays["id"][j]),
          arrays["boxes"][j][arrays["classes"][j] >= 0],
          {k: v[j] for k, v in batch.items()},
      )
      for j in range(n)
  ]


def _oa_config(scenes_data_dir, boxes="gt", tolerate=False):
  c = make_tiny_config(scenes_data_dir)
  c.object_aware.crop = True
  c.object_aware.boxes = boxes
  c.object_aware.tolerate_box_errors = tolerate
  return c


def test_gt_boxes_match_dataset_objects(scenes_data_dir):
  c = _oa_config(scenes_data_dir)
  builder = sources.get_builder(c.dataset.name, c.dataset.data_dir)
  raw = _examples(c, builder, None, take=64)
  areas = np.concatenate([(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) for _, b, _ in raw])
  # Filter at the median area so some instances are kept and some dropped; K=2 also truncates.
  c.object_aware.gt_min_area = float(np.median(areas))
  c.object_aware.max_boxes = 2
  c.object_aware.gt_margin = 0.3
  source = annotations.create_region_boxes(c, builder)
  truncated = 0
  for _, bbox, ex in _examples(c, builder, source, take=64):
    xyxy = bbox[:, [1, 0, 3, 2]].astype(np.float64)
    w, h = xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]
    keep = w * h > c.object_aware.gt_min_area
    grown = xyxy[keep] + 0.3 * np.stack([-w, -h, w, h], -1)[keep]
    expected = np.clip(grown, 0, 1)[:2]
    truncated += keep.sum() > 2
    n = len(expected)
    assert ex["boxes"].shape == (2, 4) and ex["box_valid"].shape == (2,)
    np.testing.assert_array_equal(ex["box_valid"], np.arange(2) < n)
    np.testing.assert_allclose(ex["boxes"][:n], expected, atol=1e-6)
    np.testing.assert_array_equal(ex["boxes"][n:], 0)
  assert areas.size > 0 and (areas <= c.object_aware.gt_min_area).any()


def _write_boxes(path, ids, skip=()):
  """Distinct boxes per id (0 to 3 of them), so a mismatch shows up."""
  table = {}
  for i in ids:
    if i in skip:
      continue
    r = np.random.default_rng(int(i) % 100_003)
    lo = r.uniform(0, 0.5, (int(i) % 4, 2))
    table[str(i)] = np.concatenate([lo, lo + r.uniform(0, 0.5, lo.shape)], -1)
  localization.write_box_file(path, table)
  return table


def test_box_file_boxes_match_ids(scenes_data_dir, tmp_path):
  c = _oa_config(scenes_data_dir)
  builder = sources.get_builder(c.dataset.name, c.dataset.data_dir)
  ids = [i for i, _, _ in _examples(c, builder, None)]
  path = str(tmp_path / "boxes_train.txt")
  table = _write_boxes(path, ids)
  c.object_aware.boxes = path
  c.object_aware.max_boxes = 2
  validate_config(c, num_devices=4, num_processes=1)
  source = annotations.create_region_boxes(c, builder)
  examples = _examples(c, builder, source)
  assert len(examples) == len(ids)
  for image_id, _, ex in examples:
    expected = table[str(image_id)][:2]
    n = len(expected)
    np.testing.assert_array_equal(ex["box_valid"], np.arange(2) < n)
    np.testing.assert_allclose(ex["boxes"][:n], expected, atol=1e-6)
    assert not ex["box_missing"]

  # The training stream carries them too (box_missing stays on the host).
  batch = next(train_data.create_train_data(c).iterate())
  assert batch["boxes"].shape == (4, 4, 2, 4) and batch["box_valid"].shape == (4, 4, 2)
  assert "box_missing" not in batch


def test_box_file_missing_ids(scenes_data_dir, tmp_path):
  c = _oa_config(scenes_data_dir)
  builder = sources.get_builder(c.dataset.name, c.dataset.data_dir)
  ids = [i for i, _, _ in _examples(c, builder, None)]
  path = str(tmp_path / "partial.txt")
  skipped = set(ids[::2])
  _write_boxes(path, ids, skip=skipped)
  c.object_aware.boxes = path

  data = train_data.create_train_data(c)
  with pytest.raises(annotations.BoxLookupError) as info:
    next(data.iterate())  # half the ids are missing: the first batch has one
  message = str(info.value)
  assert path in message
  assert int(re.search(r"image id (\d+)", message).group(1)) in skipped

  # Tolerated: missing ids are counted and cropped from the whole image.
  c.object_aware.tolerate_box_errors = True
  source = annotations.create_region_boxes(c, builder)
  examples = _examples(c, builder, source)
  missing = [image_id for image_id, _, ex in examples if ex["box_missing"]]
  assert set(missing) == skipped
  assert all(not ex["box_valid"].any() for i, _, ex in examples if i in skipped)
  data = train_data.create_train_data(c)
  it = data.iterate()
  for _ in range(data.steps_per_epoch + 1):
    next(it)
  assert 0 < data.missing_box_count <= len(skipped)


def test_config_validation(tmp_path):
  for name in ("coco_oacrop_gt.py", "scenes_oacrop_gt.py"):
    validate_config(load_sibling_config(str(ROOT / "configs" / name), name), 4, 1)
  for name in ("coco_oacrop_cam.py", "scenes_oacrop_cam.py"):
    c = load_sibling_config(str(ROOT / "configs" / name), name)
    with pytest.raises(ConfigError, match="object_aware.boxes.*does not exist"):
      validate_config(c, 4, 1)
    c.object_aware.boxes = str(tmp_path / "nowhere.txt")
    with pytest.raises(ConfigError, match="nowhere.txt"):
      validate_config(c, 4, 1)
    localization.write_box_file(tmp_path / "b.txt", {"1": np.zeros((0, 4))})
    c.object_aware.boxes = str(tmp_path / "b.txt")
    validate_config(c, 4, 1)
  c = load_sibling_config(str(ROOT / "configs" / "demo.py"), "demo.py")
  c.object_aware.max_boxes = 0
  with pytest.raises(ConfigError, match="object_aware.max_boxes"):
    validate_config(c, 4, 1)


def test_tiny_training_with_gt_oa_crop(scenes_data_dir, tmp_path, caplog):
  _, log = train_two_steps(_oa_config(scenes_data_dir), tmp_path, caplog)
  losses = [float(m) for m in re.findall(r"\bloss=([-+0-9.eE]+|nan|inf)", log)]
  assert losses and all(np.isfinite(losses))
