"""What a run leaves in its workdir and how it is picked up again: config.json and runs.jsonl, the
resume guard, metrics after a resume, TensorBoard content, the start banner and plain log lines,
the state NaN guard, profiler traces, and the one-line errors of the command line."""

import gzip
import json
import os
import shutil
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddim_jax import cli, errors
from ddim_jax.core import step as step_lib
from ddim_jax.inference import pipeline
from ddim_jax.infra import checkpointing, run_record
from ddim_jax.training import reporting, trainer, validation
from train_helpers import final_weights, run, subprocess_env, tiny_config, tiny_overrides


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


def _records(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def read_events(path) -> list:
  """The Event protos of one TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2
  events = []
  with open(path, "rb") as f:
    while header := f.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      events.append(event_pb2.Event.FromString(f.read(length)))
      f.read(4)
  return events


def tensorboard_view(logdir) -> dict[str, dict[int, object]]:
  """tag -> {step: value or image} as TensorBoard shows it: event files in order of creation, where
  a SessionLog START at step s (``purge_step``) hides the earlier files' points at steps >= s."""
  view: dict[str, dict[int, object]] = {}
  files = sorted((read_events(os.path.join(logdir, name)) for name in os.listdir(logdir)),
                 key=lambda events: events[0].wall_time)
  for events in files:
    for event in events:
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        for points in view.values():
          for step in [s for s in points if s >= event.step]:
            del points[step]
      for value in event.summary.value:
        view.setdefault(value.tag, {})[event.step] = value.image if value.HasField("image") else value.simple_value
  return view


# ------------------------------------------------------------------------------------------------
# config.json, runs.jsonl and the resume guard.


@pytest.mark.slow
def test_run_record_and_the_resume_guard(tmp_path, cache_dir, capsys):
  workdir = str(tmp_path / "run")
  assert cli.main(["train", "--config", "demo", "--workdir", workdir, *tiny_overrides(cache_dir, **{
      "train.num_steps": 4})]) == 0
  config = tiny_config(cache_dir, **{"train.num_steps": 4})
  assert json.loads((tmp_path / "run" / "config.json").read_text()) == json.loads(config.to_json())
  (first,) = run_record.read_runs(workdir)
  assert first["start_step"] == 0 and first["config_changes"] == {}
  assert first["config_source"].startswith("demo '--config.model.widths=(8,16)' ")
  assert first["devices"] == jax.device_count() == 4 and first["processes"] == 1
  assert first["versions"]["jax"] == jax.__version__ and first["versions"]["ddim-jax"] != "not installed"

  # Harmless changes are allowed, printed and recorded.
  capsys.readouterr()
  assert cli.main(["train", "--config", "demo", "--workdir", workdir, *tiny_overrides(cache_dir, **{
      "train.num_steps": 6, "train.learning_rate": 5e-4})]) == 0
  out = capsys.readouterr().out
  assert "resuming from step 4" in out and "train.learning_rate 0.001 -> 0.0005, train.num_steps 4 -> 6" in out, out
  second = run_record.read_runs(workdir)[1]
  assert second["start_step"] == 4
  assert second["config_changes"] == {"train.learning_rate": [0.001, 0.0005], "train.num_steps": [4, 6]}
  assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["num_steps"] == 6

  # A change that makes the checkpoint meaningless: one line naming the keys and the fix, before any work.
  for override, key in (({"model.widths": "(8,32)"}, "model.widths [8, 16] -> [8, 32]"),
                        ({"diffusion.schedule": "linear"}, 'diffusion.schedule "cosine" -> "linear"'),
                        ({"train.batch_size": 16}, "train.batch_size 8 -> 16")):
    assert cli.main(["train", "--config", "demo", "--workdir", workdir, *tiny_overrides(cache_dir, **{
        "train.num_steps": 8, **override})]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and "new --workdir" in err and "Traceback" not in err, err
  assert len(run_record.read_runs(workdir)) == 2  # the refused starts left no record
  assert final_weights(workdir)["__step__"] == 6


def test_config_changes_and_what_is_incompatible():
  stored = {"model": {"widths": [8, 16], "dtype": "float32"}, "data": {"cache_dir": "a", "dataset": "digits"},
            "train": {"num_steps": 4, "batch_size": 8}}
  current = {"model": {"widths": [8, 16], "dtype": "bfloat16"}, "data": {"cache_dir": "b", "dataset": "digits"},
             "train": {"num_steps": 8, "batch_size": 8}, "eval": {"new_key": 1}}
  changes = run_record.config_changes(stored, current)
  assert changes == {"data.cache_dir": ("a", "b"), "eval.new_key": (None, 1), "model.dtype": ("float32", "bfloat16"),
                     "train.num_steps": (4, 8)}
  assert not any(run_record.is_incompatible(k) for k in changes)
  assert all(run_record.is_incompatible(k) for k in ("model.widths", "diffusion.target", "data.dataset",
                                                      "train.batch_size", "data.split_seed"))


# ------------------------------------------------------------------------------------------------
# Metrics after a resume, TensorBoard, banner and log lines.


@pytest.mark.slow
def test_a_resumed_run_leaves_each_step_once_in_metrics_and_tensorboard(tmp_path, cache_dir):
  """A crash after the step-8 log but before its checkpoint (simulated by removing checkpoint 8),
  then a resume to step 6: the steps after the restored step 4 that the first run logged are gone
  from metrics.jsonl and hidden in TensorBoard; steps 5-6 show the resumed run's values."""
  workdir = tmp_path / "run"
  extra = {"train.checkpoint_every": 4, "train.sample_every": 4, "train.keep_checkpoints": 5}
  trainer.train_and_evaluate(tiny_config(cache_dir, **extra), str(workdir), progress=False)
  shutil.rmtree(workdir / "checkpoints" / "8")
  before = {r["step"]: r for r in _records(workdir)}
  assert sorted(before) == [2, 4, 6, 8]
  trainer.train_and_evaluate(tiny_config(cache_dir, **extra, **{"train.num_steps": 6}), str(workdir), progress=False)
  records = _records(workdir)
  assert [r["step"] for r in records] == [2, 4, 6]
  assert records[:2] == [before[2], before[4]]

  view = tensorboard_view(workdir / "tensorboard")
  assert sorted(view["train/loss"]) == [2, 4, 6]
  for r in records:  # the resumed run's values, not the first run's
    assert view["train/loss"][r["step"]] == pytest.approx(r["loss"], rel=1e-6)
  assert sorted(view["samples"]) == [4] and view["samples"][4].height > 0  # the sample grids, as images
  assert len(os.listdir(workdir / "tensorboard")) == 2
  events = [e for name in os.listdir(workdir / "tensorboard")
            for e in read_events(workdir / "tensorboard" / name)]
  tags = {v.tag for e in events for v in e.summary.value}
  assert {"_hparams_/experiment", "_hparams_/session_start_info", "config/text_summary"} <= tags, tags


def test_kid_is_logged_as_val_kid(tmp_path):
  writer = reporting.MetricWriter(str(tmp_path))
  writer.write(3, {"loss": 0.5, "val_kid": 0.25})
  writer.close()
  view = tensorboard_view(tmp_path / "tensorboard")
  assert view["val/kid"] == {3: 0.25} and view["train/loss"] == {3: 0.5}
  assert _records(tmp_path) == [{"step": 3, "loss": 0.5, "val_kid": 0.25}]


@pytest.mark.slow
def test_a_redirected_run_prints_the_banner_and_plain_log_lines(tmp_path, cache_dir):
  """stdout and stderr are pipes here, as in a batch job: no carriage returns, one line per log step."""
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "ddim_jax.cli", "train", "--config", "demo", "--workdir", str(workdir),
         *tiny_overrides(cache_dir, **{"train.log_every": 4, "train.checkpoint_every": 4})]
  result = run(cmd, subprocess_env(2))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "\r" not in result.stdout + result.stderr
  lines = result.stdout.splitlines()
  first = "ddim-jax train: demo '--config.model.widths=(8,16)' "
  banner = next(i for i, line in enumerate(lines) if line.startswith(first))
  assert lines[banner + 1].startswith("  devices    2 x cpu (cpu), 1 process(es)")
  assert "10,011 parameters" in lines[banner + 2]  # the tiny U-Net, counted
  assert "1,437 training images" in lines[banner + 3] and "360 validation images" in lines[banner + 3]
  # 1,437 x 16 x 16 x 3 bytes = 1.1 MiB: within the CPU rule, so on the devices.
  assert lines[banner + 4] == "  input      on the devices (1.1 MiB uint8, uploaded once; the step gathers by index)"
  assert "8 global = 4 per device" in lines[banner + 5]
  logged = [line for line in lines if line.startswith("step ")]
  assert [line.split()[1] for line in logged] == ["4/8", "8/8"], lines
  assert all(" loss " in line and " img/s " in line and " eta " in line for line in logged)


def test_progress_counts_finished_steps():
  report = reporting.ProgressReport(num_steps=10, start_step=2, interactive=True)
  report.finished(4)
  report.finished(3)  # never backwards
  assert (report.done, report._bar.n) == (4, 4)
  report.close()


@pytest.mark.slow
def test_the_loop_reports_steps_only_after_they_finished(tmp_path, cache_dir, monkeypatch):
  """Each step the progress report is told about has finished: its metrics are ready on the device."""
  seen, ready = [], []
  real_fn = trainer.parallel.make_train_fn
  outputs = {}

  def recording_make_train_fn(*args, **kwargs):
    fn = real_fn(*args, **kwargs)

    def wrapped(state, *rest):
      new_state, metrics = fn(state, *rest)
      outputs[len(outputs) + 1] = metrics["loss"]  # call k ends at step k (1 step per call)
      return new_state, metrics
    return wrapped

  class Recording(reporting.ProgressReport):
    def finished(self, step):
      seen.append(step)
      ready.append(all(outputs[s].is_ready() for s in range(1, step + 1)))
      super().finished(step)

  monkeypatch.setattr(trainer.parallel, "make_train_fn", recording_make_train_fn)
  monkeypatch.setattr(reporting, "ProgressReport", Recording)
  config = tiny_config(cache_dir, **{"train.num_steps": 12, "train.log_every": 6, "train.checkpoint_every": 12})
  trainer.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  assert all(ready) and seen[-1] == 12, (seen, ready)
  assert seen[:3] == [1, 2, 3], seen  # steps are reported as they finish, not only at log steps


# ------------------------------------------------------------------------------------------------
# The NaN guard and the profiler.


@pytest.mark.slow
def test_a_non_finite_state_is_never_saved(tmp_path, cache_dir, monkeypatch):
  """The update of step 4 makes the weights NaN while the loss (computed before it) is finite:
  the run stops with the step named, and the newest checkpoint is step 2's finite state."""
  real = step_lib.per_device_step

  def poisoned(model, step_config, steps_per_call=1, axis_name="data"):
    step_fn = real(model, step_config, steps_per_call, axis_name)

    def step(state, *args):
      new_state, metrics = step_fn(state, *args)
      poison = jnp.where(new_state.step == 4, jnp.nan, 0.0)
      return new_state.replace(params=jax.tree.map(lambda p: p + poison, new_state.params)), metrics
    return step

  monkeypatch.setattr(step_lib, "per_device_step", poisoned)
  config = tiny_config(cache_dir)
  with pytest.raises(trainer.NonFiniteLossError, match=r"non-finite training state after step 4 .*\(step 2\)"):
    trainer.train_and_evaluate(config, str(tmp_path), progress=False)
  weights = final_weights(tmp_path)
  assert int(weights["__step__"]) == 2 and all(np.all(np.isfinite(v)) for v in weights.values())


@pytest.mark.slow
def test_profile_steps_write_a_trace(tmp_path, cache_dir):
  config = tiny_config(cache_dir, **{"train.profile_steps": "2,4", "train.num_steps": 6})
  trainer.train_and_evaluate(config, str(tmp_path), progress=False)
  traces = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "profile") for f in files
            if f == "perfetto_trace.json.gz"]
  assert len(traces) == 1
  with gzip.open(traces[0], "rt") as f:
    events = json.load(f)["traceEvents"]
  assert sum(e.get("ph") == "X" for e in events) > 10  # timed events of the traced steps
  for bad in ("4,2", "x"):
    with pytest.raises(errors.ConfigError, match="profile_steps"):
      validation.validate_config(tiny_config(cache_dir, **{"train.profile_steps": bad, "train.steps_per_call": 2}), 1)


# ------------------------------------------------------------------------------------------------
# Choosing a checkpoint.


def _checkpoints(directory, kids) -> checkpointing.Checkpointer:
  """A checkpoint directory whose step s was saved with val_kid ``kids[s]`` (None: no metrics), opened
  as ``restore_checkpoint`` opens it: a reader ranking by val_kid."""
  with checkpointing.Checkpointer(directory, max_to_keep=None, best_metric="val_kid", async_save=False) as ckpt:
    for step, kid in kids.items():
      ckpt.save(step, {"w": jnp.full((2,), float(step))}, {"step": step},
                None if kid is None else {"loss": 0.1, "val_kid": kid})
  return checkpointing.Checkpointer(directory, best_metric="val_kid", async_save=False, read_only=True)


def test_select_step_best_is_the_lowest_kid_not_the_newest(tmp_path):
  with _checkpoints(tmp_path / "a", {2: 0.5, 4: 0.1, 6: 0.3, 8: None, 10: float("nan")}) as ckpt:
    assert ckpt.best_step() == 4
    assert pipeline.select_step(ckpt, "best") == (4, "best: val_kid 0.10000")
    assert pipeline.select_step(ckpt, "latest") == (10, "latest")
    assert pipeline.select_step(ckpt, None) == (10, "latest")
    assert pipeline.select_step(ckpt, "6") == (6, "step 6")
    with pytest.raises(errors.MissingInputError, match=r"no checkpoint of step 7 .* steps \[2, 4, 6, 8, 10\]"):
      pipeline.select_step(ckpt, "7")
  with _checkpoints(tmp_path / "b", {2: 0.2, 4: 0.2, 6: float("inf")}) as ckpt:
    assert pipeline.select_step(ckpt, "best")[0] == 2  # a tie: the earlier step; inf is no KID
  with _checkpoints(tmp_path / "c", {2: None, 4: float("nan")}) as ckpt:
    assert ckpt.best_step() is None
    with pytest.raises(errors.ConfigError, match="none of the checkpoints .* has a KID"):
      pipeline.select_step(ckpt, "best")
  (tmp_path / "d").mkdir()
  with checkpointing.Checkpointer(tmp_path / "d", best_metric="val_kid", read_only=True) as ckpt:
    with pytest.raises(errors.MissingInputError, match="no complete checkpoint"):
      pipeline.select_step(ckpt, "latest")


# ------------------------------------------------------------------------------------------------
# Errors: one line for expected failures, tracebacks for bugs.


def test_missing_tfds_extra_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # `import tensorflow_datasets` fails
  assert cli.main(["train", "--config", "default", "--workdir", str(tmp_path / "run"),
                   f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.train.kid_every=0"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "pip install 'ddim-jax[tfds]'" in err, err


@pytest.mark.slow  # its fixture trains a model
def test_missing_torch_for_inception_weights_is_one_line(tmp_path, trained_weights, monkeypatch, capsys):
  pth = tmp_path / "inception_v3_google-0cc3c7bd.pth"
  pth.write_bytes(b"present")
  weights = trained_weights("keras")  # built (with torch) before torch is hidden
  monkeypatch.setitem(sys.modules, "torch", None)
  assert cli.main(["evaluate", "--metric", "kid", "--weights", weights, "--inception-weights",
                   str(pth), "--num-images", "8", "--batch-size", "4", "--steps", "2"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "needs PyTorch" in err and "ddim-jax[torch]" in err, err


def test_bugs_keep_their_traceback_and_debug_shows_expected_ones(tmp_path, monkeypatch, capsys):
  def buggy(args):
    raise ValueError("an unexpected bug")

  monkeypatch.setattr(cli, "cmd_info", buggy)
  with pytest.raises(ValueError, match="an unexpected bug"):
    cli.main(["info", "--weights", "x"])
  missing = ["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]
  assert cli.main(missing) == 2 and "no checkpoints" in capsys.readouterr().err
  with pytest.raises(errors.MissingInputError):
    cli.main(missing + ["--debug"])
  monkeypatch.setenv(errors.DEBUG_ENV, "1")
  with pytest.raises(errors.MissingInputError):
    cli.main(missing)
