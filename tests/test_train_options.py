"""The trainer's options, at the level of one jitted step: gradient accumulation, weight
EMA, float16 with a dynamic loss scale, pluggable writers (W&B offline), and NNX interop.
Each is off by default and then changes nothing (the other tests run with them off).
Each test compiles the whole network at least once, so all but the W&B one are `slow`."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import quickstart
from gnet_jax import GoogLeNet, ModelSpec, apply_fn, init_fn, metrics, train

NO_BN = dict(use_bn=False, aux_logits=False, dropout_rate=0.0)


def config_for(**overrides):
  config = quickstart.get_config()
  config.update(dict(num_train_steps=100, lr_schedule='constant', warmup_epochs=0,
                     label_smoothing=0.0, steps_per_execution=2))
  config.model.update(dict(use_bn=False, aux_logits=False, dropout_rate=0.0))
  config.runtime.cpu_convolutions = 'xla'
  config.update(overrides)
  return config


def experiment(config):
  return train.build(config, ModelSpec.from_config(config, 10), num_train_examples=1600)


def batches(exp, images, labels, k):
  per = len(images) // k
  local = [{'image': images[i * per:(i + 1) * per], 'label': labels[i * per:(i + 1) * per]}
           for i in range(k)]
  return exp.sharding.stacked_batches(local, exp.config.steps_per_execution)


@pytest.fixture(scope='module')
def data16():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
          rng.integers(0, 10, 16).astype(np.int32))


@pytest.mark.slow  # compiles the whole network
def test_accumulating_two_batches_of_8_equals_one_batch_of_16(data16):
  images, labels = data16
  accumulated = experiment(config_for(batch_size=8, grad_accum_steps=2))
  whole = experiment(config_for(batch_size=16, steps_per_execution=1))
  start = accumulated.init()
  jax.tree.map(np.testing.assert_array_equal, start.params, whole.init().params)
  # First half of the cycle: gradients accumulate, the parameters do not move yet.
  half, _ = accumulated.train_steps(start, batches(accumulated, images[:8], labels[:8], 1),
                                    np.int32(1))
  jax.tree.map(np.testing.assert_array_equal, half.params, whole.init().params)
  state, history = accumulated.train_steps(accumulated.init(),
                                           batches(accumulated, images, labels, 2), np.int32(2))
  reference, _ = whole.train_steps(whole.init(), batches(whole, images, labels, 1), np.int32(1))
  assert int(state.step) == 2 and int(reference.step) == 1
  moved = [float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(whole.init().params))]
  assert max(moved) > 1e-4  # the update happened
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-7),
               state.params, reference.params)
  # Same lr (base lr x 16 / 256) and the same update count in the schedule.
  np.testing.assert_allclose(history['lr'][:2], [0.1 * 16 / 256] * 2, rtol=1e-6)


@pytest.mark.slow  # compiles the whole network
def test_ema_is_the_running_average_of_parameters_and_statistics(data16):
  images, labels = data16
  config = config_for(batch_size=8, ema_decay=0.75, steps_per_execution=1)
  config.model.use_bn = True
  exp = experiment(config)
  state = exp.init()
  ema = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  jax.tree.map(np.testing.assert_array_equal, state.ema, ema)  # (train_steps donates state)
  for i in range(2):
    state, _ = exp.train_steps(state, batches(exp, images[8 * i:8 * i + 8],
                                              labels[8 * i:8 * i + 8], 1), np.int32(1))
    ema = jax.tree.map(lambda e, p: 0.75 * e + 0.25 * p, ema,
                       jax.device_get({'params': state.params,
                                       'batch_stats': state.batch_stats}))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               state.ema, ema)
  assert exp.config.ema_decay == 0.75
  with pytest.raises(ValueError, match='ema_decay must be in'):
    experiment(config_for(ema_decay=1.0)).init()


@pytest.mark.slow  # compiles the whole network
def test_float16_overflow_halves_the_scale_and_skips_the_step(data16):
  images, labels = data16
  config = config_for(batch_size=8, steps_per_execution=1)
  config.runtime.dtype = 'float16'
  exp = experiment(config)
  state = exp.init()
  assert float(state.loss_scale['scale']) == 2.0 ** 15
  before = jax.device_get(state.params)  # (train_steps donates the state)
  huge = images[:8] * 1e5  # beyond float16's 65,504 in the first convolution
  state, m = exp.train_steps(state, batches(exp, huge, labels[:8], 1), np.int32(1))
  assert float(m['skipped'][0]) == 1 and int(state.step) == 1
  assert float(state.loss_scale['scale']) == 2.0 ** 14
  jax.tree.map(np.testing.assert_array_equal, state.params, before)  # the step was skipped
  state, m = exp.train_steps(state, batches(exp, images[:8], labels[:8], 1), np.int32(1))
  assert float(m['skipped'][0]) == 0 and np.isfinite(float(m['loss'][0]))
  assert int(state.loss_scale['good_steps']) == 1 and float(m['loss_scale'][0]) == 2.0 ** 14
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype('float32')}
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, before))
  assert any(moved)


@pytest.mark.slow
def test_float16_training_converges_on_digits_as_float32_does(digits_data_dir, tmp_path):
  """The quickstart recipe in float16 (what config.runtime.dtype 'auto' picks on a T4;
  emulated on CPU, hence few steps) and in float32: the loss scale is logged, the loss
  falls, and both learn the digits far above chance (10%), within a few points."""
  top1 = {}
  for dtype in ('float16', 'float32'):
    config = quickstart.get_config()
    config.update(dict(data_dir=digits_data_dir, num_train_steps=150, batch_size=16,
                       log_every_steps=10, warmup_epochs=0))
    config.runtime.dtype = dtype
    workdir = str(tmp_path / dtype)
    train.train_and_evaluate(config, workdir)
    records = metrics.read_metrics(workdir)
    rows = [r for r in records if r['split'] == 'train']
    assert ('loss_scale' in rows[0]) == (dtype == 'float16')
    assert all(r.get('loss_scale', 1) >= 1 for r in rows)
    assert np.mean([r['loss'] for r in rows[-3:]]) < 0.7 * rows[0]['loss']
    (evaluation,) = [r for r in records if r['split'] == 'eval']
    assert evaluation['count'] == 364
    top1[dtype] = evaluation['top1']
  assert min(top1.values()) >= 0.8 and abs(top1['float16'] - top1['float32']) <= 0.05, top1


def test_wandb_writer_offline(tmp_path, monkeypatch):
  import wandb  # pylint: disable=import-outside-toplevel  # the test extra has it
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  config = config_for(wandb_project='gnet-test')
  writer = metrics.WandbWriter(config.wandb_project, config, tmp_path)
  writer.write(1, 'train', {'loss': 2.5, 'top1': 0.25})
  writer.write(2, 'eval', {'loss': 1.5, 'top1': 0.5, 'top5': 0.9, 'count': 364})
  assert writer.run.summary['train/loss'] == 2.5  # step 1 is committed once step 2 comes
  assert writer.run.config['wandb_project'] == 'gnet-test'  # the run's config is logged
  writer.close()
  (log,) = (tmp_path / 'wandb').glob('offline-run-*/run-*.wandb')  # `wandb sync` uploads it
  # wandb's own service process writes the file; on a busy machine it may lag `finish`.
  deadline = time.monotonic() + 120
  while not (b'train/loss' in log.read_bytes() and b'eval/top1' in log.read_bytes()):
    assert time.monotonic() < deadline, log.read_bytes()[:200]
    time.sleep(0.5)
  assert wandb.run is None  # finished


@pytest.mark.slow  # compiles the whole network
def test_nnx_bridge_trains_a_step_and_gives_apply_fns_logits():
  """The README's NNX snippet: GoogLeNet wrapped for NNX, one nnx.Optimizer step, and the
  same logits as apply_fn on the same variables."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  labels = jnp.arange(4) % 10
  # --- README: NNX interop ---
  model = nnx.bridge.ToNNX(GoogLeNet(num_classes=10),
                           rngs=nnx.Rngs(params=0, dropout=1)).lazy_init(images)
  optimizer = nnx.Optimizer(model, optax.sgd(0.01, momentum=0.9), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, images, labels):
    def loss_fn(model):
      # train=True: dropout, aux heads, and BatchNorm statistics updated in place.
      outputs = model(images, train=True, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(outputs.logits, labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  loss = train_step(model, optimizer, images, labels)
  logits = model(images)  # eval mode
  # --- end ---
  assert np.isfinite(float(loss))
  variables = {'params': nnx.state(model, nnx.Param).to_pure_dict(),
               'batch_stats': nnx.state(model, nnx.BatchStat).to_pure_dict()}
  np.testing.assert_allclose(logits, apply_fn(variables, images, num_classes=10),
                             rtol=1e-5, atol=1e-5)
  fresh = init_fn(jax.random.key(0), images, num_classes=10)
  assert jax.tree.structure(fresh) == jax.tree.structure(variables)
