"""Prepare a dataset ahead of time, write a copy with smaller images, or show what a
dataset holds.

    python -m gnet_jax.data prepare --dataset imagenet2012 \
        --data_dir ~/tensorflow_datasets --manual_dir ~/imagenet_archives
    python -m gnet_jax.data prepare --dataset imagenet2012 --max_side 320 \
        --data_dir ~/tensorflow_datasets      # -> config.dataset = 'imagenet2012_max320'
    python -m gnet_jax.data info --dataset folder:/path/to/root
"""
from __future__ import annotations

import argparse
import logging
import sys

import ml_collections

from gnet_jax.data import build_source, resized


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m gnet_jax.data',
      description='Prepare a dataset (tfds files under --data_dir), or a copy of it with '
                  'smaller images (--max_side), and print its info.')
  parser.add_argument('command', choices=['prepare', 'info'])
  parser.add_argument('--dataset', required=True,
                      help="tfds name, 'digits' or 'folder:/path/to/root'")
  parser.add_argument('--data_dir', default=None, help='tfds data directory')
  parser.add_argument('--manual_dir', default=None,
                      help='directory holding the archives downloaded by hand (ImageNet)')
  parser.add_argument('--max_side', type=int, default=None,
                      help='prepare: also write a copy whose images have a longer side of '
                      'at most this many pixels, as the tfds dataset <name>_max<N>')
  parser.add_argument('--quality', type=int, default=resized.DEFAULT_QUALITY,
                      help='JPEG quality of the images the copy shrinks')
  parser.add_argument('--name', default=None, help="the copy's tfds name")
  parser.add_argument('--skip_corrupt_images', action='store_true',
                      help='leave unreadable images out of the copy (named in the log)')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  config = ml_collections.ConfigDict(dict(
      dataset=args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir))
  try:
    source = build_source(config)  # Prepares a tfds dataset (or says what is missing).
    print(f'{source.name}: {len(source.class_names)} classes, splits {source.splits()}')
    if args.command == 'prepare' and args.max_side is not None:
      name, bad = resized.write_resized_copy(
          source, max_side=args.max_side, quality=args.quality, data_dir=args.data_dir,
          name=args.name, skip_corrupt=args.skip_corrupt_images)
      copy = build_source(ml_collections.ConfigDict(dict(
          dataset=name, data_dir=args.data_dir, manual_dir=None)))
      left_out = f'; {len(bad)} unreadable images left out' if bad else ''
      print(f'{name}: splits {copy.splits()}{left_out}. Train on it with '
            f'--config.dataset={name}'
            + (f' --config.data_dir={args.data_dir}' if args.data_dir else ''))
  except ValueError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main(sys.argv[1:])
