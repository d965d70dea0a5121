"""Checkpoints: an Orbax `CheckpointManager` in `<workdir>/checkpoints`, resume, fault
tolerance, and reading a trained model back.

A checkpoint of step k (`<workdir>/checkpoints/<k>`) holds two items:
  * 'state': the train state's arrays (`ocp.args.StandardSave`): step, params,
    batch_stats, opt_state, rng and, when configured, the EMA and loss-scale state;
  * 'meta': JSON (`ocp.args.JsonSave`): 'format', 'run' (the fields of the run that fix
    the state's structure or its data, checked on resume) and 'train_window' (the train
    metrics since the last log point, so a resumed run logs exactly what an
    uninterrupted one would).
Beside the checkpoints, `<workdir>/model.json` is the run's `ModelSpec`; a folder of
converted weights (gnet_jax.convert) has the same layout, with one checkpoint (step 0).

Saves are asynchronous and every process takes part (Orbax writes each step into a
temporary directory that is renamed only once complete, so a save killed half way is
never taken for a checkpoint). The latest `max_to_keep` are kept plus the best by eval
top-1. Restoring goes through an abstract target (shapes, dtypes and the current mesh's
shardings), so a checkpoint written on any number of devices or processes restores onto
any other. A checkpoint that cannot be read is skipped with a warning, newest first
(`Checkpointer.first_readable`), and set aside in `<workdir>/corrupt_checkpoints/`, never
deleted. Paths may be local or on an object store (gs://).

Writing, resuming and reading back share this one on-disk format and one fallback loop.

    variables, spec = gnet_jax.load_model('/tmp/gnet')   # latest step
    logits = gnet_jax.apply_fn(variables, images, **spec.model_kwargs())
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from gnet_jax import faults, paths
from gnet_jax import spec as spec_lib
from gnet_jax.spec import ModelSpec

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'corrupt_checkpoints'  # bad checkpoints are moved here, never deleted
BEST_METRIC = 'eval_top1'
FORMAT_VERSION = 2

# What of the run, besides the model, fixes the saved state's structure: a workdir whose
# checkpoint differs in one of them cannot be resumed with this config...
STATE_FIELDS = ('optimizer', 'grad_clip', 'ema', 'loss_scaling', 'grad_accum_steps')
# ...and what changes the data the run sees but not the state's structure: a warning.
DATA_FIELDS = ('dataset', 'seed', 'batch_size', 'image_size')


def _model_key(option: str) -> str:
  """A network option's key in a checkpoint's run record: where a config sets it."""
  return option if option in spec_lib.FROM_DATA else f'model.{option}'


def _structure_fields() -> tuple[str, ...]:
  """Every run field that makes another model or state: the network options that change
  the weights or the heads (model.ROLES), and STATE_FIELDS."""
  return tuple(_model_key(o) for o in ModelSpec.with_role('weights')
               + ModelSpec.with_role('head')) + STATE_FIELDS


def _warning_fields() -> tuple[str, ...]:
  return DATA_FIELDS + tuple(_model_key(o) for o in ModelSpec.with_role('training'))


class CheckpointMismatchError(ValueError):
  """The workdir's checkpoint was written by a run of another model or data."""


class NoUsableCheckpointError(RuntimeError):
  """Checkpoints exist but none of them can be read."""


class CheckpointWriteError(faults.StorageFault):
  """A checkpoint could not be written (disk full, unwritable workdir, lost connection...);
  `kind` is faults.kind_of's, or None for another cause."""


def checkpoint_dir(workdir):
  return paths.path(workdir) / CHECKPOINT_DIR


def run_fields(config, spec: ModelSpec) -> dict:
  """What a checkpoint records of the run, flat 'a.b' keys: the model's options, then
  STATE_FIELDS and DATA_FIELDS. `config` is resolved (`train.build`'s)."""
  return {
      **{_model_key(k): v for k, v in spec.model_kwargs().items()},
      'optimizer': config.optimizer,
      'grad_clip': bool(config.get('grad_clip_norm') or 0),
      'ema': bool(config.get('ema_decay') or 0),
      'loss_scaling': config.runtime.dtype == 'float16',
      'grad_accum_steps': int(config.get('grad_accum_steps', 1)),
      'dataset': config.dataset,
      'seed': int(config.seed),
      'batch_size': int(config.batch_size),
      'image_size': int(config.image_size),
  }


def check_compatible(saved: dict, current: dict, step: int, directory) -> None:
  """CheckpointMismatchError naming every structural field that differs; warns on the rest."""
  differ = [f'{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}'
            for k in _structure_fields() if k in saved and saved.get(k) != current.get(k)]
  if differ:
    raise CheckpointMismatchError(
        f'The checkpoint of step {step} in {directory} does not match the config: '
        + '; '.join(differ) + '. Use another --workdir for a new run; to fine-tune from '
        'this checkpoint, start a new workdir with '
        f'--config.init_from={paths.path(directory).parent}.')
  changed = [f'{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}'
             for k in _warning_fields() if k in saved and saved.get(k) != current.get(k)]
  if changed:
    logger.warning('Resuming step %d of %s with a changed config (%s): the run will not '
                   'be the one that was started.', step, directory, '; '.join(changed))


def state_to_tree(state) -> dict:
  """The saved part of a train state: its array fields, by name."""
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
          if f.metadata.get('pytree_node', True)}


def abstract_tree(abstract_state, sharding) -> dict:
  """ShapeDtypeStructs of the saved part, placed with `sharding` (any mesh)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      state_to_tree(abstract_state))


def _steps_on_disk(directory) -> list[int]:
  """The steps whose saves completed, read off the directory itself (Orbax's own list
  leaves out a step whose metadata is unreadable: that one is corrupt, not absent).
  Complete is Orbax's rule: locally, renamed into place; on gs://, committed
  (commit_success.txt). Orbax removes incomplete ones when a writing manager starts."""
  try:
    entries = list(directory.iterdir()) if directory.is_dir() else []
  except FileNotFoundError:  # an object-store "folder" exists only while objects are in it
    return []
  return sorted(int(p.name) for p in entries
                if p.name.isdigit() and ocp.step.is_path_finalized(p))


def _errors(errors) -> str:
  return '; '.join(f'step {s}: {type(e).__name__}: {str(e)[:300]}' for s, e in errors)


class Checkpointer:
  """A `ocp.CheckpointManager` for train states, with fallback over corrupt checkpoints.

  Every process must construct it and call save/restore/wait (Orbax synchronises them).
  """

  def __init__(self, workdir, *, max_to_keep: int = 3, keep_best: bool = True,
               async_save: bool = True, read_only: bool = False):
    self.workdir = paths.path(workdir)
    self.directory = checkpoint_dir(workdir)
    self.read_only = read_only
    policies = [ocp.checkpoint_managers.LatestN(n=max(1, max_to_keep))]
    if keep_best:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=not read_only,
        cleanup_tmp_directories=not read_only, read_only=read_only)
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=('state', 'meta'))
    except OSError as e:
      kind = faults.kind_of(e)
      raise CheckpointWriteError(kind, f'Cannot create the checkpoint directory {self.directory}'
                                 f' ({e}). ' + (f'{faults.what_to_do(kind, self.workdir)}.'
                                               if kind else 'Choose another --workdir.')) from e
    self._last_saved = self.manager.latest_step()
    self._durable = self._last_saved  # the newest step known to be written whole
    self._pending = None  # the step of a save not yet known to be written
    self._reader = None

  # --- reading -----------------------------------------------------------------------
  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def read_meta(self, step: int) -> dict:
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
        'meta']
    if not isinstance(meta, dict) or 'format' not in meta:
      raise ValueError('its metadata item is missing or incomplete')
    return meta

  def restore(self, step: int, abstract: dict) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))['state']

  def restore_partial(self, step: int, wanted: Callable[[dict], dict]) -> dict:
    """The arrays `wanted(saved tree metadata)` selects, on this process's first device."""
    if self._reader is None:  # a PyTree handler reads the saved tree's metadata and parts
      self._reader = ocp.CheckpointManager(
          self.directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
          item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                         'meta': ocp.JsonCheckpointHandler()})
    meta = self._reader.item_metadata(step)['state']
    meta = getattr(meta, 'tree', meta)
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), wanted(meta))
    return self._reader.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True)))['state']

  def first_readable(self, read: Callable[[int], Any], steps=None) -> tuple[int, Any]:
    """(step, read(step)) of the newest step `read` succeeds on, or None if there are no
    steps. A step it fails on is named in a warning and the next older one tried; once
    one is read, the bad newer ones are set aside (unless read-only). If every one fails,
    NoUsableCheckpointError and nothing is moved. CheckpointMismatchError propagates."""
    if steps is None:
      steps = sorted(set(self.all_steps()) | set(_steps_on_disk(self.directory)),
                     reverse=True)
    if not steps:
      return None
    errors = []
    for step in steps:
      try:
        value = read(step)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        errors.append((step, e))
        self._warn_bad(step, e)
        continue
      if not self.read_only:
        for bad_step, _ in errors:
          self._set_aside(bad_step)
      return step, value
    raise NoUsableCheckpointError(
        f'None of the checkpoints in {self.directory} can be read: {_errors(errors)}. '
        'Nothing was moved or deleted; use another --workdir to start from scratch.')

  def restore_latest(self, abstract: dict, current_fields: dict | None = None):
    """(state tree, meta, step) of the newest readable checkpoint, or None if there is none.

    Unreadable checkpoints (truncated or deleted files, unreadable metadata, non-finite
    parameters) fall back as `first_readable` says. A structural mismatch with
    `current_fields` (`run_fields`) is a CheckpointMismatchError.
    """
    def read(step):
      meta = self.read_meta(step)
      if meta['format'] != FORMAT_VERSION:
        raise CheckpointMismatchError(
            f'The checkpoint of step {step} in {self.directory} has format '
            f"{meta['format']}, written by another gnet_jax version (this one reads "
            f'{FORMAT_VERSION}); resume it with that version or use another --workdir.')
      if current_fields is not None:
        check_compatible(meta['run'], current_fields, step, self.directory)
      tree = self.restore(step, abstract)
      bad = [jax.tree_util.keystr(p) for p, x in
             jax.tree_util.tree_leaves_with_path(tree['params'])
             if not bool(np.all(np.isfinite(np.asarray(x.addressable_data(0)))))]
      if bad:
        raise ValueError(f'non-finite parameters in {bad[:3]}')
      return tree, meta

    found = self.first_readable(read)
    if found is None:
      return None
    step, (tree, meta) = found
    self._durable = step
    return tree, meta, step

  def _warn_bad(self, step: int, error: Exception) -> None:
    msg = (f'WARNING: checkpoint {self.directory / str(step)} is corrupt or incomplete '
           f'({type(error).__name__}: {str(error)[:300]}); trying the previous one.')
    logger.warning(msg)
    if jax.process_index() == 0:
      print(msg, flush=True)

  def _set_aside(self, step: int) -> None:
    """Moves a bad checkpoint to <workdir>/corrupt_checkpoints/, out of the way of new
    saves and never deleted (process 0 moves; the others wait for it)."""
    target = self.workdir / CORRUPT_DIR / f'{step}.{int(time.time())}'
    logger.warning('Moved the bad checkpoint of step %d to %s.', step, target)
    if jax.process_index() == 0:
      src = self.directory / str(step)
      if src.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        paths.move(src, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f'gnet_checkpoint_set_aside_{step}')
    self.manager.reload()
    self._last_saved = self._durable = self.manager.latest_step()

  # --- writing -----------------------------------------------------------------------
  def save(self, step: int, tree: dict, run: dict, train_window: list,
           metrics: dict | None = None) -> bool:
    """Starts an asynchronous save of `tree` (`state_to_tree`) at `step`."""
    if self._last_saved == step:
      return False
    meta = {'format': FORMAT_VERSION, 'run': run, 'train_window': train_window}
    self.wait()  # Orbax would wait for the previous save too: its failure is its own
    try:
      saved = self.manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                        meta=ocp.args.JsonSave(meta)),
          metrics=metrics, force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(step, e) from e
    if saved:
      self._pending = step
      self._last_saved = step
    return saved

  def _write_error(self, step, e) -> CheckpointWriteError:
    """A failed save, in the words of `fault`."""
    return self.fault(e, step, 'its checkpoint could not be written')

  def fault(self, e: BaseException, step: int, what: str) -> CheckpointWriteError:
    """The short message of a write that failed at `step`: why, `what` failed, the last
    good checkpoint and what to do (the exception itself goes to train.log)."""
    logger.error('At step %s, %s (%s).', step, what, self.directory, exc_info=e,
                 extra={'log_only': True})
    last = (f'The previous checkpoint (step {self._durable}) is intact: '
            f'{self.directory / str(self._durable)}.' if self._durable is not None else
            'There is no earlier checkpoint: run again, it starts over.')
    kind = faults.kind_of(e)
    if kind is None:
      first = (str(e).strip().splitlines() or [''])[0][:200]
      return CheckpointWriteError(None, (
          f'At step {step}, {what} ({self.directory}; {type(e).__name__}: {first}). {last} '
          'The details are in train.log.'))
    why = faults.describe(kind, self.workdir)
    return CheckpointWriteError(kind, (
        f'{why[0].upper()}{why[1:]}: at step {step}, {what}. {last} '
        f'{faults.what_to_do(kind, self.workdir)}.'))

  def check(self) -> None:
    """Raises CheckpointWriteError if a background save has failed, where this Orbax can
    tell before the next save."""
    check = getattr(self.manager, 'check_for_errors', None)
    if check is None or self._pending is None:
      return
    try:
      check()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(self._pending, e) from e

  def wait(self) -> None:
    """Blocks until every save started is durable; raises CheckpointWriteError if one failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(self._pending, e) from e
    if self._pending is not None:
      self._durable, self._pending = self._pending, None

  def reached_preemption(self, step: int) -> bool:
    """JAX's multi-host preemption sync point (False where there is no such service)."""
    return self.manager.reached_preemption(step)

  def close(self, quietly: bool = False) -> None:
    """Ends the manager (after its saves); `quietly` logs what that raises instead, for
    when another error is already ending the run."""
    try:
      self.manager.close()
      if self._reader is not None:
        self._reader.close()
    except Exception:  # pylint: disable=broad-except
      if not quietly:
        raise
      logger.exception('Closing the checkpoint manager after the error failed too.',
                       extra={'log_only': True})


def merge_matching(fresh: dict, loaded: dict) -> tuple[dict, list[str]]:
  """`fresh` with every leaf that `loaded` has at the same path and shape replaced by it.

  For fine-tuning: a classifier for another class count keeps its fresh initialisation.
  Returns (merged, paths of the leaves kept fresh).
  """
  flat_loaded = {jax.tree_util.keystr(p): x
                 for p, x in jax.tree_util.tree_leaves_with_path(loaded)}
  kept_fresh = []

  def pick(path, x):
    y = flat_loaded.get(jax.tree_util.keystr(path))
    if y is None or tuple(y.shape) != tuple(x.shape):
      kept_fresh.append(jax.tree_util.keystr(path))
      return x
    return jax.numpy.asarray(y, x.dtype)

  return jax.tree_util.tree_map_with_path(pick, fresh), kept_fresh


# ---------------------------------------------------------------------------------------
# Outside training
# ---------------------------------------------------------------------------------------
def load_variables(workdir, step: int | None = None, *, ema: bool | None = None) -> dict:
  """{'params', 'batch_stats'} of a workdir's (or converted weights') latest or given
  checkpoint, for `apply_fn`, on this process's first device.

  ema: the weight-EMA variables (config.ema_decay) when the checkpoint has them (None,
  the default), always (True: an error if it has none) or never (False). The latest step
  falls back over corrupt checkpoints (with a warning) as a resume does, moving nothing.
  """
  directory = checkpoint_dir(workdir)
  if not directory.is_dir() and paths.path(workdir).name == CHECKPOINT_DIR:
    directory, workdir = paths.path(workdir), paths.path(workdir).parent  # the folder itself
  if not directory.is_dir():
    raise FileNotFoundError(f'No checkpoints in {workdir} (expected {directory}).')
  checkpointer = Checkpointer(workdir, read_only=True, async_save=False)

  def wanted(tree):
    # A run without EMA saves ema=None; some storages' metadata keep that key, others not.
    has_ema = tree.get('ema') is not None
    if ema and not has_ema:
      raise ValueError('this checkpoint has no EMA variables (trained without '
                       'config.ema_decay); load the raw ones (ema=False)')
    pick = lambda t: {k: t[k] for k in ('params', 'batch_stats') if k in t}
    return {'ema': pick(tree['ema'])} if (has_ema and ema is not False) else pick(tree)

  def read(s):
    tree = checkpointer.restore_partial(s, wanted)
    if 'ema' in tree:
      tree = tree['ema']
    return {'params': tree['params'], 'batch_stats': tree.get('batch_stats') or {}}

  try:
    steps = checkpointer.all_steps()
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f'No checkpoint of step {step} in {directory}; there are '
                                f'steps {steps}.')
      return read(step)
    found = checkpointer.first_readable(read, sorted(steps, reverse=True))
    if found is None:
      raise FileNotFoundError(f'No checkpoints in {directory}.')
    return found[1]
  finally:
    checkpointer.close()


def load_model(path, step: int | None = None, *,
               ema: bool | None = None) -> tuple[dict, ModelSpec]:
  """(variables, spec) of a training workdir or a folder of converted weights.

  `apply_fn(variables, images, **spec.model_kwargs())` runs the model; the spec also
  says its image size, eval preprocessing and class names. `ema` as in load_variables.
  """
  spec = ModelSpec.load(path)
  return load_variables(path, step, ema=ema), spec
