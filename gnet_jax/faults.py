"""The environment failing under a run, in plain words: a full disk, a workdir that cannot be
written, an object-store bucket that does not exist, a lost connection to the store.

`kind_of` reads what an exception from a write means, whichever library raised it (the
OS, Orbax's tensorstore, gcsfs, aiohttp); `StorageFault` carries the one short message a
person gets, which says what failed, where, and what to do. Nothing here retries,
deletes or moves anything.
"""
from __future__ import annotations

import errno

# kind -> (what the exception's text says, errno values that mean it)
_SIGNS = {
    'disk_full': (('no space left on device', "os_error_code='28'", 'disk quota exceeded',
                   'enospc'), (errno.ENOSPC, errno.EDQUOT)),
    'unwritable': (('read-only file system', 'permission denied', 'operation not permitted'),
                   (errno.EROFS, errno.EACCES, errno.EPERM)),
    'no_bucket': (('bucket does not exist', 'nosuchbucket', 'no such bucket'), ()),
    'connection': (('connection refused', 'cannot connect to host', 'failed to connect',
                    'connection reset', 'server disconnected', 'couldn\'t connect',
                    'could not connect', 'unavailable: ', 'timed out'), ()),
}


class StorageFault(RuntimeError):
  """The workdir's storage failed the run; str() is the message for the person."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


def _chain(error: BaseException):
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def kind_of(error: BaseException) -> str | None:
  """'disk_full', 'unwritable', 'no_bucket', 'connection', or None for another error."""
  for e in _chain(error):
    if isinstance(e, StorageFault):
      return e.kind
    number = getattr(e, 'errno', None)
    text = f'{type(e).__name__}: {e}'.lower()
    for kind, (phrases, numbers) in _SIGNS.items():
      if number in numbers or any(p in text for p in phrases):
        return kind
    if isinstance(e, ConnectionError):
      return 'connection'
  return None


def bucket_of(path) -> str:
  """'gs://bucket' of 'gs://bucket/run/...'."""
  scheme, _, rest = str(path).partition('://')
  return f'{scheme}://{rest.split("/", 1)[0]}'


def describe(kind: str, where) -> str:
  """What failed, in a few words, for `where` (a path)."""
  return {
      'disk_full': f'no space is left on the disk of {where}',
      'unwritable': f'{where} cannot be written',
      'no_bucket': f'the bucket {bucket_of(where)} does not exist (or these credentials cannot '
                   'see it)',
      'connection': f'the connection to {bucket_of(where)} was lost',
  }[kind]


def what_to_do(kind: str, where) -> str:
  return {
      'disk_full': 'Free space there, or move the workdir to a larger disk, then run the '
                   'same command again to resume',
      'unwritable': 'Make it writable, or choose another --workdir',
      'no_bucket': f'Create it (gcloud storage buckets create {bucket_of(where)}) or choose '
                   'another --workdir',
      'connection': 'Run the same command again once the connection is back, to resume',
  }[kind]
