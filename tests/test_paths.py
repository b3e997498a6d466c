"""User paths resolve once: relative to the current directory, `~` expanded, sentinels kept."""

import os

import ml_collections

from ocl_jax import paths
from ocl_jax.configuration import load_sibling_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resolve_relative_and_home(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert paths.resolve("runs/a") == str(tmp_path / "runs" / "a")
  assert paths.resolve("./runs/../b/") == str(tmp_path / "b")
  assert paths.resolve("~/data") == str(tmp_path / "home" / "data")
  assert paths.resolve(tmp_path / "c") == str(tmp_path / "c")  # os.PathLike
  assert paths.resolve("/abs/x") == "/abs/x"
  for kept in (None, "", "gt"):
    assert paths.resolve_optional(kept) == kept
  assert paths.resolve_dataset_name("scenes/small") == "scenes/small"
  assert paths.resolve_dataset_name("folder:imgs/train") == f"folder:{tmp_path}/imgs/train"
  assert paths.resolve_dataset_name("folder:~/imgs") == f"folder:{tmp_path}/home/imgs"


def test_every_path_field_of_the_config_is_resolved(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  c = load_sibling_config(os.path.join(ROOT, "configs", "default.py"), "default.py")
  c.dataset.name = "folder:imgs/train"
  c.dataset.data_dir = "tfds"
  c.evaluation.data_dir = "~/tfds"
  c.contracam.checkpoint = "runs/vanilla"
  c.object_aware.boxes = "runs/boxes_train.txt"
  c.bg_mixup.masks = "~/masks_train"
  c.evaluation.checkpoints = ("runs/a", "", "/abs/b")
  c.evaluation.datasets = ("scenes", "folder:~/eval")
  c.evaluation.folders.imagenet9 = "bg_challenge"
  c.evaluation.folders.objectnet9 = ""
  c.evaluation.folders.si_score = "REQUIRED: --config.evaluation.folders.si_score=PATH"
  r = paths.resolve_config(c)
  t, h = str(tmp_path), str(tmp_path / "home")
  assert r.dataset.name == f"folder:{t}/imgs/train"
  assert r.dataset.data_dir == f"{t}/tfds" and r.evaluation.data_dir == f"{h}/tfds"
  assert r.contracam.checkpoint == f"{t}/runs/vanilla"
  assert r.object_aware.boxes == f"{t}/runs/boxes_train.txt"
  assert r.bg_mixup.masks == f"{h}/masks_train"
  assert r.evaluation.checkpoints == (f"{t}/runs/a", "", "/abs/b")
  assert r.evaluation.datasets == ("scenes", f"folder:{h}/eval")
  assert r.evaluation.folders.imagenet9 == f"{t}/bg_challenge"
  assert r.evaluation.folders.objectnet9 == ""
  assert r.evaluation.folders.si_score.startswith("REQUIRED:")  # left for validation to report
  # The input is not modified, and defaults (None placeholders, 'gt', '') stay.
  assert c.dataset.data_dir == "tfds"
  d = paths.resolve_config(
      load_sibling_config(os.path.join(ROOT, "configs", "default.py"), "default.py")
  )
  assert (
      d.dataset.data_dir is None and d.object_aware.boxes == "gt" and d.contracam.checkpoint == ""
  )
  assert d.dataset.name == "scenes/default"


def test_configs_without_some_sections_resolve():
  c = ml_collections.ConfigDict({"dataset": {"name": "scenes/tiny", "data_dir": "x"}})
  assert paths.resolve_config(c).dataset.data_dir == os.path.abspath("x")
