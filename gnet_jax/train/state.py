"""The train state, the optimizer, the learning-rate schedule, weight EMA and the dynamic
loss scale of float16 training.

Options (each off by default, and then the state and the step are exactly as without it):
- config.grad_accum_steps = k: optax.MultiSteps accumulates the gradients of k steps (k
  batches of config.batch_size) and applies their mean once, so an update is that of a
  k-times larger batch; the accumulator lives in the optimizer state, so a checkpoint in
  the middle of a cycle resumes exactly. The learning rate scales with the effective
  batch and its schedule counts updates.
- config.ema_decay = d: `ema` holds an exponential moving average of the parameters and
  BatchNorm statistics, ema = d * ema + (1 - d) * new after each update.
- config.runtime.dtype = 'float16': `loss_scale` holds a dynamic loss scale (`LossScale`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
  """Everything a run needs to continue: a checkpoint holds exactly its array fields (the
  optional ones when they are not None)."""
  step: jax.Array  # batches consumed (with grad_accum_steps = k, k per update)
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key; step k uses fold_in(rng, k), so resumes replay it
  ema: Any = None  # {'params', 'batch_stats'} with config.ema_decay
  loss_scale: Any = None  # LossScale.init() with float16
  tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)


class LossScale:
  """Dynamic loss scaling for float16 (as in mixed-precision training, Micikevicius et al.
  2018): the loss is multiplied by `scale` before differentiation and the gradients
  divided by it after; a step whose gradients overflow is skipped and the scale halved,
  and after `PERIOD` finite steps in a row it doubles."""
  INITIAL = 2.0 ** 15
  PERIOD = 2000
  MINIMUM = 1.0

  @staticmethod
  def init() -> dict:
    return {'scale': jnp.asarray(LossScale.INITIAL, jnp.float32),
            'good_steps': jnp.asarray(0, jnp.int32)}

  @staticmethod
  def adjust(state: dict, finite) -> dict:
    grow = state['good_steps'] + 1 >= LossScale.PERIOD
    scale = jnp.where(finite, jnp.where(grow, state['scale'] * 2, state['scale']),
                      jnp.maximum(state['scale'] / 2, LossScale.MINIMUM))
    good = jnp.where(finite & ~grow, state['good_steps'] + 1, 0)
    return {'scale': scale, 'good_steps': good.astype(jnp.int32)}


def effective_batch_size(config) -> int:
  """Examples per parameter update: config.batch_size times config.grad_accum_steps."""
  return config.batch_size * config.get('grad_accum_steps', 1)


def create_learning_rate_fn(config, steps_per_epoch: int):
  """lr as a function of the update count: base lr scaled linearly with the effective
  batch (base_learning_rate is for 256); `steps_per_epoch` counts batches."""
  k = config.get('grad_accum_steps', 1)
  lr = config.base_learning_rate * effective_batch_size(config) / 256
  updates_per_epoch = max(1, steps_per_epoch // k)
  warmup = int(config.warmup_epochs * updates_per_epoch)
  total = config.num_train_steps // k
  if config.lr_schedule == 'paper':
    # "decreasing the learning rate by 4% every 8 epochs" (section 6).
    main = optax.exponential_decay(lr, transition_steps=max(1, 8 * updates_per_epoch),
                                   decay_rate=0.96, staircase=True)
  elif config.lr_schedule == 'cosine':
    main = optax.cosine_decay_schedule(lr, decay_steps=max(1, total - warmup))
  elif config.lr_schedule == 'constant':
    main = optax.constant_schedule(lr)
  else:
    raise ValueError(f"config.lr_schedule={config.lr_schedule!r}: use 'paper', 'cosine' "
                     "or 'constant'.")
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(params):
  """Weight decay on conv and dense kernels only, not on BatchNorm or biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def create_optimizer(config, learning_rate_fn) -> optax.GradientTransformation:
  chain = []
  if config.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == 'sgd':
    chain += [optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
              optax.sgd(learning_rate_fn, momentum=config.momentum, nesterov=config.nesterov)]
  elif config.optimizer == 'adamw':
    chain.append(optax.adamw(learning_rate_fn, weight_decay=config.weight_decay,
                             mask=decay_mask))
  else:
    raise ValueError(f"config.optimizer={config.optimizer!r}: use 'sgd' or 'adamw'.")
  tx = optax.chain(*chain)
  k = config.get('grad_accum_steps', 1)
  if not isinstance(k, int) or k < 1:
    raise ValueError(f'config.grad_accum_steps must be an integer >= 1, got {k!r}.')
  return optax.MultiSteps(tx, every_k_schedule=k) if k > 1 else tx


def check_ema_decay(decay) -> float:
  if not 0.0 <= decay < 1.0:
    raise ValueError(f'config.ema_decay must be in [0, 1) (0 turns the EMA off), got {decay}.')
  return float(decay)


def create_train_state(config, model: nn.Module, tx, image_size: int) -> TrainState:
  """The initial state; jit it with out_shardings to build it directly on the mesh."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  init_key, dropout_key = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = model.init(init_key, images, train=False)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  ema = None
  if check_ema_decay(config.get('ema_decay', 0.0)):
    ema = jax.tree.map(jnp.copy, {'params': params, 'batch_stats': batch_stats})
  return TrainState(step=jnp.array(0, jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), rng=dropout_key, ema=ema,
                    loss_scale=LossScale.init() if config.runtime.dtype == 'float16' else None,
                    tx=tx)
