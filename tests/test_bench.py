"""The benchmark (ocl_jax/tools/bench.py) and its PyTorch reference (tools/torch_reference.py).

The quick bench runs as users run it (a subprocess, 2 CPU devices) on a subset of
cases; every train case's synthetic batch is checked against the real input
pipeline's, so the full bench feeds each step what training feeds it.
"""

import json
import os
import pathlib
import subprocess
import sys

# PyTorch's OpenMP threads spin at barriers by default, which on a busy CPU makes the tiny
# reference steps below take seconds (see bench.prepare_environment); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ocl_jax import models  # noqa: E402
from ocl_jax.tools import bench

REPO = pathlib.Path(__file__).resolve().parents[1]
HAS_TORCH = bench.torch_available()


def _quick_base():
  return bench.base_config(bench.parse_args(["--quick"]))


def test_matmul_and_resnet_flops_match_xla_cost_analysis():
  n = 128
  a = jnp.ones((n, n), jnp.float32)
  assert bench.xla_flops(jax.jit(jnp.dot).lower(a, a).compile()) == pytest.approx(
      2 * n**3, rel=1e-3
  )
  # A ResNet forward: XLA counts the convolutions (the analytic count, padding excluded) plus
  # a few percent of BN, ReLU and pooling; the second is the demo's network.
  for arch, width, small_stem, size in (("resnet10", 8, True, 32), ("resnet18", 32, False, 96)):
    stages, block = models.ARCHITECTURES[arch]
    net = models.ResNet(stages, block, width, small_stem, axis_name=None)
    x = jnp.zeros((2, size, size, 3))
    v = models.random_variables(net, x)
    xla = bench.xla_flops(jax.jit(lambda v, x: net.apply(v, x, train=False)).lower(v, x).compile())
    analytic = 2 * bench.resnet_forward_flops(arch, width, small_stem, size)
    assert analytic <= xla <= 1.06 * analytic, (arch, xla / analytic)


def test_every_train_case_is_a_valid_config_and_selectable():
  from ocl_jax.configuration import validate_config

  base = _quick_base()
  train, cams, peak, inp, feats, skipped = bench.select("all", "saliency" in base)
  assert set(train) | set(skipped) == set(bench.TRAIN_CASES) and set(cams) == set(bench.CAM_CASES)
  assert peak and inp and feats
  for name in train:
    validate_config(bench.case_config(base, bench.TRAIN_CASES[name]))
  train, _, _, _, _, skipped = bench.select("train", sgcl_available=False)
  assert "moco+sgcl" not in train and "moco+sgcl" in skipped
  with pytest.raises(SystemExit, match="unknown"):
    bench.select("mocco", True)


def test_set_overrides_config_fields_such_as_placeholder_paths():
  """configs/in9.py's shapes with its data paths filled in: what the synthetic cases need."""
  from ocl_jax.configuration import validate_config

  config = str(pathlib.Path(__file__).parents[1] / "configs" / "in9.py")
  args = bench.parse_args(
      ["--config", config, "--set", "dataset.name=scenes/small", "--set=batch_size=128"]
      + ["--set", "evaluation.folders.imagenet9=unused", "--set", "model.proj_batch_norm=False"]
  )
  c = bench.base_config(args)
  assert c.dataset.name == "scenes/small" and c.batch_size == 128
  assert c.model.proj_batch_norm is False and c.model.arch == "resnet50"
  validate_config(c)
  with pytest.raises(SystemExit, match="KEY=VALUE"):
    bench.base_config(bench.parse_args(["--set", "batch_size"]))


def test_synthetic_batches_match_the_input_pipeline(scenes_data_dir):
  """Every train case's synthetic batch has the keys, shapes and dtypes the pipeline yields."""
  from ocl_jax.data import train_data

  base = _quick_base()
  base.dataset.name, base.dataset.data_dir = "scenes/tiny", scenes_data_dir
  train, *_ = bench.select("train", "saliency" in base)
  n_dev = jax.local_device_count()
  for name in train:
    config = bench.case_config(base, bench.TRAIN_CASES[name])
    real = next(train_data.create_train_data(config).iterate(0))
    fake = bench.synthetic_batch(config, n_dev, 0)
    assert sorted(fake) == sorted(real), name
    for k in real:
      assert fake[k].shape == real[k].shape and fake[k].dtype == real[k].dtype, (name, k)


def test_quick_bench_cli_writes_json_and_table(tmp_path, scenes_data_dir):
  cases = "peak,moco,contracam_T10_x1,features,input"
  out, table = tmp_path / "bench.json", tmp_path / "bench.md"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "ocl_jax.tools.bench",
          "--quick",
          f"--cases={cases}",
          f"--out={out}",
          f"--table={table}",
          f"--data_dir={scenes_data_dir}",
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  by_name = {r["name"]: r for r in result["results"]}
  # Two devices: the step is pmapped over both, ContraCAM also runs split over them (@pmap).
  assert len(result["machine"]["devices"]) == 2
  expected = {
      "matmul_256",
      "moco",
      "moco/views",
      "contracam_T10_x1",
      "contracam_T10_x1@pmap",
      "features",
      "input_pipeline",
      "moco+input",
  }
  assert expected <= set(by_name)
  peak = result["peak_gflops"]
  assert peak > 0 and result["machine"]["jax"] == jax.__version__
  for name in expected - {"matmul_256"}:
    r = by_name[name]
    assert np.isfinite(r["images_per_s"]) and r["images_per_s"] > 0, name
    assert len(r["times"]) >= 1 and all(t > 0 for t in r["times"])
    assert r["images_per_s"] == pytest.approx(r["images_per_call"] / r["seconds_per_call"])
  for name in ("moco", "contracam_T10_x1", "contracam_T10_x1@pmap", "features"):
    r = by_name[name]
    assert r["flops_source"] == "xla" and r["flops_per_call"] > 0
    assert r["gflops_per_s"] == pytest.approx(r["flops_per_call"] / r["seconds_per_call"] / 1e9)
    assert 0 < r["peak_fraction"] == pytest.approx(r["gflops_per_s"] / peak)
  assert by_name["moco"]["extra"]["loss_finite"]
  # The T-step ContraCAM costs T forwards (+ the small head gradient, maps and masks): 10x a
  # forward's analytic count and a little more.
  t10 = by_name["contracam_T10_x1"]
  forward = t10["extra"]["analytic_forward_flops_per_iteration"]
  assert 10 * forward <= t10["flops_per_call"] <= 10 * 1.3 * forward
  fed = by_name["moco+input"]["extra"]
  assert 0 <= fed["input_wait_fraction"] <= 1 and 0 <= fed["device_idle_fraction"] <= 1
  assert by_name["contracam_T10_x1@pmap"]["flops_per_call"] == t10["flops_per_call"]
  if HAS_TORCH:
    for name in ("moco", "moco/views", "contracam_T10_x1", "contracam_T10_x1@pmap"):
      r = by_name[name]
      ref = by_name[f"torch:{name.removesuffix('@pmap').removesuffix('/views')}"]
      assert r["reference_images_per_s"] == pytest.approx(ref["images_per_s"])
      assert r["ratio"] == pytest.approx(r["images_per_s"] / r["reference_images_per_s"])
  text = table.read_text()
  assert text == result["table"] + "\n"
  for name in expected:
    assert f"| {name} |" in text


def test_profile_attributes_time_to_convolutions():
  """The per-op profile labels a network's convolutions (forward and backward) from the HLO."""
  net = models.ContrastiveNet(
      arch="resnet10", width=4, small_stem=True, proj_hidden_dim=8, proj_dim=4, axis_name=None
  )
  x = jnp.ones((4, 16, 16, 3))
  v = models.random_variables(net, x)
  loss = lambda p: net.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"])[0][
      "embedding"
  ].sum()
  compiled = jax.jit(jax.grad(loss)).lower(v["params"]).compile()
  index = bench.hlo_index(compiled.as_text())
  cats = {bench.op_category(names, opcode) for opcode, names in index.values()}
  assert "network forward: convolutions" in cats and "network backward: convolutions" in cats
  assert bench.op_category(["jit(f)/psum"], "all-reduce").startswith("cross-device")


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed (optional extra `reference`)")
@pytest.mark.parametrize(
    "arch,small_stem,expand_res",
    [("resnet10", True, 1), ("resnet18", False, 2), ("resnet50", False, 1)],
)
def test_torch_reference_is_the_same_network(arch, small_stem, expand_res):
  """ocl_jax weights loaded into the PyTorch reference give the same map and embedding."""
  import torch
  from ocl_jax.interop import pytorch
  from ocl_jax.tools import torch_reference as tr

  width, size = 4, 32 if small_stem else 64
  net = models.ContrastiveNet(
      arch=arch,
      width=width,
      small_stem=small_stem,
      proj_hidden_dim=16,
      proj_dim=8,
      expand_res=expand_res,
      axis_name=None,
  )
  x = np.random.default_rng(0).standard_normal((3, size, size, 3)).astype(np.float32)
  v = jax.device_get(models.random_variables(net, jnp.asarray(x), seed=3))
  state = pytorch.to_torchvision_state_dict(
      {"params": v["params"]["encoder"], "batch_stats": v["batch_stats"]["encoder"]},
      head={"params": v["params"]["projector"], "batch_stats": v["batch_stats"]["projector"]},
  )
  ref = tr.build_net(arch, width, small_stem, 16, 8, expand_res=expand_res).eval()
  ref.load_ocl_state_dict(state)
  with torch.no_grad():
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    fmap_t = ref.feature_map(xt).numpy().transpose(0, 2, 3, 1)
    z_t = ref(xt)["embedding"].numpy()
  fmap = net.apply(v, x, train=False, method=net.feature_map)
  np.testing.assert_allclose(fmap_t, fmap, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(z_t, net.apply(v, x, train=False)["embedding"], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed (optional extra `reference`)")
def test_torch_reference_contracam_matches_ours():
  """The official-style PyTorch ContraCAM (full backward each step) gives our masks."""
  import torch
  from ocl_jax.discovery import contracam as cc
  from ocl_jax.interop import pytorch
  from ocl_jax.tools import torch_reference as tr

  spec = models.ModelSpec(
      arch="resnet10", width=8, small_stem=True, proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=0
  )
  settings = cc.CamSettings(iterations=3, expand_res=1)
  net = cc.cam_network(spec, settings)
  x = np.random.default_rng(1).standard_normal((6, 32, 32, 3)).astype(np.float32)
  v = jax.device_get(models.random_variables(net, jnp.asarray(x), seed=5, shift_std=0.2))
  ours = cc.contracam(net, v, jnp.asarray(x), settings)["mask"]
  state = pytorch.to_torchvision_state_dict(
      {"params": v["params"]["encoder"], "batch_stats": v["batch_stats"]["encoder"]},
      head={"params": v["params"]["projector"], "batch_stats": v["batch_stats"]["projector"]},
  )
  ref = tr.build_net("resnet10", 8, True, 32, 16)
  ref.load_ocl_state_dict(state)
  mask = tr.contracam(ref, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), iterations=3).numpy()
  assert all(p.grad is not None for p in ref.parameters())  # the whole network was backpropagated
  np.testing.assert_allclose(mask, ours, atol=2e-3)


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed (optional extra `reference`)")
@pytest.mark.parametrize("method", ["moco", "byol", "simclr"])
def test_torch_reference_train_step_learns(method):
  import torch
  from ocl_jax.tools import torch_reference as tr

  torch.manual_seed(0)
  net = tr.build_net("resnet10", 4, True, 0, 8, pred_hidden_dim=16 if method == "byol" else 0)
  step = tr.TrainStep(method, net, lr=0.1, queue_size=16, ema=0.9)
  x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
  before = [p.detach().clone() for p in net.parameters()]
  losses = [float(step(x1, x2)) for _ in range(3)]
  assert all(np.isfinite(losses))
  assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
  if method == "moco":
    assert step.ptr == (3 * 8) % 16
