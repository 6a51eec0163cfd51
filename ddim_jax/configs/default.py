"""The Keras DDIM example: Oxford Flowers 102 at 64x64, keras U-Net, batch 64.

  ddim-jax train --config default --workdir runs/flowers64

The Keras example trains 1 epoch in its script and recommends >= 50 (2 h on a T4, 30 min on an
A100); 50 epochs of 511 steps is about 25,550 steps.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The Keras flowers configuration."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.parallel = "shard_map"  # or "pmap"
  # JAX devices of the CPU backend: "auto" = one per core (the largest count dividing the batch;
  # XLA:CPU runs each convolution on one thread, so this is how a CPU step uses every core), or an
  # integer. Only the CPU client reads it; XLA_FLAGS=--xla_force_host_platform_device_count=N takes
  # precedence. (It was 1 until the trainer bounded its calls in flight; see docs/benchmarks.md.)
  config.cpu_devices = "auto"  # a string, so that --config.cpu_devices=1 parses as well

  config.model = ml_collections.ConfigDict()
  config.model.variant = "keras"  # "keras" | "r"
  config.model.image_size = 64
  config.model.channels = 3
  config.model.widths = (32, 64, 96, 128)
  config.model.block_depth = 2
  config.model.embedding_dims = 32
  # Computation dtype: "float32" or "bfloat16" (mixed precision: activations and matmul/convolution
  # inputs in bf16; parameters, BatchNorm statistics, optimiser state, EMA and loss stay float32).
  config.model.dtype = "float32"

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.schedule = "cosine"  # "cosine" | "linear" (R)
  config.diffusion.min_signal_rate = 0.02
  config.diffusion.max_signal_rate = 0.95
  config.diffusion.target = "noise"  # "noise" | "image" (R option)

  config.data = ml_collections.ConfigDict()
  config.data.dataset = "oxford_flowers102"  # a TFDS name, "digits" (bundled), or "folder"
  config.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data dir
  config.data.folder = ml_collections.config_dict.placeholder(str)  # image folder for dataset="folder"
  config.data.cache_dir = ml_collections.config_dict.placeholder(str)  # preprocessed cache; None: ~/.cache/ddim_jax
  config.data.split = "keras"  # "keras": 80% of each TFDS split; "r": random 80/20 over all images
  config.data.split_seed = 1  # the "r" split (and folders, digits); R used set.seed(1)
  config.data.validation_fraction = 0.2
  config.data.tfds_splits = ml_collections.config_dict.placeholder(tuple)  # None: every TFDS split
  config.data.image_key = ml_collections.config_dict.placeholder(str)  # None: found in the features
  config.data.download = True  # let TFDS download a missing dataset (else: error with both ways)
  config.data.antialias = True  # False: the R resize (bilinear without antialiasing)
  config.data.repetitions = 5

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 25_550
  config.train.batch_size = 64  # global
  config.train.learning_rate = 1e-3
  # "constant" (Keras, R) or "cosine" (decay to 0 at num_steps), after a linear warm-up of
  # warmup_steps (0: none). Either one changes the optimiser state: a workdir keeps its choice.
  config.train.lr_schedule = "constant"
  config.train.warmup_steps = 0
  config.train.weight_decay = 1e-4
  config.train.ema_decay = 0.999
  # Off by default (neither original clips or accumulates). grad_clip_norm > 0: optax
  # clip_by_global_norm before AdamW. grad_accum_steps > 1: each device's batch in that many
  # micro-batches (less activation memory), one optimiser and EMA step per batch.
  config.train.grad_clip_norm = 0.0
  config.train.grad_accum_steps = 1
  config.train.loss = "mae"  # "mae" | "mse"
  config.train.checkpoint_every = 1000
  config.train.log_every = 50
  config.train.sample_every = 5000  # 0: no sample grids during training
  # Optimiser steps per compiled call (lax.scan): divides the host's per-call work (the dispatch of
  # the whole state: ~0.9 ms of host time per call here) by K; calls that would pass over a log,
  # checkpoint, sample or KID step are single steps instead, so intervals need not be multiples of K
  # (docs/benchmarks.md, "The training loop's host time per step").
  config.train.steps_per_call = 8
  # "auto": the uint8 training set on the devices when it fits (a quarter of a device's memory), else
  # uint8 batches uploaded ahead by a thread; "device" | "host" force one (ddim_jax/training/feed.py).
  config.train.data_placement = "auto"
  config.train.keep_checkpoints = 3  # the last N checkpoints are kept
  config.train.ema_warmup = False  # True: decay min(ema_decay, (1+n)/(10+n)) (short runs)
  # A weight file (ddim-jax export / demo, or the torch twin's) that a NEW run starts from (raw and
  # EMA weights; fresh AdamW); a resumed run continues from its checkpoint. None: random init.
  config.train.init_weights = ml_collections.config_dict.placeholder(str)
  # KID on the validation split every N steps (0: off), logged as val_kid; the best-KID checkpoint
  # is kept besides the last keep_checkpoints. 511 steps = one Keras epoch (6552 images x 5 / 64).
  # Needs Inception weights (eval.inception_weights); without them training warns once and goes on.
  config.train.kid_every = 511
  # "A,B": a jax.profiler trace of steps A+1..B into <workdir>/profile (TensorBoard's profile tab,
  # Perfetto); "" off. E.g. --config.train.profile_steps=100,110 (after compilation and warm-up).
  config.train.profile_steps = ""

  config.sample = ml_collections.ConfigDict()
  config.sample.steps = 20
  config.sample.num_images = 18
  # The sampler of every image training makes (sample grids, KID, the demo's samples and metric):
  # "ddim" (Keras, R) or "dpmpp_2m" (DPM-Solver++(2M)), on a "uniform" (Keras) or "logsnr" time grid.
  config.sample.sampler = "ddim"
  config.sample.time_grid = "uniform"

  config.eval = ml_collections.ConfigDict()
  # KID's InceptionV3: a torch state dict (torchvision's or pytorch-fid's .pth); None: the torch hub cache.
  config.eval.inception_weights = ml_collections.config_dict.placeholder(str)
  # FID beside KID at every KID step, with its own Inception: the standard FID (pytorch-fid's
  # pt_inception-2015-12-05-6726825d.pth at 299 px), logged as val_fid; other weights or sides are
  # logged by their settings (val_fid_torchvision_75px). fid_weights None: that file in the torch hub
  # cache; absent: one warning, KID alone. docs/metrics.md.
  config.eval.fid = True
  config.eval.fid_weights = ml_collections.config_dict.placeholder(str)
  config.eval.fid_image_size = 299  # the standard FID's input side
  config.eval.kid_steps = 5  # sampler steps of the generated images (Keras 5)
  config.eval.kid_image_size = 75  # KID's Inception input side: 75 (Keras) or 299 (R)
  config.eval.num_kid_images = ml_collections.config_dict.placeholder(int)  # None: the whole validation split
  config.eval.kid_batch_size = 64  # images per KID batch (Keras 64, R 128)
  # `ddim-jax demo` on the bundled digits: samples scored by the digits metric at its end (ddim_jax.quality.digits_metric).
  config.eval.num_quality_images = 500
  return config
