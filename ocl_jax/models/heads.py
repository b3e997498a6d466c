"""Projector / predictor heads, the ContrastiveNet around the trunk, and its ModelSpec.

The heads start from the trunk's layer4 map, so saliency code (ContraCAM) can
differentiate a score with respect to the feature map with the same parameters
that training uses. Embeddings and predictions are returned in float32, so
losses are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ocl_jax.models.resnet import (
    ARCHITECTURES,
    DTYPES,
    ResNet,
    batch_norm,
    feature_dim,
    torch_default_init,
)


class MLPHead(nn.Module):
  """Linear(no bias)-BN-ReLU-Linear: the release's projector / predictor.

  batch_norm=False gives Linear(bias)-ReLU-Linear, MoCo v2's projector (`fc.0`, `fc.2`), so
  its published checkpoints import exactly; the default keeps the release's module tree
  (fc1, bn1, fc2).
  """

  hidden_dim: int
  out_dim: int
  axis_name: str | None = "batch"
  dtype: str = "float32"
  batch_norm: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    """The head's output, in float32 whatever the compute dtype."""
    dt = DTYPES[self.dtype]
    x = nn.Dense(
        self.hidden_dim,
        use_bias=not self.batch_norm,
        kernel_init=torch_default_init,
        bias_init=_torch_bias_init(x.shape[-1]),
        dtype=dt,
        param_dtype=jnp.float32,
        name="fc1",
    )(x)
    if self.batch_norm:
      x = batch_norm(train, self.axis_name, name="bn1", dtype=self.dtype)(x)
    return nn.Dense(
        self.out_dim,
        kernel_init=torch_default_init,
        bias_init=_torch_bias_init(self.hidden_dim),
        dtype=dt,
        param_dtype=jnp.float32,
        name="fc2",
    )(nn.relu(x)).astype(jnp.float32)


def _torch_bias_init(fan_in: int):
  """nn.Linear's default bias init: uniform in +-1/sqrt(fan_in)."""
  bound = fan_in**-0.5
  return lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """F.normalize semantics: x / max(||x||, eps)."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)


class ContrastiveNet(nn.Module):
  """Encoder + projector (+ predictor for BYOL).

  Parameters live under 'encoder', 'projector' and 'predictor', so the EMA
  target is simply the online tree without 'predictor', and an encoder-only
  export is params['encoder'].
  """

  arch: str = "resnet18"
  width: int = 64
  small_stem: bool = False
  proj_hidden_dim: int = 512
  proj_dim: int = 128
  pred_hidden_dim: int = 0  # 0: no predictor
  proj_batch_norm: bool = True  # False: MoCo v2's Linear(bias)-ReLU-Linear projector
  expand_res: int = 1
  axis_name: str | None = "batch"
  dtype: str = "float32"  # compute dtype; parameters and outputs are float32

  def setup(self):
    stages, block = ARCHITECTURES[self.arch]
    self.encoder = ResNet(
        stages, block, self.width, self.small_stem, self.expand_res, self.axis_name, self.dtype
    )
    self.projector = MLPHead(
        self.proj_hidden_dim, self.proj_dim, self.axis_name, self.dtype, self.proj_batch_norm
    )
    if self.pred_hidden_dim:
      self.predictor = MLPHead(self.pred_hidden_dim, self.proj_dim, self.axis_name, self.dtype)

  def feature_map(self, x: jax.Array, train: bool = True) -> jax.Array:
    return self.encoder(x, train)

  def embed_from_map(self, fmap: jax.Array, train: bool = True) -> jax.Array:
    """GAP -> projector -> L2 normalisation: the score path ContraCAM differentiates."""
    return l2_normalize(self.projector(_pool(fmap), train))

  def predict(self, z: jax.Array, train: bool = True) -> jax.Array:
    return l2_normalize(self.predictor(z, train))

  def __call__(self, x: jax.Array, train: bool = True) -> dict[str, jax.Array]:
    fmap = self.encoder(x, train)
    features = _pool(fmap)
    z = l2_normalize(self.projector(features, train))
    out = {"features": features, "embedding": z}
    if self.pred_hidden_dim:
      out["prediction"] = self.predict(z, train)
    return out


def _pool(fmap: jax.Array) -> jax.Array:
  """Global average pooling, in float32."""
  return fmap.astype(jnp.float32).mean(axis=(1, 2))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The hyperparameters that define a network; stored with exports."""

  arch: str
  width: int
  small_stem: bool
  proj_hidden_dim: int
  proj_dim: int
  pred_hidden_dim: int
  proj_batch_norm: bool = True  # False: Linear(bias)-ReLU-Linear projector (MoCo v2's)
  dtype: str = "float32"  # compute dtype: how the network runs, not what it is (not in to_dict)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "ModelSpec":
    """The spec of config.model; ValueError naming every bad field of the section, one a line
    (configuration.validate_config gathers them)."""
    m = config.model
    dtype = m.get("dtype", "float32")
    proj_bn = m.get("proj_batch_norm", True)
    errors = []
    for ok, field, message in [
        (m.arch in ARCHITECTURES, "arch", f"{m.arch!r} is not one of {sorted(ARCHITECTURES)}"),
        (m.width > 0, "width", f"must be > 0, got {m.width}"),
        (m.proj_dim > 0, "proj_dim", f"must be > 0, got {m.proj_dim}"),
        (m.proj_hidden_dim >= 0, "proj_hidden_dim", "must be >= 0"),
        (dtype in DTYPES, "dtype", f"{dtype!r} is not one of {sorted(DTYPES)}"),
        (isinstance(proj_bn, bool), "proj_batch_norm", f"must be True or False, got {proj_bn!r}"),
    ]:
      if not ok:
        errors.append(f"config.model.{field}: {message}")
    if errors:
      raise ValueError("\n".join(errors))
    d = feature_dim(m.arch, m.width)
    return cls(
        arch=m.arch,
        width=int(m.width),
        small_stem=bool(m.small_stem),
        proj_hidden_dim=int(m.proj_hidden_dim or d),
        proj_dim=int(m.proj_dim),
        pred_hidden_dim=int(m.pred_hidden_dim if _uses_predictor(config.method) else 0),
        proj_batch_norm=proj_bn,
        dtype=dtype,
    )

  def build(self, expand_res: int = 1, axis_name: str | None = "batch") -> ContrastiveNet:
    return ContrastiveNet(
        arch=self.arch,
        width=self.width,
        small_stem=self.small_stem,
        proj_hidden_dim=self.proj_hidden_dim,
        proj_dim=self.proj_dim,
        pred_hidden_dim=self.pred_hidden_dim,
        proj_batch_norm=self.proj_batch_norm,
        expand_res=expand_res,
        axis_name=axis_name,
        dtype=self.dtype,
    )

  def to_dict(self) -> dict[str, Any]:
    """The architecture, as checkpoints and exports record it: float32 parameters whatever
    dtype computed them, so bfloat16 and float32 runs' checkpoints are interchangeable."""
    d = dataclasses.asdict(self)
    del d["dtype"]
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any], source: str = "model spec") -> "ModelSpec":
    """The inverse of to_dict; fields added since a checkpoint or export was written take their
    defaults (proj_batch_norm: True, what every earlier model had), so old files still load."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    missing = [n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING]
    if unknown or missing:
      raise ValueError(
          f"{source}: not a ModelSpec (unknown fields {unknown}, missing {missing}); it was "
          "written by another version of ocl_jax"
      )
    return cls(**d)


def random_variables(
    net: nn.Module, example: jax.Array, seed: int = 0, shift_std: float = 0.1
) -> Any:
  """Variables of `net` drawn in NumPy, for benchmarks and tests (no compiled init).

  Kernels uniform +-1/sqrt(fan_in) (the torch default); BN scales and running
  variances in [0.5, 1.5], shifts, running means and biases ~ N(0, shift_std):
  away from a fresh init, whose zero residual gammas make maps too regular.
  """
  shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), example[:1], False))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(path[-1])
    if "kernel" in name:
      bound = 1 / np.sqrt(np.prod(leaf.shape[:-1]))
      value = rng.uniform(-bound, bound, leaf.shape)
    elif "scale" in name or "var" in name:
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      value = shift_std * rng.normal(size=leaf.shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _uses_predictor(method: str) -> bool:
  """Whether `method`'s online network has a prediction head (BYOL's does)."""
  from ocl_jax import methods  # local: the methods import this module (l2_normalize)

  return method in methods.names() and methods.get(method).uses_predictor
