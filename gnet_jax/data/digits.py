"""`sklearn_digits`: a tfds dataset of real handwritten digits that needs no network.

scikit-learn ships, inside its own package, the 1,797 labelled 8x8 digits of the
UCI "Optical Recognition of Handwritten Digits" test set (43 writers, values 0-16).
This module exposes them as an ordinary tfds dataset, so the quickstart and the
tests run the same input pipeline as ImageNet does, offline.

    config.dataset = 'digits'          # in gnet_jax configs
    tfds.builder('sklearn_digits')     # once this module is imported

The first use writes the tfds files (a few hundred kB) under the tfds data
directory (`config.data_dir`): `<data_dir>/sklearn_digits/1.0.0/`.

Split (fixed, documented, no randomness, identical on every machine): in
`sklearn.datasets.load_digits()` order, every fifth image of each class (its 1st,
6th, 11th, ...) is `test` (364 images, 35-37 per class), the rest `train` (1,433).
Stratified and interleaved, so both splits hold every writer, as with the usual
random split of this data set. (The file is ordered by writer: a split that takes its
tail would test on unseen writers, a harder task.)

Features: `image` uint8 (8, 8, 1) PNG, the 0..16 intensities scaled to 0..255
(`round(v * 255 / 16)`); `label` ClassLabel with names '0'..'9'; `index` int64,
the position in `load_digits()` (handy to trace an example back).
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NUM_EXAMPLES = 1797
TEST_EVERY = 5  # every fifth image of each class is a test image


def load_split(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Returns (images uint8 (N, 8, 8, 1), labels int64 (N,), indices (N,)) of a split."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int64)
  if len(labels) != NUM_EXAMPLES:
    raise RuntimeError(
        f'sklearn.datasets.load_digits() returned {len(labels)} images, expected '
        f'{NUM_EXAMPLES}; the sklearn_digits split would not be the documented one.')
  rank_in_class = np.zeros(NUM_EXAMPLES, np.int64)
  for label in range(10):
    rank_in_class[labels == label] = np.arange(np.sum(labels == label))
  is_test = rank_in_class % TEST_EVERY == 0
  if split == 'train':
    sel = np.flatnonzero(~is_test)
  elif split == 'test':
    sel = np.flatnonzero(is_test)
  else:
    raise ValueError(f'sklearn_digits has splits train and test, not {split!r}.')
  return images[sel], labels[sel], sel


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits as a tfds dataset (no download).

  Split: every fifth image of each class is `test` (364), the rest `train` (1,433).
  See the module docstring.
  """

  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {'1.0.0': 'train = first 1,437, test = last 360 (unseen writers).',
                   '2.0.0': 'Stratified: every fifth image of each class is test.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "scikit-learn's copy of the UCI optical-recognition handwritten digits "
            '(8x8, 0..16 scaled to 0..255). test: every fifth image of each class.'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1), encoding_format='png'),
            'label': tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
            'index': np.int64,
        }),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits',
        citation=(
            '@misc{alpaydin1998optical, author={Alpaydin, E. and Kaynak, C.}, '
            'title={Optical Recognition of Handwritten Digits}, year={1998}, '
            'howpublished={UCI Machine Learning Repository}}'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ship with scikit-learn.
    return {
        'train': self._generate_examples('train'),
        'test': self._generate_examples('test'),
    }

  def _generate_examples(self, split):
    images, labels, indices = load_split(split)
    for image, label, index in zip(images, labels, indices):
      yield int(index), {'image': image, 'label': int(label), 'index': int(index)}


def builder(data_dir: str | None = None) -> SklearnDigits:
  """The builder, with its tfds files written under `data_dir` if not there yet."""
  b = SklearnDigits(data_dir=data_dir)
  if not b.is_prepared():
    try:
      b.download_and_prepare()
    except Exception:  # Another process may have prepared it at the same time.
      b = SklearnDigits(data_dir=data_dir)
      if not b.is_prepared():
        raise
  return b
