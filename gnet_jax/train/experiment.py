"""What a config makes before any data flows: the model, optimizer, mesh and jitted steps.

`build` is shared by the training loop, bench/benchmark.py and bench/tpu_report.py (which
compiles it ahead of time for a TPU topology), so every figure measures the step
train.py runs.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gnet_jax import cpu
from gnet_jax.model import GoogLeNet, Inception
from gnet_jax.spec import ModelSpec
from gnet_jax.train import state as state_lib
from gnet_jax.train import steps as steps_lib
from gnet_jax.train.mesh import Sharding


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A config's model and jitted steps on a mesh.

  init() builds the train state on the mesh; train_steps(state, batches, num_steps) runs
  the first num_steps of config.steps_per_execution stacked batches
  (`Sharding.stacked_batches`) and donates the state; eval_step(variables, batch) sums the
  eval metrics of a padded batch for {'params', 'batch_stats'} (the state's or its EMA).
  """
  config: Any  # resolved: num_train_steps and runtime.dtype are the run's own
  spec: ModelSpec
  model: GoogLeNet
  learning_rate_fn: Callable
  tx: Any
  sharding: Sharding
  init: Callable
  train_steps: Callable
  eval_step: Callable
  steps_per_epoch: int
  dtype_reason: str  # why config.runtime.dtype is what it is, for the log
  kernels: str  # where the convolutions run, for the log


  @property
  def num_steps(self) -> int:
    return int(self.config.num_train_steps)

  def abstract_state(self):
    return jax.eval_shape(self.init)

  def compile_train_steps(self, state, batches, num_steps: int):
    """(train_steps compiled for these arguments, seconds, whether from JAX's persistent
    cache). Compiled ahead of the first step so that the memory the compiler frees goes
    back to the OS before the step allocates its own: a lower peak."""
    start = time.perf_counter()
    with _persistent_cache_hits() as hits:
      compiled = self.train_steps.lower(state, batches, np.int32(num_steps)).compile()
    seconds = time.perf_counter() - start
    _release_freed_host_memory()
    return compiled, seconds, bool(hits)


@contextlib.contextmanager
def _persistent_cache_hits():
  """Yields a list that gains an entry for each executable JAX loads from its persistent
  compilation cache (train.py --compilation_cache_dir) inside the block."""
  hits = []

  def listener(event, **_):
    if event == '/jax/compilation_cache/cache_hits':
      hits.append(event)
  jax.monitoring.register_event_listener(listener)
  try:
    yield hits
  finally:
    # jax < 0.8 cannot unregister one listener: there it stays, filling a list no one reads.
    if hasattr(jax.monitoring, 'unregister_event_listener'):
      jax.monitoring.unregister_event_listener(listener)


def _release_freed_host_memory() -> None:
  """Returns the memory a compile freed to the OS (glibc's malloc_trim; a no-op elsewhere),
  so that the compiler's high-water mark does not add to the step's."""
  try:
    ctypes.CDLL(ctypes.util.find_library('c')).malloc_trim(0)
  except (OSError, AttributeError, TypeError):
    pass


def resolve_steps(config, num_train_examples: int) -> tuple[int, int]:
  """(steps per epoch, total train steps); num_train_steps > 0 overrides num_epochs."""
  steps_per_epoch = max(1, num_train_examples // config.batch_size)
  if config.num_train_steps > 0:
    return steps_per_epoch, config.num_train_steps
  return steps_per_epoch, int(round(config.num_epochs * steps_per_epoch))


DTYPES = ('auto', 'float32', 'bfloat16', 'float16')
# CUDA GPUs compute bfloat16 natively from compute capability 8.0 (A100) on.
BFLOAT16_COMPUTE_CAPABILITY = (8, 0)


def compute_dtype(choice: str, devices) -> tuple[str, str]:
  """(the computation dtype, why) that config.runtime.dtype `choice` means on `devices`.

  'auto' is bfloat16 on TPUs and on GPUs that compute it natively (compute capability 8.0
  and up: A100, L4, H100...), float16 with the dynamic loss scale on older GPUs (T4, V100,
  P100), and float32 on CPUs, which emulate both at a fraction of float32's speed.
  """
  if choice not in DTYPES:
    raise ValueError(f'config.runtime.dtype must be one of {DTYPES}, got {choice!r}.')
  if choice != 'auto':
    return choice, 'config.runtime.dtype'
  device = devices[0]
  kind = f'{device.platform.upper()} {device.device_kind}'
  if device.platform == 'tpu':
    return 'bfloat16', f'auto: {kind}'
  if device.platform == 'cpu':
    return 'float32', 'auto: CPUs emulate bfloat16 and float16'
  capability = getattr(device, 'compute_capability', None)  # CUDA only
  if capability is None:
    return 'bfloat16', f'auto: {kind}'
  version = tuple(int(v) for v in str(capability).split('.')[:2])
  if version >= BFLOAT16_COMPUTE_CAPABILITY:
    return 'bfloat16', f'auto: {kind}, compute capability {capability}'
  return 'float16', (f'auto: {kind}, compute capability {capability}, has no bfloat16 '
                     'units; float16 with a dynamic loss scale')


def model_blocks(config, devices) -> dict:
  """The blocks the model is built with for `devices`: the CPU plug-in's choice
  (`cpu.model_blocks`) and, with config.runtime.remat, Inception blocks that recompute their
  activations in the backward pass instead of keeping them (less memory, more FLOPs)."""
  blocks = cpu.model_blocks(config.runtime.cpu_convolutions, devices)
  if config.runtime.remat:
    # Argument 2 of Inception.__call__(self, x, train) is a Python bool.
    blocks['inception_block'] = nn.remat(Inception, static_argnums=(2,))
  return blocks


def build(config, spec: ModelSpec, num_train_examples: int, devices=None,
          blocks: dict | None = None) -> Experiment:
  """The experiment of `config` for `spec` on `devices` (default: every device); `blocks`
  replaces `model_blocks(config, devices)` (bench/tpu_report.py compares choices)."""
  if config.steps_per_execution < 1:
    raise ValueError('config.steps_per_execution (train steps per call) must be >= 1, got '
                     f'{config.steps_per_execution}.')
  steps_per_epoch, num_steps = resolve_steps(config, num_train_examples)
  sharding = Sharding.create(devices)
  dtype, dtype_reason = compute_dtype(config.runtime.dtype, sharding.devices)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.num_train_steps = num_steps
    config.runtime.dtype = dtype
  if blocks is None:
    blocks = model_blocks(config, sharding.devices)
  model = spec.build(dtype=jnp.dtype(config.runtime.dtype), **blocks)
  learning_rate_fn = state_lib.create_learning_rate_fn(config, steps_per_epoch)
  tx = state_lib.create_optimizer(config, learning_rate_fn)
  init = jax.jit(functools.partial(state_lib.create_train_state, config, model, tx,
                                   spec.image_size),
                 out_shardings=sharding.replicated)
  state_sharding = jax.tree.map(lambda _: sharding.replicated, jax.eval_shape(init))
  step_fn = functools.partial(steps_lib.train_step, model=model,
                              learning_rate_fn=learning_rate_fn,
                              label_smoothing=config.label_smoothing,
                              skip_nonfinite=config.skip_nonfinite_steps,
                              grad_accum_steps=config.grad_accum_steps,
                              ema_decay=config.ema_decay)
  train = jax.jit(functools.partial(steps_lib.train_steps, step_fn=step_fn),
                  in_shardings=(state_sharding, sharding.stacked, sharding.replicated),
                  out_shardings=(state_sharding, sharding.replicated), donate_argnums=0)
  evaluate = jax.jit(functools.partial(steps_lib.eval_step, model=model),
                     in_shardings=(sharding.replicated, sharding.data),
                     out_shardings=sharding.replicated)
  return Experiment(config=config, spec=spec, model=model, learning_rate_fn=learning_rate_fn,
                    tx=tx, sharding=sharding, init=init, train_steps=train,
                    eval_step=evaluate, steps_per_epoch=steps_per_epoch,
                    dtype_reason=dtype_reason, kernels=cpu.describe(blocks))
