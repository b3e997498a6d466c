"""The NumPy reader of array datasets (`scenes`) against TensorFlow's arithmetic and by hand.

The tf.data readers stay the reference for what a host batch holds: the same resize, the
same OA-crop regions, the same masks. These tests import TensorFlow; the reader itself does
not (tests/test_plain_jax_install.py).
"""

import numpy as np
import pytest
import tensorflow as tf

from ocl_jax.data import annotations
from ocl_jax.data import array_reader
from ocl_jax.data import preprocess
from ocl_jax.data import tf_readers
from ocl_jax.data import train_data
from tests.conftest import tiny_split


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize(
    "shape, size",
    [((32, 32), (32, 32)), ((32, 32), (20, 20)), ((17, 29), (40, 23)), ((96, 64), (33, 48))],
)
def test_resize_is_tf_image_resize(shape, size, antialias):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2,) + shape + (3,)).astype(np.float32)
  want = tf.image.resize(images, size, method="bilinear", antialias=antialias).numpy()
  got = array_reader.resize(images, *size, antialias=antialias)
  np.testing.assert_allclose(got, want, atol=2e-3)


def test_resize_weights_by_hand():
  # Halving 4 pixels: output centres at input 1 and 3 (pixel centres at 0.5, 1.5, ...); plain
  # bilinear takes the two neighbours equally; antialiased, the triangle of half-width 2
  # weighs taps 0.5, 0.5 and 1.5 away by 3/4, 3/4 and 1/4, normalised by 7/4.
  np.testing.assert_allclose(
      array_reader.resize_weights(4, 2, False), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]
  )
  np.testing.assert_allclose(
      array_reader.resize_weights(4, 2, True), [[3 / 7, 3 / 7, 1 / 7, 0], [0, 1 / 7, 3 / 7, 3 / 7]]
  )
  np.testing.assert_allclose(array_reader.resize_weights(5, 5, True), np.eye(5))


@pytest.mark.parametrize("size, fraction", [(32, 1.0), (24, 0.875), (40, 1.0)])
def test_resize_center_crop_is_the_tf_readers_one(size, fraction):
  images = np.random.default_rng(1).integers(0, 256, (3, 32, 48, 3)).astype(np.uint8)
  want = np.stack([tf_readers.resize_center_crop(im, size, fraction).numpy() for im in images])
  got = array_reader.resize_center_crop(images, size, fraction)
  assert got.dtype == np.uint8 and got.shape == want.shape
  assert (
      np.abs(got.astype(int) - want).max() <= 1 and (got == want).mean() > 0.98
  )  # float32 ties round either way


def test_gt_regions_and_masks_are_the_tf_readers_ones(scenes_data_dir):
  arrays = tiny_split(scenes_data_dir, "train")
  rows = np.arange(16)
  rb = annotations.RegionBoxes(max_boxes=2, min_area=0.01, margin=0.1)
  got = array_reader.example_batch(arrays, rows, 24, region_boxes=rb, fg_masks="gt")
  for j, row in enumerate(rows):
    keep = arrays["classes"][row] >= 0
    boxes, valid = preprocess.gt_region_boxes(arrays["boxes"][row][keep], 2, 0.01, 0.1)
    np.testing.assert_allclose(got["boxes"][j], boxes.numpy(), atol=1e-6)
    np.testing.assert_array_equal(got["box_valid"][j], valid.numpy())
    example = {"mask": arrays["mask"][row][..., None]}
    mask = preprocess.foreground_mask(example, {"mask": None}, "gt", 24).numpy()
    assert np.abs(got["fg_mask"][j].astype(int) - mask).max() <= 1
    image, _ = preprocess.resize_to_square(arrays["image"][row], 24)
    assert np.abs(got["image"][j].astype(int) - image.numpy()).max() <= 1
  assert got["image"].shape == (16, 24, 24, 3) and got["label"].dtype == np.int32


def test_box_file_and_mask_folder_lookups(tmp_path, scenes_data_dir):
  arrays = tiny_split(scenes_data_dir, "train")
  ids = [str(int(i)) for i in arrays["id"][:3]]
  box_file = tmp_path / "boxes.txt"
  box_file.write_text(f"{ids[0]} 0.1,0.2,0.5,0.6\n{ids[1]} 0,0,1,1 0.2,0.2,0.4,0.4\n")
  rb = annotations.RegionBoxes.from_box_file(str(box_file), 2, tolerate_errors=True)
  got = array_reader.example_batch(arrays, np.arange(3), 32, region_boxes=rb)
  np.testing.assert_allclose(got["boxes"][0, 0], [0.1, 0.2, 0.5, 0.6], atol=1e-6)
  np.testing.assert_array_equal(got["box_valid"], [[1, 0], [1, 1], [0, 0]])
  np.testing.assert_array_equal(got["box_missing"], [False, False, True])
  strict = annotations.RegionBoxes.from_box_file(str(box_file), 2, tolerate_errors=False)
  with pytest.raises(annotations.BoxLookupError, match=ids[2]):
    array_reader.example_batch(arrays, np.arange(3), 32, region_boxes=strict)

  masks = tmp_path / "masks"
  masks.mkdir()
  from PIL import Image

  Image.fromarray(np.full((32, 32), 200, np.uint8)).save(masks / f"{ids[0]}.png")
  got = array_reader.example_batch(arrays, np.arange(1), 32, fg_masks=str(masks))
  assert (got["fg_mask"] == 200).all()
  mask_ids = annotations.MaskIds.from_folder(str(masks))
  with pytest.raises(annotations.MaskLookupError, match=f"{ids[1]}.png"):
    array_reader.example_batch(arrays, np.arange(2), 32, fg_masks=str(masks), mask_ids=mask_ids)
  (masks / f"{ids[1]}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
  with pytest.raises(annotations.MaskFileError, match=f"{ids[1]}.png"):
    array_reader.example_batch(arrays, np.arange(2), 32, fg_masks=str(masks))
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(masks / f"{ids[1]}.png")
  with pytest.raises(annotations.MaskFileError, match="one-channel"):
    array_reader.example_batch(arrays, np.arange(2), 32, fg_masks=str(masks))
  Image.fromarray(np.zeros((32, 48), np.uint8)).save(masks / f"{ids[1]}.png")
  with pytest.raises(annotations.MaskFileError, match="neither square"):
    array_reader.example_batch(arrays, np.arange(2), 32, fg_masks=str(masks))


def test_training_batches_slice_the_global_order_by_process(tiny_config):
  """Two processes' slices of each global batch make up the one-process batch, and a
  resumed stream starts at the batch it resumes at."""
  tiny_config.batch_size = 16
  whole = train_data.create_train_data(tiny_config)
  first = list(whole.host_batches(1))
  assert len(first) == whole.steps_per_epoch == 256 // 16
  import dataclasses

  halves = [
      list(
          dataclasses.replace(whole, local_batch=8, process_index=p, process_count=2).host_batches(
              1
          )
      )
      for p in range(2)
  ]
  for i, batch in enumerate(first):
    joined = np.concatenate([halves[0][i]["image"], halves[1][i]["image"]])
    np.testing.assert_array_equal(batch["image"], joined)
  resumed = list(whole.host_batches(1, skip_batches=5))
  np.testing.assert_array_equal(resumed[0]["label"], first[5]["label"])
  # Against the rule itself: epoch e's batch i holds rows order[16 i : 16 (i + 1)] of the split,
  # order the permutation seeded by (seed, e).
  arrays = tiny_split(tiny_config.dataset.data_dir, "train")
  for epoch, batches in ((1, first), (2, list(whole.host_batches(2)))):
    seed = train_data.epoch_seed(tiny_config.seed, epoch)
    order = np.random.default_rng(seed).permutation(256)
    for i, batch in enumerate(batches):
      rows = order[16 * i : 16 * (i + 1)]
      np.testing.assert_array_equal(batch["image"], arrays["image"][rows])
      np.testing.assert_array_equal(batch["label"], arrays["label"][rows])
  other_epoch = next(iter(whole.host_batches(2)))
  assert not np.array_equal(other_epoch["label"], first[0]["label"]) or not np.array_equal(
      other_epoch["image"], first[0]["image"]
  )
  # Every epoch visits distinct images: one epoch's ids are a permutation's prefix.
  ids = np.concatenate([b["image"].reshape(16, -1)[:, :8] for b in first])
  assert len({row.tobytes() for row in ids}) > 240


@pytest.mark.parametrize("n, count", [(10, 3), (64, 4), (5, 8)])
def test_process_shards_cover_the_split_once(n, count):
  shards = [array_reader.process_shard(n, p, count) for p in range(count)]
  assert shards[0][0] == 0 and shards[-1][1] == n
  assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
  sizes = [b - a for a, b in shards]
  assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_split_slices(scenes_data_dir):
  from ocl_jax.data import sources

  source = sources.get_builder("scenes/tiny", scenes_data_dir)
  assert source.locate("train[:10]") == ("train", 0, 10)
  assert source.locate("train[90%:]") == ("train", 230, 256)
  assert source.num_examples("val") == 64
  np.testing.assert_array_equal(
      source.arrays("train[10:20]")["id"], tiny_split(scenes_data_dir, "train")["id"][10:20]
  )
  with pytest.raises(ValueError, match="has no split 'nope'"):
    source.locate("nope")
