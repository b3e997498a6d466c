"""How sharp the on-device RandomResizedCrop views are for each host image size (not a test).

    python -m ocl_jax.tools.crop_resolution                    # Markdown table on stdout
    python -m ocl_jax.tools.crop_resolution --out=crop.json    # and every figure as JSON
    python -m ocl_jax.tools.crop_resolution --quick            # tiny sizes, a few seconds

Why: the host resizes every training image to a square of side S
(`preprocess.resize_to_square`, `config.dataset.train_image_size`) and the views are cut
from that square on device, while the release cuts them from the decoded full-resolution
image (torchvision's RandomResizedCrop on a PIL image). A scale-0.2 crop of a 640x480
image covers about 250^2 source pixels there but only 0.45 S per side here, so at S = 256
it is upsampled about 2x. For each S the tool takes the same crop boxes both ways and
scores the device view against the reference (PSNR, SSIM); the cost side is the bytes per
image sent to the device and the on-device augmentation time (and a ResNet-18 step with
it) relative to the first S, timed in turns in one run.

Sources, rendered here, deterministic, no download:
- `scenes`: the benchmark's renderer (`ocl_jax/data/scenes_render.py`) at the longer side,
  cut to the source shape: large smooth shapes and patterns.
- `dead_leaves`: occluding discs with radii ~ r^-3, the texture target of camera resolution
  tests: like photographs, edges at every scale and a 1/f spectrum, so it shows what a
  host resize takes from fine detail.
Shapes 480x640 and 640x480 (COCO's commonest) make the boxes depend on the aspect.

Reference: the box (relative coordinates of the original image, drawn by the project's
sampler from the true aspect) cut from the source with PIL's bilinear resize, which
antialiases when shrinking as torchvision's resized_crop on a PIL image does; PIL takes the
float box, so no integer rounding separates the two. Row `source` runs the device crop on the
full-resolution image itself: the two resamplers' own disagreement, the ceiling of the rest.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from scipy import ndimage

from ocl_jax import models
from ocl_jax.data import scenes_render
from ocl_jax.views import augment

HOST_SIZES = (256, 320, 384, 448)
SOURCE_SHAPES = ((480, 640), (640, 480))  # (height, width)
SOURCE_KINDS = ("scenes", "dead_leaves")
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


# ----------------------------------------------------------------------------
# Scores.


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
  """Peak signal-to-noise ratio in dB; inf for identical images."""
  mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
  return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
  """The 1-D Gaussian of SSIM's separable window, summing to 1."""
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2
  w = np.exp(-0.5 * (x / sigma) ** 2)
  return w / w.sum()


def ssim(
    a: np.ndarray,
    b: np.ndarray,
    data_range: float = 1.0,
    size: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> float:
  """Mean SSIM of Wang et al. (2004): Gaussian window (11, sigma 1.5), K1 0.01, K2 0.03.

  Weighted local means and (biased) variances, only where the window fits inside the
  image, as the reference MATLAB code; (H, W, C) images are scored per channel and averaged.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"ssim: the images differ in shape, {a.shape} vs {b.shape}")
  if a.ndim == 2:
    a, b = a[..., None], b[..., None]
  if min(a.shape[:2]) < size:
    raise ValueError(f"ssim: images of {a.shape[:2]} are smaller than the {size}-pixel window")
  w, r = gaussian_window(size, sigma), size // 2

  def local_mean(x):
    x = ndimage.correlate1d(x, w, axis=0, mode="nearest")
    return ndimage.correlate1d(x, w, axis=1, mode="nearest")[r:-r, r:-r]

  mu_a, mu_b = local_mean(a), local_mean(b)
  var_a = local_mean(a * a) - mu_a**2
  var_b = local_mean(b * b) - mu_b**2
  cov = local_mean(a * b) - mu_a * mu_b
  c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
  num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
  den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
  return float(np.mean(num / den))


# ----------------------------------------------------------------------------
# Sources.


def dead_leaves(
    rng: np.random.Generator, height: int, width: int, r_min: float = 2.0
) -> np.ndarray:
  """(H, W, 3) uint8 dead-leaves image: random-colour discs, radii ~ r^-3 in [r_min, side/4].

  Enough discs are painted (back to front) to cover the image about four times over, so
  about 2% of the grey ground shows.
  """
  r_max = max(min(height, width) / 4, r_min + 1)
  lo, hi = r_min**-2, r_max**-2
  mean_area = math.pi * 2 * math.log(r_max / r_min) / (lo - hi)
  n = int(4 * height * width / mean_area) + 1
  radii = (lo - rng.random(n) * (lo - hi)) ** -0.5
  cy, cx = rng.random(n) * height, rng.random(n) * width
  colors = rng.integers(0, 256, (n, 3), dtype=np.uint8)
  image = np.full((height, width, 3), 128, np.uint8)
  for r, y, x, c in zip(radii, cy, cx, colors):
    y0, y1 = max(int(y - r), 0), min(int(y + r) + 1, height)
    x0, x1 = max(int(x - r), 0), min(int(x + r) + 1, width)
    yy = (np.arange(y0, y1) + 0.5 - y)[:, None]
    xx = (np.arange(x0, x1) + 0.5 - x)[None, :]
    image[y0:y1, x0:x1][yy * yy + xx * xx <= r * r] = c
  return image


def scenes_images(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
  """(n, H, W, 3) uint8 `scenes` images rendered at max(H, W) and cut to the centre."""
  size = max(height, width)
  layout = scenes_render.sample_layout(rng, n, size, context_bias=0.8)
  index, obj_shade = scenes_render.render_objects(layout, size)
  families = rng.integers(0, scenes_render.NUM_FAMILIES, n)
  bg_shade, bg_colors = scenes_render.render_backgrounds(rng, families, size)
  image = scenes_render.paint(
      index, np.where(index >= 0, obj_shade, bg_shade), layout.colors, bg_colors
  )
  top, left = (size - height) // 2, (size - width) // 2
  return image[:, top : top + height, left : left + width]


def source_images(kind: str, n: int, height: int, width: int, seed: int) -> np.ndarray:
  """(n, H, W, 3) uint8 images of one kind, a function of (kind, shape, seed) only."""
  if kind not in SOURCE_KINDS:
    raise ValueError(f"unknown source kind {kind!r}; known: {SOURCE_KINDS}")
  rng = np.random.default_rng([seed, SOURCE_KINDS.index(kind), height, width])
  if kind == "scenes":
    return scenes_images(rng, n, height, width)
  return np.stack([dead_leaves(rng, height, width) for _ in range(n)])


# ----------------------------------------------------------------------------
# The two crops.


def host_square(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
  """The training pipeline's host side: preprocess.resize_to_square, run eagerly."""
  from ocl_jax.data import preprocess  # TensorFlow's resize, as COCO's tf.data reader runs it

  square, aspect = preprocess.resize_to_square(image, size)
  return np.asarray(square), float(aspect)


def plain_crop_config(crop_size: int, scale, ratio) -> augment.ViewConfig:
  """The view config with every step after the crop switched off (no flip, colour, blur)."""
  return augment.ViewConfig(
      crop_size=crop_size,
      scale=tuple(scale),
      ratio=tuple(ratio),
      flip_prob=0.0,
      jitter_prob=0.0,
      grayscale_prob=0.0,
      blur_prob=0.0,
  )


@functools.partial(jax.jit, static_argnames=("cfg", "count"))
def device_crops(key, image, aspect, cfg: augment.ViewConfig, count: int):
  """`count` views of one image through augment.augment_batch: (views, boxes)."""
  images = jnp.broadcast_to(image, (count,) + image.shape)
  views, boxes, _ = augment.augment_batch(key, images, jnp.full((count,), aspect), cfg)
  return views, boxes


def reference_crop(image: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
  """The box of the full-resolution image resized to (size, size) by PIL, bilinear with
  antialiasing (torchvision's RandomResizedCrop on a PIL image), as float in [0, 1]."""
  h, w = image.shape[:2]
  x1, y1, x2, y2 = (float(v) for v in box)
  out = Image.fromarray(image).resize(
      (size, size), Image.BILINEAR, box=(x1 * w, y1 * h, x2 * w, y2 * h)
  )
  return np.asarray(out, np.float32) / 255.0


def measure_quality(args: argparse.Namespace) -> list[dict[str, Any]]:
  """PSNR and SSIM of every (source image, crop, host size): one record per crop and size.

  Every host size (and `source`) crops with the same key, so with the aspect carried
  exactly the boxes are identical; they are checked to be.
  """
  cfg = plain_crop_config(args.crop_size, args.scale, args.ratio)
  records, image_index = [], 0
  for kind in args.kinds:
    for height, width in args.source_shapes:
      for image in source_images(kind, args.images_per_source, height, width, args.seed):
        key = jax.random.fold_in(jax.random.PRNGKey(args.seed), image_index)
        image_index += 1
        true_aspect = float(np.float32(width) / np.float32(height))
        boxes0 = refs = None
        for size in ["source", *args.host_sizes]:
          if size == "source":
            src, aspect = image, true_aspect
          else:
            src, aspect = host_square(image, size)
            if aspect != true_aspect:
              raise RuntimeError(
                  f"host resize to {size} carried aspect {aspect}, not {width}/{height}"
              )
          views, boxes = device_crops(key, src, aspect, cfg, args.crops_per_image)
          views, boxes = np.asarray(views), np.asarray(boxes)
          if boxes0 is None:
            boxes0 = boxes
            refs = [reference_crop(image, b, args.crop_size) for b in boxes]
          elif not np.array_equal(boxes, boxes0):
            raise RuntimeError(f"host size {size} drew other crop boxes than the source")
          side_h, side_w = src.shape[:2]
          for v, ref, box in zip(views, refs, boxes):
            crop_h, crop_w = (box[3] - box[1]) * side_h, (box[2] - box[0]) * side_w
            records.append(
                {
                    "host_size": size,
                    "kind": kind,
                    "shape": f"{height}x{width}",
                    "area": float((box[2] - box[0]) * (box[3] - box[1])),
                    # Enlarged along some axis: detail that the square no longer holds.
                    "upsampled": bool(min(crop_h, crop_w) < args.crop_size),
                    "psnr": psnr(v, ref),
                    "ssim": ssim(v, ref),
                }
            )
  return records


# ----------------------------------------------------------------------------
# Cost.


def median_times(fns: dict[Any, Any], repeats: int) -> dict[Any, float]:
  """Median wall time of each zero-argument function, timed in turns (a drifting machine
  then shifts all of them alike); each is run once first (compilation)."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def augmentation_fn(size: int, batch: int, cfg: augment.ViewConfig, seed: int = 0):
  """Both views of a (batch, size, size, 3) uint8 batch under `cfg`, jitted."""
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
  aspects = jnp.asarray(rng.uniform(0.75, 4 / 3, batch).astype(np.float32))

  @jax.jit
  def views(key, images, aspects):
    return [
        augment.augment_batch(jax.random.fold_in(key, v), images, aspects, cfg)[0] for v in (0, 1)
    ]

  key = jax.random.PRNGKey(seed)
  return lambda: views(key, images, aspects)


def model_step_fn(batch: int, crop_size: int, arch: str = "resnet18", width: int = 64):
  """Forward and backward of a ResNet on the 2 x batch views at crop_size (train-mode BN)."""
  stages, block = models.ARCHITECTURES[arch]
  net = models.ResNet(stages, block, width, False, axis_name=None)
  x = jnp.asarray(np.random.default_rng(0).random((2 * batch, crop_size, crop_size, 3), np.float32))
  variables = models.random_variables(net, x)

  def loss(params, x):
    out, _ = net.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        x,
        train=True,
        mutable=["batch_stats"],
    )
    return jnp.mean(out**2)

  grad = jax.jit(jax.grad(loss))
  return lambda: grad(variables["params"], x)


def measure_cost(args: argparse.Namespace) -> dict[str, float]:
  """Median seconds per image, for each host size S, of both views' crop alone ('crop S':
  the part that depends on S) and of their whole augmentation ('augment S': MoCo v2's
  colour and blur too), and of the model step on both views ('model'), timed in turns."""
  full = augment.ViewConfig(crop_size=args.crop_size, scale=args.scale, ratio=args.ratio)
  crop = plain_crop_config(args.crop_size, args.scale, args.ratio)
  fns = {}
  for s in args.host_sizes:
    fns[f"crop {s}"] = augmentation_fn(s, args.time_batch, crop)
    fns[f"augment {s}"] = augmentation_fn(s, args.time_batch, full)
  if args.model_batch:
    fns["model"] = model_step_fn(args.model_batch, args.crop_size)
  times = median_times(fns, args.time_repeats)
  return {k: t / (args.model_batch if k == "model" else args.time_batch) for k, t in times.items()}


# ----------------------------------------------------------------------------
# Report.


def _mean_sd(values) -> tuple[float, float]:
  values = list(values)
  return statistics.fmean(values), statistics.pstdev(values)


def _scores(records: list[dict]) -> dict[str, float]:
  p_mean, p_sd = _mean_sd(r["psnr"] for r in records)
  s_mean, s_sd = _mean_sd(r["ssim"] for r in records)
  return {
      "crops": len(records),
      "psnr_mean": p_mean,
      "psnr_sd": p_sd,
      "ssim_mean": s_mean,
      "ssim_sd": s_sd,
      "upsampled": statistics.fmean(r["upsampled"] for r in records),
  }


def summarise(
    records: list[dict], times: dict[str, float], host_sizes: Sequence[int]
) -> list[dict]:
  """One row per host size (first `source`): scores over all crops and per source kind,
  bytes per image, and times relative to the first host size's (the model step adds its
  time to the augmentation's: 'step_ratio')."""
  rows, base = [], host_sizes[0]
  for size in ["source", *host_sizes]:
    mine = [r for r in records if r["host_size"] == size]
    kinds = sorted({r["kind"] for r in mine})
    row = {"host_size": size, **_scores(mine)}
    row["by_kind"] = {k: _scores([r for r in mine if r["kind"] == k]) for k in kinds}
    if size != "source":
      row["bytes_per_image"] = size * size * 3
      if times:
        for part in ("crop", "augment"):
          row[f"{part}_s_per_image"] = times[f"{part} {size}"]
          row[f"{part}_ratio"] = times[f"{part} {size}"] / times[f"{part} {base}"]
        if "model" in times:
          model, aug = times["model"], times[f"augment {size}"]
          row["step_ratio"] = (aug + model) / (times[f"augment {base}"] + model)
    rows.append(row)
  return rows


def markdown_table(rows: list[dict], kinds: Sequence[str]) -> str:
  """The rows as a Markdown table (what BENCHMARKS.md shows): mean ± sd over crops per
  source kind (the kinds differ far more than crops of one kind)."""
  timed, step = "crop_ratio" in rows[-1], "step_ratio" in rows[-1]
  head = ["host size"]
  for k in kinds:
    head += [f"{k} PSNR dB", f"{k} SSIM"]
  head += ["crops upsampled", "bytes/image"]
  head += ["crop time", "augmentation time"] if timed else []
  head += ["step time (+ ResNet-18)"] if step else []
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    source = r["host_size"] == "source"
    cells = ["source (full res.)" if source else str(r["host_size"])]
    for k in kinds:
      s = r["by_kind"][k]
      cells += [
          f"{s['psnr_mean']:.1f} ± {s['psnr_sd']:.1f}",
          f"{s['ssim_mean']:.4f} ± {s['ssim_sd']:.4f}",
      ]
    cells += [f"{100 * r['upsampled']:.0f}%", "–" if source else f"{r['bytes_per_image']:,}"]
    if timed:
      cells += ["–", "–"] if source else [f"{r['crop_ratio']:.2f}×", f"{r['augment_ratio']:.2f}×"]
    if step:
      cells.append("–" if source else f"{r['step_ratio']:.3f}×")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _pair(text: str) -> tuple[float, float]:
  try:
    lo, hi = (float(v) for v in text.split(","))
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"expected two numbers 'a,b', got {text!r}") from e
  return lo, hi


def _shape(text: str) -> tuple[int, int]:
  try:
    h, w = (int(v) for v in text.lower().split("x"))
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, e.g. 480x640, got {text!r}") from e
  return h, w


def _ints(text: str) -> list[int]:
  try:
    return [int(v) for v in text.split(",")]
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"expected integers 'a,b,...', got {text!r}") from e


def _list(parse, text: str) -> list:
  return [parse(v) for v in text.split(",") if v]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--host_sizes", type=_ints, default=list(HOST_SIZES), help="e.g. 256,384")
  p.add_argument(
      "--source_shapes",
      type=lambda t: _list(_shape, t),
      default=list(SOURCE_SHAPES),
      help="HEIGHTxWIDTH of the sources, e.g. 480x640,640x480",
  )
  p.add_argument("--kinds", type=lambda t: _list(str, t), default=list(SOURCE_KINDS))
  p.add_argument("--images_per_source", type=int, default=4, help="images per kind and shape")
  p.add_argument("--crops_per_image", type=int, default=16)
  p.add_argument("--crop_size", type=int, default=224)
  p.add_argument("--scale", type=_pair, default=(0.2, 1.0), help="RandomResizedCrop area range")
  p.add_argument("--ratio", type=_pair, default=(3 / 4, 4 / 3), help="... and aspect range")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--time_batch", type=int, default=32, help="images per timed augmentation")
  p.add_argument("--time_repeats", type=int, default=7, help="timed turns (0: no timing)")
  p.add_argument("--model_batch", type=int, default=8, help="ResNet-18 step images (0: none)")
  p.add_argument("--out", default="", help="write rows, settings and machine as JSON here")
  p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
  if p.parse_known_args(argv)[0].quick:  # tiny defaults; explicit options still win
    p.set_defaults(host_sizes=[24, 32], source_shapes=[(40, 56), (56, 40)], crop_size=16)
    p.set_defaults(images_per_source=1, crops_per_image=3, time_batch=2, time_repeats=1)
    p.set_defaults(model_batch=0)
  args = p.parse_args(argv)
  for k in args.kinds:
    if k not in SOURCE_KINDS:
      p.error(f"--kinds: unknown kind {k!r}; choose from {','.join(SOURCE_KINDS)}")
  if not args.host_sizes or min(args.host_sizes) < 1:
    p.error(f"--host_sizes must be positive, got {args.host_sizes}")
  if not args.source_shapes or min(min(s) for s in args.source_shapes) < 1:
    p.error(f"--source_shapes must be positive, got {args.source_shapes}")
  if args.crop_size < SSIM_WINDOW:
    p.error(f"--crop_size must be >= {SSIM_WINDOW} (SSIM's window), got {args.crop_size}")
  if min(args.images_per_source, args.crops_per_image, args.time_batch) < 1:
    p.error("--images_per_source, --crops_per_image and --time_batch must be >= 1")
  if args.model_batch < 0 or args.time_repeats < 0:
    p.error("--model_batch and --time_repeats must be >= 0")
  return args


def machine() -> dict[str, str]:
  return {
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "device": str(jax.devices()[0].device_kind),
      "jax": jax.__version__,
  }


SETTINGS = (
    "host_sizes",
    "source_shapes",
    "kinds",
    "images_per_source",
    "crops_per_image",
    "crop_size",
    "scale",
    "ratio",
    "seed",
    "time_batch",
    "time_repeats",
    "model_batch",
)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  start = time.perf_counter()
  records = measure_quality(args)
  times = measure_cost(args) if args.time_repeats > 0 else {}
  rows = summarise(records, times, args.host_sizes)
  result = {
      "settings": {k: getattr(args, k) for k in SETTINGS},
      "machine": machine(),
      "rows": rows,
      "seconds_per_image": times,
      "seconds": time.perf_counter() - start,
  }
  m = result["machine"]
  print(
      f"{rows[0]['crops']} crops per row, scale {args.scale}, ratio ({args.ratio[0]:.3f}, "
      f"{args.ratio[1]:.3f}), {args.crop_size} px; {m['device']} ({m['processor']}), "
      f"jax {m['jax']}; {result['seconds']:.0f} s"
  )
  print(markdown_table(rows, args.kinds))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
