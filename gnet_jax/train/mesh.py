"""The device mesh: one 'data' axis over every device of every process.

The batch is sharded on 'data', parameters and optimizer state are replicated, so
BatchNorm statistics and gradients are over the global batch without any `axis_name`.
Each process feeds its own slice (`jax.make_array_from_process_local_data`).
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


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
