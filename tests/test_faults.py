"""The environment failing under train.py: a disk that fills up during a save, a workdir
that cannot be written, a bucket that does not exist, a store whose connection is lost
during a save. Each ends the run with one short message on the console (what failed, at
which step, the last good checkpoint, what to do), the details in train.log, a non-zero
exit and nothing lost; the same command afterwards resumes.

The disks are tmpfs mounts in a mount namespace of the test's own (`unshare -m`, or with a
user namespace where the tests do not run as root); the bucket is the fake GCS of
tests/gcs_emulator.py, which can drop every connection until told otherwise.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
from etils import epath

from gnet_jax import metrics
from helpers import ROOT, finish, start_train, train_args, train_env, wait_for

pytestmark = pytest.mark.slow


def console_lines(out: str) -> list[str]:
  """What a person reads: the console without the progress bar's redraws."""
  return [line for line in out.replace('\r', '\n').splitlines()
          if line.strip() and not line.startswith('train:')]


def in_own_mounts(script: str, *args) -> subprocess.CompletedProcess:
  """`script` (Python) run where its mounts are its own."""
  unshare = ['unshare', '-m'] if os.geteuid() == 0 else ['unshare', '-r', '-m']
  return subprocess.run([*unshare, sys.executable, '-c', script, *args], cwd=ROOT,
                        env=train_env(), capture_output=True, text=True, timeout=1800)


FULL_DISK = textwrap.dedent('''
    import json, os, subprocess, sys, time
    disk, data_dir = sys.argv[1:]
    mount = lambda *o: subprocess.run(['mount', '-t', 'tmpfs', *o, 'tmpfs', disk], check=True)
    used = lambda: int(subprocess.run(['du', '-sb', disk], capture_output=True,
                                      text=True).stdout.split()[0])
    args = [sys.executable, 'train.py', '--config=configs/quickstart.py',
            f'--workdir={disk}/run', f'--config.data_dir={data_dir}',
            '--config.num_train_steps=12', '--config.checkpoint_every_steps=4',
            '--config.log_every_steps=4', '--config.batch_size=16']
    mount('-o', 'size=2g')
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not os.path.isdir(f'{disk}/run/checkpoints/4'):  # step 4 saved (renamed in place)
      assert run.poll() is None, run.communicate()[0]
      time.sleep(0.05)
    # The disk fills up: room left for less than one more checkpoint.
    mount('-o', f'remount,size={used() + (1 << 20)}')
    first = run.communicate()[0], run.returncode
    kept = sorted(os.listdir(f'{disk}/run/checkpoints'))
    log = open(f'{disk}/run/train.log').read()
    mount('-o', 'remount,size=2g')  # space again: the same command
    again = subprocess.run(args, capture_output=True, text=True)
    print(json.dumps({'first': first, 'kept': kept, 'log': log,
                      'again': (again.stdout + again.stderr, again.returncode)}))
''')


def test_a_disk_that_fills_up_during_a_save(digits_data_dir, tmp_path):
  disk = tmp_path / 'disk'
  disk.mkdir()
  proc = in_own_mounts(FULL_DISK, str(disk), digits_data_dir)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.splitlines()[-1])
  out, code = result['first']
  lines = console_lines(out)
  assert code != 0 and 'Traceback' not in out, out[-4000:]
  assert len(lines) <= 6, lines  # the log's path, the run, the compile... and the message
  assert lines[-1] == (
      f'No space is left on the disk of {disk}/run: at step 8, its checkpoint could not be '
      f'written. The previous checkpoint (step 4) is intact: {disk}/run/checkpoints/4. Free '
      'space there, or move the workdir to a larger disk, then run the same command again '
      'to resume.')
  assert 'No space left on device' in result['log']  # the details
  assert '4' in result['kept']  # nothing lost
  out, code = result['again']
  assert code == 0, out[-4000:]
  assert f'Resumed from checkpoint {disk}/run/checkpoints/4 (step 4 of 12).' in out


READ_ONLY = textwrap.dedent('''
    import subprocess, sys
    disk = sys.argv[1]
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro,size=1m', 'tmpfs', disk], check=True)
    sys.exit(subprocess.run([sys.executable, 'train.py', '--config=configs/quickstart.py',
                             f'--workdir={disk}/run']).returncode)
''')


def test_a_workdir_that_cannot_be_written(tmp_path):
  disk = tmp_path / 'disk'
  disk.mkdir()
  proc = in_own_mounts(READ_ONLY, str(disk))
  assert proc.returncode == 1
  assert console_lines(proc.stdout + proc.stderr) == [
      f'Cannot start: {disk}/run cannot be written (Read-only file system). Make it '
      'writable, or choose another --workdir.']


def test_a_bucket_that_does_not_exist(gcs_bucket, tmp_path):
  proc = start_train(['--workdir=gs://no-such-bucket/run', '--config.num_train_steps=2'])
  out = finish(proc, ok=False)
  assert proc.returncode == 1
  assert console_lines(out)[-1] == (
      'Cannot start: the bucket gs://no-such-bucket does not exist (or these credentials '
      'cannot see it). Create it (gcloud storage buckets create gs://no-such-bucket) or '
      'choose another --workdir.')


def test_a_connection_lost_during_a_save(gcs_bucket, digits_data_dir, tmp_path):
  workdir = f'{gcs_bucket}/lost'
  args = train_args(digits_data_dir, workdir, 12, log_every=3, every=3)
  proc = start_train(args)
  saving = epath.Path(workdir) / 'checkpoints' / '6'
  wait_for(saving.exists, proc, 'the save of step 6')
  gcs_bucket.down()
  try:
    out = finish(proc, ok=False)
  finally:
    gcs_bucket.up()
  lines = console_lines(out)
  assert proc.returncode == 1 and 'Traceback' not in out, out[-4000:]
  assert lines[-1].startswith('The connection to gs://bucket was lost: at step '), lines
  assert lines[-1].endswith(
      f'The previous checkpoint (step 3) is intact: {workdir}/checkpoints/3. Run the same '
      'command again once the connection is back, to resume.'), lines
  log = [line for line in lines if line.startswith('train.log stays at ')]
  assert log and 'Server disconnected' in open(log[0].split()[3].rstrip(':')).read()
  out = finish(start_train(args))  # the same command, the connection back
  assert 'Resumed from checkpoint gs://bucket/lost/checkpoints/' in out
  assert max(r['step'] for r in metrics.read_metrics(workdir)) == 12
