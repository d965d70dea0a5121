"""Cloud TPU (a v3-8 up to a pod slice): bf16 compute, a large global batch.

On a multi-host slice, run the same command on every host with --multihost.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.model.dtype = 'bfloat16'
  config.input_dtype = 'bfloat16'
  config.batch_size = 1024  # global; the learning rate scales with it
  config.warmup_epochs = 5
  return config
