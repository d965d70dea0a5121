"""gnet_jax: GoogLeNet (Inception v1) in JAX/Flax."""
from gnet_jax.checkpoint import load_model, load_variables
from gnet_jax.model import GoogLeNet, GoogLeNetOutputs, Inception, apply_fn, init_fn

__all__ = ['GoogLeNet', 'GoogLeNetOutputs', 'Inception', 'apply_fn', 'init_fn', 'load_model',
           'load_variables']
