"""Measures the input pipeline alone: images per second, train and eval.

Writes a few hundred ImageNet-sized JPEGs (about 500x375, ~110 kB, like the
average ImageNet photo) into a temporary folder, reads them as
`config.dataset = 'folder:<tmp>'` with the ImageNet recipe (Inception crop at
224, float32 unless --dtype bfloat16) and times the batches, with no model
running. The model's train step must consume fewer images per second than this.

    python bench/input_pipeline.py                   # 320 train + 256 eval images
    python bench/input_pipeline.py --batch_size 128 --steps 40 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default as default_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from gnet_jax import data  # pylint: disable=g-import-not-at-top,wrong-import-position


def photo_like_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
  """A JPEG with a photograph's structure (smooth shapes plus texture), not noise.

  Pure noise compresses badly and decodes slower than real photos; smooth images
  the opposite. Low-frequency colour fields plus mild texture land at the size
  and decode cost of an average ImageNet JPEG (~110 kB at 500x375, quality 90).
  """
  coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
  image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC),
                     np.float32)
  yy, xx = np.mgrid[0:height, 0:width]
  for _ in range(6):  # A few objects with edges.
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    ry, rx = rng.uniform(20, height / 2), rng.uniform(20, width / 2)
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    image[inside] = 0.5 * image[inside] + 0.5 * rng.uniform(0, 255, size=3)
  image += rng.normal(0, 22, size=image.shape)  # Texture / sensor noise.
  out = io.BytesIO()
  Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(out, 'JPEG', quality=90)
  return out.getvalue()


def write_folder(root: str, num_train: int, num_eval: int, num_classes: int = 10,
                 seed: int = 0) -> float:
  """Writes root/{train,validation}/<class>/*.jpg; returns the mean file size in kB."""
  rng = np.random.default_rng(seed)
  sizes = []
  for split, count in (('train', num_train), ('validation', num_eval)):
    for i in range(count):
      cls_dir = os.path.join(root, split, f'class_{i % num_classes:02d}')
      os.makedirs(cls_dir, exist_ok=True)
      width, height = (500, 375) if rng.random() < 0.75 else (375, 500)
      data = photo_like_jpeg(rng, width, height)
      sizes.append(len(data))
      with open(os.path.join(cls_dir, f'{split}_{i:05d}.jpg'), 'wb') as f:
        f.write(data)
  return float(np.mean(sizes)) / 1e3


def time_batches(iterator, steps: int, warmup: int) -> tuple[float, int]:
  """Images per second over `steps` batches, after `warmup` untimed ones."""
  for _ in range(warmup):
    next(iterator)
  images, start = 0, time.perf_counter()
  for _ in range(steps):
    try:
      batch = next(iterator)
    except StopIteration:
      break
    images += int(batch['mask'].sum()) if 'mask' in batch else len(batch['label'])
  return images / (time.perf_counter() - start), images


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--num_train', type=int, default=320)
  parser.add_argument('--num_eval', type=int, default=256)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--steps', type=int, default=30, help='timed train batches')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--dir', default=None, help='keep the JPEGs here (default: temp)')
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory() as tmp:
    root = args.dir or tmp
    start = time.perf_counter()
    kb = write_folder(root, args.num_train, args.num_eval)
    print(f'wrote {args.num_train} + {args.num_eval} JPEGs (~500x375, mean {kb:.0f} kB) '
          f'in {time.perf_counter() - start:.1f}s under {root}')

    config = default_config.get_config()
    config.dataset = f'folder:{root}'
    config.batch_size = args.batch_size
    config.image_size = args.image_size
    config.input_dtype = args.dtype
    config.augment = 'inception'

    start = time.perf_counter()
    train = data.create_train_iterator(config, process_index=0, process_count=1)
    next(train)
    print(f'train: first batch after {time.perf_counter() - start:.1f}s')
    rate, n = time_batches(train, args.steps, warmup=2)
    print(f'train: {rate:.0f} images/s ({n} images, batch {args.batch_size}, '
          f'{args.image_size}x{args.image_size}, {args.dtype}, Inception crop + flip)')

    evaluator = data.create_eval_iterator(config, process_index=0, process_count=1)
    eval_rate, n_eval = time_batches(evaluator, len(evaluator), warmup=0)
    print(f'eval:  {eval_rate:.0f} images/s ({n_eval} images, one pass from the first '
          f'batch on, centre crop 0.875)')
    cores = os.cpu_count()
    print(f'on {cores} CPU cores. Compare with the train step: python bench/benchmark.py')


if __name__ == '__main__':
  main()
