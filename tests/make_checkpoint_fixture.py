"""Writes tests/data/checkpoint_fixture: a 2-step run of the tiny scenes config (MoCo v2 with
BG-mixup, so the queue and the FIFO are in the state), as the code of the time saved it.

tests/test_checkpoint_fixture.py restores and resumes it with the current code, so a change
that alters the checkpoint layout is caught. `python -m tests.make_checkpoint_fixture` (from
the repository root) writes it again; do that only when the layout is meant to change.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile

import tests.conftest as conftest

PATH = pathlib.Path(__file__).parent / "data" / "checkpoint_fixture"


def fixture_config(scenes_data_dir: str):
  """The tiny scenes config the fixture was written with (its data_dir aside)."""
  c = conftest.make_tiny_config(scenes_data_dir)
  c.bg_mixup.enabled = True
  c.bg_mixup.masks = "gt"
  c.bg_mixup.fifo_size = 4
  c.num_train_steps = 2
  c.log_every_steps = c.checkpoint_every_steps = 2
  c.eval_every_steps = 0
  c.export_encoder = False
  return c


def main() -> None:
  from ocl_jax import train
  from ocl_jax.data import scenes

  with tempfile.TemporaryDirectory() as tmp:
    data_dir = f"{tmp}/data"
    scenes.prepare(scenes.CONFIGS["tiny"], data_dir)
    train.train_and_evaluate(fixture_config(data_dir), f"{tmp}/work")
    shutil.rmtree(PATH, ignore_errors=True)
    shutil.copytree(f"{tmp}/work/checkpoints", PATH)
  print(f"wrote {PATH}: {sum(f.stat().st_size for f in PATH.rglob('*') if f.is_file())} bytes")


if __name__ == "__main__":
  main()
