"""The CPU plug-in: XLA CPU flags (`flags`), the C++/oneDNN kernels (`build`, `ops`) and
the GoogLeNet blocks made of them (`blocks`). The model never imports this package;
`model_blocks` is the one place that decides which blocks a program gets.

    from gnet_jax import cpu
    cpu.use_fast_cpu_kernels()                    # before the first JAX computation
    model = spec.build(**cpu.model_blocks('auto', jax.devices()))
"""
from __future__ import annotations

from gnet_jax.cpu.flags import FAST_CPU_FLAGS, use_fast_cpu_kernels

CHOICES = ('auto', 'onednn', 'xla')

__all__ = ['CHOICES', 'FAST_CPU_FLAGS', 'describe', 'model_blocks', 'use_fast_cpu_kernels']


def model_blocks(choice: str, devices) -> dict:
  """GoogLeNet's `conv_block`/`pool_block` for a program on `devices` (config.runtime.
  cpu_convolutions is `choice`): keyword arguments for `GoogLeNet` or `ModelSpec.build`.

  Every choice computes the same function; they differ in speed (BENCHMARKS.md):
  - CPU, one device ('auto' or 'onednn'): oneDNN and C++ (`blocks.OneDNNConv`,
    `blocks.OneDNNMaxPool`). XLA cannot split their calls over devices, so 'auto' keeps
    them to single-device programs.
  - CPU otherwise ('xla', or several devices): XLA's convolutions with the gathered
    max-pool gradient (`pool.GatherMaxPool`), a third of a train step faster there.
  - GPU and TPU: the model's own blocks; by the compiler's estimate XLA's max-pool
    gradient moves fewer bytes than the gathered one on a TPU (BENCHMARKS.md, TPU).
  """
  if choice not in CHOICES:
    raise ValueError(f'config.runtime.cpu_convolutions must be one of {CHOICES}, got '
                     f'{choice!r}.')
  devices = list(devices)
  if devices[0].platform != 'cpu':
    return {}
  if choice == 'onednn' or (choice == 'auto' and len(devices) == 1):
    from gnet_jax.cpu import blocks  # pylint: disable=import-outside-toplevel
    return {'conv_block': blocks.OneDNNConv, 'pool_block': blocks.OneDNNMaxPool}
  from gnet_jax.cpu.pool import GatherMaxPool  # pylint: disable=import-outside-toplevel
  return {'pool_block': GatherMaxPool}


def describe(blocks: dict) -> str:
  """Where `model_blocks`'s choice runs the convolutions, for the log."""
  conv = blocks.get('conv_block')
  if conv is not None and conv.__module__ == 'gnet_jax.cpu.blocks':
    from gnet_jax.cpu import build  # pylint: disable=import-outside-toplevel
    return 'oneDNN' if build.available() else 'XLA (oneDNN unavailable)'
  return 'XLA'
