"""Layer-by-layer summary of GoogLeNet, read off the model itself.

    python -m gnet_jax.summary [--variant paper|torchvision] [--image_size 224]
                               [--num_classes 1000]

One row per layer in the order of the paper's Table 1: output shape, parameters,
conv weights and multiply-adds. Shapes come from tracing the model (no FLOPs are spent:
everything runs under `jax.eval_shape`), counts from its real parameter tree.
"""
from __future__ import annotations

import argparse
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gnet_jax.model import GoogLeNet

# Table 1's own params / ops for each Inception block (K = 1024, M = 1e6).
PAPER_TABLE1 = {
    'inception_3a': ('159K', '128M'), 'inception_3b': ('380K', '304M'),
    'inception_4a': ('364K', '73M'), 'inception_4b': ('437K', '88M'),
    'inception_4c': ('463K', '100M'), 'inception_4d': ('580K', '119M'),
    'inception_4e': ('840K', '170M'), 'inception_5a': ('1072K', '54M'),
    'inception_5b': ('1388K', '71M'),
}


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  shape: tuple  # output shape without the batch axis
  params: int  # trainable parameters (conv kernels and biases, BN scale and bias, FC)
  conv_weights: int  # conv kernel entries only: the reference's per-block figure
  macs: int  # multiply-adds per image of the layer's convs and dense layers


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _kernels(params, path=()):
  """Yields (module path, kernel shape) for every conv and dense kernel."""
  for key, value in params.items():
    if key == 'kernel':
      yield path, value.shape
    elif isinstance(value, dict):
      yield from _kernels(value, path + (key,))


def trace(image_size: int = 224, **model_kwargs):
  """(params, [(module path, output shape)] in call order) for one image, as shapes."""
  model = GoogLeNet(**model_kwargs)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and context.module.path:
      calls.append((tuple(context.module.path), out.shape[1:]))
    return out

  def apply(variables, images):
    with nn.intercept_methods(record):
      return model.apply(variables, images)

  jax.eval_shape(apply, variables, images)
  return variables['params'], calls


def layer_rows(image_size: int = 224, **model_kwargs) -> list[Row]:
  """The summary's rows for GoogLeNet(**model_kwargs) at image_size x image_size.

  Layers that hold parameters but do not run at inference (the aux heads) come last,
  with shape None.
  """
  params, calls = trace(image_size, **model_kwargs)
  out_shape = dict(calls)
  called = [path[0] for path, _ in calls if len(path) == 1]
  rows = [Row('input', (image_size, image_size, 3), 0, 0, 0)]
  for name in called + [n for n in params if n not in called]:
    layer = params.get(name, {})
    conv_weights = macs = 0
    for path, kshape in _kernels(layer, (name,)):
      spatial = out_shape[path][:-1] if path in out_shape else ()  # () for dense layers
      macs += math.prod(kshape) * math.prod(spatial)
      if len(kshape) == 4:
        conv_weights += math.prod(kshape)
    rows.append(Row(name, out_shape.get((name,)), _count(layer), conv_weights, macs))
  return rows


def reduction_example() -> tuple[int, int]:
  """The seed's 1x1-reduction example on a 28x28x192 input, counted on real convs.

  Returns (weights of a 3x3 conv to 128, weights of 1x1 to 96 then 3x3 to 128).
  """
  x = jax.ShapeDtypeStruct((1, 28, 28, 192), jnp.float32)

  def weights(module):
    return _count(jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x))

  direct = nn.Conv(128, (3, 3), use_bias=False)
  reduced = nn.Sequential([nn.Conv(96, (1, 1), use_bias=False),
                           nn.Conv(128, (3, 3), use_bias=False)])
  return weights(direct), weights(reduced)


def _num(n: int) -> str:
  return f'{n:,}' if n else ''


def format_summary(image_size: int = 224, **model_kwargs) -> str:
  model = GoogLeNet(**model_kwargs)
  paper = model.variant == 'paper'
  rows = layer_rows(image_size, **model_kwargs)
  main_rows = [r for r in rows if r.shape is not None]
  header = f"{'layer':<14}{'output':>14}{'params':>12}{'conv weights':>14}{'MACs':>10}"
  header += f"{'Table 1 says':>16}" if paper else ''
  rule = '-' * len(header)
  lines = [f'GoogLeNet, variant={model.variant!r}, {image_size}x{image_size} input, '
           f'{model.num_classes} classes', header, rule]
  for r in main_rows:
    macs = f'{r.macs / 1e6:.1f}M' if r.macs else ''
    line = (f"{r.name:<14}{'x'.join(map(str, r.shape)):>14}{_num(r.params):>12}"
            f'{_num(r.conv_weights):>14}{macs:>10}')
    if paper and r.name in PAPER_TABLE1:
      line += f"{', '.join(PAPER_TABLE1[r.name]):>16}"
    lines.append(line.rstrip())
  total_macs = sum(r.macs for r in main_rows)
  lines += [rule, f"{'total':<28}{sum(r.params for r in main_rows):>12,}"
            f'{sum(r.conv_weights for r in main_rows):>14,}{total_macs / 1e9:>9.2f}G']
  for r in rows:
    if r.shape is None:
      lines.append(f"{r.name + ' (training only)':<28}{r.params:>12,}")
  lines.append(f"{'all parameters':<28}{sum(r.params for r in rows):>12,}")
  if paper:
    lines.append("Table 1's params column (K = 1024) does not follow exactly from its "
                 'own widths; 4c, 5a and 5b are furthest off. The figures above are '
                 'counted on the model.')
  direct, reduced = reduction_example()
  lines.append(f'1x1 reduction (seed example), 28x28x192 -> 3x3 conv to 128: {direct:,} '
               f'weights; 1x1 to 96 first: {reduced:,}.')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='paper', choices=['paper', 'torchvision'])
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--num_classes', type=int, default=1000)
  parser.add_argument('--no_aux', action='store_true', help='build without aux heads')
  args = parser.parse_args(argv)
  print(format_summary(args.image_size, variant=args.variant,
                       num_classes=args.num_classes, aux_logits=not args.no_aux))


if __name__ == '__main__':
  main()
