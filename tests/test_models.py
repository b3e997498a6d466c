"""ResNet trunks and heads: shapes, parameter counts (torchvision), inits, expand_res."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ocl_jax import models


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _trunk(arch, **kw):
  stages, block = models.ARCHITECTURES[arch]
  return models.ResNet(stages, block, axis_name=None, **kw)


@pytest.mark.parametrize("arch,expected", [("resnet18", 11_176_512), ("resnet50", 23_508_032)])
def test_parameter_count_matches_torchvision(arch, expected):
  # torchvision resnet18/50 without fc (BN running stats are buffers, not parameters).
  shapes = jax.eval_shape(
      lambda: _trunk(arch).init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)
  )
  assert _count(shapes["params"]) == expected


def test_feature_map_shapes_and_expand_res():
  x = jnp.ones((2, 96, 96, 3))
  net = _trunk("resnet10", width=8)
  variables = net.init(jax.random.PRNGKey(0), x, train=False)
  assert net.apply(variables, x, train=False).shape == (2, 3, 3, 64)
  # Same parameters, finer maps: stride 1 in layer4 (x2) and in layer3 too (x4).
  for r in (2, 4):
    fmap = _trunk("resnet10", width=8, expand_res=r).apply(variables, x, train=False)
    assert fmap.shape == (2, 3 * r, 3 * r, 64)
  small = _trunk("resnet10", width=8, small_stem=True)
  v = small.init(jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 3)), train=False)
  assert small.apply(v, jnp.ones((1, 32, 32, 3)), train=False).shape == (1, 4, 4, 64)


def test_zero_init_last_bn_gamma_makes_blocks_identity_on_residual():
  params = _trunk("resnet18", width=8).init(
      jax.random.PRNGKey(0), jnp.ones((1, 64, 64, 3)), train=False
  )["params"]
  for name, block in params.items():
    if name.startswith("layer"):
      np.testing.assert_array_equal(block["bn2"]["scale"], 0.0)
      np.testing.assert_array_equal(block["bn1"]["scale"], 1.0)


def test_torch_default_init_bound():
  w = models.torch_default_init(jax.random.PRNGKey(0), (3, 3, 16, 32))
  bound = 1 / np.sqrt(3 * 3 * 16)
  assert float(jnp.max(jnp.abs(w))) <= bound
  assert float(jnp.max(jnp.abs(w))) > 0.95 * bound
  np.testing.assert_allclose(float(jnp.std(w)), bound / np.sqrt(3), rtol=0.05)


def _config(method):
  c = ml_collections.ConfigDict(
      {
          "method": method,
          "model": {
              "arch": "resnet10",
              "width": 8,
              "small_stem": False,
              "proj_hidden_dim": 0,
              "proj_dim": 16,
              "pred_hidden_dim": 32,
          },
      }
  )
  return c


def test_contrastive_net_outputs_and_predictor_only_for_byol():
  x = jnp.ones((4, 96, 96, 3))
  for method, has_pred in (("moco", False), ("simclr", False), ("byol", True)):
    spec = models.ModelSpec.from_config(_config(method))
    assert spec.proj_hidden_dim == 64  # 0 -> feature dim of resnet10 at width 8
    net = spec.build(axis_name=None)
    variables = net.init(jax.random.PRNGKey(0), x, train=False)
    assert ("predictor" in variables["params"]) == has_pred
    out = net.apply(variables, x, train=False)
    assert out["features"].shape == (4, 64)
    np.testing.assert_allclose(jnp.linalg.norm(out["embedding"], axis=-1), 1.0, rtol=1e-5)
    # embed_from_map(feature_map(x)) is the same path as __call__, for ContraCAM.
    fmap = net.apply(variables, x, train=False, method=net.feature_map)
    z = net.apply(variables, fmap, train=False, method=net.embed_from_map)
    np.testing.assert_allclose(z, out["embedding"], rtol=1e-5, atol=1e-6)


def test_projector_without_batch_norm_is_linear_relu_linear():
  """model.proj_batch_norm=False: Linear(bias)-ReLU-Linear (MoCo v2's projector), checked against
  NumPy, with torch's default bias init; the default keeps the release's fc1 (no bias), bn1, fc2."""
  x = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
  head = models.MLPHead(32, 16, axis_name=None, batch_norm=False)
  v = head.init(jax.random.PRNGKey(0), x, train=True)
  assert "batch_stats" not in v and set(v["params"]) == {"fc1", "fc2"}
  p = jax.tree_util.tree_map(np.asarray, v["params"])
  assert set(p["fc1"]) == {"kernel", "bias"}
  for name, fan_in in (("fc1", 64), ("fc2", 32)):  # nn.Linear's bias init: U(+-1/sqrt(fan_in))
    assert 0.5 * fan_in**-0.5 < np.abs(p[name]["bias"]).max() <= fan_in**-0.5
  expected = np.maximum(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
  expected = expected @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  for train in (True, False):  # no BatchNorm: the same in both modes
    np.testing.assert_allclose(head.apply(v, x, train=train), expected, rtol=1e-5, atol=1e-6)
  default = models.MLPHead(32, 16, axis_name=None).init(jax.random.PRNGKey(0), x, train=False)
  assert set(default["params"]) == {"fc1", "bn1", "fc2"} and set(default["params"]["fc1"]) == {
      "kernel"
  }
  assert set(default["batch_stats"]) == {"bn1"}
  c = _config("moco")
  c.model.proj_batch_norm = False
  spec = models.ModelSpec.from_config(c)
  assert not spec.proj_batch_norm and models.ModelSpec.from_config(_config("moco")).proj_batch_norm
  net_vars = spec.build(axis_name=None).init(
      jax.random.PRNGKey(0), jnp.ones((2, 64, 64, 3)), train=False
  )
  assert "projector" not in net_vars["batch_stats"] and "fc1" in net_vars["params"]["projector"]
  c = _config("moco")
  c.model.proj_batch_norm = "no"
  with pytest.raises(ValueError, match="config.model.proj_batch_norm: must be True or False"):
    models.ModelSpec.from_config(c)


def test_model_spec_dict_round_trip_and_specs_written_before_proj_batch_norm():
  spec = models.ModelSpec("resnet10", 8, True, 64, 16, 0, proj_batch_norm=False)
  assert spec.to_dict()["proj_batch_norm"] is False
  assert models.ModelSpec.from_dict(spec.to_dict()) == spec
  old = models.ModelSpec("resnet10", 8, True, 64, 16, 0).to_dict()
  del old["proj_batch_norm"]  # a checkpoint or export written before the field existed
  assert models.ModelSpec.from_dict(old).proj_batch_norm is True
  with pytest.raises(
      ValueError, match=r"model\.json: not a ModelSpec \(unknown fields \['depth'\]"
  ):
    models.ModelSpec.from_dict({**old, "depth": 3}, "model.json")
  del old["arch"]
  with pytest.raises(ValueError, match=r"missing \['arch'\]"):
    models.ModelSpec.from_dict(old)


def test_model_spec_rejects_unknown_arch():
  c = _config("moco")
  c.model.arch = "resnet19"
  with pytest.raises(ValueError, match="model.arch"):
    models.ModelSpec.from_config(c)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  """model.dtype='bfloat16': same parameters (float32 master weights), float32 outputs close to
  the float32 network's, float32 gradients; checkpoints record the same architecture."""
  c = _config("byol")
  c.model.dtype = "bfloat16"
  spec16 = models.ModelSpec.from_config(c)
  spec32 = models.ModelSpec.from_config(_config("byol"))
  assert spec16.dtype == "bfloat16" and spec16.to_dict() == spec32.to_dict()
  net16, net32 = spec16.build(axis_name=None), spec32.build(axis_name=None)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  variables = models.random_variables(net32, x)
  shapes16 = jax.eval_shape(lambda: net16.init(jax.random.PRNGKey(0), x, train=False))
  assert jax.tree_util.tree_structure(shapes16) == jax.tree_util.tree_structure(variables)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes16))
  out16 = jax.jit(lambda v, x: net16.apply(v, x, train=False))(variables, x)
  out32 = jax.jit(lambda v, x: net32.apply(v, x, train=False))(variables, x)
  for k in ("features", "embedding", "prediction"):
    assert out16[k].dtype == jnp.float32
  # bfloat16 keeps 8 bits of mantissa: ~1% relative error through the network.
  np.testing.assert_allclose(
      out16["features"],
      out32["features"],
      rtol=0.05,
      atol=0.05 * float(jnp.abs(out32["features"]).max()),
  )
  assert float(jnp.sum(out16["embedding"] * out32["embedding"], -1).min()) > 0.99
  loss = lambda p: net16.apply({**variables, "params": p}, x, train=True, mutable=["batch_stats"])[
      0
  ]["embedding"].sum()
  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert all(
      g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
      for g in jax.tree_util.tree_leaves(grads)
  )


def test_model_dtype_is_validated():
  c = _config("moco")
  c.model.dtype = "float16"
  with pytest.raises(ValueError, match="model.dtype"):
    models.ModelSpec.from_config(c)


@pytest.mark.parametrize("size,stride", [(2, 1), (1, 1), (4, 2), (3, 2)])
def test_small_map_convolution_equals_lax_conv(size, stride):
  """Maps whose output is smaller than the kernel run as a patch matmul (XLA:CPU's slow path);
  values and both gradients equal lax's convolution."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, size, size, 5)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 5, 7)), jnp.float32)
  conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (stride, stride), [(1, 1)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  patch = lambda x, k: models.patch_conv(x, k, stride, 1)
  np.testing.assert_allclose(patch(x, k), conv(x, k), rtol=1e-5, atol=1e-5)
  g = lambda f: jax.grad(lambda x, k: jnp.sum(jnp.sin(f(x, k))), argnums=(0, 1))(x, k)
  for a, b in zip(g(patch), g(conv)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # The module takes the patch path exactly when the output map is smaller than the kernel.
  module = models.Conv(7, 3, stride)
  v = module.init(jax.random.PRNGKey(0), x)
  np.testing.assert_allclose(
      module.apply(v, x), conv(x, v["params"]["kernel"]), rtol=1e-5, atol=1e-5
  )
  text = jax.jit(module.apply).lower(v, x).as_text()
  out = (size + 2 - 3) // stride + 1
  assert ("convolution" in text) == (out >= 3)


def test_max_pool_values_and_gradient_equal_flax():
  """Same values and gradient as nn.max_pool, ties included (first maximum in the window): a
  pixel in several windows sums their gradients in another order, hence the 1-ulp tolerance."""
  import flax.linen as nn

  rng = np.random.default_rng(0)
  for x in (
      jnp.asarray(rng.standard_normal((2, 9, 8, 3)), jnp.float32),
      jnp.asarray(rng.integers(0, 3, (2, 8, 8, 3)), jnp.float32),
  ):  # many ties
    ref = lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=[(1, 1)] * 2)
    ours = lambda x: models.max_pool(x, 3, 2)
    np.testing.assert_array_equal(ours(x), ref(x))
    w = jnp.asarray(rng.standard_normal(ref(x).shape), jnp.float32)
    g = lambda f: jax.grad(lambda x: jnp.sum(f(x) * w))(x)
    np.testing.assert_allclose(g(ours), g(ref), rtol=1e-6, atol=1e-6)  # summation order only
