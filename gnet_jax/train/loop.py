"""The training loop: `train_and_evaluate(config, workdir)`.

The run is built once (`_Run.__init__`: data source, spec, experiment, checkpoints,
writers), then each pass of the loop runs one jitted call of up to
config.steps_per_execution steps, ending at every log, eval and checkpoint step, where
the window of train metrics is logged, the whole eval split evaluated, or the state
saved (asynchronously).

Checkpoints hold the whole state and the metrics logged since the last log point; a run
resumes from the newest good one, and because dropout is fold_in(rng, step) and the
input pipeline starts at the restored step, a resumed run ends with the same parameters
and metrics.jsonl as an uninterrupted one. SIGTERM saves and exits 0; a non-finite loss
stops the run naming the step, and no non-finite state is ever saved.
"""
from __future__ import annotations

import contextlib
import signal
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from gnet_jax import checkpoint as checkpoint_lib
from gnet_jax import data, faults, metrics, paths
from gnet_jax.spec import ModelSpec
from gnet_jax.train import experiment, finetune, mesh
from gnet_jax.train.state import TrainState


class _Window:
  """Train metrics of the steps since the last log point: those of calls still on the
  device (`add`) until `fetch` brings them to the host, the only sync on the train path."""

  def __init__(self, rows=()):
    # float32, as fetched: a resumed window averages exactly as the uninterrupted one.
    self.rows = [{k: np.float32(v) for k, v in r.items()} for r in rows]
    self._pending = []  # (stacked metrics, number of steps)
    self.started = time.perf_counter()

  def add(self, history, num_steps: int) -> None:
    self._pending.append((history, num_steps))

  def fetch(self) -> None:
    for history, n in jax.device_get(self._pending):
      self.rows += [{k: np.float32(v[i]) for k, v in history.items()} for i in range(n)]
    self._pending = []

  def first_bad(self, last_step: int):
    """(step, loss) of the first non-finite loss not skipped, or None."""
    first = last_step - len(self.rows) + 1
    for i, m in enumerate(self.rows):
      if not np.isfinite(m['loss']) and not m.get('skipped', 0):
        return first + i, float(m['loss'])
    return None

  def summary(self, batch_size: int) -> dict:
    """Means over the window's steps (those not skipped), the last lr, the throughput."""
    rows = [m for m in self.rows if not m.get('skipped', 0)]
    out = {k: float(np.mean([m[k] for m in rows])) for k in self.rows[0] if rows}
    out['lr'] = float(self.rows[-1]['lr'])
    if 'skipped' in self.rows[0]:
      out['skipped'] = float(sum(m['skipped'] for m in self.rows))
    out['images_per_sec'] = len(self.rows) * batch_size / (time.perf_counter() - self.started)
    return out

  def as_json(self) -> list[dict]:
    return [{k: float(v) for k, v in m.items()} for m in self.rows]


class _Preemption:
  """SIGTERM (how clusters announce preemption) sets a flag the loop checks after each call.

  With several processes JAX's own preemption service (through Orbax) decides instead,
  so that every process stops at the same step.
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


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def evaluate(exp: experiment.Experiment, variables, config, source) -> dict[str, float]:
  """Loss, top-1 and top-5 of `variables` ({'params', 'batch_stats'}) over the whole eval
  split, every example counted once."""
  totals = None
  for batch in data.create_eval_iterator(config, source=source):
    sums = exp.eval_step(variables, exp.sharding.global_batch(batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'loss': float(totals['loss']) / count, 'top1': float(totals['top1']) / count,
          'top5': float(totals['top5']) / count, 'count': int(count)}


class _Profiler:
  """A jax.profiler trace of steps first..last (config.profile_steps 'first,last', as
  logged: step n is the n-th batch) in WORKDIR/profile, for TensorBoard's profile plugin
  (`tensorboard --logdir WORKDIR`) and Perfetto (its perfetto_trace.json.gz). With
  profile_steps '' every method does nothing."""

  def __init__(self, steps: str, workdir, num_steps: int):
    self.active = False
    self.first = None
    if not steps:
      return
    try:
      self.first, self.last = (int(s) for s in steps.split(','))
    except ValueError:
      raise ValueError(f"config.profile_steps={steps!r}: give 'first,last', e.g. '10,12' "
                       "(or '' for no profile).") from None
    if not 1 <= self.first <= self.last <= num_steps:
      raise ValueError(f'config.profile_steps={steps!r}: need 1 <= first <= last <= '
                       f'{num_steps} (the run\'s steps).')
    self.target = paths.path(workdir) / 'profile'
    # The profiler writes local files; an object-store workdir gets a copy at the end.
    self.local = (self.target if not paths.is_remote(self.target) else
                  paths.path(tempfile.mkdtemp(prefix='gnet_jax_profile_')))

  def boundaries(self) -> tuple[int, ...]:
    """Steps where train calls must end: the trace covers whole calls."""
    return () if self.first is None else (self.first - 1, self.last)

  def annotate(self, step: int):
    return jax.profiler.StepTraceAnnotation('train', step_num=step) if self.active else (
        contextlib.nullcontext())

  def before_call(self, step: int) -> None:
    if self.first is not None and step == self.first - 1:
      jax.profiler.start_trace(str(self.local), create_perfetto_trace=True)
      self.active = True

  def after_call(self, step: int, state, log) -> None:
    if not (self.active and step >= self.last):
      return
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.active = False
    if self.local != self.target:
      paths.move(self.local, self.target)
    log(f'Profiled steps {self.first}-{self.last} into {self.target} (TensorBoard: '
        f'tensorboard --logdir {self.target.parent}, Profile tab; Perfetto: '
        'perfetto_trace.json.gz at https://ui.perfetto.dev).')


class _Run:
  """One call of train_and_evaluate: what it built, and the named pieces of its loop."""

  def __init__(self, config, workdir, writers=()):
    self.workdir = paths.path(workdir)
    self.lead = jax.process_index() == 0
    self.source = data.build_source(config)  # built once: folders are scanned once
    info = data.dataset_info(self.source, config)
    mesh.check_batch_size(config.batch_size, jax.process_count(), jax.device_count())
    self.spec = ModelSpec.from_config(config, info.num_classes, info.class_names)
    self.exp = experiment.build(config, self.spec, info.num_train_examples)
    self.config = self.exp.config
    if self.lead:
      self.workdir.mkdir(parents=True, exist_ok=True)
      metrics.write_config(self.config, self.workdir)
      self.spec.save(self.workdir)
    self.info = info
    self.extra_writers = list(writers)
    self.profiler = _Profiler(self.config.get('profile_steps', ''), self.workdir,
                              self.exp.num_steps)
    self.checkpointer = checkpoint_lib.Checkpointer(
        self.workdir, max_to_keep=self.config.checkpoint_max_to_keep,
        keep_best=self.config.checkpoint_keep_best, async_save=self.config.checkpoint_async)
    self.run_fields = checkpoint_lib.run_fields(self.config, self.spec)

  def restore_or_init(self) -> tuple[TrainState, int, list]:
    """(state, first step, restored train window): the newest good checkpoint's, or new."""
    abstract = self.exp.abstract_state()
    restored = self.checkpointer.restore_latest(
        checkpoint_lib.abstract_tree(abstract, self.exp.sharding.replicated), self.run_fields)
    if restored is None:
      return self.exp.init(), 0, []
    tree, meta, step = restored
    return abstract.replace(**tree), step, meta['train_window']

  def nan_error(self, step: int, loss) -> FloatingPointError:
    self.checkpointer.wait()
    good = self.checkpointer.latest_step()
    kept = (f'the last good checkpoint (step {good}) in {self.checkpointer.directory} is '
            'untouched' if good is not None else 'no checkpoint was written')
    what = (f'Non-finite training loss ({loss}) at step {step}' if loss is not None else
            f'The parameters or optimizer state became non-finite by step {step}')
    return FloatingPointError(
        f'{what}; stopping, {kept}. Lower the learning rate, clip gradients '
        '(--config.grad_clip_norm) or check the data.')

  def check_finite(self, window: _Window, step: int, state=None) -> None:
    """FloatingPointError at the first non-finite loss of the window (and, given `state`,
    if any parameter or statistic is non-finite): nothing non-finite is ever saved."""
    window.fetch()
    bad = window.first_bad(step)
    if bad is not None:
      raise self.nan_error(*bad)
    if state is not None and not bool(_all_finite(checkpoint_lib.state_to_tree(state))):
      raise self.nan_error(step, None)

  def log_train(self, writers, window: _Window, step: int) -> None:
    self.check_finite(window, step)
    summary = window.summary(self.config.batch_size)
    if summary.get('skipped'):
      writers.log(f"Skipped {int(summary['skipped'])} step(s) with a non-finite loss or "
                  f'gradient among steps {step - len(window.rows) + 1}-{step}.')
    writers.write(step, 'train', summary)

  def save(self, state, window: _Window, step: int, eval_metrics=None) -> None:
    self.check_finite(window, step, state)
    scores = None if eval_metrics is None else {
        checkpoint_lib.BEST_METRIC: float(eval_metrics['top1'])}
    self.checkpointer.save(step, checkpoint_lib.state_to_tree(state), self.run_fields,
                           window.as_json(), scores)

  def compile(self, state, batches, n: int, writers):
    compiled, seconds, cached = self.exp.compile_train_steps(state, batches, n)
    writers.log(f'Compiled the train step in {seconds:.1f} s'
                + (' (from the persistent compilation cache).' if cached else '.'))
    return compiled

  def call_lengths(self, step: int):
    """Steps in the call starting at `step`: calls end at log, eval and checkpoint steps,
    and where a profile starts and ends."""
    c = self.config
    bounds = [b for b in (c.log_every_steps, self.eval_every, c.checkpoint_every_steps)
              if b > 0]
    marks = [m - step for m in self.profiler.boundaries() if m > step]
    return min(c.steps_per_execution, self.exp.num_steps - step,
               *(b - step % b for b in bounds), *marks)

  def evaluate(self, writers, state, step: int):
    """Evaluates the state's variables ('eval') and, with config.ema_decay, their EMA
    ('eval_ema'); returns the former's metrics (the best checkpoint is by these)."""
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    eval_metrics = evaluate(self.exp, variables, self.config, self.source)
    writers.write(step, 'eval', eval_metrics)
    if state.ema is not None:
      writers.write(step, 'eval_ema', evaluate(self.exp, state.ema, self.config, self.source))
    return eval_metrics

  @property
  def eval_every(self) -> int:
    c = self.config
    return c.eval_every_steps if c.eval_every_steps > 0 else self.exp.num_steps

  def run(self) -> TrainState:
    c, num_steps = self.config, self.exp.num_steps
    state, start_step, window_rows = self.restore_or_init()
    if self.lead:
      metrics.truncate_metrics(self.workdir, start_step)
    writers = metrics.create_writers(c, self.workdir, start_step=start_step,
                                     num_steps=num_steps, enabled=self.lead,
                                     extra=self.extra_writers)
    info = self.info
    writers.log(f'{info.num_train_examples} train / {info.num_eval_examples} eval examples, '
                f'{info.num_classes} classes; {num_steps} steps of global batch '
                f'{c.batch_size} on {jax.device_count()} device(s) in '
                f'{jax.process_count()} process(es); computing in {c.runtime.dtype} '
                f'({self.exp.dtype_reason}); convolutions on {self.exp.kernels}.')
    if start_step:
      writers.log(f'Resumed from checkpoint {self.checkpointer.directory}/{start_step} '
                  f'(step {start_step} of {num_steps}).')
    elif c.init_from:
      state = finetune.init_from(state, c.init_from, self.spec, self.exp.sharding, writers.log)
    window = _Window(window_rows)
    preemption = _Preemption(self.checkpointer, install=jax.process_count() == 1)
    train_fn = None
    step = start_step
    try:
      train_iter = data.create_train_iterator(c, source=self.source, start_step=start_step)
      while step < num_steps:
        n = self.call_lengths(step)
        batches = self.exp.sharding.stacked_batches([next(train_iter) for _ in range(n)],
                                                    c.steps_per_execution)
        if train_fn is None:
          train_fn = self.compile(state, batches, n, writers)
        self.profiler.before_call(step)
        with self.profiler.annotate(step + 1):
          state, history = train_fn(state, batches, np.int32(n))
        window.add(history, n)
        step += n
        self.checkpointer.check()  # a background save that failed stops the run here
        self.profiler.after_call(step, state, writers.log)
        writers.advance(n)
        if step % c.log_every_steps == 0 or step == num_steps:
          self.log_train(writers, window, step)
          window = _Window()
        eval_metrics = None
        if step % self.eval_every == 0 or step == num_steps:
          eval_metrics = self.evaluate(writers, state, step)
          window.started = time.perf_counter()  # eval time is not train throughput
        # Each step is offered to the preemption check, as multi-process JAX expects.
        preempted = any(preemption.reached(s) for s in range(step - n + 1, step + 1))
        if (preempted or step == num_steps or eval_metrics is not None
            or (c.checkpoint_every_steps > 0 and step % c.checkpoint_every_steps == 0)):
          self.save(state, window, step, eval_metrics)
        if preempted:
          self.checkpointer.wait()
          writers.log(f'Preempted (SIGTERM) at step {step} of {num_steps}: checkpoint '
                      f'{self.checkpointer.directory}/{step} is written; exiting. Run the '
                      'same command again to resume.')
          break
      self.checkpointer.wait()
    except BaseException as e:
      preemption.restore()
      kind = faults.kind_of(e)
      # A save to a store that does not answer would hold close() for all its retries.
      if kind != 'connection':
        self.checkpointer.close(quietly=True)  # the error at hand is the one to report
      writers.close(plot=False)
      if kind and not isinstance(e, faults.StorageFault):  # the workdir's storage failed
        raise self.checkpointer.fault(e, step, 'the run could not write to its workdir') from e
      raise
    preemption.restore()
    self.checkpointer.close()
    writers.close()
    return state


def train_and_evaluate(config, workdir, writers=()) -> TrainState:
  """Trains GoogLeNet as the config says, evaluating on the way; returns the final state.

  Resumes from the newest good checkpoint in `workdir/checkpoints` if there is one, and
  then continues exactly as an uninterrupted run would (same batches, dropout, metrics).
  `workdir` may be local or on an object store (gs://bucket/run). `writers` are
  `gnet_jax.metrics.Writer`s that get every row beside the run's own (process 0 only).
  """
  return _Run(config, workdir, writers).run()
