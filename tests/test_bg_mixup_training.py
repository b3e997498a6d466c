"""BG-mixup wired into training: aligned masks, masks from the data, a short run."""

import re

import jax
import numpy as np
import pytest
from PIL import Image

from ocl_jax.data import train_data
from ocl_jax.data.annotations import MaskFileError
from ocl_jax.views import augment
from ocl_jax.configuration import ConfigError, validate_config
from tests.conftest import tiny_split, train_two_steps


def test_transformed_masks_stay_aligned_with_view():
  """A mask equal to the image's red channel, transformed with view 1's boxes and flips,
  equals the red channel of the view (no colour augmentation)."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 24, 24, 3), dtype=np.uint8)
  cfg = augment.ViewConfig(crop_size=16, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
  views, boxes, flips = augment.augment_batch(
      jax.random.PRNGKey(3), images, np.ones(6, np.float32), cfg
  )
  assert 0 < int(np.sum(flips)) < 6  # both flipped and unflipped images are covered
  masks = augment.transform_masks(images[..., 0], boxes, flips, 16)
  np.testing.assert_allclose(masks, views[..., 0], atol=1e-5)


def _bg_config(tiny_config, masks="gt"):
  c = tiny_config
  c.bg_mixup.enabled = True
  c.bg_mixup.masks = masks
  c.bg_mixup.prob = 1.0
  return c


def _first_examples(data, count):
  """The first `count` examples of epoch 0's host batches, one dict each."""
  out = []
  for batch in data.host_batches(0):
    out += [{k: v[j] for k, v in batch.items()} for j in range(len(batch["image"]))]
    if len(out) >= count:
      return out[:count]
  return out


def test_masks_from_dataset_and_from_a_folder(tiny_config, tmp_path):
  c = _bg_config(tiny_config)
  data = train_data.create_train_data(c)
  arrays = tiny_split(c.dataset.data_dir, "train")
  ids = [int(i) for i in arrays["id"]]
  ref = dict(zip(ids, arrays["mask"]))
  # Ground truth: the 0/1 mask as 0/255, in the stream's order (ids are not streamed, so
  # match each streamed image to its source image).
  images = dict(zip(ids, arrays["image"]))
  streamed = _first_examples(data, 8)
  assert len(streamed) == 8
  for ex in streamed:
    (image_id,) = [i for i, im in images.items() if np.array_equal(im, ex["image"])]
    np.testing.assert_array_equal(ex["fg_mask"], ref[image_id] * 255)
  # A folder of PNGs named by id (what save_masks writes): soft values survive.
  folder = tmp_path / "masks"
  folder.mkdir()
  soft = {i: np.uint8((i * 37) % 256) * np.ones((32, 32), np.uint8) for i in ref}
  for i, m in soft.items():
    Image.fromarray(m).save(folder / f"{i}.png")
  c.bg_mixup.masks = str(folder)
  data = train_data.create_train_data(c)
  for ex in _first_examples(data, 8):
    (image_id,) = [i for i, im in images.items() if np.array_equal(im, ex["image"])]
    np.testing.assert_array_equal(ex["fg_mask"], soft[image_id])


def test_missing_mask_folder_is_a_config_error(tiny_config, tmp_path):
  c = _bg_config(tiny_config, masks=str(tmp_path / "nope"))
  with pytest.raises(ConfigError, match="bg_mixup.masks"):
    validate_config(c, 4, 1)


def test_tiny_training_with_bg_mixup(tiny_config, tmp_path, caplog):
  state, log = train_two_steps(_bg_config(tiny_config), tmp_path, caplog)
  mixed = [float(m) for m in re.findall(r"bg_mixup/mixed=([0-9.eE+-]+)", log)]
  assert mixed and 0 < mixed[-1] <= 1  # prob 1: images with a background are mixed
  assert int(state.bg_fifo.count) > 0  # their backgrounds entered the FIFO


def test_view_pictures_of_oacrop_and_bg_mixup(tiny_config, tmp_path, caplog):
  """views.png: one row per image, columns source | view 1 | view 2 | mask; OA-crop regions
  (yellow) and both crops (red, blue) are drawn on the source."""
  c = _bg_config(tiny_config)
  c.object_aware.crop = True
  c.view_pictures = 3
  train_two_steps(c, tmp_path, caplog)
  grid = np.asarray(Image.open(tmp_path / "views.png"))
  assert grid.shape == (3 * 32 * 2, 4 * 32 * 2, 3)
  source = grid[:, :64]
  for colour in ((255, 220, 0), (255, 60, 60), (60, 140, 255)):
    assert np.any(np.all(source == colour, axis=-1)), colour


def test_mask_of_the_wrong_shape_is_an_error_naming_the_file(tiny_config, tmp_path):
  """scenes images are square: a 16x40 mask cannot be theirs."""
  ids = [int(i) for i in tiny_split(tiny_config.dataset.data_dir, "train")["id"]]
  folder = tmp_path / "masks"
  folder.mkdir()
  for i in ids:
    shape = (16, 40) if i == ids[0] else (20, 20)  # other sizes than the images are fine
    Image.fromarray(np.full(shape, 200, np.uint8)).save(folder / f"{i}.png")
  c = _bg_config(tiny_config, masks=str(folder))
  data = train_data.create_train_data(c)
  with pytest.raises(MaskFileError, match=f"{ids[0]}.png"):
    for _ in data.host_batches(0):
      pass
