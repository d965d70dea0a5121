"""The core of the data package: what a dataset is to the rest of the project (`Source`),
what a run reads off it (`DatasetInfo`), and the registry that turns `config.dataset` into
one. Each kind of source (tfds datasets, image folders) lives in a module of its own that
imports this one and registers itself; this module imports none of them.

A source is built once per run (`build_source`) and read by every iterator of the run. A
record is {'raw': encoded bytes} or {'path': file to read}, plus 'label' (int64) and
'key' (a string naming the example in error messages).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np
import tensorflow as tf

_COPY_SUFFIX = re.compile(r'_max\d+$')  # copies with smaller images (data.resized)


def copy_suffix(max_side: int) -> str:
  return f'_max{max_side}'


def original_name(name: str) -> str:
  """The dataset a resized copy was made from ('mnist' for 'mnist_max256'), else `name`."""
  return _COPY_SUFFIX.sub('', name)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the training loop need to know about the data."""
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  class_names: list[str]
  name: str = ''  # The resolved dataset: 'cifar10', 'sklearn_digits', 'folder:/root'.
  train_split: str = ''
  eval_split: str = ''
  random_flip: bool = True  # Whether training flips images horizontally.


class Source:
  """A dataset: class names, split sizes, and the records of a split.

  `process_index`/`process_count` select a process's share of a split (tfds's even
  split, `tfds.split_for_jax_process`); the defaults are the whole split.
  """
  name: str
  class_names: list[str]
  default_flip: bool  # whether its images may be mirrored (not for digits)
  # Whether its list of records is in memory (a folder's file names): the pipeline then
  # orders every epoch as a full permutation of it and enters any step at once.
  in_memory: bool = False

  def check_split(self, split: str, setting: str = 'train_split/eval_split') -> None:
    """ValueError naming `config.<setting>` and the splits there are, if `split` is not one."""
    raise NotImplementedError

  def splits(self) -> dict[str, int]:
    """Every split and its number of examples."""
    raise NotImplementedError

  def num_examples(self, split: str) -> int:
    """The number of examples the dataset says the split has."""
    raise NotImplementedError

  def num_records(self, split: str, process_index: int = 0, process_count: int = 1) -> int:
    """The number of records really there for that process (a mocked dataset has fewer
    than it says)."""
    raise NotImplementedError

  def records(self, split: str, process_index: int = 0,
              process_count: int = 1) -> tf.data.Dataset:
    """That process's records as a tf.data.Dataset, in a fixed order."""
    raise NotImplementedError

  def arrays(self, split: str) -> dict[str, np.ndarray]:
    """The split's records as numpy arrays, in `records`' order: the index an in-memory
    source keeps anyway, or what config.cache reads into memory."""
    raise NotImplementedError


def split_error(setting: str, split: str, dataset: str, available) -> ValueError:
  return ValueError(
      f'config.{setting}={split!r}: dataset {dataset!r} has no such split. Its splits are '
      f'{sorted(available)}; set config.{setting} to one of them (tfds slicing such as '
      f"'train[:90%]' also works).")


# config.dataset -> source: (prefix, factory of a Source from the config), in the order
# the kinds registered; a '' prefix is the kind that takes every other name.
_KINDS: list[tuple[str, Callable]] = []


def register(prefix: str, make: Callable) -> None:
  """`make(config)` builds the source of a `config.dataset` that starts with `prefix`."""
  _KINDS.append((prefix, make))


def build_source(config) -> Source:
  """The source `config.dataset` names (a tfds dataset is prepared on first use)."""
  name = config.dataset
  if not isinstance(name, str) or not name:
    raise ValueError(f'config.dataset must be a dataset name, got {name!r}.')
  for prefix, make in sorted(_KINDS, key=lambda kind: not kind[0]):  # '' last
    if name.startswith(prefix):
      return make(config)
  raise ValueError(f'config.dataset={name!r}: no kind of dataset takes it.')


def dataset_info(source: Source, config) -> DatasetInfo:
  """What the model and the loop need to know of `source` as the config reads it."""
  source.check_split(config.train_split, 'train_split')
  source.check_split(config.eval_split, 'eval_split')
  flip = config.get('random_flip', None)
  return DatasetInfo(
      num_classes=len(source.class_names),
      num_train_examples=source.num_examples(config.train_split),
      num_eval_examples=source.num_examples(config.eval_split),
      class_names=list(source.class_names),
      name=source.name,
      train_split=config.train_split,
      eval_split=config.eval_split,
      random_flip=source.default_flip if flip is None else bool(flip))


def get_dataset_info(config) -> DatasetInfo:
  """Number of classes, split sizes and class names (prepares tfds data if needed)."""
  return dataset_info(build_source(config), config)
