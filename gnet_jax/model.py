"""GoogLeNet (Inception v1) in Flax linen, laid out like Table 1 of Szegedy et al. 2015.

Two variants share this code (`VARIANTS`, the variant table below):
- "paper" (default): the table in shared/reference/GOOGLENET.md: path 3 is a 5x5 conv,
  the stride-2 max pools are 3x3/2 with padding 1, dropout 0.4 before the classifier,
  auxiliary heads pool 5x5/3.
- "torchvision": the function of `torchvision.models.googlenet`, so its pretrained weights
  load: path 3 is a 3x3 conv (pytorch/vision#906), ceil-mode max pools without padding,
  a 2x2/2 pool before 5a, dropout 0.2, aux heads pool adaptively to 4x4, optional
  `transform_input`.

The conv block and the pool are injected (`conv_block`, `pool_block`), as torchvision's
quantized GoogLeNet passes its own blocks: a platform's faster implementation of the same
function (gnet_jax/cpu) plugs in without this file knowing of it. Images are NHWC; the
model knows nothing of devices or meshes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gnet_jax.images import MEAN_RGB, STDDEV_RGB
from gnet_jax.layers import GlobalAvgPool, MaxPool, aux_pool

ModuleDef = Callable[..., nn.Module]

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


@dataclasses.dataclass(frozen=True)
class Variant:
  """Where torchvision's network differs from the paper's (GOOGLENET.md)."""
  ch5x5_kernel: int  # path 3's conv: 5x5 in the paper, 3x3 in torchvision's weights
  ceil_mode: bool  # stride-2 max pools: pad 1 (paper) or ceil mode, no padding
  pool4_window: int  # the max pool before 5a: 3x3/2 (paper) or 2x2/2
  dropout_rate: float  # before the classifier
  paper_aux_pool: bool  # aux heads: 5x5/3 at 14x14 (paper) or adaptive to 4x4


VARIANTS = {
    'paper': Variant(ch5x5_kernel=5, ceil_mode=False, pool4_window=3, dropout_rate=0.4,
                     paper_aux_pool=True),
    'torchvision': Variant(ch5x5_kernel=3, ceil_mode=True, pool4_window=2, dropout_rate=0.2,
                           paper_aux_pool=False),
}

# The smallest input side accepted: at 32x32 the last feature map is 1x1.
MIN_IMAGE_SIZE = 32

# He initialisation keeps activations alive also without BatchNorm (use_bn=False).
conv_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')
dense_init = nn.initializers.truncated_normal(0.01)

# Flax momentum 0.9 is torch's momentum 0.1; eps 1e-3 in both variants.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-3


class GoogLeNetOutputs(NamedTuple):
  """What a training-mode call with aux_logits returns."""
  logits: jax.Array
  aux_4a: jax.Array
  aux_4d: jax.Array


class BasicConv(nn.Module):
  """Conv -> BatchNorm -> ReLU (conv with bias and no BatchNorm when use_bn=False).

  A replacement conv block takes the same fields and keeps the same variables
  ('conv': kernel[, bias]; 'bn': scale, bias and batch_stats mean, var).
  """
  features: int
  kernel_size: int
  strides: int = 1
  use_bn: bool = True
  dtype: Any = jnp.float32

  @property
  def padding(self):
    pad = (self.kernel_size - 1) // 2  # keeps H and W at stride 1
    return ((pad, pad), (pad, pad))

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.features, (self.kernel_size, self.kernel_size),
                strides=self.strides, padding=self.padding, use_bias=not self.use_bn,
                kernel_init=conv_init, dtype=self.dtype, param_dtype=jnp.float32,
                name='conv')(x)
    if self.use_bn:
      x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                       epsilon=BN_EPSILON, dtype=self.dtype, param_dtype=jnp.float32,
                       name='bn')(x)
    return nn.relu(x)


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
  dtype: Any = jnp.float32
  conv_block: ModuleDef = BasicConv
  pool_block: ModuleDef = MaxPool

  @nn.compact
  def __call__(self, x, train: bool = False):
    def conv(name, features, kernel_size):
      return self.conv_block(features, kernel_size, use_bn=self.use_bn, dtype=self.dtype,
                             name=name)

    path1 = conv('ch1x1', self.ch1x1, 1)(x, train)
    path2 = conv('ch3x3_reduce', self.ch3x3_reduce, 1)(x, train)
    path2 = conv('ch3x3', self.ch3x3, 3)(path2, train)
    path3 = conv('ch5x5_reduce', self.ch5x5_reduce, 1)(x, train)
    path3 = conv('ch5x5', self.ch5x5, self.ch5x5_kernel)(path3, train)
    path4 = self.pool_block(3, 1, name='pool')(x)
    path4 = conv('pool_proj', self.pool_proj, 1)(path4, train)
    return jnp.concatenate([path1, path2, path3, path4], axis=-1)


class AuxHead(nn.Module):
  """Auxiliary classifier (paper section 5) on the outputs of 4a and 4d."""
  num_classes: int
  dropout_rate: float = 0.7
  paper_pool: bool = True
  use_bn: bool = True
  dtype: Any = jnp.float32
  conv_block: ModuleDef = BasicConv

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = aux_pool(x, self.paper_pool)
    x = self.conv_block(128, 1, use_bn=self.use_bn, dtype=self.dtype, name='conv')(x, train)
    x = x.reshape(x.shape[0], -1)  # HWC order; the converter reorders torch's CHW
    x = nn.relu(nn.Dense(1024, kernel_init=dense_init, dtype=self.dtype,
                         param_dtype=jnp.float32, name='fc1')(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype,
                    param_dtype=jnp.float32, name='fc2')(x)


# What a change of a network option means for weights trained with the other value.
ROLES = {
    'weights': 'they compute something else: another model',
    'head': 'the classifier and aux heads are other layers, freshly initialised',
    'training': 'nothing at inference: only how training regularises',
}


def option(default, role: str):
  """A GoogLeNet field that defines the network: part of a ModelSpec and model.json, and
  of config.model (but num_classes, which the data sets); `role` is its ROLES key."""
  assert role in ROLES, role
  return dataclasses.field(default=default, metadata={'role': role})


class GoogLeNet(nn.Module):
  """GoogLeNet / Inception v1.

  The network's options (the fields made with `option`; `network_options`):
    num_classes: size of the classifier.
    variant: 'paper' or 'torchvision' (`VARIANTS`).
    aux_logits: build the two auxiliary heads; they only run in training mode.
    dropout_rate: before the classifier; None means the variant's (0.4 / 0.2).
    aux_dropout_rate: inside the aux heads (0.7 in the paper and torchvision).
    use_bn: BatchNorm after every conv; False gives the paper's network without it.
    transform_input: torchvision's input transform (its pretrained weights need it).
  How it runs, which never changes what it computes:
    dtype: computation dtype (bfloat16 on TPU/GPU); parameters stay float32, BatchNorm
      statistics are reduced in float32, and the logits are returned as float32.
    conv_block, pool_block, inception_block: the conv -> BatchNorm -> ReLU block, the max
      pool and the Inception block; a replacement (a platform's faster kernels,
      rematerialisation) computes the same function with the same variables.

  Returns logits (N, num_classes) in eval mode; in training mode with aux_logits a
  `GoogLeNetOutputs(logits, aux_4a, aux_4d)`.
  """
  num_classes: int = option(1000, 'head')
  variant: str = option('paper', 'weights')
  aux_logits: bool = option(True, 'head')
  dropout_rate: float | None = option(None, 'training')
  aux_dropout_rate: float = option(0.7, 'training')
  use_bn: bool = option(True, 'weights')
  transform_input: bool = option(False, 'weights')
  dtype: Any = jnp.float32
  conv_block: ModuleDef = BasicConv
  pool_block: ModuleDef = MaxPool
  inception_block: ModuleDef = Inception

  def _check_input(self, x):
    if self.variant not in VARIANTS:
      raise ValueError(f'variant must be one of {tuple(VARIANTS)}, got {self.variant!r}.')
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
    v = VARIANTS[self.variant]
    common = dict(use_bn=self.use_bn, dtype=self.dtype)

    def conv(name, features, kernel_size, strides=1):
      return self.conv_block(features, kernel_size, strides, name=name, **common)

    def pool(name, window=3):
      return self.pool_block(window, 2, ceil_mode=v.ceil_mode, name=name)

    def inception(name):
      return self.inception_block(*INCEPTION_WIDTHS[name], ch5x5_kernel=v.ch5x5_kernel,
                                  conv_block=self.conv_block, pool_block=self.pool_block,
                                  name=name, **common)

    def aux(name):
      return AuxHead(self.num_classes, self.aux_dropout_rate, paper_pool=v.paper_aux_pool,
                     conv_block=self.conv_block, name=name, **common)

    if self.transform_input:
      # ImageNet-normalised input -> the [-1, 1] range of torchvision's ported TF weights.
      mean, std = np.array(MEAN_RGB), np.array(STDDEV_RGB)
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
    x = pool('pool4', window=v.pool4_window)(x)
    x = inception('inception_5a')(x, train)
    x = inception('inception_5b')(x, train)
    x = GlobalAvgPool(name='avg_pool')(x)  # any input size works
    dropout_rate = v.dropout_rate if self.dropout_rate is None else self.dropout_rate
    x = nn.Dropout(dropout_rate, deterministic=not train, name='dropout')(x)
    logits = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype,
                      param_dtype=jnp.float32, name='classifier')(x)
    logits = logits.astype(jnp.float32)
    if run_aux and train:
      return GoogLeNetOutputs(logits, aux_4a.astype(jnp.float32), aux_4d.astype(jnp.float32))
    return logits


def network_options() -> dict[str, dataclasses.Field]:
  """GoogLeNet's fields that define its function (`option`), by name, in their order."""
  return {f.name: f for f in dataclasses.fields(GoogLeNet) if 'role' in f.metadata}


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
