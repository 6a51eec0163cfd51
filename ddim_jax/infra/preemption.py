"""Preemption: a SIGTERM handler that only sets a flag (one process), and the point where the loop asks.

With several processes JAX's preemption service owns SIGTERM instead (`jax.distributed.initialize`
installs its notifier): a notice on any process makes `reached(sync_id)` True on every process at
the same id, agreed in the background; an ordinary call is a local compare, no collective per step.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence

import jax
from jax.experimental import multihost_utils


class PreemptionFlag:
  """A thread- and signal-safe boolean set when this process is asked to stop.

  The signal handler only sets it; the training loop polls it (via `reached`, which
  `Checkpointer.reached_preemption` calls), finishes the step, saves and exits cleanly.
  """

  def __init__(self):
    self._event = threading.Event()
    self.signum: int | None = None

  def set(self, signum: int | None = None) -> None:
    """Marks the process as preempted (what the signal handler calls)."""
    self.signum = signum
    self._event.set()

  def clear(self) -> None:
    """Resets the flag (tests; or after a handled preemption that does not exit)."""
    self.signum = None
    self._event.clear()

  def is_set(self) -> bool:
    """True once `set` was called."""
    return self._event.is_set()


# Process-wide default: signals are process-wide, so one flag is the natural default.
PREEMPTION_FLAG = PreemptionFlag()


def install_sigterm_handler(flag: PreemptionFlag | None = None,
                            signums: Sequence[int] = (signal.SIGTERM,)) -> PreemptionFlag:
  """Installs a handler that sets `flag` on SIGTERM (or `signums`) instead of dying.

  Must be called from the main thread (a Python `signal` rule). Single-process runs only: with
  several processes JAX's preemption service owns SIGTERM (see the module docstring), and a Python
  handler installed after `jax.distributed.initialize` would replace JAX's notifier.

  Args:
    flag: the flag to set; defaults to the module's `PREEMPTION_FLAG`.
    signums: the signals to catch.

  Returns:
    The flag, to pass to `Checkpointer(preemption_flag=...)` or to poll directly.
  """
  flag = PREEMPTION_FLAG if flag is None else flag

  def handler(signum, frame):  # noqa: ARG001  (the signal API's signature)
    # Only set the flag: anything heavier (saving, logging with locks) is unsafe in a handler.
    flag.set(signum)

  for signum in signums:
    signal.signal(signum, handler)
  return flag


def reached(sync_id: int, flag: PreemptionFlag | None = None) -> bool:
  """True when the loop should save now and exit.

  One process: `flag` (default `PREEMPTION_FLAG`), set by `install_sigterm_handler`. Several
  processes: JAX's preemption sync point, True on every process at the same `sync_id` after a
  SIGTERM to any of them; `jax.distributed.initialize` must have started the preemption service
  (the default, `jax_enable_preemption_service=True`).

  Args:
    sync_id: the loop's call counter: consecutive integers from 1, the same sequence on every
      process and called at every one of them (JAX matches ids exactly, so a training step that
      advances by `steps_per_call` must not be passed).
    flag: the single-process flag.
  """
  if jax.process_count() == 1:
    return (PREEMPTION_FLAG if flag is None else flag).is_set()
  return bool(multihost_utils.reached_preemption_sync_point(sync_id))
