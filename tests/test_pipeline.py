"""The three-stage pipeline on scenes/tiny: every stage, its outputs, the table, resuming."""

import json
import logging
import os

import pytest

from ocl_jax import pipeline
from ocl_jax.configuration import ConfigError
from tests.conftest import pipeline_test_config


def _pipeline_config(tiny_config):
  return pipeline_test_config(tiny_config)


# The default suite runs all six stages as a whole process without TensorFlow
# (test_plain_jax_install.py: outputs, table, nothing redone, bgmix resumed); these in-process
# runs, which also see the pipeline's log, are in the slow suite.
SHORT_STAGES = ("vanilla", "contracam", "bgmix", "eval")


@pytest.mark.parametrize(
    "stages",
    [
        pytest.param(SHORT_STAGES, id="vanilla-contracam-bgmix-eval", marks=pytest.mark.slow),
        pytest.param(None, id="every-stage", marks=pytest.mark.slow),  # the config's six
    ],
)
def test_pipeline_runs_its_stages_and_resumes_stage_by_stage(
    tiny_config, tmp_path, caplog, capsys, stages
):
  c = _pipeline_config(tiny_config)
  stages = c.pipeline.stages = stages or c.pipeline.stages
  work = str(tmp_path)
  trained = [s for s in stages if s in pipeline.TRAINING_STAGES]
  with caplog.at_level(logging.INFO):
    rows = pipeline.run(c, work)
  assert set(rows) == set(trained)
  for stage in trained:
    assert os.path.exists(os.path.join(work, stage, "export", "model.json"))
    assert "scenes/linear/test" in rows[stage] and "loc/mask_miou" in rows[stage]
  boxes = os.path.join(work, "contracam", "boxes_train.txt")
  masks = os.path.join(work, "contracam", "masks_train")
  assert len(open(boxes).read().splitlines()) == 256 and len(os.listdir(masks)) == 256
  assert f"Stage 3/{len(stages)}: {stages[2]}" in capsys.readouterr().out
  table = open(os.path.join(work, "results.md")).read()
  assert "| vanilla |" in table and "| bgmix |" in table
  # The retraining stages used the ContraCAM outputs.
  cfg = json.load(open(os.path.join(work, "bgmix", "export", "model.json")))["config"]
  assert cfg["bg_mixup"]["enabled"] and cfg["bg_mixup"]["masks"] == masks
  if "oacrop" in stages:
    cfg = json.load(open(os.path.join(work, "oacrop", "export", "model.json")))["config"]
    assert cfg["object_aware"]["crop"] and cfg["object_aware"]["boxes"] == boxes
  if "sgcl" in stages:
    cfg = json.load(open(os.path.join(work, "sgcl", "export", "model.json")))["config"]
    assert cfg["saliency"]["enabled"] and not cfg["bg_mixup"]["enabled"]
    assert os.path.exists(os.path.join(work, "sgcl", "saliency.png"))

  # Run again: nothing is redone. Then lose the bgmix stage's marker (a run killed at its
  # end): only bgmix runs again, resuming from its checkpoint, and eval is kept.
  caplog.clear()
  with caplog.at_level(logging.INFO):
    assert pipeline.run(c, work) == rows
  assert caplog.text.count("already done") == len(stages)
  os.remove(os.path.join(work, "bgmix", pipeline.DONE_FILE))
  caplog.clear()
  with caplog.at_level(logging.INFO):
    pipeline.run(c, work)
  assert "Resumed from step 2" in caplog.text
  assert caplog.text.count("already done") == len(stages) - 1


@pytest.mark.parametrize(
    "stages, message",
    [
        (("vanilla", "oacrop", "contracam"), "'contracam' must come before it"),
        (("contracam", "vanilla"), "'vanilla' must come before it"),
        (("vanilla", "sgd"), "unknown stage 'sgd'"),
    ],
)
def test_stage_order_is_validated(tiny_config, stages, message):
  c = tiny_config
  c.pipeline.stages = stages
  with pytest.raises(ConfigError, match=message):
    pipeline.validate_pipeline(c)


def test_stage_configs(tiny_config, tmp_path):
  c = tiny_config
  c.pipeline.oacrop_boxes = "gt"
  oa = pipeline.stage_config(c, "oacrop", str(tmp_path))
  assert oa.object_aware.crop and oa.object_aware.boxes == "gt" and not oa.bg_mixup.enabled
  bg = pipeline.stage_config(c, "bgmix", str(tmp_path))
  assert bg.bg_mixup.enabled and bg.bg_mixup.masks == str(tmp_path / "contracam" / "masks_train")
  assert not bg.object_aware.crop
  assert not c.bg_mixup.enabled  # the pipeline's own config is untouched
