"""Pretraining and ContraCAM on a local image folder (config.dataset.name = folder:<root>)."""

import itertools
import logging
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ocl_jax.data import annotations
from ocl_jax.data import eval_data
from ocl_jax.data import folders
from ocl_jax.data import sources
from ocl_jax.data import tf_readers
from ocl_jax.data import train_data
from ocl_jax.data.errors import DatasetNotFoundError
from ocl_jax.configuration import ConfigError, validate_config
from tests.conftest import make_tiny_config, train_two_steps

CLASSES = ("00_dog", "01 bird", "02_cat")  # a space, as ImageNet-9's "02_wheeled vehicle"
PER_CLASS = 5


def _colour(k):
  return (10 * k + 5, 250 - 10 * k, 3 * k)


@pytest.fixture
def folder(tmp_path):
  """bg/original/train: 3 classes x 5 PNGs (40x48, one uniform colour each) and a corrupt
  JPEG; bg/original/val: one PNG per class. Returns (train root, {id: (label, colour)})."""
  root = tmp_path / "bg" / "original" / "train"
  expected = {}
  for label, name in enumerate(CLASSES):
    for split, count in ((root, PER_CLASS), (root.parent / "val", 1)):
      (split / name).mkdir(parents=True)
      for i in range(count):
        k = len(expected)
        Image.fromarray(np.full((40, 48, 3), _colour(k), np.uint8)).save(
            split / name / f"im{i}.png"
        )
        if split == root:
          expected[f"{name.replace(' ', '_')}__im{i}"] = (label, _colour(k))
  (root / "01 bird" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
  return root, expected


def _config(root, batch_size=8):
  c = make_tiny_config("unused")  # the TFDS data dir is not read for folders
  c.dataset.name = f"folder:{root}"
  c.dataset.eval_split = "val"
  c.batch_size = batch_size
  c.moco.queue_size = 64
  return c


def test_image_ids():
  assert (
      folders.folder_image_id("02_wheeled vehicle/n0402_77.JPEG") == "02_wheeled_vehicle__n0402_77"
  )
  assert folders.folder_image_id("a/b/c.d.png") == "a__b__c.d"


def test_train_stream_is_right_deterministic_resumable_and_skips_bad_files(folder, caplog):
  root, expected = folder
  data = train_data.create_train_data(_config(root))
  assert sources.num_classes(data.builder) == 3
  assert data.num_examples == 16 and data.steps_per_epoch == 2  # listed files, corrupt included
  epochs = []
  for e in range(2):
    ids = []
    for batch in tfds.as_numpy(data.epoch(e)):
      np.testing.assert_allclose(batch["aspect"], 48 / 40, rtol=1e-6)
      for image_id, label, image in zip(batch["id"], batch["label"], batch["image"]):
        label_ref, colour = expected[image_id.decode()]
        assert label == label_ref
        np.testing.assert_array_equal(image, np.broadcast_to(colour, (32, 32, 3)))
        ids.append(image_id.decode())
    assert len(ids) == 16 and set(ids) == set(expected)  # the corrupt file's slot is refilled
    epochs.append(ids)
  assert epochs[0] != epochs[1]  # reshuffled per epoch
  again = [
      ex["id"].decode()
      for ex in tfds.as_numpy(train_data.create_train_data(_config(root)).epoch(0).unbatch())
  ]
  assert again == epochs[0]  # a function of (seed, epoch)
  other = _config(root)
  other.seed = 1
  assert [
      ex["id"].decode()
      for ex in tfds.as_numpy(train_data.create_train_data(other).epoch(0).unbatch())
  ] != epochs[0]

  # Resuming at step 3 gives exactly the continuation, across the epoch boundary.
  with caplog.at_level(logging.WARNING):
    full = list(itertools.islice(data.iterate(0), 5))
  resumed = list(itertools.islice(data.iterate(3), 2))
  assert set(full[0]) == {"image", "aspect", "label"}  # host-only keys are dropped
  for a, b in zip(full[3:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  broken = str(root / "01 bird" / "broken.jpg")
  assert data.unreadable_files == {broken} and data.unreadable_count >= 2  # once per epoch
  assert re.search(r"Epoch 1: 1 image files .* replaced .*broken\.jpg", caplog.text)


def test_localization_and_eval_batches_use_the_same_ids(folder, caplog):
  root, expected = folder
  c = _config(root)
  with caplog.at_level(logging.WARNING):
    batches = list(eval_data.localization_batches(c, "train", 4))
  ids = [i for b in batches for i in b["id"]]
  assert ids == sorted(expected)  # listing order, corrupt file skipped
  assert "skipped 1 of 16" in caplog.text and "broken.jpg" in caplog.text
  for b in batches:
    assert b["image"].shape[1:] == (32, 32, 3) and set(b) >= {"image", "id", "label"}
    for image_id, label in zip(b["id"], b["label"]):
      assert label == expected[image_id][0]
  # ContraCAM counts a split through sources.num_examples: the listed files.
  builder = sources.get_builder(c.dataset.name, None)
  assert sources.num_examples(builder, "train") == 16
  assert int(tf_readers.open_split(builder, "train").cardinality()) == 16
  # Other splits are sibling folders: original/val.
  val = list(eval_data.localization_batches(c, "val", 8))
  assert list(val[0]["id"]) == ["00_dog__im0", "01_bird__im0", "02_cat__im0"]
  batches = list(eval_data.eval_batches(c, "val", batch_size=8))
  valid = np.concatenate([b["valid"].reshape(-1) for b in batches])
  labels = np.concatenate([b["label"].reshape(-1) for b in batches])
  assert valid.sum() == 3 and list(labels[valid > 0]) == [0, 1, 2]
  with pytest.raises(DatasetNotFoundError, match="no split 'test'"):
    list(eval_data.eval_batches(c, "test"))


def _write_masks(folder, ids):
  folder.mkdir()
  mask = np.zeros((32, 32), np.uint8)
  mask[8:24, 8:24] = 255  # a centred object, background around
  for image_id in ids:
    Image.fromarray(mask).save(folder / f"{image_id}.png")


def test_bg_mixup_and_oa_crop_training_on_a_folder(folder, tmp_path, caplog):
  root, expected = folder
  c = _config(root)
  c.bg_mixup.enabled, c.bg_mixup.prob = True, 1.0
  c.bg_mixup.masks = str(tmp_path / "masks")
  _write_masks(tmp_path / "masks", expected)
  boxes = tmp_path / "boxes_train.txt"  # what save_boxes writes: keyed by id
  boxes.write_text("".join(f"{i} 0.1,0.1,0.9,0.9\n" for i in expected))
  c.object_aware.crop, c.object_aware.boxes = True, str(boxes)
  state, log = train_two_steps(c, tmp_path / "run", caplog)
  mixed = [float(m) for m in re.findall(r"bg_mixup/mixed=([0-9.eE+-]+)", log)]
  assert mixed and 0 < mixed[-1] <= 1
  assert int(state.bg_fifo.count) > 0


def test_missing_mask_names_the_id_and_the_folder(folder, tmp_path):
  root, expected = folder
  c = _config(root)
  c.bg_mixup.enabled = True
  c.bg_mixup.masks = str(tmp_path / "masks")
  _write_masks(tmp_path / "masks", [i for i in expected if i != "02_cat__im3"])
  data = train_data.create_train_data(c)
  with pytest.raises(
      annotations.MaskLookupError, match=f"02_cat__im3 .*{re.escape(str(tmp_path / 'masks'))}"
  ):
    list(itertools.islice(data.iterate(0), data.steps_per_epoch))  # every id is in an epoch


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
  c = _config(tmp_path / "nope")
  with pytest.raises(ConfigError, match="config.dataset.name"):
    validate_config(c, num_devices=4, num_processes=1)
  with pytest.raises(DatasetNotFoundError, match="config.dataset.name"):
    train_data.create_train_data(c)
  (tmp_path / "empty" / "some_class").mkdir(parents=True)
  c = _config(tmp_path / "empty")
  with pytest.raises(ValueError, match="config.dataset.name.*no images"):
    train_data.create_train_data(c)
  c.dataset.train_split = "train[:50%]"
  with pytest.raises(ConfigError, match="config.dataset.train_split"):
    validate_config(c, num_devices=4, num_processes=1)
