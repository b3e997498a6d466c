"""The two global views (and SGCL's local crops) of a batch, composed from named parts.

Every random choice draws from a named key stream folded from the step key and,
inside the ops, from the image's global index, so a view never depends on how
the batch is split over devices. View 0 then passes through the view transforms
the config enables (BG-mixup, Mixup / CutMix), each a registered function with
its own key stream: a new augmentation is one more `register_transform`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import ml_collections

from ocl_jax import parallel
from ocl_jax.views import augment, background_mixup, image_mixing, saliency

# ---------------------------------------------------------------------------
# Key streams
# ---------------------------------------------------------------------------

# Fixed numbers, so that adding a stream never changes the others' draws.
BUILTIN_STREAMS = {
    "crop_view0": 0,
    "crop_view1": 1,  # crop, flip, colour of each global view
    "oa_region": 2,  # OA-crop: the box each image is cropped inside
    "bg_mixup": 3,
    "mix": 4,  # view-0 transforms
    "centre_view0": 5,
    "centre_view1": 6,  # SGCL: saliency-guided crop centres
    "local_crop": 7,
    "local_centre": 8,  # SGCL's local crops (then folded with their number)
}
KEY_STREAMS = dict(BUILTIN_STREAMS)  # and those of transforms registered later


def stream(step_key: jax.Array, name: str, index: int | None = None) -> jax.Array:
  """The key of stream `name` (and its `index`-th member) at this step."""
  key = jax.random.fold_in(step_key, KEY_STREAMS[name])
  return key if index is None else jax.random.fold_in(key, index)


# ---------------------------------------------------------------------------
# View transforms (applied to view 0 after its crop and colour)
# ---------------------------------------------------------------------------


class TransformInput(NamedTuple):
  """What a view transform may read besides the images."""

  batch: dict[str, jax.Array]
  boxes: jax.Array  # view 0's crop boxes (B, 4)
  flips: jax.Array  # view 0's flips (B,)
  index_offset: jax.Array  # global index of this device's first image
  view: augment.ViewConfig


# (key, images, params, input, carried) -> (images, updates to carried)
Transform = Callable[
    [jax.Array, jax.Array, Any, TransformInput, dict[str, Any]], tuple[jax.Array, dict[str, Any]]
]
# config -> the transform's params, or None when the config leaves it off
ParamsFromConfig = Callable[[ml_collections.ConfigDict], Any]


class ViewTransform(NamedTuple):
  apply: Transform
  params_from_config: ParamsFromConfig


TRANSFORMS: dict[str, ViewTransform] = {}  # applied in registration order


def register_transform(
    name: str, params_from_config: ParamsFromConfig, stream: int | None = None
) -> Callable[[Transform], Transform]:
  """Registers a view-0 transform; it draws from key stream `name` (numbered `stream` when
  it is not one of KEY_STREAMS yet)."""
  if name not in KEY_STREAMS:
    if stream is None or stream in KEY_STREAMS.values():
      raise ValueError(
          f"view transform {name!r} needs a key stream number not in use "
          f"({sorted(KEY_STREAMS.values())})"
      )
    KEY_STREAMS[name] = stream

  def decorate(fn: Transform) -> Transform:
    TRANSFORMS[name] = ViewTransform(fn, params_from_config)
    return fn

  return decorate


def unregister_transform(name: str) -> None:
  """Removes a transform registered with its own stream (tests, notebooks)."""
  del TRANSFORMS[name]
  if name not in BUILTIN_STREAMS:
    del KEY_STREAMS[name]


@register_transform(
    "bg_mixup",
    lambda c: (float(c.bg_mixup.prob), float(c.bg_mixup.threshold)) if c.bg_mixup.enabled else None,
)
def bg_mixup_transform(key, images, params, inp, carried):
  """docs/method.md#bg-mixup: the foreground over another image's background."""
  prob, threshold = params
  masks = augment.transform_masks(inp.batch["fg_mask"], inp.boxes, inp.flips, inp.view.crop_size)
  images, fifo, stats = background_mixup.background_mixup(
      key,
      images,
      masks,
      inp.index_offset,
      carried["bg_fifo"],
      prob,
      threshold,
      axis_name=parallel.AXIS,
  )
  return images, {"bg_fifo": fifo, "bg_stats": stats, "fg_masks": masks}


@register_transform(
    "mix", lambda c: (c.mix.kind, float(c.mix.alpha)) if c.mix.kind != "none" else None
)
def mix_transform(key, images, params, inp, carried):
  """The Mixup / CutMix baseline: view 0 mixed with a permuted global batch."""
  kind, alpha = params
  images, lam, perm = image_mixing.mix_images(
      kind, key, images, inp.index_offset, alpha, axis_name=parallel.AXIS
  )
  return images, {"mix": (lam, perm)}


# ---------------------------------------------------------------------------
# The plan and the composition
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ViewPlan:
  """The static recipe of a step's views."""

  view: augment.ViewConfig
  transforms: tuple[tuple[str, Any], ...] = ()  # (registered name, params), applied in order
  saliency: saliency.SaliencySettings | None = None  # SGCL: guided crops and local crops

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_examples: int = 0) -> "ViewPlan":
    """`num_examples` (the train split) sizes SGCL's saliency bank."""
    transforms = []
    for name, transform in TRANSFORMS.items():
      params = transform.params_from_config(config)
      if params is not None:
        transforms.append((name, params))
    sal = config.get("saliency")
    return cls(
        view=augment.ViewConfig.from_config(config.augment),
        transforms=tuple(transforms),
        saliency=saliency.SaliencySettings.from_config(sal, num_examples)
        if sal is not None and sal.enabled
        else None,
    )


class AugmentedViews(NamedTuple):
  """The normalised views of a batch and what produced them (for the loss and pictures)."""

  x1: jax.Array
  x2: jax.Array
  bg_fifo: Any  # the new BG-mixup FIFO (None when off)
  bg_stats: dict[str, jax.Array]  # BG-mixup counts
  mix: tuple[jax.Array, jax.Array] | None  # Mixup / CutMix (lambda, perm)
  regions: jax.Array | None  # OA-crop region of each image (B, 4)
  crop_boxes: tuple[
      jax.Array, ...
  ]  # each view's crop box (B, 4), x1 y1 x2 y2; then the local crops'
  fg_masks: jax.Array | None  # BG-mixup masks aligned with view 1
  local_views: tuple[jax.Array, ...] = ()  # SGCL's M local crops, normalised


def augment_views(
    step_key: jax.Array,
    batch: dict[str, jax.Array],
    plan: ViewPlan,
    bg_fifo: Any = None,
    saliency_maps: jax.Array | None = None,
) -> AugmentedViews:
  """Two normalised views of every image (inside pmap), plus what the transforms carried.

  With OA-crop the batch carries `boxes` / `box_valid`: one box per image is
  chosen per step and both views crop inside it. BG-mixup reads `fg_mask`,
  cropped and flipped like view 0. With SGCL `saliency_maps` re-centre the
  crops, and the local crops follow the two global views.
  """
  offset = parallel.global_offset(batch["image"].shape[0])
  regions = None
  if "boxes" in batch:
    regions = augment.choose_regions(
        stream(step_key, "oa_region"), batch["boxes"], batch["box_valid"], index_offset=offset
    )
  sal = plan.saliency
  guide = dict(saliency=saliency_maps, temperature=sal.crop_temperature) if sal else {}
  carried = {"bg_fifo": bg_fifo, "bg_stats": {}, "mix": None, "fg_masks": None}
  views, crop_boxes = [], []
  for v in range(2):
    if sal:
      guide["centre_key"] = stream(step_key, f"centre_view{v}")
    images, boxes, flips = augment.augment_batch(
        stream(step_key, f"crop_view{v}"),
        batch["image"],
        batch["aspect"],
        plan.view,
        index_offset=offset,
        regions=regions,
        **guide,
    )
    if v == 0:
      inp = TransformInput(batch, boxes, flips, offset, plan.view)
      for name, params in plan.transforms:
        images, updates = TRANSFORMS[name].apply(
            stream(step_key, name), images, params, inp, carried
        )
        carried.update(updates)
    views.append(augment.normalize(images))
    crop_boxes.append(boxes)
  local_views = []
  for j in range(sal.num_local_crops if sal else 0):
    guide["centre_key"] = stream(step_key, "local_centre", j)
    images, boxes, _ = augment.augment_batch(
        stream(step_key, "local_crop", j),
        batch["image"],
        batch["aspect"],
        sal.local_view(plan.view),
        index_offset=offset,
        **guide,
    )
    local_views.append(augment.normalize(images))
    crop_boxes.append(boxes)
  return AugmentedViews(
      views[0],
      views[1],
      carried["bg_fifo"],
      carried["bg_stats"],
      carried["mix"],
      regions,
      tuple(crop_boxes),
      carried["fg_masks"],
      tuple(local_views),
  )
