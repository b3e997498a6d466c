"""Several seeds of the debiasing pipeline, summarised with intervals: `--config.mode=study`.

One seed of the main job cannot carry a claim: its shifted-split numbers move
by several points with rounding-level changes (README). This mode runs the
pipeline (`ocl_jax.pipeline`) once per seed of `config.study.seeds` into
WORKDIR/seed_<s> (finished seeds and stages are skipped, so the command
resumes), then writes to `config.study.results_dir` (default: WORKDIR):

  scenes_study.json  per model and metric: per-seed values, mean, standard
                     deviation and 95% interval (Student t over seeds); the
                     per-seed differences against the baseline model with
                     their interval; with `study.perturbed`, how far each
                     metric moved under a rounding-level rerun of one seed
  scenes_study.md    the same as tables
  scenes_study.png   each metric per model: seeds as dots, mean and interval

Values are in the units of the results tables: accuracies and the
`scenes/feature/` measures as fractions (printed in %), localisation as IoU.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
from scipy import stats

from ocl_jax import console, export, paths, pictures, pipeline
from ocl_jax.configuration import ConfigError

RESULTS_NAME = "scenes_study"
FEATURE_FILE = "feature_results.json"


# ----------------------------------------------------------------------------
# Statistics.


def interval(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
  """Mean, standard deviation and the Student-t interval of the mean over the values."""
  x = np.asarray(values, np.float64)
  n = len(x)
  mean = float(x.mean())
  if n < 2:
    return {"per_seed": x.tolist(), "mean": mean, "sd": None, "ci95": None}
  sd = float(x.std(ddof=1))
  half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
  return {"per_seed": x.tolist(), "mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def excludes_zero(summary: Mapping[str, Any]) -> bool:
  ci = summary.get("ci95")
  return ci is not None and (ci[0] > 0 or ci[1] < 0)


def summarise(
    per_seed: Mapping[int, Mapping[str, Mapping[str, float]]],
    metrics: Sequence[str],
    baseline: str,
) -> dict[str, Any]:
  """{"models": {model: {metric: interval}}, "paired_vs_<baseline>": ...} from per-seed rows.

  `per_seed`: {seed: {model: {metric: value}}}. A metric a seed lacks is an error:
  intervals over different seed sets would not be comparable.
  """
  seeds = sorted(per_seed)
  models = list(next(iter(per_seed.values())))
  out: dict[str, Any] = {"models": {}, f"paired_vs_{baseline}": {}}
  for model in models:
    out["models"][model] = {}
    for metric in metrics:
      missing = [s for s in seeds if metric not in per_seed[s].get(model, {})]
      if missing:
        raise ValueError(f"{model} {metric}: no value for seed(s) {missing}")
      values = [per_seed[s][model][metric] for s in seeds]
      out["models"][model][metric] = interval(values)
      if model != baseline and baseline in models:
        diffs = [per_seed[s][model][metric] - per_seed[s][baseline][metric] for s in seeds]
        out[f"paired_vs_{baseline}"].setdefault(model, {})[metric] = interval(diffs)
  return out


# ----------------------------------------------------------------------------
# Tables.


def _scale(metric: str) -> float:
  return 1.0 if metric.startswith("loc/") else 100.0


def _cell(metric: str, s: Mapping[str, Any], signed: bool = False) -> str:
  k = _scale(metric)
  digits = 3 if k == 1.0 else 1
  fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
  text = fmt.format(k * s["mean"])
  if s["ci95"] is not None:
    text += " [" + ", ".join(fmt.format(k * v) for v in s["ci95"]) + "]"
  if signed:
    text = f"**{text}**" if excludes_zero(s) else text + " n.d."
  return text


def markdown(summary: Mapping[str, Any], metrics: Sequence[str], baseline: str) -> str:
  """The study's tables: means with intervals, paired differences, stability."""
  seeds = summary["seeds"]
  head = "| model | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics)
  lines = [
      f"# `scenes` debiasing study: {len(seeds)} seeds {seeds}, {summary['steps']} steps",
      "",
      f"Config `{summary['config']}`. Accuracies and `scenes/feature/` measures in %, "
      "localisation as IoU. Mean over seeds [95% interval, Student t].",
      "",
      head,
  ]
  for model, row in summary["models"].items():
    lines.append(f"| {model} | " + " | ".join(_cell(m, row[m]) for m in metrics) + " |")
  paired = summary[f"paired_vs_{baseline}"]
  lines += [
      "",
      f"Paired differences against {baseline} (same seed), mean [95% interval]; bold: the "
      "interval excludes 0; n.d.: no effect detected at this scale.",
      "",
      head,
  ]
  for model, row in paired.items():
    lines.append(f"| {model} | " + " | ".join(_cell(m, row[m], True) for m in metrics) + " |")
  spread = summary.get("stability")
  if spread:
    lines += [
        "",
        "Stability: the standard deviation over seeds (mean over models) and the largest "
        f"change of any model under a rounding-level rerun ({spread['perturbation']}).",
        "",
        "| | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for key, label in (("seed_sd", "sd over seeds"), ("rerun_max_abs", "rerun, largest change")):
      cells = [f"{_scale(m) * spread[key][m]:.{3 if _scale(m) == 1 else 1}f}" for m in metrics]
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# The runner.


def seed_workdir(workdir: str, seed: int) -> str:
  return os.path.join(workdir, f"seed_{seed}")


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  """The pipeline config of one seed: exactly the main job's with `--config.seed=<seed>`."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.mode, c.seed = "pipeline", int(seed)
  return c


def validate_study(config: ml_collections.ConfigDict) -> None:
  st, errors = config.study, []
  seeds = list(st.seeds)
  if not seeds or any(not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
    errors.append(f"config.study.seeds={tuple(seeds)}: give distinct integer seeds")
  if st.baseline not in config.pipeline.stages or st.baseline not in pipeline.TRAINING_STAGES:
    errors.append(f"config.study.baseline={st.baseline!r} is not a training stage of the pipeline")
  if not st.metrics:
    errors.append("config.study.metrics is empty")
  if errors:
    raise ConfigError("Invalid configuration:\n  " + "\n  ".join(errors))


def _feature_rows(config, workdir: str, rows: Mapping[str, Any]) -> dict[str, dict[str, float]]:
  """The `scenes/feature/` measures of every model of a seed, computed once and kept.

  The pipeline's eval stage includes them when `feature` is among the protocols;
  seeds evaluated without it get them here, from each model's export.
  """
  from ocl_jax.evaluation import evaluate

  path = os.path.join(workdir, FEATURE_FILE)
  kept = json.load(open(path)) if os.path.exists(path) else {}
  c = copy.deepcopy(config)
  with c.unlocked():
    c.evaluation.protocols = ("feature",)
  out = {}
  for model, row in rows.items():
    if any(k.startswith("scenes/feature/") for k in row):
      out[model] = {}
      continue
    if model not in kept:
      source = os.path.join(pipeline.stage_dir(workdir, model), "export")
      module, variables = export.load_model(source)[:2]
      kept[model] = evaluate.evaluate_encoder(c, module, variables)
      if jax.process_index() == 0:
        with open(path + ".tmp", "w") as f:
          json.dump(kept, f, indent=2)
        os.replace(path + ".tmp", path)
    out[model] = kept[model]
  return out


def _seed_rows(config, workdir: str) -> dict[str, dict[str, float]]:
  pipeline.run(config, workdir)
  with open(os.path.join(workdir, "results.json")) as f:
    rows = json.load(f)["rows"]
  if "feature" in config.evaluation.protocols:
    for model, extra in _feature_rows(config, workdir, rows).items():
      rows[model] = {**rows[model], **extra}
  return rows


def _stability(config, per_seed, summary, metrics) -> dict[str, Any] | None:
  """Seed spread, and the largest change under the rerun of `study.perturbed` (if given)."""
  st = config.study
  if not st.perturbed:
    return None
  with open(os.path.join(st.perturbed, "results.json")) as f:
    rerun = json.load(f)["rows"]
  seed = int(st.perturbed_seed)
  if seed not in per_seed:
    raise ValueError(f"config.study.perturbed_seed={seed} is not one of the study's seeds")
  extra = _feature_rows(seed_config(config, seed), st.perturbed, rerun)
  rerun = {m: {**r, **extra[m]} for m, r in rerun.items()}
  change = {
      m: max(abs(rerun[model][m] - per_seed[seed][model][m]) for model in rerun) for m in metrics
  }
  sd = {
      m: float(np.mean([summary["models"][model][m]["sd"] or 0.0 for model in summary["models"]]))
      for m in metrics
  }
  return {
      "perturbation": f"seed {seed} again as {st.perturbed_description} ({st.perturbed})",
      "seed": seed,
      "seed_sd": sd,
      "rerun_max_abs": change,
      "rerun": {model: {m: rerun[model][m] for m in metrics} for model in rerun},
  }


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Every seed's pipeline (resumed where it stopped), then the summary files."""
  workdir, config = paths.resolve(workdir), paths.resolve_config(config)
  validate_study(config)
  st = config.study
  metrics, baseline = list(st.metrics), st.baseline
  per_seed: dict[int, dict[str, dict[str, float]]] = {}
  for i, seed in enumerate(st.seeds):
    console.say(f"==> Study seed {seed} ({i + 1}/{len(st.seeds)})")
    per_seed[seed] = _seed_rows(seed_config(config, seed), seed_workdir(workdir, seed))
  summary = {
      "seeds": sorted(per_seed),
      "steps": int(config.num_train_steps),
      "config": st.label or config.dataset.name,
      **summarise(per_seed, metrics, baseline),
  }
  stability = _stability(config, per_seed, summary, metrics)
  if stability:
    summary["stability"] = stability
  out_dir = paths.resolve(st.results_dir) if st.results_dir else workdir
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    table = markdown(summary, metrics, baseline)
    for name, text in (("json", json.dumps(summary, indent=2)), ("md", table)):
      path = os.path.join(out_dir, f"{RESULTS_NAME}.{name}")
      with open(path + ".tmp", "w") as f:
        f.write(text)
      os.replace(path + ".tmp", path)
    pictures.interval_chart(summary, metrics).save(os.path.join(out_dir, f"{RESULTS_NAME}.png"))
    console.say(table)
    logging.info("Study written to %s", out_dir)
  return summary
