"""GoogLeNet's float32 convolutions, max pools and BatchNorms on CPU as XLA FFI calls
(onednn_kernels.cc, oneDNN and plain C++), with their own gradients.

XLA CPU's convolutions (Eigen) compute their kernel gradients slower than oneDNN (the
library PyTorch uses) on GoogLeNet's shapes, its max pools and their gradients are slow,
and each of its BatchNorms compiles into many kernels; these calls replace them
(BENCHMARKS.md, "CPU choices"):
- `conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (flax's
  `nn.Conv(conv_general_dilated=...)`);
- `conv_bias_relu` is relu(conv(x, w) + b) in one call: an inference-mode
  conv -> BatchNorm -> ReLU once the BatchNorm is folded into w and b;
- `max_pool` is a max pool whose gradient, like XLA's and torch's, goes to each window's
  first maximum;
- `batch_norm_relu` is a training-mode BatchNorm (flax's arithmetic) and ReLU, one call
  forward and one backward.
On CPU they call the library `build.available()` registers; in programs for GPU or TPU,
and for what that file does not cover (other dtypes, dilation, groups, other layouts),
they are XLA's. The 3x3 convolutions at stride 1 with 64 or more channels run as Winograd
F(2x2, 3x3); `GNET_JAX_WINOGRAD=0` keeps them on oneDNN's direct convolution.

XLA cannot split these calls over devices: a program sharded over several devices would
run each of them whole on every device, so `gnet_jax.cpu.model_blocks` uses them only
for programs on a single CPU device.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from gnet_jax.cpu.build import available

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _call(target: str, result, operands, strides, padding):
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(result.shape, result.dtype))(
      *operands, strides=np.asarray(strides, np.int64),
      padding=np.asarray([p for pair in padding for p in pair], np.int64))


def _xla_conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, padding):
  out = jax.eval_shape(functools.partial(_xla_conv, strides=strides, padding=padding), x, w)
  return _call('GnetConvForward', out, (x, w), strides, padding)


def _conv_fwd(x, w, strides, padding):
  return _conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, residuals, dy):
  x, w = residuals
  return (_call('GnetConvBackwardData', x, (dy, w), strides, padding),
          _call('GnetConvBackwardWeights', w, (x, dy), strides, padding))


_conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv_bias_relu(x, w, b, strides, padding):
  out = jax.eval_shape(functools.partial(_xla_conv, strides=strides, padding=padding), x, w)
  return _call('GnetConvBiasReluForward', out, (x, w, b), strides, padding)


def _conv_bias_relu_fwd(x, w, b, strides, padding):
  y = _conv_bias_relu(x, w, b, strides, padding)
  return y, (x, w, y)


def _conv_bias_relu_bwd(strides, padding, residuals, dy):
  x, w, y = residuals
  dy = jnp.where(y > 0, dy, 0)  # through the ReLU
  return (*_conv_bwd(strides, padding, (x, w), dy), dy.sum((0, 1, 2)))


_conv_bias_relu.defvjp(_conv_bias_relu_fwd, _conv_bias_relu_bwd)


def _dispatch(cpu, default, *args):
  """cpu(*args) in a program for CPU, default(*args) (XLA's ops) in one for GPU or TPU.

  Where CPU is JAX's default backend, programs are lowered for CPU and `cpu` is called
  directly: `lax.platform_dependent` would trace and differentiate both functions, a
  large part of the train step's compile (BENCHMARKS.md, "CPU choices").
  """
  if jax.default_backend() == 'cpu':
    return cpu(*args)
  return lax.platform_dependent(*args, cpu=cpu, default=default)


def _on_onednn(x, w, padding) -> bool:
  """Whether onednn_kernels.cc covers this convolution (NHWC x HWIO assumed)."""
  return (x.ndim == 4 and x.dtype == w.dtype == jnp.float32 and not isinstance(padding, str)
          and min(p for pair in padding for p in pair) >= 0 and available())


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, on oneDNN for float32 NHWC/HWIO convolutions on CPU."""
  xla = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  supported = (
      lhs.ndim == 4 and preferred_element_type in (None, jnp.float32)
      and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc
      and all(d in (None, 1) or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
      and feature_group_count == batch_group_count == 1)
  if not (supported and _on_onednn(lhs, rhs, padding)):
    return xla(lhs, rhs)
  strides = tuple(int(s) for s in window_strides)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _dispatch(lambda x, w: _conv(x, w, strides, pads), xla, lhs, rhs)


def conv_bias_relu(x, w, b, strides, padding):
  """relu(conv(x, w) + b) of NHWC `x` and HWIO `w`, `b` one per output channel; on CPU
  one oneDNN call (bias and ReLU applied as the convolution writes its output).

  With a BatchNorm's fixed statistics folded into `w` and `b`, this is an inference-mode
  conv -> BatchNorm -> ReLU in one pass. `padding` is ((top, bottom), (left, right)).
  """
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)

  def xla(x, w, b):
    return jax.nn.relu(_xla_conv(x, w, strides, padding) + b)

  if not (_on_onednn(x, w, padding) and b.dtype == jnp.float32):
    return xla(x, w, b)
  return _dispatch(lambda x, w, b: _conv_bias_relu(x, w, b, strides, padding), xla, x, w, b)


def _pool_call(target: str, results, operands, window: int, stride: int, padding):
  return jax.ffi.ffi_call(target, results)(
      *operands, window=np.asarray([window, window], np.int64),
      strides=np.asarray([stride, stride], np.int64),
      padding=np.asarray([p for pair in padding for p in pair], np.int64))


def _pool_output(x_shape, window, stride, padding):
  n, h, w, c = x_shape
  (top, bottom), (left, right) = padding
  return jax.ShapeDtypeStruct((n, (h + top + bottom - window) // stride + 1,
                               (w + left + right - window) // stride + 1, c), jnp.float32)


# x_hw, x's height and width, is an argument of its own: the gradient needs only x's shape.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, window, stride, padding, x_hw):
  del x_hw
  return _pool_call('GnetMaxPool', _pool_output(x.shape, window, stride, padding), (x,),
                    window, stride, padding)


def _max_pool_fwd(x, window, stride, padding, x_hw):
  del x_hw
  y = _pool_output(x.shape, window, stride, padding)
  workspace = jax.ShapeDtypeStruct(y.shape, jnp.uint8)  # where each window's maximum is
  return _pool_call('GnetMaxPoolTraining', (y, workspace), (x,), window, stride, padding)


def _max_pool_bwd(window, stride, padding, x_hw, workspace, dy):
  dx = jax.ShapeDtypeStruct((dy.shape[0], *x_hw, dy.shape[3]), jnp.float32)
  return (_pool_call('GnetMaxPoolBackward', dx, (dy, workspace), window, stride, padding),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x, window: int, stride: int, padding, *, fallback):
  """Max pool of float32 NHWC `x` on oneDNN on CPU, `fallback(x, window, stride, padding)`
  elsewhere; `padding` ((top, bottom), (left, right)) never wins a window, as if -inf.

  The gradient goes to each window's first maximum in row-major order, as in XLA and torch.
  """
  if not (x.ndim == 4 and x.dtype == jnp.float32 and available()):
    return fallback(x, window, stride, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _dispatch(lambda x: _max_pool(x, window, stride, padding, x.shape[1:3]),
                   lambda x: fallback(x, window, stride, padding), x)


# The running statistics are updated inside the call; they take no gradient.
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _batch_norm_relu(x, scale, shift, running_mean, running_var, epsilon, momentum):
  return _batch_norm_relu_fwd(x, scale, shift, running_mean, running_var, epsilon,
                              momentum)[0]


def _batch_norm_relu_fwd(x, scale, shift, running_mean, running_var, epsilon, momentum):
  channels = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
  y, mean, var, new_mean, new_var = jax.ffi.ffi_call(
      'GnetBatchNormReluTraining',
      (jax.ShapeDtypeStruct(x.shape, jnp.float32), channels, channels, channels, channels))(
          x, scale, shift, running_mean, running_var, epsilon=np.float32(epsilon),
          momentum=np.float32(momentum))
  return (y, new_mean, new_var), (x, scale, shift, mean, var)


def _batch_norm_relu_bwd(epsilon, momentum, residuals, cotangents):
  del momentum
  x, scale, shift, mean, var = residuals
  dy = cotangents[0]
  channels = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
  dx, dscale, dshift = jax.ffi.ffi_call(
      'GnetBatchNormReluBackward',
      (jax.ShapeDtypeStruct(x.shape, jnp.float32), channels, channels))(
          dy, x, scale, shift, mean, var, epsilon=np.float32(epsilon))
  return dx, dscale, dshift, jnp.zeros_like(mean), jnp.zeros_like(var)


_batch_norm_relu.defvjp(_batch_norm_relu_fwd, _batch_norm_relu_bwd)


def batch_norm_relu(x, scale, shift, running_mean, running_var, *, epsilon: float,
                    momentum: float, fallback):
  """relu(BatchNorm(x)) in training, over the batch of float32 NHWC `x`; on CPU two calls
  (forward, backward) of onednn_kernels.cc's own loops.

  Returns (y, new_running_mean, new_running_var), the running statistics updated as flax
  does: momentum * running + (1 - momentum) * batch (variance biased). `fallback` takes
  the same arguments and computes the same on XLA (GPU, TPU, other dtypes).
  """
  args = (x, scale, shift, running_mean, running_var)
  if not (x.ndim == 4 and all(a.dtype == jnp.float32 for a in args) and available()):
    return fallback(*args)
  return _dispatch(lambda *a: _batch_norm_relu(*a, float(epsilon), float(momentum)),
                   fallback, *args)
