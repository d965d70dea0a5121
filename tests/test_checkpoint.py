"""Checkpoints and fault tolerance: exact resume after SIGKILL (before the first checkpoint,
during an asynchronous save, between checkpoints), SIGTERM, corrupt checkpoints, restore
onto another device count, NaN losses, mismatched configs, unwritable checkpoint dirs.

Small: 32x32 digits, batch 16, 8 steps, a checkpoint every 3 steps. train.py runs in
subprocesses (real signals); runs that do not depend on each other run concurrently.
"""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap

import filelock
import jax
import numpy as np
import pytest

from configs import quickstart
from gnet_jax import ModelSpec, checkpoint, metrics
from helpers import ROOT, finish, kill9, start_train as start, train_args, train_env, wait_for


STEPS = 8


def overrides(data_dir, workdir, steps=STEPS, **kwargs):
  return train_args(data_dir, workdir, steps, **kwargs)


def records(workdir):
  """metrics.jsonl without the timing field, tolerant of a torn last line."""
  path = os.path.join(workdir, metrics.METRICS_FILE)
  out = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          r = json.loads(line)
        except json.JSONDecodeError:
          continue
        r.pop('images_per_sec', None)
        out.append(r)
  return out


def logged_steps(workdir):
  return [r['step'] for r in records(workdir) if r['split'] == 'train']


def finalized(workdir):
  d = checkpoint.checkpoint_dir(workdir)
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def assert_same_variables(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert jax.tree.structure(a) == jax.tree.structure(b)


@pytest.fixture(scope='module')
def reference(digits_data_dir, tmp_path_factory):
  """An uninterrupted run of 8 steps: checkpoints 3, 6, 8 (the latest 3 are kept).

  Run once per test session: pytest-xdist workers share it through a file lock.
  """
  base = tmp_path_factory.getbasetemp()
  if base.name.startswith('popen-gw'):
    base = base.parent
  workdir = str(base / 'reference')
  with filelock.FileLock(str(base / 'reference.lock')):
    if not os.path.exists(os.path.join(workdir, 'DONE')):
      shutil.rmtree(workdir, ignore_errors=True)
      out = finish(start(overrides(digits_data_dir, workdir)))
      assert 'Resumed' not in out
      with open(os.path.join(workdir, 'DONE'), 'w'):
        pass
  return workdir


@pytest.mark.slow
def test_reference_run_checkpoints_and_load_variables(reference):
  assert finalized(reference) == [3, 6, 8]
  variables = checkpoint.load_variables(reference)
  assert set(variables) == {'params', 'batch_stats'}
  early = checkpoint.load_variables(reference, step=3)
  assert jax.tree.structure(early) == jax.tree.structure(variables)
  assert not np.array_equal(jax.tree.leaves(early['params'])[0],
                            jax.tree.leaves(variables['params'])[0])
  # The variables are ready for the model its model.json describes: finite logits.
  variables, spec = checkpoint.load_model(reference)
  assert spec.num_classes == 10 and spec.class_names == tuple('0123456789')
  logits = spec.build().apply(variables, np.zeros((2, 32, 32, 3), np.float32), train=False)
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
  with pytest.raises(FileNotFoundError, match='step 5'):
    checkpoint.load_variables(reference, step=5)


@pytest.mark.slow
def test_sigkill_at_three_moments_then_resume_is_exact(digits_data_dir, reference, tmp_path,
                                                       monkeypatch):
  workdir = str(tmp_path / 'killed')
  args = overrides(digits_data_dir, workdir)
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  # A compilation cache of this test's own ($JAX_COMPILATION_CACHE_DIR), which another JAX
  # program writes to first without a size limit: train.py must still cache its steps.
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'jax_cache'))
  subprocess.run([sys.executable, '-c', 'import jax; jax.jit(lambda x: x * 3 + 1)(2.0)'],
                 env=train_env(1), check=True)
  assert os.listdir(tmp_path / 'jax_cache')

  # 1. Before the first checkpoint: step 2 is logged, no checkpoint is finalized yet.
  proc = start(args)
  wait_for(lambda: 2 in logged_steps(workdir), proc, 'step 2')
  kill9(proc)
  assert finalized(workdir) == []

  # 2. During the asynchronous save of step 3 (its temporary directory exists).
  proc = start(args)
  tmp = os.path.join(ckpt_dir, '3.orbax-checkpoint-tmp')
  wait_for(lambda: os.path.exists(tmp), proc, 'the save of step 3 to start')
  kill9(proc)
  assert finalized(workdir) == [], 'the save finished before the kill'

  # 3. Between checkpoints: 3 is finalized, step 4 is logged, 6 is not written yet.
  proc = start(args)
  wait_for(lambda: 3 in finalized(workdir) and 4 in logged_steps(workdir), proc,
           'checkpoint 3 and step 4')
  kill9(proc)
  assert finalized(workdir) == [3]

  out = finish(start(args))
  assert f'Resumed from checkpoint {ckpt_dir}/3' in out
  # The killed runs compiled this very program into the compilation cache.
  assert 'Compiled the train step in' in out
  assert '(from the persistent compilation cache)' in out
  assert records(workdir) == records(reference)  # every line, step by step, no repeats
  assert finalized(workdir) == [3, 6, 8]
  assert_same_variables(checkpoint.load_variables(workdir), checkpoint.load_variables(reference))


@pytest.mark.slow
def test_sigkill_mid_accumulation_with_ema_then_resume_is_exact(digits_data_dir, tmp_path):
  """grad_accum_steps=2 and ema_decay=0.9 together: checkpoint 3 falls in the middle of an
  accumulation cycle; killed after it, the resumed run ends bitwise equal to an
  uninterrupted one: metrics (eval and eval_ema), raw and EMA variables."""
  args = lambda workdir: overrides(digits_data_dir, workdir) + [
      '--config.grad_accum_steps=2', '--config.ema_decay=0.9']
  uninterrupted, workdir = str(tmp_path / 'uninterrupted'), str(tmp_path / 'killed')
  reference = start(args(uninterrupted))
  proc = start(args(workdir))
  wait_for(lambda: 3 in finalized(workdir) and 4 in logged_steps(workdir), proc,
           'checkpoint 3 and step 4')
  kill9(proc)
  out = finish(start(args(workdir)))
  finish(reference)
  assert f'Resumed from checkpoint {checkpoint.checkpoint_dir(workdir)}/3' in out
  assert records(workdir) == records(uninterrupted)
  assert [r['split'] for r in records(workdir)][-2:] == ['eval', 'eval_ema']
  for ema in (False, True):
    assert_same_variables(checkpoint.load_variables(workdir, ema=ema),
                          checkpoint.load_variables(uninterrupted, ema=ema))
  assert not np.array_equal(  # the EMA is not the raw parameters
      jax.tree.leaves(checkpoint.load_variables(workdir, ema=True)['params'])[0],
      jax.tree.leaves(checkpoint.load_variables(workdir, ema=False)['params'])[0])


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_and_restores_on_other_device_counts(
    digits_data_dir, reference, tmp_path):
  workdir = str(tmp_path / 'preempted')
  proc = start(overrides(digits_data_dir, workdir, steps=1000, every=0, log_every=1),
               devices=8)
  wait_for(lambda: 2 in logged_steps(workdir), proc, 'step 2')
  proc.send_signal(signal.SIGTERM)
  out = finish(proc)
  assert 'Preempted (SIGTERM) at step' in out
  (step,) = finalized(workdir)
  assert logged_steps(workdir)[-1] == step >= 2
  assert step < 1000

  # Saved on 8 devices -> restored on 1; saved on 1 (reference) -> restored on 8.
  script = textwrap.dedent('''
      import sys, jax, numpy as np
      from configs import quickstart
      from gnet_jax import ModelSpec, checkpoint, train
      config = quickstart.get_config()
      config.batch_size = 16
      config.num_train_steps = int(sys.argv[2])
      spec = ModelSpec.from_config(config, 10)
      exp = train.build(config, spec, 1433)
      ckpt = checkpoint.Checkpointer(sys.argv[1])
      tree, meta, step = ckpt.restore_latest(
          checkpoint.abstract_tree(exp.abstract_state(), exp.sharding.replicated),
          checkpoint.run_fields(config, spec))
      ckpt.close()
      leaf = jax.tree.leaves(tree['params'])[0]
      assert len(leaf.sharding.device_set) == jax.device_count(), leaf.sharding
      total = sum(float(np.sum(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))
      print('RESTORED', jax.device_count(), step, int(tree['step']), repr(total))
      ''')

  def restore_with(devices, target, steps):
    return subprocess.Popen([sys.executable, '-c', script, target, str(steps)], cwd=ROOT,
                            env={**train_env(devices), 'PYTHONPATH': ROOT},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  def checksum(tree):
    return sum(float(np.sum(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))

  on_one = restore_with(1, workdir, 1000)
  on_eight = restore_with(8, reference, STEPS)
  for proc, devices, workdir_, expect_step in ((on_one, 1, workdir, step),
                                               (on_eight, 8, reference, STEPS)):
    line = [l for l in finish(proc).splitlines() if l.startswith('RESTORED')][0].split()
    assert line[1:4] == [str(devices), str(expect_step), str(expect_step)]
    variables = checkpoint.load_variables(workdir_)
    del variables
  # The values restored onto 8 devices are the saved ones.
  ref = checkpoint.Checkpointer(reference, read_only=True)
  config = quickstart.get_config()
  config.batch_size, config.num_train_steps = 16, STEPS
  tree, _, _ = ref.restore_latest(abstract_for(config))
  ref.close()
  assert float(line[4]) == checksum(tree)


def corrupt_copy(reference, tmp_path, name):
  workdir = str(tmp_path / name)
  shutil.copytree(reference, workdir)
  return workdir


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_and_resumes_exactly(
    digits_data_dir, reference, tmp_path):
  workdir = corrupt_copy(reference, tmp_path, 'truncated')
  state_dir = os.path.join(checkpoint.checkpoint_dir(workdir), '8', 'state')
  biggest = max((os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs),
                key=os.path.getsize)
  with open(biggest, 'r+b') as f:
    f.truncate(os.path.getsize(biggest) // 2)
  out = finish(start(overrides(digits_data_dir, workdir)))
  assert f'checkpoint {checkpoint.checkpoint_dir(workdir)}/8 is corrupt' in out
  assert f'Resumed from checkpoint {checkpoint.checkpoint_dir(workdir)}/6' in out
  assert os.listdir(os.path.join(workdir, checkpoint.CORRUPT_DIR))  # kept, not deleted
  assert records(workdir) == records(reference)
  assert_same_variables(checkpoint.load_variables(workdir), checkpoint.load_variables(reference))


def abstract_for(config, num_classes=10):
  from gnet_jax import train  # pylint: disable=import-outside-toplevel
  exp = train.build(config, ModelSpec.from_config(config, num_classes), 1433)
  return checkpoint.abstract_tree(exp.abstract_state(), exp.sharding.replicated)


def fields_for(config, num_classes=10):
  return checkpoint.run_fields(config, ModelSpec.from_config(config, num_classes))


@pytest.mark.slow
def test_deleted_files_and_broken_metadata_fall_back_with_a_warning(reference, tmp_path,
                                                                     capsys):
  workdir = corrupt_copy(reference, tmp_path, 'deleted')
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  os.remove(os.path.join(ckpt_dir, '8', 'state', 'manifest.ocdbt'))
  with open(os.path.join(ckpt_dir, '6', 'meta', 'metadata'), 'w') as f:
    f.write('{"run": ')  # torn JSON
  config = quickstart.get_config()
  config.batch_size, config.num_train_steps = 16, STEPS
  fields = fields_for(config)
  ckpt = checkpoint.Checkpointer(workdir)
  tree, _, step = ckpt.restore_latest(abstract_for(config), fields)
  ckpt.close()
  assert step == 3 and int(tree['step']) == 3
  out = capsys.readouterr().out
  assert f'{ckpt_dir}/8 is corrupt' in out and f'{ckpt_dir}/6 is corrupt' in out
  assert finalized(workdir) == [3]
  assert len(os.listdir(os.path.join(workdir, checkpoint.CORRUPT_DIR))) == 2

  # Every checkpoint bad: an error, never a silent fresh start, and nothing is moved.
  os.remove(os.path.join(ckpt_dir, '3', 'state', 'manifest.ocdbt'))
  ckpt = checkpoint.Checkpointer(workdir)
  with pytest.raises(checkpoint.NoUsableCheckpointError, match='step 3'):
    ckpt.restore_latest(abstract_for(config), fields)
  ckpt.close()
  assert finalized(workdir) == [3]


@pytest.mark.slow
def test_mismatched_config_is_named(digits_data_dir, reference, tmp_path):
  workdir = corrupt_copy(reference, tmp_path, 'mismatch')
  proc = start(overrides(digits_data_dir, workdir) + ['--config.model.aux_logits=False'])
  out = finish(proc, ok=False)
  assert proc.returncode != 0
  assert 'model.aux_logits: checkpoint True, config False' in out
  assert finalized(workdir) == [3, 6, 8]
  assert f'--config.init_from={workdir}' in out
  # The class count is recorded too.
  config = quickstart.get_config()
  saved = fields_for(config)
  with pytest.raises(checkpoint.CheckpointMismatchError, match='num_classes: checkpoint 10'):
    checkpoint.check_compatible(saved, fields_for(config, 100), 8, workdir)


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    digits_data_dir, tmp_path):
  workdir, skipping = str(tmp_path / 'nan'), str(tmp_path / 'skip')
  args = ['--config.base_learning_rate=1e30']  # finite at steps 1-2, NaN from step 3
  proc = start(overrides(digits_data_dir, workdir, steps=6, every=2, log_every=1) + args)
  skip = start(overrides(digits_data_dir, skipping, steps=4, every=2, log_every=1) + args
               + ['--config.skip_nonfinite_steps=True'])
  out = finish(proc, ok=False)
  assert proc.returncode != 0
  good = logged_steps(workdir)
  assert good and all(np.isfinite(r['loss']) for r in records(workdir))
  assert finalized(workdir)[-1] == good[-1]  # nothing after the last finite step
  assert f'FloatingPointError: Non-finite training loss (nan) at step {good[-1] + 1}' in out
  variables = checkpoint.load_variables(workdir)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))

  # skip_nonfinite_steps: the bad steps change nothing and the run goes on to the end.
  out = finish(skip)
  assert 'Skipped 1 step(s) with a non-finite loss' in out
  assert finalized(skipping) == [2, 4]
  assert_same_variables(checkpoint.load_variables(skipping),  # steps 3, 4 changed nothing
                        checkpoint.load_variables(skipping, step=2))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(checkpoint.load_variables(skipping)))


def test_finetuning_keeps_what_matches_and_reinitialises_the_rest():
  fresh = {'params': {'conv': {'kernel': np.zeros((3, 3, 3, 8), np.float32)},
                      'classifier': {'kernel': np.zeros((8, 100), np.float32),
                                     'bias': np.zeros((100,), np.float32)}},
           'batch_stats': {'bn': {'mean': np.zeros((8,), np.float32)}}}
  loaded = {'params': {'conv': {'kernel': np.ones((3, 3, 3, 8), np.float32)},
                       'classifier': {'kernel': np.ones((8, 10), np.float32),
                                      'bias': np.ones((10,), np.float32)}},
            'batch_stats': {'bn': {'mean': np.ones((8,), np.float32)}}}
  merged, kept_fresh = checkpoint.merge_matching(fresh, loaded)
  assert sorted(kept_fresh) == ["['params']['classifier']['bias']",
                                "['params']['classifier']['kernel']"]
  assert np.all(merged['params']['conv']['kernel'] == 1)
  assert np.all(merged['batch_stats']['bn']['mean'] == 1)
  assert np.all(merged['params']['classifier']['kernel'] == 0)


def tiny(n):
  """A small state tree of a train state's shape."""
  return {'step': np.int32(0),
          'params': {'w': np.random.default_rng(0).normal(size=n).astype(np.float32)},
          'batch_stats': {}, 'opt_state': {'m': np.zeros((n,), np.float32)},
          'rng': np.zeros((2,), np.uint32)}


def test_latest_k_and_best_by_eval_top1_are_kept(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2)
  top1 = {1: 0.5, 2: 0.9, 3: 0.1, 4: None, 5: 0.2, 6: None}
  for step, acc in top1.items():
    metrics_ = None if acc is None else {checkpoint.BEST_METRIC: acc}
    ckpt.save(step, tiny(4), {}, [], metrics_)
    ckpt.wait()
  ckpt.close()
  assert finalized(str(tmp_path)) == [2, 5, 6]


def test_disk_full_or_unwritable_is_a_clear_error_and_keeps_the_previous(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(1, tiny(1 << 20), {}, [])
  ckpt.wait()
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # "disk full" past 1 MiB
  try:
    with pytest.raises(checkpoint.CheckpointWriteError,
                       match='step 2.*previous checkpoint \\(step 1\\) is intact'):
      ckpt.save(2, tiny(1 << 20), {}, [])
      ckpt.wait()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  ckpt.close()
  assert finalized(str(tmp_path)) == [1]
  np.testing.assert_array_equal(checkpoint.load_variables(str(tmp_path))['params']['w'],
                                tiny(1 << 20)['params']['w'])

  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  with pytest.raises(checkpoint.CheckpointWriteError, match='Cannot create'):
    checkpoint.Checkpointer(str(blocker / 'workdir'))
