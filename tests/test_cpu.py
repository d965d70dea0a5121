"""The CPU plug-in (gnet_jax/cpu): its oneDNN/C++ convolutions, fused inference
convolution, max pools and BatchNorms compute the same function as XLA's; its blocks give
the model's function; model_blocks decides where they are used; the fallbacks."""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax import lax
import flax.linen
import numpy as np
import pytest

from gnet_jax import cpu
from gnet_jax import model as model_lib
from gnet_jax.cpu import blocks, build, ops, pool

NHWC = ('NHWC', 'HWIO', 'NHWC')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_builds_and_registers_here():
  # CI's machine is Linux x86-64 with g++ and requirements.txt's oneDNN wheels: a
  # fallback there would hide a broken build.
  assert build.available()


def _value_and_grads(conv, x, w, strides, padding):
  def loss(x, w):
    y = conv(x, w, strides, padding, dimension_numbers=NHWC)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)


@pytest.mark.parametrize('batch,size,cin,cout,kernel,stride,padding', [
    (4, 9, 5, 7, 3, 1, ((1, 1), (1, 1))),  # 3x3 "same"
    (4, 12, 3, 8, 7, 2, ((3, 2), (3, 3))),  # conv1-like, asymmetric padding
    (2, 6, 16, 4, 1, 1, ((0, 0), (0, 0))),  # 1x1
    (3, 8, 4, 6, 2, 2, ((0, 1), (0, 1))),  # odd batch: one chunk, oneDNN's own threads
    (1, 7, 8, 8, 5, 1, ((2, 2), (2, 2))),  # a single image
])
def test_matches_xla_value_and_gradients(batch, size, cin, cout, kernel, stride, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, size, size, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, cin, cout)), jnp.float32)
  strides = (stride, stride)
  expected = _value_and_grads(lax.conv_general_dilated, x, w, strides, padding)
  got = _value_and_grads(ops.conv_general_dilated, x, w, strides, padding)
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(e))))


def _custom_calls(fn, *args):
  return jax.jit(fn).lower(*args).as_text().count('GnetConv')


def test_calls_onednn_for_float32_nhwc_and_xla_otherwise():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 4)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 4, 4)), jnp.float32)
  pad = ((1, 1), (1, 1))
  conv = ops.conv_general_dilated
  assert _custom_calls(lambda x, w: conv(x, w, (1, 1), pad, dimension_numbers=NHWC), x, w) == 1
  cases = {  # what onednn_kernels.cc does not cover: each stays XLA's, with XLA's result
      'bfloat16': lambda c, x, w: c(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1),
                                    pad, dimension_numbers=NHWC),
      'dilation': lambda c, x, w: c(x, w, (1, 1), pad, rhs_dilation=(2, 2),
                                    dimension_numbers=NHWC),
      'groups': lambda c, x, w: c(x, w[:, :, :2], (1, 1), pad, feature_group_count=2,
                                  dimension_numbers=NHWC),
      'NCHW': lambda c, x, w: c(x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), (1, 1), pad),
      'string padding': lambda c, x, w: c(x, w, (1, 1), 'SAME', dimension_numbers=NHWC),
  }
  for name, case in cases.items():
    ours = lambda x, w, case=case: case(conv, x, w)
    assert _custom_calls(ours, x, w) == 0, name
    np.testing.assert_array_equal(jax.jit(ours)(x, w),
                                  jax.jit(lambda x, w, case=case: case(lax.conv_general_dilated,
                                                                       x, w))(x, w), name)


@pytest.mark.parametrize('stride,padding', [(1, ((1, 1), (1, 1))), (2, ((3, 2), (3, 3)))])
def test_conv_bias_relu_matches_xla(stride, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 10, 10, 6)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 6, 8)) / 4, jnp.float32)
  b = jnp.asarray(rng.standard_normal(8), jnp.float32)

  def value_and_grads(fn):
    def loss(x, w, b):
      y = fn(x, w, b)
      return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, w, b)

  def xla(x, w, b):
    return jax.nn.relu(lax.conv_general_dilated(x, w, (stride, stride), padding,
                                                dimension_numbers=NHWC) + b)

  def ours(x, w, b):
    return ops.conv_bias_relu(x, w, b, (stride, stride), padding)

  assert jax.jit(ours).lower(x, w, b).as_text().count('GnetConvBiasReluForward') == 1
  for e, g in zip(jax.tree.leaves(value_and_grads(xla)), jax.tree.leaves(value_and_grads(ours))):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(e))))
  # bfloat16 stays on XLA.
  bf16 = [a.astype(jnp.bfloat16) for a in (x, w, b)]
  assert 'Gnet' not in jax.jit(ours).lower(*bf16).as_text()


def test_winograd_matches_xla_and_covers_its_layers_only(monkeypatch):
  """3x3 convolutions at stride 1 with 64+ channels each way and an even size go through
  Winograd F(2x2, 3x3) (forward, inference forward and input gradient); the rest, like
  GNET_JAX_WINOGRAD=0, through oneDNN's direct convolution."""
  rng = np.random.default_rng(0)
  pad = ((1, 1), (1, 1))

  def run(conv, x, w, b, dy):
    """relu(conv + b), conv and its gradients with respect to x and w."""
    def convolve(x, w):
      return conv(x, w, (1, 1), pad, dimension_numbers=NHWC)
    fused = jax.nn.relu(convolve(x, w) + b)
    if conv is ops.conv_general_dilated:
      fused = ops.conv_bias_relu(x, w, b, (1, 1), pad)
    y, vjp = jax.vjp(convolve, x, w)
    return (fused, y, *vjp(dy))

  for size, cin, cout, winograd in [(8, 64, 96, True), (7, 64, 64, False), (8, 32, 64, False)]:
    x = jnp.asarray(rng.standard_normal((4, size, size, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin), jnp.float32)
    b = jnp.asarray(rng.standard_normal(cout), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((4, size, size, cout)), jnp.float32)
    ours = jax.jit(functools.partial(run, ops.conv_general_dilated))
    got = ours(x, w, b, dy)
    for e, g in zip(run(lax.conv_general_dilated, x, w, b, dy), got):
      np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(e))))
    monkeypatch.setenv('GNET_JAX_WINOGRAD', '0')
    direct = ours(x, w, b, dy)
    monkeypatch.delenv('GNET_JAX_WINOGRAD')
    # Rounding differs between the two algorithms, in the forwards and the input gradient.
    for name, g, d in zip(['inference', 'forward', 'input gradient'], got, direct):
      assert (not np.array_equal(g, d)) == winograd, (size, cin, cout, name)


@pytest.mark.parametrize('shape', [
    (4, 9, 9, 16),  # rows split evenly between the pool's threads
    (3, 5, 7, 5),  # odd rows, channels not a multiple of the vector width
    (1, 2, 3, 130),  # a single image, 6 rows
])
def test_batch_norm_relu_matches_flax(shape):
  """ops.batch_norm_relu and model.batch_norm_relu (its XLA fallback) compute flax's
  BatchNorm in training then ReLU: output, running statistics and gradients."""
  rng = np.random.default_rng(0)
  c = shape[-1]
  x = jnp.asarray(rng.standard_normal(shape) * 2 + 0.5, jnp.float32)
  scale, bias = (jnp.asarray(rng.standard_normal(c), jnp.float32) for _ in range(2))
  mean, var = jnp.asarray(rng.standard_normal(c), jnp.float32), jnp.full((c,), 0.7)
  weights = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  bn = flax.linen.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3)

  def flax_bn(x, scale, bias, mean, var):
    y, state = bn.apply({'params': {'scale': scale, 'bias': bias},
                         'batch_stats': {'mean': mean, 'var': var}}, x,
                        mutable=['batch_stats'])
    return jax.nn.relu(y), state['batch_stats']['mean'], state['batch_stats']['var']

  xla = functools.partial(blocks.batch_norm_relu, epsilon=1e-3, momentum=0.9)
  ours = functools.partial(ops.batch_norm_relu, epsilon=1e-3, momentum=0.9, fallback=xla)

  def value_and_grads(fn):
    def loss(x, scale, bias):
      y, new_mean, new_var = fn(x, scale, bias, mean, var)
      return jnp.sum(y * weights), (y, new_mean, new_var)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, scale, bias)

  text = jax.jit(jax.grad(lambda x: ours(x, scale, bias, mean, var)[0].sum())).lower(x).as_text()
  assert text.count('@GnetBatchNormReluTraining(') == text.count('@GnetBatchNormReluBackward(') == 1
  expected = value_and_grads(flax_bn)
  for fn in (xla, ours):
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(value_and_grads(fn))):
      np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(e))))
  # bfloat16 stays on XLA.
  bf16 = [a.astype(jnp.bfloat16) for a in (x, scale, bias, mean, var)]
  assert 'Gnet' not in jax.jit(ours).lower(*bf16).as_text()


@pytest.mark.slow
@pytest.mark.parametrize('train', [False, True])
def test_model_same_function_with_and_without_onednn(train):
  """Every convolution, max pool and BatchNorm of the network goes to oneDNN or
  onednn_kernels.cc (in inference each conv -> BatchNorm -> ReLU is one fused call; at
  64x64 conv2 and every block's ch3x3 run as Winograd), with XLA's outputs, running
  statistics and parameter gradients. The gradients are compared as whole arrays
  (relative Frobenius norm): a rounding difference of 1e-7 that flips a near-tie inside a
  max pool's window sends that window's gradient elsewhere, which moves single entries by
  more."""
  kwargs = dict(num_classes=10, variant='torchvision', dropout_rate=0.0, aux_dropout_rate=0.0)
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  variables = model_lib.init_fn(jax.random.key(1), images, **kwargs)
  # Running statistics away from their initial 0 and 1, so that folding them matters.
  stats = jax.tree.map(lambda a: a + jax.random.uniform(jax.random.key(3), a.shape),
                       variables['batch_stats'])
  variables = {**variables, 'batch_stats': stats}
  weights = jax.random.normal(jax.random.key(2), (2, 10))
  # 57 convolutions and 13 max pools; in training also the two aux heads' convolutions.
  # Differentiated, a max pool keeps its maxima's positions (GnetMaxPoolTraining).
  expected_calls = {'@GnetConvForward(': 59 if train else 0,
                    '@GnetConvBiasReluForward(': 0 if train else 57,
                    '@GnetMaxPoolTraining(': 13, '@GnetMaxPoolBackward(': 13,
                    '@GnetBatchNormReluTraining(': 59 if train else 0,
                    '@GnetBatchNormReluBackward(': 59 if train else 0}

  onednn_blocks = dict(conv_block=blocks.OneDNNConv, pool_block=blocks.OneDNNMaxPool)

  def grads_and_outputs(use_onednn):
    def loss(params):
      outputs = model_lib.apply_fn({**variables, 'params': params}, images, train=train,
                                   **(onednn_blocks if use_onednn else {}), **kwargs)
      if train:  # the logits and aux logits, and the new running statistics
        logits, stats = outputs
        return sum(jnp.sum(o * weights) for o in logits), outputs
      return jnp.sum(outputs * weights), outputs
    lowered = jax.jit(jax.grad(loss, has_aux=True)).lower(variables['params'])
    text = lowered.as_text()
    for target, count in expected_calls.items():
      assert text.count(target) == (count if use_onednn else 0), target
    return lowered.compile()(variables['params'])

  (grads_xla, outputs_xla), (grads, outputs) = grads_and_outputs(False), grads_and_outputs(True)
  if not train:  # not differentiated, the pools need no positions
    text = jax.jit(functools.partial(model_lib.apply_fn, **onednn_blocks, **kwargs)).lower(
        variables, images).as_text()
    assert text.count('@GnetMaxPool(') == 13 and text.count('@GnetConvBiasReluForward(') == 57
  # In training, BatchNorm over 2 images (8 values per channel at 4e's 2x2) magnifies
  # rounding differences tenfold.
  rtol = 1e-3 if train else 1e-4
  for o, e in zip(jax.tree.leaves(outputs), jax.tree.leaves(outputs_xla)):
    np.testing.assert_allclose(o, e, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(e))) / 10)
  for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_xla)):
    assert np.linalg.norm(g - e) <= 2e-2 * np.linalg.norm(e) + 1e-12, jax.tree_util.keystr(path)


def test_programs_for_gpu_and_tpu_get_xla_ops(monkeypatch):
  """Where CPU is not JAX's default backend, every wrapper chooses at lowering: its
  oneDNN call in a program lowered for CPU, XLA's ops in one lowered for a GPU."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 4)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 4, 4)), jnp.float32)
  ones = jnp.ones(4)
  pad = ((1, 1), (1, 1))

  def loss(x, w):
    y = ops.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=NHWC)
    y, _, _ = ops.batch_norm_relu(
        y, ones, ones, ones, ones, epsilon=1e-3, momentum=0.9,
        fallback=functools.partial(blocks.batch_norm_relu, epsilon=1e-3, momentum=0.9))
    y = ops.max_pool(y, 3, 2, pad, fallback=pool.max_pool_gathered)
    return ops.conv_bias_relu(y, w, ones, (1, 1), pad).sum()

  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  traced = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, w)
  # conv forward, input and kernel gradients; BatchNorm forward and gradient; pool
  # forward and gradient; the fused conv (its gradient is the conv's two).
  assert traced.lower(lowering_platforms=('cpu',)).as_text().count('@Gnet') == 10
  assert '@Gnet' not in traced.lower(lowering_platforms=('cuda',)).as_text()


class _Device:
  def __init__(self, platform):
    self.platform = platform


def test_model_blocks_decide_per_platform_and_device_count():
  one_cpu, eight_cpus = [_Device('cpu')], [_Device('cpu')] * 8
  onednn = {'conv_block': blocks.OneDNNConv, 'pool_block': blocks.OneDNNMaxPool}
  assert cpu.model_blocks('auto', one_cpu) == onednn
  assert cpu.model_blocks('auto', eight_cpus) == {'pool_block': pool.GatherMaxPool}
  assert cpu.model_blocks('xla', one_cpu) == {'pool_block': pool.GatherMaxPool}
  assert cpu.model_blocks('onednn', eight_cpus) == onednn
  for platform in ('tpu', 'gpu'):  # the model's own blocks, whatever the choice
    assert cpu.model_blocks('onednn', [_Device(platform)]) == {}
  with pytest.raises(ValueError, match="cpu_convolutions must be one of .*'mkl'"):
    cpu.model_blocks('mkl', one_cpu)


def test_backends_started_without_jaxs_private_answer(monkeypatch):
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  assert cpu.flags.backends_started() is xla_bridge.backends_are_initialized()
  monkeypatch.delattr(xla_bridge, 'backends_are_initialized')
  assert cpu.flags.backends_started() is False


def test_the_model_never_imports_the_cpu_plugin():
  code = ('import sys, gnet_jax, gnet_jax.model, gnet_jax.layers, gnet_jax.spec\n'
          'print(sorted(m for m in sys.modules if m.startswith("gnet_jax.cpu")))')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == '[]'


def test_build_failure_says_why(tmp_path, monkeypatch):
  monkeypatch.setenv('GNET_JAX_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', 'false')  # a "compiler" that always fails
  with pytest.raises(build.Unavailable, match='compiling onednn_kernels.cc failed'):
    build.build()
  assert not list(tmp_path.rglob('*.so'))  # nothing half-written left behind


def test_each_onednn_location_gets_its_own_build(tmp_path, monkeypatch):
  """The library finds oneDNN through the path it was linked with: a build made for a
  virtual environment that is gone must not be reused by the next one (it cannot load)."""
  monkeypatch.setenv('GNET_JAX_CACHE', str(tmp_path / 'cache'))
  compiler = tmp_path / 'fake-c++'  # writes the rpath it was given as the "library"
  compiler.write_text('#!/bin/sh\nfor a; do case $a in -Wl,-rpath,*) r=$a;; esac; done\n'
                      'while [ "$1" != -o ]; do shift; done; echo "$r" > "$2"\n')
  compiler.chmod(0o755)
  monkeypatch.setenv('CXX', str(compiler))
  here = build.build()
  other_venv = tmp_path / 'other-venv' / 'lib'
  other_venv.mkdir(parents=True)
  real_package_file = build._package_file
  monkeypatch.setattr(build, '_package_file', lambda dist, name: (
      other_venv / name if dist == 'onednn-cpu-gomp' else real_package_file(dist, name)))
  there = build.build()
  assert here != there
  assert there.read_text().strip() == f'-Wl,-rpath,{other_venv}'
  assert build.build() == there  # and each is reused


@pytest.mark.slow
@pytest.mark.torch
def test_off_switch_and_other_libraries_loaded_first():
  """GNET_JAX_ONEDNN=0 keeps XLA's convolutions; with torch and TensorFlow (which carry
  their own oneDNN) imported first, the results are still right."""
  code = (
      'import torch, tensorflow, jax, jax.numpy as jnp, numpy as np\n'
      'from jax import lax\n'
      'from gnet_jax.cpu import build, ops\n'
      'x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 9, 8)), jnp.float32)\n'
      'w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 8, 16)), jnp.float32)\n'
      'args = (x, w, (2, 2), ((1, 1), (1, 1)))\n'
      'dn = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))\n'
      'np.testing.assert_allclose(ops.conv_general_dilated(*args, **dn),\n'
      '                           lax.conv_general_dilated(*args, **dn), rtol=1e-4, atol=1e-4)\n'
      'print("available", build.available())\n')
  for switch, expected in (('1', 'available True'), ('0', 'available False')):
    env = {**os.environ, 'GNET_JAX_ONEDNN': switch, 'TF_CPP_MIN_LOG_LEVEL': '3'}
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True).stdout
    assert expected in out
