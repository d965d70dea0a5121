"""The network as a picture, drawn from the model itself: every layer the traced forward
pass calls (`gnet_jax.summary.trace`, in training mode so that the aux heads run), in
order, with its widths, kernels and output shape; each Inception block as its four
paths and their concatenation; the aux heads beside the blocks they read.

    python -m gnet_jax.summary --draw docs/googlenet   # docs/googlenet.svg and .png
"""
from __future__ import annotations

import io
import math

import jax
import matplotlib

from gnet_jax import paths, summary

# Where each path of an Inception block starts: its module names in model.Inception.
INCEPTION_PATHS = (('ch1x1',), ('ch3x3_reduce', 'ch3x3'), ('ch5x5_reduce', 'ch5x5'),
                   ('pool', 'pool_proj'))
COLOURS = {'conv': '#cfe2f3', 'pool': '#fce5cd', 'concat': '#eeeeee', 'dense': '#d9ead3',
           'other': '#ffffff', 'aux': '#ead1dc'}
BOX_H, GAP = 0.42, 0.22  # a box's height and the space between rows (inches)
WIDTH = 7.0  # the main column
AUX_X, AUX_W = WIDTH + 0.5, 2.6  # the aux heads' column


def _shape(shape) -> str:
  return 'x'.join(map(str, shape))


def _label(call: summary.Call) -> tuple[str, str]:
  """(text, colour) of one layer's box."""
  f = call.fields
  if call.module in ('BasicConv', 'OneDNNConv'):
    stride = f'/{f["strides"]}' if f.get('strides', 1) > 1 else ''
    k = f['kernel_size']
    return f'{k}x{k}{stride} conv, {f["features"]}', 'conv'
  if 'MaxPool' in call.module:
    mode = ', ceil' if f.get('ceil_mode') else ''
    return f'{f["window"]}x{f["window"]}/{f["stride"]} max pool{mode}', 'pool'
  if call.module == 'GlobalAvgPool':
    return 'global average pool', 'pool'
  if call.module == 'Dropout':
    return f'dropout {f["rate"]:.0%}', 'other'
  if call.module == 'Dense':
    return f'linear, {f["features"]}', 'dense'
  return call.module, 'other'


class _Canvas:
  """Boxes and arrows in inches, y growing downwards, drawn on a matplotlib Figure."""

  def __init__(self):
    self.items = []  # (kind, args)
    self.bottom = 0.0

  def box(self, x, y, w, text, colour, bold=False):
    self.items.append(('box', (x, y, w, text, COLOURS[colour], bold)))
    self.bottom = max(self.bottom, y + BOX_H)
    return (x + w / 2, y, y + BOX_H)  # (centre x, top, bottom)

  def text(self, x, y, text, **kw):
    self.items.append(('text', (x, y, text, kw)))

  def arrow(self, x0, y0, x1, y1):
    self.items.append(('arrow', (x0, y0, x1, y1)))

  def frame(self, x, y, w, h):
    self.items.append(('frame', (x, y, w, h)))

  def render(self, title: str):
    # pylint: disable=import-outside-toplevel
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyBboxPatch
    # pylint: enable=import-outside-toplevel
    width, height = AUX_X + AUX_W + 0.6, self.bottom + 0.9
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.3, width - 0.3)
    ax.set_ylim(height - 0.6, -0.6)
    ax.axis('off')
    ax.text(0, -0.35, title, fontsize=10, weight='bold', va='center')
    for kind, args in self.items:
      if kind == 'box':
        x, y, w, text, colour, bold = args
        ax.add_patch(FancyBboxPatch((x, y), w, BOX_H, boxstyle='round,pad=0,rounding_size=0.06',
                                    facecolor=colour, edgecolor='#555555', linewidth=0.6))
        ax.text(x + w / 2, y + BOX_H / 2, text, ha='center', va='center', fontsize=7,
                weight='bold' if bold else 'normal')
      elif kind == 'text':
        x, y, text, kw = args
        ax.text(x, y, text, **{'fontsize': 7, 'va': 'center', **kw})
      elif kind == 'arrow':
        x0, y0, x1, y1 = args
        ax.annotate('', (x1, y1), (x0, y0), arrowprops=dict(
            arrowstyle='->', color='#555555', linewidth=0.6, shrinkA=0, shrinkB=0))
      else:
        x, y, w, h = args
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle='round,pad=0,rounding_size=0.1',
                                    facecolor='none', edgecolor='#999999', linewidth=0.8,
                                    linestyle='--'))
    return fig


def _inception(canvas: _Canvas, name: str, children: dict, out_shape, y: float, above):
  """Draws a block's four paths and their concatenation from `y`; returns its bottom."""
  col_w = (WIDTH - 0.6) / 4
  canvas.text(0.1, y + 0.15, name, weight='bold', fontsize=8)
  top = y + 0.35
  bottoms = []
  for i, names in enumerate(INCEPTION_PATHS):
    x = 0.3 + i * col_w
    prev = None
    for j, child in enumerate(names):
      text, colour = _label(children[child])
      centre, box_top, box_bottom = canvas.box(x + 0.05, top + j * (BOX_H + GAP), col_w - 0.1,
                                               text, colour)
      canvas.arrow(*(above if prev is None else (centre, prev)), centre, box_top)
      prev = box_bottom
    bottoms.append((x + col_w / 2, prev))
  concat_y = top + 2 * (BOX_H + GAP)
  centre, concat_top, concat_bottom = canvas.box(
      0.3, concat_y, WIDTH - 0.6, f'concatenate: {_shape(out_shape)}', 'concat', bold=True)
  for x, bottom in bottoms:
    canvas.arrow(x, bottom, x, concat_top)
  canvas.frame(0.0, y, WIDTH, concat_bottom - y + 0.1)
  return (centre, concat_bottom), concat_bottom + 0.1


def draw(prefix, image_size: int = 224, **model_kwargs) -> list[str]:
  """Writes the network as PREFIX.svg and PREFIX.png (local or gs://); returns their paths."""
  params, calls = summary.trace(image_size, train=True, **model_kwargs)
  children = {}
  for c in calls:
    children.setdefault(c.path[:-1], {})[c.path[-1]] = c
  layers = [c for c in calls if len(c.path) == 1]
  canvas = _Canvas()
  y = 0.0
  centre, top, bottom = canvas.box(WIDTH / 2 - 1.5, y, 3.0,
                                   f'input {_shape((image_size, image_size, 3))}', 'other')
  above = (centre, bottom)
  y = bottom + GAP
  aux_heads = []  # (head, the top of the block it reads)
  block_top = None
  for layer in layers:
    name = layer.path[0]
    if layer.module == 'AuxHead':  # it reads the block called just before it
      aux_heads.append((layer, block_top))
      continue
    if layer.module == 'Inception':
      block_top = y
      above, y_next = _inception(canvas, name, children[layer.path], layer.out_shape, y,
                                 above)
      y = y_next + GAP
      continue
    text, colour = _label(layer)
    text = text if text.startswith(name) else f'{name}: {text}'
    centre, top, bottom = canvas.box(WIDTH / 2 - 1.5, y, 3.0, text, colour)
    canvas.arrow(*above, centre, top)
    canvas.text(WIDTH / 2 + 1.65, y + BOX_H / 2, _shape(layer.out_shape), color='#333333')
    above = (centre, bottom)
    y = bottom + GAP
  for layer, ay in aux_heads:  # each beside the block it reads
    head = children[layer.path]
    conv = head['conv']
    rows = [(f'{layer.path[0]}: average pool to {_shape(conv.in_shape)}', 'pool'),
            *[_label(head[k]) for k in ('conv', 'fc1')],
            *[_label(c) for k, c in head.items() if c.module == 'Dropout'],
            _label(head['fc2'])]
    canvas.arrow(WIDTH, ay + 0.2, AUX_X, ay + 0.2)
    prev = None
    for i, (text, colour) in enumerate(rows):
      centre, top, bottom = canvas.box(AUX_X, ay + i * (BOX_H + 0.08), AUX_W, text,
                                       'aux' if i == 0 else colour)
      if prev is not None:
        canvas.arrow(centre, prev, centre, top)
      prev = bottom
    canvas.text(AUX_X, prev + 0.18, 'training only: loss weight 0.3', color='#333333',
                style='italic')
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  model = summary.GoogLeNet(**model_kwargs)
  fig = canvas.render(f'GoogLeNet ({model.variant}), {image_size}x{image_size} input, '
                      f'{model.num_classes} classes: {total:,} parameters')
  written = []
  for fmt in ('svg', 'png'):
    buffer = io.BytesIO()
    # Text stays text in the SVG: searchable, and smaller than glyph outlines.
    with matplotlib.rc_context({'svg.fonttype': 'none'}):
      fig.savefig(buffer, format=fmt, dpi=110,
                  metadata={'Date': None} if fmt == 'svg' else None)
    path = paths.path(f'{prefix}.{fmt}')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    written.append(str(path))
  return written
