"""Registered tfds datasets through `tfds.testing.mock_data` (nothing is downloaded).

The metadata mock_data needs (split sizes, features, label names) ship in
tests/data/tfds_metadata (written by tests/data/make_tfds_metadata.py). Also the
errors that need no data: ImageNet's manual directory, unknown or unsuitable
datasets.
"""
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from gnet_jax import data
from helpers import data_config

METADATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'tfds_metadata')
NUM_MOCK = 10


@pytest.fixture
def mocked():
  with tfds.testing.mock_data(num_examples=NUM_MOCK, data_dir=METADATA,
                              policy=tfds.testing.MockPolicy.AUTO):
    yield


def make_config(dataset, **overrides):
  return data_config(dataset, **{'image_size': 32, 'batch_size': 4, 'shuffle_buffer': 8,
                                 **overrides})


@pytest.mark.parametrize('dataset,eval_split,num_classes,num_train,augment,flip', [
    ('imagenet2012', 'validation', 1000, 1_281_167, 'inception', True),
    ('imagenette/160px-v2', 'validation', 10, 9_469, 'inception', True),
    ('cifar10', 'test', 10, 50_000, 'small', True),
    ('cifar100', 'test', 100, 50_000, 'small', True),
    ('mnist', 'test', 10, 60_000, 'small', False),
    ('fashion_mnist', 'test', 10, 60_000, 'small', True),
])
def test_registered_dataset(mocked, dataset, eval_split, num_classes, num_train, augment,
                            flip):
  config = make_config(dataset, eval_split=eval_split, augment=augment)
  info = data.get_dataset_info(config)
  builder = tfds.builder(dataset)
  assert info.num_classes == num_classes == builder.info.features['label'].num_classes
  assert info.class_names == builder.info.features['label'].names
  assert info.num_train_examples == num_train
  assert info.num_eval_examples == builder.info.splits[eval_split].num_examples
  assert info.random_flip is flip
  train = data.create_train_iterator(config, process_index=0, process_count=1)
  for _ in range(4):  # More than an epoch of the 10 mocked examples.
    batch = next(train)
    assert batch['image'].shape == (4, 32, 32, 3) and batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32
    assert 0 <= batch['label'].min() and batch['label'].max() < num_classes
    assert np.isfinite(batch['image']).all()
  evaluation = data.create_eval_iterator(config, process_index=0, process_count=1)
  batches = list(evaluation)
  assert len(batches) == len(evaluation) == 3  # 10 examples, batches of 4.
  assert sum(int(b['mask'].sum()) for b in batches) == NUM_MOCK


def test_streamed_positioning_and_determinism(mocked):
  config = make_config('cifar10', augment='small', eval_split='test')
  reference = [next(it) for it in [data.create_train_iterator(
      config, process_index=0, process_count=1)] * 8]
  for start in (2, 5):  # 10 examples, batch 4: epochs end mid-batch.
    it = data.create_train_iterator(config, start_step=start, process_index=0, process_count=1)
    for k in range(start, start + 3):
      batch = next(it)
      np.testing.assert_array_equal(batch['image'], reference[k]['image'])
      np.testing.assert_array_equal(batch['label'], reference[k]['label'])


def _examples_with_labels(labels):
  """A mock `_as_dataset` for cifar10 whose records carry the given labels."""

  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    del self, decoders, read_config, shuffle_files
    n = len(labels)
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(labels, tf.int64))
    return ds.enumerate().map(lambda i, label: {
        'id': tf.strings.as_string(i),
        'tfds_id': tf.strings.join([f'cifar10-{split}.tfrecord-00000-of-00001__',
                                    tf.strings.as_string(i)]),
        'image': tf.io.encode_png(tf.fill([32, 32, 3], tf.cast(i * 20, tf.uint8))),
        'label': label}).apply(tf.data.experimental.assert_cardinality(n))

  return as_dataset


def test_label_outside_range_is_an_error():
  labels = [1, 2, 3, 12, 4, 5, 6, 7]
  with tfds.testing.mock_data(as_dataset_fn=_examples_with_labels(labels), data_dir=METADATA):
    config = make_config('cifar10', augment='small', eval_split='test', batch_size=8)
    with pytest.raises(ValueError, match=r"Example cifar10:cifar10-.*__3 of cifar10 split "
                                         r"'train' has label 12, outside \[0, 10\)"):
      next(data.create_train_iterator(config, process_index=0, process_count=1))
    with pytest.raises(ValueError, match=r'label 12, outside \[0, 10\)'):
      list(data.create_eval_iterator(config, process_index=0, process_count=1))


def test_not_an_image_classification_dataset(mocked):
  with pytest.raises(ValueError, match='not an image-classification dataset'):
    data.get_dataset_info(make_config('imdb_reviews'))


def test_unknown_dataset_name():
  with pytest.raises(ValueError, match=r"config.dataset='cifar11' is not a tfds dataset"):
    data.get_dataset_info(make_config('cifar11'))


# --- ImageNet's manual directory ---------------------------------------------------


def test_imagenet_without_manual_dir(tmp_path):
  config = make_config('imagenet2012', data_dir=str(tmp_path))
  with pytest.raises(ValueError) as e:
    data.get_dataset_info(config)
  message = str(e.value)
  assert 'config.manual_dir is not set' in message
  assert 'ILSVRC2012_img_train.tar' in message and 'ILSVRC2012_img_val.tar' in message
  assert 'python -m gnet_jax.data prepare --dataset imagenet2012' in message


def test_imagenet_manual_dir_missing(tmp_path):
  config = make_config('imagenet2012', data_dir=str(tmp_path / 'tfds'),
                       manual_dir=str(tmp_path / 'nowhere'))
  with pytest.raises(ValueError, match=r"config.manual_dir='.*nowhere' does not exist"):
    data.create_train_iterator(config, process_index=0, process_count=1)


def test_imagenet_manual_dir_without_archives(tmp_path):
  manual = tmp_path / 'archives'
  manual.mkdir()
  (manual / 'ILSVRC2012_img_val.tar').write_bytes(b'')
  config = make_config('imagenet2012', data_dir=str(tmp_path / 'tfds'),
                       manual_dir=str(manual))
  with pytest.raises(ValueError, match=r'lacks ILSVRC2012_img_train.tar \(needs'):
    data.get_dataset_info(config)


def _fake_imagenet_archives(manual):
  """Tiny archives laid out like the official ones (train: a tar of class tars)."""
  import io
  import tarfile
  from PIL import Image

  def jpeg(value):
    out = io.BytesIO()
    Image.new('RGB', (40, 30), (value, value, value)).save(out, 'JPEG')
    return out.getvalue()

  def add(tar, name, content):
    info = tarfile.TarInfo(name)
    info.size = len(content)
    tar.addfile(info, io.BytesIO(content))

  with tarfile.open(manual / 'ILSVRC2012_img_train.tar', 'w') as outer:
    for synset in ('n01440764', 'n01443537'):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as tar:
        for i in range(3):
          add(tar, f'{synset}_{i}.JPEG', jpeg(40 * i))
      add(outer, f'{synset}.tar', inner.getvalue())
  with tarfile.open(manual / 'ILSVRC2012_img_val.tar', 'w') as tar:
    for i in range(1, 5):
      add(tar, f'ILSVRC2012_val_{i:08d}.JPEG', jpeg(30 * i))


def test_imagenet_prepared_from_manual_dir(tmp_path):
  manual = tmp_path / 'archives'
  manual.mkdir()
  _fake_imagenet_archives(manual)
  config = make_config('imagenet2012', data_dir=str(tmp_path / 'tfds'),
                       manual_dir=str(manual), batch_size=2)
  info = data.get_dataset_info(config)  # Prepares from the archives, once.
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (1000, 6, 4)
  assert (tmp_path / 'tfds' / 'imagenet2012').is_dir()
  train = data.create_train_iterator(config, process_index=0, process_count=1)
  labels = {int(label) for _ in range(6) for label in next(train)['label']}
  assert {info.class_names[label] for label in labels} == {'n01440764', 'n01443537'}
  # Validation labels come from tfds's list, in the order of the file names.
  with open(os.path.join(os.path.dirname(tfds.__file__), 'datasets', 'imagenet2012',
                         'validation_labels.txt')) as f:
    expected = sorted(f.read().split()[:4])
  got = [info.class_names[int(label)]
         for batch in data.create_eval_iterator(config, process_index=0, process_count=1)
         for label in batch['label'][batch['mask']]]
  assert sorted(got) == expected
