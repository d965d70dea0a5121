"""Layers GoogLeNet needs beyond flax's: the max pool with torch's ceil mode, global
average pooling, and the auxiliary heads' pooling windows.

`MaxPool` is XLA's max pool (`lax.reduce_window`; its gradient is XLA's
select-and-scatter); a platform's faster one subclasses it (`gnet_jax.cpu`).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
from jax import lax
import numpy as np

Padding = tuple[tuple[int, int], tuple[int, int]]


def ceil_mode_padding(x, window: int, stride: int) -> Padding:
  """The padding that gives torch's MaxPool2d(window, stride, ceil_mode=True).

  Ceil mode keeps a last, partial window as long as it starts inside the input;
  padding with -inf on the bottom/right gives exactly that.
  """
  pads = []
  for n in x.shape[1:3]:
    out = math.ceil((n - window) / stride) + 1
    if (out - 1) * stride >= n:
      out -= 1
    pads.append((0, (out - 1) * stride + window - n))
  return tuple(pads)


class MaxPool(nn.Module):
  """A max pool of NHWC input as a named layer (the summary lists it like Table 1).

  Padding never wins a window (as if -inf). `ceil_mode` is torchvision's; otherwise the
  input is padded by (window - 1) // 2 on each side. Subclasses change how the pool is
  computed (`pool`), never what it computes.
  """
  window: int = 3
  stride: int = 2
  ceil_mode: bool = False

  def padding(self, x) -> Padding:
    if self.ceil_mode:
      return ceil_mode_padding(x, self.window, self.stride)
    pad = (self.window - 1) // 2
    return ((pad, pad), (pad, pad))

  def pool(self, x, padding: Padding):
    return lax.reduce_window(x, -jnp.inf, lax.max,
                             (1, self.window, self.window, 1),
                             (1, self.stride, self.stride, 1), ((0, 0), *padding, (0, 0)))

  def __call__(self, x):
    return self.pool(x, self.padding(x))


class GlobalAvgPool(nn.Module):
  """Global average pooling as a named layer: any input size gives (N, C)."""

  def __call__(self, x):
    return jnp.mean(x, axis=(1, 2))


def aux_pool_windows(n: int, paper: bool) -> list[tuple[int, int]]:
  """The 4 pooling windows along one side of the aux heads' input.

  The paper pools 5x5 with stride 3, which at its 14x14 input gives 4x4. At other
  input sizes (and always in torchvision) the windows are those of adaptive average
  pooling to 4, so the flattened size the FC layer sees never changes.
  """
  if paper and n == 14:
    return [(3 * i, 3 * i + 5) for i in range(4)]
  return [(i * n // 4, -(-(i + 1) * n // 4)) for i in range(4)]


def _window_average_matrix(n: int, windows) -> np.ndarray:
  """(len(windows), n) matrix whose row i averages x[start_i:end_i]."""
  m = np.zeros((len(windows), n), np.float32)
  for i, (start, end) in enumerate(windows):
    m[i, start:end] = 1.0 / (end - start)
  return m


def aux_pool(x, paper: bool):
  """The aux heads' average pool of NHWC `x` to 4x4 (`aux_pool_windows`)."""
  h, w = x.shape[1:3]
  ph = _window_average_matrix(h, aux_pool_windows(h, paper))
  pw = _window_average_matrix(w, aux_pool_windows(w, paper))
  return jnp.einsum('ih,jw,nhwc->nijc', ph.astype(x.dtype), pw.astype(x.dtype), x)
