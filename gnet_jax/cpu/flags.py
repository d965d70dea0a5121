"""CPU tuning: XLA settings that make the train step faster and use less memory
(BENCHMARKS.md, "CPU choices").

XLA reads XLA_FLAGS once, when JAX first touches a device, so call
`use_fast_cpu_kernels()` before any JAX computation (train.py, predict and bench/ do).
It only changes the CPU backend; GPU and TPU runs are unaffected.
"""
import os

import jax

# XLA CPU's default hands convolutions to the YNNPACK library, whose kernel gradients are
# slower than XLA's own (Eigen) convolutions here; reductions (BatchNorm statistics) stay
# with YNNPACK, where they are faster. The scheduler that favours running independent ops
# at once keeps more activations alive for no gain on GoogLeNet.
FAST_CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=reduce',
                  '--xla_cpu_enable_concurrency_optimized_scheduler=false')

# XLA aborts the process on a flag it does not know, so only the versions checked to have
# these (jaxlib 0.10.2 and 0.12.0) get them.
_KNOWN_VERSIONS = ((0, 10), (0, 13))


def flags_known() -> bool:
  """Whether this jax's XLA is one checked to know FAST_CPU_FLAGS."""
  low, high = _KNOWN_VERSIONS
  return low <= jax.__version_info__[:2] < high


def use_fast_cpu_kernels() -> bool:
  """Adds FAST_CPU_FLAGS to XLA_FLAGS where this jax knows them; returns whether they are
  in effect.

  A flag the user already set in XLA_FLAGS is left as it is. Too late once JAX's
  backends exist: then nothing changes and the return value says whether they were set.
  """
  current = os.environ.get('XLA_FLAGS', '')
  missing = [f for f in FAST_CPU_FLAGS if f.split('=')[0] not in current]
  if missing and flags_known() and not backends_started():
    current = os.environ['XLA_FLAGS'] = ' '.join([current, *missing]).strip()
  return all(f in current.split() for f in FAST_CPU_FLAGS)


def backends_started() -> bool:
  """Whether JAX has created its backends, after which it reads XLA_FLAGS no more. JAX has
  no public way to ask: its private one, else False (the flags are then set, and
  apply unless a backend started already)."""
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    return False
