"""TPU figures without a TPU: XLA's estimates for the real train and eval steps, compiled
ahead of time for named TPU topologies (by libtpu) or GPUs (by the CUDA plug-in) on a
machine that has none of them.

    python bench/tpu_report.py --topology v5e:2x2,v6e:2x2 --per_chip 32,256 \
        --variant baseline,gathered_pool,remat --hlo --out bench/results/tpu_v5e

Each case builds configs/tpu.py's experiment as train.py does (`gnet_jax.train.build`,
global batch = per-chip batch x devices) on the target's compile-only devices
(`jax.experimental.topologies`), compiles `train_steps` and `eval_step` from abstract
inputs, and adds a row to --out/results.json and results.md: per device and train step,
XLA's FLOPs and bytes accessed (`cost_analysis`) and per image; temporaries, arguments,
outputs and code (`memory_analysis`) against the HBM that libtpu says one program may use;
whether that fits with --margin; the largest per-device batch that fits (a line through
the compiled batches' HBM use: an estimate); the roofline images/s, min(peak bf16 FLOP/s /
FLOPs per image, HBM B/s / bytes per image), and its fraction of the MXU peak; the compile
time here. All are COMPILER ESTIMATES, not measurements. XLA counts a while loop's body
once, so with steps_per_execution K > 1 the figures are one step's (tests/test_tpu.py).
A TPU v4 device is one of a chip's two TensorCores; on v5e, v6e and v5p a device is a chip.

--hlo adds where the bytes go (`hlo_traffic`). The CUDA plug-in's compile-only programs
have no cost analysis: for GPUs the FLOPs are XLA's count before optimisation and the
bytes `hlo_traffic`'s, a coarser estimate.

libtpu asks a cloud metadata server about its machine at start-up. Nothing may leave this
machine: the script runs only in a network namespace with no interface but loopback (it
re-executes itself under `unshare -n`, or refuses) and with TPU_SKIP_MDS_QUERY=1.
It re-executes itself as a whole, and its test imports the parsing helpers without JAX.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REEXEC_MARK = 'GNET_TPU_REPORT_NETNS'


def network_isolated() -> bool:
  """True when this process's network namespace has no interface but loopback.
  (socket.if_nameindex asks the kernel for this namespace; /sys/class/net shows the
  namespace sysfs was mounted in.)"""
  return all(name == 'lo' for _, name in socket.if_nameindex())


def ensure_isolated(argv: list[str]) -> None:
  """Returns only inside a namespace without network, with TPU_SKIP_MDS_QUERY=1; else
  re-executes `argv` under `unshare -n` (`-r -n` when not root), or exits saying why."""
  # libtpu's lockfile keeps two processes off one TPU; compile-only devices use none, so
  # several reports (or tests under pytest -n) may load it at once.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  if network_isolated():
    os.environ['TPU_SKIP_MDS_QUERY'] = '1'
    return
  if os.environ.get(_REEXEC_MARK):
    sys.exit('tpu_report: still networked after unshare -n; refusing to load libtpu.')
  unshare = shutil.which('unshare')
  cmd = [unshare, '-n'] if os.geteuid() == 0 else [unshare, '-r', '-n']
  if unshare is None or subprocess.run(cmd + ['true'], capture_output=True).returncode:
    sys.exit('tpu_report: refusing to run: libtpu contacts a cloud metadata server at '
             'start-up, so this script runs only without network, and `unshare -n` (util-'
             'linux; root or user namespaces) is unavailable here. Run it inside a network '
             'namespace of your own with TPU_SKIP_MDS_QUERY=1.')
  env = dict(os.environ, TPU_SKIP_MDS_QUERY='1', **{_REEXEC_MARK: '1'})
  os.execve(unshare, cmd + [sys.executable, *argv], env)


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int
  peak_flops: float  # dense bf16 (float16 where a GPU has no bf16), per device
  hbm_bytes_per_s: float
  source: str


_GB, _GIB = 1e9, 2 ** 30
# Cloud TPU documentation, "System architecture": cloud.google.com/tpu/docs/
# v5e ("197 TFLOPs", "16 GB, 819 GBps"), v6e ("918 TFLOPs", "32 GB", "1638 GBps"), v5p
# ("459 TFLOPs", "95GB, 2765 GBps"), v4 ("275 teraflops", "32 GiB, 1200 GBps", per chip of
# two devices). libtpu lets one program use 15.75 GiB of a v5e, 31.24 of a v6e, 95.73 of a
# v5p and 15.25 of a v4 device (`available_hbm`): the pages' GB are GiB, and "fits" uses
# libtpu's figures.
CHIPS = {
    'v5e': Chip('TPU v5e', 16 * _GIB, 197e12, 819 * _GB, 'cloud.google.com/tpu/docs/v5e'),
    'v6e': Chip('TPU v6e', 32 * _GIB, 918e12, 1638 * _GB, 'cloud.google.com/tpu/docs/v6e'),
    'v5p': Chip('TPU v5p', 95 * _GIB, 459e12, 2765 * _GB, 'cloud.google.com/tpu/docs/v5p'),
    'v4': Chip('TPU v4 core', 16 * _GIB, 137.5e12, 600 * _GB, 'cloud.google.com/tpu/docs/v4'),
}
# One GPU, compiled by the CUDA plug-in (jax-cuda12-pjrt; no GPU or CUDA library needed)
# for XLA's description of it: the fields of xla/backends/gpu/target_config/specs/
# (a100_sxm_40, v100, h100_sxm, h200).txtpb that the compiler reads. Peak FLOP/s are dense
# bf16 (float16 on the V100, which has no bf16 units), with memory and bandwidth from
# NVIDIA's datasheets: A100 "312 TFLOPS" (40 GB, 1,555 GB/s), V100 "125 TFLOPS" (16 GB,
# 900 GB/s), H100 half the "1,979 teraFLOPS" with sparsity (80 GB, 3.35 TB/s), H200 the
# H100's compute (141 GB, 4.8 TB/s).
@dataclasses.dataclass(frozen=True)
class Gpu:
  chip: Chip
  name: str  # device_description_str
  compute_capability: tuple[int, int]
  core_count: int
  fpus_per_core: int
  shared_memory_per_core: int
  shared_memory_per_block_optin: int
  l2_cache_size: int
  clock_rate_ghz: float
  memory: int
  bandwidth: int


_HOPPER = dict(compute_capability=(9, 0), core_count=132, fpus_per_core=128,
               shared_memory_per_core=233472, shared_memory_per_block_optin=232448,
               l2_cache_size=52428800, clock_rate_ghz=1.98)
GPUS = {
    'a100': Gpu(Chip('NVIDIA A100 SXM 40GB', 40 * _GB, 312e12, 1555 * _GB,
                     'nvidia.com A100 datasheet'), 'NVIDIA A100-SXM4-40GB', (8, 0), 108, 64,
                167936, 166912, 41943040, 1.41, 42331013120, 1555200000000),
    'v100': Gpu(Chip('NVIDIA V100 SXM2 16GB', 16 * _GB, 125e12, 900 * _GB,
                     'nvidia.com V100 datasheet'), 'Tesla V100-SXM2-16GB', (7, 0), 80, 64,
                98304, 98304, 6291456, 1.53, 16935682048, 898048000000),
    'h100': Gpu(Chip('NVIDIA H100 SXM', 80 * _GB, 989e12, 3350 * _GB,
                     'nvidia.com H100 datasheet'), 'NVIDIA H100 80GB HBM3',
                memory=84942979072, bandwidth=3352320000000, **_HOPPER),
    'h200': Gpu(Chip('NVIDIA H200 SXM', 141 * _GB, 989e12, 4800 * _GB, 'nvidia.com H200 page'),
                'NVIDIA H200 141GB HBM3e', memory=151397597184, bandwidth=4800000000000,
                **_HOPPER),
}
_GPU_CONFIG = """gpu_device_info {{ threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: {g.shared_memory_per_core}
  threads_per_core_limit: 2048 core_count: {g.core_count} fpus_per_core: {g.fpus_per_core}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {g.bandwidth} l2_cache_size: {g.l2_cache_size}
  clock_rate_ghz: {g.clock_rate_ghz} device_memory_size: {g.memory}
  shared_memory_per_block_optin: {g.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {g.compute_capability[0]} minor: {g.compute_capability[1]} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536 }}
platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 10 }}
runtime_version {{ major: 12 minor: 8 }} device_description_str: "{g.name}\""""


def chip_of(topology: str) -> Chip:
  return GPUS[topology].chip if topology in GPUS else CHIPS[topology.split(':')[0]]


def target_devices(topology: str) -> list:
  """Compile-only devices: a TPU topology's ('v5e:2x2') or one GPU's ('h100')."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  if topology in GPUS:
    return topologies.get_topology_desc(
        platform='cuda', topology='1x1x1',
        target_config=_GPU_CONFIG.format(g=GPUS[topology])).devices
  dims = [int(d) for d in topology.split(':')[1].split('x')]
  # A slice smaller than libtpu's default host of 2x2 chips (v5e:1x1, Colab's v5e-1) is
  # one host of its own size.
  bounds = {} if math.prod(dims) >= 4 else {
      'chips_per_host_bounds': tuple(dims + [1] * (3 - len(dims)))}
  return topologies.get_topology_desc(topology_name=topology, platform='tpu', **bounds).devices


@functools.cache
def hbm_of(topology: str) -> int:
  """What one program may use on a device: libtpu's figure, from the message with which it
  refuses a program that cannot fit ("exceeds available HBM (15.75G)"), else the spec's."""
  import jax  # pylint: disable=import-outside-toplevel
  device = target_devices(topology)[0]
  if device.platform == 'tpu':
    huge = jax.ShapeDtypeStruct((2 ** 36,), 'float32',
                                sharding=jax.sharding.SingleDeviceSharding(device))
    try:
      jax.jit(lambda a: a * 2).lower(huge).compile()
    except Exception as e:  # pylint: disable=broad-except
      if (found := re.search(r'available HBM \(([\d.]+)G\)', str(e))):
        return int(float(found.group(1)) * _GIB)
  return chip_of(topology).hbm_bytes


def model_flops(lowered) -> float | None:
  """XLA's FLOPs of a program before optimisation, counted by the CPU client (the CUDA
  plug-in's compile-only programs have no cost analysis, and cuDNN calls no FLOPs), or
  None where this jax lacks the private function that counts them."""
  import jax  # pylint: disable=import-outside-toplevel
  try:
    from jax._src.lib import _jax  # pylint: disable=import-outside-toplevel
    count = _jax.hlo_module_cost_analysis
  except (ImportError, AttributeError):
    return None
  module = lowered._lowering.hlo().as_hlo_module()  # pylint: disable=protected-access
  return float(count(jax.devices('cpu')[0].client, module)['flops'])


# --- the program -----------------------------------------------------------------------

def variant_blocks(variant: str, config, devices):
  """Applies `variant`'s config changes ('+' combines) and returns train.build's `blocks`
  (None: its own choice). baseline: the project's choice (on TPU and GPU the model's own
  blocks: XLA's max pool; uint8 input); gathered_pool: cpu.pool.GatherMaxPool (the CPU-tuned
  gathered gradient); remat: config.runtime.remat; f32: float32 compute and input;
  bf16_input: images normalised on the host and handed over as bfloat16."""
  from gnet_jax.cpu import pool  # pylint: disable=import-outside-toplevel
  from gnet_jax.train import experiment  # pylint: disable=import-outside-toplevel
  parts = set(variant.split('+'))
  if parts - {'baseline', 'gathered_pool', 'remat', 'f32', 'bf16_input'}:
    raise ValueError(f'unknown variant in {variant!r}')
  config.runtime.remat = 'remat' in parts
  if 'f32' in parts:
    config.runtime.dtype = config.input_dtype = 'float32'
  if 'bf16_input' in parts:
    config.input_dtype = 'bfloat16'
  if 'gathered_pool' in parts:
    return {**experiment.model_blocks(config, devices), 'pool_block': pool.GatherMaxPool}
  return None


def compile_case(topology: str, per_chip: int, variant: str = 'baseline',
                 image_size: int = 224, steps_per_execution: int = 1,
                 hlo: bool = False) -> dict:
  """Compiles configs/tpu.py's train and eval steps for `topology`: the case's row."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from configs import tpu  # pylint: disable=import-outside-toplevel
  from gnet_jax import ModelSpec, train  # pylint: disable=import-outside-toplevel

  devices = target_devices(topology)
  config = tpu.get_config()
  config.batch_size = per_chip * len(devices)
  config.num_train_steps = 1000
  config.image_size = image_size
  config.steps_per_execution = steps_per_execution
  blocks = variant_blocks(variant, config, devices)
  exp = train.build(config, ModelSpec.from_config(config, num_classes=1000),
                    num_train_examples=1_281_167, devices=devices, blocks=blocks)
  sh = exp.sharding
  sds = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  state = jax.tree.map(lambda x: sds(x.shape, x.dtype, sh.replicated), exp.abstract_state())
  k, b, s = steps_per_execution, config.batch_size, image_size
  image = jnp.dtype(config.input_dtype)
  train_args = (state, {'image': sds((k, b, s, s, 3), image, sh.stacked),
                        'label': sds((k, b), jnp.int32, sh.stacked)},
                sds((), jnp.int32, sh.replicated))
  eval_args = ({'params': state.params, 'batch_stats': state.batch_stats},
               {'image': sds((b, s, s, 3), image, sh.data),
                'label': sds((b,), jnp.int32, sh.data), 'mask': sds((b,), jnp.bool_, sh.data)})
  row = dict(topology=topology, chip=chip_of(topology).name, devices=len(devices),
             device_kind=devices[0].device_kind, hbm_available=hbm_of(topology),
             variant=variant, per_chip=per_chip, image_size=s, steps_per_execution=k,
             dtype=exp.config.runtime.dtype, input_dtype=config.input_dtype,
             remat=config.runtime.remat,
             pool_block=(blocks or {}).get('pool_block', exp.model.pool_block).__name__)
  for name, fn, args in (('train', exp.train_steps, train_args),
                         ('eval', exp.eval_step, eval_args)):
    start = time.perf_counter()
    try:
      lowered = fn.lower(*args)
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      # libtpu refuses a program that cannot fit in HBM: a result too.
      row[name] = {'error': ' '.join(str(e).split())[:600]}
      continue
    f = row[name] = figures(compiled, per_chip, time.perf_counter() - start)
    if hlo or not f['bytes']:
      f['hlo'] = hlo_traffic(compiled.as_text())
    if not f['bytes']:  # no cost analysis (GPU)
      f['flops'], f['bytes'] = model_flops(lowered) or 0.0, f['hlo']['padded_mb'] * 1e6
      f['cost_source'] = 'FLOPs before optimisation; bytes: hlo_traffic'
    f['flops_per_image'], f['bytes_per_image'] = f['flops'] / per_chip, f['bytes'] / per_chip
  if 'error' not in row['train']:  # the device's share of the stacked batches
    row['train']['batch_bytes'] = k * per_chip * (s * s * 3 * image.itemsize + 4)
  return row


def figures(compiled, per_chip: int, compile_s: float) -> dict:
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  out = {f: int(getattr(mem, f + '_in_bytes')) for f in (
      'temp_size', 'argument_size', 'output_size', 'alias_size', 'generated_code_size')}
  # At its peak a program holds its inputs, the outputs that reuse no input's buffer (the
  # donated state does), its temporaries and its code.
  out['hbm_bytes'] = (out['argument_size'] + out['output_size'] - out['alias_size']
                      + out['temp_size'] + out['generated_code_size'])
  out.update(flops=float(cost.get('flops', 0)), bytes=float(cost.get('bytes accessed', 0)),
             cost_source='XLA cost analysis', compile_s=round(compile_s, 1),
             load_avg_1min=round(os.getloadavg()[0], 1))  # the cores were shared
  return out


# --- where the bytes go (--hlo) ----------------------------------------------------------

_COMP = re.compile(r'^(?:ENTRY )?%(\S+) .*\{$')
_INST = re.compile(r'^\s+(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$')
_ARRAY = re.compile(r'(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64)\[([0-9,]*)\](?:\{([^}]*)\})?')
_SKIP = {'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant', 'while',
         'conditional', 'call', 'after-all', 'partition-id', 'replica-id'}


def _nbytes(dtype: str, dims: str, layout: str | None) -> tuple[int, int]:
  """(logical, padded) bytes of an array: padded rounds its most-minor dimensions up to
  its layout's first tile, as the TPU stores it (T(8,128): 64 channels take 128)."""
  shape = [int(d) for d in dims.split(',') if d]
  padded = shape[:]
  minor_to_major = [int(d) for d in (layout or '').split(':')[0].split(',') if d.isdigit()]
  tile = re.search(r'T\(([0-9,]+)\)', layout or '')
  if tile and len(minor_to_major) == len(shape):
    for dim, t in zip(minor_to_major, reversed([int(x) for x in tile.group(1).split(',')])):
      padded[dim] = -(-shape[dim] // t) * t
  width = 1 if dtype == 'pred' else int(re.sub(r'\D', '', dtype)) // 8
  return width * math.prod(shape), width * math.prod(padded)


def _kind(op_name: str, opcode: str) -> str:
  """The layer kind of an op from its JAX/Flax path: 'bwd conv', 'fwd pool'..."""
  if opcode in ('copy-start', 'slice-start'):
    # XLA's prefetches into (and evictions from) another memory space: their consumers
    # then read the copy instead of HBM, so counting them would count bytes twice.
    return 'memory-space copies'
  if 'GoogLeNet' not in op_name:
    return 'optimizer/other'
  where = 'bwd' if 'transpose(' in op_name else 'fwd'
  for pat, kind in (('aux_4', 'aux heads'), ('concatenate', 'concat'), ('pool', 'pool'),
                    ('/bn/', 'batchnorm'), ('relu', 'relu'), ('/conv', 'conv'),
                    ('dropout', 'dropout'), ('classifier', 'classifier')):
    if pat in op_name:
      return f'{where} {kind}'
  return f'{where} other'


def hlo_traffic(text: str) -> dict:
  """What the top-level instructions of a compiled program write and read (fused
  computations stay on chip), in MB: logical and padded to the layouts' tiles, the padded
  by layer kind and, of what they write, by dtype (both totals leave out XLA's memory-
  space copies, listed by kind); the f32 activation buffers of 1 MB or more (ones that
  could be bf16); and the layouts of the 4-D activation buffers of 1 MB or more as
  minor-to-major NHWC dimensions ('3,0,2,1': channels in the 128 lanes, then the batch;
  '0,3,2,1': the batch in the lanes)."""
  comps, cur = {}, None
  for line in text.splitlines():
    if (m := _COMP.match(line)):
      cur = comps.setdefault(m.group(1), [])
    elif line.startswith('}'):
      cur = None
    elif cur is not None and (m := _INST.match(line)):
      cur.append(m.groups() + (line,))
  inner = set()  # fused computations and reducers: not materialised
  for insts in comps.values():
    for _, _, op, _, line in insts:
      inner.update(re.findall(r'to_apply=%([\w.\-]+)', line))
      if op == 'fusion':
        inner.update(re.findall(r'calls=%([\w.\-]+)', line))
  by_kind, by_dtype, f32_acts, layouts = (collections.Counter() for _ in range(4))
  logical = padded = 0
  for comp in comps.keys() - inner:
    size = {}
    for name, ty, op, rest, line in comps[comp]:
      arrays = [(dt, dims, lay, *_nbytes(dt, dims, lay)) for dt, dims, lay in _ARRAY.findall(ty)]
      size[name] = [(lg, pd) for *_, lg, pd in arrays]
      if op in _SKIP or op.endswith('-done'):
        continue
      io = size[name] + [nb for o in re.findall(r'%([\w.\-]+)', rest.split('), ')[0])
                         for nb in size.get(o, [])]
      op_name = (re.search(r'op_name="([^"]*)"', line) or [None, ''])[1]
      kind = _kind(op_name, op)
      by_kind[kind] += sum(pd for _, pd in io)
      if kind == 'memory-space copies':
        continue
      logical += sum(lg for lg, _ in io)
      padded += sum(pd for _, pd in io)
      for dt, dims, lay, lg, pd in arrays:
        by_dtype[dt] += pd
        if lg >= 1e6 and kind[:3] in ('fwd', 'bwd'):
          if dt == 'f32':
            f32_acts[f'{op} {re.sub(r"^.*?/while/body/", "", op_name)[:140]}'] += lg
          if dims.count(',') == 3:
            layouts[lay.split(':')[0] + ('' if 'T(' in lay else ' untiled')] += 1
  mb = lambda c: {k: round(v / 1e6, 1) for k, v in c.most_common()}
  return {'logical_mb': round(logical / 1e6, 1), 'padded_mb': round(padded / 1e6, 1),
          'padded_mb_by_kind': mb(by_kind), 'written_mb_by_dtype': mb(by_dtype),
          'f32_activation_mb': mb(collections.Counter(dict(f32_acts.most_common(20)))),
          'activation_layouts': dict(layouts.most_common())}


# --- what the figures mean ---------------------------------------------------------------

def derive(rows: list[dict], margin: float) -> None:
  """Adds HBM fit and roofline to each row and, per (target, variant, size, K), the
  largest per-device batch that fits (`max_per_chip`)."""
  groups = collections.defaultdict(list)
  for row in rows:
    chip = chip_of(row['topology'])
    for f in (row[n] for n in ('train', 'eval') if 'hbm_bytes' in row.get(n, {})):
      f['hbm_fraction'] = f['hbm_bytes'] / row['hbm_available']
      f['fits'] = f['hbm_fraction'] <= 1 - margin
      t_flops = f['flops'] / chip.peak_flops  # a step's seconds at the MXU peak
      t_bytes = f['bytes'] / chip.hbm_bytes_per_s  # ... at the HBM bandwidth
      f['roofline_images_per_s'] = row['per_chip'] / max(t_flops, t_bytes)
      f['roofline_mxu_fraction'] = t_flops / max(t_flops, t_bytes)
      f['bound'] = 'compute' if t_flops >= t_bytes else 'memory'
    if 'hbm_bytes' in row.get('train', {}):
      groups[row['topology'], row['variant'], row['image_size'],
             row['steps_per_execution']].append(row)
  for group in groups.values():
    pts = sorted({r['per_chip']: r['train']['hbm_bytes'] for r in group}.items())
    if len(pts) >= 2:  # HBM use = fixed + slope x batch, through the outermost batches
      (b0, m0), (b1, m1) = pts[0], pts[-1]
      slope = (m1 - m0) / (b1 - b0)
      fixed, how = m0 - slope * b0, f'line through per-device batches {b0} and {b1}'
    else:  # one compile: state and code are fixed, the rest grows with the batch
      (b0, m0), t = pts[0], group[0]['train']
      fixed = t['argument_size'] - t['batch_bytes'] + t['generated_code_size']
      slope, how = (m0 - fixed) / b0, f'one compile (batch {b0}): all but state and code scale'
    budget = (1 - margin) * group[0]['hbm_available']
    for r in group:
      r['max_per_chip'] = {'estimate': int((budget - fixed) // slope) if slope > 0 else None,
                           'how': how, 'mb_per_image': round(slope / 1e6, 1),
                           'fixed_mb': round(fixed / 1e6, 1)}


# --- output ------------------------------------------------------------------------------

LABEL = ('**Compiler estimates, not measurements**: XLA\'s cost and memory analyses of '
         'programs compiled ahead of time for the named devices (by libtpu, or by the CUDA '
         'plug-in for a GPU) on a machine that has none of them.')


def environment() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import benchmark  # pylint: disable=import-outside-toplevel  (bench/benchmark.py)
  git = lambda *a: subprocess.run(['git', '-C', REPO, *a], capture_output=True,
                                  text=True).stdout.strip()
  machine = benchmark.describe_machine()
  return {'machine': f"{machine['cpu']}, {machine['cores']} cores, {machine['os']}",
          'python': machine['python'], 'jax': jax.__version__,
          **benchmark.package_versions(('jaxlib', 'flax', 'libtpu', 'jax-cuda12-pjrt')),
          'git': git('rev-parse', '--short', 'HEAD') + (
              ' with uncommitted changes' if git('status', '--porcelain', '-uno') else ''),
          'XLA_FLAGS': os.environ.get('XLA_FLAGS', ''),
          'LIBTPU_INIT_ARGS': os.environ.get('LIBTPU_INIT_ARGS', ''),
          'network_isolated': network_isolated(), 'date': time.strftime('%Y-%m-%d')}


def markdown(rows: list[dict], margin: float) -> str:
  mb = lambda x: f'{x / 1e6:,.0f}'
  lines = [LABEL, '', 'Per device and train step. HBM = arguments + outputs - aliased + '
           'temporaries + code, against what libtpu lets one program use; fits: at most '
           f'{1 - margin:.0%} of it. Roofline = min(peak bf16 FLOP/s / FLOPs per image, HBM '
           'B/s / bytes per image); MXU = its fraction of the peak. Max batch: HBM use as a '
           'line in the batch (an estimate). Compile: seconds here, load average beside.', '',
           '| target | variant | batch/device | K | size | GFLOP/img | MB/img | temp MB | '
           'args MB | HBM GB (%) | fits | max batch (est.) | roofline img/s | bound | MXU | '
           'compile s (load) | eval GFLOP/img | eval MB/img | eval compile s |',
           '|' + '---|' * 19]
  for r in rows:
    t, e = r['train'], r.get('eval', {})
    cells = [r['topology'], r['variant'], r['per_chip'], r['steps_per_execution'],
             r['image_size']]
    if 'hbm_bytes' not in t:
      lines.append('| ' + ' | '.join(map(str, cells)) + f" | failed: {t['error'][:200]} |")
      continue
    cells += [f"{t['flops_per_image'] / 1e9:.2f}", mb(t['bytes_per_image']), mb(t['temp_size']),
              mb(t['argument_size']), f"{t['hbm_bytes'] / 1e9:.2f} ({t['hbm_fraction']:.0%})",
              'yes' if t['fits'] else 'NO', r.get('max_per_chip', {}).get('estimate') or '-',
              f"{t['roofline_images_per_s']:,.0f}", t['bound'],
              f"{t['roofline_mxu_fraction']:.0%}", f"{t['compile_s']:.0f} ({t['load_avg_1min']})"]
    cells += ([f"{e['flops_per_image'] / 1e9:.2f}", mb(e['bytes_per_image']),
               f"{e['compile_s']:.0f}"] if 'flops' in e else ['failed', '', ''])
    lines.append('| ' + ' | '.join(map(str, cells)) + ' |')
  lines += ['', 'Devices: ' + '; '.join(
      f"{c.name}: {c.hbm_bytes / _GIB:.1f} GiB, {c.peak_flops / 1e12:.0f} TFLOP/s, "
      f"{c.hbm_bytes_per_s / 1e9:.0f} GB/s ({c.source})"
      for c in sorted({chip_of(r['topology']) for r in rows}, key=lambda c: c.name)) + '. '
      + 'HBM one program may use: ' + ', '.join(sorted(
          {f"{r['topology']} {r['hbm_available'] / _GIB:.2f} GiB" for r in rows})) + '.']
  fits = {(r['topology'], r['variant'], r['image_size'], r['steps_per_execution']):
          r['max_per_chip'] for r in rows if 'max_per_chip' in r}
  lines += [f"Max batch, {t} {v} {s}px K={k}: {f['estimate']} ({f['how']}; {f['mb_per_image']} "
            f"MB per image over {f['fixed_mb']} MB fixed)." for (t, v, s, k), f in fits.items()]
  for r in rows:
    for name in ('train', 'eval'):
      if (h := r.get(name, {}).get('hlo')):
        lines += ['', f"Where the bytes go, {name}, {r['topology']} {r['variant']} "
                  f"{r['per_chip']}/device (MB per step written + read by top-level ops; "
                  f"{h['logical_mb']:,.0f} logical, {h['padded_mb']:,.0f} padded to tiles; "
                  # 'note': set by hand on rows an earlier hlo_traffic counted otherwise
                  + h.get('note', 'memory-space copies aside') + '): ' + ', '.join(
                      f'{k} {v:,.0f}' for k, v in h['padded_mb_by_kind'].items())
                  + '. Written, by dtype: ' + ', '.join(
                      f'{k} {v:,.0f}' for k, v in h['written_mb_by_dtype'].items())
                  + '. 4-D activation layouts (minor to major): ' + ', '.join(
                      f'{{{k}}} x{v}' for k, v in h['activation_layouts'].items())
                  + '. f32 activations of 1 MB or more: ' + ('; '.join(
                      f'{k} ({v} MB)' for k, v in h['f32_activation_mb'].items()) or 'none')
                  + '.']
  envs = {json.dumps({k: v for k, v in r['environment'].items() if k != 'network_isolated'})
          for r in rows if 'environment' in r}
  lines += [''] + ['Machine: ' + '; '.join(v if k == 'machine' else f'{k} {v}'
                                         for k, v in json.loads(e).items()) + '.'
                   for e in sorted(envs)]
  return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--topology', default='v5e:2x2', help='comma-separated TPU topologies '
                      '(v5e:2x2, v6e:2x2, v5p:2x2x1, v4:2x2x1...) or GPUs (a100, v100, h100, '
                      'h200)')
  parser.add_argument('--per_chip', default='32', help='batch sizes per device, comma-separated')
  parser.add_argument('--variant', default='baseline', help='comma-separated: baseline, '
                      'gathered_pool, remat, f32, bf16_input ("+" combines)')
  parser.add_argument('--steps_per_execution', default='1', help='K, comma-separated')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--margin', type=float, default=0.1, help='HBM fraction kept free')
  parser.add_argument('--hlo', action='store_true', help='add where the bytes go')
  parser.add_argument('--out', required=True, help='folder of results.json and results.md; '
                      'the rows of other cases already there stay')
  parser.add_argument('--merge', default='', help='result folders (comma-separated) whose '
                      'rows join --out\'s; with --per_chip "" nothing is compiled')
  args = parser.parse_args(argv)
  ensure_isolated([os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)])
  sys.path.insert(0, REPO)
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_enable_compilation_cache', False)  # compile times are cold
  # This host runs nothing; the targets are compile-only devices, so JAX must not start
  # the TPU or CUDA plug-in's own devices (this machine has none).
  jax.config.update('jax_platforms', 'cpu')
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'results.json')
  rows = json.load(open(path))['rows'] if os.path.exists(path) else []
  key = lambda r: (r['topology'], r['variant'], r['per_chip'], r['image_size'],
                   r['steps_per_execution'])
  env = environment()

  def add(new_rows):
    nonlocal rows
    keys = {key(r) for r in new_rows}
    rows = sorted([r for r in rows if key(r) not in keys] + new_rows, key=key)
    derive(rows, args.margin)
    with open(path, 'w') as f:
      json.dump({'label': LABEL, 'margin': args.margin, 'rows': rows, 'devices': {
          r['topology']: dataclasses.asdict(chip_of(r['topology'])) for r in rows}}, f, indent=1)
    with open(os.path.join(args.out, 'results.md'), 'w') as f:
      f.write(markdown(rows, args.margin))

  for folder in filter(None, args.merge.split(',')):
    add(json.load(open(os.path.join(folder, 'results.json')))['rows'])
  for topology, variant, k, per_chip in [
      (t, v, int(k), int(b)) for t in args.topology.split(',') for v in args.variant.split(',')
      for k in args.steps_per_execution.split(',') for b in filter(None, args.per_chip.split(','))]:
    print(f'compiling {topology} {variant} {per_chip}/device K={k} {args.image_size}px',
          flush=True)
    row = compile_case(topology, per_chip, variant, args.image_size, k, args.hlo)
    row['environment'] = env
    add([row])
    print(json.dumps({n: {f: row[n].get(f) for f in ('flops_per_image', 'bytes_per_image',
                                                     'temp_size', 'hbm_bytes', 'compile_s',
                                                     'error')} for n in ('train', 'eval')}),
          flush=True)
  print(f'wrote {path} and results.md')


if __name__ == '__main__':
  main()
