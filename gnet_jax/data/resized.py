"""A copy of a dataset with every image's longer side at most N pixels, for hosts whose
CPUs cannot decode the original images as fast as the accelerator trains on them (the
way FFCV and fast ImageNet runs store ImageNet at 256-512 px).

    python -m gnet_jax.data prepare --dataset imagenet2012 --max_side 320 \
        --data_dir ~/tensorflow_datasets
    python train.py ... --config.dataset=imagenet2012_max320

The copy is a tfds dataset, `<name>_max<N>`, written beside the original under the same
data_dir, with the same splits, class names and order; tfds reads it from its files
(no registration), so `config.dataset` names it like any other. An image whose longer
side is at most N is copied as it is (no second JPEG generation); a larger one is
decoded, shrunk with antialiasing to a longer side of N and written as a JPEG of
`quality`. Each example keeps its original's name (`file_name`) for error messages.
Decoding then costs a fraction of the original's (pixels fall with the square of the
side), while random crops of up to the whole image lose the detail above N px.
"""
from __future__ import annotations

import logging
import re

import tensorflow as tf
import tensorflow_datasets as tfds
import tqdm

from gnet_jax.data.preprocess import decode_rgb, to_input_dtype
from gnet_jax.data.source import Source, copy_suffix

logger = logging.getLogger(__name__)

DEFAULT_QUALITY = 90  # FFCV's ImageNet files; near-lossless to the eye
VERSION = '1.0.0'


def copy_name(source_name: str, max_side: int) -> str:
  """The tfds name of the copy: the source's name as a tfds name, plus '_max<N>'."""
  base = source_name.rstrip('/').rsplit('/', 1)[-1] if source_name.startswith(
      'folder:') else source_name
  slug = re.sub(r'[^a-z0-9]+', '_', base.lower()).strip('_') or 'images'
  if not slug[0].isalpha():
    slug = 'd_' + slug
  return slug + copy_suffix(max_side)


def _shrink_fn(max_side: int, quality: int):
  """record -> {'image': encoded bytes, 'label', 'index', 'key'}; an error for an image
  that cannot be decoded (so that the copy never holds one)."""

  def fn(ex):
    raw = ex['raw'] if 'raw' in ex else tf.io.read_file(ex['path'])
    image = decode_rgb(raw)
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    longer = tf.reduce_max(hw)

    def shrunk():
      size = tf.cast(tf.maximum(tf.round(hw * (max_side / longer)), 1), tf.int32)
      small = tf.image.resize(tf.cast(image, tf.float32), size, antialias=True)
      return tf.io.encode_jpeg(to_input_dtype(small, tf.uint8), quality=quality)

    encoded = tf.cond(longer > max_side, shrunk, lambda: raw)
    return {'image': encoded, 'label': ex['label'], 'index': ex['index'], 'key': ex['key']}

  return fn


def _records(source: Source, split: str) -> tf.data.Dataset:
  """The split's records in their fixed order, each with its index."""
  ds = source.records(split)
  return ds.enumerate().map(lambda i, ex: {**ex, 'index': i})


def _examples(source: Source, split: str, max_side: int, quality: int, skip_corrupt: bool,
              bad: list):
  """Yields (key, example) of the copy of `split`; an unreadable image stops the copy
  naming it, or with `skip_corrupt` is left out and named in `bad`."""
  total = source.num_records(split)
  ds = _records(source, split).map(_shrink_fn(max_side, quality),
                                   num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  expected = 0
  for ex in tqdm.tqdm(ds.ignore_errors().prefetch(tf.data.AUTOTUNE).as_numpy_iterator(),
                      total=total, unit='img', desc=f'{split}, max side {max_side}'):
    index = int(ex['index'])
    missing = list(range(expected, index))
    expected = index + 1
    _unreadable(source, split, missing, skip_corrupt, bad)
    yield index, {'image': ex['image'], 'label': int(ex['label']),
                  'file_name': ex['key'].decode('utf-8', 'replace')}
  _unreadable(source, split, list(range(expected, total)), skip_corrupt, bad)


def _unreadable(source, split, indices, skip_corrupt, bad) -> None:
  if not indices:
    return
  keys = [_key_of(source, split, i) for i in indices]
  if not skip_corrupt:
    raise ValueError(f'Cannot decode image {keys[0]} ({source.name}, split {split!r}): it '
                     'is truncated, corrupt or not an image. Replace or delete it, or pass '
                     '--skip_corrupt_images to leave such files out of the copy.')
  for key in keys:
    logger.warning('Left out unreadable image %s (%s split %s).', key, source.name, split)
  bad.extend(keys)


def _key_of(source: Source, split: str, index: int) -> str:
  ex = next(iter(_records(source, split).skip(index).take(1).as_numpy_iterator()))
  return ex['key'].decode('utf-8', 'replace')


def write_resized_copy(source: Source, *, max_side: int, data_dir: str | None,
                       quality: int = DEFAULT_QUALITY, name: str | None = None,
                       skip_corrupt: bool = False,
                       splits: list[str] | None = None) -> tuple[str, list[str]]:
  """Writes the copy of `splits` (default: every split) of `source` (see the module
  docstring); returns its tfds name and the names of the images left out as unreadable
  (with `skip_corrupt`)."""
  if not isinstance(max_side, int) or max_side < 32:
    raise ValueError(f'--max_side must be an integer of at least 32, got {max_side!r}.')
  if not 1 <= quality <= 100:
    raise ValueError(f'--quality must be in [1, 100], got {quality}.')
  name = name or copy_name(source.name, max_side)
  if not re.fullmatch(r'[a-z][a-z0-9_]*', name):
    raise ValueError(f'--name {name!r}: a tfds name is lower case letters, digits and _.')
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(encoding_format=None),  # the copied files keep theirs
      'label': tfds.features.ClassLabel(names=list(source.class_names)),
      'file_name': tfds.features.Text(),
  })
  bad: list[str] = []
  splits = {split: _examples(source, split, max_side, quality, skip_corrupt, bad)
            for split in splits or source.splits()}
  try:
    tfds.dataset_builders.store_as_tfds_dataset(
        name, VERSION, features, splits, data_dir=data_dir, disable_shuffling=True,
        description=(f'{source.name} with every image\'s longer side at most {max_side} px '
                     f'(larger ones shrunk, JPEG quality {quality}; smaller ones as they '
                     'were).'))
  except RuntimeError as e:
    if 'already prepared' not in str(e):
      raise
    raise ValueError(f'{name} already exists under {data_dir or "the tfds data_dir"}: use '
                     f'it as --config.dataset={name}, or delete it (or pass --name) to write '
                     'it again.') from None
  return name, bad

