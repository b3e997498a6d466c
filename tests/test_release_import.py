"""Published PyTorch checkpoints with their projectors: the release's, MoCo v2's and BYOL-style.

Each checkpoint is built here with its real key names and torch layouts (an ocl_jax model
written with `to_torchvision_state_dict` and renamed; projectors transposed by hand), then
imported. The imported projector is checked against a NumPy forward of the raw torch arrays,
and ContraCAM on the import against ContraCAM on the source model.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from ocl_jax import export, models
from ocl_jax.checkpointing import CheckpointMismatchError
from ocl_jax.discovery import contracam as cc
from ocl_jax.interop import pytorch

BN_EPS = 1e-5
CAM = cc.CamSettings(iterations=2, official_score=True)


def _source(arch, proj_hidden_dim, proj_dim, proj_batch_norm=True, seed=3):
  """A seeded ocl_jax ContrastiveNet (small stem, width 4) and its host variables."""
  spec = models.ModelSpec(
      arch, 4, True, proj_hidden_dim, proj_dim, 0, proj_batch_norm=proj_batch_norm
  )
  net = spec.build(axis_name=None)
  v = models.random_variables(net, _images(), seed=seed, shift_std=0.2)
  return spec, net, jax.tree_util.tree_map(np.asarray, jax.device_get(v))


def _images(n=4, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)


def _trunk_state(v):
  """The encoder in torchvision names and layouts."""
  return pytorch.to_torchvision_state_dict(
      {"params": v["params"]["encoder"], "batch_stats": v["batch_stats"]["encoder"]}
  )


def _torch_projector(v, first_bias=None):
  """The projector as torch's nn.Sequential keys (0 Linear, 1 BatchNorm1d, 3 Linear, or without
  BatchNorm 0 Linear(bias), 2 Linear), transposed here by hand."""
  p = v["params"]["projector"]
  if "bn1" not in p:
    return {
        "0.weight": p["fc1"]["kernel"].T.copy(),
        "0.bias": p["fc1"]["bias"],
        "2.weight": p["fc2"]["kernel"].T.copy(),
        "2.bias": p["fc2"]["bias"],
    }
  s = v["batch_stats"]["projector"]["bn1"]
  out = {
      "0.weight": p["fc1"]["kernel"].T.copy(),
      "1.weight": p["bn1"]["scale"],
      "1.bias": p["bn1"]["bias"],
      "1.running_mean": s["mean"],
      "1.running_var": s["var"],
      "1.num_batches_tracked": np.array(1000, np.int64),
      "3.weight": p["fc2"]["kernel"].T.copy(),
      "3.bias": p["fc2"]["bias"],
  }
  if first_bias is not None:  # Linear(bias) before BN (BYOL ports): BN's running mean moves too
    out["0.bias"] = first_bias
    out["1.running_mean"] = s["mean"] + first_bias
  return out


def np_projector(features, arrays):
  """The torch projector on pooled features, from its raw arrays, then F.normalize."""
  a = {k: np.asarray(x, np.float64) for k, x in arrays.items()}
  h = features @ a["0.weight"].T + a.get("0.bias", 0.0)
  last = "2"
  if "1.weight" in a:  # BatchNorm1d in eval mode
    h = (h - a["1.running_mean"]) / np.sqrt(a["1.running_var"] + BN_EPS) * a["1.weight"]
    h, last = h + a["1.bias"], "3"
  z = np.maximum(h, 0) @ a[f"{last}.weight"].T + a[f"{last}.bias"]
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def _check_embedding_against_numpy(net, variables, arrays, x):
  fmap = net.apply(variables, x, False, method="feature_map")
  features = np.asarray(fmap, np.float64).mean(axis=(1, 2))
  got = np.asarray(net.apply(variables, x, False)["embedding"])
  np.testing.assert_allclose(got, np_projector(features, arrays), rtol=1e-5, atol=1e-6)


def _assert_same_contracam(net_a, v_a, net_b, v_b, x):
  a = cc.contracam(net_a, v_a, x, CAM)
  b = cc.contracam(net_b, v_b, x, CAM)
  for k in ("mask", "cams", "embedding"):
    np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), rtol=1e-5, atol=1e-6)
  assert float(np.asarray(a["mask"]).max()) == pytest.approx(1.0)  # a real map, not zeros


def test_release_checkpoint_imports_with_its_projector(tmp_path, caplog):
  """The release's Lightning state dict: encoder.*, projector.{0,1,3}.* (Linear(no bias)-BN-
  ReLU-Linear), plus the momentum copies _encoder.*/_projector.* and MoCo's queue."""
  spec, net, v = _source("resnet18", 32, 8)
  trunk, head = _trunk_state(v), _torch_projector(v)
  rng = np.random.default_rng(1)
  state = {f"encoder.{k}": a for k, a in trunk.items()}
  state.update({f"projector.{k}": a for k, a in head.items()})
  state.update({f"_encoder.{k}": a for k, a in trunk.items()})
  state.update({f"_projector.{k}": a for k, a in head.items()})
  state["queue"] = rng.normal(size=(16, 8)).astype(np.float32)
  path = str(tmp_path / "release_moco.safetensors")
  save_file(state, path)
  x = _images()

  with caplog.at_level(logging.WARNING):
    net2, v2, spec2 = pytorch.import_contrastive_net(path)
  assert spec2 == spec
  _check_embedding_against_numpy(net2, v2, head, x)
  _assert_same_contracam(net, v, net2, v2, x)
  expected_unused = sorted(k for k in state if k.startswith(("_encoder.", "_projector.", "queue")))
  expected_unused = [k for k in expected_unused if not k.endswith("num_batches_tracked")]
  warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  assert f"{len(expected_unused)} keys not used" in warning
  assert "_encoder.* (" in warning and "_projector.* (" in warning
  assert all(k in warning for k in expected_unused) and "num_batches_tracked" not in warning

  # The export holds the same network: load_model(head=True) at expand_res 2 equals the
  # in-memory import at expand_res 2, and model.json lists the keys not used.
  dst = pytorch.import_to_export(path, tmp_path / "export")
  loaded = export.load_model(dst, expand_res=2, head=True)
  imported_from = loaded.meta["imported_from"]
  assert imported_from["has_head"] and imported_from["unused_keys"] == expected_unused
  assert imported_from["head_prefixes"] == ["encoder.fc.", "projector."]
  net4, v4, _ = pytorch.import_contrastive_net(path, expand_res=2)
  assert loaded.spec == spec and loaded.module == net4
  np.testing.assert_array_equal(
      np.asarray(loaded.module.apply(loaded.variables, x, False)["embedding"]),
      np.asarray(net4.apply(v4, x, False)["embedding"]),
  )


@pytest.mark.parametrize("wrapped", [True, False])
def test_moco_v2_projector_without_batch_norm(tmp_path, caplog, wrapped):
  """MoCo v2's main_moco.py checkpoint (module.encoder_q.*, fc.0/fc.2 Linear(bias)-ReLU-Linear,
  encoder_k, queue), and the encoder_q-only file (prefix stripped) that many releases ship."""
  spec, net, v = _source("resnet10", 24, 8, proj_batch_norm=False, seed=4)
  sd = pytorch.to_torchvision_state_dict(
      v, head={"params": v["params"]["projector"], "batch_stats": {}}
  )
  fc = {k[3:]: a for k, a in sd.items() if k.startswith("fc.")}
  assert sorted(fc) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # MoCo v2's names
  for k, a in _torch_projector(v).items():
    np.testing.assert_array_equal(fc[k], a)
  x = _images(seed=2)
  if wrapped:
    state = {f"module.encoder_q.{k}": a for k, a in sd.items()}
    state.update({f"module.encoder_k.{k}": a for k, a in sd.items()})
    state.update({"module.queue": np.zeros((8, 16), np.float32)})
    state["module.queue_ptr"] = np.zeros(1, np.int64)
    source = {"epoch": 200, "arch": "resnet10", "state_dict": state}  # main_moco.py's
  else:
    state = source = sd
  with caplog.at_level(logging.WARNING):
    net2, v2, spec2 = pytorch.import_contrastive_net(source)
  assert spec2 == spec and not spec2.proj_batch_norm
  assert "projector" not in v2["batch_stats"]
  _check_embedding_against_numpy(net2, v2, fc, x)
  _assert_same_contracam(net, v, net2, v2, x)
  unused = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  if wrapped:
    assert len(unused) == 1 and "module.encoder_k.* (" in unused[0]
    assert "module.queue," in unused[0] and unused[0].endswith("module.queue_ptr")
  else:
    assert not unused

  dst = pytorch.import_to_export(source, tmp_path / "moco")
  loaded = export.load_model(dst, head=True)
  assert not loaded.spec.proj_batch_norm
  expected_unused = sorted(
      k
      for k in state
      if not k.startswith("module.encoder_q.") and not k.endswith("num_batches_tracked")
  )
  assert loaded.meta["imported_from"]["unused_keys"] == (expected_unused if wrapped else [])
  _check_embedding_against_numpy(loaded.module, loaded.variables, fc, x)


@pytest.mark.parametrize(
    "trunk_prefix,head_prefix,predictor,biased",
    [
        # pl_bolts BYOL (the release's base): SiameseArm encoder / projector.model / predictor.
        (
            "online_network.encoder.",
            "online_network.projector.model.",
            "online_network.predictor.model.",
            False,
        ),
        # solo-learn BYOL: backbone / projector with a biased first Linear / predictor.
        ("backbone.", "projector.", "predictor.", True),
    ],
)
def test_byol_style_checkpoints(tmp_path, trunk_prefix, head_prefix, predictor, biased):
  """BYOL ports keep the projector beside the backbone; a Linear(bias) before BatchNorm imports
  with the bias folded into BN's running mean (checked against the unfolded NumPy forward)."""
  spec, _, v = _source("resnet10", 20, 12, seed=5)
  bias = np.random.default_rng(3).normal(size=20).astype(np.float32) if biased else None
  head = _torch_projector(v, first_bias=bias)
  state = {f"{trunk_prefix}{k}": a for k, a in _trunk_state(v).items()}
  state.update({f"{head_prefix}{k}": a for k, a in head.items()})
  state[f"{predictor}0.weight"] = np.zeros((20, 12), np.float32)
  net2, v2, spec2 = pytorch.import_contrastive_net({"state_dict": state})
  assert spec2 == spec
  np.testing.assert_allclose(
      v2["batch_stats"]["projector"]["bn1"]["mean"],
      v["batch_stats"]["projector"]["bn1"]["mean"],
      rtol=1e-6,
      atol=1e-6,
  )
  _check_embedding_against_numpy(net2, v2, head, _images(seed=3))
  dst = pytorch.import_to_export({"state_dict": state}, tmp_path / "byol")
  meta = export.load_model(dst, head=True).meta["imported_from"]
  assert meta["unused_keys"] == [f"{predictor}0.weight"]
  assert f"projector under '{head_prefix}'" in meta["layout"]
  assert ("folded" in " ".join(meta["notes"])) == biased


def test_a_missing_projector_names_the_prefixes_looked_for(tmp_path):
  _, _, v = _source("resnet10", 16, 8, seed=6)
  trunk = _trunk_state(v)
  # MoCo v3's projector (Linear-BN-ReLU-Linear-BN(affine=False)) fits neither layout.
  state = {f"module.base_encoder.{k}": a for k, a in trunk.items()}
  for k, a in _torch_projector(v).items():
    state[f"module.base_encoder.fc.{k}"] = a
  state["module.base_encoder.fc.4.running_mean"] = np.zeros(8, np.float32)
  with pytest.raises(
      CheckpointMismatchError,
      match=r"no projector for ContraCAM: looked for module\.base_encoder\.fc\.\*, "
      r"module\.projector\.\*.*module\.base_encoder\.fc\.\* .*fits no projector layout",
  ):
    pytorch.import_contrastive_net(state)
  dst = pytorch.import_to_export(state, tmp_path / "v3")
  meta = export.load_model(dst).meta["imported_from"]  # the backbone still serves evaluation
  assert not meta["has_head"] and "module.base_encoder.fc.4.running_mean" in meta["unused_keys"]
  with pytest.raises(
      CheckpointMismatchError,
      match=r"has no projector \(head/\).*found none under module\.base_encoder\.fc\.\*, "
      r"module\.projector\.\*",
  ):
    export.load_model(dst, head=True)
  # A torchvision backbone alone: the error names fc.* and projector.*.
  dst = pytorch.import_to_export(trunk, tmp_path / "plain")
  with pytest.raises(CheckpointMismatchError, match=r"found none under fc\.\*, projector\.\*"):
    export.load_model(dst, head=True)
  # A projector whose input width is not the backbone's is reported, not imported.
  bad = {**trunk, **{f"fc.{k}": a for k, a in _torch_projector(v).items()}}
  bad["fc.0.weight"] = np.zeros((16, 7), np.float32)
  with pytest.raises(
      CheckpointMismatchError, match=r"fc\.0\.weight \(16, 7\) \(expected \(16, 32\)\)"
  ):
    pytorch.import_contrastive_net(bad)


def test_several_unknown_backbones_are_an_error():
  _, _, v = _source("resnet10", 16, 8, seed=7)
  trunk = _trunk_state(v)
  state = {f"student.{k}": a for k, a in trunk.items()}
  _, only = pytorch.import_torchvision_state_dict(state)  # one unknown prefix: used
  np.testing.assert_array_equal(
      only["params"]["conv1"]["kernel"], v["params"]["encoder"]["conv1"]["kernel"]
  )
  state.update({f"teacher.{k}": a for k, a in trunk.items()})
  with pytest.raises(
      CheckpointMismatchError, match=r"several ResNets, under \['student\.', 'teacher\.'\]"
  ):
    pytorch.import_torchvision_state_dict(state)
