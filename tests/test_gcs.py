"""A run whose workdir is on gs:// (a fake GCS on 127.0.0.1, tests/gcs_emulator.py): it
trains, is killed, resumes exactly, and is loaded, predicted from and exported, with every
file a local workdir has. The dataset stays local: tfds reads through TensorFlow's own GCS
filesystem, which cannot be pointed at an emulator (its endpoints are compiled in)."""
import os

import jax
import numpy as np
import pytest
from etils import epath

from gnet_jax import checkpoint, export, metrics, paths, predict
from helpers import ROOT, finish, kill9, start_train as start, train_args, wait_for

pytestmark = pytest.mark.slow
STEPS = 8  # test_checkpoint's run


def overrides(data_dir, workdir):
  return train_args(data_dir, workdir, STEPS)


def records(workdir):  # test_checkpoint's reads local files only
  return [{k: v for k, v in r.items() if k != 'images_per_sec'}
          for r in metrics.read_metrics(workdir)]


def test_a_gs_workdir_trains_resumes_loads_predicts_and_exports(gcs_bucket, digits_data_dir,
                                                                 tmp_path):
  remote, local = f'{gcs_bucket}/run', str(tmp_path / 'local')
  reference = start(overrides(digits_data_dir, local))
  step3 = epath.Path(remote) / 'checkpoints' / '3'

  def kill_when(condition, what):
    proc = start(overrides(digits_data_dir, remote))
    wait_for(condition, proc, what)
    kill9(proc)

  # On gs:// a step is written in place and committed last (commit_success.txt): killed
  # half way, it must not be taken for a checkpoint...
  kill_when(lambda: step3.exists(), 'the save of step 3')
  assert not (step3 / 'commit_success.txt').exists(), 'the save finished before the kill'
  # ...and killed after it, the run resumes from it.
  kill_when(lambda: (step3 / 'commit_success.txt').exists() and 4 in [
      r['step'] for r in records(remote)], 'checkpoint 3 and step 4')
  out = finish(start(overrides(digits_data_dir, remote)))
  finish(reference)
  assert f'Resumed from checkpoint {remote}/checkpoints/' in out
  assert records(remote) == records(local)  # exactly the uninterrupted run's metrics
  for a, b in zip(jax.tree.leaves(checkpoint.load_variables(remote)),
                  jax.tree.leaves(checkpoint.load_variables(local)), strict=True):
    np.testing.assert_array_equal(a, b)
  files = {p.name for p in epath.Path(remote).iterdir()}
  assert {'config.json', 'model.json', 'metrics.jsonl', 'curves.png', 'train.log'} <= files
  events = [n for n in files if n.startswith('events.out.tfevents.')]
  assert len(events) == 3  # one per run: the two killed ones and the one that finished
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tags = set()
  for name in events:  # TensorFlow reads gs:// only from real GCS: read a local copy
    copy = tmp_path / name
    copy.write_bytes((epath.Path(remote) / name).read_bytes())
    tags |= {v.tag for e in tf.compat.v1.train.summary_iterator(str(copy))
             for v in e.summary.value}
  assert {'train/loss', 'train/top1', 'eval/top1'} <= tags
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))  # no local folder named 'gs:'

  predictor = predict.Predictor.from_checkpoint(remote)
  images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  export.main(['--checkpoint', remote, '--out', f'{gcs_bucket}/exported',
               '--format', 'stablehlo'])
  logits = np.asarray(export.load_stablehlo(f'{gcs_bucket}/exported')(images))
  probs = np.asarray(jax.nn.softmax(logits))
  for row, top5 in zip(probs, predictor.top_k(images)):
    np.testing.assert_allclose([p for _, p in top5], np.sort(row)[::-1][:5], rtol=1e-4)


def test_a_local_folder_moves_onto_the_bucket(gcs_bucket, tmp_path):
  """paths.move, as a profile traced locally reaches a gs:// workdir: every file copied
  (nested folders too), then the local folder removed."""
  local = tmp_path / 'profile'
  (local / 'plugins' / 'profile').mkdir(parents=True)
  (local / 'plugins' / 'profile' / 'trace.xplane.pb').write_bytes(b'\x01\x02')
  (local / 'perfetto_trace.json.gz').write_bytes(b'gz')
  paths.move(local, f'{gcs_bucket}/run2/profile')
  remote = epath.Path(f'{gcs_bucket}/run2/profile')
  assert (remote / 'plugins' / 'profile' / 'trace.xplane.pb').read_bytes() == b'\x01\x02'
  assert (remote / 'perfetto_trace.json.gz').read_bytes() == b'gz'
  assert not local.exists()
