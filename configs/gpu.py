"""GPU box (one host, every local GPU): bfloat16 compute (float16 with a loss scale on GPUs
older than the A100: config.runtime.dtype 'auto'), float32 parameters and loss, uint8 images."""
from configs import default


def get_config():
  config = default.get_config()
  config.input_dtype = 'uint8'  # normalised on the GPU
  config.batch_size = 256  # per 8 GPUs of 40+ GB; lr scales with it
  return config
