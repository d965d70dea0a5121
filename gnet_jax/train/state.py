"""The train state, the optimizer and the learning-rate schedule."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
  """Everything a run needs to continue: a checkpoint holds exactly its array fields."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key; step k uses fold_in(rng, k), so resumes replay it
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  def apply_gradients(self, grads, batch_stats):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)


def create_learning_rate_fn(config, steps_per_epoch: int):
  """Base lr scaled linearly with the global batch (base_learning_rate is for 256)."""
  lr = config.base_learning_rate * config.batch_size / 256
  warmup = int(config.warmup_epochs * steps_per_epoch)
  total = config.num_train_steps
  if config.lr_schedule == 'paper':
    # "decreasing the learning rate by 4% every 8 epochs" (section 6).
    main = optax.exponential_decay(lr, transition_steps=max(1, 8 * steps_per_epoch),
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
  return optax.chain(*chain)


def create_train_state(config, model: nn.Module, tx, image_size: int) -> TrainState:
  """The initial state; jit it with out_shardings to build it directly on the mesh."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  init_key, dropout_key = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = model.init(init_key, images, train=False)
  params = variables['params']
  return TrainState(step=jnp.array(0, jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                    rng=dropout_key, tx=tx)
