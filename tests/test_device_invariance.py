"""The same global batch on 1, 2 and 4 devices gives the same losses and updates, for every
method and augmentation the config allows (BG-mixup and Mixup / CutMix donors included).

The default suite runs MoCo with BG-mixup and Mixup together (both draw donors from the global
batch); every other combination is marked slow (each compiles its step three times):
`python -m pytest -m slow tests/test_device_invariance.py` runs them all.
"""

import functools

import jax
import numpy as np
import pytest

from ocl_jax import parallel
from ocl_jax import train
from tests.test_train_step import tiny_config

AUGMENTATIONS = {
    "plain": {},
    "oacrop": {"object_aware.crop": True},
    "bgmix": {"bg_mixup.enabled": True, "bg_mixup.prob": 0.7},
    "mixup": {"mix.kind": "mixup"},
    "cutmix": {"mix.kind": "cutmix"},
    # Both donor-drawing augmentations at once: the default suite's one (1, 2, 4)-device run.
    "bgmix+mixup": {"bg_mixup.enabled": True, "bg_mixup.prob": 0.7, "mix.kind": "mixup"},
    "sgcl": {"saliency.enabled": True, "saliency.gamma": 1.0, "saliency.crop_temperature": 1.0},
    "sgcl_local": {
        "saliency.enabled": True,
        "saliency.gamma": 1.0,
        "saliency.crop_temperature": 1.0,
        "saliency.num_local_crops": 2,
    },
}
MOCO_ONLY = ("mixup", "cutmix", "bgmix+mixup")
IN_DEFAULT_SUITE = {("moco", "bgmix+mixup")}
STEPS = 3


def case_config(method, augmentation):
  sgcl = ()
  fields = dict(AUGMENTATIONS[augmentation])
  if fields.get("saliency.enabled"):
    sgcl = tuple((k.split(".", 1)[1], v) for k, v in fields.items() if k != "saliency.enabled")
    fields = {}
  c = tiny_config(method, sgcl)
  for field, value in fields.items():
    section, key = field.split(".")
    c[section][key] = value
  c.bg_mixup.fifo_size = 4  # small: the FIFO fills and wraps within the steps
  return c


def random_batch(n, size, seed):
  rng = np.random.default_rng(seed)
  batch = {
      "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
      "aspect": rng.uniform(0.75, 1.33, n).astype(np.float32),
      "label": rng.integers(0, 5, n).astype(np.int32),
      "index": np.arange(n, dtype=np.int32) + n * seed,
  }
  # A foreground square per image, somewhere: BG-mixup finds a background strip beside it.
  mask = np.zeros((n, size, size), np.uint8)
  corners = rng.integers(0, size // 2, (n, 2))
  for i, (r, c) in enumerate(corners):
    mask[i, r : r + size // 2, c : c + size // 2] = 255
  batch["fg_mask"] = mask
  lo = rng.uniform(0.0, 0.4, (n, 2, 2))
  batch["boxes"] = np.concatenate([lo, lo + rng.uniform(0.3, 0.6, (n, 2, 2))], -1).clip(0, 1)
  batch["boxes"] = batch["boxes"].astype(np.float32)
  batch["box_valid"] = np.stack([np.ones(n, bool), rng.uniform(size=n) < 0.5], 1)
  return batch


def run_steps(config, num_devices):
  ctx = train.make_context(config, 10, num_classes=5, num_examples=8 * STEPS)
  devices = jax.local_devices()[:num_devices]
  p_step = jax.pmap(
      functools.partial(train.train_step, ctx=ctx), axis_name=parallel.AXIS, devices=devices
  )
  state = parallel.replicate(train.create_train_state(0, config, ctx), devices)
  keep = ["image", "aspect", "label", "index"]
  keep += ["fg_mask"] if config.bg_mixup.enabled else []
  keep += ["boxes", "box_valid"] if config.object_aware.crop else []
  losses, metrics = [], []
  for s in range(STEPS):
    batch = random_batch(config.batch_size, config.dataset.image_size, s)
    batch = {k: batch[k].reshape((num_devices, -1) + batch[k].shape[1:]) for k in keep}
    state, m = p_step(state, batch)
    losses.append(float(m["loss"][0]))
    metrics.append(parallel.unreplicate(m))
  # Every device holds the same state (replicated parts, the BG-mixup FIFO included).
  for leaf in jax.tree_util.tree_leaves(jax.device_get(state)):
    for d in range(1, num_devices):
      np.testing.assert_array_equal(leaf[d], leaf[0])
  return parallel.unreplicate(state), losses, metrics


def cases():
  for method in ("moco", "byol", "simclr"):
    for augmentation in AUGMENTATIONS:
      if augmentation in MOCO_ONLY and method != "moco":
        continue
      marks = () if (method, augmentation) in IN_DEFAULT_SUITE else (pytest.mark.slow,)
      yield pytest.param(method, augmentation, marks=marks, id=f"{method}-{augmentation}")


@pytest.mark.parametrize("method, augmentation", list(cases()))
def test_one_two_and_four_devices_agree(method, augmentation):
  config = case_config(method, augmentation)
  state1, losses1, metrics1 = run_steps(config, 1)
  for n in (2, 4):
    state, losses, metrics = run_steps(config, n)
    np.testing.assert_allclose(losses, losses1, rtol=1e-4, err_msg=f"{n} devices")
    for name in ("params", "batch_stats", "target_params", "queue", "bg_fifo", "saliency_bank"):
      jax.tree_util.tree_map(
          lambda x, y: np.testing.assert_allclose(
              np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=2e-3, atol=2e-5
          ),
          getattr(state1, name),
          getattr(state, name),
      )
    for m1, m in zip(metrics1, metrics):
      for k in m1:
        if k.startswith("bg_mixup/"):  # the counts of mixed / FIFO-drawn images agree exactly
          assert float(m[k]) == pytest.approx(float(m1[k]), abs=1e-6), k
  if "bgmix" in augmentation:
    assert sum(float(m["bg_mixup/mixed"]) for m in metrics1) > 0
    assert sum(float(m["bg_mixup/from_fifo"]) for m in metrics1) > 0
