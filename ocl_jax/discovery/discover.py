"""ContraCAM over a dataset: box files, mask PNGs, localisation evaluation and pictures.

The modes of `ocl_jax.main` that turn a trained model into object boxes and
masks (docs/method.md#contracam, #boxes-and-masks), which the object-aware augmentations consume,
and the evaluation that says how well they match the true objects.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterator

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from ocl_jax import console, export, metric_writers, paths
from ocl_jax.data import eval_data
from ocl_jax.data import prechecks
from ocl_jax.data import sources
from ocl_jax.discovery import contracam
from ocl_jax.discovery import crf
from ocl_jax.discovery import localization
from ocl_jax.views import augment
from ocl_jax.pictures import overlay

# config.contracam's CamSettings (keyword overrides), validating the section.
cam_settings = contracam.CamSettings.from_config


def _to_input(images_uint8: np.ndarray) -> jax.Array:
  return augment.normalize(jnp.asarray(images_uint8, jnp.float32) / 255.0)


def _count(config: ml_collections.ConfigDict, split: str) -> int | None:
  d = config.dataset
  builder = sources.get_builder(d.name, d.data_dir)
  n = sources.num_examples(builder, split)
  limit = config.contracam.max_images
  if n is None:
    return None
  return n if limit < 0 else min(n, limit)


def _cam_batches(config, split, settings_list, source) -> Iterator[tuple[dict, list[dict]]]:
  """(host batch, [ContraCAM outputs per settings]) over `split`, with a progress bar.

  Equal settings in the list are computed once. Batch k+1 is dispatched before batch
  k's maps are fetched, so the devices compute while the caller writes files.
  """
  c = config.contracam
  unique = list(dict.fromkeys(settings_list))
  nets = {}
  for s in unique:
    if s.expand_res not in nets:
      nets[s.expand_res] = export.load_model(source, s.expand_res, head=True)
  n = _count(config, split)
  total = None if n is None else math.ceil(n / c.batch_size)
  batches = eval_data.localization_batches(config, split, c.batch_size, c.max_images)
  previous, pending = None, None

  def fetch(batch, outs):  # equal settings share one output (callers check identity)
    host = {s: jax.device_get(out) for s, out in outs.items()}
    return batch, [host[s] for s in settings_list]

  for batch in console.progress(batches, total=total, desc=f"ContraCAM {split}", unit="batch"):
    x = _to_input(batch["image"])
    n = x.shape[0]
    if n < 2:  # the contrastive score needs a negative: borrow one image of the last batch
      x = jnp.concatenate([x, previous[:1] if previous is not None else x])
    previous = x
    outs = {}
    for s in unique:
      net, variables = nets[s.expand_res][:2]
      out = contracam.contracam_on_local_devices(net, variables, x, s)
      outs[s] = {k: v[:, :n] if k in ("cams", "scores") else v[:n] for k, v in out.items()}
    if pending is not None:
      yield fetch(*pending)
    pending = batch, outs
  if pending is not None:
    yield fetch(*pending)


def _boxes(cam: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
  c = config.contracam
  return localization.cam_to_boxes(
      cam,
      clean_threshold=c.clean_threshold,
      min_obj_scale=c.box_min_obj_scale,
      threshold_frac=c.box_threshold,
      min_area=c.box_min_area,
      margin=c.box_margin,
      largest_only=c.largest_box_only,
  )


def crf_maps(images: np.ndarray, maps: np.ndarray, params: crf.CrfParams) -> np.ndarray:
  """(B, H, W) maps refined one by one by the dense CRF on their uint8 images, as the
  release's --apply_crf does before cleaning (docs/method.md#boxes-and-masks)."""
  return np.stack(
      [crf.refine_crf(img, np.clip(m, 0.0, 1.0), params) for img, m in zip(images, maps)]
  )


def save_boxes(config: ml_collections.ConfigDict, workdir: str) -> str:
  """ContraCAM (T = contracam.iterations) boxes of each image of contracam.split, release format."""
  return save_boxes_and_masks(config, workdir, masks=False)["boxes"]


def save_masks(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Soft ContraCAM masks (T = contracam.mask_iterations) as 8-bit PNGs named by image id."""
  return save_boxes_and_masks(config, workdir, boxes=False)["masks"]


def save_boxes_and_masks(
    config: ml_collections.ConfigDict, workdir: str, boxes: bool = True, masks: bool = True
) -> dict[str, str]:
  """Boxes (WORKDIR/boxes_<split>.txt) and/or masks (WORKDIR/masks_<split>/<id>.png) in one pass.

  With contracam.iterations == contracam.mask_iterations both come from the
  same maps, computed once. contracam.crf refines the boxes' maps with the dense CRF
  first, contracam.crf_masks the masks'. Every file is written atomically.
  """
  c = config.contracam
  source = c.checkpoint or workdir
  params = crf.CrfParams.from_config(config)
  refine_boxes, refine_masks = boxes and c.crf, masks and c.crf_masks
  settings = []
  if boxes:
    settings.append(cam_settings(config))
  if masks:
    settings.append(cam_settings(config, iterations=c.mask_iterations))
  folder = os.path.join(workdir, f"masks_{c.split}")
  # Before ContraCAM runs over the split (minutes to hours), not when its results are written.
  if boxes:
    prechecks.check_writable(workdir, f"The box file's folder (boxes_{c.split}.txt)")
  if masks:
    prechecks.check_writable(folder, "The mask folder")
  table, count = {}, 0
  for batch, outs in _cam_batches(config, c.split, settings, source):
    box_maps, mask_maps = outs[0]["mask"], outs[-1]["mask"]
    if refine_boxes:
      box_maps = crf_maps(batch["image"], box_maps, params)
    if refine_masks:
      same = refine_boxes and outs[0] is outs[-1]
      mask_maps = box_maps if same else crf_maps(batch["image"], mask_maps, params)
    if boxes:
      for image_id, cam in zip(batch["id"], box_maps):
        table[image_id] = _boxes(cam, config)
    if masks:
      for image_id, cam in zip(batch["id"], mask_maps):
        tmp = os.path.join(folder, f".{image_id}.png.tmp")
        Image.fromarray(np.round(np.clip(cam, 0, 1) * 255).astype(np.uint8)).save(tmp, format="PNG")
        os.replace(tmp, os.path.join(folder, f"{image_id}.png"))
        count += 1
  written = {}
  if boxes:
    written["boxes"] = os.path.join(workdir, f"boxes_{c.split}.txt")
    localization.write_box_file(written["boxes"], table)
    with_box = sum(len(b) > 0 for b in table.values())
    console.say(
        f"Wrote the boxes of {len(table)} images ({with_box} with at least one box) to "
        f"{written['boxes']}"
    )
  if masks:
    written["masks"] = folder
    console.say(f"Wrote {count} masks to {folder}")
  return written


def _mask_for_eval(cam: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
  return localization.clean_mask(
      cam, threshold=0.5, min_obj_scale=config.contracam.eval_min_obj_scale
  ).astype(np.float32)


def evaluate_localization(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, dict[str, float]]:
  """Mask mIoU and box IoU of ContraCAM vs a centred Gaussian prior and plain Grad-CAM.

  Rows: ContraCAM at T=1 and at T=contracam.iterations; one-step Grad-CAM with the
  contrastive score but signed channel weights (no positive clamp); the centre prior.
  With contracam.crf every row's maps are refined by the dense CRF before cleaning,
  as the release's `--mode seg --apply_crf`.
  """
  c = config.contracam
  source = c.checkpoint or workdir
  params = crf.CrfParams.from_config(config)
  rows = {
      "ContraCAM (T=1)": cam_settings(config, iterations=1),
      f"ContraCAM (T={c.iterations})": cam_settings(config),
      "Grad-CAM, signed weights (T=1)": cam_settings(config, iterations=1, clamp_weights=False),
  }
  names = list(rows)
  mask_ious = {k: [] for k in names + ["Centre Gaussian prior"]}
  box_preds = {k: [] for k in mask_ious}
  gt_boxes, picture = [], None
  has_mask = has_boxes = False
  for batch, outs in _cam_batches(config, c.eval_split, list(rows.values()), source):
    size = batch["image"].shape[1]
    prior = localization.centre_gaussian_prior(size, size)
    maps = {name: out["mask"] for name, out in zip(names, outs)}
    maps["Centre Gaussian prior"] = np.broadcast_to(prior, (len(batch["id"]), size, size))
    if c.crf:
      maps = {name: crf_maps(batch["image"], m, params) for name, m in maps.items()}
    has_mask = "gt_mask" in batch
    has_boxes = "gt_boxes" in batch
    for name, cams in maps.items():
      for i, cam in enumerate(cams):
        if has_mask:
          mask_ious[name].append(
              float(localization.mask_iou(_mask_for_eval(cam, config), batch["gt_mask"][i]))
          )
        box_preds[name].append(_boxes(np.asarray(cam), config))
    if has_boxes:
      gt_boxes += [b[v] for b, v in zip(batch["gt_boxes"], batch["gt_box_valid"])]
    if picture is None:
      picture = (batch, outs[1], maps[names[1]])
  results = {}
  for name in mask_ious:
    r = {}
    if has_mask:
      r["mask_miou"] = float(np.mean(mask_ious[name]))
    if has_boxes:
      r["box_iou"] = float(localization.box_iou(box_preds[name], gt_boxes))
    results[name] = r
  per_image = {name: v for name, v in mask_ious.items() if v}
  _write_results(config, workdir, results, len(box_preds[names[0]]), per_image)
  if picture is not None:
    write_picture(config, workdir, *picture)
  return results


def localization_tag(config: ml_collections.ConfigDict) -> str:
  """<dataset>_<split> of the localisation results' file names."""
  return f"{config.dataset.name.replace('/', '_')}_{config.contracam.eval_split}"


def _write_results(config, workdir, results, num_images, per_image):
  os.makedirs(workdir, exist_ok=True)
  tag = localization_tag(config)
  with open(os.path.join(workdir, f"localization_{tag}.json"), "w") as f:
    json.dump(
        {
            "dataset": config.dataset.name,
            "split": config.contracam.eval_split,
            "num_images": num_images,
            "expand_res": config.contracam.expand_res,
            "crf": config.contracam.crf,
            "results": results,
            "per_image_mask_iou": per_image,
        },
        f,
    )
  cols = sorted({k for r in results.values() for k in r})
  lines = [
      f"Localisation on {config.dataset.name} `{config.contracam.eval_split}` "
      f"({num_images} images, expand_res={config.contracam.expand_res}"
      + (", dense CRF)" if config.contracam.crf else ")"),
      "",
      "| method | " + " | ".join(cols) + " |",
      "|---|" + "---|" * len(cols),
  ]
  for name, r in results.items():
    lines.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in cols) + " |")
  table = "\n".join(lines)
  with open(os.path.join(workdir, f"localization_{tag}.md"), "w") as f:
    f.write(table + "\n")
  logging.info("Localisation results (%s):\n%s", workdir, table)


def picture_grid(
    images: np.ndarray,
    cams: np.ndarray,
    boxes: list[np.ndarray],
    scale: int = 2,
    final: np.ndarray | None = None,
) -> np.ndarray:
  """Rows: images; columns: the image, each refinement step's map, the union with its boxes.

  `final` (B, H, W) replaces the union in the last column (the CRF-refined union).
  """
  n, h, w, _ = images.shape
  t_steps = cams.shape[0]
  union = np.max(cams, axis=0) if final is None else np.asarray(final)
  cols = [images] + [
      np.stack([overlay(images[i], cams[t, i]) for i in range(n)]) for t in range(t_steps)
  ]
  cols.append(np.stack([overlay(images[i], union[i]) for i in range(n)]))
  grid = np.concatenate([np.concatenate(list(col), axis=0) for col in cols], axis=1)
  img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
  draw = ImageDraw.Draw(img)
  x0 = (t_steps + 1) * w * scale
  for i, bs in enumerate(boxes):
    for x1, y1, x2, y2 in bs:
      draw.rectangle(
          [
              x0 + x1 * w * scale,
              i * h * scale + y1 * h * scale,
              x0 + x2 * w * scale - 1,
              i * h * scale + y2 * h * scale - 1,
          ],
          outline=(255, 255, 255),
          width=2,
      )
  return np.asarray(img)


def write_picture(config, workdir, batch, out, final=None) -> str:
  """PNG (and TensorBoard image) of ContraCAM per refinement step for the first images;
  boxes from `final` (the maps the boxes are built from; default the union)."""
  k = min(config.contracam.num_pictures, len(batch["id"]))
  final = out["mask"] if final is None else final
  boxes = [_boxes(cam, config) for cam in final[:k]]
  grid = picture_grid(batch["image"][:k], np.asarray(out["cams"])[:, :k], boxes, final=final[:k])
  path = os.path.join(workdir, f"contracam_{config.contracam.eval_split}.png")
  Image.fromarray(grid).save(path)
  writer = metric_writers.create_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_images(0, {"contracam": grid[None]})
  writer.close()
  logging.info("Wrote %s", path)
  return path


# The modes of ocl_jax.main (its MODE_RUNNERS point here): relative and `~` paths resolved.


def run_save_boxes(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--config.mode=save_boxes: WORKDIR/boxes_<split>.txt."""
  return save_boxes(paths.resolve_config(config), paths.resolve(workdir))


def run_save_masks(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--config.mode=save_masks: WORKDIR/masks_<split>/."""
  return save_masks(paths.resolve_config(config), paths.resolve(workdir))


def run_eval_localization(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, dict[str, float]]:
  """--config.mode=eval_localization: the results table, also shown on the console."""
  workdir, config = paths.resolve(workdir), paths.resolve_config(config)
  results = evaluate_localization(config, workdir)
  with open(os.path.join(workdir, f"localization_{localization_tag(config)}.md")) as f:
    console.say(f.read().rstrip())
  return results
