"""Pictures for people: heat-map overlays and the grid of augmented training views.

A researcher checks an augmentation by looking at it: OA-crop views must sit
on objects, BG-mixup views must keep the object and swap the background.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# Outline colours: OA-crop region, view 1's crop, view 2's crop, SGCL's local crops.
REGION, CROP1, CROP2, LOCAL = (255, 220, 0), (255, 60, 60), (60, 140, 255), (60, 220, 60)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """A jet-like heat map of `cam` blended over `image` (uint8 HWC)."""
  c = np.clip(cam, 0, 1)[..., None]
  heat = np.concatenate(
      [
          np.clip(1.5 - np.abs(4 * c - 3), 0, 1),
          np.clip(1.5 - np.abs(4 * c - 2), 0, 1),
          np.clip(1.5 - np.abs(4 * c - 1), 0, 1),
      ],
      axis=-1,
  )
  return np.round((1 - alpha) * image + alpha * 255 * heat).astype(np.uint8)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[0, 1] floats -> uint8, clipped."""
  return np.round(np.clip(np.asarray(images, np.float32), 0, 1) * 255).astype(np.uint8)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  return np.stack(
      [np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images]
  )


def views_grid(
    images: np.ndarray,
    view1: np.ndarray,
    view2: np.ndarray,
    crop_boxes: tuple[np.ndarray, np.ndarray],
    regions: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    scale: int = 2,
) -> np.ndarray:
  """One row per image: the source with its crops drawn, view 1, view 2 (and view 1's mask).

  images (N, H, W, 3) uint8; views (N, S, S, 3) uint8; crop_boxes two (N, 4)
  normalised x1 y1 x2 y2 arrays; regions (N, 4) the OA-crop region (yellow);
  masks (N, S, S) in [0, 1], shown as a heat map over view 1.
  """
  n, h, w, _ = images.shape
  side = view1.shape[1]
  cols = [_resize(images, side) if (h, w) != (side, side) else images, view1, view2]
  if masks is not None:
    cols.append(np.stack([overlay(view1[i], masks[i]) for i in range(n)]))
  grid = np.concatenate([np.concatenate(list(col), axis=0) for col in cols], axis=1)
  img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
  draw = ImageDraw.Draw(img)
  s = side * scale
  outlines = [(regions, REGION)] if regions is not None else []
  outlines += [(crop_boxes[0], CROP1), (crop_boxes[1], CROP2)]
  for boxes, colour in outlines:
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes)):
      draw.rectangle(
          [x1 * s, i * s + y1 * s, x2 * s - 1, i * s + y2 * s - 1], outline=colour, width=2
      )
  return np.asarray(img)


def saliency_grid(
    images: np.ndarray, maps: np.ndarray, crop_boxes: list[np.ndarray], scale: int = 2
) -> np.ndarray:
  """One row per image: the source and its saliency map (heat map over it), both with the
  crops drawn: global view 1 red, view 2 blue, local crops green.

  images (N, H, W, 3) uint8; maps (N, m, m) in [0, 1] (shown as the piecewise-constant
  grid the crops were sampled from); crop_boxes (N, 4) normalised x1 y1 x2 y2 per crop.
  """
  n, h, w, _ = images.shape
  heat = [
      np.asarray(Image.fromarray(np.asarray(m, np.float32)).resize((w, h), Image.NEAREST))
      for m in maps
  ]
  heat = np.stack(
      [overlay(images[i], heat[i] / max(float(heat[i].max()), 1e-12)) for i in range(n)]
  )
  grid = np.concatenate(
      [np.concatenate(list(images), axis=0), np.concatenate(list(heat), axis=0)], axis=1
  )
  img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
  draw = ImageDraw.Draw(img)
  sw, sh = w * scale, h * scale
  colours = [CROP1, CROP2] + [LOCAL] * max(len(crop_boxes) - 2, 0)
  for boxes, colour in zip(crop_boxes, colours):
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes)):
      for col in range(2):
        draw.rectangle(
            [col * sw + x1 * sw, i * sh + y1 * sh, col * sw + x2 * sw - 1, i * sh + y2 * sh - 1],
            outline=colour,
            width=2,
        )
  return np.asarray(img)


def interval_chart(
    summary: dict, metrics: list[str], panel: tuple[int, int] = (300, 230)
) -> Image.Image:
  """One panel per metric: each model's per-seed values (grey), mean (black) and 95% interval.

  `summary` is `ocl_jax.study`'s: {"models": {model: {metric: {"per_seed", "mean", "ci95"}}}}.
  Accuracies are drawn in %, localisation as IoU, as in the tables.
  """
  models = list(summary["models"])
  cols = min(4, len(metrics))
  rows = -(-len(metrics) // cols)
  w, h = panel
  img = Image.new("RGB", (cols * w, rows * h), "white")
  draw = ImageDraw.Draw(img)
  left, right, top, bottom = 46, 10, 22, 34
  for i, metric in enumerate(metrics):
    ox, oy = (i % cols) * w, (i // cols) * h
    scale = 1.0 if metric.startswith("loc/") else 100.0
    entries = [summary["models"][m][metric] for m in models]
    values = [scale * v for e in entries for v in e["per_seed"]]
    values += [scale * v for e in entries if e["ci95"] for v in e["ci95"]]
    lo, hi = min(values), max(values)
    pad = 0.08 * (hi - lo) or 0.5
    lo, hi = lo - pad, hi + pad

    def y_of(v, lo=lo, hi=hi, oy=oy):
      return oy + top + (hi - v) / (hi - lo) * (h - top - bottom)

    draw.text((ox + left, oy + 4), metric, fill="black")
    draw.rectangle([ox + left, oy + top, ox + w - right, oy + h - bottom], outline=(160, 160, 160))
    for frac in (0.0, 0.5, 1.0):
      v = hi - frac * (hi - lo)
      y = y_of(v)
      draw.text((ox + 2, y - 6), f"{v:.3f}" if scale == 1.0 else f"{v:.1f}", fill=(90, 90, 90))
      draw.line([ox + left - 3, y, ox + left, y], fill=(160, 160, 160))
    step = (w - left - right) / len(models)
    for j, (model, e) in enumerate(zip(models, entries)):
      x = ox + left + step * (j + 0.5)
      for k, v in enumerate(e["per_seed"]):
        dx = (k - (len(e["per_seed"]) - 1) / 2) * 4
        y = y_of(scale * v)
        draw.ellipse([x - 12 + dx - 2, y - 2, x - 12 + dx + 2, y + 2], fill=(150, 150, 150))
      if e["ci95"]:
        y0, y1 = y_of(scale * e["ci95"][0]), y_of(scale * e["ci95"][1])
        draw.line([x + 6, y0, x + 6, y1], fill="black", width=2)
        draw.line([x + 2, y0, x + 10, y0], fill="black", width=2)
        draw.line([x + 2, y1, x + 10, y1], fill="black", width=2)
      y = y_of(scale * e["mean"])
      draw.ellipse([x + 3, y - 3, x + 9, y + 3], fill="black")
      draw.text((x - step / 2 + 4, oy + h - bottom + 6), model[:10], fill="black")
  return img
