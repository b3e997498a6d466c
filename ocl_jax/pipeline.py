"""The three-stage debiasing pipeline in one work dir, resumable stage by stage.

`--config.mode=pipeline` runs `config.pipeline.stages` in order:

  vanilla    pretrain with the config as given (no OA-crop / BG-mixup)   WORKDIR/vanilla
  contracam  ContraCAM boxes (T = contracam.iterations) and soft masks
             (T = contracam.mask_iterations) of the vanilla model on
             contracam.split                                              WORKDIR/contracam
  oacrop     pretrain again from scratch with OA-crop on those boxes      WORKDIR/oacrop
  bgmix      pretrain again from scratch with BG-mixup on those masks     WORKDIR/bgmix
  sgcl       pretrain again from scratch with saliency-guided crops and
             pair weights from the model's own online saliency
             (config.saliency; needs no earlier stage)                     WORKDIR/sgcl
  eval       every trained model: the frozen-feature evaluations of
             config.evaluation and ContraCAM localisation on
             contracam.eval_split; the table WORKDIR/results.{md,json}

Each retraining has the vanilla run's steps (equal compute). A finished
stage leaves WORKDIR/<stage>/stage_done.json and is skipped when the command
is run again; an interrupted training stage resumes from its newest
checkpoint, an interrupted ContraCAM stage starts over (its files are written
atomically).
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import ml_collections

from ocl_jax import console, export, paths
from ocl_jax.configuration import ConfigError, validate_config

TRAINING_STAGES = ("vanilla", "oacrop", "bgmix", "sgcl")
STAGES = TRAINING_STAGES + ("contracam", "eval")
DONE_FILE = "stage_done.json"


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def is_done(workdir: str, stage: str) -> bool:
  return os.path.exists(os.path.join(stage_dir(workdir, stage), DONE_FILE))


def _mark_done(workdir: str, stage: str, info: dict[str, Any]) -> None:
  if jax.process_index() != 0:
    return
  path = os.path.join(stage_dir(workdir, stage), DONE_FILE)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump({"stage": stage, **info}, f, indent=2)
  os.replace(path + ".tmp", path)


def contracam_outputs(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  d = stage_dir(workdir, "contracam")
  split = config.contracam.split
  return {
      "boxes": os.path.join(d, f"boxes_{split}.txt"),
      "masks": os.path.join(d, f"masks_{split}"),
  }


def stage_config(
    config: ml_collections.ConfigDict, stage: str, workdir: str
) -> ml_collections.ConfigDict:
  """The config a stage runs with: the pipeline's config plus the stage's switches."""
  c = copy.deepcopy(config)
  p = config.pipeline
  outputs = contracam_outputs(config, workdir)
  with c.unlocked():
    c.mode = "train"
    c.export_encoder = True
    c.object_aware.crop = stage == "oacrop"
    c.bg_mixup.enabled = stage == "bgmix"
    c.saliency.enabled = stage == "sgcl"
    if stage == "oacrop":
      c.object_aware.boxes = outputs["boxes"] if p.oacrop_boxes == "contracam" else "gt"
    if stage == "bgmix":
      c.bg_mixup.masks = outputs["masks"] if p.bgmix_masks == "contracam" else "gt"
    if stage == "contracam":
      c.contracam.checkpoint = stage_dir(workdir, "vanilla")
  return c


def validate_pipeline(config: ml_collections.ConfigDict) -> None:
  """Stage names and order, before anything runs."""
  stages = list(config.pipeline.stages)
  errors = [f"unknown stage {s!r} (known: {STAGES})" for s in stages if s not in STAGES]
  needs_cam = [
      s
      for s in stages
      if (s == "oacrop" and config.pipeline.oacrop_boxes == "contracam")
      or (s == "bgmix" and config.pipeline.bgmix_masks == "contracam")
  ]
  for s in needs_cam:
    if "contracam" not in stages or stages.index("contracam") > stages.index(s):
      errors.append(f"stage {s!r} uses ContraCAM outputs: 'contracam' must come before it")
  if "contracam" in stages and (
      "vanilla" not in stages or stages.index("vanilla") > stages.index("contracam")
  ):
    errors.append("stage 'contracam' uses the vanilla model: 'vanilla' must come before it")
  for field in ("oacrop_boxes", "bgmix_masks"):
    if config.pipeline[field] not in ("contracam", "gt"):
      errors.append(f"{field}={config.pipeline[field]!r} is not 'contracam' or 'gt'")
  if errors:
    raise ConfigError(
        "Invalid configuration:\n  "
        + "\n  ".join(f"config.pipeline.{e}" if not e.startswith("config.") else e for e in errors)
    )


def _format_seconds(s: float) -> str:
  s = int(round(s))
  return f"{s // 60}m{s % 60:02d}s"


class Progress:
  """Stage banners with elapsed time and an ETA from the stages measured so far."""

  def __init__(self, stages: list[str]):
    self.stages, self.start, self.seconds = stages, time.time(), {}

  def _estimate(self, stage: str) -> float | None:
    trained = [v for k, v in self.seconds.items() if k in TRAINING_STAGES]
    if stage in TRAINING_STAGES and trained:
      return sum(trained) / len(trained)
    if trained:  # ContraCAM and evaluation: a fraction of a training stage, from experience
      return {"contracam": 0.15, "eval": 0.5}.get(stage, 0.2) * trained[0]
    return None

  def begin(self, stage: str) -> None:
    i = self.stages.index(stage)
    remaining = [self._estimate(s) for s in self.stages[i:] if s not in self.seconds]
    eta = (
        ("ETA " + _format_seconds(sum(remaining)))
        if remaining and None not in remaining
        else "ETA after the first training stage"
    )
    msg = (
        f"==> Stage {i + 1}/{len(self.stages)}: {stage}  (elapsed "
        f"{_format_seconds(time.time() - self.start)}, {eta})"
    )
    console.say(msg)

  def end(self, stage: str, seconds: float) -> None:
    self.seconds[stage] = seconds


def _run_training(config, workdir, stage) -> dict[str, Any]:
  from ocl_jax import train

  c = stage_config(config, stage, workdir)
  validate_config(c)
  state = train.train_and_evaluate(c, stage_dir(workdir, stage))
  info = {"steps": int(state.step), "export": os.path.join(stage_dir(workdir, stage), "export")}
  timing = os.path.join(stage_dir(workdir, stage), train.RunTiming.FILE)
  if os.path.exists(timing):  # this run's own training (not there when nothing was left)
    with open(timing) as f:
      info["timing"] = json.load(f)
  return info


def _run_contracam(config, workdir, stage) -> dict[str, Any]:
  from ocl_jax.discovery import discover

  c = stage_config(config, "contracam", workdir)
  return discover.save_boxes_and_masks(c, stage_dir(workdir, "contracam"))


def trained_stages(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  return [s for s in config.pipeline.stages if s in TRAINING_STAGES and is_done(workdir, s)]


def _run_eval(config, workdir, stage) -> dict[str, Any]:
  from ocl_jax.discovery import discover
  from ocl_jax.evaluation import evaluate

  rows = {}
  for s in trained_stages(config, workdir):
    module, variables = export.load_model(os.path.join(stage_dir(workdir, s), "export"))[:2]
    row = evaluate.evaluate_encoder(config, module, variables)
    if config.pipeline.localization:
      c = stage_config(config, "contracam", workdir)
      with c.unlocked():
        c.contracam.checkpoint = os.path.join(stage_dir(workdir, s), "export")
        c.contracam.iterations = 1
        c.contracam.max_images = config.pipeline.localization_images
      loc = discover.evaluate_localization(c, stage_dir(workdir, s))["ContraCAM (T=1)"]
      row.update({f"loc/{k}": v for k, v in loc.items()})
    rows[s] = row
  title = (
      f"Results of `{config.dataset.name}` pretraining ({config.method}, seed {config.seed}): "
      "accuracy in %, localisation as IoU"
  )
  table = evaluate.write_results(
      workdir, rows, {"seed": config.seed, "method": config.method}, name="results", title=title
  )
  console.say(table)
  return {"rows": rows}


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    **{s: _run_training for s in TRAINING_STAGES},
    "contracam": _run_contracam,
    "eval": _run_eval,
}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Run the pending stages of config.pipeline.stages into `workdir`; returns the eval rows."""
  workdir, config = paths.resolve(workdir), paths.resolve_config(config)
  validate_pipeline(config)
  stages = list(config.pipeline.stages)
  progress = Progress(stages)
  result: dict[str, Any] = {}
  for stage in stages:
    marker = os.path.join(stage_dir(workdir, stage), DONE_FILE)
    if os.path.exists(marker):
      try:
        with open(marker) as f:
          info = json.load(f)
      except (OSError, ValueError) as e:
        raise ValueError(
            f"{marker} (the marker of the finished stage {stage}) cannot be read ({e}); delete "
            f"it to run stage {stage} again, or delete {stage_dir(workdir, stage)} to start "
            "it from scratch"
        ) from e
      progress.end(stage, info.get("seconds", 0.0))
      logging.info("Stage %s already done (%s); skipping", stage, marker)
      result = info if stage == "eval" else result
      continue
    progress.begin(stage)
    start = time.time()
    info = RUNNERS[stage](config, workdir, stage)
    seconds = time.time() - start
    progress.end(stage, seconds)
    _mark_done(workdir, stage, {"seconds": seconds, **info})
    result = info if stage == "eval" else result
  total = time.time() - progress.start
  msg = f"Pipeline done in {_format_seconds(total)} ({workdir})"
  console.say(msg)
  return result.get("rows", {})
