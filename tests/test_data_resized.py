"""`python -m gnet_jax.data prepare --max_side N`: a copy with smaller images, read through
the same pipeline and config as any tfds dataset."""
import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from gnet_jax import data
from gnet_jax.data import __main__ as data_main
from gnet_jax.data import resized
from helpers import data_config

# name -> (split, class, size, format): larger and smaller than the copy's max side of 64
IMAGES = {
    'wide.jpg': ('train', 'cat', (300, 120), 'JPEG'),
    'tall.png': ('train', 'dog', (90, 200), 'PNG'),
    'small.jpg': ('train', 'dog', (40, 30), 'JPEG'),
    'square.jpg': ('validation', 'cat', (128, 128), 'JPEG'),
    'tiny.png': ('validation', 'dog', (20, 20), 'PNG'),
}


def encoded(size, fmt, seed) -> bytes:
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 255, (size[1] // 10 + 1, size[0] // 10 + 1, 3), dtype=np.uint8)
  image = Image.fromarray(coarse).resize(size, Image.BILINEAR)
  out = io.BytesIO()
  image.save(out, fmt)
  return out.getvalue()


@pytest.fixture
def folder(tmp_path):
  root = tmp_path / 'photos'
  for i, (name, (split, cls, size, fmt)) in enumerate(IMAGES.items()):
    path = root / split / cls / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded(size, fmt, i))
  return root


def copy_of(folder, data_dir, *extra):
  data_main.main(['prepare', '--dataset', f'folder:{folder}', '--max_side', '64',
                  '--data_dir', str(data_dir), *extra])
  return tfds.builder('photos_max64', data_dir=str(data_dir))


def test_copy_has_the_splits_labels_and_smaller_images(folder, tmp_path, capsys):
  builder = copy_of(folder, tmp_path / 'tfds')
  assert '--config.dataset=photos_max64' in capsys.readouterr().out
  assert builder.info.features['label'].names == ['cat', 'dog']
  assert {s: builder.info.splits[s].num_examples for s in ('train', 'validation')} == {
      'train': 3, 'validation': 2}
  for split in ('train', 'validation'):
    for ex in builder.as_dataset(split=split, decoders={
        'image': tfds.decode.SkipDecoding()}).as_numpy_iterator():
      name = ex['file_name'].decode().rsplit('/', 1)[-1]
      want_split, cls, size, _ = IMAGES[name]
      assert split == want_split and ex['label'] == ['cat', 'dog'].index(cls)
      original = (folder / split / cls / name).read_bytes()
      image = Image.open(io.BytesIO(ex['image']))
      if max(size) <= 64:  # kept as it was
        assert ex['image'] == original
      else:  # shrunk to a longer side of 64, as a JPEG, the aspect kept
        assert image.format == 'JPEG' and max(image.size) == 64
        assert abs(image.size[0] / image.size[1] - size[0] / size[1]) < 0.05


def test_the_copy_trains_through_the_same_pipeline(folder, tmp_path):
  copy_of(folder, tmp_path / 'tfds')
  config = data_config('photos_max64', data_dir=str(tmp_path / 'tfds'), image_size=32,
                       batch_size=3, input_dtype='uint8')
  info = data.get_dataset_info(config)
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (2, 3, 2)
  batch = next(data.create_train_iterator(config, process_index=0, process_count=1))
  assert batch['image'].shape == (3, 32, 32, 3) and batch['image'].dtype == np.uint8
  evaluation = list(data.create_eval_iterator(config, process_index=0, process_count=1))
  assert sum(int(b['mask'].sum()) for b in evaluation) == 2


def test_an_unreadable_image_is_named_or_left_out(folder, tmp_path, capsys):
  bad = folder / 'train' / 'cat' / 'broken.jpg'
  bad.write_bytes(encoded((100, 80), 'JPEG', 9)[:300])
  with pytest.raises(SystemExit, match=r'Cannot decode image .*broken\.jpg'):
    copy_of(folder, tmp_path / 'strict')
  builder = copy_of(folder, tmp_path / 'skipping', '--skip_corrupt_images')
  assert builder.info.splits['train'].num_examples == 3
  assert '1 unreadable images left out' in capsys.readouterr().out


def test_copy_names():
  assert resized.copy_name('imagenet2012', 320) == 'imagenet2012_max320'
  assert resized.copy_name('imagenette/320px-v2', 256) == 'imagenette_320px_v2_max256'
  assert resized.copy_name('folder:/data/My Photos/', 512) == 'my_photos_max512'
  assert data.source.original_name('mnist_max256') == 'mnist'
