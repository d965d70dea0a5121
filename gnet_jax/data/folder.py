"""'folder:/path/to/root': the user's own images in `root/<split>/<class>/*.jpg`.

Also .jpeg .png .gif .bmp .webp, with tfds.ImageFolder's conventions: label i is the
i-th class folder name in sorted order over all splits, examples are listed in the same
seeded order. Where tfds.ImageFolder silently ignores a stray file or takes a junk
folder for a class, this is a clear error naming every problem at once; hidden files and
folders are ignored. Splits accept tfds slicing ('train[:90%]'). The folder is scanned
once, when the source is built.
"""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from gnet_jax.data.source import Source, register, split_error

logger = logging.getLogger(__name__)

FOLDER_PREFIX = 'folder:'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp', '.webp')


class FolderSource(Source):
  """The user's images in root/<split>/<class>/<image>, with tfds.ImageFolder's labels."""
  in_memory = True  # the file list

  @classmethod
  def from_config(cls, config) -> 'FolderSource':
    root = os.path.expanduser(config.dataset[len(FOLDER_PREFIX):])
    if not root:
      raise ValueError("config.dataset='folder:' needs a path: 'folder:/path/to/root'.")
    return cls(root)

  def __init__(self, root: str):
    self.root = root
    self.name = FOLDER_PREFIX + root
    self.class_names, self._examples = scan_image_folder(root)
    self.default_flip = True
    self._split_dict = tfds.core.SplitDict([
        tfds.core.SplitInfo(name=s, shard_lengths=[len(ex)], num_bytes=0)
        for s, ex in self._examples.items()])

  def _instructions(self, split, setting='train_split/eval_split'):
    try:
      return tfds.core.ReadInstruction.from_spec(split).to_absolute(self._split_dict)
    except (KeyError, ValueError, AssertionError):
      raise split_error(setting, split, self.name, self._examples) from None

  def check_split(self, split: str, setting: str = 'train_split/eval_split') -> None:
    self._instructions(split, setting)

  def splits(self) -> dict[str, int]:
    return {k: len(v) for k, v in self._examples.items()}

  def num_examples(self, split: str) -> int:
    return self.num_records(split)

  def num_records(self, split: str, process_index: int = 0, process_count: int = 1) -> int:
    return len(self._arrays(split, process_index, process_count)['label'])

  def records(self, split: str, process_index: int = 0,
              process_count: int = 1) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(
        self._arrays(split, process_index, process_count))

  def arrays(self, split: str) -> dict[str, np.ndarray]:
    return self._arrays(split, 0, 1)

  def _arrays(self, split: str, process_index: int, process_count: int):
    self._instructions(split)  # Clear error for an unknown split.
    sub = tfds.split_for_jax_process(split, process_index=process_index,
                                     process_count=process_count)
    examples = []
    for ins in sub.to_absolute(self._split_dict):
      examples.extend(self._examples[ins.splitname][ins.from_ or 0:ins.to])
    paths = np.array([p for p, _ in examples], dtype=object)
    labels = np.array([lab for _, lab in examples], dtype=np.int64)
    return {'path': paths, 'label': labels, 'key': paths.copy()}


def scan_image_folder(root: str) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
  """Lists root/<split>/<class>/<image>; every problem found is reported at once."""
  setting = f'config.dataset={FOLDER_PREFIX + root!r}'
  if not tf.io.gfile.isdir(root):
    raise ValueError(f'{setting}: {root} does not exist or is not a directory. Expected '
                     'root/<split>/<class>/<image>.jpg, e.g. root/train/cat/1.jpg.')
  problems: list[str] = []
  split_classes: dict[str, dict[str, list[str]]] = {}

  def entries(d):
    names = [n.rstrip('/') for n in sorted(tf.io.gfile.listdir(d))]
    return [n for n in names if not n.startswith('.')]  # .DS_Store, .ipynb_checkpoints...

  for split in entries(root):
    split_dir = os.path.join(root, split)
    if not tf.io.gfile.isdir(split_dir):
      continue  # A README or archive next to the split folders.
    if split == '__MACOSX':
      problems.append(f'{split_dir} is macOS zip metadata, not a split: delete it.')
      continue
    classes: dict[str, list[str]] = {}
    for cls in entries(split_dir):
      cls_dir = os.path.join(split_dir, cls)
      if not tf.io.gfile.isdir(cls_dir):
        problems.append(f'{cls_dir} is a file directly in a split folder: images go in '
                        f'class folders, {split_dir}/<class>/<image>.')
        continue
      images = []
      for fname in entries(cls_dir):
        path = os.path.join(cls_dir, fname)
        if tf.io.gfile.isdir(path):
          problems.append(f'{path} is a folder inside a class folder: nested folders are '
                          'not read; move its images up into the class folder or remove it.')
        elif fname.lower().endswith(IMAGE_EXTENSIONS):
          images.append(path)
        else:
          problems.append(f'{path} is not an image file ({"/".join(IMAGE_EXTENSIONS)}): '
                          'move it out of the class folder (or convert it to PNG/JPEG).')
      if not images:
        problems.append(f'{cls_dir} is an empty class folder (no images): add images or '
                        'delete it, else its class would have no examples.')
      classes[cls] = images
    if not classes:
      problems.append(f'{split_dir} has no class folders: expected '
                      f'{split_dir}/<class>/<image>.jpg.')
    split_classes[split] = classes
  if not split_classes and not problems:
    problems.append(f'{root} has no split folders: expected root/<split>/<class>/<image>, '
                    'e.g. root/train/cat/1.jpg and root/validation/cat/2.jpg.')
  if problems:
    shown = '\n  '.join(problems[:20])
    more = f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else ''
    raise ValueError(f'{setting}: the image folder is not usable:\n  {shown}{more}')
  class_names = sorted({c for classes in split_classes.values() for c in classes})
  label_of = {c: i for i, c in enumerate(class_names)}
  examples = {}
  for split, classes in split_classes.items():
    exs = [(p, label_of[c]) for c in sorted(classes) for p in sorted(classes[c])]
    random.Random(split).shuffle(exs)  # tfds.ImageFolder's order.
    examples[split] = exs
    only_here = set(class_names) - set(classes)
    if only_here and len(split_classes) > 1:
      logger.warning('Split %s of %s has no folder for classes %s.', split, root,
                     sorted(only_here)[:10])
  return class_names, examples


register(FOLDER_PREFIX, FolderSource.from_config)
