"""The ImageNet recipe: GoogLeNet (paper variant) on imagenet2012 from tfds.

Every other config starts from this one and changes only what differs.
Override any field on the command line: `--config.batch_size=256`.
"""
import ml_collections
from ml_collections import config_dict

from gnet_jax import spec


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # --- Input pipeline (gnet_jax/data/) ---
  # Any tfds image-classification dataset name ("imagenet2012", "imagenette/320px",
  # "cifar10", ...), "digits" for the built-in offline dataset, or "folder:/path/to/root"
  # for a folder of images laid out as root/<split>/<class>/*.jpg.
  config.dataset = 'imagenet2012'
  config.data_dir = config_dict.placeholder(str)  # tfds data directory; None means tfds's default.
  config.manual_dir = config_dict.placeholder(str)  # Where the ImageNet archives were downloaded by hand.
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.image_size = 224  # Square side of the network's input.
  # 'inception': train = random-resized crop (area 8-100%, aspect 3/4-4/3) + flip, eval =
  # centre crop 0.875; for photographs. 'small': train = resize, zero-pad 1/8 and random
  # crop back (+ flip where allowed), eval = resize; for digits/MNIST/CIFAR-sized data.
  config.augment = 'inception'
  # Horizontal flip in training. None: on, except for datasets a mirror breaks (digits,
  # MNIST, SVHN...); True/False forces it (e.g. False for a folder of text images).
  config.random_flip = config_dict.placeholder(bool)
  # Hold this process's raw (still encoded) records in memory: every epoch is then a full
  # permutation and resuming mid-epoch is instant. Small datasets only (digits, MNIST,
  # CIFAR); folders are always read this way (their file list is in memory).
  config.cache = False
  # Records in the seeded shuffle buffer of a tfds dataset read from disk (cache=False).
  config.shuffle_buffer = 16_384
  config.skip_corrupt_images = False  # Skip (and count) undecodable images instead of failing.
  # What the host hands to the device: 'uint8' pixels, normalised by the jitted steps (a
  # quarter of float32's bytes; for TPU and GPU), or images normalised on the host as
  # 'float32' (CPU: the host is the device) or 'bfloat16'.
  config.input_dtype = 'float32'

  # --- Model (gnet_jax/model.py) ---
  # GoogLeNet's network options, with its defaults (their meaning: gnet_jax.GoogLeNet's
  # docstring): variant ('paper' or 'torchvision'), aux_logits, dropout_rate (None: the
  # variant's), aux_dropout_rate, use_bn, transform_input (torchvision's weights need it).
  # num_classes comes from the data. These, with image_size and augment, are model.json.
  config.model = spec.model_config()

  # --- How the model runs (never part of model.json) ---
  config.runtime = ml_collections.ConfigDict()
  # Computation dtype; parameters stay float32. 'auto' follows the device: bfloat16 on TPUs
  # and on GPUs of compute capability 8.0 and up, float16 with a dynamic loss scale (that
  # skips overflowing steps and is checkpointed) on older GPUs (T4, V100), float32 on CPUs
  # (gnet_jax.train.experiment.compute_dtype); or 'float32', 'bfloat16', 'float16'.
  config.runtime.dtype = 'auto'
  # float32 convolutions, max pools and BatchNorms on CPU: 'onednn' (gnet_jax/cpu/,
  # faster), 'xla', or 'auto': oneDNN when the step runs on a single CPU device
  # (gnet_jax.cpu.model_blocks decides). GPU and TPU always use XLA's.
  config.runtime.cpu_convolutions = 'auto'
  # Recompute each Inception block's activations in the backward pass instead of keeping
  # them: less accelerator memory (larger batches), more FLOPs. Same function.
  config.runtime.remat = False

  # --- Optimisation (gnet_jax/train/) ---
  config.seed = 0  # Initialisation, dropout and data order all derive from it.
  config.batch_size = 256  # Global batch over all devices and processes.
  config.num_epochs = 90
  config.num_train_steps = -1  # > 0 overrides num_epochs.
  config.optimizer = 'sgd'  # 'sgd' (momentum) or 'adamw'.
  config.momentum = 0.9
  config.nesterov = True
  # Learning rate for a global batch of 256, scaled linearly with config.batch_size.
  config.base_learning_rate = 0.1
  # 'cosine' (after warmup), 'paper' (x0.96 every 8 epochs, section 6) or 'constant'.
  config.lr_schedule = 'cosine'
  config.warmup_epochs = 5
  config.weight_decay = 1e-4  # On conv and dense kernels; never on BatchNorm or biases.
  config.label_smoothing = 0.1
  config.grad_clip_norm = 0.0  # > 0 clips gradients to this global norm.
  # Train steps per jitted call (Keras's steps_per_execution): the call's set-up, on CPU
  # mostly page faults on XLA's fresh temporaries, is paid once for all of them. Calls
  # end at every log, eval and checkpoint step; training is the same for any value.
  config.steps_per_execution = 1
  # Gradient accumulation: one update from the mean gradient of k batches, i.e. of a
  # k-times larger batch (the lr scales with batch_size * k, its schedule counts updates).
  # BatchNorm statistics are those of each batch of batch_size, as in every framework.
  # Steps, logging and checkpoints count batches; a resume mid-cycle is exact.
  config.grad_accum_steps = 1
  # Weight EMA: > 0 (e.g. 0.9999) keeps an exponential moving average of the parameters
  # and BatchNorm statistics, checkpointed, evaluated ('eval_ema' rows beside 'eval') and
  # used by load_variables, predict and export unless they are asked for the raw ones.
  config.ema_decay = 0.0

  # --- What a person sees (gnet_jax/metrics.py) ---
  config.log_every_steps = 100  # Train metrics to TensorBoard and metrics.jsonl.
  config.eval_every_steps = 5000  # Full eval split; <= 0: only at the end.
  # 'first,last' (e.g. '100,105'): a jax.profiler trace of those steps in WORKDIR/profile,
  # for TensorBoard's profile plugin and Perfetto. '' : none.
  config.profile_steps = ''
  # Also log to Weights & Biases under this project (needs `pip install wandb`; set
  # WANDB_MODE=offline to log without network). '' : off.
  config.wandb_project = ''

  # --- Checkpoints (gnet_jax/checkpoint.py), in <workdir>/checkpoints ---
  # A run started on a workdir with checkpoints resumes from the newest good one.
  # Saved every N steps, at every eval, at the end and on SIGTERM; <= 0: only those.
  config.checkpoint_every_steps = 1000
  config.checkpoint_max_to_keep = 3  # The latest K are kept...
  config.checkpoint_keep_best = True  # ...plus the one with the best eval top-1.
  config.checkpoint_async = True  # Write in the background while training goes on.
  # A non-finite loss stops the run naming the step (no NaN state is ever saved). True
  # instead skips such steps (parameters unchanged, the batch is consumed) and logs them.
  config.skip_nonfinite_steps = False
  # Fine-tuning: converted weights (python -m gnet_jax.convert) or another run's workdir
  # initialise the parameters; another num_classes replaces the classifier and aux
  # classifiers (and says so), any other model difference is an error naming it. The
  # optimizer and step start anew. Ignored once this workdir has a checkpoint of its own.
  config.init_from = ''
  return config
