"""The model's input convention, in one place: NHWC RGB images normalised with the ImageNet
mean and standard deviation (torchvision's), or their uint8 pixels, which `normalize`
turns into that on the device.

uint8 pixels are a quarter of float32's host-to-device bytes, and their normalisation is
one elementwise pass that XLA fuses into the program's first operations; the train and
eval steps, predict and export all accept either.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

MEAN_RGB = (0.485, 0.456, 0.406)  # ImageNet mean of [0, 1] pixels
STDDEV_RGB = (0.229, 0.224, 0.225)


def normalize(images):
  """uint8 pixels (0-255) -> float32 normalised images; floating images are taken to be
  normalised already and returned as they are."""
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images
  if images.dtype != jnp.uint8:
    raise ValueError(f'images must be uint8 pixels or normalised floats, got {images.dtype}.')
  mean = np.asarray(MEAN_RGB, np.float32) * 255
  inv_std = 1 / (np.asarray(STDDEV_RGB, np.float32) * 255)
  return (images.astype(jnp.float32) - mean) * inv_std
