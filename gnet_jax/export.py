"""Serialises a GoogLeNet for serving: a `jax.export` artifact or a TensorFlow SavedModel.

    python -m gnet_jax.export --checkpoint DIR --out OUT --format stablehlo|saved_model

DIR is a training workdir (its latest checkpoint, or --step) or a directory written by
`python -m gnet_jax.convert`. Both formats take a batch of any size of NHWC float32
images, normalised as in training, at the checkpoint's image size (224 for converted
weights; --image_size overrides), and return float32 logits; the batch dimension is
symbolic.

- stablehlo: OUT/model.jaxexport, bytes of `jax.export.Exported.serialize()`; reload
  with `jax.export.deserialize(data).call(images)`. Parameters are baked in.
- saved_model: a TF SavedModel (via jax2tf) with a `serving_default` signature
  {'images': (None, S, S, 3) float32} -> {'logits': (None, num_classes)}; parameters are
  TF variables, so the SavedModel is as large as the checkpoint and nothing more.
"""
from __future__ import annotations

import argparse
import functools
import os

import jax
import jax.numpy as jnp

from gnet_jax.model import apply_fn

FORMATS = ('stablehlo', 'saved_model')
STABLEHLO_FILE = 'model.jaxexport'


def _forward(variables, model_kwargs):
  return functools.partial(apply_fn, variables, **model_kwargs)


def _image_spec(image_size: int, batch: str = 'b'):
  (b,) = jax.export.symbolic_shape(batch)
  return jax.ShapeDtypeStruct((b, image_size, image_size, 3), jnp.float32)


def export_stablehlo(variables, model_kwargs: dict, image_size: int) -> jax.export.Exported:
  """The eval-mode forward pass, parameters included, for any batch size."""
  return jax.export.export(jax.jit(_forward(variables, model_kwargs)))(
      _image_spec(image_size))


def save_stablehlo(variables, model_kwargs: dict, image_size: int, out_dir: str) -> str:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, STABLEHLO_FILE)
  with open(path, 'wb') as f:
    f.write(export_stablehlo(variables, model_kwargs, image_size).serialize())
  return path


def load_stablehlo(out_dir: str):
  """A callable images -> logits from OUT/model.jaxexport."""
  with open(os.path.join(out_dir, STABLEHLO_FILE), 'rb') as f:
    return jax.export.deserialize(bytearray(f.read())).call


def save_saved_model(variables, model_kwargs: dict, image_size: int, out_dir: str) -> str:
  """A TF SavedModel with a `serving_default` signature images -> logits."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from jax.experimental import jax2tf  # pylint: disable=import-outside-toplevel

  tf_variables = tf.nest.map_structure(tf.Variable, jax.device_get(variables))
  predict = jax2tf.convert(lambda v, x: apply_fn(v, x, **model_kwargs),
                           polymorphic_shapes=[None, '(b, ...)'])
  module = tf.Module()
  module.variables_tree = tf_variables

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec((None, image_size, image_size, 3), tf.float32, name='images')])
  def serve(images):
    return {'logits': predict(module.variables_tree, images)}

  module.serve = serve
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
  args = parser.parse_args(argv)
  from gnet_jax.predict import Predictor  # pylint: disable=import-outside-toplevel
  model = Predictor.from_checkpoint(args.checkpoint, args.step)
  save = save_stablehlo if args.format == 'stablehlo' else save_saved_model
  path = save(model.variables, model.model_kwargs, args.image_size or model.image_size,
              args.out)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
