"""Serialises a GoogLeNet for serving: a `jax.export` artifact or a TensorFlow SavedModel.

    python -m gnet_jax.export --checkpoint DIR --out OUT --format stablehlo|saved_model

DIR is a training workdir (its latest checkpoint, or --step; the EMA weights where the
run kept them, --raw_weights for the raw ones) or a folder written by
`python -m gnet_jax.convert`; DIR and OUT may be local or gs://. Both formats take a
batch of any size of NHWC images at the checkpoint's image size (224 for converted
weights; --image_size overrides), float32 and normalised as in training, or with
--input_dtype uint8 their pixels (0-255, normalised inside), and return float32
logits; the batch dimension is symbolic.

- stablehlo: OUT/model.jaxexport, bytes of `jax.export.Exported.serialize()`; reload
  with `jax.export.deserialize(data).call(images)`. Parameters are baked in.
- saved_model: a TF SavedModel (via jax2tf) with a `serving_default` signature
  {'images': (None, S, S, 3) float32 or uint8} -> {'logits': (None, num_classes)};
  parameters are
  TF variables, so the SavedModel is as large as the checkpoint and nothing more.
"""
from __future__ import annotations

import argparse

import jax
from jax import export as jax_export  # a submodule that jax < 0.8 does not import
import jax.numpy as jnp

from gnet_jax import paths
from gnet_jax.images import normalize
from gnet_jax.model import apply_fn

FORMATS = ('stablehlo', 'saved_model')
INPUT_DTYPES = ('float32', 'uint8')
STABLEHLO_FILE = 'model.jaxexport'


def _forward(variables, model_kwargs):
  """images (uint8 pixels or normalised floats) -> eval-mode logits."""
  return lambda images: apply_fn(variables, normalize(images), **model_kwargs)


def _image_spec(image_size: int, input_dtype: str, batch: str = 'b'):
  (b,) = jax_export.symbolic_shape(batch)
  return jax.ShapeDtypeStruct((b, image_size, image_size, 3), jnp.dtype(input_dtype))


def export_stablehlo(variables, model_kwargs: dict, image_size: int,
                     input_dtype: str = 'float32') -> jax_export.Exported:
  """The eval-mode forward pass, parameters included, for any batch size."""
  return jax_export.export(jax.jit(_forward(variables, model_kwargs)))(
      _image_spec(image_size, input_dtype))


def save_stablehlo(variables, model_kwargs: dict, image_size: int, out_dir,
                   input_dtype: str = 'float32') -> str:
  out_dir = paths.path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / STABLEHLO_FILE
  path.write_bytes(export_stablehlo(variables, model_kwargs, image_size,
                                    input_dtype).serialize())
  return str(path)


def load_stablehlo(out_dir):
  """A callable images -> logits from OUT/model.jaxexport."""
  data = (paths.path(out_dir) / STABLEHLO_FILE).read_bytes()
  return jax_export.deserialize(bytearray(data)).call


def save_saved_model(variables, model_kwargs: dict, image_size: int, out_dir,
                     input_dtype: str = 'float32') -> str:
  """A TF SavedModel with a `serving_default` signature images -> logits."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from jax.experimental import jax2tf  # pylint: disable=import-outside-toplevel

  tf_variables = tf.nest.map_structure(tf.Variable, jax.device_get(variables))
  predict = jax2tf.convert(lambda v, x: _forward(v, model_kwargs)(x),
                           polymorphic_shapes=[None, '(b, ...)'])
  module = tf.Module()
  module.variables_tree = tf_variables

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec((None, image_size, image_size, 3), tf.as_dtype(input_dtype),
                    name='images')])
  def serve(images):
    return {'logits': predict(module.variables_tree, images)}

  module.serve = serve
  out_dir = str(paths.path(out_dir))  # TensorFlow writes gs:// itself
  tf.saved_model.save(module, out_dir, signatures={'serving_default': serve})
  return out_dir


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--checkpoint', required=True,
                      help='a training workdir or a directory of converted weights')
  parser.add_argument('--step', type=int, default=None, help='a workdir checkpoint step')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--format', required=True, choices=FORMATS)
  parser.add_argument('--image_size', type=int, default=None)
  parser.add_argument('--input_dtype', default='float32', choices=INPUT_DTYPES,
                      help='float32: normalised images; uint8: pixels, normalised inside')
  parser.add_argument('--raw_weights', action='store_true',
                      help="the run's raw weights, not its weight EMA (config.ema_decay)")
  args = parser.parse_args(argv)
  from gnet_jax.checkpoint import load_model  # pylint: disable=import-outside-toplevel
  variables, spec = load_model(args.checkpoint, args.step,
                               ema=False if args.raw_weights else None)
  save = save_stablehlo if args.format == 'stablehlo' else save_saved_model
  path = save(variables, spec.model_kwargs(), args.image_size or spec.image_size, args.out,
              args.input_dtype)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
