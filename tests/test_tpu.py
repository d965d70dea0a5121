"""bench/tpu_report.py: the real train and eval steps compiled by libtpu for a TPU topology,
or by the CUDA plug-in for a GPU, on a machine without either, and the figures it derives
from XLA's analyses.

The compile test runs the script as a subprocess: the script puts itself in a network
namespace without network (`unshare -n`) with TPU_SKIP_MDS_QUERY=1 before libtpu loads,
so libtpu's start-up query to a cloud metadata server cannot leave the machine.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench',
                      'tpu_report.py')
V5E_HBM = 16 * 2 ** 30


def _report_module():
  spec = importlib.util.spec_from_file_location('tpu_report', REPORT)
  module = sys.modules['tpu_report'] = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # imports no JAX and loads no libtpu
  return module


def test_padded_bytes_follow_tpu_tiles():
  """64 channels in 128 lanes take twice their bytes; a batch of 32 in the lanes, four."""
  report = _report_module()
  logical = 32 * 28 * 28 * 64 * 2
  assert report._nbytes('bf16', '32,28,28,64', '3,0,2,1:T(8,128)(2,1)') == (logical,
                                                                            2 * logical)
  assert report._nbytes('bf16', '32,28,28,64', '0,3,2,1:T(8,128)(2,1)') == (logical,
                                                                            4 * logical)
  assert report._nbytes('f32', '1024', None) == (4096, 4096)
  assert all(c.source for c in report.CHIPS.values())


def test_gpu_flops_without_jaxs_private_counter(monkeypatch):
  """model_flops counts with a private jax function; without it, no count (not a crash)."""
  from jax._src.lib import _jax  # pylint: disable=import-outside-toplevel
  report = _report_module()
  monkeypatch.delattr(_jax, 'hlo_module_cost_analysis')
  assert report.model_flops(lowered=None) is None


@pytest.mark.slow
def test_tpu_compile_report(tmp_path):
  """Compiles the train step at K = 1 and 2 and the eval step for v5e:2x2 (4 chips, 2 images
  of 32x32 each) in a minute or two; the analyses must be sane."""
  pytest.importorskip('libtpu', reason='libtpu (the `tpu` extra) compiles for TPUs')
  out = tmp_path / 'report'
  proc = subprocess.run(
      [sys.executable, REPORT, '--topology', 'v5e:2x2', '--per_chip', '2',
       '--steps_per_execution', '1,2', '--image_size', '32', '--hlo', '--out', str(out)],
      capture_output=True, text=True, timeout=1800, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  result = json.loads((out / 'results.json').read_text())
  rows = {r['steps_per_execution']: r for r in result['rows']}
  assert sorted(rows) == [1, 2]
  for row in rows.values():
    assert row['environment']['network_isolated']  # libtpu ran without network
    assert (row['devices'], row['dtype'], row['pool_block']) == (4, 'bfloat16', 'MaxPool')
    assert 15 * 2 ** 30 < row['hbm_available'] < V5E_HBM  # libtpu's figure: 15.75 GiB
    for name in ('train', 'eval'):
      f = row[name]
      assert 'error' not in f, f
      assert f['flops'] > 0 and f['bytes'] > 0 and f['temp_size'] > 0
      assert 0 < f['hbm_bytes'] < V5E_HBM and f['fits']
      assert f['roofline_images_per_s'] > 0 and 0 < f['roofline_mxu_fraction'] <= 1
    train, evaluate = row['train'], row['eval']
    # Forward, backward and update: over twice the forward's FLOPs (at 224x224 3x; at
    # 32x32 the aux heads' and the update's fixed FLOPs make it 5x).
    assert 2 < train['flops'] / evaluate['flops'] < 8
    # The state (float32 parameters and momentum, ~107 MB) is an argument of both steps.
    assert train['argument_size'] > 100e6
    assert train['hlo']['f32_activation_mb'] == {}  # bf16 activations throughout
  # XLA counts the fori_loop's body once: K steps per call report one step's FLOPs.
  assert rows[2]['train']['flops'] == pytest.approx(rows[1]['train']['flops'], rel=0.01)
  assert (out / 'results.md').read_text().startswith('**Compiler estimates, not measurements**')


@pytest.mark.slow
def test_gpu_compile_follows_the_compute_capability(tmp_path):
  """config.runtime.dtype 'auto' (configs/tpu.py's) compiled for XLA's descriptions of an A100
  and a V100: bfloat16 on the first, float16 with its loss scale on the second, which has
  no bfloat16 units."""
  pytest.importorskip('jax_plugins.xla_cuda12',
                      reason='jax-cuda12-pjrt compiles for GPUs without one')
  out = tmp_path / 'report'
  proc = subprocess.run(
      [sys.executable, REPORT, '--topology', 'a100,v100', '--per_chip', '2',
       '--image_size', '32', '--out', str(out)],
      capture_output=True, text=True, timeout=1800, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  rows = {r['topology']: r for r in json.loads((out / 'results.json').read_text())['rows']}
  assert {t: r['dtype'] for t, r in rows.items()} == {'a100': 'bfloat16', 'v100': 'float16'}
  for row in rows.values():
    assert 'error' not in row['train'] and 'error' not in row['eval'], row
    assert row['train']['flops'] > 0 and row['train']['hbm_bytes'] > 0
