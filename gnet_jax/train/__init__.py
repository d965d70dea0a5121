"""Training: the state and optimizer (`state`), the pure steps (`steps`), the mesh
(`mesh`), what a config builds (`experiment`), fine-tuning (`finetune`) and the loop
(`loop.train_and_evaluate`)."""
from gnet_jax.train.experiment import Experiment, build
from gnet_jax.train.loop import evaluate, train_and_evaluate
from gnet_jax.train.mesh import Sharding
from gnet_jax.train.state import TrainState

__all__ = ['Experiment', 'Sharding', 'TrainState', 'build', 'evaluate',
           'train_and_evaluate']
