"""What a person sees of a run: a progress bar, TensorBoard events, metrics.jsonl, curves.png.

Only process 0 writes (`enabled=False` elsewhere), so a multi-host run logs once.
`metrics.jsonl` has one JSON object a line: {"step", "split", "loss", "top1", "top5",
...} (train lines add "lr" and "images_per_sec"), for scripts to read a run.
"""
from __future__ import annotations

import json
import logging
import os

import tqdm

METRICS_FILE = 'metrics.jsonl'
CURVES_FILE = 'curves.png'


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(records: list[dict], path: str) -> None:
  """Loss and top-1 against step, train and eval, side by side."""
  # A bare Figure: no pyplot, so no global backend is touched (notebooks keep theirs).
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(11, 4))
  axes = fig.subplots(1, 2)
  titles = ('loss (train: with aux heads and label smoothing)', 'top-1 accuracy')
  for ax, key, title in zip(axes, ('loss', 'top1'), titles):
    for split, style in (('train', '-'), ('eval', 'o-')):
      rows = [r for r in records if r['split'] == split and key in r]
      if rows:
        ax.plot([r['step'] for r in rows], [r[key] for r in rows], style, label=split)
    ax.set_xlabel('step')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


class _NoProgress:
  def update(self, n=1):
    pass

  def set_postfix(self, **kwargs):
    pass

  def write(self, s):
    pass

  def close(self):
    pass


class MetricWriter:
  """Writes scalars to TensorBoard and metrics.jsonl, and plots curves.png on close."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      self._tf = tf
      self._tb = tf.summary.create_file_writer(workdir)

  def log(self, message: str) -> None:
    if self.enabled:
      logging.info(message)
      print(message, flush=True)

  def write_config(self, config) -> None:
    if self.enabled:
      with open(os.path.join(self.workdir, 'config.json'), 'w') as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    with self._tb.as_default(step=step):
      for name, value in metrics.items():
        self._tf.summary.scalar(f'{split}/{name}', value)
    self._tb.flush()
    with open(os.path.join(self.workdir, METRICS_FILE), 'a') as f:
      f.write(json.dumps({'step': step, 'split': split, **metrics}) + '\n')

  def progress(self, start: int, total: int):
    if not self.enabled:
      return _NoProgress()
    return tqdm.tqdm(total=total, initial=start, unit='step', dynamic_ncols=True,
                     mininterval=1.0, desc='train')

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      plot_curves(read_metrics(self.workdir), os.path.join(self.workdir, CURVES_FILE))
