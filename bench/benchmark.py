"""GoogLeNet speed: the project's train step and inference, beside torchvision's if asked.

    python bench/benchmark.py --variant torchvision --batch_size 32 --compare torchvision
    python bench/benchmark.py --batch_sizes 8,16,32,64,128      # cost per image vs batch

Train is the project's real train step (gnet_jax.train.build: forward with the aux
heads, loss, backward, SGD with Nesterov momentum and weight decay); inference is the
jitted eval-mode forward. `--compare torchvision` adds torchvision's googlenet doing the
same work on the same inputs: eager NCHW, eager channels_last and torch.compile
(channels_last), under autocast when --dtype bfloat16. torch is an optional extra
(`pip install -e '.[torch]'`).

Every case runs in a child process of its own, so its compile time is cold (JAX's
persistent cache is off unless --compilation_cache_dir names one) and its memory its
own. "train host MB" is the peak resident memory while building, compiling and training
minus the resident memory after the imports (Linux: VmHWM reset after the imports);
"peak host MB" is the absolute peak; on GPU also the device's peak. Times are the median
of --steps steps after --warmup untimed ones, each synchronised with the device; the
JAX train step runs as train.py runs it, config.steps_per_execution steps per call
(configs/cpu.py's on CPU, 1 elsewhere; --steps_per_execution), and then each timed
"step" is one call, divided by the steps in it.
Results go to <out>/results.json and results.md (with a description of the machine);
several --batch_sizes also print the cost per image and write curve.png.
The parent that schedules cases and the child that runs one are the same script, so a
case is reproduced by one command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_MODES = ('eager', 'channels_last', 'compile')
NUM_CLASSES = 1000


@dataclasses.dataclass
class Case:
  """One measurement: a framework and mode at one batch size."""
  framework: str  # 'jax' or 'torch'
  mode: str  # jax: 'jit'; torch: one of TORCH_MODES
  variant: str
  batch_size: int
  image_size: int
  dtype: str
  steps: int
  warmup: int
  fast_cpu_flags: bool = True
  cpu_convolutions: str = 'auto'  # config.runtime.cpu_convolutions of the JAX case
  torch_compile_backend: str = 'inductor'
  compilation_cache_dir: str = ''  # JAX's persistent cache; '' compiles cold
  steps_per_execution: int = 0  # train steps per call of the JAX case; 0: train.py's

  @property
  def name(self) -> str:
    return 'gnet_jax' if self.framework == 'jax' else f'torchvision {self.mode}'


def synthetic_batch(case: Case) -> tuple[np.ndarray, np.ndarray]:
  """The same NHWC images and labels for every framework (seeded)."""
  rng = np.random.default_rng(0)
  images = rng.normal(size=(case.batch_size, case.image_size, case.image_size, 3))
  return images.astype(np.float32), rng.integers(0, NUM_CLASSES, case.batch_size)


def time_steps(step, sync, steps: int, warmup: int) -> list[float]:
  """Seconds of each of `steps` synchronised calls of step(), after `warmup` calls."""
  for _ in range(warmup):
    sync(step())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    sync(step())
    times.append(time.perf_counter() - start)
  return times


def _proc_status_mb(field: str) -> float | None:
  try:
    with open('/proc/self/status') as f:
      line = next(line for line in f if line.startswith(field + ':'))
    return int(line.split()[1]) / 1024
  except (OSError, StopIteration):
    return None


def host_baseline_mb() -> float:
  """This process's resident memory now, with the peak reset to it (Linux), so that
  the peak measured later is that of the work after this point."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')  # resets VmHWM
  except OSError:
    pass
  return _proc_status_mb('VmRSS') or 0.0


def host_peak_mb() -> float:
  peak = _proc_status_mb('VmHWM')
  return peak if peak is not None else (
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_jax(case: Case) -> dict:
  sys.path.insert(0, ROOT)
  # pylint: disable=import-outside-toplevel
  from gnet_jax import cpu
  if case.fast_cpu_flags:
    cpu.use_fast_cpu_kernels()
  import jax
  if case.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', case.compilation_cache_dir)
  from configs import cpu as cpu_config, default
  from gnet_jax import ModelSpec, train
  # pylint: enable=import-outside-toplevel

  baseline_mb = host_baseline_mb()
  config = default.get_config()
  config.batch_size = case.batch_size
  config.num_train_steps = 10_000
  config.image_size = case.image_size
  config.model.variant = case.variant
  config.runtime.dtype = case.dtype
  config.runtime.cpu_convolutions = case.cpu_convolutions
  k = case.steps_per_execution or (
      cpu_config.get_config().steps_per_execution if jax.default_backend() == 'cpu' else 1)
  config.steps_per_execution = k
  # The step train.py runs (train.build): the same model, blocks, optimizer and jit.
  exp = train.build(config, ModelSpec.from_config(config, NUM_CLASSES),
                    num_train_examples=1000 * case.batch_size)
  images, labels = synthetic_batch(case)
  local = {'image': images.astype(case.dtype), 'label': labels.astype(np.int32)}
  batch = exp.sharding.global_batch(local)
  batches = exp.sharding.stacked_batches([local] * k, k)
  state = exp.init()

  train_fn, train_compile_s, _ = exp.compile_train_steps(state, batches, k)  # as train.py
  # One step's: XLA counts a loop's body once when its trip count is not a constant.
  flops = (train_fn.cost_analysis() or {}).get('flops')

  def train_once():
    nonlocal state
    state, metrics = train_fn(state, batches, np.int32(k))
    return metrics
  train_times = [t / k for t in time_steps(train_once, jax.block_until_ready, case.steps,
                                           case.warmup)]
  result = {'train_times': train_times, 'train_compile_s': train_compile_s,
            'steps_per_execution': k,
            'train_flops': float(flops) if flops else None, 'host_baseline_mb': baseline_mb,
            'peak_host_mb': host_peak_mb()}

  infer_fn = jax.jit(lambda v, x: exp.model.apply(v, x, train=False))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  start = time.perf_counter()
  infer = infer_fn.lower(variables, batch['image']).compile()
  result['infer_compile_s'] = time.perf_counter() - start
  result['infer_times'] = time_steps(lambda: infer(variables, batch['image']),
                                     jax.block_until_ready, case.steps, case.warmup)
  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform != 'cpu' else None
  if stats:
    result['peak_device_mb'] = stats.get('peak_bytes_in_use', 0) / 2**20
  result['device'] = f'{device.device_kind} x{jax.device_count()}'
  result['xla_flags'] = os.environ.get('XLA_FLAGS', '')
  result['convolutions'] = exp.kernels
  return result


def run_torch(case: Case) -> dict:
  # pylint: disable=import-outside-toplevel
  import torch
  import torch.nn.functional as F
  import torchvision
  # pylint: enable=import-outside-toplevel
  baseline_mb = host_baseline_mb()
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  memory_format = torch.contiguous_format if case.mode == 'eager' else torch.channels_last
  torch.manual_seed(0)
  model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True).to(
      device, memory_format=memory_format)
  images, labels = synthetic_batch(case)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device).contiguous(
      memory_format=memory_format)
  y = torch.from_numpy(labels).to(device)
  # The project's recipe (configs/default.py).
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                              weight_decay=1e-4)
  forward = (torch.compile(model, backend=case.torch_compile_backend)
             if case.mode == 'compile' else model)
  autocast = torch.autocast(device, dtype=torch.bfloat16,
                            enabled=case.dtype == 'bfloat16')

  def train_once():
    model.train()
    with autocast:
      out = forward(x)
      loss = F.cross_entropy(out.logits, y, label_smoothing=0.1) + 0.3 * (
          F.cross_entropy(out.aux_logits1, y, label_smoothing=0.1)
          + F.cross_entropy(out.aux_logits2, y, label_smoothing=0.1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

  def infer_once():
    model.eval()
    with torch.inference_mode(), autocast:
      forward(x)

  result = {'host_baseline_mb': baseline_mb}
  for phase, fn in (('train', train_once), ('infer', infer_once)):
    start = time.perf_counter()
    fn()  # the first call holds torch.compile's compilation
    sync()
    result[f'{phase}_compile_s'] = (time.perf_counter() - start
                                    if case.mode == 'compile' else None)
    result[f'{phase}_times'] = time_steps(fn, lambda _: sync(), case.steps,
                                          max(case.warmup - 1, 0))
    if phase == 'train':
      result['peak_host_mb'] = host_peak_mb()
      if device == 'cuda':
        result['peak_device_mb'] = torch.cuda.max_memory_allocated() / 2**20
  result['device'] = torch.cuda.get_device_name() if device == 'cuda' else 'cpu'
  return result


def run_case(case: Case) -> dict:
  """Runs one case in a fresh child process; returns its figures."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'result.json')
    env = dict(os.environ)
    env.pop('JAX_COMPILATION_CACHE_DIR', None)  # cold unless --compilation_cache_dir
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), '--_worker',
         json.dumps(dataclasses.asdict(case)), '--out', out],
        capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
      raise RuntimeError(f'{case.name} at batch {case.batch_size} failed:\n'
                         f'{proc.stderr[-3000:]}')
    with open(out) as f:
      result = json.load(f)
  for phase in ('train', 'infer'):
    step_s = statistics.median(result[f'{phase}_times'])
    result[f'{phase}_step_ms'] = 1e3 * step_s
    result[f'{phase}_images_per_s'] = case.batch_size / step_s
  result['train_host_mb'] = result['peak_host_mb'] - result['host_baseline_mb']
  return {**dataclasses.asdict(case), 'name': case.name, **result}


def package_versions(packages=('jax', 'jaxlib', 'flax', 'optax', 'torch', 'torchvision')
                     ) -> dict:
  """{package: version} of those of `packages` that are installed."""
  # pylint: disable=import-outside-toplevel
  from importlib import metadata
  versions = {}
  for package in packages:
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      pass
  return versions


def describe_machine() -> dict:
  cpu = platform.processor() or platform.machine()
  memory_gb = None
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f
                  if line.startswith('model name')), cpu)
    with open('/proc/meminfo') as f:
      memory_gb = int(f.readline().split()[1]) / 2**20
  except OSError:
    pass
  return {'cpu': cpu, 'cores': os.cpu_count(), 'memory_gb': memory_gb,
          'os': platform.platform(), 'python': platform.python_version(),
          'versions': package_versions()}


def _fmt(value, spec='.1f'):
  return '-' if value is None else format(value, spec)


def markdown(results: list[dict], machine: dict) -> str:
  """The results table, ratios against each torchvision mode, and the machine."""
  lines = ['| case | batch | size | dtype | train img/s | train step ms | train compile s '
           '| infer img/s | infer compile s | train host MB | peak host MB | peak device MB |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in results:
    lines.append(
        f"| {r['name']} | {r['batch_size']} | {r['image_size']} | {r['dtype']} "
        f"| {r['train_images_per_s']:.1f} | {r['train_step_ms']:.0f} "
        f"| {_fmt(r['train_compile_s'])} | {r['infer_images_per_s']:.1f} "
        f"| {_fmt(r['infer_compile_s'])} | {r['train_host_mb']:.0f} | {r['peak_host_mb']:.0f} "
        f"| {_fmt(r.get('peak_device_mb'), '.0f')} |")
  ratios = []
  for r in results:
    if r['framework'] != 'torch':
      continue
    ours = next((o for o in results if o['framework'] == 'jax'
                 and o['batch_size'] == r['batch_size']), None)
    if ours:
      ratios.append(
          f"| gnet_jax / {r['name']} | {r['batch_size']} "
          f"| {ours['train_images_per_s'] / r['train_images_per_s']:.2f}x "
          f"| {ours['infer_images_per_s'] / r['infer_images_per_s']:.2f}x "
          f"| {ours['train_host_mb'] / r['train_host_mb']:.2f}x "
          f"| {ours['peak_host_mb'] / r['peak_host_mb']:.2f}x |")
  if ratios:
    lines += ['', '| ratio (>1: gnet_jax faster / uses more) | batch | train | inference '
              '| train host memory | peak host memory |', '|---|---|---|---|---|---|', *ratios]
  versions = ', '.join(f'{k} {v}' for k, v in machine['versions'].items())
  devices = sorted({r['device'] for r in results})
  flags = sorted({r['xla_flags'] for r in results if 'xla_flags' in r})
  convolutions = sorted({r['convolutions'] for r in results if 'convolutions' in r})
  per_call = sorted({str(r['steps_per_execution']) for r in results
                     if r['framework'] == 'jax'})
  caches = ', '.join(sorted({r['compilation_cache_dir'] for r in results
                             if r['framework'] == 'jax' and r.get('compilation_cache_dir')}))
  lines += ['', f"Machine: {machine['cpu']}, {machine['cores']} cores, "
                f"{_fmt(machine['memory_gb'], '.0f')} GiB; {machine['os']}; "
                f"Python {machine['python']}; {versions}; devices: {', '.join(devices)}; "
                f"XLA_FLAGS of the JAX runs: {' / '.join(repr(f) for f in flags)}; "
                f"their convolutions: {' / '.join(convolutions)}; "
                f"their train steps per call: {' / '.join(per_call)}; "
                f"JAX compilation cache: {caches or 'none (cold compiles)'}."]
  return '\n'.join(lines) + '\n'


def per_image_ms(results: list[dict]) -> dict[str, list[tuple[int, float]]]:
  """{case name: [(batch size, train ms per image), ...] by batch size}."""
  return {name: sorted((r['batch_size'], r['train_step_ms'] / r['batch_size'])
                       for r in results if r['name'] == name)
          for name in dict.fromkeys(r['name'] for r in results)}


def plot_curve(results: list[dict], path: str) -> None:
  """Train milliseconds per image against batch size, one line per case."""
  # pylint: disable=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(6, 4))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for name, rows in per_image_ms(results).items():
    ax.plot(*zip(*rows), marker='o', label=name)
  ax.set_xscale('log', base=2)
  batches = sorted({r['batch_size'] for r in results})
  ax.set_xticks(batches, [str(b) for b in batches])
  ax.set_xlabel('batch size')
  ax.set_ylabel('train ms per image')
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def cost_curve(results: list[dict]) -> str:
  """Train cost per image at each batch size, relative to the smallest batch's."""
  lines = []
  for name, rows in per_image_ms(results).items():
    base = rows[0][1]
    lines.append(f'{name}: train ms per image by batch: ' + ', '.join(
        f'{b}: {ms:.1f} ({ms / base:.2f}x)' for b, ms in rows))
  return '\n'.join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--variant', default='torchvision', choices=['paper', 'torchvision'])
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--batch_sizes', default='',
                      help='comma-separated batch sizes; overrides --batch_size')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--steps', type=int, default=5, help='timed steps (median)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps first')
  parser.add_argument('--compare', default='', choices=['', 'torchvision'])
  parser.add_argument('--torch_modes', default=','.join(TORCH_MODES),
                      help=f'comma-separated subset of {TORCH_MODES}')
  parser.add_argument('--torch_compile_backend', default='inductor',
                      help="torch.compile's backend ('aot_eager' skips code generation)")
  parser.add_argument('--no_fast_cpu_flags', action='store_true',
                      help="JAX with XLA's default CPU settings (gnet_jax/cpu/flags.py)")
  parser.add_argument('--cpu_convolutions', default='auto', choices=['auto', 'onednn', 'xla'],
                      help="the JAX case's config.runtime.cpu_convolutions ('auto': oneDNN "
                      'on one CPU device, gnet_jax/cpu/)')
  parser.add_argument('--compilation_cache_dir', default='',
                      help="JAX's persistent compilation cache for the JAX cases: the "
                      'second run with the same directory shows the warm compile time '
                      "(train.py's default); without it every compile is cold")
  parser.add_argument('--steps_per_execution', type=int, default=0,
                      help="the JAX train step's config.steps_per_execution; 0: as "
                      "train.py's configs (configs/cpu.py's on CPU, 1 elsewhere)")
  parser.add_argument('--out', default='bench/results',
                      help='directory for results.json, results.md (and curve.png)')
  parser.add_argument('--_worker', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  modes = [m for m in args.torch_modes.split(',') if m]
  if not set(modes) <= set(TORCH_MODES):
    parser.error(f'--torch_modes {args.torch_modes!r}: choose from {TORCH_MODES}.')
  args.torch_modes = modes
  args.batch_sizes = ([int(b) for b in args.batch_sizes.split(',')] if args.batch_sizes
                      else [args.batch_size])
  return args


def cases_of(args) -> list[Case]:
  common = dict(variant=args.variant, image_size=args.image_size, dtype=args.dtype,
                steps=args.steps, warmup=args.warmup,
                fast_cpu_flags=not args.no_fast_cpu_flags,
                cpu_convolutions=args.cpu_convolutions,
                torch_compile_backend=args.torch_compile_backend,
                compilation_cache_dir=args.compilation_cache_dir,
                steps_per_execution=args.steps_per_execution)
  cases = []
  for batch_size in args.batch_sizes:
    cases.append(Case('jax', 'jit', batch_size=batch_size, **common))
    if args.compare:
      cases += [Case('torch', mode, batch_size=batch_size, **common)
                for mode in args.torch_modes]
  return cases


def run(cases: list[Case], out_dir: str) -> list[dict]:
  """Runs the cases one after another, prints and writes the results."""
  if any(c.framework == 'torch' for c in cases):
    try:
      import torchvision  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError as e:
      raise SystemExit(f'--compare torchvision needs torch and torchvision ({e}); '
                       "install them with pip install -e '.[test]'.") from e
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  results = []
  progress = tqdm(cases, desc='benchmark', unit='case')
  for case in progress:
    progress.set_postfix_str(f'{case.name} batch {case.batch_size}')
    results.append(run_case(case))
  machine = describe_machine()
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump({'machine': machine, 'results': results}, f, indent=1)
  table = markdown(results, machine)
  with open(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write(table)
  print(table)
  if len({r['batch_size'] for r in results}) > 1:
    print(cost_curve(results))
    plot_curve(results, os.path.join(out_dir, 'curve.png'))
  print(f'wrote {out_dir}/results.json and results.md')
  return results


def main(argv=None) -> None:
  args = parse_args(argv)
  if args._worker:  # pylint: disable=protected-access
    case = Case(**json.loads(args._worker))  # pylint: disable=protected-access
    result = run_jax(case) if case.framework == 'jax' else run_torch(case)
    with open(args.out, 'w') as f:
      json.dump(result, f)
    return
  run(cases_of(args), args.out)


if __name__ == '__main__':
  main()
