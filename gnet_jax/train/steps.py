"""The train and eval steps: pure functions of (state, batch), jitted by `experiment`.

Images come as uint8 pixels or normalised floats (`config.input_dtype`); uint8 ones are
normalised as the step's first operation (`gnet_jax.images.normalize`), which XLA fuses
with the model's cast to its dtype into one pass on the device. The loss is label-smoothed cross-entropy on the logits plus 0.3 times each auxiliary
head's (the paper's weight). Dropout in step k uses fold_in(state.rng, k), so a resumed
run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from gnet_jax.images import normalize
from gnet_jax.model import GoogLeNet, GoogLeNetOutputs
from gnet_jax.train.state import LossScale, TrainState

AUX_LOSS_WEIGHT = 0.3  # the paper's weight for each auxiliary head's loss


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def topk_correct(logits, labels, k: int):
  """1.0 where the label is among the k largest logits."""
  top = jax.lax.top_k(logits, min(k, logits.shape[-1]))[1]
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def train_step(state: TrainState, batch, *, model: GoogLeNet, learning_rate_fn,
               label_smoothing: float = 0.0, skip_nonfinite: bool = False,
               grad_accum_steps: int = 1, ema_decay: float = 0.0):
  """One step on a global batch: gradients, the optimizer (an update every
  grad_accum_steps steps), the EMA, the loss scale; returns (new state, metrics).

  A step whose loss or gradients are not finite leaves the parameters, statistics,
  optimizer state and EMA as they were when skip_nonfinite is set, and always with a loss
  scale (float16, where it also halves the scale); the step counter still advances, so
  the next step takes the next batch; metrics['skipped'] is then 1.
  """
  dropout_key = jax.random.fold_in(state.rng, state.step)
  images = normalize(batch['image'])
  scale = None if state.loss_scale is None else state.loss_scale['scale']

  def loss_fn(params):
    outputs, new_state = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        rngs={'dropout': dropout_key}, mutable=['batch_stats'])
    ce = functools.partial(cross_entropy, labels=batch['label'],
                           num_classes=model.num_classes, label_smoothing=label_smoothing)
    if isinstance(outputs, GoogLeNetOutputs):
      logits = outputs.logits
      loss = jnp.mean(ce(logits)) + AUX_LOSS_WEIGHT * (
          jnp.mean(ce(outputs.aux_4a)) + jnp.mean(ce(outputs.aux_4d)))
    else:
      logits = outputs
      loss = jnp.mean(ce(logits))
    scaled = loss if scale is None else loss * scale
    return scaled, (loss, logits, new_state.get('batch_stats', {}))

  (_, (loss, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  if scale is not None:
    grads = jax.tree.map(lambda g: g / scale, grads)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  if state.ema is not None:
    # With accumulation the parameters move once per cycle: so does their average.
    updated = opt_state.mini_step == 0 if grad_accum_steps > 1 else True
    averaged = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.ema,
                            {'params': params, 'batch_stats': batch_stats})
    new_state = new_state.replace(ema=jax.tree.map(
        lambda a, e: jnp.where(updated, a, e), averaged, state.ema))
  metrics = {
      'loss': loss,
      'top1': jnp.mean(topk_correct(logits, batch['label'], 1)),
      'top5': jnp.mean(topk_correct(logits, batch['label'], 5)),
      'lr': learning_rate_fn(state.step // grad_accum_steps),
  }
  if skip_nonfinite or scale is not None:
    ok = jnp.isfinite(loss) & jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state,
                             state).replace(step=new_state.step)
    metrics['skipped'] = 1.0 - ok.astype(jnp.float32)
    if scale is not None:
      new_state = new_state.replace(loss_scale=LossScale.adjust(state.loss_scale, ok))
      metrics['loss_scale'] = scale
  return new_state, metrics


def train_steps(state: TrainState, batches, num_steps, *, step_fn):
  """`num_steps` (1 to K) steps of `step_fn` in one call, on the first `num_steps` of K
  stacked batches (leading axis K); returns (new state, each metric stacked over K, the
  rows from num_steps on zero).

  XLA allocates a program's temporaries afresh for each call, and on CPU their page
  faults are a large part of a call; K steps per call (config.steps_per_execution) pay
  that once (BENCHMARKS.md, "CPU choices").
  """
  k = jax.tree.leaves(batches)[0].shape[0]
  nth = lambda i: jax.tree.map(lambda x: x[i], batches)
  _, metrics_shape = jax.eval_shape(step_fn, state, nth(0))
  history = jax.tree.map(lambda m: jnp.zeros((k, *m.shape), m.dtype), metrics_shape)

  def body(i, carry):
    state, history = carry
    state, metrics = step_fn(state, nth(i))
    return state, jax.tree.map(lambda h, m: h.at[i].set(m), history, metrics)
  return jax.lax.fori_loop(0, num_steps, body, (state, history))


def eval_step(variables, batch, *, model: GoogLeNet):
  """Sums over the unmasked examples of a (padded) eval batch, for `variables`
  ({'params', 'batch_stats'}: the state's, or its EMA)."""
  logits = model.apply(variables, normalize(batch['image']), train=False)
  mask = batch['mask'].astype(jnp.float32)
  loss = cross_entropy(logits, batch['label'], model.num_classes)
  return {
      'loss': jnp.sum(loss * mask),
      'top1': jnp.sum(topk_correct(logits, batch['label'], 1) * mask),
      'top5': jnp.sum(topk_correct(logits, batch['label'], 5) * mask),
      'count': jnp.sum(mask),
  }
