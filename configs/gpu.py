"""GPU box (one host, every local GPU): bf16 compute with float32 parameters and loss."""
from configs import default


def get_config():
  config = default.get_config()
  config.model.dtype = 'bfloat16'
  config.input_dtype = 'uint8'  # normalised on the GPU
  config.batch_size = 256  # per 8 GPUs of 40+ GB; lr scales with it
  return config
