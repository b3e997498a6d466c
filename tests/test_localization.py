"""Post-processing, box files and metrics of docs/method.md#boxes-and-masks on hand-made cases."""

import os

import numpy as np
import pytest

from ocl_jax.discovery import localization as loc

# ----------------------------------------------------------------------------
# clean_mask


def test_clean_mask_removes_small_components_with_4_connectivity():
  cam = np.zeros((20, 20))
  cam[2:7, 2:7] = 0.9  # 25 px = 6.25%: kept
  cam[15, 15:17] = 0.8  # 2 px: removed
  # Two 3-px pieces touching only diagonally: separate 4-components (3 px each
  # <= 4 px = 1%), one 6-px component under 8-connectivity.
  cam[10, 10:13] = 0.7
  cam[11, 13:16] = 0.7
  cam[18, 0:10] = 0.5  # exactly the threshold: not foreground
  mask = loc.clean_mask(cam, threshold=0.5, min_obj_scale=0.01)
  expected = np.zeros((20, 20), bool)
  expected[2:7, 2:7] = True
  np.testing.assert_array_equal(mask, expected)
  # Lower size bound: the 3-px pieces survive, the 2-px one does not.
  mask = loc.clean_mask(cam, threshold=0.5, min_obj_scale=2.5 / 400)
  assert mask[10, 10:13].all() and mask[11, 13:16].all() and not mask[15, 15:17].any()


def test_clean_mask_largest_only_and_empty():
  cam = np.zeros((10, 10))
  cam[0:2, 0:2] = 1.0
  cam[5:9, 5:9] = 0.6
  mask = loc.clean_mask(cam, largest_only=True)
  assert mask.sum() == 16 and mask[5:9, 5:9].all()
  assert not loc.clean_mask(np.zeros((10, 10))).any()
  with pytest.raises(ValueError, match="single"):
    loc.clean_mask(np.zeros((2, 10, 10)))


# ----------------------------------------------------------------------------
# boxes_from_map


def _two_blob_map():
  cam = np.full((100, 100), 0.3)  # below 0.5 * max: background
  cam[10:30, 20:60] = 1.0  # 20 x 40 px
  cam[60:80, 70:80] = 0.8  # 20 x 10 px
  cam[90:93, 5:8] = 0.9  # 9 px < 1% of the image: dropped
  return cam


def test_two_blobs_give_two_boxes_with_margins():
  boxes = loc.boxes_from_map(_two_blob_map(), threshold_frac=0.5, min_area=0.01, margin=0.2)
  # Largest first; each side grows by 0.2 of the box's width / height.
  expected = [
      [(20 - 8) / 100, (10 - 4) / 100, (60 + 8) / 100, (30 + 4) / 100],
      [(70 - 2) / 100, (60 - 4) / 100, (80 + 2) / 100, (80 + 4) / 100],
  ]
  np.testing.assert_allclose(boxes, expected, atol=1e-12)
  np.testing.assert_allclose(
      loc.boxes_from_map(_two_blob_map(), margin=0.0),
      [[0.2, 0.1, 0.6, 0.3], [0.7, 0.6, 0.8, 0.8]],
      atol=1e-12,
  )
  np.testing.assert_allclose(
      loc.boxes_from_map(_two_blob_map(), largest_only=True), expected[:1], atol=1e-12
  )
  # The threshold is relative to the map's maximum.
  np.testing.assert_allclose(loc.boxes_from_map(10 * _two_blob_map()), expected, atol=1e-12)


def test_threshold_is_strict_and_relative():
  cam = _two_blob_map()
  cam[60:80, 70:80] = 0.5  # exactly 0.5 * max: not above the threshold
  assert len(loc.boxes_from_map(cam)) == 1
  assert len(loc.boxes_from_map(cam, threshold_frac=0.4)) == 2


def test_boxes_are_clipped_and_non_square_maps_normalised_per_axis():
  cam = np.zeros((50, 200))
  cam[0:10, 180:200] = 1.0  # touches the top and right borders
  (box,) = loc.boxes_from_map(cam, margin=0.2)
  np.testing.assert_allclose(box, [(180 - 4) / 200, 0.0, 1.0, (10 + 2) / 50], atol=1e-12)


def test_min_area_uses_the_bounding_box_and_empty_maps_give_no_boxes():
  cam = np.zeros((100, 100))
  idx = np.arange(50)
  cam[idx, idx] = 1.0  # 50 px (0.5%), 8-connected, bounding box 25% of the image
  np.testing.assert_allclose(loc.boxes_from_map(cam, margin=0.0), [[0.0, 0.0, 0.5, 0.5]])
  assert len(loc.boxes_from_map(cam, connectivity=4)) == 0  # 50 single pixels
  assert loc.boxes_from_map(np.zeros((8, 8))).shape == (0, 4)
  assert loc.boxes_from_map(np.zeros((8, 8)), largest_only=True).shape == (0, 4)


def test_cam_to_boxes_cleans_first():
  cam = _two_blob_map() * 0.5 + 0.3  # blobs at 0.8 / 0.7 / 0.75, background 0.45
  cam[40, 0:4] = 2.0  # bright 4-px speck: it would set the box threshold above the blobs
  assert len(loc.boxes_from_map(cam)) == 0
  boxes = loc.cam_to_boxes(cam, clean_threshold=0.5, min_obj_scale=0.01, margin=0.0)
  np.testing.assert_allclose(boxes, [[0.2, 0.1, 0.6, 0.3], [0.7, 0.6, 0.8, 0.8]], atol=1e-12)


# ----------------------------------------------------------------------------
# Box files


def test_box_file_format_and_round_trip(tmp_path):
  path = tmp_path / "boxes.txt"
  loc.write_box_file(
      path, {"a": np.array([[0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]]), "b": np.zeros((0, 4))}
  )
  assert (
      path.read_text()
      == "a 0.100000,0.200000,0.300000,0.400000 0.000000,0.000000,1.000000,1.000000\nb\n"
  )

  rng = np.random.default_rng(0)
  boxes = {}
  for i in range(20):
    lo = rng.uniform(0, 0.5, size=(i % 4, 2))
    hi = lo + rng.uniform(0, 0.5, size=(i % 4, 2))
    boxes[f"img_{i:03d}.jpg"] = np.concatenate([lo, hi], axis=1)
  loc.write_box_file(path, boxes)
  table = loc.read_box_file(path)
  assert list(table) == list(boxes) and table.errors == []
  for k, b in boxes.items():
    assert table[k].shape == (len(b), 4)
    np.testing.assert_array_equal(
        table[k], np.vectorize(lambda v: float(f"{v:.6f}"), otypes=[float])(b).reshape(-1, 4)
    )
    assert np.abs(table[k] - b).max(initial=0) <= 5e-7
  text = path.read_text()
  loc.write_box_file(path, table)  # re-writing what was read is byte-identical
  assert path.read_text() == text
  assert os.listdir(tmp_path) == ["boxes.txt"]  # no temp files left behind


def test_write_rejects_bad_boxes_and_keeps_the_old_file(tmp_path):
  path = tmp_path / "boxes.txt"
  loc.write_box_file(path, {"a": [[0.1, 0.1, 0.2, 0.2]]})
  before = path.read_text()
  for bad in (
      {"b": [[0.3, 0.1, 0.2, 0.2]]},
      {"b": [[0.1, 0.1, 0.2, 1.5]]},
      {"b c": [[0.1, 0.1, 0.2, 0.2]]},
  ):
    with pytest.raises(ValueError):
      loc.write_box_file(path, bad)
    assert path.read_text() == before
  assert os.listdir(tmp_path) == ["boxes.txt"]


GOOD_LINES = ["img1 0.100000,0.200000,0.300000,0.400000", "", "img2"]


@pytest.mark.parametrize(
    "bad,message",
    [
        ("img3 0.1,0.2,0.3", "3 coordinates"),
        ("img3 0.1,0.2,0.3,0.4,0.5", "5 coordinates"),
        ("img3 0.1,0.2,abc,0.4", "non-numeric"),
        ("img3 nan,0.2,0.3,0.4", "non-finite"),
        ("img3 0.5,0.2,0.3,0.4", "x2 < x1"),
        ("img3 0.1,0.5,0.3,0.4", "y2 < y1"),
        ("img3 0.5,0.5,0.5,0.5", "zero area"),
        ("img3 0.1,0.2,0.3,0.2", "zero area"),
        ("img3 0.1,0.2,1.3,0.4", "outside"),
        ("img3 -0.1,0.2,0.3,0.4", "outside"),
        ("img1 0.1,0.2,0.3,0.4", "duplicate image id 'img1' \\(first on line 1\\)"),
    ],
)
def test_malformed_lines_name_the_file_and_line(tmp_path, bad, message):
  path = tmp_path / "boxes.txt"
  path.write_text("\n".join(GOOD_LINES + [bad, "img4 0.0,0.0,1.0,1.0"]) + "\n")
  with pytest.raises(loc.BoxFileError, match=message) as info:
    loc.read_box_file(path)
  assert info.value.line_number == 4  # the blank line counts
  assert str(info.value).startswith(f"{path}:4: ")
  table = loc.read_box_file(path, tolerate_errors=True)
  assert sorted(table) == ["img1", "img2", "img4"]
  assert [e.line_number for e in table.errors] == [4]
  assert table["img2"].shape == (0, 4)
  np.testing.assert_array_equal(table["img4"], [[0, 0, 1, 1]])


# ----------------------------------------------------------------------------
# Metrics


def test_mask_iou_hand_computed():
  pred = np.zeros((4, 4))
  gt = np.zeros((4, 4))
  pred[0, 0:4] = 0.9  # 4 px
  gt[0:2, 2:4] = 1.0  # 4 px, 2 shared
  gt[3, 0:2] = 0.7  # +2 px
  gt[3, 3] = 0.5  # exactly 0.5: background
  np.testing.assert_allclose(loc.mask_iou(pred, gt), 2 / 8)
  empty = np.zeros((4, 4))
  assert loc.mask_iou(empty, empty) == 1.0 and loc.mask_iou(pred, empty) == 0.0
  batch_pred, batch_gt = np.stack([pred, empty, pred]), np.stack([gt, empty, empty])
  np.testing.assert_allclose(loc.mask_iou(batch_pred, batch_gt), [0.25, 1.0, 0.0])
  np.testing.assert_allclose(loc.mask_miou(batch_pred, batch_gt), 1.25 / 3)
  with pytest.raises(ValueError, match="shapes"):
    loc.mask_iou(pred, np.zeros((4, 5)))


def test_box_iou_hand_computed():
  np.testing.assert_allclose(
      loc.pairwise_box_iou([[0, 0, 1, 1], [0, 0, 0.5, 1]], [[0, 0, 0.5, 1], [0.5, 0, 1, 1]]),
      [[0.5, 0.5], [1.0, 0.0]],
  )
  gt = np.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]])
  pred = np.array([[0, 0, 0.5, 0.25], [0.25, 0.25, 0.75, 0.75]])
  # GT 1: best is pred 1 (0.125 / 0.25); GT 2: only pred 2 overlaps, 0.0625 / 0.4375.
  first = (0.5 + 1 / 7) / 2
  assert loc.image_box_iou(pred, gt) == pytest.approx(first)
  assert loc.image_box_iou(np.zeros((0, 4)), gt) == 0.0
  assert loc.image_box_iou(pred, np.zeros((0, 4))) is None
  preds = [pred, np.zeros((0, 4)), pred]
  gts = [gt, gt[:1], np.zeros((0, 4))]  # the third image has no GT: skipped
  assert loc.box_iou(preds, gts) == pytest.approx((first + 0.0) / 2)
  by_id = loc.box_iou({"x": pred, "z": pred}, {"x": gt, "y": gt[:1], "z": np.zeros((0, 4))})
  assert by_id == pytest.approx((first + 0.0) / 2)  # 'y' missing from the predictions: 0
  assert np.isnan(loc.box_iou([pred], [np.zeros((0, 4))]))
  with pytest.raises(ValueError, match="predictions"):
    loc.box_iou([pred], gts)


def test_centre_gaussian_prior():
  prior = loc.centre_gaussian_prior(10, 10, sigma_frac=0.25)
  assert prior.shape == (10, 10)
  # Pixel (0, 0) has centre (-0.45, -0.45) in side units: exp(-2 * 0.45^2 / (2 * 0.25^2)).
  assert prior[0, 0] == pytest.approx(np.exp(-3.24))
  np.testing.assert_allclose(prior, prior[::-1, ::-1])
  assert prior[4:6, 4:6].min() == prior.max()
  rect = loc.centre_gaussian_prior(4, 8, sigma_frac=0.5)
  # Per-axis fractions: (row 0, column 0) is at (-0.375, -0.4375).
  assert rect[0, 0] == pytest.approx(np.exp(-(0.375**2 + 0.4375**2) / 0.5))
  odd = loc.centre_gaussian_prior(5, 5, 0.1)
  assert odd[2, 2] == 1.0 and odd.argmax() == 12
