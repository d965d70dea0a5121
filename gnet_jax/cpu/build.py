"""Builds onednn_kernels.cc with the system's C++ compiler and registers its XLA FFI targets.

The library is compiled on first use against the oneDNN of the `onednn-cpu-gomp` /
`onednn-devel-cpu-gomp` wheels (requirements.txt) and kept in
`~/.cache/gnet_jax/onednn` (`GNET_JAX_CACHE`), keyed by source, flags, versions and
where oneDNN lives (the library finds it by that path, so every virtual environment gets
its own build and a deleted one leaves no build behind that cannot load).
Where it cannot be built or loaded (no compiler, not Linux x86-64), `available()` says
why once and returns False; `GNET_JAX_ONEDNN=0` turns it off.
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

SOURCE = pathlib.Path(__file__).with_name('onednn_kernels.cc')
TARGETS = ('GnetConvForward', 'GnetConvBiasReluForward', 'GnetConvBackwardData',
           'GnetConvBackwardWeights', 'GnetMaxPool', 'GnetMaxPoolTraining',
           'GnetMaxPoolBackward', 'GnetBatchNormReluTraining', 'GnetBatchNormReluBackward')
# -O3: the BatchNorm loops are vectorised only at -O3 with g++ 12; -fopenmp-simd honours
# the Winograd transforms' `omp simd` loops (no OpenMP runtime involved).
CXXFLAGS = ('-O3', '-fopenmp-simd', '-std=c++17', '-shared', '-fPIC', '-w')


class Unavailable(RuntimeError):
  """The oneDNN kernels cannot be built or loaded here; the message says why."""


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


def build() -> pathlib.Path:
  """The compiled library, built once per source, flags, jaxlib, oneDNN version and path."""
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
      SOURCE.read_bytes(), ' '.join(CXXFLAGS).encode(),
      importlib.metadata.version('jaxlib').encode(),
      importlib.metadata.version('onednn-cpu-gomp').encode(), compiler.encode(),
      str(libdnnl.parent).encode()]))
  cache = pathlib.Path(os.environ.get('GNET_JAX_CACHE',
                                      pathlib.Path.home() / '.cache' / 'gnet_jax'))
  target = cache / 'onednn' / key.hexdigest()[:16] / 'libgnet_onednn.so'
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  logging.info('gnet_jax: compiling the oneDNN kernels into %s (once)', target)
  # Compiled under a temporary name and renamed: a reader never sees half a library.
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    out = pathlib.Path(tmp) / target.name
    command = [compiler, *CXXFLAGS, f'-I{jax.ffi.include_dir()}', f'-I{include}',
               str(SOURCE), '-o', str(out), f'-L{libdnnl.parent}', '-ldnnl', '-lgomp',
               f'-Wl,-rpath,{libdnnl.parent}']
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise Unavailable(f'compiling {SOURCE.name} failed:\n{" ".join(command)}\n'
                        f'{result.stderr[-3000:]}')
    os.replace(out, target)
  return target


@functools.cache
def available() -> bool:
  """Whether the oneDNN kernels are built and registered (once per process)."""
  if os.environ.get('GNET_JAX_ONEDNN', '1') == '0':
    return False
  try:
    path = build()
    # DEEPBIND: oneDNN's symbols from its own library, not from a copy another library
    # loaded into the process (torch and TensorFlow carry their own).
    library = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL | os.RTLD_DEEPBIND)
  except (Unavailable, OSError) as e:
    logging.warning('gnet_jax: CPU convolutions, max pools and BatchNorms stay on XLA: %s', e)
    return False
  for name in TARGETS:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)),
                                platform='cpu')
  return True
