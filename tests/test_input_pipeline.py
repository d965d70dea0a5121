"""Input pipeline on the built-in digits dataset (real tfds files, no network).

Shapes, dtypes and value ranges; determinism, seeds and positioning at any step;
per-process shards; eval exactly once; batch-size and config errors. The image
folder and bad files are in test_data_folder.py, the mocked registered tfds
datasets (ImageNet, CIFAR, MNIST, Imagenette) in test_data_tfds.py.
"""
import collections
import hashlib
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from gnet_jax import data
from gnet_jax import images as images_lib
from gnet_jax.data import digits
from helpers import data_config

LOW = min((0 - m) / s for m, s in zip(images_lib.MEAN_RGB, images_lib.STDDEV_RGB))
HIGH = max((1 - m) / s for m, s in zip(images_lib.MEAN_RGB, images_lib.STDDEV_RGB))


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory):
  data_dir = tmp_path_factory.getbasetemp() / 'digits_tfds'
  digits.builder(str(data_dir))  # Writes the tfds files once per test session.
  return str(data_dir)


def make_config(data_dir, dataset='digits', **overrides):
  return data_config(dataset, **{'data_dir': data_dir, 'eval_split': 'test', 'image_size': 32,
                                 'augment': 'small', 'batch_size': 32, 'shuffle_buffer': 256,
                                 **overrides})


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --- the built-in dataset --------------------------------------------------------


def test_digits_builder_writes_documented_split(digits_dir):
  builder = digits.builder(digits_dir)
  assert builder.is_prepared()
  assert builder.data_dir.startswith(digits_dir)
  assert builder.info.splits['train'].num_examples == 1433
  assert builder.info.splits['test'].num_examples == 364
  from sklearn.datasets import load_digits
  sk = load_digits()
  test = list(builder.as_dataset(split='test').as_numpy_iterator())
  indices = sorted(int(ex['index']) for ex in test)
  # As documented: every fifth image of each class, in load_digits() order.
  expected = sorted(i for c in range(10) for i in np.flatnonzero(sk.target == c)[::5])
  assert indices == expected
  for ex in test[:20]:
    i = int(ex['index'])
    assert ex['label'] == sk.target[i]
    np.testing.assert_array_equal(ex['image'][..., 0],
                                  np.round(sk.images[i] * 255 / 16).astype(np.uint8))
  train_indices = {int(ex['index']) for ex in builder.as_dataset(split='train')
                   .as_numpy_iterator()}
  assert train_indices == set(range(1797)) - set(expected)


def test_dataset_info(digits_dir):
  info = data.get_dataset_info(make_config(digits_dir))
  assert info.num_classes == 10
  assert info.class_names == [str(d) for d in range(10)]
  assert (info.num_train_examples, info.num_eval_examples) == (1433, 364)
  assert info.random_flip is False  # Mirrored digits are not digits.


# --- batches ---------------------------------------------------------------------


@pytest.mark.parametrize('augment', ['small', 'inception'])
def test_train_batch_shapes_dtypes_ranges(digits_dir, augment):
  config = make_config(digits_dir, augment=augment)
  batches = take(data.create_train_iterator(config, process_index=0, process_count=1), 3)
  for batch in batches:
    assert set(batch) == {'image', 'label'}
    assert batch['image'].shape == (32, 32, 32, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (32,) and batch['label'].dtype == np.int32
    assert batch['label'].min() >= 0 and batch['label'].max() < 10
    assert np.isfinite(batch['image']).all()
    assert batch['image'].min() >= LOW - 1e-4 and batch['image'].max() <= HIGH + 1e-4
  # Digits are white on black: both ends of the range occur.
  images = np.concatenate([b['image'] for b in batches])
  assert images.min() < LOW + 0.1 and images.max() > HIGH - 0.5
  # Gray input becomes RGB: the three channels carry the same pixel.
  pixels = images * np.array(images_lib.STDDEV_RGB) + np.array(images_lib.MEAN_RGB)
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-4)


def test_bfloat16_output(digits_dir):
  config = make_config(digits_dir, input_dtype='bfloat16')
  batch = next(data.create_train_iterator(config, process_index=0, process_count=1))
  assert batch['image'].dtype == jnp.bfloat16
  assert batch['label'].dtype == np.int32
  evaluation = next(data.create_eval_iterator(config, process_index=0, process_count=1))
  assert evaluation['image'].dtype == jnp.bfloat16


def test_uint8_output_is_the_float_output_rounded(digits_dir):
  """config.input_dtype='uint8': the same preprocessing, its pixels rounded, normalised
  later on the device."""
  for train in (True, False):
    create = data.create_train_iterator if train else data.create_eval_iterator
    pixels, floats = (next(iter(create(make_config(digits_dir, input_dtype=dtype),
                                       process_index=0, process_count=1)))
                      for dtype in ('uint8', 'float32'))
    assert pixels['image'].dtype == np.uint8 and pixels['image'].shape == (32, 32, 32, 3)
    np.testing.assert_array_equal(pixels['label'], floats['label'])
    np.testing.assert_allclose(images_lib.normalize(pixels['image']), floats['image'],
                               atol=0.5 / 255 / min(images_lib.STDDEV_RGB) + 1e-5)


def test_eval_batch_shapes_and_values(digits_dir):
  config = make_config(digits_dir, batch_size=100)
  batches = list(data.create_eval_iterator(config, process_index=0, process_count=1))
  assert len(batches) == 4  # 364 examples: 3 full batches and one of 64 + 36 padding.
  for batch in batches:
    assert set(batch) == {'image', 'label', 'mask'}
    assert batch['image'].shape == (100, 32, 32, 3) and batch['mask'].dtype == bool
  assert batches[-1]['mask'].sum() == 64 and not batches[-1]['mask'][64:].any()
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  from sklearn.datasets import load_digits
  np.testing.assert_array_equal(np.bincount(labels, minlength=10),
                                [len(np.flatnonzero(load_digits().target == c)[::5])
                                 for c in range(10)])


# --- determinism and positioning -------------------------------------------------


@pytest.mark.parametrize('cache', [False, True], ids=['streamed', 'indexed'])
def test_same_seed_same_batches_and_positioning(digits_dir, cache):
  # 1433 examples, batch 32: epoch 0 ends inside batch 44; check 43-46 around it.
  config = make_config(digits_dir, cache=cache)
  reference = take(data.create_train_iterator(config, process_index=0, process_count=1), 47)
  again = take(data.create_train_iterator(config, process_index=0, process_count=1), 47)
  assert_same_batches(reference, again)
  for start in (1, 43, 45):
    resumed = take(data.create_train_iterator(config, start_step=start, process_index=0,
                                            process_count=1), 2)
    assert_same_batches(resumed, reference[start:start + 2])
  # Epoch 1 is another order: the second epoch's first batch is a new one.
  assert not np.array_equal(reference[45]['label'], reference[0]['label'])


def test_positioning_in_a_later_epoch_and_other_process(digits_dir):
  config = make_config(digits_dir, batch_size=64, cache=True)
  kwargs = dict(process_index=1, process_count=2)  # 718 examples, 32 a batch.
  reference = take(data.create_train_iterator(config, **kwargs), 70)  # Three epochs.
  resumed = take(data.create_train_iterator(config, start_step=67, **kwargs), 3)
  assert_same_batches(resumed, reference[67:70])


def test_other_seed_other_batches(digits_dir):
  a = next(data.create_train_iterator(make_config(digits_dir, seed=0), process_count=1,
                                    process_index=0))
  b = next(data.create_train_iterator(make_config(digits_dir, seed=1), process_count=1,
                                    process_index=0))
  assert not np.array_equal(a['label'], b['label'])


_HASH_BATCHES = '''
import hashlib, sys
from configs import default
from gnet_jax import data
config = default.get_config()
config.update(dict(dataset='digits', data_dir=sys.argv[1], eval_split='test', image_size=32,
                   augment='inception', batch_size=32, shuffle_buffer=300, seed=7))
it = data.create_train_iterator(config, start_step=40, process_index=1, process_count=2)
h = hashlib.sha1()
for _ in range(3):
  batch = next(it)
  h.update(batch['image'].tobytes())
  h.update(batch['label'].tobytes())
print(h.hexdigest())
'''


@pytest.mark.slow
def test_same_batches_in_another_run(digits_dir):
  config = make_config(digits_dir, augment='inception', shuffle_buffer=300, seed=7)
  it = data.create_train_iterator(config, start_step=40, process_index=1, process_count=2)
  h = hashlib.sha1()
  for _ in range(3):
    batch = next(it)
    h.update(batch['image'].tobytes())
    h.update(batch['label'].tobytes())
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, '-c', _HASH_BATCHES, digits_dir], cwd=root,
                       capture_output=True, text=True, check=True, timeout=300,
                       env={**os.environ, 'PYTHONPATH': root})
  assert out.stdout.split()[-1] == h.hexdigest()


def test_random_flip_setting(digits_dir):
  default = make_config(digits_dir)
  forced = make_config(digits_dir, random_flip=True)
  assert data.get_dataset_info(forced).random_flip is True
  a = next(data.create_train_iterator(default, process_index=0, process_count=1))
  b = next(data.create_train_iterator(forced, process_index=0, process_count=1))
  np.testing.assert_array_equal(a['label'], b['label'])  # Same examples, same crops,
  flipped = [not np.array_equal(x, y) for x, y in zip(a['image'], b['image'])]
  assert 0 < sum(flipped) < len(flipped)  # about half of them mirrored.
  for x, y, f in zip(a['image'], b['image'], flipped):
    if f:
      np.testing.assert_array_equal(x[:, ::-1], y)


def test_tf_global_seed_does_not_matter(digits_dir):
  config = make_config(digits_dir)
  a = take(data.create_train_iterator(config, process_index=0, process_count=1), 2)
  tf.random.set_seed(42)
  try:
    b = take(data.create_train_iterator(config, process_index=0, process_count=1), 2)
  finally:
    tf.random.set_seed(None)
  assert_same_batches(a, b)


# --- sharding --------------------------------------------------------------------


def _keys(source, split, pi, pc):
  return [k for k in source.records(split, pi, pc).map(lambda ex: ex['key'])
          .as_numpy_iterator()]


def test_process_shards_are_disjoint_and_cover_the_split(digits_dir):
  source = data.build_source(make_config(digits_dir))
  for split, total in (('train', 1433), ('test', 364)):
    shards = [_keys(source, split, pi, 3) for pi in range(3)]
    assert sorted(map(len, shards), reverse=True) == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    union = [k for shard in shards for k in shard]
    assert len(union) == len(set(union)) == total
    assert set(union) == set(_keys(source, split, 0, 1))


def _image_hashes(batches):
  out = collections.Counter()
  for batch in batches:
    for image, label, keep in zip(batch['image'], batch['label'], batch['mask']):
      if keep:
        out[(hashlib.sha1(image.tobytes()).hexdigest(), int(label))] += 1
  return out


def test_eval_exactly_once_over_processes(digits_dir):
  # 364 examples over 9 processes: shards of 41 and 40, local batch 4 -> 11 batches.
  config = make_config(digits_dir, batch_size=36)
  single = list(data.create_eval_iterator(make_config(digits_dir, batch_size=40),
                                        process_index=0, process_count=1))
  assert sum(b['mask'].sum() for b in single) == 364
  per_process = []
  for pi in range(9):
    iterator = data.create_eval_iterator(config, process_index=pi, process_count=9)
    batches = list(iterator)
    assert len(batches) == len(iterator) == 11  # The same on every process.
    assert all(b['image'].shape[0] == 4 for b in batches)
    per_process.append(batches)
  counts = [sum(int(b['mask'].sum()) for b in batches) for batches in per_process]
  assert counts == [41] * 4 + [40] * 5
  merged = collections.Counter()
  for batches in per_process:
    merged += _image_hashes(batches)
  assert merged == _image_hashes(single)


def test_train_local_batch_is_global_over_processes(digits_dir):
  config = make_config(digits_dir, batch_size=48)
  batch = next(data.create_train_iterator(config, process_index=2, process_count=3))
  assert batch['image'].shape[0] == 16 and batch['label'].shape == (16,)
  other = next(data.create_train_iterator(config, process_index=1, process_count=3))
  assert not np.array_equal(batch['image'], other['image'])


# --- errors ------------------------------------------------------------------------


def test_indivisible_batch_fails_at_start_up(digits_dir):
  with pytest.raises(ValueError, match=r'config.batch_size=10 .* 3 processes'):
    data.create_train_iterator(make_config(digits_dir, batch_size=10), process_index=0,
                             process_count=3)
  with pytest.raises(ValueError, match=r'config.batch_size=10 .* 3 processes'):
    data.create_eval_iterator(make_config(digits_dir, batch_size=10), process_index=0,
                            process_count=3)


def test_unknown_split_names_setting(digits_dir):
  with pytest.raises(ValueError, match=r"config.eval_split='validation'.*\['test', 'train'\]"):
    data.get_dataset_info(make_config(digits_dir, eval_split='validation'))


@pytest.mark.parametrize('field,value', [('augment', 'fancy'), ('input_dtype', 'float16'),
                                         ('image_size', 0)])
def test_bad_config_values(digits_dir, field, value):
  with pytest.raises(ValueError, match=f'config.{field}'):
    data.create_train_iterator(make_config(digits_dir, **{field: value}), process_index=0,
                             process_count=1)


def test_unknown_dataset_name(tmp_path):
  with pytest.raises(ValueError, match=r"config.dataset='imagenet2021' is not a tfds dataset"):
    data.get_dataset_info(make_config(str(tmp_path), dataset='imagenet2021'))
