"""Preemption: a SIGTERM handler that only sets a flag (one process), and the point where the loop asks.

With several processes JAX's preemption service owns SIGTERM instead (`jax.distributed.initialize`
installs its notifier): a notice on any process makes `reached(sync_id)` True on every process at
the same id, agreed in the background; an ordinary call is a local compare, no collective per step.

Ctrl-C (SIGINT) during training (``StopSignals``): the first one is a preemption notice too (save at
the next step boundary, then ``Interrupted``: the command exits 130); a second one stops at once.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
from collections.abc import Sequence

# JAX is imported where it is used: the command line installs this module's SIGINT handler before
# JAX loads (a Ctrl-C during that import was lost too; see `raise_keyboard_interrupt`).


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
  import jax  # pylint: disable=import-outside-toplevel  (loaded already: a lookup)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return (PREEMPTION_FLAG if flag is None else flag).is_set()
  return bool(multihost_utils.reached_preemption_sync_point(sync_id))


class Interrupted(KeyboardInterrupt):
  """Ctrl-C stopped training; the message says which step was saved (or that none was) and how to resume.

  A ``KeyboardInterrupt``, as any Ctrl-C is in Python, so that callers that catch one catch this
  too; raised by the trainer once the run is closed (the save finished, the workdir unlocked).
  """


# What the first Ctrl-C prints (one line on stderr, written by the signal handler itself).
INTERRUPT_NOTICE = ("interrupted: finishing this step, saving a checkpoint and stopping (Ctrl-C again stops at "
                    "once, without saving this step)")


class StopSignals:
  """SIGTERM and SIGINT (Ctrl-C) of a training run: `install` when the loop can save, `restore` after.

  One process: SIGTERM sets the flag (the loop saves at the next step boundary and returns); the
  first SIGINT does the same and prints `INTERRUPT_NOTICE`, the second raises KeyboardInterrupt at
  once (and gives SIGINT back to the previous handler: a third Ctrl-C during the clean-up is an
  ordinary one). Several processes: JAX's preemption service owns SIGTERM (module docstring), so the
  first SIGINT sends this process a SIGTERM: JAX's notifier then stops every process at the same
  sync point, each saving its part of the checkpoint, as a preemption would. Without that service
  (``jax_enable_preemption_service=False``) Ctrl-C is left alone: it stops the process at once.

  A context manager: leaving it restores the handlers that were there before (in-process callers,
  such as the tests, train repeatedly) and ``interrupted`` says whether a Ctrl-C asked to stop.
  """

  def __init__(self, flag: PreemptionFlag | None = None):
    self.flag = PREEMPTION_FLAG if flag is None else flag
    self.interrupts = 0  # Ctrl-Cs received since `install`
    self._forward_to_jax = False  # several processes: a Ctrl-C becomes a SIGTERM to JAX's notifier
    self._previous: dict[int, object] = {}

  @property
  def interrupted(self) -> bool:
    """True once a Ctrl-C asked the run to stop (the command then exits 130, not 0)."""
    return self.interrupts > 0

  def install(self, multi_process: bool = False) -> None:
    """Installs the handlers (main thread only: elsewhere Python refuses, and signals stay as they are)."""
    if threading.current_thread() is not threading.main_thread():
      return
    self.flag.clear()  # a flag left set by an earlier run of this process would stop this one at once
    if not multi_process:
      self._set(signal.SIGTERM, self._on_sigterm)
      self._set(signal.SIGINT, self._on_sigint)
    elif _jax_preemption_service_running():
      self._forward_to_jax = True
      self._set(signal.SIGINT, self._on_sigint)

  def restore(self) -> None:
    """Puts back the handlers that `install` replaced; idempotent."""
    for signum in list(self._previous):
      self._put_back(signum)

  def __enter__(self) -> "StopSignals":
    return self

  def __exit__(self, *exc_info) -> None:
    self.restore()

  def _set(self, signum: int, handler) -> None:
    self._previous.setdefault(signum, signal.getsignal(signum))
    signal.signal(signum, handler)

  def _put_back(self, signum: int) -> None:
    previous = self._previous.pop(signum)
    # None: a handler installed from C, which Python cannot reinstall; the default is the nearest.
    signal.signal(signum, signal.SIG_DFL if previous is None else previous)

  def _on_sigterm(self, signum, frame):  # noqa: ARG002  (the signal API's signature)
    if not self.flag.is_set():  # a Ctrl-C before it keeps its signum
      self.flag.set(signum)

  def _on_sigint(self, signum, frame):
    if self.interrupts and interrupt_is_lost(frame):  # the second Ctrl-C: not here, a moment later
      send_again(signum)
      return
    self.interrupts += 1
    if self.interrupts > 1:
      # The second Ctrl-C: stop now. The handler that was there before takes the next one.
      self._put_back(signal.SIGINT)
      raise KeyboardInterrupt
    if not self.flag.is_set():  # a SIGTERM before it keeps its signum; `interrupted` says Ctrl-C
      self.flag.set(signum)
    if self._forward_to_jax:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier: every process stops at the same sync point
    # os.write, not print: the handler may run while the main thread is inside a write to
    # sys.stderr, and a buffered write reentered from a handler raises RuntimeError.
    try:
      os.write(2, (INTERRUPT_NOTICE + "\n").encode())
    except OSError:
      pass  # no stderr: the notice is lost, the save still happens


def raise_keyboard_interrupt(signum, frame):
  """A SIGINT handler: Python's own (raise KeyboardInterrupt), but not where it would be lost or worse.

  Python runs a signal's handler in whatever Python code the main thread runs next. There
  (`interrupt_is_lost`) the signal is sent again a moment later (`send_again`):

  - a gc callback or a ``__del__``: the exception is printed as "Exception ignored in ..." and
    dropped. JAX runs a gc callback at every collection (``_xla_gc_callback``), so most Ctrl-Cs
    during start-up and allocation-heavy work were lost (measured: 6 of 8 sent 2 to 3.5 s into
    `sample`), and the command went on to the end;
  - an import: in a C extension's initialisation (NumPy, jaxlib) it became an ImportError with a
    traceback (exit 1), or aborted the process (exit -6). An import takes a moment; then it stops.
  """
  if interrupt_is_lost(frame):
    send_again(signum)
    return
  raise KeyboardInterrupt


# How long after a Ctrl-C that came where it would be lost it is sent again (a gc callback takes
# microseconds; a Ctrl-C that lands in one again waits again).
SEND_AGAIN_SECONDS = 0.005


def send_again(signum: int) -> None:
  """Sends this process ``signum`` again in SEND_AGAIN_SECONDS, from another thread.

  Not from the handler itself: ``signal.raise_signal`` runs the handler again at once, inside the
  same callback (a recursion until Python's limit).
  """
  timer = threading.Timer(SEND_AGAIN_SECONDS, os.kill, (os.getpid(), signum))
  timer.daemon = True  # never keeps a finished process alive
  timer.start()


@contextlib.contextmanager
def ctrl_c_raises_reliably():
  """Installs `raise_keyboard_interrupt` for SIGINT while the block runs, in place of Python's default.

  Left alone: another thread than the main one (Python's signal rule), or a handler other than
  Python's default (an embedding program's own).
  """
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
    yield
    return
  signal.signal(signal.SIGINT, raise_keyboard_interrupt)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def interrupt_is_lost(frame) -> bool:
  """Whether ``frame`` or a caller of it is a gc callback, a ``__del__`` or an import (`raise_keyboard_interrupt`)."""
  callbacks = {getattr(callback, "__code__", None) for callback in gc.callbacks}
  while frame is not None:
    code = frame.f_code
    if code in callbacks or code.co_name == "__del__" or code.co_filename.startswith("<frozen importlib"):
      return True
    frame = frame.f_back
  return False


def _jax_preemption_service_running() -> bool:
  """Whether ``jax.distributed.initialize`` started JAX's preemption service (its SIGTERM notifier)."""
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state.preemption_sync_manager is not None
