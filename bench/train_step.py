"""Images per second of the project's real train step (optimizer included) on synthetic data.

    python bench/train_step.py --variant torchvision --batch_size 32 --image_size 224

Median of --steps timed steps after one warm-up step, each synchronised with
block_until_ready; compile time measured separately.
"""
import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import cpu  # pylint: disable=wrong-import-position
from gnet_jax import train_lib


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='paper')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--steps', type=int, default=5)
  args = parser.parse_args()

  config = cpu.get_config()
  config.batch_size = args.batch_size
  config.model.variant = args.variant
  config.model.dtype = args.dtype
  config.num_train_steps = 1000
  model = train_lib.create_model(config, num_classes=1000)
  lr_fn = train_lib.create_learning_rate_fn(config, steps_per_epoch=100)
  tx = train_lib.create_optimizer(config, lr_fn)
  sharding = train_lib.Sharding.create()
  init, train_fn, _ = train_lib.compile_steps(config, model, tx, lr_fn, sharding,
                                              args.image_size)
  state = init()
  rng = np.random.default_rng(0)
  batch = sharding.global_batch({
      'image': rng.normal(size=(args.batch_size, args.image_size, args.image_size, 3)
                          ).astype(np.float32),
      'label': rng.integers(0, 1000, args.batch_size).astype(np.int32)})
  start = time.perf_counter()
  compiled = train_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  state, _ = compiled(state, batch)  # warm-up
  jax.block_until_ready(state)
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  print(f'{args.variant} {args.image_size}x{args.image_size} batch {args.batch_size} '
        f'{args.dtype} on {jax.devices()[0].device_kind} x{jax.device_count()}: '
        f'train {args.batch_size / step_s:.1f} images/s (median step {step_s:.3f} s), '
        f'compile {compile_s:.1f} s')


if __name__ == '__main__':
  main()
