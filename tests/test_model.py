"""The model: shapes of the seed's walkthrough, per-block costs, variants, API, errors."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gnet_jax import GoogLeNetOutputs, Inception, apply_fn, init_fn, layers
from gnet_jax import images as images_lib
from gnet_jax import model as model_lib
from gnet_jax import summary
from gnet_jax.cpu import ops, pool


# Jitted once per set of options: eager Flax runs op by op, which is slow on CPU.
OPTIONS = ('variant', 'num_classes', 'aux_logits', 'use_bn', 'transform_input', 'dtype')
init = jax.jit(init_fn, static_argnames=OPTIONS)
apply = jax.jit(apply_fn, static_argnames=('train',) + OPTIONS)


def count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def shapes_of(fn, *args):
  return jax.eval_shape(fn, *args)


# Every shape of the seed's walkthrough (shared/reference/GOOGLENET.md, paper variant).
SEED_SHAPES = [
    ('input', (224, 224, 3)), ('conv1', (112, 112, 64)), ('pool1', (56, 56, 64)),
    ('conv2_reduce', (56, 56, 64)), ('conv2', (56, 56, 192)), ('pool2', (28, 28, 192)),
    ('inception_3a', (28, 28, 256)), ('inception_3b', (28, 28, 480)),
    ('pool3', (14, 14, 480)), ('inception_4a', (14, 14, 512)),
    ('inception_4b', (14, 14, 512)), ('inception_4c', (14, 14, 512)),
    ('inception_4d', (14, 14, 528)), ('inception_4e', (14, 14, 832)),
    ('pool4', (7, 7, 832)), ('inception_5a', (7, 7, 832)), ('inception_5b', (7, 7, 1024)),
    ('avg_pool', (1024,)), ('dropout', (1024,)), ('classifier', (1000,)),
]

# Conv-weight count of each block, computed in the reference from Table 1's widths.
BLOCK_CONV_WEIGHTS = {
    'inception_3a': 163_328, 'inception_3b': 388_096, 'inception_4a': 375_552,
    'inception_4b': 448_512, 'inception_4c': 509_440, 'inception_4d': 604_672,
    'inception_4e': 867_328, 'inception_5a': 1_042_432, 'inception_5b': 1_442_816,
}
BLOCK_MACS_M = {'inception_3a': 128.0, 'inception_3b': 304.3, 'inception_4a': 73.6,
                'inception_4b': 87.9, 'inception_4c': 99.9, 'inception_4d': 118.5,
                'inception_4e': 170.0, 'inception_5a': 51.1, 'inception_5b': 70.7}


@pytest.fixture(scope='module')
def paper_rows():
  return {r.name: r for r in summary.layer_rows(224)}


def test_single_block_example():
  x = jnp.zeros((1, 224, 224, 3))
  block = Inception(ch1x1=64, ch3x3_reduce=96, ch3x3=128, ch5x5_reduce=16, ch5x5=32,
                    pool_proj=32)
  out = shapes_of(lambda x: block.apply(block.init(jax.random.key(0), x), x), x)
  assert out.shape == (1, 224, 224, 256)


def test_seed_walkthrough_shapes(paper_rows):
  assert [(r.name, r.shape) for r in paper_rows.values() if r.shape is not None] == SEED_SHAPES


def test_block_conv_weights_and_macs(paper_rows):
  for name, weights in BLOCK_CONV_WEIGHTS.items():
    assert paper_rows[name].conv_weights == weights, name
    assert round(paper_rows[name].macs / 1e6, 1) == BLOCK_MACS_M[name], name
  total = sum(r.macs for r in paper_rows.values() if r.shape is not None)
  assert 1.5e9 < total < 1.6e9  # "about 1.5 G multiply-adds per 224x224 image"


def test_paper_block_paths_have_table_widths(paper_rows):
  params = shapes_of(lambda x: init_fn(jax.random.key(0), x), jnp.zeros((1, 224, 224, 3)))
  block = params['params']['inception_4d']
  assert block['ch3x3_reduce']['conv']['kernel'].shape == (1, 1, 512, 144)
  assert block['ch5x5']['conv']['kernel'].shape == (5, 5, 32, 64)
  assert block['pool_proj']['conv']['kernel'].shape == (1, 1, 512, 64)


def test_reduction_example():
  assert summary.reduction_example() == (221_184, 129_024)


def test_summary_cli(capsys):
  summary.main(['--image_size', '224'])
  out = capsys.readouterr().out
  for figure in ('163,328', '1,442,816', '159K, 128M', '221,184', '129,024', '1.58G'):
    assert figure in out
  summary.main(['--variant', 'torchvision', '--no_aux'])
  assert '6,624,904' in capsys.readouterr().out


def test_explained_reductions_are_the_blocks_arithmetic(paper_rows):
  """summary --explain, read off the traced model, against Table 1's widths by hand: with
  the 1x1 reductions the block's own row; without, the 3x3 and 5x5 on the block's input."""
  costs = {c.name: c for c in summary.reduction_costs(224)}
  assert list(costs) == list(model_lib.INCEPTION_WIDTHS)
  assert costs['inception_3a'].in_shape == (28, 28, 192)
  for name, (c1, _, c3, _, c5, pp) in model_lib.INCEPTION_WIDTHS.items():
    cost, row = costs[name], paper_rows[name]
    h, w, cin = cost.in_shape
    assert (cost.params, cost.macs) == (row.params, row.macs)
    weights = cin * (c1 + 9 * c3 + 25 * c5 + pp)
    assert cost.params_without == weights + 2 * (c1 + c3 + c5 + pp)  # + BatchNorm's
    assert cost.macs_without == weights * h * w
    assert cost.params < cost.params_without and cost.macs < cost.macs_without


def test_summary_explain_cli(capsys):
  summary.main(['--explain'])
  out = capsys.readouterr().out
  costs = summary.reduction_costs(224)
  assert '393,728' in out  # 3a without its reductions
  assert f"{sum(c.params_without for c in costs):,}" in out.splitlines()[-2]


@pytest.mark.parametrize('options', [[], ['--variant', 'torchvision', '--image_size', '160']])
def test_network_picture_names_every_layer(tmp_path, options, capsys):
  summary.main([*options, '--draw', str(tmp_path / 'net')])
  assert f"wrote {tmp_path / 'net.svg'}" in capsys.readouterr().out
  svg = (tmp_path / 'net.svg').read_text()
  assert (tmp_path / 'net.png').read_bytes().startswith(b'\x89PNG')
  size = int(options[-1]) if options else 224
  _, calls = summary.trace(size, train=True, variant=options[1] if options else 'paper')
  for call in calls:
    if len(call.path) == 1:  # every layer, every block, both aux heads
      assert f'>{call.path[0]}' in svg, call.path
  for shape in ('28x28x256', '7x7x1024') if not options else ('20x20x256', '5x5x1024'):
    assert f'concatenate: {shape}' in svg
  assert ('5x5 conv, 32' in svg) == (not options)  # path 3: 5x5 in the paper only


@pytest.mark.parametrize('aux_logits, expected', [(False, 6_624_904), (True, 13_004_888)])
def test_torchvision_parameter_counts(aux_logits, expected):
  variables = shapes_of(
      lambda x: init_fn(jax.random.key(0), x, variant='torchvision', aux_logits=aux_logits),
      jnp.zeros((1, 224, 224, 3)))
  assert count(variables['params']) == expected


def test_torchvision_differences():
  variables = shapes_of(lambda x: init_fn(jax.random.key(0), x, variant='torchvision'),
                        jnp.zeros((1, 224, 224, 3)))
  assert variables['params']['inception_3a']['ch5x5']['conv']['kernel'].shape == (3, 3, 16, 32)
  rows = {r.name: r.shape for r in summary.layer_rows(160, variant='torchvision')}
  paper_rows = {r.name: r.shape for r in summary.layer_rows(160)}
  # 160 -> 80 -> ceil-mode 40 -> 20 -> 10 -> 2x2 pool 5; the paper's padded pools agree
  # here, and differ at 299 (see test_ceil_mode_pool for the arithmetic itself).
  assert rows['pool4'] == (5, 5, 832) and paper_rows['pool4'] == (5, 5, 832)
  rows = {r.name: r.shape for r in summary.layer_rows(299, variant='torchvision')}
  paper_rows = {r.name: r.shape for r in summary.layer_rows(299)}
  assert rows['pool3'] == (18, 18, 480) and paper_rows['pool3'] == (19, 19, 480)


def torch_ceil_max_pool(x, window, stride):
  """numpy reference of torch.nn.MaxPool2d(window, stride, ceil_mode=True) on NHWC."""
  def out_size(n):
    out = -(-(n - window) // stride) + 1
    return out - 1 if (out - 1) * stride >= n else out
  n, h, w, c = x.shape
  oh, ow = out_size(h), out_size(w)
  y = np.empty((n, oh, ow, c), x.dtype)
  for i in range(oh):
    for j in range(ow):
      y[:, i, j] = x[:, i * stride:i * stride + window, j * stride:j * stride + window].max((1, 2))
  return y


# The model's max pool (XLA's), the gathered-gradient one and the CPU plug-in's oneDNN one.
MAX_POOLS = {'xla': lambda x, window, stride, padding: layers.MaxPool(window, stride).pool(
                 x, padding),
             'gathered': pool.max_pool_gathered,
             'onednn': functools.partial(ops.max_pool, fallback=pool.max_pool_gathered)}


@pytest.mark.parametrize('pool', MAX_POOLS)
@pytest.mark.parametrize('size, window', [(112, 3), (56, 3), (28, 3), (14, 2), (15, 3),
                                          (8, 2), (7, 3)])
def test_ceil_mode_pool(size, window, pool):
  x = np.random.default_rng(0).normal(size=(2, size, size + 1, 3)).astype(np.float32)
  padding = layers.ceil_mode_padding(x, window, 2)
  np.testing.assert_array_equal(np.asarray(MAX_POOLS[pool](x, window, 2, padding)),
                                torch_ceil_max_pool(x, window, 2))


def first_max_pool_grad(xp, g, window, stride):
  """numpy reference: each window's gradient goes to its first maximum (row-major), as
  in torch and XLA's select-and-scatter."""
  dxp = np.zeros_like(xp)
  for n, i, j, c in np.ndindex(g.shape):
    patch = xp[n, i * stride:i * stride + window, j * stride:j * stride + window, c]
    a, b = np.unravel_index(np.argmax(patch), patch.shape)  # argmax takes the first
    dxp[n, i * stride + a, j * stride + b, c] += g[n, i, j, c]
  return dxp


@pytest.mark.parametrize('pool', MAX_POOLS)
@pytest.mark.parametrize('window, stride, padding', [
    (3, 2, ((1, 1), (1, 1))),  # paper's stride-2 pools
    (3, 2, ((0, 1), (0, 0))),  # a ceil-mode pool
    (2, 2, ((0, 0), (0, 0))),  # torchvision's pool4
    (3, 1, ((1, 1), (1, 1))),  # the Inception block's pool path
])
def test_max_pool_gradient(window, stride, padding, pool):
  # ReLU-like values rounded to quarters: many ties, as after a real ReLU.
  rng = np.random.default_rng(0)
  x = np.round(np.maximum(rng.normal(size=(2, 9, 8, 3)), 0) * 4).astype(np.float32) / 4
  pool_fn = lambda x: MAX_POOLS[pool](x, window, stride, padding)
  if pool == 'onednn':  # the forward keeps the maxima's positions for the gradient
    text = jax.jit(jax.grad(lambda x: pool_fn(x).sum())).lower(x).as_text()
    assert 'GnetMaxPoolTraining' in text and 'GnetMaxPoolBackward' in text
  y, vjp = jax.vjp(pool_fn, x)
  expected_y, expected_vjp = jax.vjp(
      lambda x: nn.max_pool(x, (window, window), (stride, stride), padding), x)
  np.testing.assert_array_equal(y, expected_y)
  g = rng.normal(size=y.shape).astype(np.float32)
  (dx,), (expected_dx,) = vjp(g), expected_vjp(g)
  np.testing.assert_allclose(dx, expected_dx, atol=1e-6)
  xp = np.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-np.inf)
  (top, _), (left, _) = padding
  np.testing.assert_allclose(dx, first_max_pool_grad(xp, g, window, stride)[
      :, top:top + x.shape[1], left:left + x.shape[2]], atol=1e-6)


@pytest.mark.parametrize('variant', ['paper', 'torchvision'])
@pytest.mark.parametrize('hw', [(32, 32), (96, 96), (224, 224), (299, 299), (64, 160)])
def test_any_input_size(variant, hw):
  x = jnp.zeros((2, *hw, 3))
  logits = shapes_of(lambda x: apply_fn(init_fn(jax.random.key(0), x, variant=variant), x,
                                        variant=variant), x)
  assert logits.shape == (2, 1000)


@pytest.fixture(scope='module')
def small():
  """Variables and a batch of 32x32 images: the full network, small inputs."""
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  return init(jax.random.key(0), images, num_classes=10), images


def test_eval_gives_logits_and_train_gives_aux(small):
  variables, images = small
  logits = apply(variables, images, num_classes=10)
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  outputs, batch_stats = apply(variables, images, train=True,
                                  dropout_key=jax.random.key(2), num_classes=10)
  assert isinstance(outputs, GoogLeNetOutputs)
  assert outputs.logits.shape == outputs.aux_4a.shape == outputs.aux_4d.shape == (4, 10)
  # Training updates the running statistics.
  assert jax.tree.structure(batch_stats) == jax.tree.structure(variables['batch_stats'])
  old = variables['batch_stats']['conv1']['bn']['mean']
  assert not np.allclose(batch_stats['conv1']['bn']['mean'], old)
  # Without aux heads: plain logits in training mode too, and no aux parameters.
  no_aux = shapes_of(lambda x: init_fn(jax.random.key(0), x, num_classes=10,
                                        aux_logits=False), images)
  assert 'aux_4a' not in no_aux['params'] and 'aux_4a' in variables['params']
  logits, _ = shapes_of(lambda v, x: apply_fn(v, x, train=True, dropout_key=jax.random.key(2),
                                              num_classes=10, aux_logits=False), no_aux, images)
  assert logits.shape == (4, 10)


def test_eval_is_deterministic_and_dropout_is_not(small):
  variables, images = small
  a = apply(variables, images, num_classes=10)
  np.testing.assert_array_equal(a, apply(variables, images, num_classes=10))
  t1, _ = apply(variables, images, train=True, dropout_key=jax.random.key(1), num_classes=10)
  t2, _ = apply(variables, images, train=True, dropout_key=jax.random.key(2), num_classes=10)
  assert not np.allclose(t1.logits, t2.logits)


def test_init_deterministic_in_key(small):
  variables, images = small
  same = init(jax.random.key(0), images, num_classes=10)
  other = init(jax.random.key(1), images, num_classes=10)
  jax.tree.map(np.testing.assert_array_equal, variables, same)
  assert not np.allclose(variables['params']['conv1']['conv']['kernel'],
                         other['params']['conv1']['conv']['kernel'])


@pytest.mark.slow  # a third compile of the network; the train steps take gradients in the fast tier
def test_jit_and_grad(small):
  variables, images = small
  labels = jnp.arange(4) % 10

  @jax.jit
  def loss_and_grad(params, batch_stats, images, key):
    def loss_fn(params):
      (outputs, new_stats) = apply_fn({'params': params, 'batch_stats': batch_stats}, images,
                                      train=True, dropout_key=key, num_classes=10)
      logp = jax.nn.log_softmax(outputs.logits)
      return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1)), new_stats
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, _), grads = loss_and_grad(variables['params'], variables['batch_stats'], images,
                                   jax.random.key(0))
  assert np.isfinite(loss)
  assert jax.tree.structure(grads) == jax.tree.structure(variables['params'])
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads['conv1']['conv']['kernel']).sum()) > 0
  assert float(jnp.abs(grads['aux_4a']['fc2']['kernel']).sum()) == 0  # aux not in this loss


def test_bf16_close_to_float32(small):
  variables, images = small
  f32 = apply(variables, images, num_classes=10)
  bf16 = apply(variables, images, num_classes=10, dtype=jnp.bfloat16)
  assert bf16.dtype == jnp.float32  # logits come back in float32
  assert bool(jnp.all(jnp.isfinite(bf16)))
  assert float(jnp.max(jnp.abs(bf16 - f32)) / jnp.max(jnp.abs(f32))) < 0.05
  # Parameters stay float32 when computing in bf16.
  params = shapes_of(lambda x: init_fn(jax.random.key(0), x, num_classes=10,
                                       dtype=jnp.bfloat16), images)['params']
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype('float32')}


@pytest.mark.slow  # two more compiles of the network
def test_without_batchnorm():
  images = jnp.ones((2, 32, 32, 3))
  variables = init(jax.random.key(0), images, num_classes=10, use_bn=False)
  assert 'batch_stats' not in variables
  assert 'bias' in variables['params']['conv1']['conv']
  logits = apply(variables, images, num_classes=10, use_bn=False)
  assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.slow  # two more compiles of the network
def test_transform_input():
  images = jnp.zeros((1, 32, 32, 3))
  options = dict(variant='torchvision', num_classes=10)
  variables = init(jax.random.key(0), images, **options)
  mean = np.array(images_lib.MEAN_RGB)
  # Normalised zero is the channel mean, which the transform maps to (mean - 0.5) / 0.5.
  np.testing.assert_allclose(apply(variables, images, transform_input=True, **options),
                             apply(variables, images + (mean - 0.5) / 0.5, **options),
                             rtol=1e-5, atol=1e-6)


def test_functional_api_defaults_inside_jit():
  images = jnp.zeros((1, 224, 224, 3))
  variables = shapes_of(lambda x: init_fn(jax.random.key(0), x), images)
  assert shapes_of(apply_fn, variables, images).shape == (1, 1000)
  tv_variables = shapes_of(lambda x: init_fn(jax.random.key(0), x, variant='torchvision'),
                           images)
  forward = jax.jit(functools.partial(apply_fn, variant='torchvision'))
  assert shapes_of(forward, tv_variables, images).shape == (1, 1000)


@pytest.mark.parametrize('shape, message', [
    ((32, 32, 3), 'rank 4'),
    ((1, 32, 32, 1), '3-channel'),
    ((1, 3, 32, 32), '3-channel'),
    ((1, 16, 64, 3), 'at least 32x32'),
])
def test_bad_inputs(shape, message):
  with pytest.raises(ValueError, match=message):
    init_fn(jax.random.key(0), jnp.zeros(shape))


def test_bad_variant():
  with pytest.raises(ValueError, match='variant must be one of'):
    init_fn(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), variant='resnet')
