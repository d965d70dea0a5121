"""Registered tfds datasets as sources ('imagenet2012', 'cifar10', ...; 'digits' is the
built-in `sklearn_digits`), prepared on first use; ImageNet from archives downloaded by
hand (`config.manual_dir`). A resized copy (`gnet_jax.data.resized`) is read the same way:
tfds finds it among its files.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from gnet_jax.data import digits as digits_lib
from gnet_jax.data.source import Source, original_name, register, split_error

logger = logging.getLogger(__name__)

DIGITS = 'digits'
# Datasets whose labels a horizontal mirror changes or makes implausible.
NO_FLIP_DATASETS = frozenset({
    'sklearn_digits', 'mnist', 'emnist', 'kmnist', 'binarized_mnist', 'svhn_cropped',
    'omniglot', 'cmaterdb', 'mnist_corrupted',
})
# What the manual directory must hold, per dataset (tfds's builder reads these).
MANUAL_FILES = {
    'imagenet2012': ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar'),
}
PREPARE_COMMAND = 'python -m gnet_jax.data prepare'


class TfdsSource(Source):
  """A registered tfds dataset (including the built-in digits)."""

  def __init__(self, config):
    name = config.dataset
    data_dir = config.get('data_dir')
    if name == DIGITS:
      self.builder = digits_lib.builder(data_dir)
    else:
      try:
        self.builder = tfds.builder(name, data_dir=data_dir)
      except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f'config.dataset={name!r} is not a tfds dataset ({e}). Use a tfds '
            f"image-classification dataset name (e.g. 'imagenet2012', "
            f"'imagenette/320px-v2', 'cifar10', 'mnist'), 'digits' for the built-in "
            f"offline dataset, or 'folder:/path/to/root' for your own images.") from None
      ensure_prepared(self.builder, config)
    self.name = self.builder.name
    info = self.builder.info
    self._image_key, self._label_key = image_and_label_keys(self.name, info.features,
                                                            info.supervised_keys)
    self.class_names = list(info.features[self._label_key].names)
    self.default_flip = original_name(self.name) not in NO_FLIP_DATASETS
    self._image_keys = [k for k, f in info.features.items()
                        if isinstance(f, tfds.features.Image)]
    self._has_file_name = 'file_name' in info.features
    self._cardinality_cache: dict[Any, int] = {}

  def check_split(self, split: str, setting: str = 'train_split/eval_split') -> None:
    try:
      self.builder.info.splits[split]  # pylint: disable=pointless-statement
    except (KeyError, ValueError, AssertionError) as e:
      available = list(self.builder.info.splits.keys())
      if not available:
        raise ValueError(f'dataset {self.name!r} has no prepared splits under '
                         f'{self.builder.data_dir}: {e}') from None
      raise split_error(setting, split, self.name, available) from None

  def num_examples(self, split: str) -> int:
    self.check_split(split)
    return int(self.builder.info.splits[split].num_examples)

  def splits(self) -> dict[str, int]:
    return {str(k): v.num_examples for k, v in self.builder.info.splits.items()}

  def _dataset(self, split) -> tf.data.Dataset:
    decoders = {k: tfds.decode.SkipDecoding() for k in self._image_keys}
    # An example is named by its file where the dataset keeps file names (ImageNet's),
    # else by its tfds id, which tfds then adds to every example.
    has_file_name = self._has_file_name
    read_config = tfds.ReadConfig(add_tfds_id=not has_file_name, try_autocache=False)
    ds = self.builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                                 read_config=read_config)
    image_key, label_key, name = self._image_key, self._label_key, self.name

    def to_record(ex):
      key = tf.strings.join([name, ':', ex['file_name'] if has_file_name else ex['tfds_id']])
      return {'raw': ex[image_key], 'label': tf.cast(ex[label_key], tf.int64), 'key': key}

    return ds.map(to_record, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def _cardinality(self, split) -> int:
    # tfds knows the real number of records without reading anything.
    cache_key = repr(split)
    if cache_key not in self._cardinality_cache:
      n = int(self._dataset(split).cardinality())
      if n < 0:
        n = int(self.builder.info.splits[split].num_examples)
      self._cardinality_cache[cache_key] = n
    return self._cardinality_cache[cache_key]

  def num_records(self, split: str, process_index: int = 0, process_count: int = 1) -> int:
    self.check_split(split)
    return self._cardinality(tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count))

  def records(self, split: str, process_index: int = 0,
              process_count: int = 1) -> tf.data.Dataset:
    self.check_split(split)
    return self._dataset(tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count))

  def arrays(self, split: str) -> dict[str, np.ndarray]:
    """Reads the split's raw records into memory (config.cache=True)."""
    raws, labels, keys = [], [], []
    for ex in self.records(split).as_numpy_iterator():
      raws.append(ex['raw'])
      labels.append(ex['label'])
      keys.append(ex['key'])
    logger.info('Holding %d raw records (%.1f MB) of %s %s in memory.', len(raws),
                sum(map(len, raws)) / 1e6, self.name, split)
    return {'raw': np.array(raws, dtype=object), 'label': np.array(labels, np.int64),
            'key': np.array(keys, dtype=object)}


def image_and_label_keys(name, features, supervised_keys) -> tuple[str, str]:
  """The image and class-label features of a tfds dataset, from its DatasetInfo."""
  images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
  labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
  image_key = label_key = None
  if supervised_keys and len(supervised_keys) == 2:
    x, y = supervised_keys
    if x in images:
      image_key = x
    if y in labels:
      label_key = y
  if image_key is None:
    image_key = 'image' if 'image' in images else (images[0] if len(images) == 1 else None)
  if label_key is None:
    label_key = 'label' if 'label' in labels else (labels[0] if len(labels) == 1 else None)
  if image_key is None or label_key is None:
    raise ValueError(
        f'config.dataset={name!r} is not an image-classification dataset this pipeline '
        f'can read: it needs one tfds.features.Image and one tfds.features.ClassLabel '
        f'feature (found images {images}, class labels {labels}).')
  image = features[image_key]
  if np.dtype(image.np_dtype) not in (np.uint8, np.uint16):
    raise ValueError(f'config.dataset={name!r}: image feature {image_key!r} has dtype '
                     f'{image.np_dtype}; only uint8 and uint16 images are supported.')
  return image_key, label_key


def ensure_prepared(builder, config) -> None:
  """Prepares a tfds dataset on first use; ImageNet needs its archives by hand."""
  if builder.is_prepared():
    return
  manual_instructions = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
  data_dir = builder.data_dir
  if not manual_instructions:
    try:
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f'config.dataset={config.dataset!r} is not prepared under {data_dir} and tfds '
          f'could not download and prepare it ({type(e).__name__}: {e}). Check the network '
          'and config.data_dir, or prepare it on a machine with network access and copy '
          f'{data_dir}.') from e
    return
  manual_dir = config.get('manual_dir')
  command = (f'{PREPARE_COMMAND} --dataset {config.dataset} '
             f'--data_dir {config.get("data_dir") or "~/tensorflow_datasets"} '
             f'--manual_dir {manual_dir or "/path/to/archives"}')
  where = f'It is not prepared under {data_dir}.'
  required = MANUAL_FILES.get(builder.name, ())
  if not manual_dir:
    raise ValueError(
        f'config.dataset={config.dataset!r} must be prepared from files downloaded by '
        f'hand, and config.manual_dir is not set. {where} Download '
        f'{", ".join(required) or "the files below"} into a directory, set '
        f'config.manual_dir to it and run once:\n  {command}\n'
        f'tfds says: {manual_instructions.strip()}')
  manual_dir = os.path.expanduser(manual_dir)
  if not tf.io.gfile.isdir(manual_dir):
    raise ValueError(
        f'config.manual_dir={manual_dir!r} does not exist or is not a directory. '
        f'{where} Put {", ".join(required) or "the downloaded files"} there and run '
        f'once:\n  {command}')
  missing = [f for f in required if not tf.io.gfile.exists(os.path.join(manual_dir, f))]
  if missing:
    raise ValueError(
        f'config.manual_dir={manual_dir!r} lacks {", ".join(missing)} (needs '
        f'{", ".join(required)}, from https://image-net.org/download-images). {where} '
        f'Then run once:\n  {command}')
  if jax.process_count() > 1:
    raise ValueError(
        f'{config.dataset} is not prepared under {data_dir}; prepare it once, before a '
        f'multi-process run, with:\n  {command}')
  logger.warning('Preparing %s from %s into %s: for ImageNet this takes hours.',
                 builder.name, manual_dir, data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


register('', TfdsSource)  # every name no other kind takes
