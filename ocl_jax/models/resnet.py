"""ResNet trunks returning the layer4 feature map before pooling.

`dtype` ('float32' or 'bfloat16', config.model.dtype) is the compute dtype of
convolutions and BatchNorm; parameters stay float32 (the master weights the
optimiser updates).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ocl_jax.models.cpu_ops import max_pool, patch_conv

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

# ContraCAM's finer maps: 1 (none), 2 (layer4 at stride 1) or 4 (layer3 and layer4 at stride 1).
EXPAND_RES = (1, 2, 4)


def check_expand_res(expand_res: int, field: str = "expand_res") -> None:
  """ValueError unless expand_res is one of EXPAND_RES: the one place the rule is written."""
  if expand_res not in EXPAND_RES:
    raise ValueError(f"{field} must be 1, 2 or 4, got {expand_res!r}")


def block_stride(stage: int, block: int, expand_res: int = 1) -> int:
  """Stride of block `block` of stage `stage` (0-based): 2 on each later stage's first block,
  except layer4's (expand_res >= 2) and layer3's (expand_res == 4), so the same parameters
  give a 2x (4x) finer map. The JAX trunk, the torch reference and the FLOP count share it."""
  if stage == 0 or block > 0:
    return 1
  if stage == 3 and expand_res >= 2 or stage == 2 and expand_res == 4:
    return 1
  return 2


def batch_norm(
    train: bool,
    axis_name: str | None,
    zero_init: bool = False,
    name: str | None = None,
    dtype: str = "float32",
) -> nn.BatchNorm:
  """PyTorch's BN (momentum 0.1 = flax 0.9, eps 1e-5), shared by the trunk and the heads.

  Statistics are reduced in float32.
  """
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
    kernel = self.param(
        "kernel", torch_default_init, (k, k, x.shape[-1], self.features), jnp.float32
    )
    x, kernel = x.astype(DTYPES[self.dtype]), kernel.astype(DTYPES[self.dtype])
    if x.shape[-1] == 3:
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 1)))
      kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, 1), (0, 0)))
    pad = k // 2
    out_h, out_w = ((d + 2 * pad - k) // s + 1 for d in x.shape[1:3])
    if k > 1 and min(out_h, out_w) < k:
      return patch_conv(x, kernel, s, pad)
    return jax.lax.conv_general_dilated(
        x, kernel, (s, s), [(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


class BasicBlock(nn.Module):
  filters: int
  strides: int
  axis_name: str | None
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = lambda f, k, s, name: Conv(f, k, s, self.dtype, name=name)
    bn = lambda name, zero_init=False: batch_norm(
        train, self.axis_name, zero_init, name, self.dtype
    )
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
    bn = lambda name, zero_init=False: batch_norm(
        train, self.axis_name, zero_init, name, self.dtype
    )
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
    check_expand_res(self.expand_res)
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
    if self.small_stem:  # CIFAR-style: 3x3 stride 1, no max-pool
      x = Conv(self.width, 3, 1, self.dtype, name="conv1")(x)
      x = nn.relu(batch_norm(train, self.axis_name, name="bn1", dtype=self.dtype)(x))
    else:
      x = Conv(self.width, 7, 2, self.dtype, name="conv1")(x)
      x = nn.relu(batch_norm(train, self.axis_name, name="bn1", dtype=self.dtype)(x))
      x = max_pool(x, 3, 2)
    block_cls = BasicBlock if self.block == "basic" else BottleneckBlock
    for stage, num_blocks in enumerate(self.stage_sizes):
      for b in range(num_blocks):
        x = block_cls(
            self.width * 2**stage,
            block_stride(stage, b, self.expand_res),
            self.axis_name,
            self.dtype,
            name=f"layer{stage + 1}_{b}",
        )(x, train)
    return x


def feature_dim(arch: str, width: int) -> int:
  """Channels of the layer4 map (the pooled feature) of `arch` at `width`."""
  stages, block = ARCHITECTURES[arch]
  return width * 8 * (4 if block == "bottleneck" else 1)
