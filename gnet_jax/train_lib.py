"""Training and evaluation: state, optimizer, jitted steps over a device mesh, the loop.

Data parallelism is `jax.jit` over a one-axis `Mesh` ('data') spanning every device of
every process: the batch is sharded on 'data', parameters and optimizer state are
replicated, so BatchNorm statistics and gradients are over the global batch without
any `axis_name`. The steps are pure functions of (state, batch); `train_steps` runs
config.steps_per_execution of them per call.

Checkpoints (gnet_jax/checkpoint.py) hold the whole state and the metrics logged since the
last log point; a run resumes from the newest good one, and because dropout is
fold_in(rng, step) and the input pipeline starts at the restored step, a resumed run ends
with the same parameters and metrics.jsonl as an uninterrupted one. SIGTERM saves and exits
0; a non-finite loss stops the run naming the step, and no non-finite state is ever saved.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gnet_jax import checkpoint as checkpoint_lib
from gnet_jax import cpu_tuning
from gnet_jax import input_pipeline
from gnet_jax import metrics as metrics_lib
from gnet_jax import onednn
from gnet_jax.model import GoogLeNet, GoogLeNetOutputs

AUX_LOSS_WEIGHT = 0.3  # the paper's weight for each auxiliary head's loss


class TrainState(struct.PyTreeNode):
  """Everything a run needs to continue: a checkpoint is exactly this."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key; step k uses fold_in(rng, k), so resumes replay it
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  def apply_gradients(self, grads, batch_stats):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)


def model_kwargs(config: ml_collections.ConfigDict, num_classes: int) -> dict:
  """The GoogLeNet options that define its function (what a checkpoint's reader needs)."""
  m = config.model
  return dict(num_classes=num_classes, variant=m.variant, aux_logits=m.aux_logits,
              use_bn=m.use_bn, transform_input=m.transform_input)


CPU_CONVOLUTIONS = ('auto', 'onednn', 'xla')


def use_onednn(config: ml_collections.ConfigDict, num_devices: int) -> bool:
  """Whether the model's convolutions, max pools and BatchNorms go to oneDNN and C++
  (config.model.cpu_convolutions).

  'auto' picks oneDNN when the step runs on a single CPU device: XLA cannot split its
  calls over several (gnet_jax/onednn.py). The choice changes speed, not the function.
  """
  choice = config.model.cpu_convolutions
  if choice not in CPU_CONVOLUTIONS:
    raise ValueError(f'config.model.cpu_convolutions must be one of {CPU_CONVOLUTIONS}, '
                     f'got {choice!r}.')
  if choice == 'auto':
    return num_devices == 1 and jax.default_backend() == 'cpu'
  return choice == 'onednn'


def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 num_devices: int | None = None) -> GoogLeNet:
  """The model the config describes, for a step on `num_devices` (default: all)."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  return GoogLeNet(**model_kwargs(config, num_classes), dropout_rate=config.model.dropout_rate,
                   dtype=jnp.dtype(config.model.dtype),
                   onednn=use_onednn(config, num_devices))


# Options whose difference makes other weights unusable; num_classes and aux_logits only
# change heads, which are then initialised afresh.
MUST_MATCH = ('variant', 'use_bn', 'transform_input')


def init_from(state: TrainState, path: str, kwargs: dict, tx, sharding, writer) -> TrainState:
  """`state` with the parameters of converted weights or of another run's workdir.

  A different num_classes (or aux heads the weights lack) keeps those heads freshly
  initialised and says so; any other difference is an error naming it.
  """
  variables, source, _ = checkpoint_lib.load_model(path)
  defaults = {f.name: f.default for f in dataclasses.fields(GoogLeNet)}
  source = {**{k: defaults[k] for k in MUST_MATCH}, **source}
  differ = [f'{k}: weights {source[k]!r}, config {kwargs[k]!r} (set '
            f'--config.model.{k}={source[k]})' for k in MUST_MATCH if source[k] != kwargs[k]]
  if differ:
    raise ValueError(f'config.init_from={path!r} does not fit this model: '
                     + '; '.join(differ) + '.')
  fresh = {'params': state.params, 'batch_stats': state.batch_stats}
  merged, kept_fresh = checkpoint_lib.merge_matching(fresh, variables)
  heads = ('classifier', 'aux_4a', 'aux_4d')
  unexpected = [p for p in kept_fresh if not any(f"['{h}']" in p for h in heads)]
  if unexpected:
    raise ValueError(f'config.init_from={path!r}: no matching weights for {unexpected[:5]}.')
  merged = jax.device_put(merged, sharding.replicated)
  if kept_fresh:
    writer.log(f"Initialised from {path}; freshly initialised (num_classes "
               f"{source.get('num_classes')} -> {kwargs['num_classes']}, or aux heads the "
               f"weights lack): {sorted({p.split(']')[1] + ']' for p in kept_fresh})}.")
  else:
    writer.log(f'Initialised from {path}: every parameter loaded.')
  return state.replace(params=merged['params'], batch_stats=merged['batch_stats'],
                       opt_state=jax.jit(tx.init, out_shardings=sharding.replicated)(
                           merged['params']))


# ---------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule
# ---------------------------------------------------------------------------------------
def create_learning_rate_fn(config, steps_per_epoch: int):
  """Base lr scaled linearly with the global batch (base_learning_rate is for 256)."""
  lr = config.base_learning_rate * config.batch_size / 256
  warmup = int(config.warmup_epochs * steps_per_epoch)
  total = config.num_train_steps
  if config.lr_schedule == 'paper':
    # "decreasing the learning rate by 4% every 8 epochs" (section 6).
    main = optax.exponential_decay(lr, transition_steps=max(1, 8 * steps_per_epoch),
                                   decay_rate=0.96, staircase=True)
  elif config.lr_schedule == 'cosine':
    main = optax.cosine_decay_schedule(lr, decay_steps=max(1, total - warmup))
  elif config.lr_schedule == 'constant':
    main = optax.constant_schedule(lr)
  else:
    raise ValueError(f"config.lr_schedule={config.lr_schedule!r}: use 'paper', 'cosine' "
                     "or 'constant'.")
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(params):
  """Weight decay on conv and dense kernels only, not on BatchNorm or biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def create_optimizer(config, learning_rate_fn) -> optax.GradientTransformation:
  chain = []
  if config.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == 'sgd':
    chain += [optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
              optax.sgd(learning_rate_fn, momentum=config.momentum, nesterov=config.nesterov)]
  elif config.optimizer == 'adamw':
    chain.append(optax.adamw(learning_rate_fn, weight_decay=config.weight_decay,
                             mask=decay_mask))
  else:
    raise ValueError(f"config.optimizer={config.optimizer!r}: use 'sgd' or 'adamw'.")
  return optax.chain(*chain)


def create_train_state(config, model: nn.Module, tx, image_size: int) -> TrainState:
  """The initial state; jit it with out_shardings to build it directly on the mesh."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  init_key, dropout_key = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = model.init(init_key, images, train=False)
  params = variables['params']
  return TrainState(step=jnp.array(0, jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                    rng=dropout_key, tx=tx)


# ---------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------
def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def topk_correct(logits, labels, k: int):
  """1.0 where the label is among the k largest logits."""
  top = jax.lax.top_k(logits, min(k, logits.shape[-1]))[1]
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def train_step(state: TrainState, batch, *, model: GoogLeNet, learning_rate_fn,
               label_smoothing: float = 0.0, skip_nonfinite: bool = False):
  """One optimizer step on a global batch; returns (new state, metrics).

  skip_nonfinite: a step whose loss or gradients are not finite leaves the parameters,
  statistics and optimizer state as they were (the step counter still advances, so the
  next step takes the next batch); metrics['skipped'] is then 1.
  """
  dropout_key = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    outputs, new_state = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        rngs={'dropout': dropout_key}, mutable=['batch_stats'])
    ce = functools.partial(cross_entropy, labels=batch['label'],
                           num_classes=model.num_classes, label_smoothing=label_smoothing)
    if isinstance(outputs, GoogLeNetOutputs):
      logits = outputs.logits
      loss = jnp.mean(ce(logits)) + AUX_LOSS_WEIGHT * (
          jnp.mean(ce(outputs.aux_4a)) + jnp.mean(ce(outputs.aux_4d)))
    else:
      logits = outputs
      loss = jnp.mean(ce(logits))
    return loss, (logits, new_state.get('batch_stats', {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  new_state = state.apply_gradients(grads, batch_stats)
  metrics = {
      'loss': loss,
      'top1': jnp.mean(topk_correct(logits, batch['label'], 1)),
      'top5': jnp.mean(topk_correct(logits, batch['label'], 5)),
      'lr': learning_rate_fn(state.step),
  }
  if skip_nonfinite:
    ok = jnp.isfinite(loss) & jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state,
                             state).replace(step=new_state.step)
    metrics['skipped'] = 1.0 - ok.astype(jnp.float32)
  return new_state, metrics


def train_steps(state: TrainState, batches, num_steps, *, step_fn):
  """`num_steps` (1 to K) steps of `step_fn` in one call, on the first `num_steps` of K
  stacked batches (leading axis K); returns (new state, each metric stacked over K, the
  rows from num_steps on zero).

  XLA allocates a program's temporaries afresh for each call, and on CPU the train step's
  ~850 MB of them cost ~0.35 s of page faults per call at batch 32; K steps per call
  (config.steps_per_execution) pay that once (BENCHMARKS.md, change 13).
  """
  k = jax.tree.leaves(batches)[0].shape[0]
  nth = lambda i: jax.tree.map(lambda x: x[i], batches)
  _, metrics_shape = jax.eval_shape(step_fn, state, nth(0))
  history = jax.tree.map(lambda m: jnp.zeros((k, *m.shape), m.dtype), metrics_shape)

  def body(i, carry):
    state, history = carry
    state, metrics = step_fn(state, nth(i))
    return state, jax.tree.map(lambda h, m: h.at[i].set(m), history, metrics)
  return jax.lax.fori_loop(0, num_steps, body, (state, history))


def eval_step(state: TrainState, batch, *, model: GoogLeNet):
  """Sums over the unmasked examples of a (padded) eval batch."""
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                       batch['image'], train=False)
  mask = batch['mask'].astype(jnp.float32)
  loss = cross_entropy(logits, batch['label'], model.num_classes)
  return {
      'loss': jnp.sum(loss * mask),
      'top1': jnp.sum(topk_correct(logits, batch['label'], 1) * mask),
      'top5': jnp.sum(topk_correct(logits, batch['label'], 5) * mask),
      'count': jnp.sum(mask),
  }


# ---------------------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sharding:
  mesh: Mesh
  data: NamedSharding  # batch axis split over every device of every process
  stacked: NamedSharding  # K stacked batches (train_steps): their batch axis split
  replicated: NamedSharding

  @classmethod
  def create(cls, devices=None) -> 'Sharding':
    devices = np.asarray(devices if devices is not None else jax.devices())
    mesh = Mesh(devices.reshape(-1), ('data',))
    return cls(mesh, NamedSharding(mesh, P('data')), NamedSharding(mesh, P(None, 'data')),
               NamedSharding(mesh, P()))

  def global_batch(self, local_batch: dict) -> dict:
    """This process's slice of the batch -> global arrays sharded on 'data'."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.data, x),
                        local_batch)

  def stacked_batches(self, local_batches: list[dict], k: int) -> dict:
    """This process's slices of up to k batches -> k stacked global batches (train_steps's
    input); fewer than k are padded with copies of the last, which train_steps skips."""
    padded = local_batches + local_batches[-1:] * (k - len(local_batches))
    return jax.tree.map(
        lambda *xs: jax.make_array_from_process_local_data(self.stacked, np.stack(xs)),
        *padded)


def compile_steps(config, model, tx, learning_rate_fn, sharding: Sharding, image_size: int):
  """(init, train_steps, eval_step), jitted onto the mesh; the state is donated.

  train_steps(state, batches, num_steps) takes config.steps_per_execution stacked batches
  (Sharding.stacked_batches) and runs the first num_steps of them.
  """
  init = jax.jit(functools.partial(create_train_state, config, model, tx, image_size),
                 out_shardings=sharding.replicated)
  state_sharding = jax.tree.map(lambda _: sharding.replicated, jax.eval_shape(init))
  step_fn = functools.partial(train_step, model=model, learning_rate_fn=learning_rate_fn,
                              label_smoothing=config.label_smoothing,
                              skip_nonfinite=config.skip_nonfinite_steps)
  train = jax.jit(functools.partial(train_steps, step_fn=step_fn),
                  in_shardings=(state_sharding, sharding.stacked, sharding.replicated),
                  out_shardings=(state_sharding, sharding.replicated), donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, model=model),
                     in_shardings=(state_sharding, sharding.data),
                     out_shardings=sharding.replicated)
  return init, train, evaluate


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------
def evaluate(eval_fn, state, config, sharding: Sharding) -> dict[str, float]:
  """Loss, top-1 and top-5 over the whole eval split, every example counted once."""
  totals = None
  for batch in input_pipeline.create_eval_iterator(config):
    sums = eval_fn(state, sharding.global_batch(batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'loss': float(totals['loss']) / count, 'top1': float(totals['top1']) / count,
          'top5': float(totals['top5']) / count, 'count': int(count)}


def resolve_steps(config, info) -> tuple[int, int]:
  """(steps per epoch, total train steps); num_train_steps > 0 overrides num_epochs."""
  steps_per_epoch = max(1, info.num_train_examples // config.batch_size)
  if config.num_train_steps > 0:
    return steps_per_epoch, config.num_train_steps
  return steps_per_epoch, int(round(config.num_epochs * steps_per_epoch))


def truncate_metrics(workdir: str, step: int) -> int:
  """Drops metrics.jsonl lines of steps after `step` (and a torn last line); returns how many.

  A resumed run rewrites the steps after its checkpoint, so they must not stay twice.
  """
  path = os.path.join(workdir, metrics_lib.METRICS_FILE)
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        dropped += line.strip() != ''
        continue
      if record.get('step', 0) > step:
        dropped += 1
      else:
        kept.append(json.dumps(record) + '\n')
  if dropped:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  return dropped


class _Preemption:
  """SIGTERM (how clusters announce preemption) sets a flag the loop checks after each call.

  With several processes JAX's own preemption service (`reached_preemption_sync_point`,
  through Orbax) decides instead, so that every process stops at the same step.
  """

  def __init__(self, checkpointer, install: bool):
    self.checkpointer = checkpointer
    self.signalled = False
    self._previous = None
    if install:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread: no handler, the default applies
        self._previous = None

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.signalled = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self.checkpointer.reached_preemption(step)
    return self.signalled

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _first_bad_step(window: list[dict], first_step: int):
  for i, m in enumerate(window):
    if not np.isfinite(m['loss']) and not m.get('skipped', 0):
      return first_step + i, float(m['loss'])
  return None


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


@contextlib.contextmanager
def _persistent_cache_hits():
  """Yields a list that gains an entry for each executable JAX loads from its persistent
  compilation cache (train.py --compilation_cache_dir) inside the block."""
  hits = []

  def listener(event, **_):
    if event == '/jax/compilation_cache/cache_hits':
      hits.append(event)
  jax.monitoring.register_event_listener(listener)
  try:
    yield hits
  finally:
    jax.monitoring.unregister_event_listener(listener)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains GoogLeNet as the config says, evaluating on the way; returns the final state.

  Resumes from the newest good checkpoint in `workdir/checkpoints` if there is one, and
  then continues exactly as an uninterrupted run would (same batches, dropout, metrics).
  """
  info = input_pipeline.get_dataset_info(config)
  input_pipeline.check_batch_size(config.batch_size, jax.process_count(), jax.device_count())
  steps_per_epoch, num_steps = resolve_steps(config, info)
  if config.steps_per_execution < 1:
    raise ValueError('config.steps_per_execution (train steps per call) must be >= 1, got '
                     f'{config.steps_per_execution}.')
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.num_train_steps = num_steps
  model = create_model(config, info.num_classes)
  learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch)
  tx = create_optimizer(config, learning_rate_fn)
  sharding = Sharding.create()
  init, train_fn, eval_fn = compile_steps(config, model, tx, learning_rate_fn, sharding,
                                          config.image_size)
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  writer.write_config(config)
  if jax.process_index() == 0:
    checkpoint_lib.write_run_info(workdir, model_kwargs(config, info.num_classes),
                                  info.class_names, config.image_size, config.augment)
  writer.log(f'{info.num_train_examples} train / {info.num_eval_examples} eval examples, '
             f'{info.num_classes} classes; {num_steps} steps of global batch '
             f'{config.batch_size} on {jax.device_count()} device(s) in '
             f'{jax.process_count()} process(es); convolutions, max pools and '
             f"BatchNorms on {'oneDNN' if model.onednn and onednn.available() else 'XLA'}.")

  checkpointer = checkpoint_lib.Checkpointer(
      workdir, max_to_keep=config.checkpoint_max_to_keep,
      keep_best=config.checkpoint_keep_best,
      async_save=config.checkpoint_async)
  run_fields = checkpoint_lib.run_fields(config, info.num_classes)
  abstract_state = jax.eval_shape(init)
  restored = checkpointer.restore_latest(
      checkpoint_lib.abstract_tree(abstract_state, sharding.replicated), run_fields)
  window = []  # train metrics (host) of the steps since the last log point...
  pending = []  # ...and those still on the device: (stacked metrics, number of steps)
  if restored is None:
    state = init()
    start_step = 0
    if config.init_from:
      state = init_from(state, config.init_from, model_kwargs(config, info.num_classes), tx,
                        sharding, writer)
  else:
    tree, meta, start_step = restored
    state = abstract_state.replace(**tree)
    window = [{k: np.float32(v) for k, v in m.items()} for m in meta.get('train_window', [])]
    writer.log(f'Resumed from checkpoint {checkpointer.directory}/{start_step} '
               f'(step {start_step} of {num_steps}).')
  if jax.process_index() == 0:
    truncate_metrics(workdir, start_step)

  ckpt_every = config.checkpoint_every_steps
  preemption = _Preemption(checkpointer, install=jax.process_count() == 1)

  def fetch_window():
    nonlocal window, pending
    for history, n in jax.device_get(pending):  # the only host sync on the train path
      window += [{k: v[i] for k, v in history.items()} for i in range(n)]
    pending = []

  def save(step, eval_metrics=None):
    fetch_window()
    bad = _first_bad_step(window, step - len(window) + 1)
    if bad is not None:
      raise _nan_error(bad[0], bad[1], checkpointer)
    if not bool(_all_finite((state.params, state.batch_stats, state.opt_state))):
      raise _nan_error(step, None, checkpointer)
    meta = {'format': checkpoint_lib.FORMAT_VERSION, 'run': run_fields,
            'input': {'next_batch': step, 'seed': int(config.seed),
                      'batch_size': int(config.batch_size), 'dataset': config.dataset},
            'num_train_steps': num_steps,
            'train_window': [{k: float(v) for k, v in m.items()} for m in window]}
    metrics = None
    if eval_metrics is not None:
      metrics = {checkpoint_lib.BEST_METRIC: float(eval_metrics['top1'])}
    checkpointer.save(step, state, meta, metrics)

  try:
    train_iter = input_pipeline.create_train_iterator(config, start_step=start_step)
    log_every = config.log_every_steps
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else num_steps
    k = config.steps_per_execution
    # Calls end at every log, eval and checkpoint step, so those see the state of that step.
    boundaries = [b for b in (log_every, eval_every, ckpt_every) if b > 0]
    progress = writer.progress(start_step, num_steps)
    window_start = time.perf_counter()
    step = start_step
    while step < num_steps:
      n = min(k, num_steps - step, *(b - step % b for b in boundaries))
      batches = sharding.stacked_batches([next(train_iter) for _ in range(n)], k)
      if step == start_step:
        # Compiled ahead of the first step so that the compiler's freed memory goes back
        # to the OS before the step allocates its own (a lower peak on CPU).
        start = time.perf_counter()
        with _persistent_cache_hits() as hits:
          train_fn = train_fn.lower(state, batches, np.int32(n)).compile()
        writer.log(f'Compiled the train step in {time.perf_counter() - start:.1f} s'
                   + (' (from the persistent compilation cache).' if hits else '.'))
        cpu_tuning.release_freed_host_memory()
      state, history = train_fn(state, batches, np.int32(n))
      pending.append((history, n))
      step += n
      progress.update(n)
      if step % log_every == 0 or step == num_steps:
        fetch_window()
        bad = _first_bad_step(window, step - len(window) + 1)
        if bad is not None:
          raise _nan_error(bad[0], bad[1], checkpointer)
        elapsed = time.perf_counter() - window_start
        rows = [m for m in window if not m.get('skipped', 0)]  # all, unless skipping
        summary = {k: float(np.mean([m[k] for m in rows])) for k in window[0] if rows}
        summary['lr'] = float(window[-1]['lr'])
        if 'skipped' in window[0]:
          summary['skipped'] = float(sum(m['skipped'] for m in window))
          if summary['skipped']:
            writer.log(f"Skipped {int(summary['skipped'])} step(s) with a non-finite loss "
                       f'or gradient among steps {step - len(window) + 1}-{step}.')
        summary['images_per_sec'] = len(window) * config.batch_size / elapsed
        writer.write(step, 'train', summary)
        progress.set_postfix(loss=f"{summary.get('loss', float('nan')):.3f}",
                             img_s=f"{summary['images_per_sec']:.0f}")
        window, window_start = [], time.perf_counter()
      eval_metrics = None
      if step % eval_every == 0 or step == num_steps:
        eval_metrics = evaluate(eval_fn, state, config, sharding)
        writer.write(step, 'eval', eval_metrics)
        progress.write(f"step {step}: eval top1 {eval_metrics['top1']:.4f} "
                       f"top5 {eval_metrics['top5']:.4f} loss {eval_metrics['loss']:.4f} "
                       f"({eval_metrics['count']} examples)")
        window_start = time.perf_counter()  # eval time is not train throughput
      # Each step is offered to the preemption check, as multi-process JAX expects.
      preempted = any(preemption.reached(s) for s in range(step - n + 1, step + 1))
      if (preempted or step == num_steps or eval_metrics is not None
          or (ckpt_every > 0 and step % ckpt_every == 0)):
        save(step, eval_metrics)
      if preempted:
        checkpointer.wait()
        progress.close()
        writer.log(f'Preempted (SIGTERM) at step {step} of {num_steps}: checkpoint '
                   f'{checkpointer.directory}/{step} is written; exiting. Run the same '
                   'command again to resume.')
        break
    progress.close()
    checkpointer.wait()
  finally:
    preemption.restore()
    checkpointer.close()
  writer.close()
  return state


def _nan_error(step: int, loss, checkpointer) -> FloatingPointError:
  checkpointer.wait()
  good = checkpointer.latest_step()
  kept = (f'the last good checkpoint (step {good}) in {checkpointer.directory} is untouched'
          if good is not None else 'no checkpoint was written')
  what = (f'Non-finite training loss ({loss}) at step {step}' if loss is not None else
          f'The parameters or optimizer state became non-finite by step {step}')
  return FloatingPointError(
      f'{what}; stopping, {kept}. Lower the learning rate, clip gradients '
      '(--config.grad_clip_norm) or check the data.')
