"""CPU: float32 images and computation (config.runtime.dtype 'auto' is float32 there), a batch
a CPU can hold."""
from configs import default


def get_config():
  config = default.get_config()
  config.batch_size = 32
  config.log_every_steps = 10
  # XLA CPU page-faults in the step's temporaries afresh for every call: several steps per
  # call pay that once (BENCHMARKS.md, "CPU choices").
  config.steps_per_execution = 5
  return config
