"""Bad inputs stop a run before its first step, with a message naming the file or folder."""

import logging
import os
import re

import numpy as np
import pytest
from PIL import Image

from ocl_jax import train
from ocl_jax.data import annotations
from ocl_jax.data import prechecks
from ocl_jax.data import train_data
from ocl_jax.data.errors import DatasetNotFoundError
from ocl_jax.discovery import discover
from ocl_jax.discovery import localization
from tests.conftest import make_tiny_config
from tests.conftest import tiny_split


def _ids(config):
  """The training images' ids, in scene order (the order the pre-checks name them in)."""
  return [str(int(i)) for i in tiny_split(config.dataset.data_dir, "train")["id"]]


def _assert_not_started(workdir):
  """Nothing of a run (config.json, events, checkpoints) was written."""
  assert not os.path.exists(workdir) or not os.listdir(workdir)


def _boxes_config(tiny_config, path, tolerate=False):
  c = tiny_config
  c.object_aware.crop, c.object_aware.boxes = True, str(path)
  c.object_aware.tolerate_box_errors = tolerate
  return c


def _write_boxes(path, ids):
  path.write_text("".join(f"{i} 0.1,0.1,0.9,0.9\n" for i in ids))


def _write_masks(folder, ids):
  folder.mkdir(exist_ok=True)
  for i in ids:
    Image.fromarray(np.full((32, 32), 200, np.uint8)).save(folder / f"{i}.png")


def test_box_file_missing_an_id_stops_before_the_first_step(tiny_config, tmp_path, caplog):
  ids = _ids(tiny_config)
  path = tmp_path / "boxes_train.txt"
  _write_boxes(path, ids[1:])
  c = _boxes_config(tiny_config, path)
  with pytest.raises(annotations.BoxLookupError) as info:
    train.train_and_evaluate(c, str(tmp_path / "run"))
  message = str(info.value)
  assert f"1 of the {len(ids)} training images" in message
  assert str(path) in message and f"first ids: {ids[0]}." in message
  assert "tolerate_box_errors" in message
  _assert_not_started(tmp_path / "run")

  # Tolerated: a warning, and the run goes on (checked without training).
  c.object_aware.tolerate_box_errors = True
  with caplog.at_level(logging.WARNING):
    prechecks.check_coverage(c, train_data.create_train_data(c))
  assert f"1 of the {len(ids)} training images" in caplog.text and ids[0] in caplog.text


def test_zero_area_box_is_an_error_naming_file_and_line(tiny_config, tmp_path):
  ids = _ids(tiny_config)
  path = tmp_path / "boxes_train.txt"
  _write_boxes(path, ids)
  lines = path.read_text().splitlines()
  lines[2] = f"{ids[2]} 0.5,0.5,0.5,0.5"
  path.write_text("\n".join(lines) + "\n")
  c = _boxes_config(tiny_config, path)
  with pytest.raises(localization.BoxFileError, match=f"{re.escape(str(path))}:3: .*zero area"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  _assert_not_started(tmp_path / "run")
  # Tolerated like any malformed line: skipped, so that image is the box file's missing id.
  c.object_aware.tolerate_box_errors = True
  data = train_data.create_train_data(c)
  assert ids[2] not in data.region_boxes.id_set and len(data.region_boxes.ids) == len(ids) - 1
  assert data.region_boxes.ids == tuple(ids[:2] + ids[3:])  # in the file's order


def test_mask_folder_missing_a_mask_stops_before_the_first_step(tiny_config, tmp_path):
  ids = _ids(tiny_config)
  folder = tmp_path / "masks"
  _write_masks(folder, ids[:-2])
  c = tiny_config
  c.bg_mixup.enabled, c.bg_mixup.masks = True, str(folder)
  with pytest.raises(annotations.MaskLookupError) as info:
    train.train_and_evaluate(c, str(tmp_path / "run"))
  message = str(info.value)
  assert f"2 of the {len(ids)} training images" in message
  assert str(folder) in message and f"first ids: {ids[-2]}, {ids[-1]}." in message
  _assert_not_started(tmp_path / "run")


def test_truncated_or_empty_mask_is_named(tiny_config, tmp_path):
  ids = _ids(tiny_config)
  folder = tmp_path / "masks"
  _write_masks(folder, ids)
  whole = (folder / f"{ids[3]}.png").read_bytes()
  (folder / f"{ids[3]}.png").write_bytes(whole[:60])
  (folder / f"{ids[5]}.png").write_bytes(b"")
  c = tiny_config
  c.bg_mixup.enabled, c.bg_mixup.masks = True, str(folder)
  with pytest.raises(prechecks.MaskFileError) as info:
    train.train_and_evaluate(c, str(tmp_path / "run"))
  message = str(info.value)
  assert f"2 of the {len(ids)} BG-mixup mask PNGs" in message
  assert f"{folder / ids[3]}.png (truncated, 60 bytes)" in message
  assert f"{folder / ids[5]}.png (empty)" in message
  _assert_not_started(tmp_path / "run")


def test_mask_damaged_inside_rgb_or_of_another_size_is_named_before_training(tiny_config, tmp_path):
  """A PNG whose start and end are intact but whose data is not, a 3-channel PNG and masks of
  another size than save_masks writes for this square-image dataset: all stop the run before
  its first step, naming the files (each would otherwise fail or be misread only when its
  image is streamed)."""
  ids = _ids(tiny_config)
  folder = tmp_path / "masks"
  _write_masks(folder, ids)
  noisy = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
  Image.fromarray(noisy).save(folder / f"{ids[2]}.png")
  data = bytearray((folder / f"{ids[2]}.png").read_bytes())
  middle = len(data) // 2
  data[middle : middle + 40] = bytes(40)
  (folder / f"{ids[2]}.png").write_bytes(bytes(data))
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / f"{ids[4]}.png")
  Image.fromarray(np.zeros((32, 20), np.uint8)).save(folder / f"{ids[6]}.png")
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / f"{ids[7]}.png")
  c = tiny_config
  c.bg_mixup.enabled, c.bg_mixup.masks = True, str(folder)
  with pytest.raises(prechecks.MaskFileError) as info:
    train.train_and_evaluate(c, str(tmp_path / "run"))
  message = str(info.value)
  assert f"4 of the {len(ids)} BG-mixup mask PNGs" in message
  assert f"{folder / ids[2]}.png (damaged:" in message
  assert f"{folder / ids[6]}.png (20x32: not the 32x32 that save_masks writes)" in message
  assert f"{folder / ids[7]}.png (16x16: not the 32x32 that save_masks writes)" in message
  assert f"{folder / ids[4]}.png (RGB image, not one channel)" in message
  _assert_not_started(tmp_path / "run")


def test_missing_eval_split_stops_before_the_first_step(tiny_config, tmp_path):
  c = tiny_config
  c.dataset.eval_split = "nosuch"
  with pytest.raises(DatasetNotFoundError, match="no split 'nosuch'.*eval_every_steps"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  _assert_not_started(tmp_path / "run")
  c.eval_every_steps = 0  # no online evaluation: no eval split needed
  prechecks.check_eval_split(c, train_data.create_train_data(c))


@pytest.fixture
def folder_config(tmp_path):
  """data/train: 2 classes x 8 PNGs and a corrupt JPEG; no data/val. batch 8, eval on 'val'."""
  root = tmp_path / "data" / "train"
  for k, name in enumerate(("a", "b")):
    (root / name).mkdir(parents=True)
    for i in range(8):
      Image.fromarray(np.full((32, 32, 3), 40 * k + i, np.uint8)).save(root / name / f"{i}.png")
  (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
  c = make_tiny_config("unused")
  c.dataset.name, c.dataset.eval_split, c.batch_size = f"folder:{root}", "val", 8
  return c


def test_folder_dataset_without_its_eval_split(folder_config, tmp_path):
  with pytest.raises(DatasetNotFoundError, match=f"has no split 'val'.*{tmp_path}/data/val"):
    train.train_and_evaluate(folder_config, str(tmp_path / "run"))
  _assert_not_started(tmp_path / "run")


def test_folder_images_that_cannot_be_decoded_need_no_mask(folder_config, tmp_path):
  """Training replaces them and ContraCAM skips them, so its masks never include them."""
  c = folder_config
  readable = [f"{name}__{i}" for name in ("a", "b") for i in range(8)]
  _write_masks(tmp_path / "masks", readable)
  c.bg_mixup.enabled, c.bg_mixup.masks = True, str(tmp_path / "masks")
  prechecks.check_coverage(c, train_data.create_train_data(c))  # b__broken has none: fine
  os.remove(tmp_path / "masks" / "a__3.png")
  with pytest.raises(annotations.MaskLookupError, match="1 of the 17 .*first ids: a__3\\."):
    prechecks.check_coverage(c, train_data.create_train_data(c))


def _unwritable(tmp_path):
  """A folder this process cannot write into: read-only, or (root) below a regular file."""
  if os.geteuid() == 0:
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "run"
  folder = tmp_path / "ro"
  folder.mkdir()
  os.chmod(folder, 0o500)
  return folder


def test_unwritable_workdir_stops_training_before_the_first_step(tiny_config, tmp_path):
  workdir = _unwritable(tmp_path)
  try:
    with pytest.raises(prechecks.NotWritableError, match=f"Workdir .*{workdir} is not writable"):
      train.train_and_evaluate(tiny_config, str(workdir))
  finally:
    os.chmod(tmp_path / "ro", 0o700) if (tmp_path / "ro").exists() else None
  assert not os.path.exists(workdir) or not os.listdir(workdir)


@pytest.mark.parametrize("mode", ["boxes", "masks"])
def test_unwritable_contracam_output_fails_before_contracam_runs(tiny_config, tmp_path, mode):
  """No model exists in the workdir: reaching ContraCAM would fail differently."""
  workdir = _unwritable(tmp_path)
  save = discover.save_boxes if mode == "boxes" else discover.save_masks
  try:
    with pytest.raises(prechecks.NotWritableError, match=f"{workdir}.* is not writable"):
      save(tiny_config, str(workdir))
  finally:
    os.chmod(tmp_path / "ro", 0o700) if (tmp_path / "ro").exists() else None
