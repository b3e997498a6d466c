"""Contact sheet of the `scenes` dataset: one row of examples per split.

A generated dataset is only trustworthy once a person has looked at it, so
this draws the first scenes of every split with their annotations: the union
mask as a white outline, each object's box in its class colour with its class
name, and the label and background family under each tile. Test-derived rows
show the same scene indices, so the shifted splits line up under `test`.

  python -m ocl_jax.tools.contact_sheet --data_dir=D --config=small \
      --out=docs/scenes_contact_sheet.png
"""

from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ocl_jax.data import scenes, scenes_render

_BOX_COLORS = [
    tuple(
        int(255 * c)
        for c in scenes_render.hsv_to_rgb(
            np.array(k / scenes_render.NUM_CLASSES), np.array(0.8), np.array(1.0)
        )
    )
    for k in range(scenes_render.NUM_CLASSES)
]


def mask_outline(mask: np.ndarray) -> np.ndarray:
  """Boolean (H, W) map of mask pixels that touch a non-mask pixel."""
  m = np.pad(mask.astype(bool), 1)
  inner = m[1:-1, 1:-1]
  neighbours_in = m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
  return inner & ~neighbours_in


def annotate(example: dict, scale: int = 2) -> Image.Image:
  """One example (a row of a split's arrays, see first_scenes), upscaled, with its mask
  outline and object boxes drawn."""
  image = np.asarray(example['image'])
  outline = mask_outline(np.asarray(example['mask']))
  image = np.where(outline[..., None], 255, image).astype(np.uint8)
  h, w = image.shape[:2]
  tile = Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST)
  draw = ImageDraw.Draw(tile)
  font = ImageFont.load_default()
  classes = np.asarray(example['classes'])
  for cls, box in zip(classes[classes >= 0], np.asarray(example['boxes'])[classes >= 0]):
    ymin, xmin, ymax, xmax = np.asarray(box) * [h, w, h, w] * scale
    color = _BOX_COLORS[int(cls)]
    draw.rectangle([xmin, ymin, xmax - 1, ymax - 1], outline=color)
    draw.text((xmin + 2, ymin + 1), scenes_render.CLASS_NAMES[int(cls)][:4], fill=color, font=font)
  return tile


def _caption(example: dict) -> str:
  """Label and background family of a tile."""
  bg = int(example['background'])
  family = scenes_render.FAMILY_NAMES[bg] if bg >= 0 else 'black'
  return f"{scenes_render.CLASS_NAMES[int(example['label'])]} / {family}"


def first_scenes(data_dir: str | None, config: str, split: str, count: int) -> list[dict]:
  """The first `count` scenes of a split, in scene order, as dicts of one row of its arrays
  (image, mask, label, background, id, classes, areas, boxes).

  A split's arrays are in scene order, so the test-derived splits show the same scenes in
  the same columns. The config is rendered into data_dir first if it is not there.
  """
  arrays = scenes.load_split(scenes.config_of(f'scenes/{config}'), data_dir, split)
  n = min(count, len(arrays['label']))
  return [{k: np.asarray(v[i]) for k, v in arrays.items()} for i in range(n)]


def contact_sheet(rows: Sequence[tuple[str, list[dict]]], scale: int = 2) -> Image.Image:
  """Grid image: one row per (split name, examples)."""
  font = ImageFont.load_default()
  first = rows[0][1][0]['image']
  tile_h, tile_w = first.shape[0] * scale, first.shape[1] * scale
  label_w, caption_h, gap = 110, 14, 4
  cols = max(len(examples) for _, examples in rows)
  sheet = Image.new(
      'RGB',
      (label_w + cols * (tile_w + gap), len(rows) * (tile_h + caption_h + gap)),
      (255, 255, 255),
  )
  draw = ImageDraw.Draw(sheet)
  for r, (name, examples) in enumerate(rows):
    y = r * (tile_h + caption_h + gap)
    draw.text((4, y + tile_h // 2 - 6), name, fill=(0, 0, 0), font=font)
    for c, example in enumerate(examples):
      x = label_w + c * (tile_w + gap)
      sheet.paste(annotate(example, scale), (x, y))
      draw.text((x + 2, y + tile_h + 1), _caption(example), fill=(0, 0, 0), font=font)
  return sheet


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
      '--data_dir', required=True, help='data dir; the config is rendered into it if absent'
  )
  parser.add_argument('--config', default='small', help='scenes config: default, small or tiny')
  parser.add_argument('--out', required=True, help='output PNG path')
  parser.add_argument('--per_split', type=int, default=6, help='examples per split')
  parser.add_argument('--scale', type=int, default=2, help='tile upscaling')
  args = parser.parse_args(argv)
  rows = [
      (split, first_scenes(args.data_dir, args.config, split, args.per_split))
      for split in scenes.SPLITS
  ]
  sheet = contact_sheet(rows, args.scale)
  sheet.save(args.out, optimize=True)
  print(f'wrote {args.out} ({sheet.size[0]}x{sheet.size[1]})')


if __name__ == '__main__':
  main()
