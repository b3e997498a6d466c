"""The main job end to end (slow: ~15 min on 2 cores; `python -m pytest -m slow -q`)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from ocl_jax.data import scenes

ROOT = pathlib.Path(__file__).parents[1]


@pytest.mark.slow
def test_main_job_learns_localises_and_prints_the_table(tmp_path):
  """configs/demo.py into an empty data dir: every stage runs, the table is printed, and the
  numbers are those of a model that learned (cf. the README's table)."""
  args = [
      sys.executable,
      "-m",
      "ocl_jax.main",
      "--config=configs/demo.py",
      f"--workdir={tmp_path / 'demo'}",
      f"--config.dataset.data_dir={tmp_path / 'data'}",
  ]
  run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=3600)
  assert run.returncode == 0, run.stderr[-3000:]
  for stage in range(1, 7):
    assert f"==> Stage {stage}/6" in run.stdout
  assert "| vanilla |" in run.stdout and "| sgcl |" in run.stdout
  # scenes/small was rendered once into the data dir, as arrays (no TFDS files).
  assert os.listdir(tmp_path / "data") == ["scenes"]
  assert os.listdir(tmp_path / "data" / "scenes") == ["small"]
  assert os.listdir(tmp_path / "data" / "scenes" / "small") == [scenes.VERSION]
  rows = json.load(open(tmp_path / "demo" / "results.json"))["rows"]
  assert set(rows) == {"vanilla", "oacrop", "bgmix", "sgcl"}
  for name, row in rows.items():
    assert row["scenes/linear/test"] > 0.8, (name, row)  # chance is 0.1
    assert row["scenes/linear/mixed_rand"] < row["scenes/linear/test"]
    assert row["loc/mask_miou"] > 0.3, (name, row)  # centre prior ~0.17
