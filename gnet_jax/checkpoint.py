"""Checkpoints: Orbax `CheckpointManager` in `<workdir>/checkpoints`, resume, fault tolerance.

A checkpoint of step k (directory `<workdir>/checkpoints/<k>`) holds two items:
  * 'state': the train state minus the optimizer definition, {'step', 'params',
    'batch_stats', 'opt_state', 'rng'} (`ocp.args.StandardSave`);
  * 'meta': JSON (`ocp.args.JsonSave`): the fields of the run that fix the state's
    structure ('run': model variant, heads, BatchNorm, class count, optimizer...), what
    the input pipeline needs to continue ('input': the next batch index, seed, batch
    size, dataset) and the train metrics logged since the last log point
    ('train_window'), so a resumed run logs exactly what an uninterrupted one would.

Saves are asynchronous and every process takes part (Orbax coordinates the processes
and writes each step into a temporary directory that is renamed only once complete,
so a save that is killed half way is never taken for a checkpoint). The manager keeps
the latest `config.checkpoint_max_to_keep` checkpoints plus the best by eval top-1.

Restoring goes through an abstract target (`jax.eval_shape` of the initial state with
the shardings of the current mesh), so a checkpoint written on any number of devices
or processes restores onto any other.

    variables = gnet_jax.checkpoint.load_variables('/tmp/gnet')   # latest step
    logits = gnet_jax.apply_fn(variables, images)
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'corrupt_checkpoints'  # bad checkpoints are moved here, never deleted
STATE_FIELDS = ('step', 'params', 'batch_stats', 'opt_state', 'rng')
BEST_METRIC = 'eval_top1'
FORMAT_VERSION = 1

# Fields of the run that decide the shapes and structure of the saved state: a workdir
# whose checkpoint differs in one of them cannot be resumed with this config.
STRUCTURE_FIELDS = ('model.variant', 'model.aux_logits', 'model.use_bn', 'num_classes',
                    'optimizer', 'grad_clip')
# Fields that change the run (the data it sees) but not the state's structure: a warning.
RUN_FIELDS = ('dataset', 'seed', 'batch_size', 'image_size')


class CheckpointMismatchError(ValueError):
  """The workdir's checkpoint was written by a run of another model or data."""


class NoUsableCheckpointError(RuntimeError):
  """Checkpoints exist but none of them can be read."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (disk full, unwritable workdir...)."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_DIR)


def run_fields(config, num_classes: int) -> dict:
  """What the checkpoint records about the run, flat 'a.b' keys."""
  return {
      'model.variant': config.model.variant,
      'model.aux_logits': bool(config.model.aux_logits),
      'model.use_bn': bool(config.model.use_bn),
      'num_classes': int(num_classes),
      'optimizer': config.optimizer,
      'grad_clip': bool(config.get('grad_clip_norm') or 0),
      'dataset': config.dataset,
      'seed': int(config.seed),
      'batch_size': int(config.batch_size),
      'image_size': int(config.image_size),
  }


def check_compatible(saved: dict, current: dict, step: int, directory: str) -> None:
  """CheckpointMismatchError naming every structural field that differs; warns on the rest."""
  differ = [f'{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}'
            for k in STRUCTURE_FIELDS if k in saved and saved.get(k) != current.get(k)]
  if differ:
    raise CheckpointMismatchError(
        f'The checkpoint of step {step} in {directory} does not match the config: '
        + '; '.join(differ) + '. Use another --workdir for a new run; to fine-tune from '
        'this checkpoint, start a new workdir with '
        f'--config.init_from={os.path.dirname(directory)}.')
  changed = [f'{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}'
             for k in RUN_FIELDS if k in saved and saved.get(k) != current.get(k)]
  if changed:
    logger.warning('Resuming step %d of %s with a changed config (%s): the run will not '
                   'be the one that was started.', step, directory, '; '.join(changed))


def state_to_tree(state) -> dict:
  """The saved part of a TrainState (everything but the optimizer definition)."""
  return {name: getattr(state, name) for name in STATE_FIELDS}


def abstract_tree(abstract_state, sharding) -> dict:
  """ShapeDtypeStructs of the saved part, placed with `sharding` (any mesh)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      state_to_tree(abstract_state))


def _all_steps_on_disk(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


class Checkpointer:
  """A `ocp.CheckpointManager` for train states, with fallback over corrupt checkpoints.

  Every process must construct it and call save/restore/wait (Orbax synchronises them).
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3, keep_best: bool = True,
               async_save: bool = True, read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    self.workdir = os.path.abspath(os.fspath(workdir))
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
      raise CheckpointWriteError(
          f'Cannot create the checkpoint directory {self.directory}: {e}') from e
    self._last_saved = self.manager.latest_step()

  # --- reading -----------------------------------------------------------------------
  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
        'meta']

  def restore(self, step: int, abstract: dict) -> tuple[dict, dict]:
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out['state'], out['meta']

  def restore_latest(self, abstract: dict, current_fields: dict | None = None):
    """(state tree, meta, step) of the newest readable checkpoint, or None if there is none.

    A checkpoint that cannot be read (truncated or deleted file, unreadable metadata,
    non-finite parameters) is named in a warning and the next older one is tried; once a
    good one is found, the bad newer ones are moved to `<workdir>/corrupt_checkpoints/`
    (never deleted). If every one is bad, NoUsableCheckpointError and nothing is moved.
    A structural mismatch with the config is a CheckpointMismatchError.
    """
    steps = sorted(set(self.all_steps()) | set(_all_steps_on_disk(self.directory)),
                   reverse=True)
    if not steps:
      return None
    errors = []
    for step in steps:
      try:
        meta = self.read_meta(step)
        if not isinstance(meta, dict) or 'run' not in meta:
          raise ValueError('its metadata item is missing or incomplete')
      except Exception as e:  # pylint: disable=broad-except
        errors.append((step, e))
        self._warn_bad(step, e)
        continue
      if current_fields is not None:
        check_compatible(meta['run'], current_fields, step, self.directory)
      try:
        tree, meta = self.restore(step, abstract)
        bad = [jax.tree_util.keystr(p) for p, x in
               jax.tree_util.tree_leaves_with_path(tree['params'])
               if not bool(np.all(np.isfinite(np.asarray(x.addressable_data(0)))))]
        if bad:
          raise ValueError(f'non-finite parameters in {bad[:3]}')
      except Exception as e:  # pylint: disable=broad-except
        errors.append((step, e))
        self._warn_bad(step, e)
        continue
      for bad_step, _ in errors:
        self._set_aside(bad_step)
      return tree, meta, step
    raise NoUsableCheckpointError(
        f'None of the checkpoints in {self.directory} can be read: '
        + '; '.join(f'step {s}: {type(e).__name__}: {str(e)[:300]}' for s, e in errors)
        + '. Nothing was moved or deleted; use another --workdir to start from scratch.')

  def _warn_bad(self, step: int, error: Exception) -> None:
    msg = (f'WARNING: checkpoint {os.path.join(self.directory, str(step))} is corrupt or '
           f'incomplete ({type(error).__name__}: {str(error)[:300]}); trying the previous '
           'one.')
    logger.warning(msg)
    if jax.process_index() == 0:
      print(msg, flush=True)

  def _set_aside(self, step: int) -> None:
    """Moves a bad checkpoint out of the way of new saves (process 0 moves)."""
    target = os.path.join(self.workdir, CORRUPT_DIR, f'{step}.{int(time.time())}')
    msg = f'Moved the bad checkpoint of step {step} to {target}.'
    logger.warning(msg)
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      if os.path.exists(src):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(src, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f'gnet_checkpoint_set_aside_{step}')
    self.manager.reload()
    self._last_saved = self.manager.latest_step()

  # --- writing -----------------------------------------------------------------------
  def save(self, step: int, state, meta: dict, metrics: dict | None = None) -> bool:
    """Starts an asynchronous save of `state` (a TrainState) at `step`."""
    if self._last_saved == step:
      return False
    try:
      saved = self.manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state_to_tree(state)),
                                        meta=ocp.args.JsonSave(meta)),
          metrics=metrics, force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(step, e) from e
    if saved:
      self._pending = step
      self._last_saved = step
    return saved

  def _write_error(self, step, e) -> CheckpointWriteError:
    good = [s for s in _all_steps_on_disk(self.directory) if s != step]
    kept = (f'the previous checkpoint (step {max(good)}) is intact' if good else
            'there is no earlier checkpoint')
    return CheckpointWriteError(
        f'Could not write the checkpoint of step {step} to {self.directory} '
        f'({type(e).__name__}: {e}). Is the disk full or the workdir not writable? '
        f'Nothing was overwritten: {kept}.')

  def wait(self) -> None:
    """Blocks until every save started is durable; raises CheckpointWriteError if one failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(getattr(self, '_pending', -1), e) from e

  def reached_preemption(self, step: int) -> bool:
    """JAX's multi-host preemption sync point (False where there is no such service)."""
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    self.manager.close()


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
RUN_INFO_FILE = 'run.json'  # in the workdir: what the model is and what data it was for


def write_run_info(workdir: str, model_kwargs: dict, class_names, image_size: int,
                   augment: str) -> None:
  """Records what predict/export/fine-tuning need to rebuild the model of a workdir."""
  with open(os.path.join(workdir, RUN_INFO_FILE), 'w') as f:
    json.dump({'model_kwargs': model_kwargs, 'class_names': list(class_names),
               'image_size': image_size, 'augment': augment}, f, indent=2)


def load_model(path: str, step: int | None = None) -> tuple[dict, dict, dict]:
  """(variables, model_kwargs, info) of a training workdir or of converted weights.

  `apply_fn(variables, images, **model_kwargs)` runs the model; info holds its
  'class_names', 'image_size' and eval preprocessing ('augment'). A workdir gives its
  latest checkpoint (or `step`); a directory from `gnet_jax.convert` gives torchvision's
  ImageNet model (224x224, ImageNet class names).
  """
  from gnet_jax import convert  # pylint: disable=import-outside-toplevel
  if os.path.exists(os.path.join(path, 'model.json')):
    variables, model_kwargs = convert.load_converted(path)
    return variables, model_kwargs, {'class_names': convert.imagenet_class_names(),
                                     'image_size': 224, 'augment': 'inception'}
  info_path = os.path.join(path, RUN_INFO_FILE)
  if not os.path.exists(info_path):
    raise FileNotFoundError(
        f'{path} is neither a training workdir (no {RUN_INFO_FILE}) nor a directory of '
        'converted weights (no model.json).')
  with open(info_path) as f:
    info = json.load(f)
  return load_variables(path, step), info.pop('model_kwargs'), info


def load_variables(workdir: str, step: int | None = None) -> dict[str, Any]:
  """{'params', 'batch_stats'} of a workdir's latest (or given) checkpoint, for `apply_fn`.

  Arrays are placed on this process's first device. The latest step falls back over
  corrupt checkpoints (with a warning) like a resume does, without moving anything.
  """
  directory = checkpoint_dir(workdir)
  if (not os.path.isdir(directory)
      and os.path.basename(os.path.normpath(os.fspath(workdir))) == CHECKPOINT_DIR):
    directory = os.path.abspath(os.fspath(workdir))  # given the checkpoints folder itself
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'No checkpoints in {workdir} (expected {directory}).')
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                     'meta': ocp.JsonCheckpointHandler()})
  try:
    steps = sorted(manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f'No checkpoint of step {step} in {directory}; there are '
                                f'steps {sorted(steps)}.')
      steps = [step]
    if not steps:
      raise FileNotFoundError(f'No checkpoints in {directory}.')
    device = jax.local_devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    errors = []
    for s in steps:
      try:
        meta = manager.item_metadata(s)['state']
        meta = getattr(meta, 'tree', meta)
        wanted = {k: meta[k] for k in ('params', 'batch_stats')}
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), wanted)
        tree = manager.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True)))['state']
        return {'params': tree['params'], 'batch_stats': tree.get('batch_stats') or {}}
      except Exception as e:  # pylint: disable=broad-except
        if step is not None:
          raise
        errors.append((s, e))
        logger.warning('Checkpoint %s/%d cannot be read (%s: %s); trying the previous one.',
                       directory, s, type(e).__name__, e)
    raise NoUsableCheckpointError(
        f'None of the checkpoints in {directory} can be read: '
        + '; '.join(f'step {s}: {type(e).__name__}: {str(e)[:300]}' for s, e in errors))
  finally:
    manager.close()
