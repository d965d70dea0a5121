"""bench/: the harness, the accelerator script (on CPU) and the fast CPU settings.

The scripts run in subprocesses, as a user runs them; sizes are tiny, and torch.compile
uses its 'aot_eager' backend (no C++ code generation), so these check the wiring, not speed.
"""
import json
import os
import subprocess
import sys

import pytest

from gnet_jax import cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*args, timeout=600):
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
@pytest.mark.torch
def test_benchmark_compares_with_torchvision(tmp_path):
  out = run_script('bench/benchmark.py', '--batch_size', '2', '--image_size', '32',
                   '--steps', '2', '--warmup', '1', '--compare', 'torchvision',
                   '--torch_compile_backend', 'aot_eager', '--out', str(tmp_path))
  with open(tmp_path / 'results.json') as f:
    report = json.load(f)
  results = report['results']
  assert [r['name'] for r in results] == ['gnet_jax', 'torchvision eager',
                                          'torchvision channels_last', 'torchvision compile']
  for r in results:
    assert r['batch_size'] == 2 and r['image_size'] == 32
    assert len(r['train_times']) == 2 and len(r['infer_times']) == 2
    assert r['train_images_per_s'] > 0 and r['infer_images_per_s'] > 0
    assert r['peak_host_mb'] >= r['train_host_mb'] > 0
    has_compile = r['name'] in ('gnet_jax', 'torchvision compile')
    assert (r['train_compile_s'] is not None) == has_compile
  jax_result = results[0]
  assert jax_result['train_flops'] > 0
  assert all(f in jax_result['xla_flags'].split() for f in cpu.FAST_CPU_FLAGS)
  assert set(report['machine']) >= {'cpu', 'cores', 'memory_gb', 'versions'}
  assert report['machine']['versions']['torch']
  table = (tmp_path / 'results.md').read_text()
  assert table in out
  assert '| gnet_jax / torchvision channels_last | 2 |' in table
  assert 'Machine: ' in table and 'jax 0.' in table
  assert not (tmp_path / 'curve.png').exists()  # one batch size: no curve


def test_benchmark_curve_over_batch_sizes(tmp_path):
  # The curve's cases and output, from made-up results (running them is the test above).
  sys.path.insert(0, os.path.join(ROOT, 'bench'))
  import benchmark  # pylint: disable=import-outside-toplevel
  args = benchmark.parse_args(['--batch_sizes', '8,16', '--compare', 'torchvision',
                               '--torch_modes', 'channels_last'])
  cases = benchmark.cases_of(args)
  assert [(c.name, c.batch_size) for c in cases] == [
      ('gnet_jax', 8), ('torchvision channels_last', 8),
      ('gnet_jax', 16), ('torchvision channels_last', 16)]
  results = [{'name': c.name, 'batch_size': c.batch_size,
              'train_step_ms': c.batch_size * (10 if c.framework == 'jax' else 20)}
             for c in cases]
  assert benchmark.cost_curve(results).splitlines() == [
      'gnet_jax: train ms per image by batch: 8: 10.0 (1.00x), 16: 10.0 (1.00x)',
      'torchvision channels_last: train ms per image by batch: 8: 20.0 (1.00x), '
      '16: 20.0 (1.00x)']
  benchmark.plot_curve(results, str(tmp_path / 'curve.png'))
  assert (tmp_path / 'curve.png').stat().st_size > 0


@pytest.mark.slow
@pytest.mark.torch
def test_accelerator_script_runs_on_cpu(tmp_path):
  out = run_script('bench/accelerator.py', '--smoke', '--out', str(tmp_path))
  with open(tmp_path / 'accelerator.json') as f:
    summary = json.load(f)
  assert summary['matmul_bf16']['flops_per_s'] > 0
  assert summary['train_images_per_s'] > 0 and summary['torch_compile_train_images_per_s'] > 0
  assert summary['fraction_of_matmul_rate'] > 0
  assert summary['input_pipeline_images_per_s'] > 0
  assert isinstance(summary['pipeline_feeds_train_step'], bool)
  assert [r['dtype'] for r in summary['results']] == ['bfloat16', 'bfloat16']
  assert 'of the measured bf16 matmul rate' in out
  assert (tmp_path / 'accelerator.md').read_text().startswith('- Card: ')


@pytest.mark.slow
def test_input_pipeline_benchmark_tables(tmp_path):
  """bench/input_pipeline.py on a few files: every pipeline timed against the references,
  the ablations, a resized copy, and the vCPUs-per-chip table from the results in git."""
  out = run_script('bench/input_pipeline.py', '--num_files', '16', '--batch_size', '8',
                   '--image_size', '64', '--batches', '2', '--warmup', '1', '--rounds', '1',
                   '--max_sides', '128', '--ablate', '--out', str(tmp_path))
  with open(tmp_path / 'results.json') as f:
    result = json.load(f)
  names = [r['name'] for r in result['rows']]
  assert names[0] == 'one-thread full decode (tf.io.decode_jpeg)'
  assert {'plain train pipeline, uint8', 'plain eval pipeline, uint8', 'gnet_jax train, uint8',
          'gnet_jax eval, uint8', 'gnet_jax train, uint8, copy at max side 128'} <= set(names)
  assert all(r['images_per_s'] > 0 for r in result['rows'])
  assert len(result['ablations']) == 7 and all(a['ratio'] > 0 for a in result['ablations'])
  assert {v['chip'] for v in result['vcpus']} >= {'TPU v5e', 'TPU v5p'}
  assert all(v['needed'] > 0 and v['have'] > 0 for v in result['vcpus'])
  table = (tmp_path / 'results.md').read_text()
  assert '| gnet_jax train, uint8 |' in table and 'vCPUs needed per chip' in table
  assert table in out


CONV_HLO = '''
import os, sys, jax, jax.numpy as jnp
from gnet_jax import cpu
applied = cpu.use_fast_cpu_kernels() if sys.argv[1] == 'apply' else None
x, w = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 8))
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
text = jax.jit(conv).lower(x, w).compile().as_text()
print(applied, os.environ.get('XLA_FLAGS', ''), '__ynn_fusion' in text, sep='|')
print(cpu.use_fast_cpu_kernels())  # too late now: no change
print(os.environ.get('XLA_FLAGS', ''))
'''


def run_conv_hlo(mode, xla_flags):
  env = {**os.environ, 'XLA_FLAGS': xla_flags}
  proc = subprocess.run([sys.executable, '-c', CONV_HLO, mode], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=True)
  return proc.stdout[:-1].split('\n')  # the last line may be empty


def test_fast_cpu_flags_take_convolutions_off_ynnpack():
  flags = ' '.join(cpu.FAST_CPU_FLAGS)
  first, again, final = run_conv_hlo('apply', '--xla_cpu_enable_fast_math=false')
  if not cpu.flags.flags_known():  # XLA aborts on a flag it does not know: none is added
    assert first.startswith('False|--xla_cpu_enable_fast_math=false|') and again == 'False'
    return
  assert first == f'True|--xla_cpu_enable_fast_math=false {flags}|False'
  assert again == 'True' and final == f'--xla_cpu_enable_fast_math=false {flags}'
  # Once the backend exists the call changes nothing and says whether they were set.
  first, again, final = run_conv_hlo('skip', '')
  assert again == 'False' and final == ''


@pytest.mark.skipif(not cpu.flags.flags_known(),
                    reason="this jax's XLA has no such flag for a user to set")
def test_fast_cpu_flags_leave_a_user_choice_alone():
  first, _, _ = run_conv_hlo('apply', '--xla_cpu_experimental_ynn_fusion_type=dot')
  assert first.startswith('False|--xla_cpu_experimental_ynn_fusion_type=dot '
                          '--xla_cpu_enable_concurrency_optimized_scheduler=false|')
