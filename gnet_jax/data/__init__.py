"""Input pipelines: one config builds the data source once, and from it the train and
eval iterators.

    source = data.build_source(config)                  # scans / prepares once
    info = data.dataset_info(source, config)            # classes, split sizes, names
    train = data.create_train_iterator(config, source=source, start_step=k)
    for batch in data.create_eval_iterator(config, source=source): ...

Modules, in the order data flows through them:
- `sources`: where raw records come from (tfds datasets; 'digits', the built-in offline
  dataset, in `digits`; 'folder:/root' images in `folder`), and `DatasetInfo`.
- `preprocess`: decoding, crops, flips, normalisation of one example.
- `pipeline`: positioned, seeded record streams, batching, bad-image reporting.
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
from gnet_jax.data.pipeline import create_eval_iterator, create_train_iterator
from gnet_jax.data.preprocess import MEAN_RGB, STDDEV_RGB, preprocess_image
from gnet_jax.data.sources import (DatasetInfo, Source, build_source, check_batch_size,
                                   dataset_info, get_dataset_info)

__all__ = ['DatasetInfo', 'MEAN_RGB', 'STDDEV_RGB', 'Source', 'build_source',
           'check_batch_size', 'create_eval_iterator', 'create_train_iterator',
           'dataset_info', 'get_dataset_info', 'preprocess_image']
