"""ModelSpec: the JSON-able description of a trained GoogLeNet, derived from the model.

A spec holds the options that define the model's function, GoogLeNet's `option` fields
(`model.network_options`: their names, types and defaults are declared there alone), and
what its inputs and outputs mean (image size, eval preprocessing, class names). Configs
make one (`from_config`; `config.model` is `model_config()`), and every folder that holds a
model keeps one as `model.json` beside its checkpoints: a training workdir and a folder
of converted torchvision weights have the same on-disk format, which
`gnet_jax.checkpoint.load_model` reads, and which predict, export, fine-tuning and the
notebook use.

    spec = ModelSpec.load('weights/')            # or a training workdir
    logits = spec.build().apply(variables, images)
"""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from gnet_jax import paths
from gnet_jax.model import ROLES, VARIANTS, GoogLeNet, network_options

SPEC_FILE = 'model.json'
PREPROCESSING = ('inception', 'small')  # config.augment: how eval images are prepared
# Set by the data, not by config.model.
FROM_DATA = ('num_classes',)


class _Spec:
  """ModelSpec's methods (its fields: GoogLeNet's options, then the input/output ones)."""

  def __post_init__(self):
    object.__setattr__(self, 'class_names', tuple(self.class_names))
    if self.variant not in VARIANTS:
      raise ValueError(f'variant must be one of {tuple(VARIANTS)}, got {self.variant!r}.')
    if self.preprocess not in PREPROCESSING:
      raise ValueError(f'preprocess must be one of {PREPROCESSING}, got {self.preprocess!r}.')
    if self.class_names and len(self.class_names) != self.num_classes:
      raise ValueError(f'{len(self.class_names)} class names for {self.num_classes} classes.')

  @classmethod
  def from_config(cls, config, num_classes: int, class_names=()):
    """The spec of `config.model` for data with `num_classes` classes."""
    return cls(num_classes=int(num_classes), image_size=int(config.image_size),
               preprocess=config.augment, class_names=tuple(class_names),
               **{k: config.model[k] for k in network_options() if k not in FROM_DATA})

  @staticmethod
  def with_role(role: str) -> tuple[str, ...]:
    """The network options of a `model.ROLES` role."""
    assert role in ROLES, role
    return tuple(k for k, f in network_options().items() if f.metadata['role'] == role)

  def model_kwargs(self) -> dict[str, Any]:
    """The keyword arguments of `GoogLeNet`, `init_fn` and `apply_fn`."""
    return {k: getattr(self, k) for k in network_options()}

  def build(self, **runtime):
    """The GoogLeNet; `runtime` adds options that do not change its function (dtype,
    conv_block, pool_block, inception_block)."""
    return GoogLeNet(**self.model_kwargs(), **runtime)

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['class_names'] = list(self.class_names)
    return d

  @classmethod
  def from_dict(cls, d: dict, where: str = 'the spec'):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f'{where} has fields this gnet_jax does not know: {unknown} (written '
                       'by a newer version?).')
    return cls(**d)

  def save(self, directory) -> None:
    """Writes `directory/model.json` (any filesystem epath reaches, gs:// included)."""
    path = paths.path(directory) / SPEC_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + '\n')

  @classmethod
  def load(cls, directory):
    path = paths.path(directory) / SPEC_FILE
    if not path.exists():
      raise FileNotFoundError(
          f'{path} does not exist: {directory} is neither a training workdir nor a folder of '
          'converted weights (python -m gnet_jax.convert).')
    return cls.from_dict(json.loads(path.read_text()), where=str(path))


ModelSpec = dataclasses.make_dataclass(
    'ModelSpec',
    [(name, f.type, dataclasses.field(default=f.default))
     for name, f in network_options().items()]
    + [('image_size', 'int', dataclasses.field(default=224)),  # square side
       ('preprocess', 'str', dataclasses.field(default='inception')),  # PREPROCESSING
       ('class_names', 'tuple[str, ...]', dataclasses.field(default=()))],
    bases=(_Spec,), frozen=True)
ModelSpec.__module__ = __name__
ModelSpec.__doc__ = """What defines a GoogLeNet and what it was trained for.

Model fields (`model_kwargs()`): GoogLeNet's network options, with its defaults
(`model.network_options`). Input/output fields: image_size (square side), preprocess
('inception': 0.875 centre crop; 'small': resize), class_names (one per class, or empty).
"""


def model_config() -> ml_collections.ConfigDict:
  """config.model: GoogLeNet's network options with their defaults, but those the data
  sets (FROM_DATA); an option whose default is None takes values of its declared type."""
  hints = typing.get_type_hints(GoogLeNet)
  out = ml_collections.ConfigDict()
  for name, f in network_options().items():
    if name in FROM_DATA:
      continue
    if f.default is None:
      (kind,) = [t for t in typing.get_args(hints[name]) if t is not type(None)]
      out[name] = config_dict.placeholder(kind)
    else:
      out[name] = f.default
  return out
