"""Preprocessing of one example, as TF graph code (`config.augment`).

'inception': train = random-resized crop (area 8-100%, aspect 3/4-4/3) and flip; eval =
  centre crop of 0.875 of the shorter side; both resized to S.
'small': train = resize to S, zero-pad S/8 each side, random S x S crop, flip;
  eval = resize to S. For digits, MNIST, CIFAR.
Grayscale, grayscale+alpha, palette, RGBA (alpha dropped), CMYK and 16-bit images all
become RGB uint8 first; images smaller than the crop are upscaled. The result is handed
over as uint8 pixels (normalised on the device, `gnet_jax.images`) or normalised with
the ImageNet mean/std on the host (`INPUT_DTYPES`).

Decoding is most of the host's work, so `preprocess_fns` gives two functions for
'inception': a fast one for what nearly every photo is, a JPEG that ends with its
end-of-image marker, and a general one for everything else, which the pipeline tries
when the fast one fails. The fast one branches on nothing but the DCT scale: it decodes
only inside the crop window and, where the window is at least twice the output on both
sides, at a reduced DCT scale (1/2, 1/4 or 1/8: libjpeg's own downscale, which also
removes the frequencies the smaller image cannot hold), then resizes bilinearly, which
is free of aliasing below a 2x shrink and mild below 3x (the fast path's limit; beyond
it the general path antialiases).

A truncated JPEG is caught whatever window is drawn: decoding a window stops reading
where the window ends, so the fast path takes only files whose last two bytes are the
end-of-image marker (which cannot occur in the coded data before it), and the general
path checks that such a marker follows the last scan.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from gnet_jax.images import MEAN_RGB, STDDEV_RGB

EVAL_CROP_FRACTION = 0.875  # Eval centre crop: 224 of 256.
AUGMENTS = ('inception', 'small')
INPUT_DTYPES = {'uint8': tf.uint8, 'float32': tf.float32, 'bfloat16': tf.bfloat16}
DCT_SCALES = (1, 2, 4, 8)  # libjpeg's power-of-two scaled decodes
# Bilinear interpolation reads 2 of every `shrink` rows and columns: at 3x and beyond it
# skips a third or more of the pixels, and is antialiased (the general path).
MAX_BILINEAR_SHRINK = 3
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


def _ends_with_eoi(raw: tf.Tensor) -> tf.Tensor:
  return tf.equal(tf.strings.substr(raw, tf.maximum(tf.strings.length(raw) - 2, 0), 2),
                  b'\xff\xd9')


def _asserting(value: tf.Tensor, ok: tf.Tensor, message: str) -> tf.Tensor:
  """`value`, after an error (which drops the example) where `ok` is False."""
  with tf.control_dependencies([tf.debugging.Assert(ok, [message])]):
    return tf.identity(value)


def decode_rgb(raw: tf.Tensor) -> tf.Tensor:
  """Any JPEG/PNG/GIF/BMP/WebP (gray, gray+alpha, palette, RGBA, CMYK, 16-bit) -> RGB uint8;
  a truncated JPEG is an error."""
  complete = tf.cond(tf.io.is_jpeg(raw) & tf.logical_not(_ends_with_eoi(raw)),
                     lambda: jpeg_is_complete(raw), lambda: tf.constant(True))
  image = tf.io.decode_image(_asserting(raw, complete, TRUNCATED_JPEG), channels=3,
                             dtype=tf.uint8, expand_animations=False)
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


def dct_scale(window_hw: tf.Tensor, size: int) -> tf.Tensor:
  """The index in DCT_SCALES of the largest scale 1/r that keeps both sides of the
  window at least `size`."""
  fits = [tf.reduce_min(window_hw) >= r * size for r in DCT_SCALES[1:]]
  return tf.reduce_sum(tf.cast(tf.stack(fits), tf.int32))


def decode_jpeg_window(raw: tf.Tensor, window_fn, size: int) -> tf.Tensor:
  """The fast path: the window `window_fn(shape_hw)` of a JPEG that ends with its
  end-of-image marker, decoded at the coarsest DCT scale that keeps it at least `size`
  on both sides (the window snaps to that scale's pixel grid). An error for anything
  else (another format, trailing bytes, a corrupt file, a shrink past
  MAX_BILINEAR_SHRINK), which the general path then takes."""
  raw = _asserting(raw, _ends_with_eoi(raw), 'not a JPEG ending with its end marker')
  window = window_fn(tf.image.extract_jpeg_shape(raw)[:2])

  def scaled(r):  # `ratio` is an attribute of the op: one op per scale
    return lambda: tf.image.decode_and_crop_jpeg(raw, window // r, channels=3, ratio=r)

  image = tf.switch_case(dct_scale(window[2:], size), [scaled(r) for r in DCT_SCALES])
  image.set_shape([None, None, 3])
  return _asserting(image, tf.reduce_max(tf.shape(image)[:2]) < MAX_BILINEAR_SHRINK * size,
                    'needs an antialiased resize')


def decode_any_window(raw: tf.Tensor, window_fn) -> tf.Tensor:
  """The general path: the whole image decoded (`decode_rgb`), then its window cut."""
  image = decode_rgb(raw)
  window = window_fn(tf.shape(image)[:2])
  return tf.slice(image, [window[0], window[1], 0], [window[2], window[3], 3])


def bilinear(image: tf.Tensor, size: int) -> tf.Tensor:
  """uint8 image -> float32 [0, 255] at size x size, bilinear without antialiasing."""
  # TF's float resize kernel is faster than its uint8 one, the cast included.
  return tf.image.resize(tf.cast(image, tf.float32), [size, size])


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """`bilinear`, antialiased where a side shrinks by MAX_BILINEAR_SHRINK or more."""
  shrink = tf.cast(tf.reduce_max(tf.shape(image)[:2]), tf.float32) / size
  return tf.cond(
      shrink >= MAX_BILINEAR_SHRINK,
      lambda: tf.image.resize(tf.cast(image, tf.float32), [size, size], antialias=True),
      lambda: bilinear(image, size))


def to_input_dtype(image: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
  """float32 [0, 255] pixels -> uint8 pixels, or normalised images of a float dtype."""
  if dtype == tf.uint8:
    # Every pixel the resizes produce is a convex combination of uint8 ones: no clipping.
    return tf.cast(tf.round(image), tf.uint8)
  mean = tf.constant(MEAN_RGB, tf.float32) * 255.0
  std = tf.constant(STDDEV_RGB, tf.float32) * 255.0
  return tf.cast((image - mean) / std, dtype)


def preprocess_fns(*, train: bool, augment: str, size: int, flip: bool, dtype: tf.DType,
                   aug_key: int) -> list:
  """The functions record -> {'image', 'label', 'pos', 'key'} to try in order: a record
  the first fails on goes to the next (the last one's error means it is unreadable).
  Each computes the same preprocessing, up to how a large shrink is filtered and, at a
  window's edges, how the fast path's window decode interpolates colour; random ops are
  seeded by the record's 'pos'."""

  def fn(decode):
    def preprocess(ex):
      raw = ex['raw'] if 'raw' in ex else tf.io.read_file(ex['path'])
      # Independent streams for the crop and the flip: their Philox keys differ.
      crop_seed = tf.stack([tf.constant(aug_key, tf.int64), ex['pos']])
      flip_seed = tf.stack([tf.constant(aug_key + 1, tf.int64), ex['pos']])
      image = decode(raw, crop_seed)
      if augment == 'small' and train:
        pad = max(1, round(size / 8))
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        image = tf.image.stateless_random_crop(image, [size, size, 3], seed=crop_seed)
      image = to_input_dtype(image, dtype)  # before the flip: uint8 is the fewest bytes
      if train and flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
      image = tf.ensure_shape(image, [size, size, 3])
      return {'image': image, 'label': ex['label'], 'pos': ex['pos'], 'key': ex['key']}
    return preprocess

  if augment == 'small':
    return [fn(lambda raw, seed: resize(decode_rgb(raw), size))]
  window = (lambda seed: lambda hw: inception_crop_window(hw, seed)) if train else (
      lambda seed: centre_crop_window)
  return [fn(lambda raw, seed: bilinear(decode_jpeg_window(raw, window(seed), size), size)),
          fn(lambda raw, seed: resize(decode_any_window(raw, window(seed)), size))]


def preprocess_image(raw: bytes, image_size: int, augment: str = 'inception',
                     dtype: str = 'float32') -> np.ndarray:
  """One encoded image -> (S, S, 3) of `dtype` (INPUT_DTYPES), exactly as the eval
  pipeline makes it.

  For prediction outside a dataset; raises ValueError if the bytes are not a complete,
  readable image.
  """
  record = {'raw': tf.constant(raw), 'label': tf.constant(0, tf.int64),
            'pos': tf.constant(0, tf.int64), 'key': tf.constant('')}
  for fn in preprocess_fns(train=False, augment=augment, size=image_size, flip=False,
                           dtype=INPUT_DTYPES[dtype], aug_key=0):
    try:
      return fn(record)['image'].numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
      error = e
  raise ValueError(f'not a readable image ({_message(error)})') from error


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
