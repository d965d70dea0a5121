"""XLA's max pool with its gradient gathered instead of scattered: the same function and
gradient as `layers.MaxPool` (the gradient goes to each window's first maximum, as in
XLA and torch), written as slices and selects, which XLA's CPU backend fuses into the
loops that consume them where its select-and-scatter is slow. `model_blocks` uses it on
CPU programs that the oneDNN kernels cannot serve (several devices), and the oneDNN max
pool falls back to it where the C++ library is not built.
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from jax import lax

from gnet_jax.layers import MaxPool, Padding


class GatherMaxPool(MaxPool):
  """`MaxPool` with the gradient of `max_pool_gathered`."""

  def pool(self, x, padding: Padding):
    return max_pool_gathered(x, self.window, self.stride, padding)


def _window_views(xp, window: int, stride: int, out_hw):
  """(i, j, view) for each offset of the window: the strided view of padded `xp` that
  holds every window's element (i, j). Row-major, the order in which both XLA and
  torch pick a window's first maximum."""
  n, _, _, c = xp.shape
  return [(i, j, lax.slice(xp, (0, i, j, 0),
                           (n, i + (out_hw[0] - 1) * stride + 1,
                            j + (out_hw[1] - 1) * stride + 1, c), (1, stride, stride, 1)))
          for i in range(window) for j in range(window)]


def _pad_neg_inf(x, padding):
  return jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_gathered(x, window: int, stride: int, padding: Padding):
  """Max pool of NHWC `x` padded with -inf by padding ((top, bottom), (left, right)),
  whose gradient is gathered: every term is a slice of three padded arrays."""
  return _max_pool_fwd(x, window, stride, padding)[0]


def _max_pool_fwd(x, window, stride, padding):
  if stride > 1:  # rows, then columns: XLA CPU's 2-D reduce-window is slower
    (top_bottom, left_right) = padding
    y = lax.reduce_window(x, -jnp.inf, lax.max, (1, window, 1, 1), (1, stride, 1, 1),
                          ((0, 0), top_bottom, (0, 0), (0, 0)))
    y = lax.reduce_window(y, -jnp.inf, lax.max, (1, 1, window, 1), (1, 1, stride, 1),
                          ((0, 0), (0, 0), left_right, (0, 0)))
  else:  # XLA CPU's reduce-window is slow at stride 1; contiguous views are not.
    views = _window_views(_pad_neg_inf(x, padding), window, 1, x.shape[1:3])
    y = functools.reduce(jnp.maximum, [v for _, _, v in views])
  return y, (x, y)


def _pad_hw(x, before, after, value):
  """Pads H and W of NHWC `x` by `before` on top/left and `after` (h, w) below/right."""
  return lax.pad(x, jnp.asarray(value, x.dtype), (
      (0, 0, 0), (before, after[0], 0), (before, after[1], 0), (0, 0, 0)))


def _max_pool_bwd(window, stride, padding, residuals, g):
  """Each input position sums the gradients of the windows whose first maximum it is.

  At stride s, positions split into s*s phases (row and column mod s), and a phase is
  reached only from the window offsets congruent to it.
  """
  x, y = residuals
  s = stride
  k = -(-window // s)  # windows that hold one position, per axis
  xp = _pad_neg_inf(x, padding)
  n, hp, wp, c = xp.shape
  oh, ow = y.shape[1:3]
  h2, w2 = -(-hp // s), -(-wp // s)  # positions per phase
  yp = _pad_hw(y, k - 1, (h2 - oh, w2 - ow), 0)
  gp = _pad_hw(g, k - 1, (h2 - oh, w2 - ow), 0)  # windows off the edge pass nothing
  xpp = _pad_hw(xp, s * (k - 1), (s * (h2 - 1) + window - hp,
                                  s * (w2 - 1) + window - wp), -jnp.inf)

  def of_window(a, kr, kt):  # a's value at window (row - kr, col - kt) of each position
    return lax.slice(a, (0, k - 1 - kr, k - 1 - kt, 0),
                     (n, k - 1 - kr + h2, k - 1 - kt + w2, c))

  def window_element(kr, kt, i, j):  # element (i, j) of that window
    r0, c0 = s * (k - 1 - kr) + i, s * (k - 1 - kt) + j
    return lax.slice(xpp, (0, r0, c0, 0),
                     (n, r0 + s * (h2 - 1) + 1, c0 + s * (w2 - 1) + 1, c), (1, s, s, 1))

  zero = jnp.zeros((), g.dtype)
  rows = []
  for r in range(s):
    row = []
    for t in range(s):
      dx = jnp.zeros((n, h2, w2, c), g.dtype)
      for kr, i in enumerate(range(r, window, s)):
        for kt, j in enumerate(range(t, window, s)):
          ymax = of_window(yp, kr, kt)
          first = window_element(kr, kt, i, j) == ymax
          for earlier in itertools.product(range(window), repeat=2):
            if earlier < (i, j):  # row-major, as XLA and torch pick the first maximum
              first = first & (window_element(kr, kt, *earlier) != ymax)
          dx = dx + jnp.where(first, of_window(gp, kr, kt), zero)
      row.append(dx)
    rows.append(jnp.stack(row, axis=3))
  # Interleave the phases: (s*a + r, s*b + t) is phase (r, t)'s position (a, b).
  dxp = jnp.stack(rows, axis=2).reshape(n, h2 * s, w2 * s, c)
  (top, _), (left, _) = padding
  return (dxp[:, top:top + x.shape[1], left:left + x.shape[2]],)


max_pool_gathered.defvjp(_max_pool_fwd, _max_pool_bwd)
