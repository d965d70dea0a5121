"""Top-5 classes of image files, with names and probabilities, on CPU or any device.

    python -m gnet_jax.predict --checkpoint DIR IMAGE [IMAGE ...] [--batch_size 32]

DIR is a training workdir (its latest checkpoint; the class names, image size and eval
preprocessing of the data it was trained on) or a directory written by
`python -m gnet_jax.convert` (ImageNet class names, 224x224 with the ImageNet eval
crop). Images are preprocessed exactly as the eval
pipeline does and run in batches of --batch_size; a file that is not a readable image
is reported by name and skipped, and the command then exits 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys

import jax
import numpy as np

from gnet_jax import cpu_tuning
from gnet_jax.model import apply_fn

@dataclasses.dataclass(frozen=True)
class Predictor:
  """A model ready to classify images: variables, options and what its classes are."""
  variables: dict
  model_kwargs: dict
  class_names: list[str]
  image_size: int = 224
  augment: str = 'inception'  # which eval preprocessing the model was trained with

  @classmethod
  def from_checkpoint(cls, path: str, step: int | None = None) -> 'Predictor':
    """From a training workdir (latest or `step`) or converted weights."""
    from gnet_jax import checkpoint  # pylint: disable=import-outside-toplevel
    variables, model_kwargs, info = checkpoint.load_model(path, step)
    return cls(variables, model_kwargs, info['class_names'], info['image_size'],
               info['augment'])

  @functools.cached_property
  def _probabilities(self):
    # One device: oneDNN's convolutions, pools and BatchNorms on CPU (gnet_jax/onednn.py).
    onednn = jax.default_backend() == 'cpu'
    return jax.jit(lambda v, x: jax.nn.softmax(apply_fn(v, x, **self.model_kwargs,
                                                        onednn=onednn)))

  def top_k(self, images: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
    """(name, probability) of the k most likely classes of each preprocessed image."""
    probs = np.asarray(self._probabilities(self.variables, images))
    best = np.argsort(-probs, axis=-1)[:, :k]
    return [[(self.class_names[j], float(p[j])) for j in row] for p, row in zip(probs, best)]


def predict_files(predictor: Predictor, paths, batch_size: int = 32):
  """Yields (path, top-5 list) or (path, error message) for each file, in order."""
  from gnet_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  pending = []  # (path, preprocessed image)

  def flush():
    results = predictor.top_k(np.stack([image for _, image in pending]))
    out = list(zip([path for path, _ in pending], results))
    pending.clear()
    return out

  for path in paths:
    try:
      with open(path, 'rb') as f:
        image = input_pipeline.preprocess_image(f.read(), predictor.image_size,
                                                predictor.augment)
    except (OSError, ValueError) as e:
      yield path, f'cannot read {path}: {e}'
      continue
    pending.append((path, image))
    if len(pending) == batch_size:
      yield from flush()
  if pending:
    yield from flush()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--checkpoint', required=True,
                      help='a training workdir or a directory of converted weights')
  parser.add_argument('--step', type=int, default=None, help='a workdir checkpoint step')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('images', nargs='+')
  args = parser.parse_args(argv)
  cpu_tuning.use_fast_cpu_kernels()
  predictor = Predictor.from_checkpoint(args.checkpoint, args.step)
  failed = 0
  for path, result in predict_files(predictor, args.images, args.batch_size):
    if isinstance(result, str):
      print(result, file=sys.stderr)
      failed += 1
      continue
    print(path)
    for name, p in result:
      print(f'  {p:7.2%}  {name}')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
