"""Throughput of the DDIM U-Net: JAX (jit + shard_map) vs PyTorch eager vs ``torch.compile``.

  python scripts/benchmark.py                       # 32x32, batch 32, keras widths, fp32; table
  python scripts/benchmark.py --json                # the same, one JSON object on stdout
  python scripts/benchmark.py --image-size 64 --batch-size 64 --precision bf16 --json   # GPU
  python scripts/benchmark.py --loop                # the full training loop vs the bare step

What is timed, per framework, on the same model, batch and precision:

* train: a full optimiser step (forward, backward, AdamW, EMA of weights and BatchNorm
  statistics, plus the per-example noise and time draws): JAX ``parallel.make_train_fn`` over all
  local devices (``--steps-per-call`` steps per call with ``lax.scan``), torch
  ``ddim_torch_ref.step.train_step_from_draws`` with its ``EMA``.
* sample: a ``--sample-steps`` DDIM run of ``--batch-size`` images: ``sampling.generate`` (one jit,
  ``lax.scan``) vs ``ddim_torch_ref.sampling.generate``.

Method: each framework runs in its own worker process (this script re-invoked with ``--worker``),
so that the XLA and torch thread pools never run at the same time; every worker compiles and warms
up first (reported as compile time, excluded from the rates), then the parent interleaves the
repeats (jax, torch_eager, torch_compile, jax, ...) and reports the median of ``--repeats``. Ratios
come from these same interleaved measurements.

FLOPs and MFU: FLOPs per image are counted from the jaxpr (``ddim_jax.infra.flops``: 2 per multiply-add of
every convolution and dot of the single-device step and of the sampler; never compiled, so the same
number on every backend). XLA's compiled cost analysis is reported beside it only as a diagnostic
(``xla_cost_analysis_*``): on GPU it counts the cuDNN convolutions as 0 FLOPs. MFU = images/s x
FLOPs per image / (peak of one device x devices used: all local devices for JAX, one for torch),
where ``flops.PEAK_FLOPS`` knows the device (H100/H200/A100, TPU v4/v5e/v5p/v6e; fp32 counts as TF32
on those GPUs, XLA's default precision); elsewhere (CPU) "unknown peak" and MFU None.

JSON fields of the FLOPs: ``flops_per_image`` (one training step, per image), ``forward_flops_per_image``
(one network evaluation), ``sample_flops_per_image`` (``--sample-steps`` evaluations), ``flops_method``,
``xla_cost_analysis_flops_per_image`` / ``xla_cost_analysis_sample_flops_per_image`` (None where the
analysis is unavailable; ``xla_cost_analysis_error`` says why), ``peak_flops`` (FLOP/s of one device,
or None), ``peak_flops_source``, ``jax_device_count``, ``<framework>_train_mfu`` / ``_sample_mfu``.

Imports only jax, flax, optax, torch, numpy and ddim_jax.{models,train,parallel,sampling,schedules,flops}
/ ddim_torch_ref (no TensorFlow, ml_collections or input pipeline), so it runs on a GPU machine's
preinstalled packages without installing this package. ``--loop`` is the exception: it drives
``ddim_jax.training.trainer.train_and_evaluate`` (ml_collections, the input pipeline, orbax) on the demo
preset and lives in its own clearly separated function.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import provenance  # noqa: E402  pylint: disable=wrong-import-position

FRAMEWORKS = ("jax", "torch_eager", "torch_compile")
FLOPS_METHOD = ("jaxpr count (ddim_jax.infra.flops): 2 FLOPs per multiply-add of every conv_general_dilated and "
                "dot_general, the same on every backend")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--image-size", type=int, default=32)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--widths", default="32,64,96,128", help="comma-separated U-Net widths")
  p.add_argument("--variant", default="keras", choices=("keras", "r"))
  p.add_argument("--block-depth", type=int, default=2)
  p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                 help="bf16: bf16 compute, fp32 params and optimiser state (torch: autocast)")
  p.add_argument("--steps-per-call", type=int, default=1, help="JAX optimiser steps per call (lax.scan)")
  p.add_argument("--train-iters", type=int, default=0,
                 help="optimiser steps per timed repeat (0: calibrated to about 1 s for the slowest framework, >=2)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help=f"subset of {','.join(FRAMEWORKS)}")
  p.add_argument("--sample-steps", type=int, default=20)
  p.add_argument("--compile-mode", default="auto",
                 help="torch.compile mode; auto: max-autotune on CUDA, the default inductor mode on CPU")
  p.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                 help="channels_last for torch.compile (auto: on for CUDA, off on CPU, where it was slower)")
  p.add_argument("--json", nargs="?", const="-", default=None,
                 help="write one JSON object to this path ('-' or no value: stdout; the table goes to stderr)")
  p.add_argument("--jax-cpu-devices", default="auto",
                 help="JAX host devices when the backend is the CPU (auto: one per core, so that the sharded "
                      "step runs one shard per core: XLA:CPU runs each convolution on ONE thread); "
                      "no effect on GPU/TPU")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
  p.add_argument("--loop", action="store_true",
                 help="measure ddim_jax.training.trainer.train_and_evaluate on the demo preset against the bare step")
  p.add_argument("--host-time", action="store_true",
                 help="only the loop's host time per step with the device work stubbed out (also part of --loop)")
  p.add_argument("--flops-only", action="store_true",
                 help="only the FLOPs per image of both variants at --image-size (counted, nothing run)")
  p.add_argument("--cli-help", action="store_true",
                 help="only the time of `ddim-jax --help` and `ddim-jax train --help` (fresh processes, median of "
                      "--repeats)")
  p.add_argument("--loop-config", default="demo", help="the preset --loop trains (demo, default, r_variant)")
  p.add_argument("--loop-steps", type=int, default=300)
  p.add_argument("--loop-override", action="append", default=[],
                 help="extra --config.* override for --loop (repeatable)")
  p.add_argument("--loop-processes", type=int, default=1,
                 help="--loop as this many jax.distributed processes on 127.0.0.1 (CPU collectives: gloo)")
  p.add_argument("--loop-devices", type=int, default=1,
                 help="JAX CPU devices per process with --loop-processes > 1 (XLA_FLAGS in each process)")
  p.add_argument("--loop-workdir", help=argparse.SUPPRESS)  # the shared workdir of a multi-process --loop
  return p.parse_args(argv)


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------------
# Workers: one framework per process; commands on stdin, one JSON reply per line on stdout.


class JaxWorker:
  """The JAX side: the sharded training step over all local devices and the jitted sampler."""

  def __init__(self, args):
    import jax
    import jax.numpy as jnp
    # Before the backend starts: the number of CPU devices (only the CPU client reads it).
    from ddim_jax.infra import parallel
    parallel.configure_cpu_devices(args.jax_cpu_devices, args.batch_size)  # the CLI's own rule
    import numpy as np
    from ddim_jax.core import models, sampling, step as step_lib
    from ddim_jax.infra import flops
    self.jax, self.np, self.sampling = jax, np, sampling
    self.args = args
    rss0 = peak_rss_mb()
    # The config's own values (config.model.dtype), through the trainer's models.create_model.
    dtype = "bfloat16" if args.precision == "bf16" else "float32"
    widths = tuple(int(w) for w in args.widths.split(","))
    kw = dict(variant=args.variant, widths=widths, block_depth=args.block_depth, dtype=dtype)
    model = models.create_model(**kw, bn_axis_name=parallel.AXIS)
    self.eval_model = models.create_model(**kw)
    step_config = step_lib.StepConfig()
    mesh = parallel.create_mesh(jax.local_devices())
    self.devices = mesh.devices.size
    parallel.check_batch_size(args.batch_size, self.devices)
    k, b, s = args.steps_per_call, args.batch_size, args.image_size
    rng = np.random.default_rng(args.seed)
    state = jax.jit(step_lib.create_train_state, static_argnums=(0, 1, 3))(model, step_config, jax.random.key(args.seed), s)
    self.state = parallel.replicate(state, mesh)
    local = rng.random((b, s, s, 3) if k == 1 else (k, b, s, s, 3), dtype=np.float32)
    self.images = parallel.shard_batch(local, mesh, k)
    self.normalizer = parallel.replicate({"mean": np.full(3, 0.5, np.float32), "variance": np.full(3, 0.08, np.float32)},
                                         mesh)
    self.base_key = parallel.replicate(jax.random.key_data(jax.random.key(args.seed + 2)), mesh)
    self.train_fn = parallel.make_train_fn(step_lib.per_device_step(model, step_config, k, parallel.AXIS), mesh,
                                           "shard_map", k)
    # Sampling is data parallel too: the noise batch is split over the devices (GSPMD partitions the scan).
    noise = rng.standard_normal((b, s, s, 3), dtype=np.float32)
    self.noise = parallel.shard_batch(noise, mesh)

    # FLOPs per image counted from the jaxpr of the single-device, unsharded step and sampler (the
    # same count on every backend: nothing is compiled).
    single = models.create_model(**kw)
    counted = {}
    try:
      counted["train"] = flops.train_step_flops(step_lib.train_step, state, single, step_config, s, b)
      counted["forward"] = flops.forward_flops(single, state.variables(ema=True), s, b)
      counted["sample"] = flops.sample_flops(sampling.generate, self.eval_model, state.variables(ema=True), s, b,
                                             args.sample_steps)
    except Exception as e:  # pylint: disable=broad-except
      counted["error"] = repr(e)
    self.flops = counted
    # Diagnostic only: XLA's cost analysis of the compiled step (0 FLOPs for cuDNN convolutions on GPU).
    xla_flops = {}
    try:
      step1 = jax.jit(lambda st, im, nz, key: step_lib.train_step(st, im, nz, key, model=single, step_config=step_config,
                                                               axis_name=None))
      one_batch = jnp.asarray(local if k == 1 else local[0])
      cost = step1.lower(state, one_batch, {"mean": jnp.full(3, 0.5), "variance": jnp.full(3, 0.08)},
                         jax.random.key_data(jax.random.key(0))).compile().cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      xla_flops["train"] = float(cost["flops"]) / b
      fwd = jax.jit(lambda v, x: single.apply(v, x, jnp.full((x.shape[0], 1, 1, 1), 0.5), train=False))
      cost = fwd.lower(state.variables(ema=True), jnp.asarray(noise)).compile().cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      xla_flops["sample"] = float(cost["flops"]) / b * args.sample_steps  # S network evaluations
    except Exception as e:  # pylint: disable=broad-except
      xla_flops["error"] = repr(e)
    self.xla_flops = xla_flops
    self.matmul_precision = jax.config.jax_default_matmul_precision

    t0 = time.perf_counter()
    self._train(1)
    self.compile_train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    self._sample()
    self.compile_sample_s = time.perf_counter() - t0
    self._train(1)  # second call: any re-layout / donation settling
    self._sample()
    self.rss0 = rss0
    dev = jax.local_devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    self.device = f"{dev.platform} x{self.devices}" if kind == dev.platform else f"{dev.platform}:{kind} x{self.devices}"
    self.device_kind = kind

  def _train(self, calls):
    state = self.state
    for _ in range(calls):
      state, metrics = self.train_fn(state, self.images, self.normalizer, self.base_key)
    self.jax.block_until_ready((state, metrics))
    self.state = state

  def _sample(self):
    out = self.sampling.generate(self.eval_model, self.state.variables(ema=True), self.noise, steps=self.args.sample_steps)
    self.jax.block_until_ready(out)

  def info(self):
    return {"device": self.device, "compile_train_s": self.compile_train_s, "compile_sample_s": self.compile_sample_s,
            "flops": self.flops, "xla_flops": self.xla_flops, "steps_per_call": self.args.steps_per_call,
            "device_kind": self.device_kind, "device_count": self.devices, "matmul_precision": self.matmul_precision}

  def train(self, steps):
    calls = max(1, -(-steps // self.args.steps_per_call))
    t0 = time.perf_counter()
    self._train(calls)
    return {"seconds": time.perf_counter() - t0, "images": calls * self.args.steps_per_call * self.args.batch_size}

  def sample(self):
    t0 = time.perf_counter()
    self._sample()
    return {"seconds": time.perf_counter() - t0, "images": self.args.batch_size}

  def memory(self):
    stats = {}
    try:
      stats = self.jax.local_devices()[0].memory_stats() or {}
    except Exception:  # pylint: disable=broad-except
      stats = {}
    if "peak_bytes_in_use" in stats:
      return {"peak_memory_mb": stats["peak_bytes_in_use"] / 2**20, "memory_kind": "device peak bytes in use"}
    return {"peak_memory_mb": peak_rss_mb() - self.rss0, "memory_kind": "peak RSS delta (host)"}


class TorchWorker:
  """The torch side: train_step_from_draws + EMA, and ddim_torch_ref.sampling.generate; eager or compiled."""

  def __init__(self, args, compiled: bool):
    import numpy as np
    import torch
    from ddim_torch_ref import models as tmodels
    from ddim_torch_ref import sampling as tsampling
    from ddim_torch_ref import schedules as tschedules
    from ddim_torch_ref import step as tstep
    self.torch, self.tsampling, self.tstep = torch, tsampling, tstep
    self.args = args
    rss0 = peak_rss_mb()
    cuda = torch.cuda.is_available()
    self.dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(args.seed)
    widths = tuple(int(w) for w in args.widths.split(","))
    model = tmodels.create_model(variant=args.variant, widths=widths, block_depth=args.block_depth).to(self.dev)
    channels_last = compiled and (args.channels_last == "on" or (args.channels_last == "auto" and cuda))
    self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=self.memory_format)
    self.optimizer = tstep.make_optimizer(model)
    self.ema = tstep.EMA(model)
    if compiled:
      mode = args.compile_mode
      if mode == "auto":
        mode = "max-autotune" if cuda else None
      model.compile(mode=mode)  # in place: state_dict names (and so the EMA) are unchanged
      self.ema.model.compile(mode=mode)
      self.compile_mode = mode or "default"
    else:
      self.compile_mode = None
    self.model = model
    self.channels_last = channels_last
    self.schedule = tschedules.get_schedule("cosine")
    b, s = args.batch_size, args.image_size
    rng = np.random.default_rng(args.seed)
    self.images = torch.from_numpy(rng.standard_normal((b, 3, s, s), dtype=np.float32)).to(self.dev)
    self.images = self.images.contiguous(memory_format=self.memory_format)
    self.noise = torch.from_numpy(rng.standard_normal((b, 3, s, s), dtype=np.float32)).to(self.dev)
    self.noise = self.noise.contiguous(memory_format=self.memory_format)
    self.step = 0
    self.autocast = args.precision == "bf16"
    if cuda:
      torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    self._train(2)  # compiled: the first call compiles, the second settles (cudagraph warm-up)
    self.compile_train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    self._sample()
    self._sample()
    self.compile_sample_s = time.perf_counter() - t0
    self.rss0 = rss0
    self.device = f"cuda:{torch.cuda.get_device_name()}" if cuda else f"cpu ({torch.get_num_threads()} threads)"

  def _ctx(self):
    if self.autocast:
      return self.torch.autocast(self.dev.type, dtype=self.torch.bfloat16)
    return self.torch.autocast(self.dev.type, enabled=False)

  def _sync(self):
    if self.dev.type == "cuda":
      self.torch.cuda.synchronize()

  def _train(self, steps):
    torch = self.torch
    b = self.args.batch_size
    for _ in range(steps):
      # The same per-step draws as the JAX step (noise, diffusion times, their rates).
      noises = torch.randn(self.images.shape, device=self.dev).contiguous(memory_format=self.memory_format)
      times = torch.rand((b, 1, 1, 1), device=self.dev)
      noise_rates, signal_rates = self.schedule(times)
      with self._ctx():
        self.tstep.train_step_from_draws(self.model, self.optimizer, self.ema, self.step, self.images, noises,
                                          noise_rates, signal_rates)
      self.step += 1
    self._sync()

  def _sample(self):
    with self._ctx():
      self.tsampling.generate(self.ema.model, self.noise, steps=self.args.sample_steps)
    self._sync()

  def info(self):
    return {"device": self.device, "compile_train_s": self.compile_train_s, "compile_sample_s": self.compile_sample_s,
            "compile_mode": self.compile_mode, "channels_last": self.channels_last}

  def train(self, steps):
    t0 = time.perf_counter()
    self._train(steps)
    return {"seconds": time.perf_counter() - t0, "images": steps * self.args.batch_size}

  def sample(self):
    t0 = time.perf_counter()
    self._sample()
    return {"seconds": time.perf_counter() - t0, "images": self.args.batch_size}

  def memory(self):
    if self.dev.type == "cuda":
      return {"peak_memory_mb": self.torch.cuda.max_memory_allocated() / 2**20, "memory_kind": "max allocated"}
    return {"peak_memory_mb": peak_rss_mb() - self.rss0, "memory_kind": "peak RSS delta (host)"}


def run_worker(args):
  """Serves commands from the parent: 'info', 'train N', 'sample', 'memory', 'quit'."""
  out = sys.stdout
  sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
  try:
    worker = JaxWorker(args) if args.worker == "jax" else TorchWorker(args, args.worker == "torch_compile")
  except Exception as e:  # pylint: disable=broad-except
    out.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
    out.flush()
    return
  out.write(json.dumps({"ready": True}) + "\n")
  out.flush()
  for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
      break
    try:
      if cmd[0] == "train":
        reply = worker.train(int(cmd[1]))
      else:
        reply = getattr(worker, cmd[0])()
    except Exception as e:  # pylint: disable=broad-except
      reply = {"error": f"{type(e).__name__}: {e}"}
    out.write(json.dumps(reply) + "\n")
    out.flush()


class WorkerProcess:
  """The parent's handle on one worker subprocess."""

  def __init__(self, name, argv):
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", name]
    self.name = name
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    self.error = None

  def wait_ready(self):
    reply = self._read()
    if "error" in reply:
      self.error = reply["error"]
    return self.error is None

  def _read(self):
    line = self.proc.stdout.readline()
    if not line:
      return {"error": f"worker {self.name} exited (code {self.proc.poll()}); see its stderr above"}
    return json.loads(line)

  def ask(self, command):
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    reply = self._read()
    if "error" in reply:
      raise RuntimeError(f"{self.name}: {reply['error']}")
    return reply

  def close(self):
    try:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.flush()
    except (BrokenPipeError, OSError):
      pass
    try:
      self.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.proc.kill()


def median(values):
  values = sorted(values)
  n = len(values)
  return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def worker_argv(args):
  """The measurement options, passed on to the workers."""
  return ["--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--widths", args.widths,
          "--variant", args.variant, "--block-depth", str(args.block_depth), "--precision", args.precision,
          "--steps-per-call", str(args.steps_per_call), "--sample-steps", str(args.sample_steps),
          "--compile-mode", args.compile_mode, "--channels-last", args.channels_last, "--seed", str(args.seed),
          "--jax-cpu-devices", args.jax_cpu_devices]


def run_benchmark(args):
  names = [f for f in args.frameworks.split(",") if f]
  for name in names:
    if name not in FRAMEWORKS:
      raise SystemExit(f"--frameworks: unknown {name!r}; choose from {FRAMEWORKS}")
  log = sys.stderr
  # Workers start (import, build, compile, warm up) one at a time so that compile times are clean.
  workers, infos, errors = {}, {}, {}
  for name in names:
    print(f"[benchmark] starting {name} worker (build, compile, warm-up)...", file=log, flush=True)
    w = WorkerProcess(name, worker_argv(args))
    if w.wait_ready():
      workers[name] = w
      infos[name] = w.ask("info")
    else:
      errors[name] = w.error
      print(f"[benchmark] {name} failed: {w.error}", file=log, flush=True)
      w.close()

  # Calibrate the steps per timed repeat from one timed step per framework (slowest framework ~1 s).
  iters = args.train_iters
  if not iters:
    per_step = [w.ask("train 1")["seconds"] for w in workers.values()]
    iters = max(2, min(50, int(1.0 / max(max(per_step or [1.0]), 1e-4))))
  k = args.steps_per_call
  iters = -(-iters // k) * k

  train_rates = {n: [] for n in workers}
  sample_rates = {n: [] for n in workers}
  for r in range(args.repeats):
    for name, w in workers.items():  # interleaved: jax, torch_eager, torch_compile, jax, ...
      reply = w.ask(f"train {iters}")
      train_rates[name].append(reply["images"] / reply["seconds"])
    for name, w in workers.items():
      reply = w.ask("sample")
      sample_rates[name].append(reply["images"] / reply["seconds"])
    print(f"[benchmark] repeat {r + 1}/{args.repeats}: " + ", ".join(
        f"{n} train {train_rates[n][-1]:.1f} sample {sample_rates[n][-1]:.1f} img/s" for n in workers),
          file=log, flush=True)
  memory = {name: w.ask("memory") for name, w in workers.items()}
  for w in workers.values():
    w.close()

  result = {
      "config": {"image_size": args.image_size, "batch_size": args.batch_size, "widths": args.widths,
                 "variant": args.variant, "block_depth": args.block_depth, "precision": args.precision,
                 "steps_per_call": k, "sample_steps": args.sample_steps, "repeats": args.repeats,
                 "train_steps_per_repeat": iters},
      "date": time.strftime("%Y-%m-%d"),
  }
  devices = {n: infos[n]["device"] for n in infos}
  result["device"] = devices.get("jax") or next(iter(devices.values()), "none")
  result["devices"] = devices
  for name in FRAMEWORKS:
    tr, sa = train_rates.get(name), sample_rates.get(name)
    result[f"{name}_train_img_s"] = median(tr) if tr else None
    result[f"{name}_sample_img_s"] = median(sa) if sa else None
    result[f"{name}_train_img_s_all"] = tr
    result[f"{name}_sample_img_s_all"] = sa
    if name in infos:
      result[f"{name}_compile_train_s"] = infos[name]["compile_train_s"]
      result[f"{name}_compile_sample_s"] = infos[name]["compile_sample_s"]
      result[f"{name}_peak_memory_mb"] = memory[name]["peak_memory_mb"]
      result[f"{name}_memory_kind"] = memory[name]["memory_kind"]
    if name in errors:
      result[f"{name}_error"] = errors[name]
  if "torch_compile" in infos:
    result["torch_compile_mode"] = infos["torch_compile"]["compile_mode"]
    result["torch_compile_channels_last"] = infos["torch_compile"]["channels_last"]
  # Ratios of medians and, more robust on a noisy machine, medians of the per-repeat ratios.
  for kind, rates in (("train", train_rates), ("sample", sample_rates)):
    for other in ("torch_eager", "torch_compile"):
      if "jax" in rates and other in rates:
        result[f"jax_vs_{other}_{kind}"] = result[f"jax_{kind}_img_s"] / result[f"{other}_{kind}_img_s"]
        result[f"jax_vs_{other}_{kind}_paired"] = median([a / b for a, b in zip(rates["jax"], rates[other])])
    if "torch_eager" in rates and "torch_compile" in rates:
      result[f"torch_compile_vs_torch_eager_{kind}"] = (result[f"torch_compile_{kind}_img_s"]
                                                         / result[f"torch_eager_{kind}_img_s"])

  add_flops_and_mfu(result, infos, args.precision)
  return result


def add_flops_and_mfu(result, infos, precision):
  """The FLOPs fields and the MFU of each framework (see the module doc), from the workers' infos
  and the medians already in ``result``."""
  # FLOPs per image: the jaxpr count; XLA's cost analysis only as a diagnostic.
  jax_info = infos.get("jax", {})
  counted = jax_info.get("flops", {})
  result["flops_method"] = FLOPS_METHOD
  result["flops_per_image"] = counted.get("train")
  result["forward_flops_per_image"] = counted.get("forward")
  result["sample_flops_per_image"] = counted.get("sample")
  if "error" in counted:
    result["flops_error"] = counted["error"]
  xla_flops = jax_info.get("xla_flops", {})
  result["xla_cost_analysis_flops_per_image"] = xla_flops.get("train")
  result["xla_cost_analysis_sample_flops_per_image"] = xla_flops.get("sample")
  if "error" in xla_flops:
    result["xla_cost_analysis_error"] = xla_flops["error"]

  # MFU where the peak of the device is known (flops.PEAK_FLOPS); JAX uses all its local devices,
  # torch one. Never a guessed peak: elsewhere the MFU is None.
  from ddim_jax.infra import flops  # pylint: disable=import-outside-toplevel
  jax_devices = jax_info.get("device_count", 1)
  result["jax_device_count"] = jax_devices if "jax" in infos else None
  peaks = {}
  for name in infos:
    matmul_precision = jax_info.get("matmul_precision") if name == "jax" else None
    peaks[name] = flops.peak_flops(infos[name].get("device_kind", infos[name]["device"]), precision, matmul_precision)
  first = peaks.get("jax") or next(iter(peaks.values()), (None, "unknown peak (no device)"))
  result["peak_flops"], result["peak_flops_source"] = first
  for name in FRAMEWORKS:
    peak = peaks.get(name, (None, ""))[0]
    total_peak = peak * (jax_devices if name == "jax" else 1) if peak else None
    for kind, per_image in (("train", result["flops_per_image"]), ("sample", result["sample_flops_per_image"])):
      rate = result.get(f"{name}_{kind}_img_s")
      result[f"{name}_{kind}_mfu"] = rate * per_image / total_peak if (total_peak and rate and per_image) else None
  return result


def format_table(result) -> str:
  cfg = result["config"]
  lines = [f"device: {result['device']}   ({', '.join(f'{k}: {v}' for k, v in result['devices'].items())})",
           f"{cfg['variant']} U-Net widths {cfg['widths']}, {cfg['image_size']}x{cfg['image_size']}, batch "
           f"{cfg['batch_size']}, {cfg['precision']}, {cfg['steps_per_call']} JAX step(s)/call, "
           f"{cfg['sample_steps']} sampling steps; median of {cfg['repeats']} interleaved repeats of "
           f"{cfg['train_steps_per_repeat']} steps"]
  gf = result.get("flops_per_image")
  if gf:
    xla = result.get("xla_cost_analysis_flops_per_image")
    lines.append(f"FLOPs (jaxpr count, 2 per multiply-add of every conv and dot): {gf / 1e9:.3f} GFLOP per training "
                 f"image, {(result.get('sample_flops_per_image') or 0) / 1e9:.3f} per sampled image "
                 f"({cfg['sample_steps']} steps of {(result.get('forward_flops_per_image') or 0) / 1e9:.3f}); "
                 f"XLA cost analysis (diagnostic): " + (f"{xla / 1e9:.3f}" if xla is not None else "unavailable"))
  elif result.get("flops_error"):
    lines.append(f"FLOPs: not counted ({result['flops_error']})")
  if result.get("peak_flops"):
    lines.append(f"peak: {result['peak_flops_source']} per device; MFU over {result.get('jax_device_count')} "
                 f"device(s) for JAX, 1 for torch")
  else:
    lines.append(f"{result.get('peak_flops_source') or 'unknown peak'}: no MFU")
  header = f"{'framework':<15}{'train img/s':>13}{'sample img/s':>14}{'compile train s':>17}{'compile sample s':>18}{'peak mem MB':>13}{'train MFU':>11}"
  lines += [header, "-" * len(header)]
  for name in FRAMEWORKS:
    if result.get(f"{name}_train_img_s") is None:
      if result.get(f"{name}_error"):
        lines.append(f"{name:<15}failed: {result[name + '_error']}")
      continue
    mfu = result.get(f"{name}_train_mfu")
    lines.append(f"{name:<15}{result[name + '_train_img_s']:>13.1f}{result[name + '_sample_img_s']:>14.1f}"
                 f"{result[name + '_compile_train_s']:>17.1f}{result[name + '_compile_sample_s']:>18.1f}"
                 f"{result[name + '_peak_memory_mb']:>13.0f}{(f'{100 * mfu:.1f}%' if mfu else '-'):>11}")
  for kind in ("train", "sample"):
    for other in ("torch_eager", "torch_compile"):
      key = f"jax_vs_{other}_{kind}"
      if result.get(key) is not None:
        lines.append(f"JAX / {other} {kind}: {result[key]:.2f}x (median of per-repeat ratios "
                     f"{result[key + '_paired']:.2f}x)")
  mem_kind = result.get("jax_memory_kind") or result.get("torch_eager_memory_kind")
  if mem_kind:
    lines.append(f"peak memory: {mem_kind}")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# --loop: the full training loop (data, logging, checkpoints) against the bare step. This mode, and
# only this mode, imports ml_collections and the input pipeline (through ddim_jax.configs/trainer).


def run_loop(args):
  import tempfile

  import jax
  import numpy as np
  from ddim_jax import configs
  from ddim_jax.core import models, step as step_lib
  from ddim_jax.infra import parallel
  from ddim_jax.training import trainer  # pylint: disable=import-outside-toplevel

  overrides = [f"--config.train.num_steps={args.loop_steps}", *args.loop_override]
  config = configs.load_config(args.loop_config, overrides)
  batch = int(config.train.batch_size)
  log_every = int(config.train.log_every)
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.loop_workdir or tmp
    t0 = time.perf_counter()
    trainer.train_and_evaluate(config, workdir, progress=False)
    wall = time.perf_counter() - t0
    # Only process 0 writes metrics.jsonl; it is closed when train_and_evaluate returns there.
    records = []
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
  # Throughput after the first logging interval (which holds the compilation): images / time, where
  # each interval's time is batch * steps / its images_per_second. Checkpoint saves and sample grids
  # fall inside the intervals that follow them.
  steady = records[1:]
  prev = [records[0]["step"]] + [r["step"] for r in steady[:-1]] if records else []
  images = sum(batch * (r["step"] - p) for r, p in zip(steady, prev))
  seconds = sum(batch * (r["step"] - p) / r["images_per_second"] for r, p in zip(steady, prev))
  loop_rate = images / seconds if records else float("nan")

  # The bare step at the same config, timed the same way (median of repeats of log_every steps).
  mesh = parallel.create_mesh()
  k = int(config.train.get("steps_per_call", 1))
  step_config = step_lib.StepConfig.from_config(config)
  model = models.create_model(**config.model, bn_axis_name=parallel.AXIS)
  size = int(config.model.image_size)
  state = parallel.replicate(jax.jit(step_lib.create_train_state, static_argnums=(0, 1, 3))(
      model, step_config, jax.random.key(0), size), mesh)
  rng = np.random.default_rng(0)
  local_batch = batch // jax.process_count()  # this process's slice of the global batch
  local = rng.random((local_batch, size, size, 3) if k == 1 else (k, local_batch, size, size, 3), dtype=np.float32)
  images_dev = parallel.shard_batch(local, mesh, k)
  normalizer = parallel.replicate({"mean": np.full(3, 0.5, np.float32), "variance": np.full(3, 0.08, np.float32)}, mesh)
  key = parallel.replicate(jax.random.key_data(jax.random.key(2)), mesh)
  fn = parallel.make_train_fn(step_lib.per_device_step(model, step_config, k, parallel.AXIS), mesh, config.parallel, k)
  for _ in range(2):
    state, m = fn(state, images_dev, normalizer, key)
  jax.block_until_ready(state)
  rates = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    for _ in range(max(1, log_every // k)):
      state, m = fn(state, images_dev, normalizer, key)
    jax.block_until_ready((state, m))
    rates.append(batch * max(1, log_every // k) * k / (time.perf_counter() - t))
  bare = median(rates)
  return {"mode": "loop", "preset": args.loop_config, "overrides": overrides, "batch_size": batch,
          "image_size": size, "widths": list(config.model.widths), "log_every": log_every,
          "checkpoint_every": int(config.train.checkpoint_every), "sample_every": int(config.train.sample_every),
          "loop_img_s": loop_rate, "loop_interval_img_s": [r["images_per_second"] for r in records],
          "bare_step_img_s": bare, "bare_step_img_s_all": rates, "loop_fraction_of_bare": loop_rate / bare,
          "loop_wall_s": wall, "device": str(jax.devices()[0]), "processes": jax.process_count(),
          "devices": jax.device_count(), "date": time.strftime("%Y-%m-%d")}


def host_time_per_step(steps: int = 200, image_size: int = 64, batch: int = 64, num_images: int = 2048,
                       steps_per_call: int | None = None) -> dict:
  """The training loop's host time per step, device work excluded (milliseconds).

  The loop's host section (getting the batch, uploading it, dispatching the call with the whole
  donated TrainState of the default preset's model) is run against a stub step that returns the
  state unchanged (aliased, so the device does nothing), on this process's devices, with a
  synthetic uint8 training set at the default preset's shapes. "before": the host path this
  replaced (float32 lookup of the batch on the host, float32 upload); "device" / "host": the two
  placements of ``ddim_jax.training.feed`` (for "host", the time the loop waits for the background thread),
  one step per call; "device_k": the set on the devices at ``steps_per_call`` steps per call (None:
  the default preset's), per optimiser step.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ddim_jax import configs, data
  from ddim_jax.core import models, step as step_lib
  from ddim_jax.infra import parallel
  from ddim_jax.training import feed  # pylint: disable=import-outside-toplevel

  k = int(configs.load_config("default").train.steps_per_call) if steps_per_call is None else steps_per_call

  mesh = parallel.create_mesh(jax.local_devices())
  model = models.create_model("keras")
  step_config = step_lib.StepConfig()
  state = parallel.replicate(jax.jit(step_lib.create_train_state, static_argnums=(0, 1, 3))(
      model, step_config, jax.random.key(0), image_size), mesh)
  images = np.random.default_rng(0).integers(0, 256, (num_images, image_size, image_size, 3), dtype=np.uint8)
  normalizer = parallel.replicate({"mean": np.full(3, 0.5, np.float32), "variance": np.full(3, 0.08, np.float32)}, mesh)
  key = parallel.replicate(jax.random.key_data(jax.random.key(2)), mesh)
  stub = jax.jit(lambda state, batch, normalizer, key, *rest: (state, {"loss": jnp.zeros(())}), donate_argnums=(0,))
  out = {"steps": steps, "batch_size": batch, "image_size": image_size, "devices": len(mesh.devices.flat),
         "steps_per_call": k}
  for name in ("before", "device", "host", "device_k"):
    it = data.BatchIterator(images, batch, seed=0)
    calls = max(1, steps // k) if name == "device_k" else steps
    if name == "before":
      def next_call(state, it=it):
        return stub(state, parallel.shard_batch(next(it)["images"], mesh), normalizer, key)
    else:
      train_feed = feed.TrainFeed(it, mesh, k if name == "device_k" else 1, name.removesuffix("_k"))
      extra = (train_feed.data,) if name.startswith("device") else ()

      def next_call(state, train_feed=train_feed, extra=extra):
        return stub(state, train_feed.next()[0], normalizer, key, *extra)
    for _ in range(5):  # compile and warm up
      state, metrics = next_call(state)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(calls):
      state, metrics = next_call(state)
    jax.block_until_ready(state)
    out[f"{name}_ms"] = 1e3 * (time.perf_counter() - start) / (calls * (k if name == "device_k" else 1))
    if name != "before":
      train_feed.close()
  return out


def run_loop_processes(args):
  """``--loop`` as ``--loop-processes`` jax.distributed processes of ``--loop-devices`` CPU devices each.

  Each process is this script re-invoked with ``--loop`` and the coordinator on 127.0.0.1; they
  share one temporary workdir; process 0's measurement is returned.
  """
  import socket
  import tempfile

  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "result.json")
    argv = [sys.executable, os.path.abspath(__file__), "--loop", "--loop-config", args.loop_config,
            "--loop-steps", str(args.loop_steps),
            "--repeats", str(args.repeats), "--loop-workdir", os.path.join(tmp, "workdir"),
            *[f"--loop-override={o}" for o in args.loop_override]]
    procs = []
    for pid in range(args.loop_processes):
      env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 JAX_NUM_PROCESSES=str(args.loop_processes), JAX_PROCESS_ID=str(pid),
                 XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                           f"--xla_force_host_platform_device_count={args.loop_devices}".strip())
      with open(os.path.join(tmp, f"process_{pid}.log"), "w", encoding="utf-8") as log:  # files: no pipe to fill
        procs.append(subprocess.Popen(argv + (["--json", out] if pid == 0 else []), env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    for pid, p in enumerate(procs):
      if p.wait():
        with open(os.path.join(tmp, f"process_{pid}.log"), encoding="utf-8") as log:
          raise SystemExit(f"loop process {pid} failed ({p.returncode}):\n{log.read()[-3000:]}")
    with open(out, encoding="utf-8") as f:
      return json.load(f)


def format_host_time(result) -> str:
  return (f"loop host time per step (stub step, batch {result['batch_size']} of {result['image_size']}x"
          f"{result['image_size']}x3 uint8, {result['devices']} device(s)): before {result['before_ms']:.3f} ms "
          f"(float32 lookup + upload on the host); now {result['device_ms']:.3f} ms (set on the devices), "
          f"{result['host_ms']:.3f} ms (uint8 batches uploaded ahead); {result['device_k_ms']:.3f} ms at "
          f"{result['steps_per_call']} steps per call (the default preset's)")


def cli_help_seconds(repeats: int = 5) -> dict:
  """Wall time of `ddim-jax --help` and `ddim-jax train --help` in fresh Python processes (median)."""
  out = {}
  for argv in (["--help"], ["train", "--help"]):
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      subprocess.run([sys.executable, "-m", "ddim_jax.cli", *argv], capture_output=True, check=True)
      times.append(time.perf_counter() - start)
    out[" ".join(["ddim-jax", *argv])] = sorted(times)[len(times) // 2]
  return out


def flops_counts(image_size: int, sample_steps: int) -> dict:
  """FLOPs per image of both variants' forward, training step and sampler, counted from the jaxpr
  (nothing compiled or run: the counts are the same on every backend)."""
  import jax  # pylint: disable=import-outside-toplevel
  from ddim_jax.core import models, sampling, step as step_lib  # pylint: disable=import-outside-toplevel
  from ddim_jax.infra import flops  # pylint: disable=import-outside-toplevel
  out = {"mode": "flops", "image_size": image_size, "sample_steps": sample_steps, "flops_method": FLOPS_METHOD,
         "variants": {}}
  for variant in ("keras", "r"):
    model = models.create_model(variant)
    step_config = step_lib.StepConfig()
    state = jax.eval_shape(lambda key, model=model: step_lib.create_train_state(model, step_config, key, image_size),
                           jax.random.key(0))
    ema = state.variables(ema=True)
    out["variants"][variant] = {
        "parameters": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "forward_flops_per_image": flops.forward_flops(model, ema, image_size),
        "flops_per_image": flops.train_step_flops(step_lib.train_step, state, model, step_config, image_size, 1),
        "sample_flops_per_image": flops.sample_flops(sampling.generate, model, ema, image_size, 1, sample_steps)}
  return out


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    run_worker(args)
    return
  if args.flops_only:
    result = flops_counts(args.image_size, args.sample_steps)
    table = "\n".join(f"{v}: {c['forward_flops_per_image'] / 1e9:.3f} GFLOP per forward, "
                      f"{c['flops_per_image'] / 1e9:.3f} per training image, {c['sample_flops_per_image'] / 1e9:.2f} per "
                      f"{args.sample_steps}-step sample at {args.image_size}x{args.image_size}"
                      for v, c in result["variants"].items())
  elif args.cli_help:
    result = {"mode": "cli_help", "repeats": args.repeats, "seconds": cli_help_seconds(args.repeats)}
    table = "\n".join(f"{command}: {seconds:.3f} s (median of {args.repeats})"
                      for command, seconds in result["seconds"].items())
  elif args.host_time and not args.loop:
    result = host_time_per_step()
    table = format_host_time(result)
  elif args.loop:
    result = run_loop_processes(args) if args.loop_processes > 1 else run_loop(args)
    if args.loop_processes == 1:
      result["host_time"] = host_time_per_step()
    table = (f"training loop ({result['preset']} preset, {result['overrides']}): {result['loop_img_s']:.1f} img/s; bare step "
             f"{result['bare_step_img_s']:.1f} img/s; loop/bare = {100 * result['loop_fraction_of_bare']:.1f}%")
    if "host_time" in result:
      table += "\n" + format_host_time(result["host_time"])
  else:
    result = run_benchmark(args)
    table = format_table(result)
  if args.json is None:
    print(table)
    return
  print(table, file=sys.stderr)
  device = result.get("device") if isinstance(result.get("device"), str) else None
  result["provenance"] = provenance.collect(
      device=device if device and not device.lower().startswith(("cpu", "tfrt_cpu")) else None)
  text = json.dumps(result, indent=1)
  if args.json == "-":
    print(text)
  else:
    from ddim_jax import files  # pylint: disable=import-outside-toplevel
    files.ensure_parent(args.json, "--json")
    files.replace_text(args.json, text + "\n", "--json")


if __name__ == "__main__":
  main()
