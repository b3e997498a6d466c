"""tools/stage_times: the per-stage table from a pipeline workdir's markers, by hand."""

import json

import pytest

from ocl_jax.tools import stage_times


def _write(path, record):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(record))


def test_rows_follow_the_stage_order_and_fold_in_the_training_timing(tmp_path):
  _write(tmp_path / "config.json", {"pipeline": {"stages": ["vanilla", "contracam", "eval"]}})
  timing = {"steps": 200, "first_step_seconds": 12.5, "steps_per_second": 3.25}
  timing.update(device_idle_fraction=0.125, platform="gpu", devices=1)
  _write(
      tmp_path / "vanilla" / "stage_done.json", {"seconds": 80.0, "steps": 200, "timing": timing}
  )
  _write(tmp_path / "contracam" / "stage_done.json", {"seconds": 10.0})
  # eval has not finished: no marker, no row.
  rows = stage_times.collect(str(tmp_path))
  assert [r["stage"] for r in rows] == ["vanilla", "contracam"]
  assert rows[0]["first_step_seconds"] == 12.5 and rows[1]["steps_per_second"] is None
  text = stage_times.table(rows, process_seconds=100.0)
  assert "| vanilla | 80.0 | 200 | 12.5 | 3.25 | 0.12 |" in text
  assert "| contracam | 10.0 | - | - | - | - |" in text
  assert "| stages together | 90.0 |" in text and "| outside the stages | 10.0 |" in text


def test_a_folder_that_is_no_pipeline_workdir_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a pipeline workdir"):
    stage_times.collect(str(tmp_path))
