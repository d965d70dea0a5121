"""Cloud TPU (a v3-8 up to a pod slice): bf16 compute, a large global batch.

On a multi-host slice, run the same command on every host with --multihost.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.input_dtype = 'uint8'  # normalised on the chip
  # Global; the learning rate scales with it. Keep the per-chip batch a multiple of 128
  # (1024 is 256 per chip on a v5e-4/v6e-4/v5p-8): below that XLA pads the narrow Inception
  # branches to 128 lanes and the bytes per image rise. XLA's own max pool, no remat and
  # one step per call are the TPU choices, from bench/tpu_report.py's compiler estimates
  # (BENCHMARKS.md, TPU), not from measurements on a TPU.
  config.batch_size = 1024
  config.warmup_epochs = 5
  return config
