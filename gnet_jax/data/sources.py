"""Data sources: where the raw (still encoded) records of a split come from, and the
`DatasetInfo` a run reads off its source.

A source is built once per run (`build_source`) and read by every iterator of the run. A
record is {'raw': encoded bytes} or {'path': file to read}, plus 'label' (int64) and
'key' (a string naming the example in error messages).

- `TfdsSource`: a registered tfds dataset ('imagenet2012', 'cifar10', ...; 'digits' is
  the built-in `sklearn_digits`), prepared on first use; ImageNet from archives
  downloaded by hand (`config.manual_dir`).
- `gnet_jax.data.folder.FolderSource`: 'folder:/path/to/root' images.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from gnet_jax.data import digits as digits_lib

logger = logging.getLogger(__name__)

DIGITS = 'digits'
FOLDER_PREFIX = 'folder:'
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
_COPY_SUFFIX = re.compile(r'_max\d+$')  # copies with smaller images (gnet_jax.data.resized)


def copy_suffix(max_side: int) -> str:
  return f'_max{max_side}'


def original_name(name: str) -> str:
  """The dataset a resized copy was made from ('mnist' for 'mnist_max256'), else `name`."""
  return _COPY_SUFFIX.sub('', name)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the training loop need to know about the data."""
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  class_names: list[str]
  name: str = ''  # The resolved dataset: 'cifar10', 'sklearn_digits', 'folder:/root'.
  train_split: str = ''
  eval_split: str = ''
  random_flip: bool = True  # Whether training flips images horizontally.


def check_batch_size(batch_size: int, process_count: int, device_count: int) -> None:
  """Raises ValueError unless the global batch splits evenly over processes and devices."""
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f'config.batch_size must be a positive integer, got {batch_size!r}.')
  if process_count <= 0 or device_count <= 0:
    raise ValueError(f'process_count ({process_count}) and device_count ({device_count}) '
                     'must be positive.')
  if device_count % process_count:
    raise ValueError(f'{device_count} devices do not split evenly over {process_count} '
                     'processes; every process must drive the same number of devices.')
  for count, what in ((process_count, 'processes (jax.process_count())'),
                      (device_count, 'devices (jax.device_count())')):
    if batch_size % count:
      step = math.lcm(process_count, device_count)
      lower, upper = (batch_size // step) * step, (batch_size // step + 1) * step
      hint = f'{lower} or {upper}' if lower else f'{upper}'
      raise ValueError(
          f'config.batch_size={batch_size} is the global batch over all devices and '
          f'processes, and it does not divide by the {count} {what}. Use a multiple '
          f'of {step}, e.g. --config.batch_size={hint}.')


class Source:
  """A dataset: class names, split sizes, and this process's raw records."""
  name: str
  class_names: list[str]
  default_flip: bool

  def check_split(self, split: str, setting: str = 'train_split/eval_split') -> None:
    """ValueError naming `config.<setting>` and the splits there are, if `split` is not one."""
    raise NotImplementedError

  def split_size(self, split: str) -> int:
    """The number of examples the split's metadata gives."""
    raise NotImplementedError

  def actual_split_size(self, split: str) -> int:
    """The number of records really there (a mocked dataset has fewer)."""
    return self.split_size(split)

  def splits(self) -> dict[str, int]:
    """Every split and its number of examples."""
    raise NotImplementedError

  def local_size(self, split: str, pi: int, pc: int) -> int:
    raise NotImplementedError

  def local_arrays(self, split: str, pi: int, pc: int) -> dict[str, np.ndarray]:
    """This process's records as in-memory numpy arrays, in a fixed order."""
    raise NotImplementedError

  def local_dataset(self, split: str, pi: int, pc: int) -> tf.data.Dataset:
    """This process's records as a tf.data.Dataset, in a fixed order."""
    return tf.data.Dataset.from_tensor_slices(self.local_arrays(split, pi, pc))


def split_error(setting: str, split: str, dataset: str, available) -> ValueError:
  return ValueError(
      f'config.{setting}={split!r}: dataset {dataset!r} has no such split. Its splits are '
      f'{sorted(available)}; set config.{setting} to one of them (tfds slicing such as '
      f"'train[:90%]' also works).")


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

  def split_size(self, split: str) -> int:
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

  def actual_split_size(self, split: str) -> int:
    self.check_split(split)
    return self._cardinality(split)

  def local_size(self, split: str, pi: int, pc: int) -> int:
    self.check_split(split)
    return self._cardinality(tfds.split_for_jax_process(split, process_index=pi,
                                                        process_count=pc))

  def local_dataset(self, split: str, pi: int, pc: int) -> tf.data.Dataset:
    self.check_split(split)
    return self._dataset(tfds.split_for_jax_process(split, process_index=pi,
                                                    process_count=pc))

  def local_arrays(self, split: str, pi: int, pc: int) -> dict[str, np.ndarray]:
    """Reads this process's raw records into memory (config.cache=True)."""
    raws, labels, keys = [], [], []
    for ex in self.local_dataset(split, pi, pc).as_numpy_iterator():
      raws.append(ex['raw'])
      labels.append(ex['label'])
      keys.append(ex['key'])
    logger.info('Cached %d raw records (%.1f MB) of %s %s, process %d/%d.', len(raws),
                sum(map(len, raws)) / 1e6, self.name, split, pi, pc)
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


def build_source(config) -> Source:
  """The source `config.dataset` names (prepares a tfds dataset on first use)."""
  name = config.dataset
  if not isinstance(name, str) or not name:
    raise ValueError(f'config.dataset must be a dataset name, got {name!r}.')
  if name.startswith(FOLDER_PREFIX):
    from gnet_jax.data.folder import FolderSource  # pylint: disable=import-outside-toplevel
    root = os.path.expanduser(name[len(FOLDER_PREFIX):])
    if not root:
      raise ValueError("config.dataset='folder:' needs a path: 'folder:/path/to/root'.")
    return FolderSource(root)
  return TfdsSource(config)


def dataset_info(source: Source, config) -> DatasetInfo:
  """What the model and the loop need to know of `source` as the config reads it."""
  source.check_split(config.train_split, 'train_split')
  source.check_split(config.eval_split, 'eval_split')
  flip = config.get('random_flip', None)
  return DatasetInfo(
      num_classes=len(source.class_names),
      num_train_examples=source.split_size(config.train_split),
      num_eval_examples=source.split_size(config.eval_split),
      class_names=list(source.class_names),
      name=source.name,
      train_split=config.train_split,
      eval_split=config.eval_split,
      random_flip=source.default_flip if flip is None else bool(flip))


def get_dataset_info(config) -> DatasetInfo:
  """Number of classes, split sizes and class names (prepares tfds data if needed)."""
  return dataset_info(build_source(config), config)
