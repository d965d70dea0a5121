"""The package as other projects use it: a light import, and ModelSpec, the one
description of a model that configs, checkpoints, converted weights and predict share."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from configs import default, quickstart
from gnet_jax import GoogLeNet, ModelSpec
from gnet_jax import model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_model_import_is_light():
  """The model alone: no TensorFlow, Orbax, torch or C++ build."""
  code = ('import sys, time\n'
          'start = time.perf_counter()\n'
          'from gnet_jax import GoogLeNet, ModelSpec, apply_fn, init_fn\n'
          'took = time.perf_counter() - start\n'
          'heavy = ("tensorflow", "orbax", "torch", "gnet_jax.cpu", "gnet_jax.data",\n'
          '         "gnet_jax.checkpoint", "tensorflow_datasets")\n'
          'print(sorted(m for m in heavy if m in sys.modules), f"{took:.2f}")\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout.split()
  assert out[0] == '[]', out
  print(f'import gnet_jax (model only) took {out[1]} s')


def test_load_model_is_imported_on_first_use():
  code = ('import sys, gnet_jax\n'
          'assert "orbax.checkpoint" not in sys.modules\n'
          'gnet_jax.load_variables\n'
          'print("orbax.checkpoint" in sys.modules)\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == 'True'


def test_spec_round_trips_through_json_and_files(tmp_path):
  spec = ModelSpec(num_classes=3, variant='torchvision', aux_logits=False,
                   transform_input=True, dropout_rate=0.1, image_size=64,
                   preprocess='small', class_names=('cat', 'dog', 'owl'))
  assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
  spec.save(tmp_path)
  assert ModelSpec.load(tmp_path) == spec
  model = spec.build(dtype='bfloat16')
  assert isinstance(model, GoogLeNet) and model.num_classes == 3 and model.dtype == 'bfloat16'
  assert GoogLeNet(**spec.model_kwargs(), dtype='bfloat16') == model


def test_spec_from_a_config():
  config = quickstart.get_config()
  spec = ModelSpec.from_config(config, 10, [str(d) for d in range(10)])
  assert (spec.variant, spec.aux_logits, spec.image_size, spec.preprocess) == (
      'paper', True, 32, 'small')
  assert spec.class_names == tuple('0123456789')


def test_the_networks_options_are_declared_once():
  """GoogLeNet's option fields are ModelSpec's model fields and config.model's keys, with
  GoogLeNet's defaults; how the model runs (dtype, blocks) is in none of them."""
  options = model_lib.network_options()
  assert list(options) == ['num_classes', 'variant', 'aux_logits', 'dropout_rate',
                           'aux_dropout_rate', 'use_bn', 'transform_input']
  fields = {f.name: f.default for f in dataclasses.fields(ModelSpec)}
  assert list(fields)[:len(options)] == list(options)
  assert all(fields[k] == f.default for k, f in options.items())
  config = default.get_config()
  assert sorted(config.model) == sorted(set(options) - {'num_classes'})
  assert all(config.model[k] == options[k].default for k in config.model)
  assert sorted(config.runtime) == ['cpu_convolutions', 'dtype', 'remat']
  assert not {'dtype', 'conv_block', 'pool_block', 'inception_block'} & set(fields)


def test_aux_dropout_rate_is_settable():
  config = quickstart.get_config()
  config.model.aux_dropout_rate = 0.5
  spec = ModelSpec.from_config(config, 10)
  assert spec.aux_dropout_rate == 0.5 and spec.build().aux_dropout_rate == 0.5


def test_model_json_of_the_previous_version_loads():
  """tests/data/workdir_0.2.0/model.json: the quickstart's, as gnet_jax 0.2.0 wrote it."""
  spec = ModelSpec.load(os.path.join(ROOT, 'tests', 'data', 'workdir_0.2.0'))
  assert spec == ModelSpec.from_config(quickstart.get_config(), 10, tuple('0123456789'))


def test_spec_errors_say_what_is_wrong(tmp_path):
  with pytest.raises(ValueError, match="variant must be one of .*'resnet'"):
    ModelSpec(variant='resnet')
  with pytest.raises(ValueError, match='2 class names for 3 classes'):
    ModelSpec(num_classes=3, class_names=('a', 'b'))
  with pytest.raises(ValueError, match=r"fields this gnet_jax does not know: \['colour'\]"):
    ModelSpec.from_dict({'num_classes': 3, 'colour': 'red'})
  with pytest.raises(FileNotFoundError, match='neither a training workdir nor a folder'):
    ModelSpec.load(tmp_path)
