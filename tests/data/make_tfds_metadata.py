"""Writes the tfds metadata that `tfds.testing.mock_data` needs for the tests.

Nothing can be downloaded in the tests, so the metadata (`dataset_info.json`,
`features.json`, label names) of the registered datasets the tests mock are
written here from tfds's own builder classes plus the published split sizes
(tfds catalog), and committed under `tests/data/tfds_metadata/`. Rerun after a
tfds upgrade that bumps one of these datasets' versions:

    python tests/data/make_tfds_metadata.py
"""
import os
import shutil
import tempfile

import tensorflow_datasets as tfds

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tfds_metadata')

# name -> {split: num_examples}, from https://www.tensorflow.org/datasets/catalog.
SPLITS = {
    'imagenet2012': {'train': 1_281_167, 'validation': 50_000, 'test': 100_000},
    'imagenette/160px-v2': {'train': 9_469, 'validation': 3_925},
    'cifar10': {'train': 50_000, 'test': 10_000},
    'cifar100': {'train': 50_000, 'test': 10_000},
    'mnist': {'train': 60_000, 'test': 10_000},
    'fashion_mnist': {'train': 60_000, 'test': 10_000},
}


def main():
  shutil.rmtree(OUT, ignore_errors=True)
  with tempfile.TemporaryDirectory() as tmp:
    for name, splits in SPLITS.items():
      builder = tfds.builder(name, data_dir=tmp)
      builder.info.set_splits(tfds.core.SplitDict([
          tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0)
          for split, n in splits.items()]))
      rel = os.path.relpath(builder.data_dir, tmp)
      out = os.path.join(OUT, rel)
      os.makedirs(out, exist_ok=True)
      builder.info.write_to_directory(out)
      print('wrote', out)


if __name__ == '__main__':
  main()
