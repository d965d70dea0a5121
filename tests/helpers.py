"""What several test files share: configs for the data tests, and train.py run as a user
runs it, in a subprocess with its own CPU devices (real signals, real exit codes)."""
import os
import signal
import subprocess
import sys
import time

from configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_config(dataset, **overrides):
  """configs/default.py's config reading `dataset`, with `overrides`."""
  config = default.get_config()
  config.dataset = dataset
  config.update(overrides)
  return config


def train_args(data_dir, workdir, steps, batch_size=16, log_every=2, eval_every=0, every=3,
               steps_per_execution=2):
  """train.py's flags for a short quickstart run: a checkpoint every `every` steps, and
  calls of up to `steps_per_execution` steps between them."""
  return [f'--workdir={workdir}', f'--config.data_dir={data_dir}',
          f'--config.num_train_steps={steps}', f'--config.batch_size={batch_size}',
          f'--config.log_every_steps={log_every}', f'--config.eval_every_steps={eval_every}',
          f'--config.checkpoint_every_steps={every}',
          f'--config.steps_per_execution={steps_per_execution}']


def train_env(devices=1, env=None) -> dict:
  return {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
          'TF_CPP_MIN_LOG_LEVEL': '2', 'JAX_PLATFORMS': 'cpu', **(env or {})}


def start_train(args, devices=1, env=None, **kwargs) -> subprocess.Popen:
  """train.py on the quickstart config, its console (stdout and stderr) in one pipe."""
  return subprocess.Popen(
      [sys.executable, 'train.py', '--config=configs/quickstart.py', *args], cwd=ROOT,
      env=train_env(devices, env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, **kwargs)


def run_train(args, devices=1, env=None, check=True) -> subprocess.CompletedProcess:
  """train.py on the quickstart config to its end, stdout and stderr apart."""
  return subprocess.run([sys.executable, 'train.py', '--config=configs/quickstart.py', *args],
                        cwd=ROOT, env=train_env(devices, env), capture_output=True,
                        text=True, check=check, timeout=900)


def finish(proc, ok=True) -> str:
  out, _ = proc.communicate(timeout=900)
  if ok:
    assert proc.returncode == 0, out[-4000:]
  return out


def wait_for(predicate, proc, what, timeout=600):
  deadline = time.time() + timeout
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f'train.py ended before {what}: {proc.communicate()[0][-4000:]}')
    if time.time() > deadline:
      proc.kill()
      raise AssertionError(f'timed out waiting for {what}')
    time.sleep(0.005)


def kill9(proc):
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
