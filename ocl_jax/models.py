"""ResNet encoders and the projector / predictor heads of METHOD.md section 1.

The encoder returns the layer4 feature map *before* pooling, and the heads
start from that map, so saliency code (ContraCAM) can differentiate a score
with respect to the feature map with the same parameters that training uses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# PyTorch's default conv / linear init (uniform +-1/sqrt(fan_in)); the release
# resets every conv and linear layer to it, so we do the same.
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# Blocks per stage and block type of the supported architectures.
ARCHITECTURES: dict[str, tuple[Sequence[int], str]] = {
    "resnet10": ((1, 1, 1, 1), "basic"),
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
}


def _batch_norm(train: bool, axis_name: str | None, zero_init: bool = False, name: str | None = None):
  # PyTorch BN: momentum 0.1 (flax 0.9), eps 1e-5.
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      axis_name=axis_name if train else None,
      scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
      name=name,
  )


class BasicBlock(nn.Module):
  filters: int
  strides: int
  axis_name: str | None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = lambda f, k, s, name: nn.Conv(
        f, (k, k), (s, s), padding=[(k // 2, k // 2)] * 2, use_bias=False,
        kernel_init=torch_default_init, name=name)
    y = conv(self.filters, 3, self.strides, "conv1")(x)
    y = nn.relu(_batch_norm(train, self.axis_name, name="bn1")(y))
    y = conv(self.filters, 3, 1, "conv2")(y)
    y = _batch_norm(train, self.axis_name, zero_init=True, name="bn2")(y)
    if x.shape[-1] != self.filters or self.strides != 1:
      x = conv(self.filters, 1, self.strides, "downsample_conv")(x)
      x = _batch_norm(train, self.axis_name, name="downsample_bn")(x)
    return nn.relu(x + y)


class BottleneckBlock(nn.Module):
  filters: int
  strides: int
  axis_name: str | None
  expansion: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = lambda f, k, s, name: nn.Conv(
        f, (k, k), (s, s), padding=[(k // 2, k // 2)] * 2, use_bias=False,
        kernel_init=torch_default_init, name=name)
    out = self.filters * self.expansion
    y = conv(self.filters, 1, 1, "conv1")(x)
    y = nn.relu(_batch_norm(train, self.axis_name, name="bn1")(y))
    y = conv(self.filters, 3, self.strides, "conv2")(y)  # torchvision v1.5: stride on the 3x3
    y = nn.relu(_batch_norm(train, self.axis_name, name="bn2")(y))
    y = conv(out, 1, 1, "conv3")(y)
    y = _batch_norm(train, self.axis_name, zero_init=True, name="bn3")(y)
    if x.shape[-1] != out or self.strides != 1:
      x = conv(out, 1, self.strides, "downsample_conv")(x)
      x = _batch_norm(train, self.axis_name, name="downsample_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet trunk returning the layer4 feature map (B, h, w, C).

  `expand_res` 2 (4) runs the first block of layer4 (and layer3) with stride 1:
  the same parameters give a 2x (4x) finer map, as ContraCAM's expand_res.
  """
  stage_sizes: Sequence[int]
  block: str = "basic"
  width: int = 64
  small_stem: bool = False
  expand_res: int = 1
  axis_name: str | None = "batch"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    if self.expand_res not in (1, 2, 4):
      raise ValueError(f"expand_res must be 1, 2 or 4, got {self.expand_res}")
    if self.small_stem:  # CIFAR-style: 3x3 stride 1, no max-pool
      x = nn.Conv(self.width, (3, 3), (1, 1), padding=[(1, 1)] * 2, use_bias=False,
                  kernel_init=torch_default_init, name="conv1")(x)
      x = nn.relu(_batch_norm(train, self.axis_name, name="bn1")(x))
    else:
      x = nn.Conv(self.width, (7, 7), (2, 2), padding=[(3, 3)] * 2, use_bias=False,
                  kernel_init=torch_default_init, name="conv1")(x)
      x = nn.relu(_batch_norm(train, self.axis_name, name="bn1")(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=[(1, 1)] * 2)
    block_cls = BasicBlock if self.block == "basic" else BottleneckBlock
    for stage, num_blocks in enumerate(self.stage_sizes):
      for b in range(num_blocks):
        strides = 2 if stage > 0 and b == 0 else 1
        if b == 0 and (stage == 3 and self.expand_res >= 2 or stage == 2 and self.expand_res == 4):
          strides = 1
        x = block_cls(self.width * 2**stage, strides, self.axis_name,
                      name=f"layer{stage + 1}_{b}")(x, train)
    return x


class MLPHead(nn.Module):
  """Linear(no bias)-BN-ReLU-Linear: the release's projector / predictor."""
  hidden_dim: int
  out_dim: int
  axis_name: str | None = "batch"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    x = nn.Dense(self.hidden_dim, use_bias=False, kernel_init=torch_default_init, name="fc1")(x)
    x = nn.relu(_batch_norm(train, self.axis_name, name="bn1")(x))
    fan_in = self.hidden_dim
    bias_init = lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -fan_in**-0.5, fan_in**-0.5)
    return nn.Dense(self.out_dim, kernel_init=torch_default_init, bias_init=bias_init, name="fc2")(x)


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
  expand_res: int = 1
  axis_name: str | None = "batch"

  def setup(self):
    stages, block = ARCHITECTURES[self.arch]
    self.encoder = ResNet(stages, block, self.width, self.small_stem, self.expand_res, self.axis_name)
    self.projector = MLPHead(self.proj_hidden_dim, self.proj_dim, self.axis_name)
    if self.pred_hidden_dim:
      self.predictor = MLPHead(self.pred_hidden_dim, self.proj_dim, self.axis_name)

  def feature_map(self, x: jax.Array, train: bool = True) -> jax.Array:
    return self.encoder(x, train)

  def embed_from_map(self, fmap: jax.Array, train: bool = True) -> jax.Array:
    """GAP -> projector -> L2 normalisation: the score path ContraCAM differentiates."""
    return l2_normalize(self.projector(fmap.mean(axis=(1, 2)), train))

  def predict(self, z: jax.Array, train: bool = True) -> jax.Array:
    return l2_normalize(self.predictor(z, train))

  def __call__(self, x: jax.Array, train: bool = True) -> dict[str, jax.Array]:
    fmap = self.encoder(x, train)
    features = fmap.mean(axis=(1, 2))
    z = l2_normalize(self.projector(features, train))
    out = {"features": features, "embedding": z}
    if self.pred_hidden_dim:
      out["prediction"] = self.predict(z, train)
    return out


def feature_dim(arch: str, width: int) -> int:
  stages, block = ARCHITECTURES[arch]
  return width * 8 * (4 if block == "bottleneck" else 1)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The hyperparameters that define a network; stored with exports."""
  arch: str
  width: int
  small_stem: bool
  proj_hidden_dim: int
  proj_dim: int
  pred_hidden_dim: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "ModelSpec":
    m = config.model
    if m.arch not in ARCHITECTURES:
      raise ValueError(f"config.model.arch={m.arch!r} is not one of {sorted(ARCHITECTURES)}")
    d = feature_dim(m.arch, m.width)
    return cls(arch=m.arch, width=int(m.width), small_stem=bool(m.small_stem),
               proj_hidden_dim=int(m.proj_hidden_dim or d), proj_dim=int(m.proj_dim),
               pred_hidden_dim=int(m.pred_hidden_dim if config.method == "byol" else 0))

  def build(self, expand_res: int = 1, axis_name: str | None = "batch") -> ContrastiveNet:
    return ContrastiveNet(arch=self.arch, width=self.width, small_stem=self.small_stem,
                          proj_hidden_dim=self.proj_hidden_dim, proj_dim=self.proj_dim,
                          pred_hidden_dim=self.pred_hidden_dim, expand_res=expand_res,
                          axis_name=axis_name)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def random_variables(net: nn.Module, example: jax.Array, seed: int = 0, shift_std: float = 0.1) -> Any:
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
