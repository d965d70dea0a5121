"""Input pipelines: one config builds the train and eval iterators.

Datasets (`config.dataset`)
  * any tfds image-classification dataset by name: 'imagenet2012' (prepared from
    the official archives in `config.manual_dir`), 'imagenette/160px-v2',
    'cifar10', 'mnist', ... The image and label features, the class names and the
    number of classes come from the dataset's `tfds.core.DatasetInfo`.
  * 'digits': scikit-learn's 1,797 handwritten digits as the tfds dataset
    `sklearn_digits` (gnet_jax/digits.py), written under `config.data_dir` on first
    use; no network. Splits 'train' (1,433) and 'test' (364: every fifth of each class).
  * 'folder:/path/to/root': the user's own images in `root/<split>/<class>/*.jpg`
    (also .jpeg .png .gif .bmp .webp), with tfds.ImageFolder's conventions: label i
    is the i-th class folder name in sorted order over all splits, examples are
    listed in the same seeded order (but where tfds.ImageFolder silently ignores a
    stray file or takes a junk folder for a class, this is a clear error; hidden
    files and folders are ignored). Splits accept tfds slicing ('train[:90%]').

Output
  Train batches {'image': (local_batch, S, S, 3) `config.input_dtype`, 'label':
  (local_batch,) int32}; eval batches add 'mask' (bool, False on padding). Images
  are normalised with the ImageNet mean/std (`MEAN_RGB`, `STDDEV_RGB`).
  local_batch = config.batch_size // process_count.

Preprocessing (`config.augment`)
  'inception': train = random-resized crop (area 8-100%, aspect 3/4-4/3; JPEGs are
    only decoded inside the crop window), flip, bilinear resize to S; eval = centre
    crop of 0.875 of the shorter side, resized to S.
  'small': train = resize to S, zero-pad S/8 each side, random S x S crop, flip;
    eval = resize to S. For digits, MNIST, CIFAR.
  Flip is on unless the dataset is one whose labels a mirror breaks (digits,
  MNIST, SVHN...); `config.random_flip` overrides. Grayscale, grayscale+alpha,
  palette, RGBA (alpha dropped), CMYK and 16-bit images all become RGB uint8 first;
  images smaller than the crop are upscaled.

Determinism and positioning
  Every random choice is a pure function of (config.seed, epoch or example
  position): per-example augmentation uses stateless TF ops seeded with (seed,
  position of the example, unique over processes), and the order of each epoch
  is seeded with (seed, epoch). Parallelism, prefetching and timing
  therefore cannot change a batch, and the stream can be entered at any point:
  train batch k holds stream positions [k * local_batch, (k+1) * local_batch),
  position p is example (p mod n) of epoch (p div n) (n = this process's shard).
  `create_train_iterator(start_step=s)` computes the epoch and offset of step s
  and starts there:
    * indexed sources (folders; any dataset with `config.cache=True`, whose raw
      records are then held in memory): the epoch order is a full permutation of
      the whole split computed index by index
      (`tf.random.experimental.index_shuffle`), so entering at any step costs
      nothing. Every process holds the index and takes rows
      [p * local_batch, (p+1) * local_batch) of each global batch, decoding only
      those: the global batches are the same for any process count;
    * streamed tfds sources (`config.cache=False`): each process reads its own
      shard in its fixed on-disk order, shuffled by a buffer of
      `config.shuffle_buffer` records seeded with (seed, process, epoch);
      entering at step s skips the raw records of the current epoch BEFORE they
      are decoded (read, not decoded: for ImageNet on one host at most one epoch
      of reading, usually a few minutes).
  Same seed, batch size (and, for streamed sources, process count) and TF/tfds
  versions => same batches, across runs and after a resume.

Sharding
  Each process decodes only its own examples: its shard of a streamed source
  (`tfds.split_for_jax_process`), its rows of each global batch of an indexed one. Eval: every process yields the same number of batches (padded,
  masked), and over all processes the unmasked rows are each eval example
  exactly once; nothing is dropped.

Bad input
  Unknown dataset, missing split, missing ImageNet manual directory or archives,
  a non-image file, nested folder or empty class folder in an image folder,
  batch sizes that do not divide: ValueError naming the setting or file and what
  to do, at start-up. An image that cannot be decoded (truncated, corrupt, not
  an image) stops the pipeline with its file name, or, with
  `config.skip_corrupt_images=True`, is skipped and counted in the log (train:
  its slot is refilled with another image of the same batch, so batch k stays
  batch k; eval: it is masked). A label outside [0, num_classes) stops the
  pipeline naming the example.

TensorFlow is imported here (and in gnet_jax/digits.py) only, and is hidden from
any GPU/TPU. Prepare a dataset ahead of time with
    python -m gnet_jax.input_pipeline prepare --dataset imagenet2012 \
        --data_dir ~/tensorflow_datasets --manual_dir ~/imagenet_archives
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import math
import os
import random
import sys
from typing import Any, Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from gnet_jax import digits as digits_lib


def _hide_accelerators_from_tf() -> None:
  """TF only decodes images: keep it off the GPU/TPU that JAX uses."""
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # Already initialised, or no such kind.
      pass


_hide_accelerators_from_tf()

logger = logging.getLogger(__name__)

MEAN_RGB = (0.485, 0.456, 0.406)  # ImageNet mean of [0, 1] pixels (torchvision's).
STDDEV_RGB = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875  # Eval centre crop: 224 of 256.
AUGMENTS = ('inception', 'small')
INPUT_DTYPES = {'float32': tf.float32, 'bfloat16': tf.bfloat16}
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp', '.webp')
DIGITS = 'digits'
FOLDER_PREFIX = 'folder:'
# Datasets whose labels a horizontal mirror changes or makes implausible.
NO_FLIP_DATASETS = frozenset({
    'sklearn_digits', 'mnist', 'emnist', 'kmnist', 'binarized_mnist', 'svhn_cropped',
    'omniglot', 'cmaterdb', 'mnist_corrupted',
})
# Skipping is for a few bad files among many; above this the data are broken.
MAX_CORRUPT_FRACTION = 0.01
MAX_CORRUPT_ALWAYS_ALLOWED = 10
# Batches decoded at the same time (each in parallel over its images), so that the
# end of one batch's decoding overlaps with the start of the next.
WINDOWS_IN_FLIGHT = 2
_TF_GLOBAL_SEED = 1_234_567  # See _fixed_tf_global_seed.
_INT64_MAX = np.iinfo(np.int64).max


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


# ----------------------------------------------------------------------------------
# Sources: where the raw (still encoded) records of a split come from.
# A record is {'raw': encoded bytes} or {'path': file to read}, plus 'label' (int64)
# and 'key' (a string naming the example in error messages).
# ----------------------------------------------------------------------------------


class _Source:
  """A dataset: class names, split sizes, and this process's raw records."""
  name: str
  class_names: list[str]
  default_flip: bool

  def split_size(self, split: str) -> int:
    raise NotImplementedError

  def local_size(self, split: str, pi: int, pc: int) -> int:
    raise NotImplementedError

  def local_arrays(self, split: str, pi: int, pc: int) -> dict[str, np.ndarray]:
    """This process's records as in-memory numpy arrays, in a fixed order."""
    raise NotImplementedError

  def local_dataset(self, split: str, pi: int, pc: int) -> tf.data.Dataset:
    """This process's records as a tf.data.Dataset, in a fixed order."""
    arrays = self.local_arrays(split, pi, pc)
    return tf.data.Dataset.from_tensor_slices(arrays)


def _split_error(setting: str, split: str, dataset: str, available) -> ValueError:
  return ValueError(
      f'config.{setting}={split!r}: dataset {dataset!r} has no such split. Its splits are '
      f'{sorted(available)}; set config.{setting} to one of them (tfds slicing such as '
      f"'train[:90%]' also works).")


class _TfdsSource(_Source):
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
      _ensure_prepared(self.builder, config)
    self.name = self.builder.name
    info = self.builder.info
    self._image_key, self._label_key = _image_and_label_keys(self.name, info.features,
                                                             info.supervised_keys)
    label_feature = info.features[self._label_key]
    self.class_names = list(label_feature.names)
    self.default_flip = self.name not in NO_FLIP_DATASETS
    self._image_keys = [k for k, f in info.features.items()
                        if isinstance(f, tfds.features.Image)]
    self._has_file_name = 'file_name' in info.features
    self._cardinality_cache: dict[Any, int] = {}

  def _check_split(self, split: str, setting: str = 'train_split/eval_split') -> None:
    try:
      self.builder.info.splits[split]  # pylint: disable=pointless-statement
    except (KeyError, ValueError, AssertionError) as e:
      available = list(self.builder.info.splits.keys())
      if not available:
        raise ValueError(f'dataset {self.name!r} has no prepared splits under '
                         f'{self.builder.data_dir}: {e}') from None
      raise _split_error(setting, split, self.name, available) from None

  def split_size(self, split: str) -> int:
    self._check_split(split)
    return int(self.builder.info.splits[split].num_examples)

  def _dataset(self, split) -> tf.data.Dataset:
    decoders = {k: tfds.decode.SkipDecoding() for k in self._image_keys}
    read_config = tfds.ReadConfig(add_tfds_id=True, try_autocache=False)
    ds = self.builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                                 read_config=read_config)
    image_key, label_key, name = self._image_key, self._label_key, self.name
    has_file_name = self._has_file_name

    def to_record(ex):
      key = tf.strings.join([name, ':', ex['tfds_id']])
      if has_file_name:
        key = tf.strings.join([key, ' file_name=', ex['file_name']])
      return {'raw': ex[image_key], 'label': tf.cast(ex[label_key], tf.int64), 'key': key}

    return ds.map(to_record, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def _cardinality(self, split) -> int:
    # The real number of records (a mocked dataset, for one, has fewer than its
    # metadata says); tfds knows it without reading anything.
    cache_key = repr(split)
    if cache_key not in self._cardinality_cache:
      n = int(self._dataset(split).cardinality())
      if n < 0:
        n = int(self.builder.info.splits[split].num_examples)
      self._cardinality_cache[cache_key] = n
    return self._cardinality_cache[cache_key]

  def actual_split_size(self, split: str) -> int:
    self._check_split(split)
    return self._cardinality(split)

  def local_size(self, split: str, pi: int, pc: int) -> int:
    self._check_split(split)
    return self._cardinality(tfds.split_for_jax_process(split, process_index=pi,
                                                        process_count=pc))

  def local_dataset(self, split: str, pi: int, pc: int) -> tf.data.Dataset:
    self._check_split(split)
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


def _image_and_label_keys(name, features, supervised_keys) -> tuple[str, str]:
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


def _ensure_prepared(builder, config) -> None:
  """Prepares a tfds dataset on first use; ImageNet needs its archives by hand."""
  if builder.is_prepared():
    return
  manual_instructions = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
  data_dir = builder.data_dir
  if manual_instructions:
    manual_dir = config.get('manual_dir')
    command = (f'python -m gnet_jax.input_pipeline prepare --dataset {config.dataset} '
               f'--data_dir {config.get("data_dir") or "~/tensorflow_datasets"} '
               f'--manual_dir {manual_dir or "/path/to/archives"}')
    where = f'It is not prepared under {data_dir}.'
    required = _MANUAL_FILES.get(builder.name, ())
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
    return
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'config.dataset={config.dataset!r} is not prepared under {data_dir} and tfds '
        f'could not download and prepare it ({type(e).__name__}: {e}). Check the network '
        'and config.data_dir, or prepare it on a machine with network access and copy '
        f'{data_dir}.') from e


# What the manual directory must hold, per dataset (tfds's builder reads these).
_MANUAL_FILES = {
    'imagenet2012': ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar'),
}


class _FolderSource(_Source):
  """The user's images in root/<split>/<class>/<image>, with tfds.ImageFolder's labels."""

  def __init__(self, root: str):
    self.root = root
    self.name = FOLDER_PREFIX + root
    self.class_names, self._examples = _scan_image_folder(root)
    self.default_flip = True
    self._split_dict = tfds.core.SplitDict([
        tfds.core.SplitInfo(name=s, shard_lengths=[len(ex)], num_bytes=0)
        for s, ex in self._examples.items()])

  def _instructions(self, split, setting='train_split/eval_split'):
    try:
      return tfds.core.ReadInstruction.from_spec(split).to_absolute(self._split_dict)
    except (KeyError, ValueError, AssertionError):
      raise _split_error(setting, split, self.name, self._examples) from None

  def split_size(self, split: str) -> int:
    return sum((len(self._examples[i.splitname]) if i.to is None else i.to) - (i.from_ or 0)
               for i in self._instructions(split))

  actual_split_size = split_size

  def local_size(self, split: str, pi: int, pc: int) -> int:
    return len(self.local_arrays(split, pi, pc)['label'])

  def local_arrays(self, split: str, pi: int, pc: int) -> dict[str, np.ndarray]:
    self._instructions(split)  # Clear error for an unknown split.
    sub = tfds.split_for_jax_process(split, process_index=pi, process_count=pc)
    examples = []
    for ins in sub.to_absolute(self._split_dict):
      examples.extend(self._examples[ins.splitname][ins.from_ or 0:ins.to])
    paths = np.array([p for p, _ in examples], dtype=object)
    labels = np.array([lab for _, lab in examples], dtype=np.int64)
    return {'path': paths, 'label': labels, 'key': paths.copy()}


def _scan_image_folder(root: str) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
  """Lists root/<split>/<class>/<image>; every problem found is reported at once."""
  setting = f'config.dataset={FOLDER_PREFIX + root!r}'
  if not tf.io.gfile.isdir(root):
    raise ValueError(f'{setting}: {root} does not exist or is not a directory. Expected '
                     'root/<split>/<class>/<image>.jpg, e.g. root/train/cat/1.jpg.')
  problems: list[str] = []
  split_classes: dict[str, dict[str, list[str]]] = {}

  def entries(d):
    names = sorted(tf.io.gfile.listdir(d))
    names = [n.rstrip('/') for n in names]
    return [n for n in names if not n.startswith('.')]  # .DS_Store, .ipynb_checkpoints...

  for split in entries(root):
    split_dir = os.path.join(root, split)
    if not tf.io.gfile.isdir(split_dir):
      continue  # A README or archive next to the split folders.
    if split == '__MACOSX':
      problems.append(f'{split_dir} is macOS zip metadata, not a split: delete it.')
      continue
    classes: dict[str, list[str]] = {}
    for cls in entries(split_dir):
      cls_dir = os.path.join(split_dir, cls)
      if not tf.io.gfile.isdir(cls_dir):
        problems.append(f'{cls_dir} is a file directly in a split folder: images go in '
                        f'class folders, {split_dir}/<class>/<image>.')
        continue
      images = []
      for fname in entries(cls_dir):
        path = os.path.join(cls_dir, fname)
        if tf.io.gfile.isdir(path):
          problems.append(f'{path} is a folder inside a class folder: nested folders are '
                          'not read; move its images up into the class folder or remove it.')
        elif fname.lower().endswith(IMAGE_EXTENSIONS):
          images.append(path)
        else:
          problems.append(f'{path} is not an image file ({"/".join(IMAGE_EXTENSIONS)}): '
                          'move it out of the class folder (or convert it to PNG/JPEG).')
      if not images:
        problems.append(f'{cls_dir} is an empty class folder (no images): add images or '
                        'delete it, else its class would have no examples.')
      classes[cls] = images
    if not classes:
      problems.append(f'{split_dir} has no class folders: expected '
                      f'{split_dir}/<class>/<image>.jpg.')
    split_classes[split] = classes
  if not split_classes and not problems:
    problems.append(f'{root} has no split folders: expected root/<split>/<class>/<image>, '
                    'e.g. root/train/cat/1.jpg and root/validation/cat/2.jpg.')
  if problems:
    shown = '\n  '.join(problems[:20])
    more = f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else ''
    raise ValueError(f'{setting}: the image folder is not usable:\n  {shown}{more}')
  class_names = sorted({c for classes in split_classes.values() for c in classes})
  label_of = {c: i for i, c in enumerate(class_names)}
  examples = {}
  for split, classes in split_classes.items():
    exs = [(p, label_of[c]) for c in sorted(classes) for p in sorted(classes[c])]
    random.Random(split).shuffle(exs)  # tfds.ImageFolder's order.
    examples[split] = exs
    only_here = set(class_names) - set(classes)
    if only_here and len(split_classes) > 1:
      logger.warning('Split %s of %s has no folder for classes %s.', split, root,
                     sorted(only_here)[:10])
  return class_names, examples


def _source(config) -> _Source:
  name = config.dataset
  if not isinstance(name, str) or not name:
    raise ValueError(f'config.dataset must be a dataset name, got {name!r}.')
  if name.startswith(FOLDER_PREFIX):
    root = os.path.expanduser(name[len(FOLDER_PREFIX):])
    if not root:
      raise ValueError("config.dataset='folder:' needs a path: 'folder:/path/to/root'.")
    return _FolderSource(root)
  return _TfdsSource(config)


# ----------------------------------------------------------------------------------
# Preprocessing of one example (TF graph code).
# ----------------------------------------------------------------------------------


def _decode_rgb(raw: tf.Tensor) -> tf.Tensor:
  """Any JPEG/PNG/GIF/BMP/WebP (gray, gray+alpha, palette, RGBA, CMYK, 16-bit) -> RGB uint8."""
  image = tf.io.decode_image(raw, channels=3, dtype=tf.uint8, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _inception_crop_window(shape_hw: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """[y, x, h, w] of a random crop: area 8-100% of the image, aspect 3/4-4/3."""
  shape = tf.concat([tf.cast(shape_hw, tf.int32), [3]], axis=0)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  # If no window fits in 10 tries the op returns the whole image.
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def _centre_crop_window(shape_hw: tf.Tensor) -> tf.Tensor:
  h, w = tf.cast(shape_hw[0], tf.int32), tf.cast(shape_hw[1], tf.int32)
  side = tf.cast(tf.math.round(EVAL_CROP_FRACTION * tf.cast(tf.minimum(h, w), tf.float32)),
                 tf.int32)
  side = tf.maximum(side, 1)
  return tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])


def _decode_window(raw: tf.Tensor, window_fn) -> tf.Tensor:
  """Decodes the window `window_fn(shape_hw)` of an image; JPEGs decode only the window."""

  def jpeg():
    window = window_fn(tf.image.extract_jpeg_shape(raw)[:2])
    return tf.image.decode_and_crop_jpeg(raw, window, channels=3)

  def other():
    image = _decode_rgb(raw)
    window = window_fn(tf.shape(image)[:2])
    return tf.slice(image, [window[0], window[1], 0], [window[2], window[3], 3])

  image = tf.cond(tf.io.is_jpeg(raw), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bilinear, antialiased when shrinking; upscales small images. float32 in [0, 255]."""
  return tf.image.resize(image, [size, size], method='bilinear', antialias=True)


def _normalise(image: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
  mean = tf.constant(MEAN_RGB, tf.float32) * 255.0
  std = tf.constant(STDDEV_RGB, tf.float32) * 255.0
  return tf.cast((tf.cast(image, tf.float32) - mean) / std, dtype)


def _preprocess_fn(*, train: bool, augment: str, size: int, flip: bool, dtype: tf.DType,
                   aug_key: int):
  """Returns record -> {'image', 'label', 'pos', 'key'}; random ops seeded by 'pos'."""

  def fn(ex):
    raw = ex['raw'] if 'raw' in ex else tf.io.read_file(ex['path'])
    seed = tf.stack([tf.constant(aug_key, tf.int64), ex['pos']])
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if augment == 'inception':
      if train:
        image = _decode_window(raw, lambda hw: _inception_crop_window(hw, crop_seed))
      else:
        image = _decode_window(raw, _centre_crop_window)
      image = _resize(image, size)
    else:  # 'small'
      image = _resize(_decode_rgb(raw), size)
      if train:
        pad = max(1, round(size / 8))
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        image = tf.image.stateless_random_crop(image, [size, size, 3], seed=crop_seed)
    if train and flip:
      image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    image = tf.ensure_shape(_normalise(image, dtype), [size, size, 3])
    return {'image': image, 'label': ex['label'], 'pos': ex['pos'], 'key': ex['key']}

  return fn


def preprocess_image(raw: bytes, image_size: int, augment: str = 'inception') -> np.ndarray:
  """One encoded image -> (S, S, 3) float32, exactly as the eval pipeline makes it.

  For prediction outside a dataset; raises ValueError if the bytes are not an image.
  """
  fn = _preprocess_fn(train=False, augment=augment, size=image_size, flip=False,
                      dtype=tf.float32, aug_key=0)
  record = {'raw': tf.constant(raw), 'label': tf.constant(0, tf.int64),
            'pos': tf.constant(0, tf.int64), 'key': tf.constant('')}
  try:
    return fn(record)['image'].numpy()
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
    raise ValueError(f'not a readable image ({e.message.splitlines()[0]})') from e


# ----------------------------------------------------------------------------------
# Pipelines.
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Setup:
  source: _Source
  info: DatasetInfo
  pi: int
  pc: int
  local_batch: int
  size: int
  augment: str
  dtype: tf.DType
  skip_corrupt: bool


def _setup(config, process_index, process_count) -> _Setup:
  pi = jax.process_index() if process_index is None else int(process_index)
  pc = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= pi < pc:
    raise ValueError(f'process_index={pi} is not in [0, process_count={pc}).')
  device_count = jax.device_count() if process_count is None else (
      jax.local_device_count() * pc)
  check_batch_size(config.batch_size, pc, device_count)
  augment = config.get('augment', 'inception')
  if augment not in AUGMENTS:
    raise ValueError(f'config.augment={augment!r}: use one of {AUGMENTS} (inception for '
                     'photographs, small for digits/MNIST/CIFAR-sized images).')
  dtype_name = config.get('input_dtype', 'float32')
  if dtype_name not in INPUT_DTYPES:
    raise ValueError(f'config.input_dtype={dtype_name!r}: use one of {list(INPUT_DTYPES)}.')
  size = config.image_size
  if not isinstance(size, (int, np.integer)) or size <= 0:
    raise ValueError(f'config.image_size must be a positive integer, got {size!r}.')
  source = _source(config)
  return _Setup(source=source, info=_info_from_source(source, config), pi=pi, pc=pc,
                local_batch=config.batch_size // pc, size=int(size), augment=augment,
                dtype=INPUT_DTYPES[dtype_name],
                skip_corrupt=bool(config.get('skip_corrupt_images', False)))


def _info_from_source(source: _Source, config) -> DatasetInfo:
  if isinstance(source, _TfdsSource):
    source._check_split(config.train_split, 'train_split')  # pylint: disable=protected-access
    source._check_split(config.eval_split, 'eval_split')  # pylint: disable=protected-access
  else:
    source._instructions(config.train_split, 'train_split')  # pylint: disable=protected-access
    source._instructions(config.eval_split, 'eval_split')  # pylint: disable=protected-access
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
  return _info_from_source(_source(config), config)


def _mix(*values: int) -> int:
  """A 31-bit seed from integers (stable across runs and machines)."""
  h = np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1)[0]
  return int(h) & 0x7FFFFFFF


@contextlib.contextmanager
def _fixed_tf_global_seed():
  """tf.data's seeded shuffle mixes TF's global seed into its own: pin it meanwhile."""
  try:
    from tensorflow.python.eager import context  # pylint: disable=g-import-not-at-top
    previous = context.global_seed()
  except Exception:  # pylint: disable=broad-except
    previous = None
  tf.random.set_seed(_TF_GLOBAL_SEED)
  try:
    yield
  finally:
    tf.random.set_seed(previous)


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  options.experimental_optimization.map_parallelization = True
  return options


def _decoded_batches(records: tf.data.Dataset, s: _Setup, *, train: bool,
                     aug_key: int) -> tf.data.Dataset:
  """Windows of local_batch raw records -> decoded batches, window k -> batch k.

  Each window is decoded in parallel; images that fail to decode are dropped by
  `ignore_errors` inside their own window, and `_fill` then restores the batch
  shape, so a bad file can never shift the batches that follow it.
  """
  b, size = s.local_batch, s.size
  preprocess = _preprocess_fn(train=train, augment=s.augment, size=size,
                              flip=s.info.random_flip, dtype=s.dtype, aug_key=aug_key)
  sentinel = {'image': tf.zeros([size, size, 3], s.dtype), 'label': tf.constant(-1, tf.int64),
              'pos': tf.constant(-1, tf.int64), 'key': tf.constant('')}

  def decode_window(window):
    good = tf.data.Dataset.from_tensor_slices(window).map(
        preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    # The sentinel makes a window of only bad images still yield one element.
    got = good.concatenate(tf.data.Dataset.from_tensors(sentinel)).batch(b + 1)
    meta = tf.data.Dataset.from_tensors({'pos': window['pos'], 'key': window['key']})
    return tf.data.Dataset.zip((got, meta))

  windows = records.batch(b, drop_remainder=train)
  ds = windows.interleave(decode_window, cycle_length=WINDOWS_IN_FLIGHT, block_length=1,
                          num_parallel_calls=WINDOWS_IN_FLIGHT, deterministic=True)
  return ds.map(functools.partial(_fill, b=b, train=train))


def _fill(got, meta, *, b: int, train: bool):
  """Restores a window's batch shape after bad images were dropped from it."""
  n_good = tf.shape(got['pos'])[0] - 1  # The last element is the sentinel.
  good_pos = got['pos'][:-1]
  is_good = tf.reduce_any(tf.equal(meta['pos'][:, None], good_pos[None, :]), axis=1)
  bad = tf.where(is_good, tf.constant(''), meta['key'])
  if train:
    # Refill the slots of bad images with the good images of the same window.
    idx = tf.range(b) % tf.maximum(n_good, 1)
    return {'image': tf.gather(got['image'], idx),
            'label': tf.cast(tf.gather(got['label'], idx), tf.int32),
            '_key': tf.gather(got['key'], idx), '_bad': bad, '_n_good': n_good}
  # Eval: good rows first, then padding (the last window, bad images) masked out.
  idx = tf.minimum(tf.range(b), n_good)  # Index n_good is the sentinel: zeros.
  mask = tf.range(b) < n_good
  label = tf.where(mask, tf.gather(got['label'], idx), tf.zeros([b], tf.int64))
  return {'image': tf.gather(got['image'], idx), 'label': tf.cast(label, tf.int32),
          'mask': mask, '_key': tf.gather(got['key'], idx), '_bad': bad,
          '_n_good': n_good}


def _train_records(s: _Setup, split: str, seed: int, start_pos: int,
                   shuffle_buffer: int, cache: bool) -> tf.data.Dataset:
  """This process's infinite, seeded record stream from position `start_pos` on.

  Each record carries 'pos', a position unique over all processes, that seeds its
  augmentation.
  """
  src, pi, pc, b = s.source, s.pi, s.pc, s.local_batch
  if cache or isinstance(src, _FolderSource):
    # Indexed: every process holds the split's index (paths, or the cached raw records)
    # in one seeded order per epoch and takes rows [pi*b, (pi+1)*b) of each global
    # batch, decoding only those. The global batches are therefore the same for any
    # process count: 2 processes train exactly like 1. Positioning costs nothing.
    arrays = src.local_arrays(split, 0, 1)
    n = len(arrays['label'])
    _check_shard(n, s, split)
    tensors = {k: tf.constant(list(v) if v.dtype == object else v)
               for k, v in arrays.items()}
    order_key = tf.constant(_mix(seed, 1), tf.int64)

    def lookup(local_pos):
      pos = (local_pos // b) * (b * pc) + pi * b + local_pos % b  # global position
      epoch, i = pos // n, pos % n
      j = tf.random.experimental.index_shuffle(i, seed=tf.stack([order_key, epoch]),
                                               max_index=n - 1)
      ex = {k: tf.gather(t, j) for k, t in tensors.items()}
      ex['pos'] = pos
      return ex

    return tf.data.Dataset.range(start_pos, _INT64_MAX).map(lookup)
  # Streamed: this process's shard in its fixed on-disk order, shuffled per epoch by a
  # seeded buffer.
  order_key = _mix(seed, pi, 1)
  base = src.local_dataset(split, pi, pc)
  n = src.local_size(split, pi, pc)
  _check_shard(n, s, split)
  first_epoch, offset = divmod(start_pos, n)
  buffer = max(1, min(int(shuffle_buffer), n))

  def epoch_records(epoch):
    epoch_seed = tf.random.stateless_uniform(
        [], seed=tf.stack([tf.constant(order_key, tf.int64), epoch]), minval=0,
        maxval=2**31 - 1, dtype=tf.int64)
    ds = base.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)
    # Positioning: skip the raw records before the start, before decoding them.
    return ds.skip(tf.where(epoch == first_epoch, tf.constant(offset, tf.int64), 0))

  with _fixed_tf_global_seed():
    ds = tf.data.Dataset.range(first_epoch, _INT64_MAX).flat_map(epoch_records)
  return ds.enumerate(start_pos).map(lambda pos, ex: {**ex, 'pos': pos * pc + pi})


def _check_shard(n: int, s: _Setup, split: str) -> None:
  if n <= 0:
    raise ValueError(f'Process {s.pi} of {s.pc} got no examples of {s.info.name} split '
                     f'{split!r}: the split has fewer examples than there are processes.')


class _Batches:
  """Turns the tf.data batches into numpy dicts; reports bad images and labels."""

  def __init__(self, ds: tf.data.Dataset, s: _Setup, *, train: bool, split: str,
               num_batches: int | None = None):
    self._it = iter(ds.as_numpy_iterator())
    self._s, self._train, self._split = s, train, split
    self._num_batches = num_batches
    self._seen = self._bad = 0

  def __iter__(self):
    return self

  def __len__(self):
    if self._num_batches is None:
      raise TypeError('the train iterator is infinite')
    return self._num_batches

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      batch = next(self._it)
    except StopIteration:
      if not self._train and self._bad:
        logger.warning('Eval on %s %s skipped %d unreadable images of %d.', self._s.info.name,
                       self._split, self._bad, self._seen)
      raise
    bad = [k.decode('utf-8', 'replace') for k in batch.pop('_bad') if k]
    keys = batch.pop('_key')
    n_good = int(batch.pop('_n_good'))
    self._seen += n_good + len(bad)
    if bad:
      self._report_bad(bad, n_good)
    labels = batch['label'] if self._train else batch['label'][batch['mask']]
    if labels.size and (labels.min() < 0 or labels.max() >= self._s.info.num_classes):
      rows = np.flatnonzero((batch['label'] < 0) |
                            (batch['label'] >= self._s.info.num_classes))
      if not self._train:
        rows = [r for r in rows if batch['mask'][r]]
      r = rows[0]
      raise ValueError(
          f'Example {keys[r].decode("utf-8", "replace")} of {self._s.info.name} split '
          f'{self._split!r} has label {int(batch["label"][r])}, outside [0, '
          f'{self._s.info.num_classes}). The split may have no labels (ImageNet\'s '
          '"test" has none: use "validation"), or the data are broken.')
    return batch

  def _report_bad(self, bad: list[str], n_good: int) -> None:
    detail = _why_undecodable(bad[0])
    name, split = self._s.info.name, self._split
    if not self._s.skip_corrupt:
      raise ValueError(
          f'Cannot decode image {bad[0]}{detail} ({name}, split {split!r}'
          f'{f", and {len(bad) - 1} more in the same batch" if len(bad) > 1 else ""}): it '
          'is truncated, corrupt or not an image. Replace or delete it, or set '
          'config.skip_corrupt_images=True to skip a few such files (they are counted '
          'in the log).')
    if self._train and n_good == 0:
      raise ValueError(f'Every image of a batch of {name} split {split!r} is unreadable '
                       f'(e.g. {bad[0]}{detail}): the data are broken, not a few files.')
    self._bad += len(bad)
    for key in bad:
      logger.warning('Skipping unreadable image %s (%s split %s)%s.', key, name, split,
                     _why_undecodable(key) if key != bad[0] else detail)
    logger.warning('%d unreadable images skipped so far in %s split %s (%d read).',
                   self._bad, name, split, self._seen)
    if self._bad > max(MAX_CORRUPT_ALWAYS_ALLOWED, MAX_CORRUPT_FRACTION * self._seen):
      raise ValueError(
          f'{self._bad} of the {self._seen} images read so far from {name} split {split!r} '
          f'are unreadable (more than {MAX_CORRUPT_FRACTION:.0%}): the data are broken, '
          'not a few bad files; config.skip_corrupt_images is meant for the latter.')


def _why_undecodable(key: str) -> str:
  """For a file, TF's own decode error (to tell 'truncated' from 'not an image')."""
  if not os.path.isfile(key):
    return ''
  try:
    _decode_rgb(tf.io.read_file(key))
  except tf.errors.OpError as e:
    return f' [{e.message.strip().splitlines()[-1][:200]}]'
  except Exception as e:  # pylint: disable=broad-except
    return f' [{type(e).__name__}: {e}]'
  return ' [TF decodes this file on its own: the preprocessing failed on it]'


def create_train_iterator(config, *, start_step: int = 0, process_index: int | None = None,
                          process_count: int | None = None) -> Iterator[dict]:
  """Infinite iterator of this process's train batches, starting at batch `start_step`.

  Yields {'image': (local_batch, S, S, 3) config.input_dtype, 'label': (local_batch,)
  int32}. Batch k (k >= start_step) is exactly the k-th batch (from 0) of an
  iterator created with start_step=0 (see the module docstring for how).
  """
  s = _setup(config, process_index, process_count)
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  split = config.train_split
  seed = int(config.get('seed', 0))
  records = _train_records(s, split, seed, start_step * s.local_batch,
                           config.get('shuffle_buffer', 16_384),
                           bool(config.get('cache', False)))
  ds = _decoded_batches(records, s, train=True, aug_key=_mix(seed, 2))
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
  return _Batches(ds, s, train=True, split=split)


def create_eval_iterator(config, *, process_index: int | None = None,
                         process_count: int | None = None) -> Iterator[dict]:
  """One pass over this process's shard of the eval split, padded and masked.

  Yields {'image', 'label', 'mask'}; every process yields the same number of
  batches, and over all processes the rows with mask True are each eval example
  exactly once. `len()` of the iterator is that number of batches.
  """
  s = _setup(config, process_index, process_count)
  split = config.eval_split
  src = s.source
  local = src.local_size(split, s.pi, s.pc)
  total = src.actual_split_size(split)
  largest_shard = max(-(-total // s.pc), local)  # tfds's even split: first shards +1.
  num_batches = max(1, -(-largest_shard // s.local_batch))
  records = src.local_dataset(split, s.pi, s.pc)
  records = records.enumerate().map(lambda pos, ex: {**ex, 'pos': pos})
  ds = _decoded_batches(records, s, train=False, aug_key=0)
  own_batches = -(-local // s.local_batch)
  if num_batches > own_batches:  # Same number of batches on every process.
    b, size = s.local_batch, s.size
    padding = {'image': tf.zeros([b, size, size, 3], s.dtype), 'label': tf.zeros([b], tf.int32),
               'mask': tf.zeros([b], tf.bool), '_key': tf.fill([b], ''),
               '_bad': tf.zeros([0], tf.string), '_n_good': tf.constant(0, tf.int32)}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(
        num_batches - own_batches))
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
  return _Batches(ds, s, train=False, split=split, num_batches=num_batches)


# ----------------------------------------------------------------------------------
# Command line: prepare a dataset ahead of time, or show what a config reads.
# ----------------------------------------------------------------------------------


def _main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m gnet_jax.input_pipeline',
      description='Prepare a dataset (tfds files under --data_dir) and print its info.')
  parser.add_argument('command', choices=['prepare', 'info'])
  parser.add_argument('--dataset', required=True,
                      help="tfds name, 'digits' or 'folder:/path/to/root'")
  parser.add_argument('--data_dir', default=None, help='tfds data directory')
  parser.add_argument('--manual_dir', default=None,
                      help='directory holding the archives downloaded by hand (ImageNet)')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(
      dataset=args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir))
  try:
    source = _source(config)  # Prepares a tfds dataset (or says what is missing).
  except ValueError as e:
    sys.exit(f'error: {e}')
  if isinstance(source, _TfdsSource):
    splits = {str(k): v.num_examples for k, v in source.builder.info.splits.items()}
  else:
    splits = {k: source.split_size(k) for k in source._examples}  # pylint: disable=protected-access
  print(f'{source.name}: {len(source.class_names)} classes, splits {splits}')


if __name__ == '__main__':
  _main(sys.argv[1:])
