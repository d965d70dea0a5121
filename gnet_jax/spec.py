"""ModelSpec: the JSON-able description of a trained GoogLeNet, in one place.

A spec holds the options that define the model's function (`GoogLeNet`'s fields) and
what its inputs and outputs mean (image size, eval preprocessing, class names). Configs
make one (`from_config`), and every folder that holds a model keeps one as `model.json`
beside its checkpoints: a training workdir and a folder of converted torchvision weights
have the same on-disk format, which `gnet_jax.checkpoint.load_model` reads, and which
predict, export, fine-tuning and the notebook use.

    spec = ModelSpec.load('weights/')            # or a training workdir
    logits = spec.build().apply(variables, images)
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from gnet_jax import paths
from gnet_jax.model import VARIANTS, GoogLeNet

SPEC_FILE = 'model.json'
PREPROCESSING = ('inception', 'small')  # config.augment: how eval images are prepared


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What defines a GoogLeNet and what it was trained for.

  Model fields (`model_kwargs()`): num_classes, variant, aux_logits, use_bn,
  transform_input, dropout_rate, aux_dropout_rate (see `gnet_jax.GoogLeNet`).
  Input/output fields: image_size (square side), preprocess ('inception': 0.875 centre
  crop; 'small': resize), class_names (one per class, or empty).
  """
  num_classes: int = 1000
  variant: str = 'paper'
  aux_logits: bool = True
  use_bn: bool = True
  transform_input: bool = False
  dropout_rate: float | None = None
  aux_dropout_rate: float = 0.7
  image_size: int = 224
  preprocess: str = 'inception'
  class_names: tuple[str, ...] = ()

  # Fields whose difference makes another model's weights unusable here...
  WEIGHT_FIELDS = ('variant', 'use_bn', 'transform_input')
  # ...and those that only change heads (fine-tuning initialises them afresh).
  HEAD_FIELDS = ('num_classes', 'aux_logits')

  def __post_init__(self):
    object.__setattr__(self, 'class_names', tuple(self.class_names))
    if self.variant not in VARIANTS:
      raise ValueError(f'variant must be one of {tuple(VARIANTS)}, got {self.variant!r}.')
    if self.preprocess not in PREPROCESSING:
      raise ValueError(f'preprocess must be one of {PREPROCESSING}, got {self.preprocess!r}.')
    if self.class_names and len(self.class_names) != self.num_classes:
      raise ValueError(f'{len(self.class_names)} class names for {self.num_classes} classes.')

  @classmethod
  def from_config(cls, config, num_classes: int, class_names=()) -> 'ModelSpec':
    """The spec of `config.model` for data with `num_classes` classes."""
    m = config.model
    return cls(num_classes=int(num_classes), variant=m.variant, aux_logits=bool(m.aux_logits),
               use_bn=bool(m.use_bn), transform_input=bool(m.transform_input),
               dropout_rate=m.dropout_rate, image_size=int(config.image_size),
               preprocess=config.augment, class_names=tuple(class_names))

  def model_kwargs(self) -> dict[str, Any]:
    """The keyword arguments of `GoogLeNet`, `init_fn` and `apply_fn`."""
    return {k: getattr(self, k) for k in ('num_classes', 'variant', 'aux_logits', 'use_bn',
                                          'transform_input', 'dropout_rate',
                                          'aux_dropout_rate')}

  def build(self, **runtime):
    """The GoogLeNet; `runtime` adds options that do not change its function (dtype,
    conv_block, pool_block)."""
    return GoogLeNet(**self.model_kwargs(), **runtime)

  def replace(self, **changes) -> 'ModelSpec':
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['class_names'] = list(self.class_names)
    return d

  @classmethod
  def from_dict(cls, d: dict, where: str = 'the spec') -> 'ModelSpec':
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
  def load(cls, directory) -> 'ModelSpec':
    path = paths.path(directory) / SPEC_FILE
    if not path.exists():
      raise FileNotFoundError(
          f'{path} does not exist: {directory} is neither a training workdir nor a folder of '
          'converted weights (python -m gnet_jax.convert).')
    return cls.from_dict(json.loads(path.read_text()), where=str(path))
