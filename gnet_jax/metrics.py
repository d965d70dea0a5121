"""What a person and a script see of a run: pluggable metric writers and the curves.

A `Writer` takes scalars (`write(step, split, scalars)`); `create_writers` builds the
run's set from its config:
- `JsonlWriter`: `metrics.jsonl`, the file of record, one JSON object a line:
  {"step", "split", "loss", "top1", "top5", ...} (train lines add "lr" and
  "images_per_sec"); `read_metrics` reads it back;
- `TensorBoardWriter`: TensorBoard event files (`tensorboard --logdir WORKDIR`);
- `ConsoleWriter`: the progress bar with loss, throughput and ETA, and each evaluation;
- `WandbWriter`: Weights & Biases, when `config.wandb_project` is set (needs `wandb`).
Only process 0 writes, so a multi-host run logs once. Every file goes through
`gnet_jax.paths`, so a workdir may be local or on gs://; on an object store an
appended file is rewritten whole (they are small).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import sys
import tempfile
import time

import tqdm

from gnet_jax import paths

METRICS_FILE = 'metrics.jsonl'
CURVES_FILE = 'curves.png'
CONFIG_FILE = 'config.json'


class AppendFile:
  """A file that grows by appends: in place locally; rewritten whole on an object store."""

  def __init__(self, path):
    self.path = paths.path(path)
    self._data = None
    if paths.is_remote(self.path):
      self._data = self.path.read_bytes() if self.path.exists() else b''

  def append(self, data: bytes) -> None:
    if self._data is None:
      with open(self.path, 'ab') as f:
        f.write(data)
    else:
      self._data += data
      self.path.write_bytes(self._data)


def read_metrics(workdir) -> list[dict]:
  """The records of metrics.jsonl (a torn last line is skipped)."""
  path = paths.path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


def truncate_metrics(workdir, step: int) -> int:
  """Drops metrics.jsonl lines of steps after `step` (and a torn line); returns how many.

  A resumed run rewrites the steps after its checkpoint, so they must not stay twice.
  """
  path = paths.path(workdir) / METRICS_FILE
  if not path.exists():
    return 0
  lines = path.read_text().splitlines()
  kept = [json.dumps(r) + '\n' for r in read_metrics(workdir) if r.get('step', 0) <= step]
  dropped = sum(1 for line in lines if line.strip()) - len(kept)
  if dropped:
    paths.write_text_atomic(path, ''.join(kept))
  return dropped


def plot_curves(records: list[dict], path) -> None:
  """Loss and top-1 against step, train and eval (and EMA eval), side by side."""
  # A bare Figure: no pyplot, so no global backend is touched (notebooks keep theirs).
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(11, 4))
  axes = fig.subplots(1, 2)
  titles = ('loss (train: with aux heads and label smoothing)', 'top-1 accuracy')
  for ax, key, title in zip(axes, ('loss', 'top1'), titles):
    for split, style in (('train', '-'), ('eval', 'o-'), ('eval_ema', 's--')):
      rows = [r for r in records if r['split'] == split and key in r]
      if rows:
        ax.plot([r['step'] for r in rows], [r[key] for r in rows], style, label=split)
    ax.set_xlabel('step')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  paths.path(path).write_bytes(buffer.getvalue())


class Writer:
  """Takes a run's scalars; every method but `write` is optional."""

  def write(self, step: int, split: str, scalars: dict) -> None:
    raise NotImplementedError

  def close(self) -> None:
    pass


class JsonlWriter(Writer):
  """metrics.jsonl: the file of record."""

  def __init__(self, workdir):
    self.file = AppendFile(paths.path(workdir) / METRICS_FILE)

  def write(self, step, split, scalars):
    self.file.append((json.dumps({'step': step, 'split': split, **scalars}) + '\n').encode())


class TensorBoardWriter(Writer):
  """Scalars as TensorBoard events, `<split>/<name>`, written through the path layer."""

  def __init__(self, workdir):
    # tensorboard's protos and record framing need no TensorFlow.
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=import-outside-toplevel
    from tensorboard.summary.writer.record_writer import RecordWriter  # pylint: disable=import-outside-toplevel
    self._event, self._summary, self._record = event_pb2.Event, summary_pb2.Summary, RecordWriter
    name = f'events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.gnet_jax'
    self.file = AppendFile(paths.path(workdir) / name)
    self._append(self._event(wall_time=time.time(), file_version='brain.Event:2'))

  def _append(self, event) -> None:
    buffer = io.BytesIO()
    self._record(buffer).write(event.SerializeToString())
    self.file.append(buffer.getvalue())

  def write(self, step, split, scalars):
    values = [self._summary.Value(tag=f'{split}/{k}', simple_value=float(v))
              for k, v in scalars.items()]
    self._append(self._event(wall_time=time.time(), step=step,
                             summary=self._summary(value=values)))


class ConsoleWriter(Writer):
  """The progress bar (steps, loss, images/s, ETA) and one line per evaluation."""

  def __init__(self, start: int, total: int):
    self.bar = tqdm.tqdm(total=total, initial=start, unit='step', dynamic_ncols=True,
                         mininterval=1.0, desc='train', file=console())

  def advance(self, steps: int) -> None:
    self.bar.update(steps)

  def message(self, text: str) -> None:
    self.bar.write(text, file=console())

  def write(self, step, split, scalars):
    if split == 'train':
      self.bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.3f}",
                           img_s=f"{scalars.get('images_per_sec', 0):.0f}")
    else:
      self.message(f"step {step}: {split} top1 {scalars['top1']:.4f} top5 "
                   f"{scalars['top5']:.4f} loss {scalars['loss']:.4f} "
                   f"({scalars['count']} examples)")

  def close(self):
    self.bar.close()


class WandbWriter(Writer):
  """Weights & Biases (`config.wandb_project`; WANDB_MODE=offline works without network)."""

  def __init__(self, project: str, config, workdir):
    try:
      import wandb  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ValueError(f'config.wandb_project={project!r} needs the wandb package: pip '
                       "install 'gnet_jax[wandb]' (or leave wandb_project empty).") from None
    directory = None if paths.is_remote(workdir) else str(paths.path(workdir))
    self.run = wandb.init(project=project, dir=directory, config=config.to_dict(),
                          resume='allow', id=config.get('wandb_run_id') or None)

  def write(self, step, split, scalars):
    self.run.log({f'{split}/{k}': v for k, v in scalars.items()}, step=step)

  def close(self):
    self.run.finish()


class Writers:
  """The run's writers: `write` goes to each; `log` is a message for the console and log."""

  def __init__(self, writers: list[Writer], workdir, enabled: bool = True):
    self.writers, self.workdir, self.enabled = writers, paths.path(workdir), enabled
    self.console = next((w for w in writers if isinstance(w, ConsoleWriter)), None)

  def write(self, step: int, split: str, scalars: dict) -> None:
    for w in self.writers:
      w.write(step, split, scalars)

  def log(self, message: str) -> None:
    if not self.enabled:
      return
    logging.info(message)
    if self.console is not None:
      self.console.message(message)
    else:
      print(message, flush=True)

  def advance(self, steps: int) -> None:
    if self.console is not None:
      self.console.advance(steps)

  def close(self, plot: bool = True) -> None:
    for w in self.writers:
      w.close()
    if self.enabled and plot:
      plot_curves(read_metrics(self.workdir), self.workdir / CURVES_FILE)


def write_config(config, workdir) -> None:
  """The resolved config as WORKDIR/config.json."""
  paths.write_text_atomic(paths.path(workdir) / CONFIG_FILE,
                          config.to_json_best_effort(indent=2, sort_keys=True))


def create_writers(config, workdir, *, start_step: int, num_steps: int, enabled: bool,
                   extra=()) -> Writers:
  """metrics.jsonl, TensorBoard, the console, (config.wandb_project) W&B and `extra`; none
  where not `enabled` (processes other than 0)."""
  if not enabled:
    return Writers([], workdir, enabled=False)
  paths.path(workdir).mkdir(parents=True, exist_ok=True)
  writers = [JsonlWriter(workdir), TensorBoardWriter(workdir),
             ConsoleWriter(start_step, num_steps), *extra]
  if config.get('wandb_project'):
    writers.append(WandbWriter(config.wandb_project, config, workdir))
  return Writers(writers, workdir)


LOG_FILE = 'train.log'


class _OneLine(logging.Formatter):
  """A record's level and first line: its traceback and the rest go to train.log only."""

  def format(self, record: logging.LogRecord) -> str:
    return f'{record.levelname}: {record.getMessage().strip().splitlines()[0]}'


def _for_the_console(record: logging.LogRecord) -> bool:
  """Which records from WARNING up a person reads too (all go to train.log)."""
  if getattr(record, 'log_only', False):  # details of what the run reports in its own words
    return False
  # The storage libraries' view of a write that failed (Orbax's, gcsfs's): the run reports
  # the failure itself, in a sentence that says what to do.
  if f'{os.sep}orbax{os.sep}' in record.pathname or record.name.startswith('gcsfs'):
    return False
  # TensorFlow only decodes images here: its warnings are deprecation notices about
  # tfds's own calls, which the person training can do nothing about (file only).
  return record.name != 'tensorflow' or record.levelno >= logging.ERROR


# Where a person reads: the process's stderr, but while `log_to_workdir` sends that to
# train.log, the terminal it had.
_console = None


def _own_terminal():
  """A stream onto the terminal behind fd 2, or None where sys.stderr is not fd 2 (a
  notebook's or a test's capture object): that object then stays the console."""
  try:
    if sys.stderr.fileno() == 2:
      return os.fdopen(os.dup(2), 'w', buffering=1)
  except (AttributeError, OSError, ValueError):
    pass
  return None


def console():
  """The stream a person reads (the progress bar, warnings, the final message)."""
  return _console or sys.stderr


@contextlib.contextmanager
def log_to_workdir(workdir):
  """For the block, WORKDIR/train.log gets the log records (INFO and up: this project's,
  Orbax's, JAX's...) and everything else the process writes to its stderr: libraries'
  prints, their threads' tracebacks, native code's notices. The console (`console()`) gets
  the progress bar and the records from WARNING up (TensorFlow's from ERROR up), each by
  its first line only, so that libraries' chatter never runs over the progress bar.
  Yields the local file being written: WORKDIR/train.log, or on an object store a local
  file that is copied there at the end. Raises OSError if it cannot be written."""
  global _console
  target = paths.path(workdir) / LOG_FILE
  local = target if not paths.is_remote(target) else paths.path(
      tempfile.mkdtemp(prefix='gnet_jax_log_')) / LOG_FILE
  local.parent.mkdir(parents=True, exist_ok=True)
  log = open(local, 'ab', buffering=0)  # pylint: disable=consider-using-with
  sys.stderr.flush()
  terminal = os.dup(2)
  own = _own_terminal()
  _console = own or sys.stderr
  os.dup2(log.fileno(), 2)
  root = logging.getLogger()
  handlers, level = root.handlers[:], root.level
  to_file = logging.StreamHandler(open(local, 'a', buffering=1))  # pylint: disable=consider-using-with
  to_file.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
  to_console = logging.StreamHandler(_console)
  to_console.setLevel(logging.WARNING)
  to_console.addFilter(_for_the_console)
  to_console.setFormatter(_OneLine())
  root.handlers[:] = [to_file, to_console]
  root.setLevel(logging.INFO)
  try:
    yield local
  finally:
    copy_failed = None
    if local != target:  # while its own chatter still goes to the log
      try:
        to_file.flush()
        paths.move(local, target)
        local.parent.rmdir()
      except Exception as e:  # pylint: disable=broad-except  # the run's outcome counts
        copy_failed = e
    sys.stderr.flush()
    os.dup2(terminal, 2)
    os.close(terminal)
    if own:
      own.close()
    _console = None
    with contextlib.suppress(OSError):  # a full disk fails the last flush: the run says so
      to_file.stream.close()
    with contextlib.suppress(OSError):
      log.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    if copy_failed is not None:
      print(f'train.log stays at {local}: it could not be copied to {target} '
            f'({type(copy_failed).__name__}).', file=sys.stderr, flush=True)
