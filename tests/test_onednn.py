"""The oneDNN CPU convolutions (gnet_jax/onednn.py): same function as XLA's, and the
fallbacks."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax import lax
import ml_collections
import numpy as np
import pytest

from gnet_jax import model as model_lib
from gnet_jax import onednn, train_lib

NHWC = ('NHWC', 'HWIO', 'NHWC')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_builds_and_registers_here():
  # CI's machine is Linux x86-64 with g++ and requirements.txt's oneDNN wheels: a
  # fallback there would hide a broken build.
  assert onednn.available()


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
  got = _value_and_grads(onednn.conv_general_dilated, x, w, strides, padding)
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(e))))


def _custom_calls(fn, *args):
  return jax.jit(fn).lower(*args).as_text().count('GnetConv')


def test_calls_onednn_for_float32_nhwc_and_xla_otherwise():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 4)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 4, 4)), jnp.float32)
  pad = ((1, 1), (1, 1))
  conv = onednn.conv_general_dilated
  assert _custom_calls(lambda x, w: conv(x, w, (1, 1), pad, dimension_numbers=NHWC), x, w) == 1
  cases = {  # what onednn_conv.cc does not cover: each stays XLA's, with XLA's result
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


def test_model_same_function_with_and_without_onednn():
  """Every convolution of the network goes to oneDNN, with XLA's logits and parameter
  gradients. The gradients are compared as whole arrays (relative Frobenius norm): a
  rounding difference of 1e-7 that flips a near-tie inside a max pool's window sends
  that window's gradient elsewhere, which moves single entries by more."""
  kwargs = dict(num_classes=10, variant='torchvision')
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  variables = model_lib.init_fn(jax.random.key(1), images, **kwargs)
  weights = jax.random.normal(jax.random.key(2), (2, 10))

  def grads_and_logits(onednn_convs):
    def loss(params):
      logits = model_lib.apply_fn({**variables, 'params': params}, images,
                                  onednn=onednn_convs, **kwargs)
      return jnp.sum(logits * weights), logits
    lowered = jax.jit(jax.grad(loss, has_aux=True)).lower(variables['params'])
    assert lowered.as_text().count('GnetConvForward') == (57 if onednn_convs else 0)
    return lowered.compile()(variables['params'])

  (grads_xla, logits_xla), (grads, logits) = grads_and_logits(False), grads_and_logits(True)
  np.testing.assert_allclose(logits, logits_xla, rtol=1e-4, atol=1e-5)
  for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_xla)):
    assert np.linalg.norm(g - e) <= 2e-2 * np.linalg.norm(e) + 1e-12, jax.tree_util.keystr(path)


def test_auto_uses_onednn_on_one_cpu_device_only():
  config = ml_collections.ConfigDict({'model': {'cpu_convolutions': 'auto'}})
  assert train_lib.use_onednn(config, num_devices=1)
  assert not train_lib.use_onednn(config, num_devices=8)
  config.model.cpu_convolutions = 'xla'
  assert not train_lib.use_onednn(config, num_devices=1)
  config.model.cpu_convolutions = 'onednn'
  assert train_lib.use_onednn(config, num_devices=8)
  config.model.cpu_convolutions = 'mkl'
  with pytest.raises(ValueError, match="cpu_convolutions must be one of .*'mkl'"):
    train_lib.use_onednn(config, num_devices=1)


def test_build_failure_says_why(tmp_path, monkeypatch):
  monkeypatch.setenv('GNET_JAX_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', 'false')  # a "compiler" that always fails
  with pytest.raises(onednn.Unavailable, match='compiling onednn_conv.cc failed'):
    onednn._build()  # pylint: disable=protected-access
  assert not list(tmp_path.rglob('*.so'))  # nothing half-written left behind


def test_off_switch_and_other_libraries_loaded_first():
  """GNET_JAX_ONEDNN=0 keeps XLA's convolutions; with torch and TensorFlow (which carry
  their own oneDNN) imported first, the results are still right."""
  code = (
      'import torch, tensorflow, jax, jax.numpy as jnp, numpy as np\n'
      'from jax import lax\n'
      'from gnet_jax import onednn\n'
      'x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 9, 8)), jnp.float32)\n'
      'w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 8, 16)), jnp.float32)\n'
      'args = (x, w, (2, 2), ((1, 1), (1, 1)))\n'
      'dn = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))\n'
      'np.testing.assert_allclose(onednn.conv_general_dilated(*args, **dn),\n'
      '                           lax.conv_general_dilated(*args, **dn), rtol=1e-4, atol=1e-4)\n'
      'print("available", onednn.available())\n')
  for switch, expected in (('1', 'available True'), ('0', 'available False')):
    env = {**os.environ, 'GNET_JAX_ONEDNN': switch, 'TF_CPP_MIN_LOG_LEVEL': '3'}
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True).stdout
    assert expected in out
