"""Top-5 classes of image files, with names and probabilities, on CPU or any device.

    python -m gnet_jax.predict --checkpoint DIR IMAGE [IMAGE ...] [--batch_size 32]

DIR is a training workdir (its latest checkpoint, the EMA weights where the run kept
them; --raw_weights for the raw ones) or a folder written by `python -m gnet_jax.convert`
(local or gs://); its model.json gives the class names, image size and eval
preprocessing. Images are preprocessed exactly as the eval pipeline does and run in
batches of --batch_size; a file that is not a complete, readable image is reported by
name and skipped, and the command then exits 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys

import jax
import numpy as np

from gnet_jax import cpu, paths
from gnet_jax.images import normalize
from gnet_jax.spec import ModelSpec


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A model ready to classify images: its variables and its spec (options, image size,
  eval preprocessing, class names)."""
  variables: dict
  spec: ModelSpec

  @classmethod
  def from_checkpoint(cls, path, step: int | None = None, *,
                      ema: bool | None = None) -> 'Predictor':
    """From a training workdir (latest or `step`) or converted weights; `ema` picks the
    weight-EMA variables (default: them, where the run kept them)."""
    from gnet_jax import checkpoint  # pylint: disable=import-outside-toplevel
    variables, spec = checkpoint.load_model(path, step, ema=ema)
    return cls(variables, spec)

  @functools.cached_property
  def _probabilities(self):
    # One program on this process's first device: cpu.model_blocks picks its blocks.
    model = self.spec.build(**cpu.model_blocks('auto', jax.local_devices()[:1]))
    return jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, normalize(x), train=False)))

  def class_name(self, index: int) -> str:
    return self.spec.class_names[index] if self.spec.class_names else str(index)

  def top_k(self, images: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
    """(name, probability) of the k most likely classes of each preprocessed image
    (uint8 pixels or normalised floats, `gnet_jax.images`)."""
    probs = np.asarray(self._probabilities(self.variables, images))
    best = np.argsort(-probs, axis=-1)[:, :k]
    return [[(self.class_name(j), float(p[j])) for j in row] for p, row in zip(probs, best)]


def predict_files(predictor: Predictor, files, batch_size: int = 32):
  """Yields (path, top-5 list) or (path, error message) for each file, in order."""
  from gnet_jax import data  # pylint: disable=import-outside-toplevel
  pending = []  # (path, preprocessed image)

  def flush():
    results = predictor.top_k(np.stack([image for _, image in pending]))
    out = list(zip([path for path, _ in pending], results))
    pending.clear()
    return out

  for path in files:
    try:
      image = data.preprocess_image(paths.path(path).read_bytes(), predictor.spec.image_size,
                                    predictor.spec.preprocess)
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
  parser.add_argument('--raw_weights', action='store_true',
                      help="the run's raw weights, not its weight EMA (config.ema_decay)")
  parser.add_argument('images', nargs='+')
  args = parser.parse_args(argv)
  cpu.use_fast_cpu_kernels()
  predictor = Predictor.from_checkpoint(args.checkpoint, args.step,
                                        ema=False if args.raw_weights else None)
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
