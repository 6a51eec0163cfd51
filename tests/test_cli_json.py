"""The commands' output for other programs and JAX's conventions: `--json -` puts one JSON object and
nothing else on stdout (every human line on stderr), `--json PATH` writes the file; `info` reads as
text and as JSON; a command reading a workdir logs no absl warnings; JAX's own compilation cache
settings win over ddim-jax's.

The commands run through ``cli.main`` on the tiny run of conftest.py's ``trained`` fixture, with few
images and steps.
"""

import json
import os
import subprocess
import sys

import pytest

from ddim_jax import arguments, cli
from ddim_jax.infra import compilation_cache
from train_helpers import REPO, subprocess_env

# Each command with a --json option: its arguments on the trained run ({workdir}, {weights}), and a
# line of its human text (on stderr with --json -).
JSON_COMMANDS = {
    "info": (["--weights", "{weights}"], "normalizer mean"),
    "invert": (["--workdir", "{workdir}", "--steps", "2,3", "--num-images", "4", "--batch-size", "4"], "MSE"),
    "evaluate": (["--workdir", "{workdir}", "--steps", "2", "--num-images", "16", "--batch-size", "16"],
                 "digits metric"),
    "parity": (["--workdir", "{workdir}", "--steps", "2", "--batch-size", "1"], "verdict"),
}


@pytest.fixture(scope="module")
def weights(trained, tmp_path_factory):
  """The trained run's EMA weights, exported with the command."""
  path = tmp_path_factory.mktemp("weights") / "run.safetensors"
  assert cli.main(["export", "--workdir", str(trained), "--out", str(path)]) == 0
  return str(path)


def _argv(command, trained, weights):
  args, _ = JSON_COMMANDS[command]
  return [command, *(a.format(workdir=trained, weights=weights) for a in args)]


def test_every_command_with_json_is_covered():
  # pylint: disable=protected-access
  action = next(a for a in cli.build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
  with_json = {name for name, p in action.choices.items() if any("--json" in a.option_strings for a in p._actions)}
  assert with_json == set(JSON_COMMANDS)


@pytest.mark.parametrize("command", sorted(JSON_COMMANDS))
def test_json_to_stdout_is_the_only_output_there(command, trained, weights, capsys):
  if command == "parity":
    pytest.importorskip("torch")
  assert cli.main([*_argv(command, trained, weights), "--json", "-"]) == 0
  out, err = capsys.readouterr()
  record = json.loads(out)  # the whole of stdout: one JSON object
  assert isinstance(record, dict) and record
  assert JSON_COMMANDS[command][1] in err  # the human text went to stderr
  if command == "invert":
    assert set(record["reconstruction_mse"]) == {"2", "3"}
  if command == "evaluate":
    assert record["metric"] == "digits" and record["steps"] == [2]


def test_info_reads_as_text_and_as_json(trained, weights, tmp_path, capsys):
  assert cli.main(["info", "--weights", weights]) == 0
  text = capsys.readouterr().out
  assert "{" not in text and '\\"' not in text  # text, no JSON (nor a JSON string inside it)
  assert "variant" in text and "keras" in text and "widths" in text and "8,16" in text
  assert "parameters" in text and "normalizer variance" in text
  path = tmp_path / "info.json"
  assert cli.main(["info", "--weights", weights, "--json", str(path)]) == 0
  assert f"wrote {path}" in capsys.readouterr().out
  record = json.loads(path.read_text())
  meta = record["metadata"]
  # Decoded: numbers, the data object (a JSON string in the file), widths as a list.
  assert meta["variant"] == "keras" and meta["widths"] == [8, 16] and meta["image_size"] == 16
  assert meta["step"] == 8 and meta["weights"] == "ema" and meta["data"]["dataset"] == "digits"
  assert meta["min_signal_rate"] == pytest.approx(0.02)
  assert record["parameters"] > 0 and record["batch_statistics"] > 0
  assert len(record["normalizer"]["mean"]) == len(record["normalizer"]["variance"]) == 3


@pytest.mark.parametrize("text, want", [("16", 16), ("0.95", 0.95), ("8,16", [8, 16]), ("cosine", "cosine"),
                                        ('{"dataset": "digits"}', {"dataset": "digits"}), ("", "")])
def test_metadata_values_are_decoded(text, want):
  assert arguments.decoded_metadata_value(text) == want


@pytest.mark.slow
def test_a_command_reading_a_workdir_logs_no_absl_warnings(trained, tmp_path):
  """orbax logs two `WARNING:absl: ... read only` lines for each read-only checkpoint manager."""
  result = subprocess.run([sys.executable, "-m", "ddim_jax", "export", "--workdir", str(trained), "--out",
                           str(tmp_path / "w.safetensors")], env=subprocess_env(1), cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  output = result.stdout + result.stderr
  assert "WARNING:absl" not in output and "read only" not in output, output[-2000:]
  assert result.stdout.startswith("wrote ")


# JAX's persistent compilation cache: JAX's settings first, then DDIM_JAX_COMPILATION_CACHE.

CACHE_ENV = (compilation_cache.ENV, "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")


@pytest.mark.parametrize("env, want_dir, want_min", [
    ({"JAX_COMPILATION_CACHE_DIR": "/jax/own", compilation_cache.ENV: "/ours"}, "/jax/own", None),
    ({"JAX_COMPILATION_CACHE_DIR": "/jax/own", compilation_cache.ENV: "off"}, "/jax/own", None),
    ({compilation_cache.ENV: "/ours"}, "/ours", str(compilation_cache.MIN_COMPILE_SECONDS)),
    ({compilation_cache.ENV: "/ours", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "7"}, "/ours", "7"),
    ({compilation_cache.ENV: "off"}, None, None),
])
def test_jax_cache_settings_come_first(env, want_dir, want_min, monkeypatch):
  """Before JAX is imported, enable() sets JAX's variables (JAX reads them at import), never over JAX's own."""
  for name in CACHE_ENV:
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  monkeypatch.delitem(sys.modules, "jax", raising=False)  # as in a command, before JAX is imported
  assert compilation_cache.enable() == want_dir
  assert os.environ.get("JAX_COMPILATION_CACHE_DIR") == want_dir
  assert os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS") == (
      env.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS") or want_min)


@pytest.mark.slow
def test_jax_reads_the_cache_settings_with_or_without_its_own():
  code = ("import sys\n"
          "from ddim_jax.infra import compilation_cache\n"
          "if sys.argv[1] == 'after': import jax\n"
          "compilation_cache.enable()\n"
          "import jax\n"
          "print(jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)\n")
  base = {k: v for k, v in subprocess_env(1).items() if k not in CACHE_ENV}
  cases = [({"JAX_COMPILATION_CACHE_DIR": "/tmp/jax_own", compilation_cache.ENV: "/tmp/ours"}, "before",
            "/tmp/jax_own 1.0"),
           ({compilation_cache.ENV: "/tmp/ours"}, "before", f"/tmp/ours {compilation_cache.MIN_COMPILE_SECONDS}"),
           ({compilation_cache.ENV: "/tmp/ours"}, "after", f"/tmp/ours {compilation_cache.MIN_COMPILE_SECONDS}")]
  for env, when, want in cases:
    result = subprocess.run([sys.executable, "-c", code, when], env={**base, **env}, cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == want.split(), (env, when)
