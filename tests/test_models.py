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
  shapes = jax.eval_shape(lambda: _trunk(arch).init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))
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
  params = _trunk("resnet18", width=8).init(jax.random.PRNGKey(0), jnp.ones((1, 64, 64, 3)), train=False)["params"]
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
  c = ml_collections.ConfigDict({"method": method, "model": {
      "arch": "resnet10", "width": 8, "small_stem": False, "proj_hidden_dim": 0,
      "proj_dim": 16, "pred_hidden_dim": 32}})
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


def test_model_spec_rejects_unknown_arch():
  c = _config("moco")
  c.model.arch = "resnet19"
  with pytest.raises(ValueError, match="model.arch"):
    models.ModelSpec.from_config(c)
