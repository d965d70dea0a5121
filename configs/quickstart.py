"""Quickstart: GoogLeNet on the built-in digits, offline, a few minutes on a laptop CPU.

    python train.py --config configs/quickstart.py --workdir /tmp/gnet_quickstart
"""
from configs import cpu


def get_config():
  config = cpu.get_config()
  config.dataset = 'digits'  # 1,797 8x8 scikit-learn digits, written as tfds files
  config.train_split = 'train'
  config.eval_split = 'test'
  config.image_size = 32  # the smallest GoogLeNet takes: its last feature map is 1x1
  config.augment = 'small'
  config.cache = True
  config.shuffle_buffer = 2048

  config.model.variant = 'paper'
  config.model.aux_logits = True

  config.batch_size = 64
  config.num_epochs = 15
  config.optimizer = 'sgd'
  config.base_learning_rate = 0.1  # for batch 256; 0.025 at batch 64
  config.lr_schedule = 'cosine'
  config.warmup_epochs = 1
  config.weight_decay = 5e-4
  config.label_smoothing = 0.1
  config.log_every_steps = 20
  # 32x32 images: the step's temporaries are small, and several steps per call save
  # nothing but cost compile time.
  config.steps_per_execution = 1
  config.eval_every_steps = 0  # only at the end: eval costs a compile
  return config
