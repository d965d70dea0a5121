"""Exported models (jax.export and TF SavedModel) reload and give apply_fn's logits."""
import jax
import numpy as np
import pytest

from gnet_jax import ModelSpec, apply_fn, export, images as images_lib, init_fn

OPTIONS = dict(num_classes=10, aux_logits=False)


@pytest.fixture(scope='module')
def model():
  images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  variables = jax.jit(lambda x: init_fn(jax.random.key(0), x, **OPTIONS))(images)
  return variables, images, jax.jit(lambda v, x: apply_fn(v, x, **OPTIONS))(variables, images)


def test_stablehlo_round_trip_any_batch(model, tmp_path):
  variables, images, expected = model
  export.save_stablehlo(variables, OPTIONS, 32, str(tmp_path))
  call = export.load_stablehlo(str(tmp_path))
  np.testing.assert_allclose(call(images), expected, rtol=1e-5, atol=1e-5)
  assert call(images[:1]).shape == (1, 10)  # the batch dimension is symbolic


def test_uint8_pixels_are_normalised_inside(model, tmp_path):
  variables = model[0]
  pixels = np.asarray(jax.random.randint(jax.random.key(2), (2, 32, 32, 3), 0, 256), np.uint8)
  expected = apply_fn(variables, images_lib.normalize(pixels), **OPTIONS)
  export.save_stablehlo(variables, OPTIONS, 32, str(tmp_path), input_dtype='uint8')
  np.testing.assert_allclose(export.load_stablehlo(str(tmp_path))(pixels), expected,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_saved_model_serving_signature(model, tmp_path):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  variables, images, expected = model
  export.save_saved_model(variables, OPTIONS, 32, str(tmp_path))
  serve = tf.saved_model.load(str(tmp_path)).signatures['serving_default']
  logits = serve(images=tf.constant(np.asarray(images)))['logits'].numpy()
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
  assert serve(images=tf.zeros((5, 32, 32, 3)))['logits'].shape == (5, 10)
  pixels = np.asarray(jax.random.randint(jax.random.key(2), (2, 32, 32, 3), 0, 256), np.uint8)
  export.save_saved_model(variables, OPTIONS, 32, str(tmp_path / 'uint8'), input_dtype='uint8')
  serve = tf.saved_model.load(str(tmp_path / 'uint8')).signatures['serving_default']
  np.testing.assert_allclose(serve(images=tf.constant(pixels))['logits'].numpy(),
                             apply_fn(variables, images_lib.normalize(pixels), **OPTIONS),
                             rtol=1e-4, atol=1e-4)


def test_command_line_from_converted_weights(model, tmp_path):
  from gnet_jax import convert  # pylint: disable=import-outside-toplevel
  variables, images, expected = model
  convert.save_converted(variables, ModelSpec(image_size=32, **OPTIONS), tmp_path / 'weights')
  export.main(['--checkpoint', str(tmp_path / 'weights'), '--out', str(tmp_path / 'out'),
               '--format', 'stablehlo'])
  np.testing.assert_allclose(export.load_stablehlo(str(tmp_path / 'out'))(images), expected,
                             rtol=1e-5, atol=1e-5)
