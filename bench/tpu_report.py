"""TPU figures without a TPU: XLA's estimates for the real train and eval steps on named
TPU topologies, compiled ahead of time by libtpu on a machine that has no TPU.

    python bench/tpu_report.py --topology v5e:2x2,v6e:2x2 --per_chip 32,256 \
        --variant baseline,gathered_pool,remat --out bench/results/tpu_v5e

For every (topology, variant, per-chip batch) it builds configs/tpu.py's experiment
exactly as train.py does (`gnet_jax.train.build`, global batch = per-chip batch x chips)
for the topology's devices (`jax.experimental.topologies`), compiles `train_steps` and
`eval_step` from abstract inputs, and writes results.json and results.md into --out:
per chip and step, XLA's FLOPs and bytes accessed (`Compiled.cost_analysis`), per image;
temporaries, arguments, outputs and code (`Compiled.memory_analysis`) against the chip's
HBM; whether it fits with --margin; the largest per-chip batch that fits (a straight line
through the compiled batches' memory, an estimate); the roofline images/s per chip,
min(peak FLOP/s / FLOPs per image, HBM B/s / bytes per image), and its fraction of the
MXU peak; and the compile time on this machine. All of these are COMPILER ESTIMATES, not
measurements on a TPU. XLA counts a while loop's body once, so with steps_per_execution
K > 1 the figures are still those of one step (tests/test_tpu.py checks this).

--hlo adds where the bytes go: the compiled program's top-level buffers (what reaches
memory) by dtype and by layer kind, padded to the TPU tiles of their layouts.

libtpu asks a cloud metadata server for its environment at start-up. Nothing may leave
this machine: the script runs only in a network namespace with no interface but loopback
(it re-executes itself under `unshare -n`, or refuses) and with TPU_SKIP_MDS_QUERY=1.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import platform
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
  peak_bf16_flops: float  # per chip, dense
  hbm_bytes_per_s: float
  source: str


_GB, _GIB = 1e9, 2 ** 30
# Google's Cloud TPU documentation, "System architecture" of each generation (read
# 2026-12): https://cloud.google.com/tpu/docs/v5e ("197 TFLOPs", "16 GB, 819 GBps"),
# .../tpu/docs/v6e ("918 TFLOPs", "32 GB", "1638 GBps"), .../tpu/docs/v5p ("459 TFLOPs",
# "95GB, 2765 GBps"), .../tpu/docs/v4 ("275 teraflops", "32 GiB, 1200 GBps"). The pages
# write GB for v5e/v6e/v5p; the chips hold 16/32/95 GiB (the HBM is sized in GiB), so GiB
# is used, as for v4.
CHIPS = {
    'v5e': Chip('TPU v5e', 16 * _GIB, 197e12, 819 * _GB, 'cloud.google.com/tpu/docs/v5e'),
    'v6e': Chip('TPU v6e', 32 * _GIB, 918e12, 1638 * _GB, 'cloud.google.com/tpu/docs/v6e'),
    'v5p': Chip('TPU v5p', 95 * _GIB, 459e12, 2765 * _GB, 'cloud.google.com/tpu/docs/v5p'),
    'v4': Chip('TPU v4', 32 * _GIB, 275e12, 1200 * _GB, 'cloud.google.com/tpu/docs/v4'),
}


# One GPU, compiled by the CUDA plug-in (jax-cuda12-plugin, no GPU and no CUDA libraries
# needed) for XLA's device description of it (the fields the compiler reads, from
# xla/backends/gpu/target_config/specs/h100_sxm.txtpb and h200.txtpb). Dense bf16 and
# bandwidth from NVIDIA's H100 datasheet ("1,979 teraFLOPS*", *with sparsity; 80 GB,
# 3.35 TB/s) and H200 product page (141 GB, 4.8 TB/s; the H100's compute).
GPUS = {
    'h100': (Chip('NVIDIA H100 SXM', 80 * _GB, 989e12, 3350 * _GB,
                  'nvidia.com H100 datasheet'), 84942979072, 3352320000000, 'H100 80GB HBM3'),
    'h200': (Chip('NVIDIA H200 SXM', 141 * _GB, 989e12, 4800 * _GB,
                  'nvidia.com H200 product page'), 151397597184, 4800000000000, 'H200 141GB HBM3e'),
}
_GPU_CONFIG = '''gpu_device_info {{ threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: 233472 threads_per_core_limit: 2048
  core_count: 132 fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bw} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536
  registers_per_block_limit: 65536 }}
platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 10 }}
runtime_version {{ major: 12 minor: 8 }} device_description_str: "NVIDIA {name}"'''


def chip_of(topology: str) -> Chip:
  return GPUS[topology][0] if topology in GPUS else CHIPS[topology.split(':')[0]]


def target_devices(topology: str) -> list:
  """Compile-only devices: a TPU topology's, or one GPU's (`GPUS`)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  if topology in GPUS:
    _, memory, bw, name = GPUS[topology]
    return topologies.get_topology_desc(
        platform='cuda', topology='1x1x1',
        target_config=_GPU_CONFIG.format(memory=memory, bw=bw, name=name)).devices
  return topologies.get_topology_desc(topology_name=topology, platform='tpu').devices


def available_hbm(device) -> int | None:
  """The HBM that libtpu lets one program use on `device`, from the message of a program
  that cannot fit ("exceeds available HBM (15.75G)"): a few seconds' compile."""
  import jax  # pylint: disable=import-outside-toplevel
  huge = jax.ShapeDtypeStruct((2 ** 36,), 'float32',
                              sharding=jax.sharding.SingleDeviceSharding(device))
  try:
    jax.jit(lambda a: a * 2).lower(huge).compile()
  except Exception as e:  # pylint: disable=broad-except
    found = re.search(r'available HBM \(([\d.]+)G\)', str(e))
    return int(float(found.group(1)) * _GIB) if found else None
  return None


@functools.cache
def hbm_of(topology: str) -> int:
  """What one program may use on a device of `topology`: libtpu's figure, else the spec's."""
  device = target_devices(topology)[0]
  return (available_hbm(device) if device.platform == 'tpu' else None) or chip_of(
      topology).hbm_bytes


def model_flops(lowered) -> float:
  """XLA's FLOP count of a lowered program before optimisation (computed by the CPU
  client): where the compiled program's cost analysis is missing (the CUDA plug-in's
  compile-only executables have none; its convolutions are cuDNN calls it cannot count)."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src.lib import _jax  # pylint: disable=import-outside-toplevel
  module = lowered._lowering.hlo().as_hlo_module()  # pylint: disable=protected-access
  return float(_jax.hlo_module_cost_analysis(jax.devices('cpu')[0].client, module)['flops'])


# --- the program ---------------------------------------------------------------------

def variant_blocks(variant: str, config):
  """`blocks` for train.build and the config changes of `variant` ('+' combines):
  baseline: the project's own choice (model_blocks; on TPU the model's own blocks, XLA's
  max pool); gathered_pool: layers.GatherMaxPool (the CPU-tuned gathered gradient);
  remat: config.model.remat; f32: float32 compute and input."""
  from gnet_jax import layers  # pylint: disable=import-outside-toplevel
  blocks = {}
  for part in variant.split('+'):
    if part == 'gathered_pool':
      blocks['pool_block'] = layers.GatherMaxPool
    elif part == 'remat':
      config.model.remat = True
    elif part == 'f32':
      config.model.dtype = config.input_dtype = 'float32'
    elif part != 'baseline':
      raise ValueError(f'unknown variant {part!r}')
  if not blocks:
    return None  # train.build's own choice, remat included
  from gnet_jax.train import experiment  # pylint: disable=import-outside-toplevel
  devices = [type('D', (), {'platform': 'tpu'})()]  # model_blocks looks at the platform
  return {**experiment.model_blocks(config, devices), **blocks}


def compile_case(topology: str, per_chip: int, variant: str = 'baseline',
                 image_size: int = 224, steps_per_execution: int = 1,
                 hlo: bool = False) -> dict:
  """Compiles configs/tpu.py's train and eval steps for `topology`; returns the case's
  row (figures per chip; flops and bytes of one train step)."""
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
  blocks = variant_blocks(variant, config)
  spec = ModelSpec.from_config(config, num_classes=1000)
  exp = train.build(config, spec, num_train_examples=1_281_167, devices=devices,
                    blocks=blocks)
  sh = exp.sharding
  sds = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  state = jax.tree.map(lambda s: sds(s.shape, s.dtype, sh.replicated), exp.abstract_state())
  k, b, s = steps_per_execution, config.batch_size, image_size
  image_dtype = jnp.dtype(config.input_dtype)
  batches = {'image': sds((k, b, s, s, 3), image_dtype, sh.stacked),
             'label': sds((k, b), jnp.int32, sh.stacked)}
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  eval_batch = {'image': sds((b, s, s, 3), image_dtype, sh.data),
                'label': sds((b,), jnp.int32, sh.data), 'mask': sds((b,), jnp.bool_, sh.data)}
  row = dict(topology=topology, chip=chip_of(topology).name, device_kind=devices[0].device_kind,
             hbm_available=hbm_of(topology),
             chips=len(devices), variant=variant, per_chip=per_chip, image_size=s,
             steps_per_execution=k, dtype=config.model.dtype,
             remat=bool(config.model.get('remat', False)),
             pool_block=(blocks or {}).get('pool_block', exp.model.pool_block).__name__)
  for name, fn, args in (('train', exp.train_steps, (state, batches, sds((), jnp.int32, sh.replicated))),
                         ('eval', exp.eval_step, (variables, eval_batch))):
    start = time.perf_counter()
    try:
      lowered = fn.lower(*args)
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      # libtpu refuses a program that does not fit in HBM ("Ran out of memory in memory
      # space hbm"): that is a result too.
      row[name] = {'error': ' '.join(str(e).split())[:600],
                   'compile_s': round(time.perf_counter() - start, 1)}
      continue
    f = row[name] = figures(compiled, per_chip, time.perf_counter() - start)
    f['load_avg_1min'] = round(os.getloadavg()[0], 1)  # the compile shared the cores
    f['cost_source'] = 'XLA cost analysis'
    if hlo or not f['bytes']:
      f['hlo'] = hlo_traffic(compiled.as_text())
    if not f['bytes']:  # no cost analysis (GPU): this script's estimates instead
      f['flops'], f['bytes'] = model_flops(lowered), f['hlo']['padded_mb'] * 1e6
      f['flops_per_image'], f['bytes_per_image'] = f['flops'] / per_chip, f['bytes'] / per_chip
      f['cost_source'] = 'unoptimised HLO FLOPs; bytes: hlo_traffic of the compiled HLO'
  if 'train' in row and 'error' not in row['train']:
    # This chip's share of the stacked batches (argument bytes that grow with the batch).
    row['train']['batch_bytes'] = k * per_chip * (s * s * 3 * image_dtype.itemsize + 4)
  return row


def figures(compiled, per_chip: int, compile_s: float) -> dict:
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  out = {f: int(getattr(mem, f + '_in_bytes')) for f in (
      'temp_size', 'argument_size', 'output_size', 'alias_size', 'generated_code_size')}
  # What the program holds in HBM at its peak: its inputs, the outputs that do not reuse
  # an input's buffer (the donated state does), its temporaries and its code.
  out['hbm_bytes'] = (out['argument_size'] + out['output_size'] - out['alias_size']
                      + out['temp_size'] + out['generated_code_size'])
  out.update(flops=float(cost.get('flops', 0.0)), bytes=float(cost.get('bytes accessed', 0.0)),
             compile_s=round(compile_s, 1))
  out['flops_per_image'] = out['flops'] / per_chip
  out['bytes_per_image'] = out['bytes'] / per_chip
  return out


# --- where the bytes go (--hlo) ----------------------------------------------------------

_COMP = re.compile(r'^(?:ENTRY )?%(\S+) .*\{$')
_INST = re.compile(r'^\s+(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$')
_ARRAY = re.compile(r'(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64)\[([0-9,]*)\](?:\{([^}]*)\})?')
_WIDTH = {'pred': 1, 'bf16': 2, 'f16': 2, 'f32': 4, 'f64': 8}
_SKIP = {'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant', 'while',
         'conditional', 'call', 'after-all', 'partition-id', 'replica-id'}


def _nbytes(dtype: str, dims: str, layout: str | None) -> tuple[int, int]:
  """(logical, padded) bytes of one array; padded rounds its most-minor dimensions up to
  the layout's first tile, as the TPU stores them (e.g. T(8,128): 64 channels take 128)."""
  shape = [int(d) for d in dims.split(',') if d]
  width = _WIDTH.get(dtype) or int(re.sub(r'\D', '', dtype)) // 8
  logical = width
  for d in shape:
    logical *= d
  padded = shape[:]
  if layout and shape:
    minor_to_major = [int(d) for d in layout.split(':')[0].split(',') if d.strip().isdigit()]
    tile = re.search(r'T\(([0-9,]+)\)', layout)
    if tile and len(minor_to_major) == len(shape):
      for dim, t in zip(minor_to_major, reversed([int(x) for x in tile.group(1).split(',')])):
        padded[dim] = -(-shape[dim] // t) * t
  total = width
  for d in padded:
    total *= d
  return logical, total


def _kind(op_name: str) -> str:
  """A layer kind from the op's Flax/JAX path, e.g. 'bwd conv' or 'fwd pool'."""
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
  """Bytes written and read by the top-level instructions of a compiled program (fused
  computations excluded: their values stay on chip), by dtype and by layer kind, logical
  and padded to the layouts' tiles; and the f32 buffers of 1 MB or more that are not
  parameters or optimizer state (activations that could be bf16)."""
  comps, cur = {}, None
  for line in text.splitlines():
    if (m := _COMP.match(line)):
      cur = comps.setdefault(m.group(1), [])
    elif line.startswith('}'):
      cur = None
    elif cur is not None and (m := _INST.match(line)):
      cur.append(m.groups() + (line,))
  inner = set()
  for insts in comps.values():
    for _, _, op, _, line in insts:
      inner.update(re.findall(r'to_apply=%([\w.\-]+)', line))
      if op == 'fusion':
        inner.update(re.findall(r'calls=%([\w.\-]+)', line))
  by_dtype, by_kind = collections.Counter(), collections.Counter()
  logical_total = padded_total = 0
  f32_acts, layouts = collections.Counter(), collections.Counter()
  for comp, insts in comps.items():
    if comp in inner:
      continue
    size = {}
    for name, ty, op, rest, line in insts:
      arrays = [(dt, _nbytes(dt, dims, lay)) for dt, dims, lay in _ARRAY.findall(ty)]
      size[name] = [nb for _, nb in arrays]
      if op in _SKIP or op.endswith('-done'):
        continue
      operands = re.findall(r'%([\w.\-]+)', rest.split('), ')[0])
      reads = [nb for o in operands for nb in size.get(o, [])]
      op_name = (re.search(r'op_name="([^"]*)"', line) or [None, ''])[1]
      kind = _kind(op_name)
      for dt, dims, lay in _ARRAY.findall(ty):
        if dims.count(',') == 3 and lg_of(dt, dims) >= 1e6 and kind != 'optimizer/other':
          layouts[lay.split(':')[0] + ('' if 'T(' in lay else ' untiled')] += 1
      for dt, (lg, pd) in arrays:
        by_dtype[dt] += pd
        by_kind[kind] += pd
        logical_total += lg
        padded_total += pd
        if dt == 'f32' and lg >= 1e6 and kind != 'optimizer/other':
          f32_acts[f'{op} {re.sub(r"^.*?/while/body/", "", op_name)[:140]}'] += lg
      for lg, pd in reads:
        by_kind[kind] += pd
        logical_total += lg
        padded_total += pd
  mb = lambda c: {k: round(v / 1e6, 1) for k, v in c.most_common()}
  # Minor-to-major order of the 4-D buffers of 1 MB or more (NHWC: 3 = C, 0 = N):
  # '3,0,2,1' keeps channels in the 128 lanes, '0,3,2,1' the batch.
  return {'logical_mb': round(logical_total / 1e6, 1), 'padded_mb': round(padded_total / 1e6, 1),
          'written_mb_by_dtype': mb(by_dtype), 'padded_mb_by_kind': mb(by_kind),
          'f32_activation_mb': mb(collections.Counter(dict(f32_acts.most_common(20)))),
          'activation_layouts': dict(layouts.most_common())}


def lg_of(dtype: str, dims: str) -> int:
  return _nbytes(dtype, dims, None)[0]


# --- what the figures mean -----------------------------------------------------------------

def derive(rows: list[dict], margin: float) -> None:
  """Adds to each compiled row: HBM use and fit, roofline and, per (topology, variant,
  image size, K), the largest per-chip batch that fits (`max_per_chip`)."""
  for row in rows:
    chip = chip_of(row['topology'])
    for name in ('train', 'eval'):
      f = row.get(name, {})
      if 'hbm_bytes' not in f:
        continue
      f['hbm_fraction'] = f['hbm_bytes'] / row.get('hbm_available', chip.hbm_bytes)
      f['fits'] = f['hbm_fraction'] <= 1 - margin
      if f['flops'] and f['bytes']:
        t_flops = f['flops'] / chip.peak_bf16_flops  # seconds per step at the MXU peak
        t_bytes = f['bytes'] / chip.hbm_bytes_per_s  # ... at the HBM bandwidth
        f['roofline_images_per_s'] = row['per_chip'] / max(t_flops, t_bytes)
        f['roofline_mxu_fraction'] = t_flops / max(t_flops, t_bytes)
        f['bound'] = 'compute' if t_flops >= t_bytes else 'memory'
  groups = collections.defaultdict(list)
  for row in rows:
    if 'hbm_bytes' in row.get('train', {}):
      groups[(row['topology'], row['variant'], row['image_size'],
              row['steps_per_execution'])].append(row)
  for group in groups.values():
    pts = sorted({r['per_chip']: r['train']['hbm_bytes'] for r in group}.items())
    budget = (1 - margin) * group[0].get('hbm_available', chip_of(group[0]['topology']).hbm_bytes)
    if len(pts) >= 2:  # HBM use = fixed + slope * batch, through the outermost batches
      (b0, m0), (b1, m1) = pts[0], pts[-1]
      slope = (m1 - m0) / (b1 - b0)
      fixed, how = m0 - slope * b0, f'line through per-chip batches {b0} and {b1}'
    else:  # one compile: the state and the code are fixed, the rest grows with the batch
      (b0, m0), = pts
      t = group[0]['train']
      fixed = t['argument_size'] - t['batch_bytes'] + t['generated_code_size']
      slope, how = (m0 - fixed) / b0, f'one compile (batch {b0}), all but state and code scale'
    estimate = int((budget - fixed) // slope) if slope > 0 else None
    for r in group:
      r['max_per_chip'] = {'estimate': estimate, 'how': how,
                           'mb_per_image': round(slope / 1e6, 1), 'fixed_mb': round(fixed / 1e6, 1)}


# --- output --------------------------------------------------------------------------------

LABEL = ('**Compiler estimates, not measurements**: XLA\'s cost and memory analyses of the '
         'programs libtpu compiled for the named topology on a machine without a TPU.')


def environment() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  import flax  # pylint: disable=import-outside-toplevel
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  git = lambda *a: subprocess.run(['git', '-C', REPO, *a], capture_output=True,
                                  text=True).stdout.strip()
  cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo')
              if l.startswith('model name')), platform.processor())
  return {'machine': f'{cpu}, {os.cpu_count()} cores, {platform.platform()}',
          'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': jaxlib.__version__, 'libtpu': metadata.version('libtpu'),
          'flax': flax.__version__,
          'git': git('rev-parse', '--short', 'HEAD') + (' (uncommitted changes)'
                                                       if git('status', '--porcelain',
                                                              '--untracked-files=no') else ''),
          'XLA_FLAGS': os.environ.get('XLA_FLAGS', ''),
          'LIBTPU_INIT_ARGS': os.environ.get('LIBTPU_INIT_ARGS', ''),
          'network_isolated': network_isolated(),
          'date': time.strftime('%Y-%m-%d')}


def markdown(rows: list[dict], env: dict, margin: float) -> str:
  mb = lambda x: f'{x / 1e6:,.0f}'
  lines = [LABEL, '',
           f'Per chip and train step. HBM = arguments + outputs - aliased + temporaries + code; '
           f'fits = at most {1 - margin:.0%} of the chip\'s HBM. Roofline = min(peak bf16 '
           'FLOP/s / FLOPs per image, HBM bandwidth / bytes per image); MXU = its fraction of '
           'the peak. Max per chip: HBM use as a line in the batch, an estimate. Compile: '
           'seconds on the machine below, with the load average beside it.', '',
           '| topology | variant | per chip | K | size | train GFLOP/img | train MB/img | '
           'temp MB | args MB | HBM GB (% of chip) | fits | max per chip (est.) | '
           'roofline img/s/chip | bound | MXU % | compile s (load) | eval GFLOP/img | '
           'eval MB/img | eval compile s |',
           '|' + '---|' * 19]
  for r in rows:
    t, e = r.get('train', {}), r.get('eval', {})
    head = (f"| {r['topology']} | {r['variant']} | {r['per_chip']} | "
            f"{r['steps_per_execution']} | {r['image_size']} | ")
    if 'hbm_bytes' not in t:
      lines.append(head + f"compile failed: {t.get('error', '?')[:160]} |" + ' |' * 13)
      continue
    mx = r.get('max_per_chip', {}).get('estimate')
    ev = (f"{e['flops_per_image'] / 1e9:.2f} | {mb(e['bytes_per_image'])} | {e['compile_s']:.0f}"
          if 'flops' in e else 'failed | | ')
    lines.append(
        head + f"{t['flops_per_image'] / 1e9:.2f} | {mb(t['bytes_per_image'])} | "
        f"{mb(t['temp_size'])} | {mb(t['argument_size'])} | {t['hbm_bytes'] / 1e9:.2f} "
        f"({t['hbm_fraction']:.0%}) | {'yes' if t['fits'] else 'NO'} | {mx if mx else '-'} | "
        f"{t.get('roofline_images_per_s', 0):,.0f} | {t.get('bound', '-')} | "
        f"{t.get('roofline_mxu_fraction', 0):.0%} | {t['compile_s']:.0f} "
        f"({t['load_avg_1min']}) | {ev} |")
  chips = {chip_of(r['topology']) for r in rows}
  lines += ['', 'Chips: ' + '; '.join(
      f"{c.name}: {c.hbm_bytes / _GIB:.1f} GiB memory, {c.peak_bf16_flops / 1e12:.0f} "
      f"TFLOP/s bf16, {c.hbm_bytes_per_s / 1e9:.0f} GB/s ({c.source})"
      for c in sorted(chips, key=lambda c: c.name)) + '.']
  fits = {(r['topology'], r['variant'], r['image_size'], r['steps_per_execution']):
          r['max_per_chip'] for r in rows if 'max_per_chip' in r}
  for (topology, variant, size, k), fit in fits.items():
    lines.append(f"Max per chip, {topology} {variant} {size}px K={k}: {fit['estimate']} "
                 f"({fit['how']}; {fit['mb_per_image']} MB per image over "
                 f"{fit['fixed_mb']} MB fixed).")
  for r in rows:
    h = r.get('train', {}).get('hlo')
    if h:
      lines += ['', f"Where the bytes go, {r['topology']} {r['variant']} {r['per_chip']}/chip "
                f"(top-level buffers, written + read, MB per step; {h['logical_mb']:,.0f} "
                f"logical, {h['padded_mb']:,.0f} padded to tiles): "
                + ', '.join(f'{k} {v:,.0f}' for k, v in h['padded_mb_by_kind'].items())
                + '. Written by dtype: '
                + ', '.join(f'{k} {v:,.0f}' for k, v in h['written_mb_by_dtype'].items())
                + '. 4-D layouts (minor to major): '
                + ', '.join(f'{{{k}}} x{v}' for k, v in h['activation_layouts'].items())
                + '. f32 activations >= 1 MB: '
                + ('; '.join(f'{k} ({v} MB)' for k, v in h['f32_activation_mb'].items())
                   or 'none') + '.']
  lines += ['', 'Machine: ' + '; '.join(f'{k} {v}' for k, v in env.items()
                                      if k != 'network_isolated') + '.']
  return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--topology', default='v5e:2x2', help='comma-separated, e.g. '
                      'v5e:2x2,v6e:2x2,v5p:2x2x1,v4:2x2x1')
  parser.add_argument('--per_chip', default='32', help='per-chip batch sizes, comma-separated')
  parser.add_argument('--variant', default='baseline',
                      help='comma-separated: baseline, gathered_pool, remat, f32 ("+" combines)')
  parser.add_argument('--steps_per_execution', default='1', help='K, comma-separated')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--margin', type=float, default=0.1,
                      help='HBM fraction kept free for "fits" and the max batch')
  parser.add_argument('--hlo', action='store_true', help='add where the bytes go')
  parser.add_argument('--out', required=True, help='folder for results.json and results.md; '
                      'rows already there for other cases are kept')
  parser.add_argument('--merge', default='', help='comma-separated result folders whose rows '
                      'join --out\'s (with --per_chip "": merge and rewrite only)')
  args = parser.parse_args(argv)
  ensure_isolated([os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])])
  sys.path.insert(0, REPO)
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_enable_compilation_cache', False)  # compile times are cold
  # This host runs nothing: the targets are compile-only devices. (Without this JAX would
  # try to start the TPU or CUDA plug-in's own devices, which this machine lacks.)
  jax.config.update('jax_platforms', 'cpu')
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'results.json')
  rows = json.load(open(path))['rows'] if os.path.exists(path) else []
  key = lambda r: (r['topology'], r['variant'], r['per_chip'], r['image_size'],
                   r['steps_per_execution'])
  env = environment()

  def add(new_rows):
    nonlocal rows
    for r in rows + new_rows:  # rows of an older report may lack it
      r.setdefault('hbm_available', hbm_of(r['topology']))
    keys = {key(r) for r in new_rows}
    rows = sorted([r for r in rows if key(r) not in keys] + new_rows, key=key)
    derive(rows, args.margin)
    with open(path, 'w') as f:
      json.dump({'label': LABEL, 'environment': env, 'margin': args.margin,
                 'chips': {r['topology']: dataclasses.asdict(chip_of(r['topology']))
                           for r in rows},
                 'rows': rows}, f, indent=1)
    with open(os.path.join(args.out, 'results.md'), 'w') as f:
      f.write(markdown(rows, env, args.margin))

  for folder in filter(None, args.merge.split(',')):
    add(json.load(open(os.path.join(folder, 'results.json')))['rows'])
  cases = [(t, v, k, b) for t in args.topology.split(',') for v in args.variant.split(',')
           for k in map(int, args.steps_per_execution.split(','))
           for b in map(int, filter(None, args.per_chip.split(',')))]
  for topology, variant, k, per_chip in cases:
    print(f'compiling {topology} {variant} per_chip={per_chip} K={k} '
          f'size={args.image_size} ...', flush=True)
    row = compile_case(topology, per_chip, variant, args.image_size, k, args.hlo)
    add([row])
    print(json.dumps({n: {f: row[n].get(f) for f in (
        'flops_per_image', 'bytes_per_image', 'temp_size', 'hbm_bytes', 'compile_s',
        'error')} for n in ('train', 'eval')}), flush=True)
  print(f'wrote {path} and results.md')


if __name__ == '__main__':
  main()
