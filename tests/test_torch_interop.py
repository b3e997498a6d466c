"""torchvision state dicts <-> ocl_jax ResNets: names, layouts, round trips, MoCo files, errors.

torch is not a dependency: the layouts are checked against a torchvision-semantics
forward pass written with lax (NCHW activations, OIHW kernels), and against
torchvision itself only where torch happens to be installed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest
import safetensors

from ocl_jax import export, models
from ocl_jax.interop import pytorch
from ocl_jax.checkpointing import CheckpointMismatchError

BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _trunk(arch, width=8, small_stem=False):
  stages, block = models.ARCHITECTURES[arch]
  return models.ResNet(stages, block, width, small_stem, axis_name=None)


def _spec(arch, width=8, small_stem=False):
  d = models.feature_dim(arch, width)
  return models.ModelSpec(
      arch, width, small_stem, proj_hidden_dim=d, proj_dim=16, pred_hidden_dim=0
  )


def _images(n=2, size=64, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _model(arch, width=8, small_stem=False, seed=1):
  """A trunk with random weights and non-trivial BN statistics (random_variables)."""
  net = _trunk(arch, width, small_stem)
  return net, jax.device_get(models.random_variables(net, _images(1), seed=seed))


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def torchvision_keys(arch: str) -> list[str]:
  """torchvision's ResNet state-dict keys without fc, from its naming rules."""
  stages, block = models.ARCHITECTURES[arch]
  convs = 3 if block == "bottleneck" else 2
  bn = lambda m: [f"{m}.{f}" for f in BN_FIELDS]
  keys = ["conv1.weight", *bn("bn1")]
  for s, n in enumerate(stages, start=1):
    for i in range(n):
      for c in range(1, convs + 1):
        keys += [f"layer{s}.{i}.conv{c}.weight", *bn(f"layer{s}.{i}.bn{c}")]
      # torchvision adds a downsample where stride or channels change: first block of
      # layer2-4, and of layer1 for bottlenecks (64 -> 256 channels).
      if i == 0 and (s > 1 or block == "bottleneck"):
        keys += [f"layer{s}.0.downsample.0.weight", *bn(f"layer{s}.0.downsample.1")]
  return keys


def torch_semantics_forward(sd, x_nchw, arch, small_stem=False):
  """torchvision's ResNet.forward up to layer4 (eval BN) on a torch-layout state dict."""
  stages, block = models.ARCHITECTURES[arch]

  def conv(x, key, stride):
    w = jnp.asarray(sd[key])
    k = w.shape[-1]
    return lax.conv_general_dilated(
        x, w, (stride, stride), [(k // 2, k // 2)] * 2, dimension_numbers=("NCHW", "OIHW", "NCHW")
    )

  def bn(x, m):
    c = lambda f: jnp.asarray(sd[f"{m}.{f}"])[None, :, None, None]
    return (x - c("running_mean")) / jnp.sqrt(c("running_var") + 1e-5) * c("weight") + c("bias")

  relu = jax.nn.relu
  if small_stem:
    x = relu(bn(conv(x_nchw, "conv1.weight", 1), "bn1"))
  else:
    x = relu(bn(conv(x_nchw, "conv1.weight", 2), "bn1"))
    x = lax.reduce_window(
        x, -jnp.inf, lax.max, (1, 1, 3, 3), (1, 1, 2, 2), [(0, 0), (0, 0), (1, 1), (1, 1)]
    )
  for s, n in enumerate(stages, start=1):
    for i in range(n):
      p = f"layer{s}.{i}"
      stride = 2 if s > 1 and i == 0 else 1
      if block == "basic":
        y = relu(bn(conv(x, f"{p}.conv1.weight", stride), f"{p}.bn1"))
        y = bn(conv(y, f"{p}.conv2.weight", 1), f"{p}.bn2")
      else:  # v1.5: stride on the 3x3
        y = relu(bn(conv(x, f"{p}.conv1.weight", 1), f"{p}.bn1"))
        y = relu(bn(conv(y, f"{p}.conv2.weight", stride), f"{p}.bn2"))
        y = bn(conv(y, f"{p}.conv3.weight", 1), f"{p}.bn3")
      if f"{p}.downsample.0.weight" in sd:
        x = bn(conv(x, f"{p}.downsample.0.weight", stride), f"{p}.downsample.1")
      x = relu(x + y)
  return x


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_safetensors_round_trip_is_bit_exact(arch, tmp_path):
  net, variables = _model(arch)
  path = pytorch.export_torchvision_safetensors(
      variables, tmp_path / f"{arch}.safetensors", spec=_spec(arch)
  )
  with safetensors.safe_open(path, framework="np") as f:
    meta = f.metadata()
  assert meta["arch"] == arch and meta["width"] == "8" and meta["small_stem"] == "false"
  assert meta["format"] == "pt" and meta["head"] == "none"
  assert meta["torchvision_equivalent"].startswith("none: width 8")
  module, imported = pytorch.import_torchvision_state_dict(path)  # arch and width inferred
  assert (module.stage_sizes, module.block, module.width, module.small_stem) == (
      net.stage_sizes,
      net.block,
      8,
      False,
  )
  _assert_trees_equal(imported, variables)
  # Given explicitly, the description is checked and gives the same result.
  _, again = pytorch.import_torchvision_state_dict(path, arch=arch, width=8, small_stem=False)
  _assert_trees_equal(again, variables)


@pytest.mark.parametrize("arch,num_params", [("resnet18", 11_176_512), ("resnet50", 23_508_032)])
def test_exported_keys_and_shapes_are_torchvisions(arch, num_params):
  shapes = jax.eval_shape(
      lambda: _trunk(arch, 64).init(jax.random.PRNGKey(0), _images(1), train=False)
  )
  sd = pytorch.to_torchvision_state_dict(
      jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  )
  expected = torchvision_keys(arch)
  assert len(expected) == {"resnet18": 122, "resnet50": 320}[arch] - 2  # len(state_dict()) minus fc
  assert sorted(sd) == sorted(expected)
  assert not any(k.startswith("fc") for k in sd)
  # Parameters (not buffers) add up to torchvision's count without fc.
  buffers = ("running_mean", "running_var", "num_batches_tracked")
  assert sum(v.size for k, v in sd.items() if not k.endswith(buffers)) == num_params
  assert sd["conv1.weight"].shape == (64, 3, 7, 7) and sd["bn1.running_var"].shape == (64,)
  assert (
      sd["layer1.0.bn1.num_batches_tracked"].shape == ()
      and sd["bn1.num_batches_tracked"].dtype == np.int64
  )
  if arch == "resnet50":
    assert sd["layer1.0.conv1.weight"].shape == (64, 64, 1, 1)
    assert sd["layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["layer4.0.conv2.weight"].shape == (512, 512, 3, 3)
    assert sd["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert sd["layer4.0.downsample.1.running_mean"].shape == (2048,)
  else:
    assert sd["layer2.0.conv1.weight"].shape == (128, 64, 3, 3)
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert sd["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)


@pytest.mark.parametrize(
    "arch,small_stem", [("resnet18", False), ("resnet50", False), ("resnet10", True)]
)
def test_layouts_give_the_same_features_under_torch_semantics(arch, small_stem):
  net, variables = _model(arch, small_stem=small_stem)
  x = _images(2, 32 if small_stem else 64)
  apply = jax.jit(lambda v, x: net.apply(v, x, train=False))  # jit: faster than eager here
  expected = np.asarray(apply(variables, x))
  sd = pytorch.to_torchvision_state_dict(variables)
  reference = jax.jit(lambda sd, x: torch_semantics_forward(sd, x, arch, small_stem))
  got = np.asarray(reference(sd, x.transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(got.transpose(0, 2, 3, 1), expected, rtol=1e-4, atol=1e-5)
  # Imported back, the module computes exactly the original features.
  module, imported = pytorch.import_torchvision_state_dict(sd)
  assert (module.stage_sizes, module.block, module.width, module.small_stem) == (
      net.stage_sizes,
      net.block,
      net.width,
      small_stem,
  )
  np.testing.assert_array_equal(np.asarray(apply(imported, x)), expected)


def test_moco_checkpoint_layout_loads(tmp_path, caplog):
  _, variables = _model("resnet18", seed=3)
  sd = pytorch.to_torchvision_state_dict(variables)
  rng = np.random.default_rng(0)
  moco = {f"module.encoder_q.{k}": v for k, v in sd.items()}
  moco.update(
      {
          "module.encoder_q.fc.0.weight": rng.normal(size=(64, 64)).astype(np.float32),
          "module.encoder_q.fc.0.bias": np.zeros(64, np.float32),
          "module.encoder_q.fc.2.weight": rng.normal(size=(16, 64)).astype(np.float32),
          "module.encoder_q.fc.2.bias": np.zeros(16, np.float32),
      }
  )
  moco.update({f"module.encoder_k.{k}": v + 1 for k, v in sd.items() if v.dtype == np.float32})
  moco.update(
      {"module.queue": np.zeros((16, 32), np.float32), "module.queue_ptr": np.zeros(1, np.int64)}
  )
  checkpoint = {
      "epoch": 200,
      "arch": "resnet18",
      "state_dict": moco,
  }  # main_moco.py's save_checkpoint
  with caplog.at_level(logging.INFO):
    module, imported = pytorch.import_torchvision_state_dict(checkpoint, arch="resnet18")
  _assert_trees_equal(imported, variables)  # the query encoder, not encoder_k
  assert "under 'module.encoder_q.'" in caplog.text
  assert "projector module.encoder_q.fc.*: Linear(bias)-ReLU-Linear" in caplog.text
  # A file whose every key carries the prefixes (an encoder_q-only release) loads too.
  path = str(tmp_path / "moco.safetensors")
  from safetensors.numpy import save_file

  save_file({k: v for k, v in moco.items() if k.startswith("module.encoder_q.")}, path)
  _, from_file = pytorch.import_torchvision_state_dict(path)
  _assert_trees_equal(from_file, variables)
  # So do {'model': ...} wrappers and backbone. prefixes (detection checkpoints).
  _, wrapped = pytorch.import_torchvision_state_dict(
      {"model": {f"backbone.{k}": v for k, v in sd.items()}}
  )
  _assert_trees_equal(wrapped, variables)


def test_wrong_architecture_keys_and_shapes_are_clear_errors(tmp_path):
  _, variables = _model("resnet18")
  path = pytorch.export_torchvision_safetensors(
      variables, tmp_path / "r18.safetensors", spec=_spec("resnet18")
  )
  with pytest.raises(
      CheckpointMismatchError,
      match=r"r18\.safetensors holds a resnet18.*not the requested resnet50",
  ):
    pytorch.import_torchvision_state_dict(path, arch="resnet50")
  with pytest.raises(
      CheckpointMismatchError,
      match=r"conv1\.weight has shape \(8, 3, 7, 7\).*expects \(16, 3, 7, 7\)",
  ):
    pytorch.import_torchvision_state_dict(path, width=16)
  with pytest.raises(CheckpointMismatchError, match=r"conv1\.weight.*expects \(8, 3, 3, 3\)"):
    pytorch.import_torchvision_state_dict(path, small_stem=True)
  sd = pytorch.to_torchvision_state_dict(variables)
  missing = {k: v for k, v in sd.items() if k != "layer2.1.conv2.weight"}
  with pytest.raises(CheckpointMismatchError, match=r"missing \['layer2\.1\.conv2\.weight'\]"):
    pytorch.import_torchvision_state_dict(missing)
  with pytest.raises(
      CheckpointMismatchError, match=r"unexpected \['layer3\.0\.attention\.weight'\]"
  ):
    pytorch.import_torchvision_state_dict(
        {**sd, "layer3.0.attention.weight": np.zeros(3, np.float32)}
    )
  bad = {**sd, "layer3.0.bn1.running_var": np.ones(7, np.float32)}
  with pytest.raises(
      CheckpointMismatchError,
      match=r"layer3\.0\.bn1\.running_var has shape \(7,\).*expects \(32,\)",
  ):
    pytorch.import_torchvision_state_dict(bad)
  deeper = {**sd, "layer2.2.conv1.weight": sd["layer2.1.conv1.weight"]}  # 3 blocks in layer2
  with pytest.raises(CheckpointMismatchError, match=r"blocks per stage \(2, 3, 2, 2\)"):
    pytorch.import_torchvision_state_dict(deeper)
  with pytest.raises(CheckpointMismatchError, match="no 'conv1.weight'"):
    pytorch.import_torchvision_state_dict({"weight": np.zeros(3)})


def test_truncated_or_corrupt_safetensors_name_the_file(tmp_path):
  _, variables = _model("resnet10")
  path = pytorch.export_torchvision_safetensors(
      variables, tmp_path / "model.safetensors", spec=_spec("resnet10")
  )
  data = open(path, "rb").read()
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(data[: len(data) // 2])
  with pytest.raises(
      ValueError,
      match=r"truncated\.safetensors: cannot read it as safetensors.*truncated or corrupt",
  ):
    pytorch.import_torchvision_state_dict(str(truncated))
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match=r"garbage\.safetensors"):
    pytorch.import_torchvision_state_dict(str(garbage))
  with pytest.raises(FileNotFoundError, match="absent.safetensors"):
    pytorch.import_torchvision_state_dict(str(tmp_path / "absent.safetensors"))


def test_pth_without_torch_is_a_clear_error(tmp_path):
  if importlib.util.find_spec("torch") is not None:
    pytest.skip("torch is installed")
  path = tmp_path / "checkpoint.pth.tar"
  path.write_bytes(b"\x80\x02}q\x00.")
  with pytest.raises(ImportError, match=r"checkpoint\.pth\.tar needs PyTorch"):
    pytorch.import_torchvision_state_dict(str(path))


def test_import_to_export_loads_with_load_model(tmp_path):
  net, variables = _model("resnet18", seed=5)
  path = pytorch.export_torchvision_safetensors(
      variables, tmp_path / "r18.safetensors", spec=_spec("resnet18")
  )
  export_dir = pytorch.import_to_export(path, tmp_path / "export")
  module, loaded, _, meta, _ = export.load_model(export_dir)
  assert meta["model"]["arch"] == "resnet18" and meta["model"]["width"] == 8
  assert meta["imported_from"]["has_head"] is False and not os.path.exists(
      os.path.join(export_dir, "head")
  )
  _assert_trees_equal(jax.tree_util.tree_map(np.asarray, loaded), variables)
  x = _images(2)
  np.testing.assert_array_equal(
      np.asarray(module.apply(loaded, x, train=False)),
      np.asarray(net.apply(variables, x, train=False)),
  )
  with pytest.raises(CheckpointMismatchError, match="no projector"):
    export.load_model(export_dir, head=True)


@pytest.mark.parametrize("proj_batch_norm", [True, False])
def test_projector_round_trips_through_fc_sequential(tmp_path, proj_batch_norm):
  """An export with head/ -> safetensors (include_head) -> export that ContraCAM can load; without
  BatchNorm the projector is written in MoCo v2's fc.0/fc.2 layout."""
  spec = models.ModelSpec(
      "resnet10", 4, True, 32, 8, pred_hidden_dim=0, proj_batch_norm=proj_batch_norm
  )
  net = spec.build(axis_name=None)
  x = _images(2, 32)
  v = jax.device_get(models.random_variables(net, x, seed=7))
  src = export.export_encoder(str(tmp_path / "src"), v["params"], v["batch_stats"], spec)
  path = pytorch.export_torchvision_safetensors(
      src, tmp_path / "with_head.safetensors", include_head=True
  )
  with safetensors.safe_open(path, framework="np") as f:
    keys, meta = set(f.keys()), f.metadata()
  assert keys - set(torchvision_keys("resnet10")) == (
      {"fc.0.weight", *(f"fc.1.{b}" for b in BN_FIELDS), "fc.3.weight", "fc.3.bias"}
      if proj_batch_norm
      else {"fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"}
  )
  assert ("BatchNorm1d" in meta["head"]) == proj_batch_norm
  assert meta["small_stem"] == "true" and meta["torchvision_equivalent"].startswith(
      "none: small stem"
  )
  assert json.loads(meta["stage_sizes"]) == [1, 1, 1, 1]
  dst = pytorch.import_to_export(path, tmp_path / "dst")
  net2, v2, spec2 = export.load_model(dst, head=True)[:3]
  assert spec2 == spec
  _assert_trees_equal(jax.tree_util.tree_map(np.asarray, v2), v)
  np.testing.assert_array_equal(
      np.asarray(net2.apply(v2, x, train=False)["embedding"]),
      np.asarray(net.apply(v, x, train=False)["embedding"]),
  )
  # Without include_head the same export gives the encoder only.
  plain = pytorch.export_torchvision_safetensors(src, tmp_path / "plain.safetensors")
  with safetensors.safe_open(plain, framework="np") as f:
    assert set(f.keys()) == set(torchvision_keys("resnet10"))


def test_against_torchvision_when_torch_is_installed(tmp_path):
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  net, variables = _model("resnet18", width=64)
  sd = pytorch.to_torchvision_state_dict(variables)
  tv = torchvision.models.resnet18()
  assert sorted(sd) == sorted(k for k in tv.state_dict() if not k.startswith("fc."))
  result = tv.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
  assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
  tv.eval()
  x = _images(2)
  trunk = torch.nn.Sequential(*list(tv.children())[:-2])
  with torch.no_grad():
    got = trunk(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(
      got.transpose(0, 2, 3, 1),
      np.asarray(net.apply(variables, x, train=False)),
      rtol=1e-4,
      atol=1e-4,
  )
  # A MoCo-style .pth.tar through torch.load(weights_only=True).
  path = str(tmp_path / "moco.pth.tar")
  torch.save(
      {"epoch": 1, "state_dict": {f"module.encoder_q.{k}": v for k, v in tv.state_dict().items()}},
      path,
  )
  _, imported = pytorch.import_torchvision_state_dict(path)
  _assert_trees_equal(imported, variables)


def test_relative_and_home_paths(tmp_path, monkeypatch):
  """Every path argument may be relative to the current directory or start with ~."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  net, variables = _model("resnet18", seed=5)
  path = pytorch.export_torchvision_safetensors(
      variables, "out/r18.safetensors", spec=_spec("resnet18")
  )
  assert path == str(tmp_path / "out" / "r18.safetensors") and os.path.exists(path)
  export_dir = pytorch.import_to_export("out/r18.safetensors", "~/exports/r18")
  assert export_dir == str(tmp_path / "home" / "exports" / "r18")
  _, loaded, _, meta, _ = export.load_model("~/exports/r18")
  assert meta["imported_from"]["source"] == path
  _, again = pytorch.import_torchvision_state_dict("out/r18.safetensors")
  again_path = pytorch.export_torchvision_safetensors("~/exports/r18", "~/again.safetensors")
  assert again_path == str(tmp_path / "home" / "again.safetensors")
  _assert_trees_equal(jax.tree_util.tree_map(np.asarray, loaded), variables)
