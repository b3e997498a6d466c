"""ResNet encoders and the projector / predictor heads of docs/method.md#pretraining.

The encoder returns the layer4 feature map *before* pooling, and the heads
start from that map, so saliency code (ContraCAM) can differentiate a score
with respect to the feature map with the same parameters that training uses.

`dtype` ('float32' or 'bfloat16', config.model.dtype) is the compute dtype of
convolutions, BatchNorm and dense layers; parameters stay float32 (the master
weights the optimiser updates) and features, embeddings and predictions are
returned in float32, so losses are computed in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# PyTorch's default conv / linear init (uniform +-1/sqrt(fan_in)); the release
# resets every conv and linear layer to it, so we do the same.
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# Compute dtypes of config.model.dtype.
DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Blocks per stage and block type of the supported architectures.
ARCHITECTURES: dict[str, tuple[Sequence[int], str]] = {
    "resnet10": ((1, 1, 1, 1), "basic"),
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
}


def _batch_norm(train: bool, axis_name: str | None, zero_init: bool = False, name: str | None = None,
                dtype: str = "float32"):
  # PyTorch BN: momentum 0.1 (flax 0.9), eps 1e-5. Statistics are reduced in float32.
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      axis_name=axis_name if train else None,
      scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
      dtype=DTYPES[dtype],
      param_dtype=jnp.float32,
      name=name,
  )


def patch_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """NHWC x HWIO convolution as one matmul over explicitly gathered (strided) patches."""
  kh, kw, cin, cout = kernel.shape
  b, h, w, _ = x.shape
  oh, ow = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  patches = jnp.stack([
      jax.lax.slice(xp, (0, i, j, 0), (b, i + stride * (oh - 1) + 1, j + stride * (ow - 1) + 1, cin),
                    (1, stride, stride, 1))
      for i in range(kh) for j in range(kw)], axis=3)  # (B, oh, ow, kh*kw, C)
  return jnp.einsum("bhwkc,kco->bhwo", patches, kernel.reshape(kh * kw, cin, cout))


def _pool_geometry(x: jax.Array, window: int, stride: int) -> tuple[int, int, int]:
  pad = window // 2
  return pad, (x.shape[1] + 2 * pad - window) // stride + 1, (x.shape[2] + 2 * pad - window) // stride + 1


def _pool_windows(xp: jax.Array, window: int, stride: int, oh: int, ow: int):
  """(i, j, the strided slice of the padded input at window offset (i, j)), row-major."""
  b, _, _, c = xp.shape
  for i in range(window):
    for j in range(window):
      yield i, j, jax.lax.slice(xp, (0, i, j, 0), (b, i + stride * (oh - 1) + 1,
                                                   j + stride * (ow - 1) + 1, c), (1, stride, stride, 1))


def _max_pool_value(x: jax.Array, window: int, stride: int) -> jax.Array:
  pad, oh, ow = _pool_geometry(x, window, stride)
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
  out = None
  for _, _, s in _pool_windows(xp, window, stride, oh, ow):
    out = s if out is None else jnp.maximum(out, s)
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """Max-pool over window x window, padding window//2: nn.max_pool's values and gradient.

  Why not nn.max_pool: under jax.grad its forward becomes a variadic
  reduce_window carrying argmax coordinates in four iota arrays the size of
  the padded input, ~15% of a demo train step on XLA:CPU. Here the forward is
  the maximum of window^2 strided slices and the backward routes each output's
  gradient to the first maximum of its window in row-major order (as
  reduce_window's gradient and torch's max_pool2d do), ~7x faster.
  """
  return _max_pool_value(x, window, stride)


def _max_pool_fwd(x, window, stride):
  out = _max_pool_value(x, window, stride)
  return out, (x, out)


def _max_pool_bwd(window, stride, residuals, g):
  x, out = residuals
  pad, oh, ow = _pool_geometry(x, window, stride)
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
  hp, wp = xp.shape[1:3]
  zero = jnp.zeros((), g.dtype)
  taken = jnp.zeros(out.shape, bool)
  dxp = None
  for i, j, s in _pool_windows(xp, window, stride, oh, ow):
    hit = (s == out) & ~taken
    taken = taken | hit
    # The transpose of the strided slice: interior padding puts each value back at its pixel.
    part = jax.lax.pad(jnp.where(hit, g, zero), zero,
                       [(0, 0, 0), (i, hp - i - stride * (oh - 1) - 1, stride - 1),
                        (j, wp - j - stride * (ow - 1) - 1, stride - 1), (0, 0, 0)])
    dxp = part if dxp is None else dxp + part
  return (dxp[:, pad:pad + x.shape[1], pad:pad + x.shape[2]],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


class Conv(nn.Module):
  """Bias-free square convolution, padding k//2: nn.Conv's 'kernel' parameter and init.

  Why not nn.Conv: two XLA:CPU weak spots, avoided with the same arithmetic.
  - A 3x3 convolution whose output map is smaller than the kernel (layer4 at
    64 px: 2x2) runs through a slow path, 10-50x slower than on a 3x3 map,
    forward and both gradients (BENCHMARKS.md): such convolutions are computed as
    a matmul over gathered patches.
  - An RGB input (3 channels, the stem) is zero-padded to 4 channels, with a
    zero kernel slice: the 7x7 stem's forward is 2.5x faster (63 -> 26 ms at
    batch 64, 96 px) although it multiplies a third more.
  Every other convolution is the lax convolution nn.Conv runs.
  """
  features: int
  kernel_size: int
  strides: int = 1
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s = self.kernel_size, self.strides
    kernel = self.param("kernel", torch_default_init, (k, k, x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(DTYPES[self.dtype]), kernel.astype(DTYPES[self.dtype])
    if x.shape[-1] == 3:
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 1)))
      kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, 1), (0, 0)))
    pad = k // 2
    out_h, out_w = ((d + 2 * pad - k) // s + 1 for d in x.shape[1:3])
    if k > 1 and min(out_h, out_w) < k:
      return patch_conv(x, kernel, s, pad)
    return jax.lax.conv_general_dilated(x, kernel, (s, s), [(pad, pad)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class BasicBlock(nn.Module):
  filters: int
  strides: int
  axis_name: str | None
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = lambda f, k, s, name: Conv(f, k, s, self.dtype, name=name)
    bn = lambda name, zero_init=False: _batch_norm(train, self.axis_name, zero_init, name, self.dtype)
    y = conv(self.filters, 3, self.strides, "conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = conv(self.filters, 3, 1, "conv2")(y)
    y = bn("bn2", zero_init=True)(y)
    if x.shape[-1] != self.filters or self.strides != 1:
      x = conv(self.filters, 1, self.strides, "downsample_conv")(x)
      x = bn("downsample_bn")(x)
    return nn.relu(x + y)


class BottleneckBlock(nn.Module):
  filters: int
  strides: int
  axis_name: str | None
  dtype: str = "float32"
  expansion: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = lambda f, k, s, name: Conv(f, k, s, self.dtype, name=name)
    bn = lambda name, zero_init=False: _batch_norm(train, self.axis_name, zero_init, name, self.dtype)
    out = self.filters * self.expansion
    y = conv(self.filters, 1, 1, "conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = conv(self.filters, 3, self.strides, "conv2")(y)  # torchvision v1.5: stride on the 3x3
    y = nn.relu(bn("bn2")(y))
    y = conv(out, 1, 1, "conv3")(y)
    y = bn("bn3", zero_init=True)(y)
    if x.shape[-1] != out or self.strides != 1:
      x = conv(out, 1, self.strides, "downsample_conv")(x)
      x = bn("downsample_bn")(x)
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
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    if self.expand_res not in (1, 2, 4):
      raise ValueError(f"expand_res must be 1, 2 or 4, got {self.expand_res}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
    if self.small_stem:  # CIFAR-style: 3x3 stride 1, no max-pool
      x = Conv(self.width, 3, 1, self.dtype, name="conv1")(x)
      x = nn.relu(_batch_norm(train, self.axis_name, name="bn1", dtype=self.dtype)(x))
    else:
      x = Conv(self.width, 7, 2, self.dtype, name="conv1")(x)
      x = nn.relu(_batch_norm(train, self.axis_name, name="bn1", dtype=self.dtype)(x))
      x = max_pool(x, 3, 2)
    block_cls = BasicBlock if self.block == "basic" else BottleneckBlock
    for stage, num_blocks in enumerate(self.stage_sizes):
      for b in range(num_blocks):
        strides = 2 if stage > 0 and b == 0 else 1
        if b == 0 and (stage == 3 and self.expand_res >= 2 or stage == 2 and self.expand_res == 4):
          strides = 1
        x = block_cls(self.width * 2**stage, strides, self.axis_name, self.dtype,
                      name=f"layer{stage + 1}_{b}")(x, train)
    return x


class MLPHead(nn.Module):
  """Linear(no bias)-BN-ReLU-Linear: the release's projector / predictor."""
  hidden_dim: int
  out_dim: int
  axis_name: str | None = "batch"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    """The head's output, in float32 whatever the compute dtype."""
    dt = DTYPES[self.dtype]
    x = nn.Dense(self.hidden_dim, use_bias=False, kernel_init=torch_default_init, dtype=dt,
                 param_dtype=jnp.float32, name="fc1")(x)
    x = nn.relu(_batch_norm(train, self.axis_name, name="bn1", dtype=self.dtype)(x))
    fan_in = self.hidden_dim
    bias_init = lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -fan_in**-0.5, fan_in**-0.5)
    return nn.Dense(self.out_dim, kernel_init=torch_default_init, bias_init=bias_init, dtype=dt,
                    param_dtype=jnp.float32, name="fc2")(x).astype(jnp.float32)


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
  dtype: str = "float32"    # compute dtype; parameters and outputs are float32

  def setup(self):
    stages, block = ARCHITECTURES[self.arch]
    self.encoder = ResNet(stages, block, self.width, self.small_stem, self.expand_res, self.axis_name,
                          self.dtype)
    self.projector = MLPHead(self.proj_hidden_dim, self.proj_dim, self.axis_name, self.dtype)
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
  dtype: str = "float32"  # compute dtype: how the network runs, not what it is (not in to_dict)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "ModelSpec":
    m = config.model
    if m.arch not in ARCHITECTURES:
      raise ValueError(f"config.model.arch={m.arch!r} is not one of {sorted(ARCHITECTURES)}")
    dtype = m.get("dtype", "float32")
    if dtype not in DTYPES:
      raise ValueError(f"config.model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    d = feature_dim(m.arch, m.width)
    return cls(arch=m.arch, width=int(m.width), small_stem=bool(m.small_stem),
               proj_hidden_dim=int(m.proj_hidden_dim or d), proj_dim=int(m.proj_dim),
               pred_hidden_dim=int(m.pred_hidden_dim if config.method == "byol" else 0), dtype=dtype)

  def build(self, expand_res: int = 1, axis_name: str | None = "batch") -> ContrastiveNet:
    return ContrastiveNet(arch=self.arch, width=self.width, small_stem=self.small_stem,
                          proj_hidden_dim=self.proj_hidden_dim, proj_dim=self.proj_dim,
                          pred_hidden_dim=self.pred_hidden_dim, expand_res=expand_res,
                          axis_name=axis_name, dtype=self.dtype)

  def to_dict(self) -> dict[str, Any]:
    """The architecture, as checkpoints and exports record it: float32 parameters whatever
    dtype computed them, so bfloat16 and float32 runs' checkpoints are interchangeable."""
    d = dataclasses.asdict(self)
    del d["dtype"]
    return d


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
