"""XLA:CPU workarounds of the ResNet: the same arithmetic as the stock ops, much faster on CPU.

Why a module of its own: these exist only because XLA:CPU runs some stock ops
(nn.max_pool's gradient, convolutions whose output map is smaller than the
kernel) through slow paths (BENCHMARKS.md); the network code in resnet.py
calls them without caring how they are computed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def patch_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """NHWC x HWIO convolution as one matmul over explicitly gathered (strided) patches."""
  kh, kw, cin, cout = kernel.shape
  b, h, w, _ = x.shape
  oh, ow = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  patches = jnp.stack(
      [
          jax.lax.slice(
              xp,
              (0, i, j, 0),
              (b, i + stride * (oh - 1) + 1, j + stride * (ow - 1) + 1, cin),
              (1, stride, stride, 1),
          )
          for i in range(kh)
          for j in range(kw)
      ],
      axis=3,
  )  # (B, oh, ow, kh*kw, C)
  return jnp.einsum("bhwkc,kco->bhwo", patches, kernel.reshape(kh * kw, cin, cout))


def _pool_geometry(x: jax.Array, window: int, stride: int) -> tuple[int, int, int]:
  pad = window // 2
  return (
      pad,
      (x.shape[1] + 2 * pad - window) // stride + 1,
      (x.shape[2] + 2 * pad - window) // stride + 1,
  )


def _pool_windows(xp: jax.Array, window: int, stride: int, oh: int, ow: int):
  """(i, j, the strided slice of the padded input at window offset (i, j)), row-major."""
  b, _, _, c = xp.shape
  for i in range(window):
    for j in range(window):
      end = (b, i + stride * (oh - 1) + 1, j + stride * (ow - 1) + 1, c)
      yield i, j, jax.lax.slice(xp, (0, i, j, 0), end, (1, stride, stride, 1))


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
    part = jax.lax.pad(
        jnp.where(hit, g, zero),
        zero,
        [
            (0, 0, 0),
            (i, hp - i - stride * (oh - 1) - 1, stride - 1),
            (j, wp - j - stride * (ow - 1) - 1, stride - 1),
            (0, 0, 0),
        ],
    )
    dxp = part if dxp is None else dxp + part
  return (dxp[:, pad : pad + x.shape[1], pad : pad + x.shape[2]],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
