"""The workdir as the record of a run: its config, its starts, and the resume guard.

Besides ``checkpoints/`` (``checkpointing.py``) and the metrics (``reporting.MetricWriter``), every
start of ``train_and_evaluate`` leaves (process 0, through ``run_dir.RunDir``, so a bucket works too):

  config.json   the resolved config of the newest start (every key, after overrides)
  runs.jsonl    one record per start: time, command line, where the config came from, the step it
                started from, versions (ddim-jax, jax, jaxlib, flax, optax, orbax), the backend,
                device kind and counts, and the config keys changed since the checkpoint it resumed

Resuming with another config (``check_resume``) compares it with the config stored in the newest
checkpoint. A change that makes the checkpoint meaningless (the model, the diffusion, the data or
the batch) is refused up front, naming the keys and the fix; any other change (number of steps,
intervals, learning rate, KID settings, ...) is allowed, printed and recorded.
"""

import datetime
import importlib.metadata
import json
import sys
from collections.abc import Mapping
from typing import Any

import jax

from ddim_jax import errors
from ddim_jax.infra.run_dir import RunDir

CONFIG_FILE = RunDir.CONFIG
RUNS_FILE = RunDir.RUNS

# Keys (or key prefixes ending in ".") whose change makes a checkpoint meaningless for the run.
INCOMPATIBLE = ("model.", "diffusion.", "data.", "train.batch_size", "train.lr_schedule", "train.warmup_steps")
# Exceptions under those prefixes: they move or fetch the same data, or change only the compute dtype.
COMPATIBLE = ("model.dtype", "data.data_dir", "data.cache_dir", "data.download")

_PACKAGES = ("ddim-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1} (tuples become lists, as in JSON)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return flat


def config_changes(stored: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """The keys whose values differ between two configs (as JSON dicts): key -> (stored, current).

  A key present on one side only (a config written by another version) counts as a change.
  """
  old, new = flatten(stored), flatten(current)
  missing = object()
  changes = {}
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, missing), new.get(key, missing)
    if a != b:
      changes[key] = (None if a is missing else a, None if b is missing else b)
  return changes


def is_incompatible(key: str) -> bool:
  """Whether changing ``key`` makes a checkpoint of the old value meaningless (see ``INCOMPATIBLE``)."""
  if key in COMPATIBLE:
    return False
  return any(key == k or (k.endswith(".") and key.startswith(k)) for k in INCOMPATIBLE)


def format_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
  """'a.b 1 -> 2, c 3 -> 4'."""
  return ", ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes.items())


def check_resume(stored_config: Mapping[str, Any], config, workdir: str, step: int) -> dict[str, tuple[Any, Any]]:
  """The changes from the config of checkpoint ``step`` to ``config``; raises on incompatible ones.

  Raises:
    errors.ConfigError: a model, diffusion, data or batch-size key differs; the message names the
      keys and the fix (a new workdir, or the stored values).
  """
  changes = config_changes(stored_config, json.loads(config.to_json()))
  # A key the stored config lacks (written by an older version, which had its default) is recorded, not refused.
  stored_keys = flatten(stored_config)
  refused = {k: v for k, v in changes.items() if is_incompatible(k) and k in stored_keys}
  if refused:
    raise errors.ConfigError(
        f"{workdir} holds a run of another config: its checkpoint (step {step}) has {format_changes(refused)} "
        f"(stored -> given). Train in a new --workdir, start over here with --fresh (the old run moves to "
        f"{workdir}/previous/), or resume with the stored values (see {workdir}/{CONFIG_FILE})")
  return changes


def versions() -> dict[str, str]:
  """Installed versions of ddim-jax and the JAX stack ('not installed' where missing)."""
  out = {}
  for name in _PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


def run_record(config_source: str | None, start_step: int, changes: Mapping[str, tuple[Any, Any]]) -> dict:
  """One ``runs.jsonl`` record of the current start (call after the JAX backend is up)."""
  devices = jax.devices()
  return {
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "argv": list(sys.argv),
      "config_source": config_source,
      "start_step": int(start_step),
      "config_changes": {k: list(v) for k, v in changes.items()},
      "versions": versions(),
      "python": sys.version.split()[0],
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "devices": len(devices),
      "local_devices": jax.local_device_count(),
      "processes": jax.process_count(),
  }


def write_run_files(workdir: str, config, record: Mapping[str, Any]) -> None:
  """Replaces ``config.json`` and appends ``record`` to ``runs.jsonl`` (process 0 only; a bucket works).

  Through ``RunDir``: the config is replaced atomically, the record appended in one write, so a kill at
  any moment loses no earlier record.
  """
  if jax.process_index() != 0:
    return
  run_dir = RunDir(workdir)
  run_dir.write_config(config.to_json(indent=2, sort_keys=True) + "\n")
  run_dir.append_run(record)


def read_runs(workdir: str) -> list[dict]:
  """The records of ``runs.jsonl`` (empty when the workdir has none; a partial last line is dropped)."""
  return RunDir(workdir).read_runs()
