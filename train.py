"""Trains GoogLeNet: `python train.py --config configs/quickstart.py --workdir /tmp/gnet`.

Any config field can be overridden: `--config.batch_size=256 --config.model.aux_logits=False`.
Multi-host: pass --coordinator_address/--num_processes/--process_id (or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or --multihost on a TPU pod
or SLURM cluster, where JAX finds them itself.

The workdir may be local or on an object store (gs://bucket/run). Checkpoints go to
<workdir>/checkpoints: running the same command again on a workdir that has some resumes
from the newest good one. Log records and whatever else the process writes to stderr
(libraries' prints, their threads' tracebacks, C++ notices) go to <workdir>/train.log; the
console holds the progress bar, evaluations and warnings, and a failed run ends there with
one message that says what failed and what to do.
SIGTERM (preemption) saves a checkpoint at the end of the current step and exits 0.
Compiled steps are kept in JAX's persistent compilation cache (--compilation_cache_dir),
so a resumed or repeated run skips most of the compile.
"""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
logger = logging.getLogger('gnet_jax.train_py')
config_flags.DEFINE_config_file('config', None, 'Path to a configs/*.py file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for metrics, TensorBoard events, checkpoints.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process).')
flags.DEFINE_integer('process_id', None, 'This process (multi-process).')
flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() with no arguments '
                  '(TPU pods, SLURM, ... find the cluster themselves). Automatic when '
                  'TPU_WORKER_HOSTNAMES names several hosts.')
flags.DEFINE_string(
    'compilation_cache_dir',
    os.environ.get('JAX_COMPILATION_CACHE_DIR') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'gnet_jax', 'jax'),
    "JAX's persistent compilation cache: a rerun or resume with the same config and JAX "
    "loads its compiled steps from here instead of compiling them again. '' turns it off.")
flags.mark_flags_as_required(['config', 'workdir'])
# The cache's size limit; past it the least recently used entries go (LRU, file-locked).
COMPILATION_CACHE_MAX_BYTES = 4 << 30


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Imported here so that --help stays fast and jax is configured before first use.
  import jax  # pylint: disable=import-outside-toplevel
  from gnet_jax import cpu, faults, metrics, paths  # pylint: disable=import-outside-toplevel
  cpu.use_fast_cpu_kernels()
  if FLAGS.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', FLAGS.compilation_cache_dir)
    # JAX's size-limited cache cannot evict entries that a program without the limit
    # wrote (they lack its access-time records): every write then fails with a warning.
    # A directory that every JAX program here shares (JAX_COMPILATION_CACHE_DIR) keeps
    # JAX's own size setting, as the other programs writing to it do.
    if FLAGS.compilation_cache_dir != os.environ.get('JAX_COMPILATION_CACHE_DIR'):
      jax.config.update('jax_compilation_cache_max_size', COMPILATION_CACHE_MAX_BYTES)
  coordinator = FLAGS.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  # A multi-host TPU slice lists its hosts here; JAX then finds the cluster itself.
  tpu_hosts = os.environ.get('TPU_PROCESS_ADDRESSES') or os.environ.get('TPU_WORKER_HOSTNAMES')
  if coordinator or FLAGS.multihost or (tpu_hosts and ',' in tpu_hosts):
    # CPU processes talk over gloo; the setting is ignored by GPU and TPU backends.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    env_int = lambda name: int(os.environ[name]) if name in os.environ else None
    jax.distributed.initialize(
        coordinator,
        FLAGS.num_processes if FLAGS.num_processes is not None else env_int('JAX_NUM_PROCESSES'),
        FLAGS.process_id if FLAGS.process_id is not None else env_int('JAX_PROCESS_ID'))
  try:
    if not paths.is_remote(FLAGS.workdir):  # where train.log goes
      paths.check_writable(FLAGS.workdir)
    with metrics.log_to_workdir(FLAGS.workdir) as log_file:
      message = _train(log_file)
  except faults.StorageFault as e:  # nothing has started
    message = str(e)
  if not message:
    return
  print(message, file=sys.stderr, flush=True)  # the one line a failed run ends with
  # No interpreter shutdown after a failure: a failed save's threads would hold the process
  # for their retries (of a store that does not answer) and print their unretrieved
  # errors on the console. What they had not written is no checkpoint, the previous ones
  # are intact, and the run's own files are closed.
  logging.shutdown()
  os._exit(1)


def _train(log_file) -> str | None:
  """Runs train_and_evaluate with its output in train.log; returns None, or the message a
  failed run ends with (its details go to train.log)."""
  # pylint: disable=import-outside-toplevel
  import jax
  from gnet_jax import accelerators, faults, paths
  # pylint: enable=import-outside-toplevel
  if paths.is_remote(FLAGS.workdir):  # a bucket, before anything is compiled (a local
    try:                              # workdir was checked before train.log was opened)
      paths.check_writable(FLAGS.workdir)
    except faults.StorageFault as e:
      return str(e)
  devices = jax.devices()
  logger.info('JAX %s, %d process(es), devices: %s', jax.__version__, jax.process_count(),
              devices)
  for problem in accelerators.problems(devices):
    logger.warning(problem)
  if jax.process_index() == 0:
    copied = ' (copied to the workdir at the end)' if paths.is_remote(FLAGS.workdir) else ''
    print(f"Libraries' log: {log_file}{copied}", flush=True)
  from gnet_jax import checkpoint, train  # pylint: disable=import-outside-toplevel
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    return None
  except faults.StorageFault as e:
    message = str(e)
  except (checkpoint.CheckpointMismatchError, checkpoint.NoUsableCheckpointError,
          FloatingPointError) as e:
    message = f'{type(e).__name__}: {e}'
  except Exception as e:  # pylint: disable=broad-except
    kind = faults.kind_of(e)
    first = (str(e).strip().splitlines() or [''])[0][:200]
    message = (f'Stopped: {faults.describe(kind, FLAGS.workdir)}. '
               f'{faults.what_to_do(kind, FLAGS.workdir)}.' if kind else
               f'Stopped on an unexpected error ({type(e).__name__}: {first}); the traceback '
               f'is in {log_file}.')
  logger.error('The run stopped: %s', message, exc_info=True, extra={'log_only': True})
  return message


if __name__ == '__main__':
  app.run(main)
