"""A folder of the user's own images (config.dataset = 'folder:<root>').

The tests write the folders: images are uniform colours whose red channel is an
id, so every row of a batch can be traced back to its file. Covers labels,
shards, eval exactly once, positioning, image formats, and the broken cases
(non-image file, empty class folder, nested folder, truncated or fake images).
"""
import io
import logging
import os

import numpy as np
import pytest
from PIL import Image

from gnet_jax import data
from gnet_jax import images as images_lib
from helpers import data_config


def write_image(path, rgb=(0, 0, 0), size=(12, 10), mode='RGB', fmt=None, **save):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = Image.new('RGB', size, tuple(rgb))
  if mode != 'RGB':
    image = image.convert(mode)
  image.save(path, fmt, **save)


def make_folder(root, layout):
  """layout: {split: {class: count}} -> {id: (split, class)}; red channel = id."""
  ids, next_id = {}, 1
  for split, classes in layout.items():
    for cls, count in classes.items():
      for _ in range(count):
        write_image(os.path.join(root, split, cls, f'img_{next_id:03d}.png'),
                    (next_id, 255 - next_id, 77))
        ids[next_id] = (split, cls)
        next_id += 1
  return ids


def make_config(root, **overrides):
  return data_config(f'folder:{root}', **{'image_size': 8, 'augment': 'inception',
                                          'batch_size': 4, **overrides})


def pixels(image):
  """Normalised images back to 0..255 RGB."""
  return (np.asarray(image, np.float32) * np.array(images_lib.STDDEV_RGB) +
          np.array(images_lib.MEAN_RGB)) * 255


def row_ids(batch, mask=True):
  """The id (red channel) of each row of a batch of uniform images."""
  keep = batch['mask'] if (mask and 'mask' in batch) else np.ones(len(batch['label']), bool)
  reds = pixels(batch['image'][keep])[..., 0].reshape(int(keep.sum()), -1)
  ids = np.round(reds.mean(axis=1)).astype(int)
  assert np.abs(reds - ids[:, None]).max() < 0.05  # Uniform images, exact ids.
  return ids, batch['label'][keep]


def eval_ids(config, process_index=0, process_count=1):
  out_ids, out_labels = [], []
  for batch in data.create_eval_iterator(config, process_index=process_index,
                                       process_count=process_count):
    ids, labels = row_ids(batch)
    out_ids.extend(ids.tolist())
    out_labels.extend(labels.tolist())
  return out_ids, out_labels


# --- labels, shards, positioning -------------------------------------------------


def test_labels_follow_sorted_class_folders(tmp_path):
  ids = make_folder(tmp_path, {'train': {'zebra': 3, 'cat': 4, 'dog': 2},
                               'validation': {'dog': 2, 'cat': 2, 'zebra': 1}})
  config = make_config(tmp_path)
  info = data.get_dataset_info(config)
  assert info.class_names == ['cat', 'dog', 'zebra'] and info.num_classes == 3
  assert (info.num_train_examples, info.num_eval_examples) == (9, 5)
  assert info.random_flip
  got_ids, labels = eval_ids(config)
  assert sorted(got_ids) == sorted(i for i, (s, _) in ids.items() if s == 'validation')
  for i, label in zip(got_ids, labels):
    assert info.class_names[label] == ids[i][1]  # Never a wrong label.


def test_eval_exactly_once_over_processes(tmp_path):
  ids = make_folder(tmp_path, {'train': {'a': 1}, 'validation': {'a': 12, 'b': 11}})
  config = make_config(tmp_path, batch_size=6)  # 3 processes, local batch 2.
  val = sorted(i for i, (s, _) in ids.items() if s == 'validation')
  seen, lengths = [], []
  for pi in range(3):
    iterator = data.create_eval_iterator(config, process_index=pi, process_count=3)
    lengths.append(len(iterator))
    batches = list(iterator)
    assert len(batches) == len(iterator)
    for batch in batches:
      got, labels = row_ids(batch)
      assert all(ids[i][1] == ['a', 'b'][lab] for i, lab in zip(got, labels))
      seen.extend(got.tolist())
  assert lengths == [4, 4, 4]  # 23 = 8 + 8 + 7 examples, batches of 2.
  assert sorted(seen) == val  # Each exactly once, none dropped.


def test_processes_split_each_global_batch_and_an_epoch_is_the_split(tmp_path):
  ids = make_folder(tmp_path, {'train': {'a': 10, 'b': 14}, 'validation': {'a': 1}})
  config = make_config(tmp_path, batch_size=12)  # 3 processes x 4 rows; an epoch is 2 batches.
  single = data.create_train_iterator(config, process_index=0, process_count=1)
  per_process = [data.create_train_iterator(config, process_index=pi, process_count=3)
                 for pi in range(3)]
  epoch_ids = []
  for _ in range(2):
    whole = next(single)
    parts = [next(it) for it in per_process]
    # Process p's rows are rows [4p, 4p+4) of the global batch: any process count trains alike.
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([b[key] for b in parts]), whole[key])
    got, labels = row_ids(whole)
    assert all(ids[i][1] == ['a', 'b'][lab] for i, lab in zip(got, labels))
    epoch_ids.extend(got.tolist())
  assert sorted(epoch_ids) == sorted(i for i, (s, _) in ids.items() if s == 'train')


def test_positioning(tmp_path):
  make_folder(tmp_path, {'train': {'a': 7, 'b': 6}, 'validation': {'a': 1}})
  config = make_config(tmp_path, batch_size=4)  # 13 examples: epochs end mid-batch.
  reference = [next(it) for it in [data.create_train_iterator(config, process_index=0,
                                                            process_count=1)] * 12]
  for start in (3, 7):
    it = data.create_train_iterator(config, start_step=start, process_index=0, process_count=1)
    for k in range(start, start + 3):
      batch = next(it)
      np.testing.assert_array_equal(batch['image'], reference[k]['image'])
      np.testing.assert_array_equal(batch['label'], reference[k]['label'])


def test_split_slicing(tmp_path):
  make_folder(tmp_path, {'train': {'a': 10, 'b': 10}})
  config = make_config(tmp_path, train_split='train[:75%]', eval_split='train[75%:]')
  info = data.get_dataset_info(config)
  assert (info.num_train_examples, info.num_eval_examples) == (15, 5)
  held_out, _ = eval_ids(config)
  train_ids, _ = eval_ids(make_config(tmp_path, eval_split='train[:75%]'))
  assert len(held_out) == 5 and len(train_ids) == 15
  assert not set(held_out) & set(train_ids)


# --- image formats -----------------------------------------------------------------


def _formats(root):
  """Writes one image per format; returns {file: expected RGB, tolerance}."""
  d = os.path.join(root, 'validation', 'things')
  red, gray = (200, 30, 40), (100, 100, 100)
  expected = {}

  def add(name, want, tol, **kw):
    path = os.path.join(d, name)
    write_image(path, **kw)
    if want is None:  # A palette is dithered: compare with the mean PIL decodes.
      want = np.asarray(Image.open(path).convert('RGB'), np.float64).mean(axis=(0, 1))
    expected[name] = (want, tol)

  add('rgb.jpg', red, 8, rgb=red)
  add('upper.JPEG', red, 8, rgb=red)
  add('gray.png', gray, 0.5, rgb=gray, mode='L')
  add('gray.jpg', gray, 3, rgb=gray, mode='L')
  add('rgba.png', red, 0.5, rgb=red, mode='RGBA')
  add('gray_alpha.png', gray, 0.5, rgb=gray, mode='LA')
  add('palette.png', None, 4, rgb=red, mode='P')  # Crop of a dither: ~mean.
  add('cmyk.jpg', red, 10, rgb=red, mode='CMYK')
  add('anim.gif', None, 4, rgb=red, mode='P')
  add('bitmap.bmp', red, 0.5, rgb=red)
  add('photo.webp', red, 8, rgb=red)
  add('tiny.png', red, 0.5, rgb=red, size=(2, 3))  # Smaller than any crop.
  add('big.jpg', red, 8, rgb=red, size=(300, 200))
  # 16-bit grayscale: 0x8000 of 0xFFFF is 128 of 255.
  os.makedirs(d, exist_ok=True)
  Image.fromarray(np.full((9, 11), 0x8000, np.uint16)).save(os.path.join(d, 'deep.png'))
  expected['deep.png'] = ((128, 128, 128), 1)
  write_image(os.path.join(root, 'train', 'things', 'x.png'), red)
  return expected


@pytest.mark.parametrize('augment', ['inception', 'small'])
def test_image_formats_become_rgb(tmp_path, augment):
  expected = _formats(tmp_path)
  config = make_config(tmp_path, augment=augment, batch_size=len(expected) + 1)
  batch = next(data.create_eval_iterator(config, process_index=0, process_count=1))
  assert batch['mask'].sum() == len(expected)
  got = pixels(batch['image'][batch['mask']]).reshape(len(expected), -1, 3)
  # Rows come in the folder's (seeded) order: match them by file through the source.
  source = data.build_source(config)
  files = [os.path.basename(p) for p in source.arrays('validation')['path']]
  for name, rows in zip(files, got):
    rgb, tol = expected[name]
    np.testing.assert_allclose(rows.mean(axis=0), rgb, atol=tol, err_msg=name)
  # And the train pipeline (random crops of a 2x3 image included) neither crashes.
  train = data.create_train_iterator(make_config(tmp_path, augment=augment, batch_size=4,
                                               train_split='validation'),
                                   process_index=0, process_count=1)
  for _ in range(4):
    assert np.isfinite(next(train)['image']).all()


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_large_shrinks_do_not_alias(tmp_path, fmt):
  """1-px stripes under a 12x shrink average to grey: a JPEG through the reduced DCT scale
  of the fast path, another format through the general path's antialiased resize."""
  stripes = np.zeros((900, 1200, 3), np.uint8)  # DCT scale 1/8 at 64 px
  stripes[:, ::2] = 255
  ext = 'jpg' if fmt == 'JPEG' else 'png'
  for split in ('train', 'validation'):
    path = tmp_path / split / 'a' / f'stripes.{ext}'
    path.parent.mkdir(parents=True)
    Image.fromarray(stripes).save(path, fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
  config = make_config(tmp_path, image_size=64, batch_size=1, input_dtype='uint8')
  image = next(data.create_eval_iterator(config, process_index=0, process_count=1))['image']
  assert abs(image.mean() - 127.5) < 8 and image.std() < 8, (image.mean(), image.std())
  train = next(data.create_train_iterator(config, process_index=0, process_count=1))['image']
  assert train.std() < 12, train.std()


def test_complete_jpeg_with_trailing_bytes_is_read(tmp_path):
  """A JPEG that does not end with its end marker (bytes appended) is not truncated: the
  general path reads it, and it decodes as the file without them (which the fast path
  decodes inside the window only: the window's edge pixels differ a little)."""
  for split in ('train', 'validation'):
    for name, tail in (('plain.jpg', b''), ('padded.jpg', b'\0' * 300)):
      path = tmp_path / split / 'a' / name
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(photo_jpeg(3) + tail)
  config = make_config(tmp_path, image_size=224, batch_size=2, input_dtype='uint8')
  batch = next(data.create_eval_iterator(config, process_index=0, process_count=1))
  assert batch['mask'].all()
  difference = np.abs(batch['image'][0].astype(int) - batch['image'][1])
  assert difference.mean() < 0.5 and np.percentile(difference, 99) <= 4


# --- broken folders: clear errors at start-up ------------------------------------


def _good(root):
  make_folder(root, {'train': {'a': 3, 'b': 3}, 'validation': {'a': 1, 'b': 1}})


@pytest.mark.parametrize('breakage,message', [
    (lambda r: open(os.path.join(r, 'train', 'a', 'notes.txt'), 'w').write('hi'),
     r'train/a/notes.txt is not an image file'),
    (lambda r: write_image(os.path.join(r, 'train', 'a', 'scan.tiff'), fmt='TIFF'),
     r'train/a/scan.tiff is not an image file'),
    (lambda r: os.makedirs(os.path.join(r, 'train', 'c')),
     r'train/c is an empty class folder'),
    (lambda r: write_image(os.path.join(r, 'train', 'a', 'more', '1.png')),
     r'train/a/more is a folder inside a class folder'),
    (lambda r: write_image(os.path.join(r, 'train', 'loose.png')),
     r'train/loose.png is a file directly in a split folder'),
    (lambda r: write_image(os.path.join(r, '__MACOSX', 'a', '1.png')),
     r'__MACOSX is macOS zip metadata'),
])
def test_broken_folder_is_a_clear_error(tmp_path, breakage, message):
  _good(tmp_path)
  breakage(str(tmp_path))
  with pytest.raises(ValueError, match=message):
    data.create_train_iterator(make_config(tmp_path), process_index=0, process_count=1)
  with pytest.raises(ValueError, match=message):
    data.get_dataset_info(make_config(tmp_path))


def test_missing_or_empty_root(tmp_path):
  with pytest.raises(ValueError, match='does not exist'):
    data.get_dataset_info(make_config(tmp_path / 'nowhere'))
  with pytest.raises(ValueError, match='no split folders'):
    data.get_dataset_info(make_config(tmp_path))


def test_missing_split_lists_the_splits(tmp_path):
  make_folder(tmp_path, {'train': {'a': 2}, 'val': {'a': 1}})
  with pytest.raises(ValueError, match=r"config.eval_split='validation'.*\['train', 'val'\]"):
    data.get_dataset_info(make_config(tmp_path))


def test_hidden_files_and_folders_are_ignored(tmp_path):
  _good(tmp_path)
  open(os.path.join(tmp_path, 'train', 'a', '.DS_Store'), 'w').write('x')
  os.makedirs(os.path.join(tmp_path, 'train', '.ipynb_checkpoints'))
  os.makedirs(os.path.join(tmp_path, '.cache'))
  info = data.get_dataset_info(make_config(tmp_path))
  assert info.class_names == ['a', 'b'] and info.num_train_examples == 6


# --- undecodable images ------------------------------------------------------------


def _with_bad_files(root, n_good=20, n_bad=2):
  ids = make_folder(root, {'train': {'a': n_good // 2, 'b': n_good - n_good // 2},
                           'validation': {'a': n_good // 2, 'b': n_good - n_good // 2}})
  buf = io.BytesIO()
  Image.new('RGB', (64, 48), (9, 9, 9)).save(buf, 'JPEG')
  bad = []
  for i in range(n_bad):
    for split in ('train', 'validation'):
      path = os.path.join(root, split, 'ab'[i % 2], f'bad_{i:02d}.jpg' if i % 2 else
                          f'bad_{i:02d}.png')
      with open(path, 'wb') as f:  # Truncated JPEG, or an HTML page named .png.
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2] if i % 2 else
                b'<html>404 not found</html>')
      bad.append(path)
  return ids, bad


def test_corrupt_image_stops_with_its_name(tmp_path):
  _, bad = _with_bad_files(tmp_path)
  config = make_config(tmp_path)
  with pytest.raises(ValueError, match=r'Cannot decode image .*bad_0[01]\.(png|jpg).*'
                                       r'skip_corrupt_images'):
    list(data.create_eval_iterator(config, process_index=0, process_count=1))
  train = data.create_train_iterator(config, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r'Cannot decode image .*bad_0[01]'):
    for _ in range(10):  # 22 files, batch 4: a bad one comes within an epoch.
      next(train)


def test_skip_corrupt_images_eval_counts_every_good_one_once(tmp_path, caplog):
  ids, bad = _with_bad_files(tmp_path)
  config = make_config(tmp_path, skip_corrupt_images=True, batch_size=4)
  with caplog.at_level(logging.WARNING, logger='gnet_jax.data.pipeline'):
    got, labels = eval_ids(config)
  assert sorted(got) == sorted(i for i, (s, _) in ids.items() if s == 'validation')
  assert 'skipped 2 unreadable images of 22' in caplog.text
  assert 'bad_00.png' in caplog.text and 'bad_01.jpg' in caplog.text


def test_skip_corrupt_images_train_keeps_batches_and_positions(tmp_path, caplog):
  ids, _ = _with_bad_files(tmp_path)
  config = make_config(tmp_path, skip_corrupt_images=True, batch_size=4)
  with caplog.at_level(logging.WARNING, logger='gnet_jax.data.pipeline'):
    it = data.create_train_iterator(config, process_index=0, process_count=1)
    reference = [next(it) for _ in range(12)]  # Two epochs of 22.
  assert 'unreadable images skipped so far' in caplog.text
  for batch in reference:
    assert batch['image'].shape == (4, 8, 8, 3)
    got, labels = row_ids(batch)
    assert all(ids[i] == ('train', 'ab'[lab]) for i, lab in zip(got, labels))
  resumed = data.create_train_iterator(config, start_step=5, process_index=0, process_count=1)
  for k in range(5, 9):
    np.testing.assert_array_equal(next(resumed)['image'], reference[k]['image'])


def test_many_corrupt_images_are_an_error_even_when_skipping(tmp_path):
  _with_bad_files(tmp_path, n_good=20, n_bad=12)
  config = make_config(tmp_path, skip_corrupt_images=True, batch_size=32)
  with pytest.raises(ValueError, match=r'12 of the 32 images .* unreadable'):
    list(data.create_eval_iterator(config, process_index=0, process_count=1))


def test_a_batch_of_only_corrupt_images_is_an_error(tmp_path):
  root = tmp_path
  for split in ('train', 'validation'):
    for i in range(4):
      path = os.path.join(root, split, 'a', f'{i}.jpg')
      os.makedirs(os.path.dirname(path), exist_ok=True)
      open(path, 'wb').write(b'\xff\xd8\xff\xe0 not really a jpeg')
  config = make_config(root, skip_corrupt_images=True, batch_size=4)
  with pytest.raises(ValueError, match='Every image of a batch'):
    next(data.create_train_iterator(config, process_index=0, process_count=1))


# --- truncated JPEGs: reported whatever crop window is drawn ----------------------


def photo_jpeg(seed, size=(500, 375), **save) -> bytes:
  """A photo-like JPEG (smooth colour fields with noise) of ImageNet's typical size."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (size[1] // 25 + 1, size[0] // 25 + 1, 3))
  image = np.kron(coarse, np.ones((25, 25, 1)))[:size[1], :size[0]]
  image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, 'JPEG', quality=90, **save)
  return buf.getvalue()


@pytest.mark.parametrize('save', [{}, {'progressive': True}], ids=['baseline', 'progressive'])
def test_jpeg_completeness_check(save):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from gnet_jax.data import preprocess  # pylint: disable=import-outside-toplevel
  whole = photo_jpeg(0, **save)
  assert bool(preprocess.jpeg_is_complete(tf.constant(whole)))
  assert bool(preprocess.jpeg_is_complete(tf.constant(whole + b'\0' * 64)))  # trailing bytes
  for fraction in np.linspace(0.02, 0.999, 40):
    assert not bool(preprocess.jpeg_is_complete(tf.constant(whole[:int(len(whole) * fraction)])))


@pytest.mark.slow
@pytest.mark.parametrize('fraction', [0.5, 0.8, 0.95])
def test_truncated_jpeg_is_reported_whatever_the_crop(tmp_path, fraction, caplog):
  """A JPEG cut at 50/80/95% stops every epoch with its name (20 epochs, 20 different
  Inception crop windows); with skip_corrupt_images it is skipped and counted in every
  epoch, and eval and predict's preprocessing report it too. Before the completeness
  check, a window above the cut decoded without an error (10 of 20 epochs at 80%, 15 at
  95%)."""
  for split in ('train', 'validation'):
    for i in range(7):
      path = tmp_path / split / 'ab'[i % 2] / f'{i}.jpg'
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(photo_jpeg(i))
    whole = photo_jpeg(99)
    (tmp_path / split / 'a' / 'cut.jpg').write_bytes(whole[:int(len(whole) * fraction)])
  config = make_config(tmp_path, batch_size=8, image_size=32)  # one batch = one epoch
  source = data.build_source(config)
  for epoch in range(20):
    with pytest.raises(ValueError, match=r'Cannot decode image .*cut\.jpg') as error:
      next(data.create_train_iterator(config, source=source, start_step=epoch,
                                    process_index=0, process_count=1))
  assert 'truncated JPEG' in str(error.value)
  with pytest.raises(ValueError, match=r'cut\.jpg'):
    list(data.create_eval_iterator(config, source=source, process_index=0, process_count=1))
  with pytest.raises(ValueError, match='truncated JPEG'):
    data.preprocess_image((tmp_path / 'validation' / 'a' / 'cut.jpg').read_bytes(), 224)
  skipping = make_config(tmp_path, batch_size=8, image_size=32, skip_corrupt_images=True)
  with caplog.at_level(logging.WARNING, logger='gnet_jax.data.pipeline'):
    it = data.create_train_iterator(skipping, process_index=0, process_count=1)
    for _ in range(8):  # 8 epochs: the cut file is skipped (and counted) in each
      assert next(it)['image'].shape == (8, 32, 32, 3)
  assert '8 unreadable images skipped so far' in caplog.text
