"""The seed study: its statistics by hand, its files from per-seed rows, a real 2-seed run."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ocl_jax import pipeline, study
from ocl_jax.configuration import ConfigError
from tests.conftest import pipeline_test_config

METRICS = ("scenes/linear/test", "scenes/feature/mixed_rand_top1", "loc/mask_miou")


def test_interval_by_hand():
  s = study.interval([1.0, 2.0, 3.0])
  # sd 1; t(0.975, 2 dof) = 4.302653; half width 4.302653 / sqrt(3).
  half = 4.302653 / np.sqrt(3)
  assert s["mean"] == 2.0 and s["sd"] == pytest.approx(1.0)
  assert s["ci95"] == pytest.approx([2 - half, 2 + half], rel=1e-6)
  assert s["per_seed"] == [1.0, 2.0, 3.0]
  one = study.interval([0.5])
  assert one["ci95"] is None and one["sd"] is None


def test_paired_differences_are_taken_seed_by_seed():
  per_seed = {
      0: {"vanilla": {"m": 0.50}, "oacrop": {"m": 0.60}},
      1: {"vanilla": {"m": 0.70}, "oacrop": {"m": 0.81}},
      2: {"vanilla": {"m": 0.40}, "oacrop": {"m": 0.49}},
  }
  s = study.summarise(per_seed, ["m"], "vanilla")
  d = s["paired_vs_vanilla"]["oacrop"]["m"]
  assert d["per_seed"] == pytest.approx([0.10, 0.11, 0.09])
  # Unpaired, the spread of the levels (0.4 .. 0.8) would swamp the 0.1 difference.
  assert study.excludes_zero(d)
  v, o = s["models"]["vanilla"]["m"]["ci95"], s["models"]["oacrop"]["m"]["ci95"]
  assert v[1] > o[0] and o[1] > v[0]  # the per-model intervals overlap
  assert "vanilla" not in s["paired_vs_vanilla"]
  with pytest.raises(ValueError, match="seed"):
    study.summarise({0: {"vanilla": {"m": 1.0}}, 1: {"vanilla": {}}}, ["m"], "vanilla")


def test_markdown_marks_what_the_intervals_support():
  per_seed = {
      s: {"vanilla": {"a": 0.5, "b": 0.5}, "x": {"a": 0.6 + 0.01 * s, "b": 0.5 + 0.1 * (-1) ** s}}
      for s in range(4)
  }
  summary = {
      "seeds": [0, 1, 2, 3],
      "steps": 10,
      "config": "c",
      **study.summarise(per_seed, ["a", "b"], "vanilla"),
  }
  text = study.markdown(summary, ["a", "b"], "vanilla")
  row = [line for line in text.splitlines() if line.startswith("| x |")][-1]
  assert "**+11.5 [" in row  # a: +10..+13 points, interval excludes 0
  assert "n.d." in row.split("|")[3]  # b: +-10 points alternating, interval contains 0


def _fake_rows(seed: int) -> dict:
  """Rows as a pipeline's results.json holds them, a known function of the seed."""
  return {
      model: {
          "scenes/linear/test": 0.8 + 0.01 * seed + 0.02 * i,
          "scenes/feature/mixed_rand_top1": 0.3 + 0.05 * i - 0.01 * seed,
          "loc/mask_miou": 0.4 + 0.001 * seed,
      }
      for i, model in enumerate(("vanilla", "oacrop", "bgmix", "sgcl"))
  }


@pytest.fixture
def fake_pipeline(monkeypatch):
  """pipeline.run replaced by one that writes the rows of _fake_rows; records its calls."""
  calls = []

  def run(config, workdir):
    calls.append((config.seed, config.mode, workdir))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({"rows": _fake_rows(config.seed)}, f)

  monkeypatch.setattr(pipeline, "run", run)
  return calls


def test_study_writes_json_markdown_and_png_from_every_seed(tiny_config, tmp_path, fake_pipeline):
  c = pipeline_test_config(tiny_config)
  c.mode = "study"
  c.study.seeds = (0, 1, 2)
  c.study.metrics = METRICS
  c.study.results_dir = str(tmp_path / "results")
  summary = study.run(c, str(tmp_path / "work"))
  assert [(s, m) for s, m, _ in fake_pipeline] == [
      (0, "pipeline"),
      (1, "pipeline"),
      (2, "pipeline"),
  ]
  assert fake_pipeline[1][2] == str(tmp_path / "work" / "seed_1")
  saved = json.load(open(tmp_path / "results" / "scenes_study.json"))
  assert saved["seeds"] == [0, 1, 2] and saved["steps"] == c.num_train_steps
  for model in ("vanilla", "oacrop", "bgmix", "sgcl"):
    for metric in METRICS:
      entry = saved["models"][model][metric]
      want = [_fake_rows(s)[model][metric] for s in (0, 1, 2)]
      assert entry["per_seed"] == pytest.approx(want)
      # The interval follows from the per-seed values.
      ref = study.interval(want)
      assert entry["mean"] == pytest.approx(ref["mean"]) and entry["sd"] == pytest.approx(ref["sd"])
      assert entry["ci95"] == pytest.approx(ref["ci95"])
  diff = saved["paired_vs_vanilla"]["sgcl"]["scenes/linear/test"]
  assert diff["per_seed"] == pytest.approx([0.06] * 3)
  assert summary["models"].keys() == saved["models"].keys()
  md = open(tmp_path / "results" / "scenes_study.md").read()
  assert "| sgcl |" in md and "scenes/feature/mixed_rand_top1" in md
  png = Image.open(tmp_path / "results" / "scenes_study.png")
  assert png.size[0] >= 600 and np.asarray(png).std() > 0


def test_study_reports_a_rounding_level_rerun(tiny_config, tmp_path, fake_pipeline):
  c = pipeline_test_config(tiny_config)
  c.study.seeds, c.study.metrics = (0, 1), METRICS
  rerun = tmp_path / "rerun"
  rerun.mkdir()
  rows = _fake_rows(1)
  rows["bgmix"]["scenes/linear/test"] += 0.05
  json.dump({"rows": rows}, open(rerun / "results.json", "w"))
  c.study.perturbed, c.study.perturbed_seed = str(rerun), 1
  summary = study.run(c, str(tmp_path / "work"))
  stab = summary["stability"]
  assert stab["rerun_max_abs"]["scenes/linear/test"] == pytest.approx(0.05)
  assert stab["rerun_max_abs"]["loc/mask_miou"] == pytest.approx(0.0)
  assert "Stability" in open(tmp_path / "work" / "scenes_study.md").read()
  c.study.perturbed_seed = 7
  with pytest.raises(ValueError, match="perturbed_seed=7"):
    study.run(c, str(tmp_path / "work"))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("seeds", (), "distinct integer seeds"),
        ("seeds", (1, 1), "distinct integer seeds"),
        ("baseline", "eval", "not a training stage"),
        ("metrics", (), "empty"),
    ],
)
def test_study_config_is_validated(tiny_config, field, value, message):
  c = pipeline_test_config(tiny_config)
  c.study[field] = value
  with pytest.raises(ConfigError, match=message):
    study.validate_study(c)


@pytest.mark.slow
def test_two_real_seeds_on_tiny(tiny_config, tmp_path):
  """The real pipeline (vanilla and SGCL) for two seeds; the second call redoes nothing."""
  c = pipeline_test_config(tiny_config)
  c.pipeline.stages = ("vanilla", "sgcl", "eval")
  c.pipeline.localization = False
  c.study.seeds = (0, 1)
  c.study.metrics = ("scenes/knn/test", "scenes/feature/mixed_rand_consistency")
  c.evaluation.protocols = ("knn", "feature")  # the protocols of those metrics
  first = study.run(c, str(tmp_path))
  assert set(first["models"]) == {"vanilla", "sgcl"}
  again = study.run(c, str(tmp_path))
  assert again["models"] == first["models"]
  seeds = [first["models"]["vanilla"]["scenes/knn/test"]["per_seed"][i] for i in (0, 1)]
  assert all(0.0 <= v <= 1.0 for v in seeds)
