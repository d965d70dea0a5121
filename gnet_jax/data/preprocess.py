"""Preprocessing of one example, as TF graph code (`config.augment`).

'inception': train = random-resized crop (area 8-100%, aspect 3/4-4/3; JPEGs are only
  decoded inside the crop window), flip, bilinear resize to S; eval = centre crop of
  0.875 of the shorter side, resized to S.
'small': train = resize to S, zero-pad S/8 each side, random S x S crop, flip;
  eval = resize to S. For digits, MNIST, CIFAR.
Grayscale, grayscale+alpha, palette, RGBA (alpha dropped), CMYK and 16-bit images all
become RGB uint8 first; images smaller than the crop are upscaled. Images are then
normalised with the ImageNet mean/std.

A JPEG is checked to be complete (its end-of-image marker follows its last scan) before
any window of it is decoded: decoding only a window stops reading where the window ends,
so a file cut below the window would otherwise decode without an error.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

MEAN_RGB = (0.485, 0.456, 0.406)  # ImageNet mean of [0, 1] pixels (torchvision's).
STDDEV_RGB = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875  # Eval centre crop: 224 of 256.
AUGMENTS = ('inception', 'small')
INPUT_DTYPES = {'float32': tf.float32, 'bfloat16': tf.bfloat16}
TRUNCATED_JPEG = 'truncated JPEG: no end-of-image marker after its last scan'


def jpeg_is_complete(raw: tf.Tensor) -> tf.Tensor:
  """Whether a JPEG's last start-of-scan marker (FF DA) is followed by an end-of-image
  marker (FF D9). Inside entropy-coded data a 0xFF byte is always followed by 0x00 or a
  restart marker, so these two byte pairs are markers wherever they occur after the
  headers; a file cut anywhere after its first scan lacks the final FF D9."""
  b = tf.io.decode_raw(raw, tf.uint8)
  marker = tf.equal(b[:-1], 0xFF)
  sos = tf.where(marker & tf.equal(b[1:], 0xDA))[:, 0]
  eoi = tf.where(marker & tf.equal(b[1:], 0xD9))[:, 0]
  return (tf.size(sos) > 0) & (tf.size(eoi) > 0) & (
      tf.reduce_max(tf.concat([eoi, [-1]], 0)) > tf.reduce_max(tf.concat([sos, [-1]], 0)))


def _check_complete(raw: tf.Tensor) -> tf.Tensor:
  """`raw`, after an error if it is a truncated JPEG (the error drops the example)."""
  ok = tf.logical_or(tf.logical_not(tf.io.is_jpeg(raw)), jpeg_is_complete(raw))
  with tf.control_dependencies([tf.debugging.Assert(ok, [TRUNCATED_JPEG])]):
    return tf.identity(raw)


def decode_rgb(raw: tf.Tensor) -> tf.Tensor:
  """Any JPEG/PNG/GIF/BMP/WebP (gray, gray+alpha, palette, RGBA, CMYK, 16-bit) -> RGB uint8."""
  image = tf.io.decode_image(_check_complete(raw), channels=3, dtype=tf.uint8,
                             expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def inception_crop_window(shape_hw: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """[y, x, h, w] of a random crop: area 8-100% of the image, aspect 3/4-4/3."""
  shape = tf.concat([tf.cast(shape_hw, tf.int32), [3]], axis=0)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  # If no window fits in 10 tries the op returns the whole image.
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def centre_crop_window(shape_hw: tf.Tensor) -> tf.Tensor:
  h, w = tf.cast(shape_hw[0], tf.int32), tf.cast(shape_hw[1], tf.int32)
  side = tf.cast(tf.math.round(EVAL_CROP_FRACTION * tf.cast(tf.minimum(h, w), tf.float32)),
                 tf.int32)
  side = tf.maximum(side, 1)
  return tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])


def decode_window(raw: tf.Tensor, window_fn) -> tf.Tensor:
  """Decodes the window `window_fn(shape_hw)` of an image; JPEGs decode only the window."""

  def jpeg():
    checked = _check_complete(raw)
    window = window_fn(tf.image.extract_jpeg_shape(checked)[:2])
    return tf.image.decode_and_crop_jpeg(checked, window, channels=3)

  def other():
    image = decode_rgb(raw)
    window = window_fn(tf.shape(image)[:2])
    return tf.slice(image, [window[0], window[1], 0], [window[2], window[3], 3])

  image = tf.cond(tf.io.is_jpeg(raw), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bilinear, antialiased when shrinking; upscales small images. float32 in [0, 255]."""
  return tf.image.resize(image, [size, size], method='bilinear', antialias=True)


def _normalise(image: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
  mean = tf.constant(MEAN_RGB, tf.float32) * 255.0
  std = tf.constant(STDDEV_RGB, tf.float32) * 255.0
  return tf.cast((tf.cast(image, tf.float32) - mean) / std, dtype)


def preprocess_fn(*, train: bool, augment: str, size: int, flip: bool, dtype: tf.DType,
                  aug_key: int):
  """Returns record -> {'image', 'label', 'pos', 'key'}; random ops seeded by 'pos'."""

  def fn(ex):
    raw = ex['raw'] if 'raw' in ex else tf.io.read_file(ex['path'])
    seed = tf.stack([tf.constant(aug_key, tf.int64), ex['pos']])
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if augment == 'inception':
      if train:
        image = decode_window(raw, lambda hw: inception_crop_window(hw, crop_seed))
      else:
        image = decode_window(raw, centre_crop_window)
      image = _resize(image, size)
    else:  # 'small'
      image = _resize(decode_rgb(raw), size)
      if train:
        pad = max(1, round(size / 8))
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        image = tf.image.stateless_random_crop(image, [size, size, 3], seed=crop_seed)
    if train and flip:
      image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    image = tf.ensure_shape(_normalise(image, dtype), [size, size, 3])
    return {'image': image, 'label': ex['label'], 'pos': ex['pos'], 'key': ex['key']}

  return fn


def preprocess_image(raw: bytes, image_size: int, augment: str = 'inception') -> np.ndarray:
  """One encoded image -> (S, S, 3) float32, exactly as the eval pipeline makes it.

  For prediction outside a dataset; raises ValueError if the bytes are not a complete,
  readable image.
  """
  fn = preprocess_fn(train=False, augment=augment, size=image_size, flip=False,
                     dtype=tf.float32, aug_key=0)
  record = {'raw': tf.constant(raw), 'label': tf.constant(0, tf.int64),
            'pos': tf.constant(0, tf.int64), 'key': tf.constant('')}
  try:
    return fn(record)['image'].numpy()
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
    raise ValueError(f'not a readable image ({_message(e)})') from e


def _message(error: tf.errors.OpError) -> str:
  lines = error.message.strip().splitlines()
  if any(TRUNCATED_JPEG in line for line in lines):
    return TRUNCATED_JPEG
  return lines[-1][:200] if lines else type(error).__name__


def why_undecodable(key: str) -> str:
  """For a file, why it cannot be read (to tell 'truncated' from 'not an image')."""
  if not os.path.isfile(key):
    return ''
  try:
    decode_rgb(tf.io.read_file(key))
  except tf.errors.OpError as e:
    return f' [{_message(e)}]'
  except Exception as e:  # pylint: disable=broad-except
    return f' [{type(e).__name__}: {e}]'
  return ' [TF decodes this file on its own: the preprocessing failed on it]'
