"""ContraCAM over datasets: model loading, box files, mask PNGs, localisation table, pictures."""

import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ocl_jax import checkpointing, export
from ocl_jax.discovery import crf
from ocl_jax.discovery import discover
from ocl_jax.discovery import localization
from ocl_jax.models import ModelSpec
from tests.conftest import tiny_split


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, scenes_data_dir):
  """A training workdir (one checkpoint) and an export of the same random-init model."""
  from tests.conftest import export_random_init, make_tiny_config

  config = make_tiny_config(scenes_data_dir)
  workdir = str(tmp_path_factory.mktemp("run"))
  state, export_dir = export_random_init(config, workdir)
  ckpt = checkpointing.Checkpointer(workdir, ModelSpec.from_config(config), config)
  ckpt.save(3, state)
  ckpt.close()
  return config, workdir, export_dir, state


def _cam_config(config, source):
  c = config.copy_and_resolve_references()
  c.contracam.checkpoint = source
  c.contracam.expand_res = 2
  c.contracam.iterations = 2
  c.contracam.batch_size = 8
  c.contracam.max_images = 16
  c.contracam.num_pictures = 3
  return c


def test_checkpoint_and_export_load_the_same_model(model_dirs):
  config, workdir, export_dir, state = model_dirs
  net_a, vars_a, spec_a, _, _ = export.load_model(workdir, expand_res=2, head=True)
  net_b, vars_b, spec_b, _, _ = export.load_model(export_dir, expand_res=2, head=True)
  assert spec_a == spec_b and net_a.expand_res == 2 and spec_a.pred_hidden_dim == 0
  jax.tree_util.tree_map(np.testing.assert_array_equal, vars_a, vars_b)
  np.testing.assert_array_equal(
      vars_a["params"]["projector"]["fc1"]["kernel"], state.params["projector"]["fc1"]["kernel"]
  )
  with pytest.raises(FileNotFoundError, match="neither an encoder export"):
    export.load_model(os.path.join(workdir, "nothing_here"))


def test_save_boxes_and_masks(model_dirs, tmp_path):
  config, workdir, _, _ = model_dirs
  c = _cam_config(config, workdir)
  path = discover.save_boxes(c, str(tmp_path))
  table = localization.read_box_file(path)
  ids = [str(int(i)) for i in tiny_split(c.dataset.data_dir, "train")["id"][:16]]
  assert list(table) == ids
  for boxes in table.values():
    assert boxes.shape[1:] == (4,) and np.all((boxes >= 0) & (boxes <= 1))
    assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
  folder = discover.save_masks(c, str(tmp_path))
  files = sorted(os.listdir(folder))
  assert files == sorted(f"{i}.png" for i in ids)
  mask = np.asarray(Image.open(os.path.join(folder, files[0])))
  assert (
      mask.shape == (32, 32) and mask.dtype == np.uint8 and mask.max() == 255
  )  # min-max normalised


def _read_masks(folder):
  return {f[:-4]: np.asarray(Image.open(os.path.join(folder, f))) for f in os.listdir(folder)}


def test_crf_refines_the_maps_boxes_and_masks_are_made_from(model_dirs, tmp_path, monkeypatch):
  """contracam.crf: boxes from the CRF of each union map on its own image (the release's
  --apply_crf); the masks stay raw unless contracam.crf_masks."""
  config, workdir, _, _ = model_dirs
  c = _cam_config(config, workdir)
  c.contracam.mask_iterations = c.contracam.iterations  # boxes and masks from the same maps
  plain = discover.save_boxes_and_masks(c, str(tmp_path / "plain"))
  calls = []
  refine = crf.refine_crf

  def spy(image, prob, params, *args):
    calls.append((image, np.asarray(prob), refine(image, prob, params, *args)))
    return calls[-1][-1]

  monkeypatch.setattr(crf, "refine_crf", spy)
  c.contracam.crf = True
  boxes_only = discover.save_boxes_and_masks(c, str(tmp_path / "crf_boxes"))
  assert len(calls) == 16  # once per image: masks are not refined
  assert _read_masks(boxes_only["masks"]).keys() == _read_masks(plain["masks"]).keys()
  for k, m in _read_masks(boxes_only["masks"]).items():
    np.testing.assert_array_equal(m, _read_masks(plain["masks"])[k])
  train = tiny_split(c.dataset.data_dir, "train")
  images = {str(int(i)): image for i, image in zip(train["id"][:16], train["image"][:16])}
  table = localization.read_box_file(boxes_only["boxes"])
  assert open(boxes_only["boxes"]).read() != open(plain["boxes"]).read()
  raw = _read_masks(plain["masks"])
  for image_id, (image, prob, refined) in zip(table, calls):
    np.testing.assert_array_equal(image, images[image_id])  # the map's own image
    np.testing.assert_allclose(prob, raw[image_id] / 255.0, atol=0.5 / 255 + 1e-6)
    cc = c.contracam
    want = localization.cam_to_boxes(
        refined,
        clean_threshold=cc.clean_threshold,
        min_obj_scale=cc.box_min_obj_scale,
        threshold_frac=cc.box_threshold,
        min_area=cc.box_min_area,
        margin=cc.box_margin,
        largest_only=cc.largest_box_only,
    )
    np.testing.assert_allclose(table[image_id], np.round(want, 6), atol=1e-6)

  calls.clear()
  c.contracam.crf_masks = True
  both = discover.save_boxes_and_masks(c, str(tmp_path / "crf_both"))
  assert len(calls) == 16  # the same maps: refined once for both
  refined_masks = _read_masks(both["masks"])
  for image_id, (_, _, refined) in zip(table, calls):
    np.testing.assert_array_equal(
        refined_masks[image_id], np.round(np.clip(refined, 0, 1) * 255).astype(np.uint8)
    )
  assert any(np.any(refined_masks[k] != raw[k]) for k in raw)  # the CRF changed the masks
  assert open(both["boxes"]).read() == open(boxes_only["boxes"]).read()

  c.contracam.crf_iterations = 0
  with pytest.raises(ValueError, match="config.contracam.crf_iterations"):
    discover.save_masks(c, str(tmp_path / "bad"))


def test_evaluate_localization_with_crf(model_dirs, tmp_path):
  config, _, export_dir, _ = model_dirs
  c = _cam_config(config, export_dir)
  plain = discover.evaluate_localization(c, str(tmp_path / "plain"))
  c.contracam.crf = True
  refined = discover.evaluate_localization(c, str(tmp_path / "crf"))
  assert refined.keys() == plain.keys()
  assert any(refined[k] != plain[k] for k in plain)
  saved = json.load(open(tmp_path / "crf" / "localization_scenes_tiny_test.json"))
  assert saved["crf"] is True and saved["results"] == refined
  assert "dense CRF" in open(tmp_path / "crf" / "localization_scenes_tiny_test.md").read()


def test_evaluate_localization_writes_table_json_and_picture(model_dirs, tmp_path):
  config, _, export_dir, _ = model_dirs
  c = _cam_config(config, export_dir)
  results = discover.evaluate_localization(c, str(tmp_path))
  assert set(results) == {
      "ContraCAM (T=1)",
      "ContraCAM (T=2)",
      "Grad-CAM, signed weights (T=1)",
      "Centre Gaussian prior",
  }
  for r in results.values():
    assert 0 <= r["mask_miou"] <= 1 and 0 <= r["box_iou"] <= 1
  saved = json.load(open(tmp_path / "localization_scenes_tiny_test.json"))
  assert saved["num_images"] == 16 and saved["results"] == results
  assert "| ContraCAM (T=1) |" in open(tmp_path / "localization_scenes_tiny_test.md").read()
  picture = np.asarray(Image.open(tmp_path / "contracam_test.png"))
  assert picture.shape == (3 * 32 * 2, (2 + 2) * 32 * 2, 3)  # 3 images; image, 2 steps, union


def test_centre_prior_row_matches_direct_computation(model_dirs, tmp_path):
  """The table's baseline row equals the metric computed directly on the true masks."""
  config, _, export_dir, _ = model_dirs
  c = _cam_config(config, export_dir)
  results = discover.evaluate_localization(c, str(tmp_path))
  prior = localization.centre_gaussian_prior(32, 32)
  ious = []
  for mask in tiny_split(c.dataset.data_dir, "test")["mask"][:16]:
    clean = localization.clean_mask(prior, 0.5, c.contracam.eval_min_obj_scale).astype(np.float32)
    ious.append(float(localization.mask_iou(clean, mask.astype(np.float32))))
  np.testing.assert_allclose(
      results["Centre Gaussian prior"]["mask_miou"], np.mean(ious), rtol=1e-6
  )


def test_localization_batches_read_cub_masks_and_boxes(model_dirs):
  config, _, _, _ = model_dirs
  c = config.copy_and_resolve_references()
  c.dataset.name = "caltech_birds2011"
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    from ocl_jax.data import eval_data

    (batch,) = list(eval_data.localization_batches(c, "test", batch_size=8))
  assert batch["image"].shape == (5, 32, 32, 3) and batch["gt_mask"].shape == (5, 32, 32)
  assert set(np.unique(batch["gt_mask"])) <= {0.0, 1.0}
  assert batch["gt_box_valid"].sum(1).tolist() == [1] * 5  # CUB: one box per image


def test_picture_grid_layout_and_overlay():
  images = np.full((2, 8, 8, 3), 100, np.uint8)
  cams = np.zeros((3, 2, 8, 8), np.float32)
  grid = discover.picture_grid(images, cams, [np.zeros((0, 4))] * 2, scale=1)
  assert grid.shape == (16, 8 * 5, 3)
  np.testing.assert_array_equal(grid[:, :8], 100)  # first column: the image
  np.testing.assert_array_equal(discover.overlay(images[0], cams[0, 0], alpha=0.0), images[0])
  # The last column shows the union, or `final` (the CRF-refined union) when given.
  np.testing.assert_array_equal(grid[:8, 32:], discover.overlay(images[0], cams[:, 0].max(0)))
  final = np.ones((2, 8, 8), np.float32)
  with_final = discover.picture_grid(images, cams, [np.zeros((0, 4))] * 2, scale=1, final=final)
  np.testing.assert_array_equal(with_final[:8, 32:], discover.overlay(images[0], final[0]))
  np.testing.assert_array_equal(with_final[:, :32], grid[:, :32])
  assert np.any(with_final[:, 32:] != grid[:, 32:])
