"""Data parallelism: the device mesh, the two launchers of the per-device step, multi-host start.

One per-device step (``train.per_device_step``) with collectives over axis "data", launched either by
``jax.shard_map`` under ``jax.jit`` over a 1-D mesh (default; JAX itself now runs pmap this way)
or by ``jax.pmap`` (``config.parallel = "pmap"``). Both take and return the state replicated
and the batch split along its batch axis, and both must give the same numbers (tested on 1, 2 and
4 devices, and on 2 processes x 2 devices).

Multi-host: ``initialize_distributed`` calls ``jax.distributed.initialize()``; every process
feeds its own slice of each global batch (``data.BatchIterator`` with ``process_index`` /
``process_count``), and ``shard_batch`` assembles the global array.

A leaf module: it imports no other module of ddim_jax.
"""

import itertools
import os
import re
import warnings

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddim_jax import errors


AXIS = "data"
PARALLEL_MODES = ("shard_map", "pmap")
_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def cpu_device_count(spec, batch_size: int | None, num_processes: int = 1) -> int:
  """How many JAX devices the CPU backend should expose: ``spec`` is "auto" or a positive integer.

  "auto": one device per available core, lowered to the largest count that divides this process's
  share of ``batch_size`` (the sharded step needs equal shards; None: no batch to divide, as for
  inference, which splits each batch over the most devices dividing it). Why: XLA:CPU runs each
  convolution on one thread, so a one-device CPU step leaves the other cores mostly idle; one
  device per core runs one shard per core, exactly the data-parallel path of a GPU host.
  """
  if isinstance(spec, str) and spec.strip().lower() == "auto":
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_batch = cores if batch_size is None else max(1, int(batch_size) // max(1, int(num_processes)))
    count = max(1, min(cores, local_batch))
    while local_batch % count:
      count -= 1
    return count
  try:
    count = int(spec)
  except (TypeError, ValueError):
    count = 0
  if count < 1 or str(spec).strip() != str(count):
    raise errors.ConfigError(f"config.cpu_devices={spec!r} is invalid: use 'auto' (one JAX CPU device per core) or a "
                             f"positive integer")
  return count


def configure_cpu_devices(spec, batch_size: int | None) -> int | None:
  """Sets ``jax_num_cpu_devices`` from ``spec`` (see ``cpu_device_count``) before the backend starts.

  Only the CPU client reads it (GPU/TPU devices are unaffected). Returns the count set, or None
  when left alone: ``XLA_FLAGS`` already forces a host device count (tests, users), or the
  backend has already started (a warning says so). Inference (``batch_size`` None: no
  ``jax.distributed`` run to join before the backend starts) then starts the backend
  (``start_backend``), so that a platform that does not start is one error here; training calls
  ``start_backend`` itself, after ``initialize_distributed``.
  """
  count = _set_cpu_devices(spec, batch_size)
  if batch_size is None:
    start_backend()
  return count


def start_backend() -> None:
  """Starts JAX's backend now (after ``configure_cpu_devices`` and ``initialize_distributed``).

  Raises:
    errors.ConfigError: the platform ``JAX_PLATFORMS`` names (or an installed plugin's) does not
      start here (``backend_error``); the message names it and the fix.
  """
  try:
    jax.devices()
  except (RuntimeError, AssertionError) as e:
    error = backend_error(e)
    if error is None:
      raise
    raise error from e


def _set_cpu_devices(spec, batch_size: int | None) -> int | None:
  """``configure_cpu_devices`` without starting the backend."""
  count = cpu_device_count(spec, batch_size, int(os.environ.get("JAX_NUM_PROCESSES", "1") or 1))  # validates
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return None
  if int(jax.config.jax_num_cpu_devices) == count:
    return count
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError as e:  # the backend is already running in this process
    if jax.local_device_count() == count:
      return count
    warnings.warn(f"config.cpu_devices={spec!r} not applied ({e}); keeping {jax.local_device_count()} device(s)")
    return None
  flags = os.environ.get("XLA_FLAGS", "")
  if count > 1 and "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
    # XLA:CPU's default scheduler orders a program to run independent ops concurrently on all cores;
    # with one device per core that only lengthens live ranges (measured: the 2-device training step
    # 5% slower). Read when the backend starts, so setting it here (before) takes effect.
    os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_enable_concurrency_optimized_scheduler=false".strip()
  return count


def initialize_distributed(enabled: bool | None = None, **kwargs) -> bool:
  """Starts ``jax.distributed`` when asked (flag) or when the usual environment says so.

  Args:
    enabled: True: initialise; False: never; None: initialise if ``JAX_COORDINATOR_ADDRESS`` is set
      (with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``). TPU pods and SLURM/Kubernetes/MPI
      clusters are auto-detected by ``jax.distributed.initialize()`` itself: pass enabled=True
      (``ddim-jax train --distributed``) there.
    **kwargs: coordinator_address, num_processes, process_id, ... for ``jax.distributed.initialize``.

  Returns:
    Whether jax.distributed was initialised by this call.
  """
  if enabled is None:
    enabled = any(os.environ.get(name) for name in _DISTRIBUTED_ENV)
  if not enabled:
    return False
  # jax reads JAX_COORDINATOR_ADDRESS itself; the process count and id we read here, so that a
  # plain cluster (or a test on 127.0.0.1) needs only environment variables.
  for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
    if key not in kwargs and os.environ.get(env):
      kwargs[key] = int(os.environ[env])
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") and not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
  jax.distributed.initialize(**kwargs)
  return True


# JAX's message when a platform's backend does not start: "Unable to initialize backend 'tpu': <why>
# (set JAX_PLATFORMS='' to ...)"; the advice in brackets is JAX's, replaced by ours.
_BACKEND_FAILED = re.compile(r"Unable to initialize backend '([^']*)': (.*?)(?: \((?:set|you may need)[^()]*\))?$",
                             re.S)
# The JAX plugins of the accelerators (what to install when JAX_PLATFORMS names one).
_PLUGINS = {"tpu": "jax[tpu]", "cuda": "jax[cuda12]", "gpu": "jax[cuda12]", "rocm": "the ROCm build of jaxlib"}


def backend_error(error: BaseException, platforms: str | None = None) -> errors.ConfigError | None:
  """The one-line error for JAX failing to start the platform it was asked for, or None for any other error.

  JAX raises ``RuntimeError("Unable to initialize backend 'tpu': ...")`` at the first call that
  needs devices when ``JAX_PLATFORMS`` names a platform that does not start here (no TPU, no
  libtpu) or an installed plugin fails; with ``JAX_PLATFORMS=cuda`` and no NVIDIA GPU visible JAX
  0.10 skips the platform and then fails a bare ``assert`` in ``xla_bridge``. The command's
  one-line error names ``JAX_PLATFORMS`` and the fix instead of JAX's 40-line traceback.
  ``platforms``: the value of ``JAX_PLATFORMS`` (None: JAX's setting, which it read from there).
  """
  platforms = str((jax.config.jax_platforms if platforms is None else platforms) or "").strip()
  match = _BACKEND_FAILED.match(str(error)) if isinstance(error, RuntimeError) else None
  if match:
    platform, why = match.group(1), " ".join(match.group(2).split())
  elif isinstance(error, AssertionError) and platforms and _raised_in(error, "xla_bridge.py"):
    platform, why = platforms, "no device of that platform is visible"
  else:
    return None
  plugin = _PLUGINS.get(platform.split(",")[0].strip().lower())
  install = f"install JAX's plugin for it ({plugin})" if plugin else "install JAX's plugin for it"
  if platforms:
    return errors.ConfigError(
        f"environment variable JAX_PLATFORMS={platforms!r}: JAX cannot start the {platform!r} backend ({why}); "
        f"unset JAX_PLATFORMS (JAX then uses the devices it finds) or set it to cpu, or {install}")
  return errors.ConfigError(
      f"JAX cannot start the {platform!r} backend of an installed plugin ({why}); set JAX_PLATFORMS=cpu to skip "
      f"it, or repair or uninstall that plugin")


def _raised_in(error: BaseException, filename: str) -> bool:
  """Whether the innermost frame of ``error``'s traceback is in a file named ``filename``."""
  tb = error.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is not None and os.path.basename(tb.tb_frame.f_code.co_filename) == filename


class PeerProcessError(errors.Error, RuntimeError):
  """Another process of a jax.distributed run failed (its own output says why)."""


def process_zero_first(fn, what: str):
  """Runs ``fn()`` on process 0 first and on the other processes after it returned; returns its result.

  For work that must happen once per run and that the others then read: a dataset download or a
  data-cache build (on a shared file system the others find it; on per-host disks each host then
  builds its own, one process per host at a time being the usual pod layout). One process: just
  ``fn()``. If process 0 fails, the others stop at once with an error that points at process 0's.

  The outcome travels through the coordination service's key-value store, not a device collective:
  a failure on process 0 reaches the others immediately (a collective left them waiting ~30 s for
  the coordination service to notice that process 0 was gone).
  """
  if jax.process_count() == 1:
    return fn()
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  client = distributed.global_state.client
  key = f"ddim_jax/process_zero_first/{next(_PROCESS_ZERO_FIRST_CALLS)}"  # every process counts its calls alike
  if jax.process_index() == 0:
    try:
      result = fn()
    except BaseException as e:
      client.key_value_set(key, f"failed: {type(e).__name__}")
      raise
    client.key_value_set(key, "ok")
    return result
  try:
    outcome = client.blocking_key_value_get(key, PROCESS_ZERO_FIRST_TIMEOUT_MS)
  except Exception as e:  # noqa: BLE001  (whatever the client raises when process 0 is gone)
    outcome = f"failed: {type(e).__name__}"
  if outcome != "ok":
    raise PeerProcessError(f"process 0 did not finish {what}; its own error says why ({outcome.removeprefix('failed: ')})")
  return fn()


_PROCESS_ZERO_FIRST_CALLS = itertools.count()
# How long the other processes wait for process 0's ``process_zero_first`` work (a dataset download can take hours).
PROCESS_ZERO_FIRST_TIMEOUT_MS = 24 * 3600 * 1000


def wait_for_other_processes(what: str, timeout_ms: int | None = None) -> None:
  """Returns once every process of the run has called it (a barrier of the coordination service).

  No device collective: the first collective of a new set of devices sets up its gloo (CPU) context
  through the coordination service's key-value store with a fixed 30 s wait, so a process that
  reaches it more than 30 s before another fails ("Gloo context initialization failed:
  DEADLINE_EXCEEDED: GetKeyValue() timed out"). One process: returns at once. Every process must
  make the same calls in the same order (they are numbered).
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  timeout_ms = COMPILE_BARRIER_TIMEOUT_MS if timeout_ms is None else timeout_ms
  distributed.global_state.client.wait_at_barrier(f"ddim_jax/{what}/{next(_BARRIER_CALLS)}", int(timeout_ms))


_BARRIER_CALLS = itertools.count()
# How long the processes wait for each other to compile a training function (a big model's first
# compilation takes minutes on a loaded host; a process that died is reported by the coordination
# service long before).
COMPILE_BARRIER_TIMEOUT_MS = 3600 * 1000


def _compiled_together(jitted, what: str):
  """``jitted`` (a jit or pmap function) whose first call compiles it, waits for the other processes
  to have compiled theirs (``wait_for_other_processes``), then runs: the processes of a run compile
  at different speeds (one loads the program from the compilation cache, another compiles it under
  load), and the step's collectives must not be where they meet."""
  if jax.process_count() == 1:
    return jitted
  met = []

  def call(*args):
    if not met:
      jitted.lower(*args).compile()  # the executable that the call below finds in jit's cache
      wait_for_other_processes(what)
      met.append(True)
    return jitted(*args)

  return call


def create_mesh(devices=None) -> Mesh:
  """A 1-D mesh named "data" over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of state and other replicated values."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, steps_per_call: int = 1) -> NamedSharding:
  """The sharding of a global batch (B, ...) or, with several steps per call, (K, B, ...)."""
  return NamedSharding(mesh, P(AXIS) if steps_per_call == 1 else P(None, AXIS))


def replicate(tree, mesh: Mesh):
  """Puts a host pytree (identical on every process) on every device of ``mesh``."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def shard_batch(local_batch: np.ndarray, mesh: Mesh, steps_per_call: int = 1) -> jax.Array:
  """This process's slice of a global batch -> the global array sharded over "data"."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh, steps_per_call), local_batch)


def rows_mesh(num_rows: int, devices=None) -> Mesh:
  """The largest "data" mesh of ``devices`` (default: this process's) whose size divides ``num_rows``.

  For batch-parallel inference (sampling, inversion, KID): no padding, so draws made inside a jitted
  sampler have the shapes they have on one device, and every row sees the same computation.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  size = max(k for k in range(1, len(devices) + 1) if num_rows % k == 0)
  return create_mesh(devices[:size])


def shard_rows(x, mesh: Mesh, axis: int = 0) -> jax.Array:
  """A host array (the same on every process) split along ``axis`` over the mesh's "data" axis."""
  x = np.asarray(x)
  spec = P(*([None] * axis), AXIS)
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index])


def gather_rows(x) -> np.ndarray:
  """A (row-)sharded result -> the whole array as NumPy, on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def check_batch_size(global_batch_size: int, num_devices: int) -> None:
  """Raises a ValueError naming ``train.batch_size`` when it does not split over the devices."""
  if global_batch_size < 1 or global_batch_size % num_devices:
    suggestion = max(1, global_batch_size // num_devices) * num_devices
    raise errors.ConfigError(f"train.batch_size={global_batch_size} must be a positive multiple of the device count "
                             f"({num_devices}); e.g. --config.train.batch_size={suggestion}")


def make_train_fn(step_fn, mesh: Mesh, mode: str = "shard_map", steps_per_call: int = 1, with_data: bool = False):
  """The compiled data-parallel training function of a per-device step.

  Args:
    step_fn: the per-device step ``(state, images, normalizer, base_key) -> (state, metrics)``,
      written with collectives over axis "data" (``train.per_device_step``).
    mesh: the 1-D "data" mesh.
    mode: "shard_map" (jit + shard_map, default) or "pmap".
    steps_per_call: K optimiser steps per call; batches then have a leading K axis.
    with_data: the step takes a fifth, replicated argument (the training set on the devices,
      ``feed.TrainFeed``); shard_map only.

  Returns:
    fn(state, images, normalizer, base_key[, data]) -> (state, metrics). ``images`` is this
    process's NumPy slice of the global batch, (b, ...) or (K, b, ...), in both modes (shard_map
    also takes a global array already placed with ``batch_sharding``). The state is replicated;
    with shard_map its buffers are donated.
  """
  if mode not in PARALLEL_MODES:
    raise errors.ConfigError(f"config.parallel={mode!r} is not one of {PARALLEL_MODES}")
  if with_data and mode != "shard_map":
    raise errors.ConfigError("a training set on the devices needs config.parallel='shard_map'")
  if mode == "shard_map":
    images_spec = P(AXIS) if steps_per_call == 1 else P(None, AXIS)
    # check_vma=False: per-device (pmap) semantics, where the gradient of the local loss is local
    # and the explicit pmean makes it global; with VMA typing, JAX would already psum the
    # gradient of the replicated parameters and the pmean would not average.
    sharded = _compiled_together(
        jax.jit(jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), images_spec, P(), P()) + ((P(),) * with_data),
                              out_specs=(P(), P()), check_vma=False), donate_argnums=(0,)),
        "compiled the training step")

    def shard_map_fn(state, images, normalizer, base_key, *data):
      if not isinstance(images, jax.Array):
        images = shard_batch(images, mesh, steps_per_call)
      return sharded(state, images, normalizer, base_key, *data)

    return shard_map_fn

  pmapped = _compiled_together(jax.pmap(step_fn, axis_name=AXIS, in_axes=(None, 0, None, None), out_axes=(None, None),
                                        devices=mesh.devices.tolist()), "compiled the training step")
  # pmap takes this process's slice of the batch with a leading axis over its local devices.
  num_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

  def pmap_fn(state, images, normalizer, base_key):
    # (b, ...) -> (D, b/D, ...), or (K, b, ...) -> (D, K, b/D, ...), for the D local devices.
    images = np.asarray(images)
    if steps_per_call == 1:
      images = images.reshape((num_devices, -1) + images.shape[1:])
    else:
      images = images.reshape((images.shape[0], num_devices, -1) + images.shape[2:]).swapaxes(0, 1)
    return pmapped(state, images, normalizer, base_key)

  return pmap_fn
