"""Prepare a dataset ahead of time, or show what a dataset holds.

    python -m gnet_jax.data prepare --dataset imagenet2012 \
        --data_dir ~/tensorflow_datasets --manual_dir ~/imagenet_archives
    python -m gnet_jax.data info --dataset folder:/path/to/root
"""
from __future__ import annotations

import argparse
import logging
import sys

import ml_collections

from gnet_jax.data import build_source


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m gnet_jax.data',
      description='Prepare a dataset (tfds files under --data_dir) and print its info.')
  parser.add_argument('command', choices=['prepare', 'info'])
  parser.add_argument('--dataset', required=True,
                      help="tfds name, 'digits' or 'folder:/path/to/root'")
  parser.add_argument('--data_dir', default=None, help='tfds data directory')
  parser.add_argument('--manual_dir', default=None,
                      help='directory holding the archives downloaded by hand (ImageNet)')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  config = ml_collections.ConfigDict(dict(
      dataset=args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir))
  try:
    source = build_source(config)  # Prepares a tfds dataset (or says what is missing).
  except ValueError as e:
    sys.exit(f'error: {e}')
  print(f'{source.name}: {len(source.class_names)} classes, splits {source.splits()}')


if __name__ == '__main__':
  main(sys.argv[1:])
