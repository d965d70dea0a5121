"""predict: top-5 with ImageNet names from converted weights, batching, unreadable files."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gnet_jax import ModelSpec, convert, data, images as images_lib, init_fn, predict

OPTIONS = dict(variant='torchvision', aux_logits=False, transform_input=True)


@pytest.fixture(scope='module')
def weights_dir(tmp_path_factory):
  variables = jax.jit(lambda x: init_fn(jax.random.key(0), x, **OPTIONS))(
      jnp.zeros((1, 32, 32, 3)))
  out = tmp_path_factory.mktemp('converted')
  # ImageNet's classes at 64x64 (the weights fit any size): quick on a CPU.
  convert.save_converted(variables, ModelSpec(
      num_classes=1000, class_names=convert.imagenet_class_names(), image_size=64,
      **OPTIONS), out)
  return out


@pytest.fixture(scope='module')
def image_files(tmp_path_factory):
  folder = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(0)
  paths = []
  for i, (size, mode) in enumerate([((300, 200), 'RGB'), ((64, 64), 'L'), ((500, 375), 'RGBA')]):
    path = folder / f'image{i}.{"png" if mode != "RGB" else "jpg"}'
    pixels = rng.integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(), mode).save(path)
    paths.append(str(path))
  broken = folder / 'notes.jpg'
  broken.write_text('not an image')
  return paths, str(broken)


def test_top5_with_imagenet_names_in_batches(weights_dir, image_files, capsys):
  paths, _ = image_files
  predictor = predict.Predictor.from_checkpoint(str(weights_dir))
  names = predictor.spec.class_names
  assert names[:2] == ('tench', 'goldfish') and len(names) == 1000
  one_batch = list(predict.predict_files(predictor, paths, batch_size=32))
  small_batches = list(predict.predict_files(predictor, paths, batch_size=2))
  assert [p for p, _ in one_batch] == paths
  for (_, a), (_, b) in zip(one_batch, small_batches):
    assert [n for n, _ in a] == [n for n, _ in b]
    np.testing.assert_allclose([p for _, p in a], [p for _, p in b], rtol=1e-4)
  for _, top5 in one_batch:
    probs = [p for _, p in top5]
    assert len(top5) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    assert all(name in names for name, _ in top5)
  assert predict.main(['--checkpoint', str(weights_dir), *paths]) == 0
  out = capsys.readouterr().out
  assert out.count('%') == 15 and paths[0] in out


def test_preprocessing_is_the_eval_pipelines(image_files):
  paths, _ = image_files
  with open(paths[0], 'rb') as f:
    image = data.preprocess_image(f.read(), 224)
  assert image.shape == (224, 224, 3) and image.dtype == np.float32
  # Normalised with the ImageNet mean/std: a mid-grey pixel lands near zero.
  grey = io.BytesIO()
  Image.new('RGB', (50, 40), (124, 116, 104)).save(grey, 'PNG')
  np.testing.assert_allclose(data.preprocess_image(grey.getvalue(), 32), 0, atol=0.01)


def test_uint8_pixels_predict_as_their_normalised_floats(weights_dir, image_files):
  paths, _ = image_files
  with open(paths[0], 'rb') as f:
    raw = f.read()
  pixels = data.preprocess_image(raw, 64, dtype='uint8')
  assert pixels.dtype == np.uint8 and pixels.shape == (64, 64, 3)
  # The float path normalises the same resize unrounded: within half a level.
  np.testing.assert_allclose(images_lib.normalize(pixels), data.preprocess_image(raw, 64),
                             atol=0.5 / 255 / min(images_lib.STDDEV_RGB) + 1e-6)
  predictor = predict.Predictor.from_checkpoint(str(weights_dir))
  (from_pixels,), (from_floats,) = (
      predictor.top_k(pixels[None]),
      predictor.top_k(np.asarray(images_lib.normalize(pixels))[None]))
  assert [n for n, _ in from_pixels] == [n for n, _ in from_floats]
  np.testing.assert_allclose([p for _, p in from_pixels], [p for _, p in from_floats],
                             rtol=1e-5)


def test_unreadable_file_is_named_and_fails_the_command(weights_dir, image_files, capsys):
  paths, broken = image_files
  assert predict.main(['--checkpoint', str(weights_dir), paths[0], broken]) == 1
  captured = capsys.readouterr()
  assert f'cannot read {broken}' in captured.err and paths[0] in captured.out
