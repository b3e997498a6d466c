"""From saliency maps to masks and boxes, box files and metrics (docs/method.md#boxes-and-masks).

Host-side NumPy/SciPy code: it runs once per dataset on ContraCAM outputs, so
clarity beats speed. Boxes are normalised (x1, y1, x2, y2) in [0, 1] with the
pixel-edge convention: a component covering pixel columns c0..c1 of a W-wide
map spans x in [c0 / W, (c1 + 1) / W].
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

# 4- and 8-connectivity structuring elements for scipy.ndimage.label.
_STRUCTURE = {
    4: ndimage.generate_binary_structure(2, 1),
    8: ndimage.generate_binary_structure(2, 2),
}


def _check_map(cam: np.ndarray, name: str = "cam") -> np.ndarray:
  cam = np.asarray(cam)
  if cam.ndim != 2:
    raise ValueError(f"{name} must be a single (H, W) map, got shape {cam.shape}")
  return cam


def _structure(connectivity: int) -> np.ndarray:
  if connectivity not in _STRUCTURE:
    raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
  return _STRUCTURE[connectivity]


# ----------------------------------------------------------------------------
# Masks.


def clean_mask(
    cam: np.ndarray,
    threshold: float = 0.5,
    min_obj_scale: float = 0.001,
    largest_only: bool = False,
) -> np.ndarray:
  """Binary (H, W) mask of the 4-connected components of `cam > threshold`.

  Keeps components with more than `min_obj_scale` of the image's pixels
  (0.001 for evaluation, 0.01 before boxes), or only the largest one.
  Removes speckles that would otherwise become boxes or hurt mask IoU.
  """
  cam = _check_map(cam)
  labels, n = ndimage.label(cam > threshold, structure=_structure(4))
  if n == 0:
    return np.zeros(cam.shape, bool)
  sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
  if largest_only:
    keep = np.zeros(n, bool)
    keep[np.argmax(sizes)] = True
  else:
    keep = sizes > min_obj_scale * cam.size
  return np.concatenate([[False], keep])[labels]


# ----------------------------------------------------------------------------
# Boxes.


def boxes_from_map(
    cam: np.ndarray,
    threshold_frac: float = 0.5,
    min_area: float = 0.01,
    margin: float = 0.2,
    largest_only: bool = False,
    connectivity: int = 8,
) -> np.ndarray:
  """(N, 4) normalised boxes: one per connected component of cam > frac * max(cam).

  Components whose bounding box covers more than `min_area` of the image are
  kept (the release filters on the bounding rectangle's area); each box grows
  by margin * (w, h) per side and is clipped to the image. Sorted by area,
  largest first; `largest_only` keeps the first. The default 8-connectivity
  matches the outer contours the release traces with OpenCV.
  """
  cam = _check_map(cam).astype(np.float64)
  h, w = cam.shape
  labels, n = ndimage.label(cam > threshold_frac * cam.max(), structure=_structure(connectivity))
  boxes, areas = [], []
  for sl in ndimage.find_objects(labels):
    if sl is None:
      continue
    y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
    bw, bh = x1 - x0, y1 - y0
    if bw * bh <= min_area * h * w:
      continue
    boxes.append(
        (
            max(0.0, x0 - margin * bw) / w,
            max(0.0, y0 - margin * bh) / h,
            min(w, x1 + margin * bw) / w,
            min(h, y1 + margin * bh) / h,
        )
    )
    areas.append(bw * bh)
  if not boxes:
    return np.zeros((0, 4))
  boxes = np.asarray(boxes)[np.argsort(-np.asarray(areas), kind="stable")]
  return boxes[:1] if largest_only else boxes


def cam_to_boxes(
    cam: np.ndarray, clean_threshold: float = 0.5, min_obj_scale: float = 0.01, **box_kwargs
) -> np.ndarray:
  """The release's box pipeline for one map: `clean_mask` then `boxes_from_map`."""
  mask = clean_mask(cam, clean_threshold, min_obj_scale)
  return boxes_from_map(mask.astype(np.float64), **box_kwargs)


# ----------------------------------------------------------------------------
# Box files: `IMAGE_ID x1,y1,x2,y2 x1,y1,x2,y2 ...`, six decimals.


class BoxFileError(ValueError):
  """A malformed box-file line; `path` and 1-based `line_number` locate it."""

  def __init__(self, path: str, line_number: int, message: str):
    super().__init__(f"{path}:{line_number}: {message}")
    self.path = path
    self.line_number = line_number
    self.message = message


class BoxTable(dict):
  """dict image id -> (N, 4) float64 boxes; `errors` lists the lines skipped."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.errors: list[BoxFileError] = []


def _parse_box(token: str) -> tuple[np.ndarray | None, str]:
  parts = token.split(",")
  if len(parts) != 4:
    return None, f"box {token!r} has {len(parts)} coordinates, expected 4 (x1,y1,x2,y2)"
  try:
    box = np.array([float(p) for p in parts])
  except ValueError:
    return None, f"box {token!r} has a non-numeric coordinate"
  if not np.all(np.isfinite(box)):
    return None, f"box {token!r} has a non-finite coordinate"
  if np.any(box < 0) or np.any(box > 1):
    return None, f"box {token!r} has coordinates outside [0, 1]"
  if box[2] < box[0] or box[3] < box[1]:
    return None, f"box {token!r} has x2 < x1 or y2 < y1"
  if box[2] == box[0] or box[3] == box[1]:  # no crop fits in it: a broken writer, not a box
    return None, f"box {token!r} has zero area (x2 == x1 or y2 == y1)"
  return box, ""


def read_box_file(path: str | os.PathLike, tolerate_errors: bool = False) -> BoxTable:
  """Parse a box file; raise BoxFileError at the first malformed line.

  With `tolerate_errors`, bad lines (bad coordinates count, non-numeric or
  out-of-range values, x2 < x1, zero area, duplicate ids) are skipped and recorded in
  the result's `errors`. Blank lines are ignored; an id alone means no boxes.
  """
  path = os.fspath(path)
  table = BoxTable()
  first_seen: dict[str, int] = {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      tokens = line.split()
      if not tokens:
        continue
      image_id, message = tokens[0], ""
      boxes = []
      if image_id in first_seen:
        message = f"duplicate image id {image_id!r} (first on line {first_seen[image_id]})"
      else:
        for token in tokens[1:]:
          box, message = _parse_box(token)
          if box is None:
            break
          boxes.append(box)
      if message:
        error = BoxFileError(path, number, message)
        if not tolerate_errors:
          raise error
        table.errors.append(error)
        continue
      first_seen[image_id] = number
      table[image_id] = np.stack(boxes) if boxes else np.zeros((0, 4))
  return table


def format_box_line(image_id: str, boxes: np.ndarray) -> str:
  """One line of the release's format, without the newline; validated."""
  if not image_id or any(c.isspace() for c in image_id):
    raise ValueError(f"image id must be non-empty without whitespace, got {image_id!r}")
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4) if np.size(boxes) else np.zeros((0, 4))
  tokens = [image_id]
  for box in boxes:
    token = ",".join(f"{v:.6f}" for v in box)
    if _parse_box(token)[0] is None:
      raise ValueError(f"image {image_id!r}: {_parse_box(token)[1]}")
    tokens.append(token)
  return " ".join(tokens)


def write_box_file(path: str | os.PathLike, boxes: Mapping[str, np.ndarray]) -> None:
  """Write {image id: (N, 4) boxes} atomically (temp file in the same folder, then rename)."""
  path = os.fspath(path)
  text = "".join(format_box_line(image_id, b) + "\n" for image_id, b in boxes.items())
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


# ----------------------------------------------------------------------------
# Metrics and baselines.


def mask_iou(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> np.ndarray:
  """IoU per map of (..., H, W) arrays, both binarised at > threshold; 1 where both are empty."""
  pred, gt = np.asarray(pred) > threshold, np.asarray(gt) > threshold
  if pred.shape != gt.shape:
    raise ValueError(f"pred and gt shapes differ: {pred.shape} vs {gt.shape}")
  inter = np.logical_and(pred, gt).sum(axis=(-2, -1))
  union = np.logical_or(pred, gt).sum(axis=(-2, -1))
  return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def mask_miou(preds: np.ndarray, gts: np.ndarray, threshold: float = 0.5) -> float:
  """Mean of `mask_iou` over a (B, H, W) batch."""
  return float(np.mean(mask_iou(preds, gts, threshold)))


def pairwise_box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(N, M) IoU of xyxy boxes (areas (x2 - x1)(y2 - y1), as torchvision)."""
  a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  union = area(a)[:, None] + area(b)[None, :] - inter
  return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def image_box_iou(pred_boxes: np.ndarray, gt_boxes: np.ndarray) -> float | None:
  """Mean over GT boxes of the best predicted box's IoU; 0 if none predicted, None if no GT."""
  gt = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
  if len(gt) == 0:
    return None
  pred = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
  if len(pred) == 0:
    return 0.0
  return float(pairwise_box_iou(gt, pred).max(axis=1).mean())


def box_iou(
    pred_boxes: Sequence[np.ndarray] | Mapping[str, np.ndarray],
    gt_boxes: Sequence[np.ndarray] | Mapping[str, np.ndarray],
) -> float:
  """Box mIoU over images: mean of `image_box_iou`, images without GT skipped.

  Sequences are matched by position; mappings (as `read_box_file` gives) by
  image id over the GT's ids, an id missing from the predictions counting as
  no boxes. NaN when no image has a GT box.
  """
  if isinstance(gt_boxes, Mapping):
    if not isinstance(pred_boxes, Mapping):
      raise TypeError("gt_boxes is a mapping, so pred_boxes must be one too")
    pairs = [(pred_boxes.get(k, np.zeros((0, 4))), g) for k, g in gt_boxes.items()]
  else:
    if len(pred_boxes) != len(gt_boxes):
      raise ValueError(f"{len(pred_boxes)} predictions for {len(gt_boxes)} images")
    pairs = list(zip(pred_boxes, gt_boxes))
  ious = [iou for iou in (image_box_iou(p, g) for p, g in pairs) if iou is not None]
  return float(np.mean(ious)) if ious else math.nan


def centre_gaussian_prior(h: int, w: int, sigma_frac: float = 0.25) -> np.ndarray:
  """(h, w) centred Gaussian, peak 1, std sigma_frac of the side per axis: centre-bias baseline."""
  if sigma_frac <= 0:
    raise ValueError(f"sigma_frac must be > 0, got {sigma_frac!r}")
  y = (np.arange(h) + 0.5) / h - 0.5
  x = (np.arange(w) + 0.5) / w - 0.5
  return np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma_frac**2))
