"""The package as other projects use it: a light import, and ModelSpec, the one
description of a model that configs, checkpoints, converted weights and predict share."""
import json
import os
import subprocess
import sys

import pytest

from configs import quickstart
from gnet_jax import GoogLeNet, ModelSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_model_import_is_light():
  """The model alone: no TensorFlow, Orbax, torch or C++ build (README gives the time)."""
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


def test_spec_errors_say_what_is_wrong(tmp_path):
  with pytest.raises(ValueError, match="variant must be one of .*'resnet'"):
    ModelSpec(variant='resnet')
  with pytest.raises(ValueError, match='2 class names for 3 classes'):
    ModelSpec(num_classes=3, class_names=('a', 'b'))
  with pytest.raises(ValueError, match=r"fields this gnet_jax does not know: \['colour'\]"):
    ModelSpec.from_dict({'num_classes': 3, 'colour': 'red'})
  with pytest.raises(FileNotFoundError, match='neither a training workdir nor a folder'):
    ModelSpec.load(tmp_path)
