"""Which accelerator JAX computes on, and a plain warning where the machine has a GPU or TPU
that JAX does not: a CUDA plug-in or libtpu of another version than jaxlib's, or none,
and JAX falls back to the CPU with only a log line.

    from gnet_jax import accelerators
    print(accelerators.report())    # the notebook's first cell does this
"""
from __future__ import annotations

import glob
import importlib.metadata
import os
import re

# The packages that must be at jaxlib's version for JAX to load them.
PLUGINS = ('jax-cuda12-plugin', 'jax-cuda12-pjrt', 'jax-cuda13-plugin', 'jax-cuda13-pjrt')


def _version(distribution: str) -> str | None:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return None


def _pinned(version: str, pin: str) -> bool:
  """Whether `version` is what `==pin` allows, with PEP 440's trailing `.*` prefix match."""
  if pin.endswith('.*'):
    return version == pin[:-2] or version.startswith(pin[:-1])
  return version == pin


def libtpu_pin() -> str | None:
  """The libtpu version the installed jax asks for with its `tpu` extra (jax[tpu])."""
  for requirement in importlib.metadata.requires('jax') or ():
    found = re.match(r'libtpu\s*==\s*([^;\s]+)\s*;.*extra\s*==\s*"tpu"', requirement)
    if found:
      return found.group(1)
  return None


def version_mismatches() -> list[str]:
  """What of the jax stack is installed at versions that do not belong together."""
  jaxlib = _version('jaxlib')
  problems = [f'{p} {v} is not at jaxlib\'s version {jaxlib}' for p in PLUGINS
              if (v := _version(p)) is not None and v != jaxlib]
  libtpu, pin = _version('libtpu'), libtpu_pin()
  if libtpu is not None and pin is not None and not _pinned(libtpu, pin):
    problems.append(f'libtpu {libtpu} is not the {pin} that jax {_version("jax")} asks for')
  return problems


def hardware(dev: str = '/dev', environ=None) -> list[str]:
  """The accelerators this machine has, whether or not JAX uses them: 'GPU' where an
  NVIDIA driver's device files are, 'TPU' where a TPU's are (or Colab or a TPU VM says
  so)."""
  environ = os.environ if environ is None else environ
  found = []
  if glob.glob(os.path.join(dev, 'nvidia[0-9]*')):
    found.append('GPU')
  if (glob.glob(os.path.join(dev, 'accel[0-9]*'))
      or glob.glob(os.path.join(dev, 'vfio', '[0-9]*'))
      or environ.get('TPU_ACCELERATOR_TYPE') or environ.get('COLAB_TPU_ADDR')):
    found.append('TPU')
  return found


def problems(devices, dev: str = '/dev', environ=None) -> list[str]:
  """What a person should fix for JAX to use this machine's accelerators (`devices`: the
  ones JAX computes on): an accelerator it does not use, versions that do not match."""
  platform = devices[0].platform
  unused = [h for h in hardware(dev, environ) if h.lower() != platform]
  found = []
  if unused:
    found.append(f'This machine has a {" and a ".join(unused)} that JAX does not use. '
                 'Install the jax stack at matching versions, e.g. pip install -U "jax[cuda12]" '
                 'on a GPU or "jax[tpu]" on a TPU, then restart the runtime.')
  return found + [f'Version mismatch: {p}.' for p in version_mismatches()]


def report(devices=None, dev: str = '/dev', environ=None) -> str:
  """One paragraph for a person: what JAX computes on (`devices`, default jax.devices()),
  and `problems`."""
  if devices is None:
    import jax  # pylint: disable=import-outside-toplevel
    devices = jax.devices()
  return '\n'.join([f'JAX computes on {len(devices)} {devices[0].platform.upper()} '
                    f'device(s): {devices[0].device_kind}.',
                    *problems(devices, dev, environ)])
