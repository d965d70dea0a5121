"""gnet_jax: GoogLeNet (Inception v1) in JAX/Flax.

`from gnet_jax import GoogLeNet, init_fn, apply_fn, ModelSpec` imports the model alone
(flax and jax): no TensorFlow, Orbax, torch or C++ build. `load_model` and
`load_variables` (gnet_jax.checkpoint, which needs Orbax) are imported on first use.
"""
from gnet_jax.model import GoogLeNet, GoogLeNetOutputs, Inception, apply_fn, init_fn
from gnet_jax.spec import ModelSpec

__all__ = ['GoogLeNet', 'GoogLeNetOutputs', 'Inception', 'ModelSpec', 'apply_fn', 'init_fn',
           'load_model', 'load_variables']


def __getattr__(name):
  if name in ('load_model', 'load_variables'):
    from gnet_jax import checkpoint  # pylint: disable=import-outside-toplevel
    return getattr(checkpoint, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
