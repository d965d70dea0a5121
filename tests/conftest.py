"""Shared test fixtures."""
import json
import os
import subprocess
import sys

import pytest

# Tests run JAX on the CPU, whatever else is installed: libtpu (the `tpu` extra) would ask
# a cloud metadata server about its machine as JAX started it, and nothing may leave this
# machine (bench/tpu_report.py compiles for TPUs in a network namespace of its own).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['TPU_SKIP_MDS_QUERY'] = '1'

try:  # triton (torch's, imported by torchvision) before TensorFlow: imported after it,
  import triton  # pylint: disable=unused-import  # their LLVMs clash and it segfaults.
except ImportError:  # no CUDA build of torch here: nothing clashes
  pass

import gcs_emulator  # pylint: disable=wrong-import-position
from gnet_jax import cpu  # pylint: disable=wrong-import-position

# Every library that could reach Google's servers stays on this machine (read at import).
os.environ.update(gcs_emulator.OFFLINE_ENV)

# The settings train.py uses; also makes the suite faster. Subprocesses inherit them.
cpu.use_fast_cpu_kernels()

# Tests build the offline digits dataset once per session under this directory.
_DATA_DIR_ENV = 'GNET_TEST_DATA_DIR'


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """One JAX persistent compilation cache for the session's subprocesses (train.py,
  notebooks...), shared by the xdist workers: only the first run of a program compiles
  it, and a cached executable computes bit for bit the same."""
  base = tmp_path_factory.getbasetemp()
  if base.name.startswith('popen-gw'):
    base = base.parent
  cache = base / 'jax_compilation_cache'
  cache.mkdir(exist_ok=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=str(cache),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return str(cache)


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory):
  """A tfds data directory with the built-in digits dataset prepared in it."""
  from gnet_jax import data  # pylint: disable=import-outside-toplevel
  from configs import quickstart  # pylint: disable=import-outside-toplevel
  data_dir = os.environ.get(_DATA_DIR_ENV) or str(tmp_path_factory.mktemp('tfds'))
  config = quickstart.get_config()
  config.data_dir = data_dir
  data.get_dataset_info(config)  # writes the tfds files on first use
  return data_dir


class Bucket(str):
  """'gs://bucket' on the fake GCS; down() drops every connection to it until up()."""

  def __new__(cls, proc):
    bucket = super().__new__(cls, 'gs://bucket')
    bucket.proc = proc
    return bucket

  def down(self):
    self.proc.stdin.write('down\n')
    self.proc.stdin.flush()

  def up(self):
    self.proc.stdin.write('up\n')
    self.proc.stdin.flush()


@pytest.fixture(scope='session')
def gcs_bucket():
  """'gs://bucket' (a `Bucket`) on a fake GCS served on 127.0.0.1 (tests/gcs_emulator.py)
  for the session; the test process's environment (and so its subprocesses') points at it."""
  proc = subprocess.Popen([sys.executable, gcs_emulator.__file__], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
  try:
    endpoint = json.loads(proc.stdout.readline())['endpoint']
    env = gcs_emulator.client_env(endpoint)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield Bucket(proc)
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  finally:
    proc.stdin.close()
    proc.wait(timeout=30)
