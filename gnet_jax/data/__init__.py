"""Input pipelines: one config builds the data source once, and from it the train and
eval iterators.

    source = data.build_source(config)                  # scans / prepares once
    info = data.dataset_info(source, config)            # classes, split sizes, names
    train = data.create_train_iterator(config, source=source, start_step=k)
    for batch in data.create_eval_iterator(config, source=source): ...

Modules, in the order data flows through them:
- `source`: what a dataset is to the rest (`Source`, `DatasetInfo`) and the registry of
  kinds, which `tfds_source` (tfds datasets; 'digits', the built-in offline dataset, from
  `digits`) and `folder` ('folder:/root' images) join; none of them is imported by it.
- `preprocess`: decoding, crops, flips, normalisation of one example.
- `pipeline`: positioned, seeded record streams, batching, bad-image reporting.
- `resized`: a copy of a dataset with smaller images.
- `python -m gnet_jax.data prepare|info --dataset NAME`: prepare a dataset ahead of time.

TensorFlow is imported by this package only (and by TensorBoard writing), and it is
hidden from any GPU/TPU: it only decodes images.
"""
import tensorflow as tf


def _hide_accelerators_from_tf() -> None:
  """TF only decodes images: keep it off the GPU/TPU that JAX uses."""
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # Already initialised, or no such kind.
      pass


_hide_accelerators_from_tf()

# pylint: disable=wrong-import-position
from gnet_jax.data import folder, tfds_source  # the kinds of source register themselves
from gnet_jax.data.pipeline import create_eval_iterator, create_train_iterator
from gnet_jax.data.preprocess import preprocess_image
from gnet_jax.data.source import (DatasetInfo, Source, build_source, dataset_info,
                                  get_dataset_info)

__all__ = ['DatasetInfo', 'Source', 'build_source', 'create_eval_iterator',
           'create_train_iterator', 'dataset_info', 'get_dataset_info', 'preprocess_image']
