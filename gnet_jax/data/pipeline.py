"""Train and eval pipelines: a source's records -> positioned, decoded, batched numpy.

Output
  Train batches {'image': (local_batch, S, S, 3) `config.input_dtype`, 'label':
  (local_batch,) int32}; eval batches add 'mask' (bool, False on padding).
  local_batch = config.batch_size // process_count.

Determinism and positioning
  Every random choice is a pure function of (config.seed, epoch or example position):
  per-example augmentation uses stateless TF ops seeded with (seed, position of the
  example, unique over processes), and the order of each epoch is seeded with (seed,
  epoch). Parallelism, prefetching and timing therefore cannot change a batch, and the
  stream can be entered at any point: train batch k holds stream positions
  [k * local_batch, (k+1) * local_batch), position p is example (p mod n) of epoch
  (p div n) (n = this process's shard). `create_train_iterator(start_step=s)` starts at
  the epoch and offset of step s:
    * indexed sources (folders; any dataset with `config.cache=True`, whose raw records
      are then held in memory): the epoch order is a full permutation of the whole split
      computed index by index (`tf.random.experimental.index_shuffle`), so entering at
      any step costs nothing. Every process holds the index and takes rows
      [p * local_batch, (p+1) * local_batch) of each global batch, decoding only those:
      the global batches are the same for any process count;
    * streamed tfds sources (`config.cache=False`): each process reads its own shard in
      its fixed on-disk order, shuffled by a buffer of `config.shuffle_buffer` records
      seeded with (seed, process, epoch); entering at step s skips the raw records of the
      current epoch BEFORE they are decoded.
  Same seed, batch size (and, for streamed sources, process count) and TF/tfds versions
  => same batches, across runs and after a resume.

Sharding
  Each process decodes only its own examples: its shard of a streamed source
  (`tfds.split_for_jax_process`), its rows of each global batch of an indexed one. Eval:
  every process yields the same number of batches (padded, masked), and over all
  processes the unmasked rows are each eval example exactly once; nothing is dropped.

Bad input
  Batch sizes that do not divide, unknown settings: ValueError at start-up. An image that
  cannot be decoded (truncated, corrupt, not an image) stops the pipeline with its file
  name, or, with `config.skip_corrupt_images=True`, is skipped and counted in the log
  (train: its slot is refilled with another image of the same batch, so batch k stays
  batch k; eval: it is masked). A label outside [0, num_classes) stops the pipeline
  naming the example.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf

from gnet_jax.data.preprocess import AUGMENTS, INPUT_DTYPES, preprocess_fns, why_undecodable
from gnet_jax.data.source import DatasetInfo, Source, build_source, dataset_info

logger = logging.getLogger(__name__)

# Skipping is for a few bad files among many; above this the data are broken.
MAX_CORRUPT_FRACTION = 0.01
MAX_CORRUPT_ALWAYS_ALLOWED = 10
# Batches decoded at the same time (each in parallel over its images), so that the
# end of one batch's decoding overlaps with the start of the next.
WINDOWS_IN_FLIGHT = 2
_TF_GLOBAL_SEED = 1_234_567  # See _fixed_tf_global_seed.
_INT64_MAX = np.iinfo(np.int64).max


@dataclasses.dataclass(frozen=True)
class _Setup:
  source: Source
  info: DatasetInfo
  pi: int
  pc: int
  local_batch: int
  size: int
  augment: str
  dtype: tf.DType
  skip_corrupt: bool


def _setup(config, source, process_index, process_count) -> _Setup:
  pi = jax.process_index() if process_index is None else int(process_index)
  pc = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= pi < pc:
    raise ValueError(f'process_index={pi} is not in [0, process_count={pc}).')
  batch = config.batch_size
  if not isinstance(batch, (int, np.integer)) or batch <= 0 or batch % pc:
    raise ValueError(f'config.batch_size={batch!r} is the global batch, and each of the {pc} '
                     'processes reads its rows of every batch: use a positive multiple of '
                     f'{pc} (and of the device count: gnet_jax.train.mesh.check_batch_size).')
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
  source = build_source(config) if source is None else source
  return _Setup(source=source, info=dataset_info(source, config), pi=pi, pc=pc,
                local_batch=config.batch_size // pc, size=int(size), augment=augment,
                dtype=INPUT_DTYPES[dtype_name],
                skip_corrupt=bool(config.get('skip_corrupt_images', False)))


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

  Each window is decoded in parallel by the first of `preprocess_fns`; the records it
  fails on are tried, again in parallel, by the next (the fast path's few leftovers go
  to the general one). Images that none can decode are dropped by `ignore_errors` inside
  their own window, and `_fill` then restores the batch shape, so a bad file can never
  shift the batches that follow it. A window is a dataset of its records (`window`), not
  a batch of them, so that encoded images are never copied into one tensor.
  """
  b, size = s.local_batch, s.size
  attempts = preprocess_fns(train=train, augment=s.augment, size=size,
                            flip=s.info.random_flip, dtype=s.dtype, aug_key=aug_key)
  sentinel = tf.data.Dataset.from_tensors(
      {'image': tf.zeros([size, size, 3], s.dtype), 'label': tf.constant(-1, tf.int64),
       'pos': tf.constant(-1, tf.int64), 'key': tf.constant('')})

  def decoded(rows: tf.data.Dataset, fn) -> tf.data.Dataset:
    """One element: the rows `fn` decodes, in order, then the sentinel (so that a window
    of only bad images still yields an element)."""
    good = rows.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return good.ignore_errors().concatenate(sentinel).batch(b + 1)

  def decode_window(window):
    rows = tf.data.Dataset.zip(window)
    got = decoded(rows, attempts[0])
    for fn in attempts[1:]:
      got = got.map(functools.partial(_retry, rows=rows, decoded=decoded, fn=fn))
    meta = tf.data.Dataset.zip({'pos': window['pos'], 'key': window['key']}).batch(b)
    return tf.data.Dataset.zip((got, meta))

  windows = records.window(b, drop_remainder=train)
  ds = windows.interleave(decode_window, cycle_length=WINDOWS_IN_FLIGHT, block_length=1,
                          num_parallel_calls=WINDOWS_IN_FLIGHT, deterministic=True)
  return ds.map(functools.partial(_fill, b=b, train=train))


def _retry(got, *, rows, decoded, fn):
  """`got` (decoded rows + sentinel) with the window's `rows` it lacks decoded by `fn`,
  all rows in the window's order; `got` itself, uncopied, when it lacks none."""
  done = got['pos'][:-1]
  missing = lambda ex: tf.logical_not(tf.reduce_any(tf.equal(ex['pos'], done)))

  def more():
    extra = decoded(rows.filter(missing), fn).get_single_element()
    merged = {k: tf.concat([got[k][:-1], extra[k][:-1]], 0) for k in got}
    order = tf.argsort(merged['pos'])  # positions grow along a window
    return {k: tf.concat([tf.gather(merged[k], order), extra[k][-1:]], 0) for k in got}

  return tf.cond(tf.cast(tf.shape(done)[0], tf.int64) < rows.cardinality(), more,
                 lambda: got)


def _fill(got, meta, *, b: int, train: bool):
  """Restores a window's batch shape after bad images were dropped from it."""
  n_good = tf.shape(got['pos'])[0] - 1  # The last element is the sentinel.
  good_pos = got['pos'][:-1]
  is_good = tf.reduce_any(tf.equal(meta['pos'][:, None], good_pos[None, :]), axis=1)
  bad = tf.where(is_good, tf.constant(''), meta['key'])
  if train:
    # Refill the slots of bad images with the good images of the same window.
    idx = tf.range(b) % tf.maximum(n_good, 1)
  else:
    # Eval: good rows first, then padding (the last window, bad images) masked out; index
    # n_good is the sentinel, zeros.
    idx = tf.minimum(tf.range(b), n_good)
  # A window without bad images (nearly every one) keeps its rows as they are, uncopied.
  image = tf.cond(n_good == b, lambda: got['image'][:b],
                  lambda: tf.gather(got['image'], idx))
  batch = {'image': image, '_key': tf.gather(got['key'], idx), '_bad': bad,
           '_n_good': n_good}
  if train:
    return {**batch, 'label': tf.cast(tf.gather(got['label'], idx), tf.int32)}
  mask = tf.range(b) < n_good
  label = tf.where(mask, tf.gather(got['label'], idx), tf.zeros([b], tf.int64))
  return {**batch, 'label': tf.cast(label, tf.int32), 'mask': mask}


def _train_records(s: _Setup, split: str, seed: int, start_pos: int,
                   shuffle_buffer: int, cache: bool) -> tf.data.Dataset:
  """This process's infinite, seeded record stream from position `start_pos` on.

  Each record carries 'pos', a position unique over all processes, that seeds its
  augmentation.
  """
  src, pi, pc, b = s.source, s.pi, s.pc, s.local_batch
  if cache or src.in_memory:
    # Indexed: every process holds the split's index (paths, or the cached raw records)
    # in one seeded order per epoch and takes rows [pi*b, (pi+1)*b) of each global
    # batch, decoding only those. The global batches are therefore the same for any
    # process count: 2 processes train exactly like 1. Positioning costs nothing.
    arrays = src.arrays(split)
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
  base = src.records(split, pi, pc)
  n = src.num_records(split, pi, pc)
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


class Batches:
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
    detail = why_undecodable(bad[0])
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
                     why_undecodable(key) if key != bad[0] else detail)
    logger.warning('%d unreadable images skipped so far in %s split %s (%d read).',
                   self._bad, name, split, self._seen)
    if self._bad > max(MAX_CORRUPT_ALWAYS_ALLOWED, MAX_CORRUPT_FRACTION * self._seen):
      raise ValueError(
          f'{self._bad} of the {self._seen} images read so far from {name} split {split!r} '
          f'are unreadable (more than {MAX_CORRUPT_FRACTION:.0%}): the data are broken, '
          'not a few bad files; config.skip_corrupt_images is meant for the latter.')


def create_train_iterator(config, *, source: Source | None = None, start_step: int = 0,
                          process_index: int | None = None,
                          process_count: int | None = None) -> Iterator[dict]:
  """Infinite iterator of this process's train batches, starting at batch `start_step`.

  Yields {'image': (local_batch, S, S, 3) config.input_dtype, 'label': (local_batch,)
  int32}. Batch k (k >= start_step) is exactly the k-th batch (from 0) of an
  iterator created with start_step=0 (see the module docstring for how). `source`
  (default: built from the config) is the run's `build_source(config)`.
  """
  s = _setup(config, source, process_index, process_count)
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  split = config.train_split
  seed = int(config.get('seed', 0))
  records = _train_records(s, split, seed, start_step * s.local_batch,
                           config.get('shuffle_buffer', 16_384),
                           bool(config.get('cache', False)))
  ds = _decoded_batches(records, s, train=True, aug_key=_mix(seed, 2))
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
  return Batches(ds, s, train=True, split=split)


def create_eval_iterator(config, *, source: Source | None = None,
                         process_index: int | None = None,
                         process_count: int | None = None) -> Iterator[dict]:
  """One pass over this process's shard of the eval split, padded and masked.

  Yields {'image', 'label', 'mask'}; every process yields the same number of
  batches, and over all processes the rows with mask True are each eval example
  exactly once. `len()` of the iterator is that number of batches.
  """
  s = _setup(config, source, process_index, process_count)
  split = config.eval_split
  src = s.source
  local = src.num_records(split, s.pi, s.pc)
  total = src.num_records(split)
  largest_shard = max(-(-total // s.pc), local)  # tfds's even split: first shards +1.
  num_batches = max(1, -(-largest_shard // s.local_batch))
  records = src.records(split, s.pi, s.pc)
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
  return Batches(ds, s, train=False, split=split, num_batches=num_batches)


