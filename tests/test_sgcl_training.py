"""SGCL through the whole training loop on scenes/tiny: the data it needs, its logs and picture."""

import os
import re

import numpy as np

from ocl_jax.data import train_data
from tests.conftest import train_two_steps


def _sgcl(config, **fields):
  config.saliency.enabled = True
  config.saliency.resolution, config.saliency.expand_res, config.saliency.map_size = 32, 1, 8
  for k, v in fields.items():
    config.saliency[k] = v
  return config


def test_train_batches_carry_each_images_position_in_the_split(tiny_config):
  c = _sgcl(tiny_config, every_k_steps=4)
  data = train_data.create_train_data(c)
  assert data.with_index and data.index_size == data.num_examples
  seen = []
  for _, batch in zip(range(data.steps_per_epoch), data.iterate(0)):
    seen.append(batch["index"].reshape(-1))
  seen = np.concatenate(seen)
  # One epoch: distinct positions of the split, in shuffled order.
  assert len(set(seen.tolist())) == len(seen) and seen.min() >= 0 and seen.max() < data.num_examples
  assert not np.array_equal(seen, np.sort(seen))


def test_sgcl_run_logs_weights_refreshes_coverage_and_draws_its_crops(
    tiny_config, tmp_path, caplog
):
  c = _sgcl(
      tiny_config,
      every_k_steps=2,
      num_local_crops=1,
      local_crop_size=16,
      coverage_masks="gt",
      picture_images=4,
  )
  state, log = train_two_steps(c, tmp_path, caplog)
  assert "Online saliency: one refresh takes" in log
  line = [s for s in log.splitlines() if "sgcl_weight_entropy" in s][-1]
  values = {k: float(v) for k, v in re.findall(r"(\w+)=([-0-9.e]+)", line)}
  assert abs(values["sgcl_weight_mean"] - 1.0) < 1e-4
  assert values["sgcl_weight_min"] <= 1.0 <= values["sgcl_weight_max"]
  assert 0.0 < values["sgcl_weight_entropy"] <= 1.0
  assert -1.0 <= values["sgcl_score_coverage_spearman"] <= 1.0
  assert values["saliency_refreshed"] == 1.0  # both steps see images the bank has no map of
  assert os.path.getsize(tmp_path / "saliency.png") > 0
  stamp = np.asarray(state.saliency_stamp)
  assert stamp.shape == (state.saliency_bank.shape[0],) and set(np.unique(stamp)) <= {-1, 0, 1}
