"""Config validation: every bad value is reported, naming its field, before anything compiles.

`validate_config` runs once, at the entry point (ocl_jax.main; the pipeline for its stage
configs). Settings objects validate their own section in from_config; it gathers them.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import ml_collections

from ocl_jax import methods
from ocl_jax.discovery import contracam
from ocl_jax.discovery import crf
from ocl_jax.models import ModelSpec

MODES = ("train", "save_boxes", "save_masks", "eval_localization", "eval", "pipeline", "study")


class ConfigError(ValueError):
  """A configuration value is out of range or inconsistent."""


def _check(ok: bool, field: str, message: str, errors: list[str]) -> None:
  if not ok:
    errors.append(f"config.{field}: {message}")


def _gather(build: Callable[[], Any], errors: list[str], prefix: str = "") -> None:
  """Run a settings object's from_config, appending each line of its ValueError to `errors`."""
  try:
    build()
  except ValueError as err:
    errors.extend(prefix + line for line in str(err).splitlines())


def validate_config(
    config: ml_collections.ConfigDict,
    num_devices: int | None = None,
    num_processes: int | None = None,
) -> None:
  """Raise ConfigError listing every invalid field of `config`, once, at the entry point.

  Sections with a settings object (model: ModelSpec, contracam: CamSettings and CrfParams,
  augment: ViewConfig) are checked by its from_config; the rest and the cross-section rules here.
  """
  from ocl_jax.views import augment  # local: they import jax.numpy only, kept light
  from ocl_jax.views import image_mixing

  n_dev = jax.device_count() if num_devices is None else num_devices
  n_proc = jax.process_count() if num_processes is None else num_processes
  e: list[str] = []
  _check(config.mode in MODES, "mode", f"{config.mode!r} is not one of {MODES}", e)
  known = methods.names()
  _check(config.method in known, "method", f"{config.method!r} is not one of {known}", e)
  b = config.batch_size
  _check(isinstance(b, int) and b > 0, "batch_size", f"must be a positive integer, got {b!r}", e)
  if isinstance(b, int) and b > 0:
    _check(b % n_dev == 0, "batch_size", f"{b} is not divisible by the {n_dev} devices", e)
    _check(b % n_proc == 0, "batch_size", f"{b} is not divisible by the {n_proc} processes", e)
  for field in ("host_prefetch", "prefetch_to_device"):
    v = config.get(field, 0)
    _check(isinstance(v, int) and v >= 0, field, f"must be an integer >= 0, got {v!r}", e)
  _gather(lambda: ModelSpec.from_config(config), e)
  method = methods.get(config.method) if config.method in known else None
  for field, message in method.check_config(config) if method else ():
    _check(False, field, message, e)
  o = config.optim
  _check(o.name in ("sgd", "lars"), "optim.name", f"{o.name!r} is not 'sgd' or 'lars'", e)
  _check(o.base_lr > 0, "optim.base_lr", f"must be > 0, got {o.base_lr}", e)
  _check(o.final_lr >= 0, "optim.final_lr", f"must be >= 0, got {o.final_lr}", e)
  _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}", e)
  _check(0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}", e)
  _check(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}", e)
  _check(
      config.num_train_steps > 0 or config.num_epochs > 0,
      "num_epochs",
      "set num_epochs > 0 or num_train_steps > 0",
      e,
  )
  for f in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    _check(config[f] > 0, f, f"must be > 0, got {config[f]}", e)
  _check(
      config.nonfinite in ("stop", "skip"),
      "nonfinite",
      f"{config.nonfinite!r} is not 'stop' or 'skip'",
      e,
  )
  _check(
      config.get("max_param_norm_growth", 0.0) == 0 or config.max_param_norm_growth > 1,
      "max_param_norm_growth",
      f"must be 0 (off) or > 1, got {config.get('max_param_norm_growth')}",
      e,
  )
  _check(config.eval_every_steps >= 0, "eval_every_steps", "must be >= 0", e)
  _check(config.dataset.image_size > 0, "dataset.image_size", "must be > 0", e)
  _check(
      config.dataset.get("train_image_size", 0) >= 0,
      "dataset.train_image_size",
      f"must be >= 0 (0 = dataset.image_size), got {config.dataset.get('train_image_size')}",
      e,
  )
  _validate_dataset_name(config, e)
  bg = config.bg_mixup
  if bg.enabled:
    _check(0.0 <= bg.prob <= 1.0, "bg_mixup.prob", f"must be in [0, 1], got {bg.prob}", e)
    _check(
        0.0 < bg.threshold <= 1.0, "bg_mixup.threshold", f"must be in (0, 1], got {bg.threshold}", e
    )
    _check(bg.fifo_size >= 1, "bg_mixup.fifo_size", f"must be >= 1, got {bg.fifo_size}", e)
    _check(
        bg.masks == "gt" or os.path.isdir(bg.masks),
        "bg_mixup.masks",
        f"{bg.masks!r} is neither 'gt' nor an existing folder of mask PNGs "
        "(write one with --config.mode=save_masks)",
        e,
    )
  mix = config.mix
  _check(
      mix.kind in image_mixing.KINDS,
      "mix.kind",
      f"{mix.kind!r} is not one of {image_mixing.KINDS}",
      e,
  )
  if mix.kind != "none":
    mixers = tuple(n for n in known if methods.get(n).supports_mix)
    _check(
        method is None or method.supports_mix,
        "mix.kind",
        f"{mix.kind} is a MoCo baseline (methods with a two-target loss: {mixers}); "
        f"method is {config.method!r}",
        e,
    )
    _check(mix.alpha > 0, "mix.alpha", f"must be > 0, got {mix.alpha}", e)
  _gather(lambda: contracam.CamSettings.from_config(config), e)
  _gather(lambda: crf.CrfParams.from_config(config), e)
  _validate_object_aware(config, e)
  sal = config.get("saliency")
  if sal is not None and sal.enabled:
    from ocl_jax.views import saliency

    saliency.validate(sal, e)
    _check(
        not config.object_aware.crop,
        "saliency.enabled",
        "saliency-guided crops and OA-crop (object_aware.crop) cannot be combined",
        e,
    )
  _validate_evaluation(config, e)
  _gather(lambda: augment.ViewConfig.from_config(config.augment), e, "config.augment: ")
  if e:
    raise ConfigError("Invalid configuration:\n  " + "\n  ".join(e))


def _validate_evaluation(config: ml_collections.ConfigDict, e: list[str]) -> None:
  ev = config.get("evaluation")
  if ev is None:
    return
  from ocl_jax.evaluation import evaluate

  bad = [p for p in ev.protocols if p not in evaluate.PROTOCOLS]
  _check(not bad, "evaluation.protocols", f"{bad} not in {evaluate.PROTOCOLS}", e)
  _check(len(ev.datasets) > 0 or config.mode != "eval", "evaluation.datasets", "is empty", e)
  _check(ev.image_size > 0, "evaluation.image_size", f"must be > 0, got {ev.image_size}", e)
  _check(
      0 < ev.crop_fraction <= 1,
      "evaluation.crop_fraction",
      f"must be in (0, 1], got {ev.crop_fraction}",
      e,
  )
  _check(ev.batch_size > 0, "evaluation.batch_size", f"must be > 0, got {ev.batch_size}", e)
  _check(ev.num_l2_values >= 1, "evaluation.num_l2_values", "must be >= 1", e)
  _check(ev.lbfgs_max_iters >= 1, "evaluation.lbfgs_max_iters", "must be >= 1", e)
  _check(ev.knn_k >= 1, "evaluation.knn_k", f"must be >= 1, got {ev.knn_k}", e)
  _check(ev.knn_temperature > 0, "evaluation.knn_temperature", "must be > 0", e)


def _validate_dataset_name(config: ml_collections.ConfigDict, e: list[str]) -> None:
  """dataset.name: a TFDS name or folder:<existing folder> (not needed by --config.mode=eval);
  and no evaluation folder may still hold its 'REQUIRED: ...' placeholder (configs/in9*.py)."""
  d = config.dataset
  if config.mode != "eval":
    name = d.name
    if isinstance(name, str) and name.startswith("folder:"):
      root = os.path.expanduser(name[len("folder:") :])
      _check(
          bool(root) and os.path.isdir(root),
          "dataset.name",
          f"{name!r}: {root!r} is not an existing folder of <class>/<image> folders",
          e,
      )
      _check(
          d.train_split == "train",
          "dataset.train_split",
          f"must be 'train' for a folder dataset (it trains on the whole folder), got "
          f"{d.train_split!r}",
          e,
      )
    else:
      _check(
          isinstance(name, str) and bool(name) and not any(c.isspace() for c in name),
          "dataset.name",
          f"{name!r} is neither a TFDS name nor folder:<path>",
          e,
      )
  ev = config.get("evaluation")
  folders = ev.get("folders") if ev is not None else None
  for key, value in (folders.items() if folders is not None else ()):
    _check(
        not (isinstance(value, str) and value.startswith("REQUIRED:")),
        f"evaluation.folders.{key}",
        f"must be set on the command line: {value}",
        e,
    )


def _validate_object_aware(config: ml_collections.ConfigDict, e: list[str]) -> None:
  """OA-crop fields; the box file is checked for existence only (it is parsed at data setup)."""
  import os

  oa = config.get("object_aware")
  if oa is None:
    return
  _check(
      isinstance(oa.crop, bool), "object_aware.crop", f"must be True or False, got {oa.crop!r}", e
  )
  k = oa.max_boxes
  _check(
      isinstance(k, int) and not isinstance(k, bool) and k >= 1,
      "object_aware.max_boxes",
      f"must be an integer >= 1, got {k!r}",
      e,
  )
  _check(
      0.0 <= oa.gt_min_area < 1.0,
      "object_aware.gt_min_area",
      f"must be in [0, 1), got {oa.gt_min_area}",
      e,
  )
  _check(oa.gt_margin >= 0, "object_aware.gt_margin", f"must be >= 0, got {oa.gt_margin}", e)
  _check(
      isinstance(oa.tolerate_box_errors, bool),
      "object_aware.tolerate_box_errors",
      f"must be True or False, got {oa.tolerate_box_errors!r}",
      e,
  )
  ok = isinstance(oa.boxes, str) and oa.boxes != ""
  _check(ok, "object_aware.boxes", f"must be 'gt' or the path of a box file, got {oa.boxes!r}", e)
  if ok and oa.crop and oa.boxes != "gt":
    _check(
        os.path.isfile(oa.boxes),
        "object_aware.boxes",
        f"box file {oa.boxes!r} does not exist (write one with --config.mode=save_boxes)",
        e,
    )


def load_sibling_config(this_file: str, name: str, *args) -> ml_collections.ConfigDict:
  """`get_config()` of config file `name` next to `this_file`: derived configs work from any cwd."""
  import importlib.util
  import os

  path = os.path.join(os.path.dirname(os.path.abspath(this_file)), name)
  spec = importlib.util.spec_from_file_location(f"ocl_jax_config_{name.removesuffix('.py')}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def save_config_json(config: ml_collections.ConfigDict, path: str) -> str:
  """Write `config` as JSON to `path` (atomically): the run's full hyperparameters."""
  import json

  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".tmp", "w") as f:
    f.write(json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True) + "\n")
  os.replace(path + ".tmp", path)
  return path
