"""The device mesh: one 'data' axis over every device of every process.

The batch is sharded on 'data', parameters and optimizer state are replicated, so
BatchNorm statistics and gradients are over the global batch without any `axis_name`.
Each process feeds its own slice (`jax.make_array_from_process_local_data`).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def check_batch_size(batch_size: int, process_count: int, device_count: int) -> None:
  """Raises ValueError unless the global batch splits evenly over processes and devices."""
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f'config.batch_size must be a positive integer, got {batch_size!r}.')
  if process_count <= 0 or device_count <= 0:
    raise ValueError(f'process_count ({process_count}) and device_count ({device_count}) '
                     'must be positive.')
  if device_count % process_count:
    raise ValueError(f'{device_count} devices do not split evenly over {process_count} '
                     'processes; every process must drive the same number of devices.')
  for count, what in ((process_count, 'processes (jax.process_count())'),
                      (device_count, 'devices (jax.device_count())')):
    if batch_size % count:
      step = math.lcm(process_count, device_count)
      lower, upper = (batch_size // step) * step, (batch_size // step + 1) * step
      hint = f'{lower} or {upper}' if lower else f'{upper}'
      raise ValueError(
          f'config.batch_size={batch_size} is the global batch over all devices and '
          f'processes, and it does not divide by the {count} {what}. Use a multiple '
          f'of {step}, e.g. --config.batch_size={hint}.')


@dataclasses.dataclass(frozen=True)
class Sharding:
  mesh: Mesh
  data: NamedSharding  # batch axis split over every device of every process
  stacked: NamedSharding  # K stacked batches (train_steps): their batch axis split
  replicated: NamedSharding

  @classmethod
  def create(cls, devices=None) -> 'Sharding':
    """Over `devices` (default: every device of every process; also a TPU topology's)."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    mesh = Mesh(devices.reshape(-1), ('data',))
    return cls(mesh, NamedSharding(mesh, P('data')), NamedSharding(mesh, P(None, 'data')),
               NamedSharding(mesh, P()))

  @property
  def devices(self) -> list:
    return list(self.mesh.devices.flat)

  def global_batch(self, local_batch: dict) -> dict:
    """This process's slice of the batch -> global arrays sharded on 'data'."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.data, x),
                        local_batch)

  def stacked_batches(self, local_batches: list[dict], k: int) -> dict:
    """This process's slices of up to k batches -> k stacked global batches (train_steps's
    input); fewer than k are padded with copies of the last, which train_steps skips."""
    padded = local_batches + local_batches[-1:] * (k - len(local_batches))
    return jax.tree.map(
        lambda *xs: jax.make_array_from_process_local_data(self.stacked, np.stack(xs)),
        *padded)
