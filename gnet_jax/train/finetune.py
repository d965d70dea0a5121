"""Fine-tuning: start a run from converted weights or another run's workdir."""
from __future__ import annotations

import jax

from gnet_jax import checkpoint
from gnet_jax.spec import ModelSpec
from gnet_jax.train.state import TrainState

HEADS = ('classifier', 'aux_4a', 'aux_4d')


def init_from(state: TrainState, path, spec: ModelSpec, sharding, log) -> TrainState:
  """`state` with the parameters of the model in `path` (config.init_from).

  A different num_classes (or aux heads the weights lack) keeps those heads freshly
  initialised and says so; a difference in an option that changes what the weights
  compute (`model.ROLES`) is an error naming it. The optimizer state starts afresh.
  """
  variables, source = checkpoint.load_model(path)
  differ = [f'{k}: weights {getattr(source, k)!r}, config {getattr(spec, k)!r} (set '
            f'--config.model.{k}={getattr(source, k)})'
            for k in ModelSpec.with_role('weights') if getattr(source, k) != getattr(spec, k)]
  if differ:
    raise ValueError(f'config.init_from={path!r} does not fit this model: '
                     + '; '.join(differ) + '.')
  fresh = {'params': state.params, 'batch_stats': state.batch_stats}
  merged, kept_fresh = checkpoint.merge_matching(fresh, variables)
  unexpected = [p for p in kept_fresh if not any(f"['{h}']" in p for h in HEADS)]
  if unexpected:
    raise ValueError(f'config.init_from={path!r}: no matching weights for {unexpected[:5]}.')
  merged = jax.device_put(merged, sharding.replicated)
  if kept_fresh:
    log(f'Initialised from {path}; freshly initialised (num_classes '
        f'{source.num_classes} -> {spec.num_classes}, or aux heads the weights lack): '
        f"{sorted({p.split(']')[1] + ']' for p in kept_fresh})}.")
  else:
    log(f'Initialised from {path}: every parameter loaded.')
  opt_state = jax.jit(state.tx.init, out_shardings=sharding.replicated)(merged['params'])
  return state.replace(params=merged['params'], batch_stats=merged['batch_stats'],
                       opt_state=opt_state)
