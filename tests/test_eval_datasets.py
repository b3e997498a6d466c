"""Evaluation datasets: counts, order, padding, resize + centre crop, COCO-Crop boxes,
TFDS transfer sets under mock data, image folders with unreadable files, clear errors."""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from ocl_jax.data import eval_data
from ocl_jax.data import eval_datasets
from ocl_jax.data import scenes_render
from ocl_jax.data import tf_readers
from ocl_jax.data.errors import DatasetNotFoundError
from tests.conftest import tiny_split


def _collect(ds, split, **kw):
  """All batches of one pass, concatenated; checks the fixed batch shape and padding."""
  kw = {"image_size": 8, "crop_fraction": 0.875, "batch_size": 4, **kw}
  batches = list(eval_data.split_batches(ds, split, **kw))
  for b in batches:
    assert set(b) == {"image", "label", "valid"}
    size, bs = kw["image_size"], kw["batch_size"]
    assert b["image"].shape == (bs, size, size, 3) and b["image"].dtype == np.uint8
    assert b["label"].shape == (bs,) and b["label"].dtype == np.int32
    assert b["valid"].shape == (bs,) and b["valid"].dtype == np.int32
  out = {k: np.concatenate([b[k] for b in batches]) for k in ("image", "label", "valid")}
  n = int(out["valid"].sum())
  # Padding only at the very end, zeros with label -1, and less than one batch of it.
  np.testing.assert_array_equal(out["valid"], np.arange(len(out["valid"])) < n)
  assert len(out["valid"]) - n < kw["batch_size"]
  assert np.all(out["label"][n:] == -1) and np.all(out["image"][n:] == 0)
  return {k: v[:n] for k, v in out.items()}


# ----------------------------------------------------------------------------
# scenes


def test_scenes_splits_counts_order_and_padding(scenes_data_dir):
  ds = eval_datasets.get_eval_dataset("scenes", scenes_name="scenes/tiny", data_dir=scenes_data_dir)
  assert (
      ds.class_names == scenes_render.CLASS_NAMES and ds.num_classes == 10 and ds.head_from is None
  )
  assert (ds.train, ds.val) == ("train_labeled", "val")
  assert ds.tests == {
      "test": "test",
      "mixed_same": "test_mixed_same",
      "mixed_rand": "test_mixed_rand",
      "only_fg": "test_only_fg",
      "single": "test_single",
  }
  for split in ds.splits:
    # 64 examples, batches of 24: the last one is padded with 8.
    got = _collect(ds, split, image_size=32, crop_fraction=1.0, batch_size=24)
    ref = tiny_split(scenes_data_dir, split)
    assert len(got["label"]) == len(ref["label"]) == 64
    assert eval_data.split_size(ds, split) == len(ref["label"])
    np.testing.assert_array_equal(got["label"], ref["label"])
    if split == "test":  # same size, crop fraction 1: the images themselves, in order
      np.testing.assert_array_equal(got["image"], ref["image"])
  assert eval_data.last_skipped(ds, "test") == ()
  small = _collect(ds, "val", image_size=16, crop_fraction=0.875, batch_size=5, max_examples=7)
  assert small["image"].shape == (7, 16, 16, 3)
  # The NumPy reader resizes and crops like the tf.data one: 32 -> 18, centre 16 x 16.
  for got, image in zip(small["image"], tiny_split(scenes_data_dir, "val")["image"][:7]):
    assert np.abs(got.astype(int) - _np_resize_center_crop(image, 16, 0.875)).max() <= 1
  # with_ids: the images' ids, in order, padded with 0.
  batches = list(
      eval_data.split_batches(
          ds, "test", image_size=32, crop_fraction=1.0, batch_size=24, with_ids=True
      )
  )
  ids = np.concatenate([b["id"] for b in batches])
  assert ids.dtype == np.int64 and len(ids) == 72
  np.testing.assert_array_equal(ids[:64], tiny_split(scenes_data_dir, "test")["id"])
  assert not ids[64:].any()


# ----------------------------------------------------------------------------
# Resize + centre crop against NumPy.


def _np_resize_axis(x, out, axis):
  """Antialiased bilinear (triangle filter widened by the downscale factor), half-pixel centres."""
  n = x.shape[axis]
  scale = out / n
  radius = max(1.0, 1.0 / scale)
  weights = np.zeros((out, n))
  for i in range(out):
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(n) - ((i + 0.5) / scale - 0.5)) / radius)
    weights[i] = w / w.sum()
  return np.moveaxis(np.tensordot(weights, np.moveaxis(x, axis, 0), 1), 0, axis)


def _np_resize_center_crop(image, size, crop_fraction):
  h, w = image.shape[:2]
  target = round(size / crop_fraction)
  nh, nw = (target, target * w // h) if h <= w else (target * h // w, target)
  x = _np_resize_axis(_np_resize_axis(image.astype(np.float64), nh, 0), nw, 1)
  top, left = (nh - size) // 2, (nw - size) // 2
  return np.clip(np.round(x[top : top + size, left : left + size]), 0, 255).astype(np.uint8)


def _write(path, image):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  encode = tf.io.encode_png if path.endswith(".png") else tf.io.encode_jpeg
  tf.io.write_file(path, encode(tf.constant(image, tf.uint8)))


def _solid(value, size=8):
  return np.full((size, size, 3), value, np.uint8)


def test_resize_center_crop_matches_numpy_on_a_non_square_folder_image(tmp_path):
  rng = np.random.RandomState(0)
  # 40 x 80: shorter side 40 -> round(16 / 0.8) = 20, i.e. 20 x 40, centre 16 x 16 = rows
  # 2..17, columns 12..27 of the resized image.
  wide = (rng.rand(40, 80, 3) * 255).astype(np.uint8)
  root = str(tmp_path / "d")
  _write(f"{root}/train/a/x.png", wide)
  _write(f"{root}/test/a/x.png", wide)
  for i in range(9):
    _write(f"{root}/train/a/y{i}.png", _solid(1))
  ds = eval_datasets.get_eval_dataset(f"folder:{root}")
  got = _collect(ds, "test", image_size=16, crop_fraction=0.8, batch_size=2)
  assert got["image"].shape == (1, 16, 16, 3)
  ref = _np_resize_center_crop(wide, 16, 0.8)
  assert np.abs(got["image"][0].astype(int) - ref).max() <= 1
  # The crop is the centre: a crop taken off-centre by a pixel differs much more.
  resized = _np_resize_axis(_np_resize_axis(wide.astype(np.float64), 20, 0), 40, 1)
  assert np.abs(got["image"][0] - resized[2:18, 13:29]).mean() > 10
  # Portrait, odd sizes (long side truncated: 20 * 47 // 30 = 31) and grayscale input.
  tall = (rng.rand(47, 30, 1) * 255).astype(np.uint8)
  out = tf_readers.resize_center_crop(tf.constant(tall), 15, 0.75).numpy()
  ref = _np_resize_center_crop(np.repeat(tall, 3, -1), 15, 0.75)
  assert out.shape == (15, 15, 3) and np.abs(out.astype(int) - ref).max() <= 1


# ----------------------------------------------------------------------------
# COCO-Crop boxes.


def test_coco_crop_box_selection_margin_and_clipping():
  # (ymin, xmin, ymax, xmax) normalised, as TFDS coco/2017 stores them.
  bbox = np.array(
      [
          [0.1, 0.2, 0.5, 0.7],  # w 0.5, h 0.4: kept, grows by (0.1, 0.08): x 0.1..0.8, y .02..0.58
          [0.0, 0.0, 0.05, 0.1],  # area 0.005 < 1%: dropped
          [0.85, 0.9, 1.0, 1.0],  # w 0.1, h 0.15, area 0.015: kept, clipped at 1
          [0.2, 0.2, 0.3, 0.3],  # area exactly 1%: kept (>=)
          [0.5, 0.5, 0.4, 0.9],  # degenerate (ymax < ymin): dropped
      ],
      np.float32,
  )
  labels = np.array([3, 4, 7, 9, 1, 5])  # one extra label (mock data): ignored
  boxes, kept = tf_readers.coco_crop_boxes(tf.constant(bbox), tf.constant(labels))
  np.testing.assert_array_equal(kept.numpy(), [3, 7, 9])
  np.testing.assert_allclose(
      boxes.numpy(),
      [
          [0.1, 0.02, 0.8, 0.58],
          [0.88, 0.82, 1.0, 1.0],
          [0.18, 0.18, 0.32, 0.32],
      ],
      atol=1e-6,
  )
  # Pixel windows round outwards and stay inside the image (top, left, h, w).
  window = tf_readers.box_pixels(tf.constant([0.1, 0.02, 0.8, 0.58]), 50, 20).numpy()
  np.testing.assert_array_equal(window, [1, 2, 29 - 1, 16 - 2])
  window = tf_readers.box_pixels(tf.constant([0.99, 0.99, 1.0, 1.0]), 10, 10).numpy()
  np.testing.assert_array_equal(window, [9, 9, 1, 1])


# ----------------------------------------------------------------------------
# TFDS sets under mock data.


@pytest.mark.parametrize("name", sorted(eval_datasets.TFDS_TRANSFER) + ["coco_crop"])
def test_tfds_sets_under_mock_data(name):
  num_classes = {
      "caltech_birds2011": 200,
      "oxford_flowers102": 102,
      "food101": 101,
      "oxford_iiit_pet": 37,
      "cifar10": 10,
      "cifar100": 100,
      "coco_crop": 80,
  }[name]
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=5):
    ds = eval_datasets.get_eval_dataset(name)
    assert ds.num_classes == num_classes and ds.head_from is None
    assert ds.train and ds.val and list(ds.tests) == ["test"]
    for split in ds.splits:
      got = _collect(ds, split, image_size=12, batch_size=8)
      assert np.all((got["label"] >= 0) & (got["label"] < num_classes))
      if name == "coco_crop":
        assert eval_data.split_size(ds, split) is None
        builder = tfds.builder("coco/2017")
        expected = [
            int(
                tf_readers.coco_crop_boxes(ex["objects"]["bbox"], ex["objects"]["label"])[1].shape[
                    0
                ]
            )
            for ex in builder.as_dataset(split=split)
        ]
        assert len(got["label"]) == sum(expected) > 0
      else:
        assert len(got["label"]) == eval_data.split_size(ds, split) == 5


def test_tfds_set_not_prepared_is_a_clear_error(tmp_path):
  ds = eval_datasets.get_eval_dataset("cifar10", data_dir=str(tmp_path))
  with pytest.raises(DatasetNotFoundError, match=str(tmp_path)):
    next(eval_data.split_batches(ds, "test", image_size=8, crop_fraction=1.0, batch_size=2))


# ----------------------------------------------------------------------------
# Image folders.

IN9 = ("00_dog", "01_bird", "02_wheeled vehicle")


def _imagenet9_tree(root, train_per_class=10, per_variant=2):
  """bg_challenge layout; every image is a solid colour 10 * (class + 1) (+ 100 in tests)."""
  for c, cls in enumerate(IN9):
    for i in range(train_per_class):
      _write(f"{root}/original/train/{cls}/img{i:02d}.png", _solid(10 * (c + 1)))
    for v in eval_datasets.IMAGENET9_VARIANTS:
      for i in range(per_variant):
        _write(f"{root}/{v}/val/{cls}/{v}_{i}.JPEG", _solid(100 + 10 * (c + 1)))


def test_imagenet9_layout_splits_and_variants(tmp_path):
  root = str(tmp_path / "bg_challenge")
  _imagenet9_tree(root)
  ds = eval_datasets.get_eval_dataset("imagenet9", folders={"imagenet9": root})
  assert ds.class_names == IN9 and ds.head_from is None
  assert (ds.train, ds.val) == ("train", "val")
  assert ds.tests == {v: v for v in eval_datasets.IMAGENET9_VARIANTS}
  # Every 10th file of each class (sorted) is val: img09 of each class.
  assert [os.path.basename(p) for p, _ in ds.files["val"]] == ["img09.png"] * 3
  assert [label for _, label in ds.files["val"]] == [0, 1, 2]
  again = eval_datasets.get_eval_dataset("imagenet9", folders={"imagenet9": root})
  assert again == ds and hash(again) == hash(ds)  # usable as a cache key
  train = _collect(ds, "train", batch_size=7)
  np.testing.assert_array_equal(train["label"], np.repeat([0, 1, 2], 9))
  np.testing.assert_array_equal(train["image"][:, 4, 4, 0], 10 * (train["label"] + 1))
  assert eval_data.split_size(ds, "train") == 27
  for v in eval_datasets.IMAGENET9_VARIANTS:
    got = _collect(ds, ds.tests[v])
    np.testing.assert_array_equal(got["label"], [0, 0, 1, 1, 2, 2])
    assert np.all(
        np.abs(got["image"][:, 4, 4].astype(int) - 100 - 10 * (got["label"][:, None] + 1)) <= 2
    )  # JPEG
    assert eval_data.last_skipped(ds, v) == ()


def test_objectnet9_and_si_score_use_the_imagenet9_head(tmp_path):
  in9 = str(tmp_path / "in9")
  _imagenet9_tree(in9, train_per_class=10, per_variant=1)
  on9 = str(tmp_path / "on9")
  _write(f"{on9}/01_bird/a.png", _solid(5))
  _write(f"{on9}/01_bird/b.png", _solid(5))
  _write(f"{on9}/02_wheeled vehicle/c.png", _solid(5))
  folders = {"imagenet9": in9, "objectnet9": on9}
  ds = eval_datasets.get_eval_dataset("objectnet9", folders=folders)
  assert ds.head_from == "imagenet9" and ds.class_names == IN9
  assert ds.train is None and ds.val is None and ds.tests == {"test": "test"}
  np.testing.assert_array_equal(_collect(ds, "test")["label"], [1, 1, 2])
  # Without the imagenet9 folder the canonical nine classes are the head.
  ds = eval_datasets.get_eval_dataset("objectnet9", folders={"objectnet9": on9})
  assert ds.class_names == eval_datasets.IMAGENET9_CLASSES

  si = str(tmp_path / "si")
  _write(f"{si}/area/00_dog/a.png", _solid(5))
  _write(f"{si}/rotation/02_wheeled vehicle/b.png", _solid(5))
  _write(f"{si}/rotation/01_bird/c.png", _solid(5))
  ds = eval_datasets.get_eval_dataset("si_score", folders={**folders, "si_score": si})
  assert ds.head_from == "imagenet9" and ds.class_names == IN9
  assert ds.tests == {"area": "area", "rotation": "rotation"}
  np.testing.assert_array_equal(_collect(ds, "area")["label"], [0])
  np.testing.assert_array_equal(_collect(ds, "rotation")["label"], [1, 2])
  _write(f"{si}/location/07_primate/d.png", _solid(5))  # not among the 3 head classes
  _write(f"{si}/location/zebra/e.png", _solid(5))
  with pytest.raises(ValueError, match=r"\['07_primate', 'zebra'\]"):
    eval_datasets.get_eval_dataset("si_score", folders={**folders, "si_score": si})


def test_unreadable_files_are_skipped_counted_and_logged(tmp_path, caplog):
  root = str(tmp_path / "d")
  for i in range(10):
    _write(f"{root}/train/a/{i}.png", _solid(50))
  good = (np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8)
  for i in range(4):
    _write(f"{root}/test/a/{i}.jpg", good)
  jpeg = tf.io.encode_jpeg(tf.constant(good)).numpy()
  with open(f"{root}/test/a/1_truncated.jpg", "wb") as f:
    f.write(jpeg[: len(jpeg) // 2])
  with open(f"{root}/test/a/2_corrupt.JPG", "wb") as f:
    f.write(np.random.RandomState(1).bytes(500))
  with open(f"{root}/test/a/notes.txt", "w") as f:  # not an image name: never listed
    f.write("x")
  ds = eval_datasets.get_eval_dataset(f"folder:{root}")
  assert eval_data.split_size(ds, "test") == 6
  assert eval_data.last_skipped(ds, "test") is None  # no pass yet
  with caplog.at_level(logging.WARNING):
    got = _collect(ds, "test", batch_size=4)
  assert len(got["label"]) == 4 and np.all(got["label"] == 0)
  skipped = eval_data.last_skipped(ds, "test")
  assert sorted(os.path.basename(p) for p in skipped) == ["1_truncated.jpg", "2_corrupt.JPG"]
  assert "skipped 2 of 6" in caplog.text and "1_truncated.jpg" in caplog.text
  # The folder without val: every 10th training file is held out.
  assert len(ds.files["train"]) == 9 and len(ds.files["val"]) == 1


def test_folder_errors(tmp_path):
  with pytest.raises(
      ValueError,
      match="Unknown evaluation dataset 'nope'; known: .*cifar10.*" "imagenet9.*folder:<path>",
  ):
    eval_datasets.get_eval_dataset("nope")
  with pytest.raises(ValueError, match="config.evaluation.folders.imagenet9"):
    eval_datasets.get_eval_dataset("imagenet9")
  with pytest.raises(ValueError, match="config.evaluation.folders.objectnet9"):
    eval_datasets.get_eval_dataset("objectnet9", folders={"objectnet9": str(tmp_path / "x")})
  root = str(tmp_path / "bg")
  _imagenet9_tree(root, train_per_class=10, per_variant=1)
  tf.io.gfile.rmtree(f"{root}/mixed_rand")
  with pytest.raises(ValueError, match=f"missing: {root}/mixed_rand/val"):
    eval_datasets.get_eval_dataset("imagenet9", folders={"imagenet9": root})
  empty = tmp_path / "empty"
  (empty / "00_dog").mkdir(parents=True)
  (empty / "00_dog" / "readme.txt").write_text("no images")
  with pytest.raises(ValueError, match="no images"):
    eval_datasets.get_eval_dataset("objectnet9", folders={"objectnet9": str(empty)})
