"""GoogLeNet (Inception v1) in Flax linen, laid out like Table 1 of Szegedy et al. 2015.

Two variants share this code:
- "paper" (default): the table in shared/reference/GOOGLENET.md: path 3 is a 5x5 conv,
  the stride-2 max pools are 3x3/2 with padding 1, dropout 0.4 before the classifier,
  auxiliary heads pool 5x5/3.
- "torchvision": the function of `torchvision.models.googlenet`, so its pretrained weights
  load: path 3 is a 3x3 conv (pytorch/vision#906), ceil-mode max pools without padding,
  a 2x2/2 pool before 5a, BatchNorm eps 1e-3, dropout 0.2, aux heads pool adaptively
  to 4x4, optional `transform_input`.

Images are NHWC. The model knows nothing of devices or meshes.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from gnet_jax import onednn

VARIANTS = ('paper', 'torchvision')

# Table 1: (ch1x1, ch3x3_reduce, ch3x3, ch5x5_reduce, ch5x5, pool_proj) of each block.
INCEPTION_WIDTHS = {
    'inception_3a': (64, 96, 128, 16, 32, 32),
    'inception_3b': (128, 128, 192, 32, 96, 64),
    'inception_4a': (192, 96, 208, 16, 48, 64),
    'inception_4b': (160, 112, 224, 24, 64, 64),
    'inception_4c': (128, 128, 256, 24, 64, 64),
    'inception_4d': (112, 144, 288, 32, 64, 64),
    'inception_4e': (256, 160, 320, 32, 128, 128),
    'inception_5a': (256, 160, 320, 32, 128, 128),
    'inception_5b': (384, 192, 384, 48, 128, 128),
}

# The smallest input side accepted: at 32x32 the last feature map is 1x1.
MIN_IMAGE_SIZE = 32

# torchvision's transform_input turns ImageNet-normalised input into the [-1, 1] range
# that its ported TensorFlow weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# He initialisation keeps activations alive also without BatchNorm (use_bn=False).
conv_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')
dense_init = nn.initializers.truncated_normal(0.01)


class GoogLeNetOutputs(NamedTuple):
  """What a training-mode call with aux_logits returns."""
  logits: jax.Array
  aux_4a: jax.Array
  aux_4d: jax.Array


# Flax momentum 0.9 is torch's momentum 0.1.
BN_MOMENTUM = 0.9


def batch_norm_relu(x, scale, bias, running_mean, running_var, *, epsilon, momentum):
  """relu(BatchNorm(x)) over the batch, as flax's BatchNorm computes it in training, and
  the running statistics it keeps: (y, new_running_mean, new_running_var)."""
  mean = jnp.mean(x, axis=(0, 1, 2))
  var = jnp.maximum(0.0, jnp.mean(jnp.square(x), axis=(0, 1, 2)) - jnp.square(mean))
  y = nn.relu((x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias)
  return (y, momentum * running_mean + (1 - momentum) * mean,
          momentum * running_var + (1 - momentum) * var)


class BasicConv(nn.Module):
  """Conv -> BatchNorm -> ReLU (conv with bias and no BatchNorm when use_bn=False)."""
  features: int
  kernel_size: int
  strides: int = 1
  use_bn: bool = True
  bn_epsilon: float = 1e-3
  dtype: Any = jnp.float32
  onednn: bool = False  # see GoogLeNet

  @nn.compact
  def __call__(self, x, train: bool = False):
    pad = (self.kernel_size - 1) // 2  # keeps H and W at stride 1
    padding = ((pad, pad), (pad, pad))
    if (self.onednn and not train and not self.is_initializing()
        and x.dtype == self.dtype == jnp.float32):
      # In inference the BatchNorm is a fixed affine map: folded into the kernel and a
      # bias, the three layers are one oneDNN call that writes its output once.
      kernel, bias = self._folded()
      return onednn.conv_bias_relu(x, kernel, bias, (self.strides, self.strides), padding)
    x = nn.Conv(self.features, (self.kernel_size, self.kernel_size),
                strides=self.strides, padding=padding,
                use_bias=not self.use_bn, kernel_init=conv_init,
                dtype=self.dtype, param_dtype=jnp.float32, name='conv',
                conv_general_dilated=(onednn.conv_general_dilated if self.onednn
                                      else lax.conv_general_dilated))(x)
    if not self.use_bn:
      return nn.relu(x)
    if self.onednn and train and not self.is_initializing() and x.dtype == jnp.float32:
      # The batch statistics, normalisation and ReLU as one C++ call each way
      # (onednn_kernels.cc), on flax's BatchNorm's variables.
      bn, stats = self.variables['params']['bn'], self.variables['batch_stats']['bn']
      x, mean, var = onednn.batch_norm_relu(
          x, bn['scale'], bn['bias'], stats['mean'], stats['var'], epsilon=self.bn_epsilon,
          momentum=BN_MOMENTUM, fallback=functools.partial(
              batch_norm_relu, epsilon=self.bn_epsilon, momentum=BN_MOMENTUM))
      self.put_variable('batch_stats', 'bn', {'mean': mean, 'var': var})
      return x
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                     epsilon=self.bn_epsilon, dtype=self.dtype,
                     param_dtype=jnp.float32, name='bn')(x)
    return nn.relu(x)

  def _folded(self):
    """The kernel and bias of conv -> BatchNorm with its running statistics, the way
    flax's BatchNorm computes it: (x - mean) * rsqrt(var + eps) * scale + bias."""
    conv = self.variables['params']['conv']
    if not self.use_bn:
      return conv['kernel'], conv['bias']
    bn, stats = self.variables['params']['bn'], self.variables['batch_stats']['bn']
    mul = lax.rsqrt(stats['var'] + self.bn_epsilon) * bn['scale']
    return conv['kernel'] * mul, bn['bias'] - stats['mean'] * mul


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
def max_pool(x, window: int, stride: int, padding):
  """Max pool of NHWC `x` padded with -inf by padding ((top, bottom), (left, right)).

  The same function and gradient as `nn.max_pool` (the gradient goes to the first
  maximum of each window, as in torch), written out because XLA's CPU gradient of
  max pooling (select-and-scatter) took a third of a train step; this one is
  elementwise work (BENCHMARKS.md).
  """
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

  Gathered this way every term is a slice of three padded arrays, and XLA fuses the
  whole gradient into the loops that consume it; scattering each window offset's
  term back with a pad made XLA write every term out (BENCHMARKS.md). At stride s,
  positions split into s*s phases (row and column mod s), and a phase is reached only
  from the window offsets congruent to it.
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


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def ceil_mode_padding(x, window: int, stride: int):
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
  """A max pool as a named layer, so the summary can list it like the paper's table."""
  window: int = 3
  stride: int = 2
  ceil_mode: bool = False  # torchvision; otherwise padded by (window - 1) // 2
  onednn: bool = False  # see GoogLeNet

  def __call__(self, x):
    if self.ceil_mode:
      padding = ceil_mode_padding(x, self.window, self.stride)
    else:
      pad = (self.window - 1) // 2
      padding = ((pad, pad), (pad, pad))
    pool = functools.partial(onednn.max_pool, fallback=max_pool) if self.onednn else max_pool
    return pool(x, self.window, self.stride, padding)


class GlobalAvgPool(nn.Module):
  """Global average pooling as a named layer, for the same reason."""

  def __call__(self, x):
    return jnp.mean(x, axis=(1, 2))


class Inception(nn.Module):
  """The Inception block: four same-size paths concatenated on channels.

  Fields are Table 1's columns. `ch5x5_kernel` is 5 as in the paper; torchvision's
  weights have 3 there. Path 4's 3x3/1 pool is padded by 1 in both variants (at stride 1
  torchvision's ceil mode changes nothing).
  """
  ch1x1: int
  ch3x3_reduce: int
  ch3x3: int
  ch5x5_reduce: int
  ch5x5: int
  pool_proj: int
  ch5x5_kernel: int = 5
  use_bn: bool = True
  bn_epsilon: float = 1e-3
  dtype: Any = jnp.float32
  onednn: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    def conv(name, features, kernel_size):
      return BasicConv(features, kernel_size, use_bn=self.use_bn,
                       bn_epsilon=self.bn_epsilon, dtype=self.dtype, onednn=self.onednn,
                       name=name)

    path1 = conv('ch1x1', self.ch1x1, 1)(x, train)
    path2 = conv('ch3x3_reduce', self.ch3x3_reduce, 1)(x, train)
    path2 = conv('ch3x3', self.ch3x3, 3)(path2, train)
    path3 = conv('ch5x5_reduce', self.ch5x5_reduce, 1)(x, train)
    path3 = conv('ch5x5', self.ch5x5, self.ch5x5_kernel)(path3, train)
    path4 = MaxPool(3, 1, onednn=self.onednn, name='pool')(x)
    path4 = conv('pool_proj', self.pool_proj, 1)(path4, train)
    return jnp.concatenate([path1, path2, path3, path4], axis=-1)


def _window_average_matrix(n: int, windows) -> np.ndarray:
  """(len(windows), n) matrix whose row i averages x[start_i:end_i]."""
  m = np.zeros((len(windows), n), np.float32)
  for i, (start, end) in enumerate(windows):
    m[i, start:end] = 1.0 / (end - start)
  return m


def aux_pool_windows(n: int, paper: bool):
  """The 4 pooling windows along one side of the aux heads' input.

  The paper pools 5x5 with stride 3, which at its 14x14 input gives 4x4. At other
  input sizes (and always in torchvision) the windows are those of adaptive average
  pooling to 4, so the flattened size the FC layer sees never changes.
  """
  if paper and n == 14:
    return [(3 * i, 3 * i + 5) for i in range(4)]
  return [(i * n // 4, -(-(i + 1) * n // 4)) for i in range(4)]


class AuxHead(nn.Module):
  """Auxiliary classifier (paper section 5) on the outputs of 4a and 4d."""
  num_classes: int
  dropout_rate: float = 0.7
  paper: bool = True
  use_bn: bool = True
  bn_epsilon: float = 1e-3
  dtype: Any = jnp.float32
  onednn: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    h, w = x.shape[1:3]
    ph = _window_average_matrix(h, aux_pool_windows(h, self.paper))
    pw = _window_average_matrix(w, aux_pool_windows(w, self.paper))
    x = jnp.einsum('ih,jw,nhwc->nijc', ph.astype(x.dtype), pw.astype(x.dtype), x)
    x = BasicConv(128, 1, use_bn=self.use_bn, bn_epsilon=self.bn_epsilon,
                  dtype=self.dtype, onednn=self.onednn, name='conv')(x, train)
    x = x.reshape(x.shape[0], -1)  # HWC order; the converter reorders torch's CHW
    x = nn.relu(nn.Dense(1024, kernel_init=dense_init, dtype=self.dtype,
                         param_dtype=jnp.float32, name='fc1')(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype,
                    param_dtype=jnp.float32, name='fc2')(x)


class GoogLeNet(nn.Module):
  """GoogLeNet / Inception v1.

  Attributes:
    num_classes: size of the classifier.
    variant: 'paper' or 'torchvision' (see the module docstring).
    aux_logits: build the two auxiliary heads; they only run in training mode.
    dropout_rate: before the classifier; None means the variant's (0.4 / 0.2).
    aux_dropout_rate: inside the aux heads (0.7 in the paper and torchvision).
    use_bn: BatchNorm after every conv; False gives the paper's network without it.
    transform_input: torchvision's input transform (its pretrained weights need it).
    dtype: computation dtype (bfloat16 on TPU/GPU); parameters stay float32 and the
      logits are returned as float32.
    onednn: float32 convolutions, max pools and BatchNorms on CPU through oneDNN and
      C++ (`gnet_jax.onednn`), and in inference each conv -> BatchNorm -> ReLU as one
      call: the same function, faster and quicker to compile (BENCHMARKS.md, changes
      8-12). Elsewhere, or where oneDNN cannot be built, XLA's. For programs on one
      device only: XLA cannot split the calls over devices.

  Returns logits (N, num_classes) in eval mode; in training mode with aux_logits a
  `GoogLeNetOutputs(logits, aux_4a, aux_4d)`.
  """
  num_classes: int = 1000
  variant: str = 'paper'
  aux_logits: bool = True
  dropout_rate: float | None = None
  aux_dropout_rate: float = 0.7
  use_bn: bool = True
  transform_input: bool = False
  dtype: Any = jnp.float32
  onednn: bool = False

  def _check_input(self, x):
    if self.variant not in VARIANTS:
      raise ValueError(f'variant must be one of {VARIANTS}, got {self.variant!r}.')
    if x.ndim != 4:
      raise ValueError(
          f'GoogLeNet expects a batch of NHWC images of rank 4, got shape {x.shape} '
          f'(rank {x.ndim}); add a batch axis with images[None] for a single image.')
    if x.shape[-1] != 3:
      raise ValueError(
          f'GoogLeNet expects 3-channel (RGB) NHWC images, got {x.shape[-1]} channels '
          f'in shape {x.shape}; convert grayscale/RGBA to RGB, or transpose NCHW to NHWC.')
    if min(x.shape[1:3]) < MIN_IMAGE_SIZE:
      raise ValueError(
          f'GoogLeNet needs images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}, got '
          f'{x.shape[1]}x{x.shape[2]}; resize the images up.')

  @nn.compact
  def __call__(self, x, train: bool = False):
    self._check_input(x)
    tv = self.variant == 'torchvision'
    dropout_rate = self.dropout_rate if self.dropout_rate is not None else (0.2 if tv else 0.4)
    common = dict(use_bn=self.use_bn, bn_epsilon=1e-3, dtype=self.dtype, onednn=self.onednn)

    def conv(name, features, kernel_size, strides=1):
      return BasicConv(features, kernel_size, strides, name=name, **common)

    def pool(name, window=3):
      return MaxPool(window, 2, ceil_mode=tv, onednn=self.onednn, name=name)

    def inception(name):
      return Inception(*INCEPTION_WIDTHS[name], ch5x5_kernel=3 if tv else 5, name=name,
                       **common)

    def aux(name):
      return AuxHead(self.num_classes, self.aux_dropout_rate, paper=not tv, name=name,
                     **common)

    if self.transform_input:
      mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
      x = x * (std / 0.5) + (mean - 0.5) / 0.5
    x = x.astype(self.dtype)

    x = conv('conv1', 64, 7, strides=2)(x, train)
    x = pool('pool1')(x)
    x = conv('conv2_reduce', 64, 1)(x, train)
    x = conv('conv2', 192, 3)(x, train)
    x = pool('pool2')(x)
    x = inception('inception_3a')(x, train)
    x = inception('inception_3b')(x, train)
    x = pool('pool3')(x)
    x = inception('inception_4a')(x, train)
    # Aux heads exist in the parameters whenever aux_logits, but only run in training.
    run_aux = self.aux_logits and (train or self.is_initializing())
    aux_4a = aux('aux_4a')(x, train) if run_aux else None
    x = inception('inception_4b')(x, train)
    x = inception('inception_4c')(x, train)
    x = inception('inception_4d')(x, train)
    aux_4d = aux('aux_4d')(x, train) if run_aux else None
    x = inception('inception_4e')(x, train)
    x = pool('pool4', window=2 if tv else 3)(x)
    x = inception('inception_5a')(x, train)
    x = inception('inception_5b')(x, train)
    x = GlobalAvgPool(name='avg_pool')(x)  # any input size works
    x = nn.Dropout(dropout_rate, deterministic=not train, name='dropout')(x)
    logits = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype,
                      param_dtype=jnp.float32, name='classifier')(x)
    logits = logits.astype(jnp.float32)
    if run_aux and train:
      return GoogLeNetOutputs(logits, aux_4a.astype(jnp.float32), aux_4d.astype(jnp.float32))
    return logits


def init_fn(key: jax.Array, images: jax.Array, **model_kwargs) -> dict:
  """Initial variables ({'params', 'batch_stats'}) of GoogLeNet(**model_kwargs).

  Only `images.shape` matters; pure and jittable.
  """
  return GoogLeNet(**model_kwargs).init(key, images, train=False)


def apply_fn(variables: dict, images: jax.Array, *, train: bool = False,
             dropout_key: jax.Array | None = None, **model_kwargs):
  """Runs GoogLeNet(**model_kwargs); pure and jittable.

  Eval mode (default) returns the logits (N, num_classes). Training mode needs
  `dropout_key` (unless every dropout rate is 0) and returns
  `(outputs, new_batch_stats)`: outputs as GoogLeNet returns them, and the batch
  statistics updated by this batch (an empty dict when use_bn=False).
  """
  model = GoogLeNet(**model_kwargs)
  if not train:
    return model.apply(variables, images, train=False)
  rngs = {'dropout': dropout_key} if dropout_key is not None else {}
  outputs, state = model.apply(variables, images, train=True, rngs=rngs,
                               mutable=['batch_stats'])
  return outputs, state.get('batch_stats', {})
