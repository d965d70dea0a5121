"""Fine-tuning from converted weights (--config.init_from), and using a trained workdir:
predict and export read its checkpoint, class names and preprocessing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart
from gnet_jax import ModelSpec, checkpoint, convert, export, init_fn, predict

pytestmark = pytest.mark.slow

CONVERTED = dict(variant='torchvision', aux_logits=True, transform_input=True)


@pytest.fixture(scope='module')
def converted_dir(tmp_path_factory):
  """torchvision-variant ImageNet-shaped weights (1000 classes), as convert writes them."""
  variables = jax.jit(lambda x: init_fn(jax.random.key(3), x, **CONVERTED))(
      jnp.zeros((1, 32, 32, 3)))
  out = tmp_path_factory.mktemp('converted')
  convert.save_converted(variables, ModelSpec(num_classes=1000, **CONVERTED), out)
  return str(out), variables


def finetune_config(data_dir, init_from, **model):
  config = quickstart.get_config()
  config.data_dir = data_dir
  config.init_from = init_from
  config.num_train_steps = 1
  config.batch_size = 16
  config.base_learning_rate = 0.0  # the loaded weights stay exactly as loaded
  config.checkpoint_async = False
  config.model.variant = 'torchvision'
  config.model.transform_input = True
  config.model.update(model)
  return config


@pytest.fixture(scope='module')
def finetuned(digits_data_dir, converted_dir, tmp_path_factory):
  from gnet_jax import train  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path_factory.mktemp('finetuned'))
  state = train.train_and_evaluate(finetune_config(digits_data_dir, converted_dir[0]),
                                   workdir)
  return workdir, state


def test_init_from_converted_weights_replaces_the_classifiers(finetuned, converted_dir, capsys):
  workdir, state = finetuned
  _, loaded = converted_dir
  np.testing.assert_array_equal(state.params['conv1']['conv']['kernel'],
                                loaded['params']['conv1']['conv']['kernel'])
  np.testing.assert_array_equal(state.params['inception_5b']['ch5x5']['conv']['kernel'],
                                loaded['params']['inception_5b']['ch5x5']['conv']['kernel'])
  assert state.params['classifier']['kernel'].shape == (1024, 10)
  assert state.params['aux_4a']['fc2']['kernel'].shape == (1024, 10)
  # aux fc1 matches in shape and is loaded; only the class-count layers are new.
  np.testing.assert_array_equal(state.params['aux_4a']['fc1']['kernel'],
                                loaded['params']['aux_4a']['fc1']['kernel'])
  del workdir, capsys


def test_init_from_names_what_differs(digits_data_dir, converted_dir, tmp_path):
  from gnet_jax import train  # pylint: disable=import-outside-toplevel
  config = finetune_config(digits_data_dir, converted_dir[0], variant='paper')
  with pytest.raises(ValueError, match="variant: weights 'torchvision', config 'paper'"):
    train.train_and_evaluate(config, str(tmp_path))


def test_predict_and_export_from_a_workdir(finetuned, converted_dir, digits_data_dir,
                                           tmp_path):
  workdir, state = finetuned
  predictor = predict.Predictor.from_checkpoint(workdir)
  assert predictor.spec.class_names == tuple(str(d) for d in range(10))
  assert (predictor.spec.image_size, predictor.spec.preprocess) == (32, 'small')
  jax.tree.map(np.testing.assert_array_equal, predictor.variables['params'], state.params)
  from gnet_jax import data  # pylint: disable=import-outside-toplevel
  config = quickstart.get_config()
  config.data_dir = digits_data_dir
  images = next(iter(data.create_eval_iterator(config)))['image'][:3]
  expected = predictor.top_k(images)
  export.main(['--checkpoint', workdir, '--out', str(tmp_path), '--format', 'stablehlo'])
  logits = np.asarray(export.load_stablehlo(str(tmp_path))(images))
  probs = np.asarray(jax.nn.softmax(logits))
  for row, top5 in zip(probs, expected):
    np.testing.assert_allclose([p for _, p in top5], np.sort(row)[::-1][:5], rtol=1e-4)
  variables, spec = checkpoint.load_model(workdir)
  assert spec == predictor.spec and spec.num_classes == 10 and spec.image_size == 32
  # One on-disk model format: the workdir's model.json round-trips, as the converted one.
  assert ModelSpec.load(workdir) == spec
  assert ModelSpec.load(converted_dir[0]).variant == 'torchvision'
  del variables
