"""Layer-by-layer summary of GoogLeNet, read off the model itself.

    python -m gnet_jax.summary [--variant paper|torchvision] [--image_size 224]
                               [--num_classes 1000] [--no_aux] [--explain]
                               [--draw PREFIX]

One row per layer in the order of the paper's Table 1: output shape, parameters,
conv weights and multiply-adds. Shapes come from tracing the model (no FLOPs are spent:
everything runs under `jax.eval_shape`), counts from its real parameter tree.
--explain adds, for each Inception block, what its 1x1 reductions save: the block's
parameters and multiply-adds beside those of the same block with its 3x3 and 5x5
convolutions applied to the block's input directly (the paper's Figure 2a, "naive"
module, with the pool projection kept so that the output is the same), traced the same
way. --draw writes the network as PREFIX.svg and PREFIX.png (`gnet_jax.diagram`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gnet_jax.model import BasicConv, GoogLeNet, Inception
from gnet_jax.layers import MaxPool

# Table 1's own params / ops for each Inception block (K = 1024, M = 1e6).
PAPER_TABLE1 = {
    'inception_3a': ('159K', '128M'), 'inception_3b': ('380K', '304M'),
    'inception_4a': ('364K', '73M'), 'inception_4b': ('437K', '88M'),
    'inception_4c': ('463K', '100M'), 'inception_4d': ('580K', '119M'),
    'inception_4e': ('840K', '170M'), 'inception_5a': ('1072K', '54M'),
    'inception_5b': ('1388K', '71M'),
}


@dataclasses.dataclass(frozen=True)
class Call:
  """One module call of a traced forward pass (batch axis left out of the shapes)."""
  path: tuple[str, ...]
  module: str  # the module's class name
  in_shape: tuple
  out_shape: tuple
  fields: dict[str, Any]  # its number, bool and str fields: widths, kernels, rates...


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  shape: tuple  # output shape without the batch axis
  params: int  # trainable parameters (conv kernels and biases, BN scale and bias, FC)
  conv_weights: int  # conv kernel entries only: the reference's per-block figure
  macs: int  # multiply-adds per image of the layer's convs and dense layers


@dataclasses.dataclass(frozen=True)
class ReductionCost:
  """An Inception block with its 1x1 reductions, and without them."""
  name: str
  in_shape: tuple
  params: int
  macs: int
  params_without: int
  macs_without: int


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _kernels(params, path=()):
  """Yields (module path, kernel shape) for every conv and dense kernel."""
  for key, value in params.items():
    if key == 'kernel':
      yield path, value.shape
    elif isinstance(value, dict):
      yield from _kernels(value, path + (key,))


def _fields(module) -> dict[str, Any]:
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.name not in ('parent', 'name')
          and isinstance(getattr(module, f.name), (int, float, bool, str))}


def trace_module(module: nn.Module, in_shape: tuple, train: bool | None = None):
  """(params, [Call] in call order) of `module` on one input of `in_shape` (no batch
  axis), as shapes; `train` is passed on where given (GoogLeNet's aux heads run in
  training mode only)."""
  x = jax.ShapeDtypeStruct((1, *in_shape), jnp.float32)
  mode = {} if train is None else {'train': False}
  variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, **mode), x)
  if train:
    mode = dict(train=True, rngs={'dropout': jax.random.key(1)}, mutable=['batch_stats'])
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and context.module.path:
      calls.append(Call(tuple(context.module.path), type(context.module).__name__,
                        tuple(args[0].shape[1:]), tuple(out.shape[1:]),
                        _fields(context.module)))
    return out

  def apply(variables, x):
    with nn.intercept_methods(record):
      return module.apply(variables, x, **mode)

  jax.eval_shape(apply, variables, x)
  return variables['params'], calls


def trace(image_size: int = 224, train: bool = False, **model_kwargs):
  """(params, [Call]) of GoogLeNet(**model_kwargs) on one image_size x image_size image."""
  return trace_module(GoogLeNet(**model_kwargs), (image_size, image_size, 3), train)


def _macs(params, out_shapes: dict, prefix=()) -> int:
  """Multiply-adds per image of every conv and dense kernel under `params`."""
  return sum(math.prod(kshape) * math.prod(out_shapes[path][:-1])
             for path, kshape in _kernels(params, prefix))


def layer_rows(image_size: int = 224, **model_kwargs) -> list[Row]:
  """The summary's rows for GoogLeNet(**model_kwargs) at image_size x image_size.

  Layers that hold parameters but do not run at inference (the aux heads) come last,
  with shape None.
  """
  params, calls = trace(image_size, **model_kwargs)
  out_shape = {c.path: c.out_shape for c in calls}
  called = [c.path[0] for c in calls if len(c.path) == 1]
  rows = [Row('input', (image_size, image_size, 3), 0, 0, 0)]
  for name in called + [n for n in params if n not in called]:
    layer = params.get(name, {})
    conv_weights = sum(math.prod(k) for _, k in _kernels(layer) if len(k) == 4)
    macs = _macs(layer, out_shape, (name,)) if (name,) in out_shape else 0
    rows.append(Row(name, out_shape.get((name,)), _count(layer), conv_weights, macs))
  return rows


class WithoutReductions(nn.Module):
  """An Inception block whose 3x3 and 5x5 convolutions take the block's input directly
  (the paper's Figure 2a), its 1x1 path and pool projection as they are."""
  ch1x1: int
  ch3x3: int
  ch5x5: int
  pool_proj: int
  ch5x5_kernel: int
  use_bn: bool = True

  @nn.compact
  def __call__(self, x):
    def conv(name, features, kernel_size):
      return BasicConv(features, kernel_size, use_bn=self.use_bn, name=name)
    return jnp.concatenate([
        conv('ch1x1', self.ch1x1, 1)(x), conv('ch3x3', self.ch3x3, 3)(x),
        conv('ch5x5', self.ch5x5, self.ch5x5_kernel)(x),
        conv('pool_proj', self.pool_proj, 1)(MaxPool(3, 1, name='pool')(x))], axis=-1)


def reduction_costs(image_size: int = 224, **model_kwargs) -> list[ReductionCost]:
  """For each Inception block of the traced model, its parameters and multiply-adds, and
  those of the block without its 1x1 reductions on the same input (`WithoutReductions`,
  built from the block's traced widths)."""
  rows = {r.name: r for r in layer_rows(image_size, **model_kwargs)}
  _, calls = trace(image_size, **model_kwargs)
  out = []
  for call in calls:
    if len(call.path) != 1 or call.module != Inception.__name__:
      continue
    f = call.fields
    naive = WithoutReductions(f['ch1x1'], f['ch3x3'], f['ch5x5'], f['pool_proj'],
                              f['ch5x5_kernel'], f['use_bn'])
    params, naive_calls = trace_module(naive, call.in_shape)
    macs = _macs(params, {c.path: c.out_shape for c in naive_calls})
    row = rows[call.path[0]]
    out.append(ReductionCost(row.name, call.in_shape, row.params, row.macs, _count(params),
                             macs))
  return out


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


def _shape(shape) -> str:
  return 'x'.join(map(str, shape))


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
    line = (f"{r.name:<14}{_shape(r.shape):>14}{_num(r.params):>12}"
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


def format_reductions(image_size: int = 224, **model_kwargs) -> str:
  """What each Inception block's 1x1 reductions save (`reduction_costs`), as a table."""
  costs = reduction_costs(image_size, **model_kwargs)
  header = (f"{'block':<14}{'input':>12}{'params':>12}{'MACs':>9}  {'without 1x1 reductions':>23}"
            f"{'saved':>16}")
  lines = ['What the 1x1 reductions save: each Inception block as it is, and with its 3x3 '
           'and 5x5', "convolutions on the block's input directly (the paper's Figure 2a; "
           'the 1x1 path and pool', 'projection as they are, so the output is the same). '
           'Both traced on the same input.', header, '-' * len(header)]

  def line(name, in_shape, p, m, pw, mw):
    return (f"{name:<14}{in_shape:>12}{p:>12,}{m / 1e6:>8.1f}M  {pw:>13,}{mw / 1e6:>9.1f}M"
            f"{1 - p / pw:>8.0%} {1 - m / mw:>6.0%}")

  for c in costs:
    lines.append(line(c.name, _shape(c.in_shape), c.params, c.macs, c.params_without,
                      c.macs_without))
  lines.append('-' * len(header))
  lines.append(line('total', '', *(sum(getattr(c, f) for c in costs) for f in (
      'params', 'macs', 'params_without', 'macs_without'))))
  lines.append('(saved: of the parameters, then of the multiply-adds)')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='paper', choices=['paper', 'torchvision'])
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--num_classes', type=int, default=1000)
  parser.add_argument('--no_aux', action='store_true', help='build without aux heads')
  parser.add_argument('--explain', action='store_true',
                      help='also what each Inception block\'s 1x1 reductions save')
  parser.add_argument('--draw', metavar='PREFIX', default=None,
                      help='write the network as PREFIX.svg and PREFIX.png')
  args = parser.parse_args(argv)
  options = dict(variant=args.variant, num_classes=args.num_classes,
                 aux_logits=not args.no_aux)
  print(format_summary(args.image_size, **options))
  if args.explain:
    print()
    print(format_reductions(args.image_size, **options))
  if args.draw:
    from gnet_jax import diagram  # pylint: disable=import-outside-toplevel
    for path in diagram.draw(args.draw, args.image_size, **options):
      print(f'wrote {path}')


if __name__ == '__main__':
  main()
