"""float32 convolutions on CPU with oneDNN, as XLA FFI calls with their own gradient.

XLA CPU computes convolutions with Eigen, whose kernel gradients run at a fraction of
oneDNN's (the library PyTorch uses) on GoogLeNet's shapes: with these the CPU train step
is 1.18x faster and inference 1.14x (BENCHMARKS.md, change 8). `conv_general_dilated`
is a drop-in for `lax.conv_general_dilated` (flax's `nn.Conv(conv_general_dilated=...)`):
on CPU it calls `onednn_conv.cc`, elsewhere (GPU, TPU) and for what that file does not
cover (other dtypes, dilation, groups, other layouts) it is `lax.conv_general_dilated`.

The C++ file is compiled on first use with the system's C++ compiler against the oneDNN
of the `onednn-cpu-gomp` / `onednn-devel-cpu-gomp` wheels (requirements.txt) and kept in
`~/.cache/gnet_jax/onednn` (`GNET_JAX_CACHE`), keyed by source and versions. Where it
cannot be built or loaded (no compiler, not Linux x86-64), `available()` says why once
and everything stays on XLA. `GNET_JAX_ONEDNN=0` turns it off.

XLA cannot split these calls over devices: a program sharded over several devices would
run each of them whole on every device. `train_lib` therefore uses them only when the
step runs on a single CPU device.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

SOURCE = pathlib.Path(__file__).with_name('onednn_conv.cc')
_TARGETS = ('GnetConvForward', 'GnetConvBackwardData', 'GnetConvBackwardWeights')
_NHWC = ('NHWC', 'HWIO', 'NHWC')


class Unavailable(RuntimeError):
  """The oneDNN convolutions cannot be built or loaded here; the message says why."""


def _package_file(dist: str, name: str) -> pathlib.Path:
  try:
    files = importlib.metadata.files(dist) or []
  except importlib.metadata.PackageNotFoundError:
    raise Unavailable(f'the {dist} package is not installed (pip install {dist}; '
                      'requirements.txt has it for Linux x86-64)') from None
  for f in files:
    if f.name == name:
      return pathlib.Path(f.locate()).resolve()
  raise Unavailable(f'{dist} has no {name}; reinstall it')


def _build() -> pathlib.Path:
  """The compiled library, built once per source, jaxlib and oneDNN version."""
  if platform.system() != 'Linux' or platform.machine() != 'x86_64':
    raise Unavailable(f'oneDNN wheels exist for Linux x86-64, not {platform.system()} '
                      f'{platform.machine()}')
  header = _package_file('onednn-devel-cpu-gomp', 'dnnl.hpp')
  include = header.parent.parent if header.parent.name == 'dnnl' else header.parent
  libdnnl = _package_file('onednn-cpu-gomp', 'libdnnl.so')
  compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if not compiler:
    raise Unavailable('no C++ compiler found (install g++, or set CXX)')
  key = hashlib.sha256(b'\0'.join([
      SOURCE.read_bytes(), importlib.metadata.version('jaxlib').encode(),
      importlib.metadata.version('onednn-cpu-gomp').encode(), compiler.encode()]))
  cache = pathlib.Path(os.environ.get('GNET_JAX_CACHE',
                                      pathlib.Path.home() / '.cache' / 'gnet_jax'))
  target = cache / 'onednn' / key.hexdigest()[:16] / 'libgnet_onednn.so'
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  logging.info('gnet_jax: compiling the oneDNN convolutions into %s (once)', target)
  # Compiled under a temporary name and renamed: a reader never sees half a library.
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    out = pathlib.Path(tmp) / target.name
    command = [compiler, '-O2', '-std=c++17', '-shared', '-fPIC', '-w',
               f'-I{jax.ffi.include_dir()}', f'-I{include}', str(SOURCE), '-o', str(out),
               f'-L{libdnnl.parent}', '-ldnnl', '-lgomp', f'-Wl,-rpath,{libdnnl.parent}']
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise Unavailable(f'compiling {SOURCE.name} failed:\n{" ".join(command)}\n'
                        f'{result.stderr[-3000:]}')
    os.replace(out, target)
  return target


@functools.cache
def available() -> bool:
  """Whether the oneDNN convolutions are built and registered (once per process)."""
  if os.environ.get('GNET_JAX_ONEDNN', '1') == '0':
    return False
  try:
    path = _build()
    # DEEPBIND: oneDNN's symbols from its own library, not from a copy another library
    # loaded into the process (torch and TensorFlow carry their own).
    library = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL | os.RTLD_DEEPBIND)
  except (Unavailable, OSError) as e:
    logging.warning('gnet_jax: CPU convolutions stay on XLA: %s', e)
    return False
  for name in _TARGETS:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)),
                                platform='cpu')
  return True


def _call(target: str, result, a, b, strides, padding):
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(result.shape, result.dtype))(
      a, b, strides=np.asarray(strides, np.int64),
      padding=np.asarray([p for pair in padding for p in pair], np.int64))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, padding):
  out = jax.eval_shape(functools.partial(lax.conv_general_dilated, window_strides=strides,
                                         padding=padding, dimension_numbers=_NHWC), x, w)
  return _call('GnetConvForward', out, x, w, strides, padding)


def _conv_fwd(x, w, strides, padding):
  return _conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, residuals, dy):
  x, w = residuals
  return (_call('GnetConvBackwardData', x, dy, w, strides, padding),
          _call('GnetConvBackwardWeights', w, x, dy, strides, padding))


_conv.defvjp(_conv_fwd, _conv_bwd)


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
      lhs.ndim == 4 and lhs.dtype == rhs.dtype == jnp.float32
      and preferred_element_type in (None, jnp.float32)
      and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc
      and not isinstance(padding, str) and min(p for pair in padding for p in pair) >= 0
      and all(d in (None, 1) or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
      and feature_group_count == batch_group_count == 1)
  if not (supported and available()):
    return xla(lhs, rhs)
  strides = tuple(int(s) for s in window_strides)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return lax.platform_dependent(lhs, rhs, cpu=lambda x, w: _conv(x, w, strides, pads),
                                default=xla)
