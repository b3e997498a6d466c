"""Input pipeline: shapes, deterministic resumable order, padded eval batches, clear errors."""

import itertools

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ocl_jax.data import eval_data
from ocl_jax.data import preprocess
from ocl_jax.data import sources
from ocl_jax.data import tf_readers
from ocl_jax.data import train_data
from ocl_jax.data.errors import DatasetNotFoundError
from tests.conftest import tiny_split


def test_train_batches_shapes_and_values(tiny_config):
  data = train_data.create_train_data(tiny_config)
  assert data.num_examples == 256 and data.steps_per_epoch == 256 // 16
  batch = next(data.iterate())
  n = jax.local_device_count()
  assert batch["image"].shape == (n, 16 // n, 32, 32, 3) and batch["image"].dtype == np.uint8
  np.testing.assert_array_equal(batch["aspect"], 1.0)  # scenes images are square
  assert batch["label"].min() >= 0 and batch["label"].max() < 10


def _flat(batch):
  return batch["image"].reshape((-1,) + batch["image"].shape[2:])


def test_order_is_a_function_of_seed_and_step(tiny_config):
  """Resuming at step s yields exactly the batches an uninterrupted run sees from s on,
  across an epoch boundary; epochs are reshuffled; another seed gives another order."""
  data = train_data.create_train_data(tiny_config)
  spe = data.steps_per_epoch
  full = [_flat(b) for b in itertools.islice(data.iterate(0), spe + 3)]
  resumed = [_flat(b) for b in itertools.islice(data.iterate(spe - 2), 5)]
  for a, b in zip(full[spe - 2 :], resumed):
    np.testing.assert_array_equal(a, b)
  # One epoch covers every image once (no duplicates inside an epoch).
  epoch = np.concatenate(full[:spe]).reshape(spe * 16, -1)
  assert len(np.unique(epoch, axis=0)) == spe * 16
  assert not np.array_equal(full[0], full[spe])  # epoch 2 is reshuffled
  tiny_config.seed = 1
  other = next(train_data.create_train_data(tiny_config).iterate(0))
  assert not np.array_equal(_flat(other), full[0])


def test_eval_batches_pad_and_mask_without_dropping(tiny_config):
  batches = list(eval_data.eval_batches(tiny_config, "test", batch_size=24))
  masks = np.concatenate([b["valid"].reshape(-1) for b in batches])
  assert masks.sum() == 64 and len(masks) == 3 * 24  # 64 examples, last batch padded
  labels = np.concatenate([b["label"].reshape(-1) for b in batches])[masks > 0]
  ref = tiny_split(tiny_config.dataset.data_dir, "test")["label"]  # in order, each once
  np.testing.assert_array_equal(labels, ref)


def test_missing_dataset_names_the_directory(tmp_path):
  builder = tfds.builder("coco/2017", data_dir=str(tmp_path))
  with pytest.raises(DatasetNotFoundError, match=str(tmp_path)) as e:
    tf_readers.open_split(builder, "train")
  assert "tfds build coco/2017" in str(e.value)


def test_unknown_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(DatasetNotFoundError, match="config.dataset.name"):
    sources.get_builder("no_such_dataset_xyz", str(tmp_path))
  with pytest.raises(DatasetNotFoundError, match="config.dataset.name.*known: scenes/default"):
    sources.get_builder("scenes/no_such_config", str(tmp_path))


def test_coco_label_is_class_of_largest_instance():
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    builder = tfds.builder("coco/2017")
    ds = builder.as_dataset(split="train")
    pre = preprocess.make_preprocess(builder, 48)
    for ex in ds.take(4):
      out = pre(ex)
      assert out["image"].shape == (48, 48, 3)
      bbox = ex["objects"]["bbox"].numpy()
      labels = ex["objects"]["label"].numpy()
      n = min(len(bbox), len(labels))  # mock data draws their lengths independently
      bbox, labels = bbox[:n], labels[:n]
      area = (bbox[:, 2] - bbox[:, 0]) * (bbox[:, 3] - bbox[:, 1])
      expected = labels[np.argmax(area)] if len(labels) else -1
      assert int(out["label"]) == expected
      h, w = ex["image"].shape[:2]
      np.testing.assert_allclose(float(out["aspect"]), w / h, rtol=1e-6)


def test_resize_to_square_keeps_the_aspect_and_resizes_like_pil():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
  square, aspect = preprocess.resize_to_square(image, 20)
  assert square.shape == (20, 20, 3) and square.dtype == np.uint8
  assert float(aspect) == np.float32(50) / np.float32(30)
  # PIL's bilinear is the same antialiased triangle filter (it rounds between its two passes).
  pil = np.asarray(Image.fromarray(image).resize((20, 20), Image.BILINEAR), np.int32)
  assert np.abs(np.asarray(square, np.int32) - pil).max() <= 1
  gray, gray_aspect = preprocess.resize_to_square(image[..., :1], 20)
  assert gray.shape == (20, 20, 3) and float(gray_aspect) == float(aspect)
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  np.testing.assert_array_equal(gray[..., 0], square[..., 0])  # channel 0 resized alike


def test_train_image_size_sets_the_training_batches_only(tiny_config):
  """dataset.train_image_size: training batches at that side, the online probe's and the
  ContraCAM modes' reads at dataset.image_size; 0 means image_size."""
  tiny_config.dataset.train_image_size = 40
  assert train_data.train_image_size(tiny_config) == 40
  batch = next(train_data.create_train_data(tiny_config).iterate())
  assert batch["image"].shape[-3:] == (40, 40, 3)
  np.testing.assert_array_equal(batch["aspect"], 1.0)
  probe = next(eval_data.eval_batches(tiny_config, "test", batch_size=8))
  assert probe["image"].shape[-3:] == (32, 32, 3)
  boxes = next(eval_data.localization_batches(tiny_config, "test", batch_size=8))
  assert boxes["image"].shape[-3:] == (32, 32, 3)
  tiny_config.dataset.train_image_size = 0
  assert train_data.train_image_size(tiny_config) == 32
