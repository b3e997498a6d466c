"""Frozen-encoder evaluation: features against a direct forward, the results table, mode=eval,
near-chance accuracy where labels carry no signal, and every named TFDS dataset under mock data."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ocl_jax import export
from ocl_jax.data import eval_data
from ocl_jax.data import eval_datasets
from ocl_jax.evaluation import evaluate
from tests.conftest import tiny_split


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, scenes_data_dir):
  """A random-init tiny encoder exported like a finished run: (config, workdir)."""
  from tests.conftest import export_random_init, make_tiny_config

  config = make_tiny_config(scenes_data_dir)
  workdir = str(tmp_path_factory.mktemp("run"))
  export_random_init(config, workdir)
  config.evaluation.image_size = 32
  config.evaluation.batch_size = 24  # 6 per device; splits of 64 end with a padded batch
  config.evaluation.num_l2_values = 5
  config.evaluation.lbfgs_max_iters = 50
  config.evaluation.knn_k = 5
  return config, workdir


def test_features_match_a_direct_forward_in_order(tiny_export):
  config, workdir = tiny_export
  module, variables, _, _, name = export.load_model(workdir)
  assert name == os.path.basename(workdir)
  ds = eval_datasets.get_eval_dataset(
      "scenes", scenes_name="scenes/tiny", data_dir=config.dataset.data_dir
  )
  batches = eval_data.split_batches(
      ds, "test", image_size=32, crop_fraction=1.0, batch_size=24, data_dir=config.dataset.data_dir
  )
  feats, labels = evaluate.extract_features(module, variables, batches)
  ref = tiny_split(config.dataset.data_dir, "test")
  assert feats.shape[0] == len(ref["label"]) == 64
  np.testing.assert_array_equal(labels, ref["label"])
  x = np.asarray(ref["image"], np.float32) / 255.0
  x = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  want = np.asarray(module.apply(variables, x.astype(np.float32), train=False)).mean(axis=(1, 2))
  np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-5)


def test_feature_measures_come_from_the_paired_splits(tiny_export):
  """evaluate_encoder's `scenes/feature/*` equal the measures of a direct forward of each
  paired split, read with its image ids (the rows are matched by scene, not position)."""
  from ocl_jax.evaluation import scene_features

  config, workdir = tiny_export
  module, variables = export.load_model(workdir)[:2]
  c = config.copy_and_resolve_references()
  c.evaluation.protocols = ("feature",)
  row = evaluate.evaluate_encoder(c, module, variables)
  assert all(k.startswith("scenes/feature/") for k in row), sorted(row)
  ref = {}
  for seed, (name, split) in enumerate(
      (("test", "test"), ("mixed_rand", "test_mixed_rand"), ("only_fg", "test_only_fg"))
  ):
    arrays = tiny_split(config.dataset.data_dir, split)
    # Each split's rows in another order: the measures must match them by scene id.
    order = np.random.default_rng(seed).permutation(len(arrays["label"]))
    x = np.asarray(arrays["image"][order], np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    f = np.asarray(module.apply(variables, x.astype(np.float32), train=False)).mean(axis=(1, 2))
    ref[name] = (f, np.asarray(arrays["label"][order]), np.asarray(arrays["id"][order]))
  want = scene_features.feature_metrics(ref)
  assert set(row) == {f"scenes/feature/{k}" for k in want}
  for key, value in want.items():
    # Retrieval counts may flip on a near-tie under float rounding: one image of 64.
    tol = 1e-4 if key == "mixed_rand_consistency" else 1.5 / 64
    assert row[f"scenes/feature/{key}"] == pytest.approx(value, abs=tol), key


def test_feature_measures_with_max_examples_use_the_same_scenes(tiny_export):
  """evaluation.max_examples caps every paired split at the same first scenes (each split's
  arrays are in scene order), so the measures run on them instead of failing after training."""
  from ocl_jax.evaluation import scene_features

  config, workdir = tiny_export
  module, variables = export.load_model(workdir)[:2]
  c = config.copy_and_resolve_references()
  c.evaluation.protocols = ("feature",)
  c.evaluation.max_examples = 24
  row = evaluate.evaluate_encoder(c, module, variables)
  assert row and all(k.startswith("scenes/feature/") for k in row)
  # Retrieval among 24 scenes: a top-1 fraction in steps of 1/24.
  top1 = row["scenes/feature/mixed_rand_top1"]
  assert 0 <= top1 <= 1 and abs(top1 * 24 - round(top1 * 24)) < 1e-6
  ref = {}
  for name, split in (
      ("test", "test"),
      ("mixed_rand", "test_mixed_rand"),
      ("only_fg", "test_only_fg"),
  ):
    arrays = tiny_split(config.dataset.data_dir, split)
    x = np.asarray(arrays["image"][:24], np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    f = np.asarray(module.apply(variables, x.astype(np.float32), train=False)).mean(axis=(1, 2))
    ref[name] = (f, np.asarray(arrays["label"][:24]), np.asarray(arrays["id"][:24]))
  want = scene_features.feature_metrics(ref)  # the measures of the first 24 scenes
  assert set(row) == {f"scenes/feature/{k}" for k in want}
  for key, value in want.items():
    tol = 1e-4 if key == "mixed_rand_consistency" else 1.5 / 24  # a near-tie may flip
    assert row[f"scenes/feature/{key}"] == pytest.approx(value, abs=tol), key


def test_results_table_hand_case():
  rows = {
      "vanilla": {"scenes/linear/test": 0.8123, "loc/mask_miou": 0.4567},
      "oacrop": {"scenes/linear/test": 0.85, "scenes/knn/test": 0.5},
  }
  table = evaluate.results_table(rows, "T")
  assert table.splitlines() == [
      "T",
      "",
      "| checkpoint | scenes/linear/test | loc/mask_miou | scenes/knn/test |",
      "|---|---|---|---|",
      "| vanilla | 81.2 | 0.457 | – |",
      "| oacrop | 85.0 | – | 50.0 |",
  ]


def test_eval_mode_writes_json_and_markdown_rows(tiny_export, tmp_path):
  config, workdir = tiny_export
  c = config.copy_and_resolve_references()
  c.mode = "eval"
  c.evaluation.checkpoints = (workdir, os.path.join(workdir, "export"))
  rows = evaluate.run(c, str(tmp_path))
  assert set(rows) == {os.path.basename(workdir), "export"}
  row = rows["export"]
  for split in ("val", "test", "mixed_same", "mixed_rand", "only_fg", "single"):
    assert 0.0 <= row[f"scenes/linear/{split}"] <= 1.0
  for split in ("test", "mixed_rand"):
    assert 0.0 <= row[f"scenes/knn/{split}"] <= 1.0
  assert np.isclose(
      row["scenes/linear/bg_gap"], row["scenes/linear/test"] - row["scenes/linear/mixed_rand"]
  )
  # The same encoder twice: the same numbers.
  assert rows["export"] == rows[os.path.basename(workdir)]
  saved = json.load(open(tmp_path / "eval_results.json"))
  assert saved["rows"] == json.loads(json.dumps(rows))
  md = (tmp_path / "eval_results.md").read_text()
  assert "| export |" in md and "scenes/linear/mixed_rand" in md


@pytest.mark.parametrize(
    "sources, names",
    [
        (("/r/a/export", "/r/b/export"), ["a", "b"]),
        (("/x/run/export", "/y/run/export"), ["x/run", "y/run"]),
        (("/r/a", "/r/a/export", "/s/b"), ["a", "export", "b"]),
        (("/r/a/", "/r/b/ckpt"), ["a", "ckpt"]),
    ],
)
def test_row_names_are_distinct(sources, names):
  assert evaluate.row_names(list(sources)) == names


def test_the_same_checkpoint_twice_or_a_taken_row_name_is_refused(tiny_export, tmp_path):
  config, workdir = tiny_export
  with pytest.raises(ValueError, match="twice"):
    evaluate.row_names([workdir, workdir + "/"])
  c = config.copy_and_resolve_references()
  c.evaluation.checkpoints = (workdir,)
  c.evaluation.protocols = ("knn",)
  evaluate.run(c, str(tmp_path))
  # Another checkpoint folder of the same name: its row would replace this one's.
  other = tmp_path / "elsewhere" / os.path.basename(workdir)
  other.mkdir(parents=True)
  c.evaluation.checkpoints = (str(other),)
  with pytest.raises(ValueError, match="would get the same name"):
    evaluate.run(c, str(tmp_path))


def test_a_damaged_results_file_is_named(tiny_export, tmp_path):
  config, workdir = tiny_export
  (tmp_path / "eval_results.json").write_text('{"rows": {"a"')
  c = config.copy_and_resolve_references()
  c.evaluation.checkpoints = (workdir,)
  with pytest.raises(ValueError, match=f"{tmp_path / 'eval_results.json'}.*cannot be read"):
    evaluate.run(c, str(tmp_path))


def test_labels_without_signal_give_chance_accuracy(tiny_export, tmp_path):
  """Noise images in random class folders (train / val / test disjoint): the probe and kNN
  must be at chance (1/4), which fails if features or labels leak between splits."""
  from PIL import Image

  config, workdir = tiny_export
  rng = np.random.default_rng(0)
  for split, n in (("train", 240), ("val", 80), ("test", 240)):
    for i in range(n):
      d = tmp_path / "noise" / split / f"class{rng.integers(4)}"
      d.mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
  for split in ("train", "val", "test"):  # every class present in every split
    for k in range(4):
      (tmp_path / "noise" / split / f"class{k}").mkdir(exist_ok=True)
  c = config.copy_and_resolve_references()
  c.evaluation.datasets = (f"folder:{tmp_path / 'noise'}",)
  module, variables = export.load_model(workdir)[:2]
  row = evaluate.evaluate_encoder(c, module, variables)
  name = c.evaluation.datasets[0]
  assert abs(row[f"{name}/linear/test"] - 0.25) < 0.1, row
  assert abs(row[f"{name}/knn/test"] - 0.25) < 0.1, row


@pytest.mark.parametrize(
    "name",
    [
        "coco_crop",
        "caltech_birds2011",
        "oxford_flowers102",
        "food101",
        "oxford_iiit_pet",
        "cifar100",
    ],
)
def test_every_tfds_dataset_evaluates_under_mock_data(tiny_export, name):
  config, workdir = tiny_export
  c = config.copy_and_resolve_references()
  c.evaluation.datasets = (name,)
  c.evaluation.protocols = ("linear", "knn")
  module, variables = export.load_model(workdir)[:2]
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=12):
    row = evaluate.evaluate_encoder(c, module, variables)
  assert f"{name}/linear/test" in row and f"{name}/knn/test" in row
  assert all(0.0 <= v <= 1.0 for k, v in row.items() if not k.endswith("bg_gap"))


def test_imagenet9_probe_scores_objectnet9_and_si_score(tiny_export, tmp_path):
  """Test-only sets are scored with the ImageNet-9 probe: images identical to an ImageNet-9
  test variant's give the same accuracy; classes are matched by folder name."""
  from PIL import Image

  config, workdir = tiny_export
  rng = np.random.default_rng(1)
  classes = eval_datasets.IMAGENET9_CLASSES
  colours = rng.integers(0, 256, (9, 3))

  def image(k):  # class k: its colour plus noise, so a probe can learn it
    return np.clip(colours[k] + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)

  bg = tmp_path / "bg_challenge"
  for variant, split, n in [
      ("original", "train", 10),
      ("original", "val", 2),
      ("mixed_same", "val", 2),
      ("mixed_rand", "val", 2),
      ("only_fg", "val", 2),
  ]:
    for k, name in enumerate(classes):
      d = bg / variant / split / name
      d.mkdir(parents=True)
      for i in range(n):
        Image.fromarray(image(k)).save(d / f"{i}.png")
  # ObjectNet-9: a copy of original/val with the classes in another folder order on disk.
  for k, name in enumerate(classes):
    src = bg / "original" / "val" / name
    for sub in (tmp_path / "objectnet9" / name, tmp_path / "si" / "rotation" / name):
      sub.mkdir(parents=True)
      for f in src.iterdir():
        (sub / f.name).write_bytes(f.read_bytes())
  c = config.copy_and_resolve_references()
  c.evaluation.datasets = ("objectnet9", "si_score", "imagenet9")
  c.evaluation.folders.imagenet9 = str(bg)
  c.evaluation.folders.objectnet9 = str(tmp_path / "objectnet9")
  c.evaluation.folders.si_score = str(tmp_path / "si")
  module, variables = export.load_model(workdir)[:2]
  row = evaluate.evaluate_encoder(c, module, variables)
  for proto in ("linear", "knn"):
    assert row[f"objectnet9/{proto}/test"] == row[f"imagenet9/{proto}/original"]
    assert row[f"si_score/{proto}/rotation"] == row[f"imagenet9/{proto}/original"]
  assert row["imagenet9/linear/original"] > 0.5  # colours are learnable: far above 1/9
  assert "imagenet9/linear/bg_gap" in row
