"""GoogLeNet's conv block and max pool on the C++ kernels (`ops`), for `GoogLeNet(conv_block=,
pool_block=)`: the same function and the same variables as the model's own blocks.

- `OneDNNConv`: in training, the convolution on oneDNN and BatchNorm + ReLU as one C++
  call each way, on flax's BatchNorm variables; in inference, the BatchNorm's fixed
  statistics folded into the kernel and a bias, so conv -> BatchNorm -> ReLU (or conv
  with bias -> ReLU) is one call that writes its output once. Initialisation, other dtypes and use_bn=False take the
  model's own `BasicConv`.
- `OneDNNMaxPool`: the max pool and its gradient on oneDNN (the gathered gradient of
  `GatherMaxPool` where oneDNN is not built).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from gnet_jax.cpu import ops
from gnet_jax.cpu.pool import GatherMaxPool, max_pool_gathered
from gnet_jax.model import BN_EPSILON, BN_MOMENTUM, BasicConv


def batch_norm_relu(x, scale, bias, running_mean, running_var, *, epsilon, momentum):
  """relu(BatchNorm(x)) over the batch, as flax's BatchNorm computes it in training, and
  the running statistics it keeps: (y, new_running_mean, new_running_var). The XLA
  twin of `ops.batch_norm_relu`, used where the C++ one is not."""
  mean = jnp.mean(x, axis=(0, 1, 2))
  var = jnp.maximum(0.0, jnp.mean(jnp.square(x), axis=(0, 1, 2)) - jnp.square(mean))
  y = nn.relu((x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias)
  return (y, momentum * running_mean + (1 - momentum) * mean,
          momentum * running_var + (1 - momentum) * var)


class OneDNNConv(BasicConv):
  """`BasicConv` on oneDNN and C++ (see the module docstring)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.is_initializing() or not (x.dtype == self.dtype == jnp.float32):
      return super().__call__(x, train)
    strides = (self.strides, self.strides)
    if not train:
      return ops.conv_bias_relu(x, *self._folded(), strides, self.padding)
    conv = self.variables['params']['conv']
    y = ops.conv_general_dilated(x, conv['kernel'], strides, self.padding,
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if not self.use_bn:
      return nn.relu(y + conv['bias'])
    bn, stats = self.variables['params']['bn'], self.variables['batch_stats']['bn']
    y, mean, var = ops.batch_norm_relu(
        y, bn['scale'], bn['bias'], stats['mean'], stats['var'], epsilon=BN_EPSILON,
        momentum=BN_MOMENTUM, fallback=functools.partial(
            batch_norm_relu, epsilon=BN_EPSILON, momentum=BN_MOMENTUM))
    self.put_variable('batch_stats', 'bn', {'mean': mean, 'var': var})
    return y

  def _folded(self):
    """The kernel and bias of conv -> BatchNorm with its running statistics, the way
    flax's BatchNorm computes it: (x - mean) * rsqrt(var + eps) * scale + bias."""
    conv = self.variables['params']['conv']
    if not self.use_bn:
      return conv['kernel'], conv['bias']
    bn, stats = self.variables['params']['bn'], self.variables['batch_stats']['bn']
    mul = lax.rsqrt(stats['var'] + BN_EPSILON) * bn['scale']
    return conv['kernel'] * mul, bn['bias'] - stats['mean'] * mul


class OneDNNMaxPool(GatherMaxPool):
  """`MaxPool` on oneDNN (see the module docstring)."""

  def pool(self, x, padding):
    return ops.max_pool(x, self.window, self.stride, padding, fallback=max_pool_gathered)
