"""One short run on a GPU (or TPU) machine: the figures BENCHMARKS.md asks of an accelerator.

    python bench/accelerator.py --out bench/results/gpu        # ~10 min on one GPU
    python bench/accelerator.py --smoke --out /tmp/acc         # a CPU check of the script

1. The card's bf16 matmul rate, measured (a large square matmul, median of 10).
2. bf16 training at batch 256: gnet_jax's train step against torchvision with
   torch.compile, AMP bf16 and channels_last on the same card (bench/benchmark.py cases).
3. The fraction of (1) that the train step reaches: XLA's FLOP count of the compiled
   step / step time / matmul rate.
4. Whether the input pipeline can feed (2): bench/input_pipeline.py's ImageNet-like JPEGs
   through the real train pipeline at the same batch, on this host's CPUs.
Writes <out>/accelerator.json and accelerator.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import benchmark  # bench/benchmark.py


def matmul_rate(size: int, dtype: str, repeats: int = 10) -> dict:
  """Median FLOP/s of a size^3 matmul (run in a child, like every measurement)."""
  code = f'''
import json, statistics, sys, jax, jax.numpy as jnp
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from benchmark import time_steps
x = jnp.ones(({size}, {size}), jnp.{dtype})
f = jax.jit(lambda a: a @ a)
times = time_steps(lambda: f(x), jax.block_until_ready, {repeats}, warmup=1)
print(json.dumps({{"flops_per_s": 2 * {size}**3 / statistics.median(times),
                  "device": jax.devices()[0].device_kind}}))
'''
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def input_rate(batch_size: int, image_size: int, dtype: str, num_images: int,
               steps: int) -> float:
  """Images/s of the ImageNet train pipeline on generated ImageNet-like JPEGs."""
  # pylint: disable=import-outside-toplevel
  import input_pipeline as pipeline_bench  # bench/input_pipeline.py
  from configs import default
  from gnet_jax import data
  # pylint: enable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as root:
    pipeline_bench.write_folder(root, num_train=num_images, num_eval=10)
    config = default.get_config()
    config.dataset = f'folder:{root}'
    config.batch_size = batch_size
    config.image_size = image_size
    config.input_dtype = dtype
    train = data.create_train_iterator(config, process_index=0, process_count=1)
    rate = pipeline_bench.measure(train, steps, warmup=2)[0]
  return rate


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--smoke', action='store_true',
                      help='tiny sizes, to check the script on a CPU')
  parser.add_argument('--out', default='bench/results/accelerator')
  args = parser.parse_args(argv)
  sys.path.insert(0, benchmark.ROOT)
  if args.smoke:
    batch, size, steps, matmul, images, backend = 4, 64, 2, 512, 16, 'aot_eager'
  else:
    batch, size, steps, matmul, images, backend = 256, 224, 10, 8192, 1024, 'inductor'

  rate = matmul_rate(matmul, 'bfloat16')
  print(f"bf16 matmul {matmul}^3: {rate['flops_per_s'] / 1e12:.1f} TFLOP/s on {rate['device']}")
  common = dict(variant='torchvision', batch_size=batch, image_size=size, dtype='bfloat16',
                steps=steps, warmup=3, torch_compile_backend=backend)
  cases = [benchmark.Case('jax', 'jit', **common), benchmark.Case('torch', 'compile', **common)]
  results = benchmark.run(cases, args.out)
  ours, theirs = results
  fraction = (ours['train_flops'] / (ours['train_step_ms'] / 1e3) / rate['flops_per_s']
              if ours['train_flops'] else None)
  feed = input_rate(batch, size, 'uint8', images, steps)  # configs/gpu.py's input
  summary = {
      'matmul_bf16': rate, 'train_images_per_s': ours['train_images_per_s'],
      'torch_compile_train_images_per_s': theirs['train_images_per_s'],
      'ratio_vs_torch_compile': ours['train_images_per_s'] / theirs['train_images_per_s'],
      'train_flops_per_step': ours['train_flops'], 'fraction_of_matmul_rate': fraction,
      'input_pipeline_images_per_s': feed, 'host_cpus': os.cpu_count(),
      'pipeline_feeds_train_step': feed >= ours['train_images_per_s'],
      'results': results,
  }
  lines = [
      f"- Card: {rate['device']}; bf16 matmul {matmul}^3: "
      f"{rate['flops_per_s'] / 1e12:.1f} TFLOP/s (measured).",
      f"- bf16 train, batch {batch}, {size}x{size}: gnet_jax {ours['train_images_per_s']:.0f} "
      f"images/s, torchvision torch.compile+AMP bf16+channels_last "
      f"{theirs['train_images_per_s']:.0f} ({summary['ratio_vs_torch_compile']:.2f}x).",
      '- Train step: ' + (f"{ours['train_flops'] / 1e9:.0f} GFLOP per step (XLA's count), "
                          f"{fraction:.0%} of the measured bf16 matmul rate."
                          if fraction else "XLA gave no FLOP count."),
      f"- Input pipeline on {os.cpu_count()} CPUs: {feed:.0f} images/s at batch {batch} "
      f"({'enough' if summary['pipeline_feeds_train_step'] else 'NOT enough'} for the "
      f"train step's {ours['train_images_per_s']:.0f}).",
  ]
  with open(os.path.join(args.out, 'accelerator.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(args.out, 'accelerator.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
