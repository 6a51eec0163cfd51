"""Ctrl-C (issue 31): training saves the step it is at and exits 130; a second Ctrl-C stops at once;
every other command prints one line and exits 130. No traceback anywhere.

The signal handlers (``preemption.StopSignals``) are tested in this process; the commands in
subprocesses (a real SIGINT, as a terminal sends it) and, for the trainer's wiring, in-process.
"""

import gc
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from ddim_jax import cli
from ddim_jax.infra import preemption
from ddim_jax.training import reporting
from test_config_errors import write_tiny_weights
from train_helpers import final_state, run, subprocess_env, tiny_overrides, train_command, wait_until

# A run that a signal sent once training is under way stops mid-way; no save but the interrupt's.
LONG = {"train.num_steps": 2000, "train.checkpoint_every": 100000, "train.log_every": 2}


@pytest.fixture(name="cache_dir", scope="module")
def fixture_cache_dir(tmp_path_factory):
  """The digits cache that the training tests share (tests/test_train.py's)."""
  return tmp_path_factory.getbasetemp().parent / "data_cache"


def _wait_for_handler(predicate, seconds=5.0) -> bool:
  """Python runs a signal's handler between bytecodes of the main thread: give it a moment."""
  deadline = time.monotonic() + seconds
  while not predicate() and time.monotonic() < deadline:
    time.sleep(0.01)
  return predicate()


def _checkpoint_steps(workdir) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def _lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------
# The handlers.


def test_first_sigint_sets_the_flag_and_the_second_raises(capfd):
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  flag = preemption.PreemptionFlag()
  with preemption.StopSignals(flag) as signals:
    signals.install()
    os.kill(os.getpid(), signal.SIGINT)
    assert _wait_for_handler(flag.is_set)
    assert flag.signum == signal.SIGINT and signals.interrupted
    assert capfd.readouterr().err == preemption.INTERRUPT_NOTICE + "\n"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      _wait_for_handler(lambda: False)  # the handler raises in here
    # A third Ctrl-C goes to the handler that was there before (Python's: KeyboardInterrupt).
    assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
  assert {s: signal.getsignal(s) for s in before} == before


def test_sigterm_sets_the_flag_without_a_notice(capfd):
  flag = preemption.PreemptionFlag()
  with preemption.StopSignals(flag) as signals:
    signals.install()
    os.kill(os.getpid(), signal.SIGTERM)
    assert _wait_for_handler(flag.is_set)
    assert flag.signum == signal.SIGTERM and not signals.interrupted
    os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C after it still counts (exit 130)
    assert _wait_for_handler(lambda: signals.interrupted)
  assert flag.signum == signal.SIGTERM
  assert capfd.readouterr().err == preemption.INTERRUPT_NOTICE + "\n"


def test_install_clears_a_flag_left_set_and_skips_other_threads():
  flag = preemption.PreemptionFlag()
  flag.set(signal.SIGTERM)  # an earlier run of this process
  before = signal.getsignal(signal.SIGINT)
  with preemption.StopSignals(flag) as signals:
    signals.install()
    assert not flag.is_set()
  other = preemption.StopSignals(preemption.PreemptionFlag())
  thread = threading.Thread(target=other.install)  # Python's signal rule: main thread only
  thread.start()
  thread.join()
  assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_is_not_raised_where_python_would_drop_it(monkeypatch, tmp_path):
  sent = []
  monkeypatch.setattr(preemption, "send_again", sent.append)
  seen = {}

  def gc_callback(phase, info):  # noqa: ARG001  (gc's signature)
    if "in_callback" not in seen:
      seen["in_callback"] = True
      preemption.raise_keyboard_interrupt(signal.SIGINT, sys._getframe())  # pylint: disable=protected-access

  gc.callbacks.append(gc_callback)
  try:
    gc.collect()
  finally:
    gc.callbacks.remove(gc_callback)
  assert sent == [signal.SIGINT]  # not raised (gc would drop it): sent again

  class Finalized:
    def __del__(self):
      seen["in_del"] = preemption.interrupt_is_lost(sys._getframe())  # pylint: disable=protected-access

  Finalized()
  (tmp_path / "ij_module_being_imported.py").write_text(
      "import sys\nfrom ddim_jax.infra import preemption\nLOST = preemption.interrupt_is_lost(sys._getframe())\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  import ij_module_being_imported  # pylint: disable=import-outside-toplevel,import-error
  assert seen["in_del"] and ij_module_being_imported.LOST
  with pytest.raises(KeyboardInterrupt):  # anywhere else: Python's behaviour
    preemption.raise_keyboard_interrupt(signal.SIGINT, sys._getframe())  # pylint: disable=protected-access


def test_send_again_delivers_the_signal_later():
  got = []
  previous = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
  try:
    preemption.send_again(signal.SIGUSR1)
    assert _wait_for_handler(lambda: got == [signal.SIGUSR1])
  finally:
    signal.signal(signal.SIGUSR1, previous)


def test_ctrl_c_in_a_command_is_one_line_and_130(tmp_path, capsys, monkeypatch):
  from ddim_jax.inference import pipeline

  def interrupted(*args, **kwargs):
    assert signal.getsignal(signal.SIGINT) is preemption.raise_keyboard_interrupt  # while the command runs
    raise KeyboardInterrupt

  monkeypatch.delenv("DDIM_JAX_DEBUG", raising=False)
  monkeypatch.setattr(pipeline, "load_model", interrupted)
  argv = ["sample", "--weights", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "x.png")]
  capsys.readouterr()
  assert cli.main(argv) == 130
  assert capsys.readouterr().err == "ddim-jax sample: interrupted\n"
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's again
  with pytest.raises(KeyboardInterrupt):  # --debug: the traceback, as for other errors
    cli.main([*argv, "--debug"])


@pytest.mark.slow
def test_ctrl_c_in_process_training_saves_returns_130_and_restores_handlers(tmp_path, cache_dir, capfd,
                                                                            monkeypatch):
  """The trainer's wiring: a SIGINT at the first log saves the step the loop is at, ``cli.main`` returns
  130, the handlers and the flag are as before (in-process callers train again)."""
  write = reporting.MetricWriter.write
  sent = []

  def write_then_interrupt(self, *args, **kwargs):
    write(self, *args, **kwargs)
    if not sent:
      sent.append(True)
      os.kill(os.getpid(), signal.SIGINT)

  monkeypatch.setattr(reporting.MetricWriter, "write", write_then_interrupt)
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  workdir = tmp_path / "run"
  argv = ["train", "--config", "demo", "--workdir", str(workdir), *tiny_overrides(cache_dir, **LONG)]
  assert cli.main(argv) == 130
  err = capfd.readouterr().err
  steps = _checkpoint_steps(workdir)
  assert len(steps) == 1 and 0 < steps[0] < 2000, steps
  assert preemption.INTERRUPT_NOTICE in err and "Traceback" not in err, err
  assert _lines(err)[-1] == (f"ddim-jax train: interrupted: saved step {steps[0]} in {workdir}/checkpoints; the "
                             "same command resumes from it"), err
  assert {s: signal.getsignal(s) for s in before} == before
  # The next in-process run is not stopped by the flag this one left.
  monkeypatch.setattr(reporting.MetricWriter, "write", write)
  assert cli.main([*argv, f"--config.train.num_steps={steps[0] + 2}"]) == 0
  assert _checkpoint_steps(workdir)[-1] == steps[0] + 2


# ------------------------------------------------------------------------------------------------
# Real signals to the commands.


def _start_training(workdir, cache_dir, stderr_path):
  """`ddim-jax train` of the tiny LONG run, its stderr to a file; returns once a step was logged."""
  with open(stderr_path, "w", encoding="utf-8") as err:
    proc = subprocess.Popen(train_command(workdir, cache_dir, **LONG), env=subprocess_env(1),
                            stdout=subprocess.PIPE, stderr=err, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  assert wait_until(lambda: os.path.exists(metrics) and os.path.getsize(metrics) > 0, proc), "training never started"
  return proc


@pytest.mark.slow
def test_sigint_saves_the_current_step_exits_130_and_resumes(tmp_path, cache_dir):
  workdir, stderr_path = tmp_path / "run", tmp_path / "stderr"
  proc = _start_training(workdir, cache_dir, stderr_path)
  proc.send_signal(signal.SIGINT)
  proc.communicate(timeout=300)
  err = stderr_path.read_text(encoding="utf-8")
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  steps = _checkpoint_steps(workdir)
  assert len(steps) == 1 and 0 < steps[0] < 2000, steps  # the interrupt's save, mid-run
  assert err.count(preemption.INTERRUPT_NOTICE) == 1, err
  assert _lines(err)[-1] == (f"ddim-jax train: interrupted: saved step {steps[0]} in {workdir}/checkpoints; the "
                             "same command resumes from it"), err
  assert final_state(str(workdir))[0] == steps[0]  # it restores
  result = run(train_command(workdir, cache_dir, **{**LONG, "train.num_steps": steps[0] + 2}), subprocess_env(1))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resuming from step {steps[0]}" in result.stdout


@pytest.mark.slow
def test_a_second_sigint_stops_at_once_with_130(tmp_path, cache_dir):
  workdir, stderr_path = tmp_path / "run", tmp_path / "stderr"
  proc = _start_training(workdir, cache_dir, stderr_path)
  proc.send_signal(signal.SIGINT)
  assert wait_until(lambda: preemption.INTERRUPT_NOTICE in stderr_path.read_text(encoding="utf-8"), proc, 60)
  proc.send_signal(signal.SIGINT)  # while the step finishes or its save is written
  proc.communicate(timeout=300)
  err = stderr_path.read_text(encoding="utf-8")
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  last = _lines(err)[-1]
  # Usually the second Ctrl-C lands before the save has finished; if the save won the race, it is kept.
  steps = _checkpoint_steps(workdir)
  if steps:
    assert last.startswith(f"ddim-jax train: interrupted: saved step {steps[-1]} "), err
    assert final_state(str(workdir))[0] == steps[-1]  # what was saved is whole
  else:
    assert last.startswith("ddim-jax train: interrupted: stopped at step ") and "without saving it" in last, err


@pytest.mark.parametrize("delay", [1.0, 5.0], ids=["during-imports", "during-sampling"])
@pytest.mark.slow
def test_sigint_to_sample_is_one_line_and_130(tmp_path, delay):
  """Early (JAX's import: its gc callback and C extensions took most Ctrl-Cs) or late, one line and 130."""
  weights = write_tiny_weights(tmp_path / "w.safetensors")
  out = tmp_path / "grid.png"
  # Long enough (thousands of 8x8 images in small batches) that the signal lands during the sampling.
  cmd = [sys.executable, "-m", "ddim_jax.cli", "sample", "--weights", weights, "--out", str(out),
         "--num-images", "8192", "--batch-size", "16", "--steps", "100"]
  proc = subprocess.Popen(cmd, env=subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  time.sleep(delay)
  assert proc.poll() is None, proc.communicate()
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  assert _lines(err) == ["ddim-jax sample: interrupted"], err[-3000:]
  assert not out.exists()


def test_the_program_leaves_at_once_after_a_ctrl_c(monkeypatch):
  """Status 130 exits through os._exit (no interpreter teardown under a computation XLA may still run:
  a SIGSEGV after the one line, seen under load); any other status through sys.exit."""
  exits = []
  monkeypatch.setattr(cli.os, "_exit", lambda status: exits.append(status))
  monkeypatch.setattr(cli, "main", lambda: 130)
  with pytest.raises(SystemExit) as leaving:  # the patched os._exit returns; sys.exit follows
    cli.entry()
  assert exits == [130] and leaving.value.code == 130
  monkeypatch.setattr(cli, "main", lambda: 2)
  with pytest.raises(SystemExit) as leaving:
    cli.entry()
  assert exits == [130] and leaving.value.code == 2
