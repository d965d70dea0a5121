"""train.py and train_lib: a few steps for real, device-count and process-count invariance,
config errors, what a run writes. Small: 32x32 digits, a handful of steps."""
import glob
import json
import logging
import os
import socket
import types

import jax
import numpy as np
import optax
import pytest

from configs import quickstart
from gnet_jax import ModelSpec, images, metrics, train
from gnet_jax.train import experiment, mesh
from gnet_jax.train import state as state_lib
from gnet_jax.train import steps as steps_lib
from helpers import finish, run_train, start_train

def tiny_overrides(data_dir, workdir, steps=3, batch_size=16):
  return [f'--workdir={workdir}', f'--config.data_dir={data_dir}',
          f'--config.num_train_steps={steps}', f'--config.batch_size={batch_size}',
          '--config.log_every_steps=1', f'--config.eval_every_steps={steps}']


def train_losses(workdir):
  return [r['loss'] for r in metrics.read_metrics(workdir) if r['split'] == 'train']


class Recorder(metrics.Writer):
  """A writer of one's own, as train_and_evaluate(writers=...) takes them."""

  def __init__(self):
    self.rows = []

  def write(self, step, split, scalars):
    self.rows.append({'step': step, 'split': split, **scalars})


@pytest.fixture(scope='module')
def short_run(digits_data_dir, tmp_path_factory):
  """Three steps of the quickstart recipe in this process, steps 2-3 profiled."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = quickstart.get_config()
  config.data_dir = digits_data_dir
  config.num_train_steps = 3
  config.batch_size = 16
  config.log_every_steps = 1
  config.eval_every_steps = 3
  config.profile_steps = '2,3'
  recorder = Recorder()
  messages = logging.getLogger()
  handler = logging.Handler()
  handler.emit = lambda record: recorder.messages.append(record.getMessage())
  recorder.messages, level = [], messages.level
  messages.addHandler(handler)
  messages.setLevel(logging.INFO)
  try:
    state = train.train_and_evaluate(config, workdir, writers=[recorder])
  finally:
    messages.removeHandler(handler)
    messages.setLevel(level)
  return workdir, state, recorder


def test_a_few_steps_write_metrics_events_and_curves(short_run):
  workdir, state, _ = short_run
  assert int(state.step) == 3
  records = metrics.read_metrics(workdir)
  rows = [r for r in records if r['split'] == 'train']
  assert [r['step'] for r in rows] == [1, 2, 3]
  for r in rows:
    assert set(r) >= {'step', 'split', 'loss', 'top1', 'top5', 'images_per_sec', 'lr'}
    assert np.isfinite(r['loss'])
  (evaluation,) = [r for r in records if r['split'] == 'eval']
  assert evaluation['count'] == 364  # every test digit, exactly once
  assert 0 <= evaluation['top1'] <= evaluation['top5'] <= 1
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  assert os.path.getsize(os.path.join(workdir, 'curves.png')) > 0
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['num_train_steps'] == 3


@pytest.mark.slow
def test_several_steps_per_call_train_the_same(short_run, digits_data_dir, tmp_path):
  """config.steps_per_execution changes how steps are dispatched, not what they compute:
  short_run's three steps again, as calls of 2 and 1 steps of up to 3 (logged at 2 and 3)."""
  workdir, state, _ = short_run
  config = quickstart.get_config()
  config.data_dir = digits_data_dir
  config.num_train_steps, config.batch_size, config.eval_every_steps = 3, 16, 3
  config.steps_per_execution, config.log_every_steps = 3, 2
  chunked = train.train_and_evaluate(config, str(tmp_path))
  assert int(chunked.step) == 3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               chunked.params, state.params)
  ours, theirs = metrics.read_metrics(str(tmp_path)), metrics.read_metrics(workdir)
  rows = [r for r in theirs if r['split'] == 'train']
  assert [(r['split'], r['step']) for r in ours] == [('train', 2), ('train', 3), ('eval', 3)]
  for name in ('loss', 'top1', 'top5'):
    np.testing.assert_allclose(
        [r[name] for r in ours],
        [np.mean([r[name] for r in rows[:2]]), rows[2][name],
         next(r for r in theirs if r['split'] == 'eval')[name]], rtol=1e-5)


def test_tensorboard_events_hold_the_scalars(short_run):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  workdir, _, _ = short_run
  tags = set()
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  assert {'train/loss', 'train/top1', 'train/lr', 'train/images_per_sec',
          'eval/top1', 'eval/top5'} <= tags


@pytest.mark.slow
def test_extra_writers_get_every_row(short_run):
  workdir, _, recorder = short_run
  assert recorder.rows == metrics.read_metrics(workdir)


def test_profile_trace_of_the_asked_steps_names_the_train_step(short_run):
  """--config.profile_steps=2,3: a trace TensorBoard's profile plugin and Perfetto read."""
  import gzip  # pylint: disable=import-outside-toplevel
  workdir, _, _ = short_run
  (run,) = glob.glob(os.path.join(workdir, 'profile', 'plugins', 'profile', '*'))
  assert glob.glob(os.path.join(run, '*.xplane.pb'))
  (perfetto,) = glob.glob(os.path.join(run, '*perfetto_trace.json.gz'))
  trace = json.loads(gzip.decompress(open(perfetto, 'rb').read()))
  names = {e.get('name', '') for e in trace['traceEvents']}
  assert any('train_steps' in n for n in names), sorted(names)[:50]


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_losses(digits_data_dir, tmp_path):
  one = start_train(tiny_overrides(digits_data_dir, tmp_path / 'one'), devices=1)
  eight = start_train(tiny_overrides(digits_data_dir, tmp_path / 'eight'), devices=8)
  finish(one)
  out = finish(eight)
  assert 'on 8 device(s)' in out
  np.testing.assert_allclose(train_losses(tmp_path / 'eight'), train_losses(tmp_path / 'one'),
                             rtol=2e-4)


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(digits_data_dir, tmp_path):
  port = free_port()
  # One call of three steps, logged once.
  overrides = lambda workdir: tiny_overrides(digits_data_dir, workdir) + [
      '--config.log_every_steps=3', '--config.steps_per_execution=3']
  procs = [start_train(overrides(tmp_path / 'multi') + [
      f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}'])
           for i in range(2)]
  outs = [finish(p) for p in procs]
  assert 'in 2 process(es)' in outs[0]
  single = run_train(overrides(tmp_path / 'single'), devices=2)
  del single
  np.testing.assert_allclose(train_losses(tmp_path / 'multi'), train_losses(tmp_path / 'single'),
                             rtol=2e-4)


def test_check_batch_size():
  mesh.check_batch_size(256, 2, 8)
  with pytest.raises(ValueError, match=r'batch_size=100 .* 8 devices.*104'):
    mesh.check_batch_size(100, 1, 8)
  with pytest.raises(ValueError, match=r'batch_size=10 .* 3 processes.*9 or 12'):
    mesh.check_batch_size(10, 3, 3)
  with pytest.raises(ValueError, match='positive'):
    mesh.check_batch_size(0, 1, 1)


def test_unknown_config_key_is_named(tmp_path):
  result = run_train([f'--workdir={tmp_path}', '--config.batch_sizee=8'], check=False)
  assert result.returncode != 0
  assert 'batch_sizee' in result.stderr


def test_batch_that_does_not_divide_the_devices(digits_data_dir, tmp_path):
  # Stopped after every import: TensorFlow's C++ start-up notices (oneDNN's, written to
  # file descriptor 2 past Python's logging) are in train.log, not on the console.
  result = run_train(tiny_overrides(digits_data_dir, tmp_path, batch_size=12), devices=8,
                     env={'TF_CPP_MIN_LOG_LEVEL': '0'}, check=False)
  assert result.returncode != 0
  assert 'batch_size=12' in result.stderr and '8' in result.stderr
  assert 'port.cc' not in result.stdout + result.stderr
  assert 'port.cc' in (tmp_path / metrics.LOG_FILE).read_text()


def test_tensorflow_warnings_go_to_the_log_only(tmp_path, capsys):
  # TensorFlow only decodes images: its warnings are tfds's deprecation notices.
  with metrics.log_to_workdir(str(tmp_path)) as log_file:
    logging.getLogger('tensorflow').warning('From reader.py: CounterV2 is deprecated')
    logging.getLogger('absl').warning('a warning for the person training')
    logging.getLogger('tensorflow').error('an image could not be decoded')
  console = capsys.readouterr().err
  assert 'CounterV2' not in console
  assert 'person training' in console and 'could not be decoded' in console
  log = log_file.read_text()
  assert all(m in log for m in ('CounterV2', 'person training', 'could not be decoded'))


@pytest.mark.slow  # four compiles of the network
def test_uint8_images_train_and_evaluate_as_their_normalised_floats():
  """config.input_dtype='uint8': the steps normalise on the device; the same pixels handed
  over normalised as float32 give the same step to float tolerance."""
  config = quickstart.get_config()
  config.num_train_steps = 10
  exp = train.build(config, ModelSpec.from_config(config, num_classes=10), 1000)
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (1, 16, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (1, 16)).astype(np.int32)
  results = []
  for image in (pixels, np.asarray(images.normalize(pixels))):
    state, history = exp.train_steps(exp.init(), {'image': image, 'label': labels},
                                     np.int32(1))
    sums = exp.eval_step({'params': state.params, 'batch_stats': state.batch_stats},
                         {'image': image[0], 'label': labels[0], 'mask': np.ones(16, bool)})
    results.append(jax.device_get((state.params, state.batch_stats, history, sums)))
  assert results[0][2]['loss'].dtype == np.float32
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *results)


@pytest.mark.parametrize('device,dtype', [
    (dict(platform='tpu', device_kind='TPU v5 lite'), 'bfloat16'),
    (dict(platform='gpu', device_kind='NVIDIA A100-SXM4-40GB', compute_capability='8.0'),
     'bfloat16'),
    (dict(platform='gpu', device_kind='NVIDIA H100 80GB HBM3', compute_capability='9.0'),
     'bfloat16'),
    (dict(platform='gpu', device_kind='Tesla T4', compute_capability='7.5'), 'float16'),
    (dict(platform='gpu', device_kind='Tesla V100-SXM2-16GB', compute_capability='7.0'),
     'float16'),
    (dict(platform='cpu', device_kind='cpu'), 'float32'),
], ids=['tpu', 'a100', 'h100', 't4', 'v100', 'cpu'])
def test_auto_dtype_follows_the_device(device, dtype):
  chosen, why = experiment.compute_dtype('auto', [types.SimpleNamespace(**device)])
  assert chosen == dtype and why.startswith('auto')
  assert experiment.compute_dtype('float32', [types.SimpleNamespace(**device)])[0] == 'float32'
  with pytest.raises(ValueError, match='config.runtime.dtype must be one of'):
    experiment.compute_dtype('fp16', [types.SimpleNamespace(**device)])


def test_the_run_says_which_dtype_auto_chose(short_run):
  workdir, _, recorder = short_run
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['runtime']['dtype'] == 'float32'  # 'auto' on a CPU
  assert any('computing in float32 (auto: CPUs emulate' in m for m in recorder.messages)


def test_weight_decay_skips_batchnorm_and_biases():
  params = {'conv': {'kernel': np.ones((3, 3, 1, 1))},
            'bn': {'scale': np.ones(1), 'bias': np.ones(1)},
            'fc': {'kernel': np.ones((2, 2)), 'bias': np.ones(2)}}
  assert state_lib.decay_mask(params) == {'conv': {'kernel': True},
                                          'bn': {'scale': False, 'bias': False},
                                          'fc': {'kernel': True, 'bias': False}}


def test_learning_rate_schedules():
  config = quickstart.get_config()
  config.batch_size = 512
  config.base_learning_rate = 0.1
  config.warmup_epochs = 0
  config.num_train_steps = 1000
  config.lr_schedule = 'paper'
  lr = state_lib.create_learning_rate_fn(config, steps_per_epoch=10)
  assert float(lr(0)) == pytest.approx(0.2)  # scaled with the global batch
  assert float(lr(79)) == pytest.approx(0.2)
  assert float(lr(80)) == pytest.approx(0.2 * 0.96)  # 4% less every 8 epochs
  config.lr_schedule = 'cosine'
  config.warmup_epochs = 1
  lr = state_lib.create_learning_rate_fn(config, steps_per_epoch=10)
  assert float(lr(0)) == 0 and float(lr(10)) == pytest.approx(0.2)
  assert float(lr(1000)) == pytest.approx(0, abs=1e-6)


def test_aux_loss_weight_and_label_smoothing():
  logits = jax.numpy.array([[2.0, 0.0, -1.0]])
  labels = jax.numpy.array([0])
  plain = steps_lib.cross_entropy(logits, labels, 3)
  np.testing.assert_allclose(plain, optax.softmax_cross_entropy_with_integer_labels(logits, labels),
                             rtol=1e-6)
  assert float(steps_lib.cross_entropy(logits, labels, 3, 0.1)[0]) > float(plain[0])
  assert steps_lib.AUX_LOSS_WEIGHT == 0.3
