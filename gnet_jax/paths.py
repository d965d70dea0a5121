"""One path layer for every file a run reads or writes: local folders and object stores
(`gs://bucket/run`) alike, through `etils.epath` (which Orbax and tfds use too).

Workdirs, `config.data_dir`, `config.init_from` and `--checkpoint` all go through `path`.
"""
from __future__ import annotations

import os
import uuid

from etils import epath

from gnet_jax import faults


def is_remote(p) -> bool:
  """Whether `p` names an object store (gs://, s3://, ...) rather than a local path."""
  return '://' in os.fspath(p)


def path(p) -> epath.Path:
  """`p` as an epath.Path: local paths made absolute (with ~ expanded), URLs as they are."""
  s = os.fspath(p)
  if is_remote(s):
    return epath.Path(s)
  return epath.Path(os.path.abspath(os.path.expanduser(s)))


def write_text_atomic(target, text: str) -> None:
  """Writes `text` so that a reader sees the old file or the new one, never half of one:
  locally through a temporary file and a rename; an object store's single write is
  atomic already."""
  target = path(target)
  if is_remote(target):
    target.write_text(text)
    return
  tmp = target.parent / f'.{target.name}.{uuid.uuid4().hex}.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, target)


def move(src, dst) -> None:
  """Moves a file or folder: a rename between local paths; where either side is an object
  store (no folders, no renames of prefixes) each file is copied, then the source removed."""
  src, dst = path(src), path(dst)
  if not (is_remote(src) or is_remote(dst)):
    src.rename(dst)
    return
  if not src.is_dir():
    dst.write_bytes(src.read_bytes())
    src.unlink()
    return
  for entry in src.iterdir():  # object stores refuse recursive globs ('**')
    move(entry, dst / entry.name)
  if src.exists():
    src.rmtree()


def check_writable(workdir) -> None:
  """Raises faults.StorageFault, with the message for the person, unless files can be
  written in `workdir` (made if missing): its bucket exists and answers, or its disk takes
  a file. Checked before a run starts, so that a wrong workdir costs no compile."""
  where = path(workdir)
  try:
    if is_remote(where):
      bucket = path(faults.bucket_of(where))
      if not bucket.exists():
        raise faults.StorageFault('no_bucket', _message('no_bucket', workdir))
    else:
      where.mkdir(parents=True, exist_ok=True)
      probe = where / f'.gnet_jax_probe.{uuid.uuid4().hex}'
      probe.write_text('')
      probe.unlink()
  except faults.StorageFault:
    raise
  except Exception as e:  # pylint: disable=broad-except
    kind = faults.kind_of(e) or ('connection' if is_remote(where) else 'unwritable')
    raise faults.StorageFault(kind, _message(kind, workdir, e)) from e


def _message(kind: str, workdir, error: Exception | None = None) -> str:
  what = faults.describe(kind, workdir)
  why = f' ({getattr(error, "strerror", None) or error})' if error else ''
  return f'Cannot start: {what}{why}. {faults.what_to_do(kind, workdir)}.'
