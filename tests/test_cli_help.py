"""`ddim-jax --help`: every subcommand's options each have a help line with its default (said once), and
the help answers without importing JAX or torch (its time is a benchmark line: scripts/benchmark.py
--cli-help); `python -m ddim_jax` is the same command."""

import importlib.metadata
import subprocess
import sys

import pytest

import ddim_jax
from ddim_jax import cli
from ddim_jax.inference import evaluation
from train_helpers import REPO, subprocess_env

COMMANDS = ("demo", "train", "export", "sample", "figures", "invert", "interpolate", "evaluate", "info", "parity",
            "convert", "prepare-data")


def _subparsers():
  parser = cli.build_parser()
  action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")  # pylint: disable=protected-access
  return action.choices


def test_every_option_has_a_help_line():
  choices = _subparsers()
  assert set(choices) == set(COMMANDS)
  missing = [f"{name} {a.option_strings}" for name, p in choices.items() for a in p._actions  # pylint: disable=protected-access
             if a.option_strings and not a.help]
  assert not missing, missing
  for name, p in choices.items():
    text = p.format_help()  # renders (a stray % in a help string would raise here)
    assert "(default:" in text or name == "info", name


def test_every_default_is_said_once():
  """Where the help says the default itself, argparse's "(default: ...)" is not added; None and False
  (an option that is off) are never printed as defaults."""
  for name, p in _subparsers().items():
    formatter = p._get_formatter()  # pylint: disable=protected-access
    for action in p._actions:  # pylint: disable=protected-access
      if not action.help:
        continue
      text = " ".join(formatter._expand_help(action).split())  # pylint: disable=protected-access
      assert text.count("(default:") <= 1, (name, action.option_strings, text)
      assert "(default: None)" not in text and "(default: False)" not in text, (name, action.option_strings, text)
    rendered = " ".join(p.format_help().split())
    assert "(default: None)" not in rendered and "(default: False)" not in rendered, name
  evaluate = " ".join(_subparsers()["evaluate"].format_help().split())
  assert evaluate.count("(default: the torch hub cache)") == 1


def test_train_and_demo_help_name_the_config_overrides():
  for name in ("train", "demo"):
    assert "--config.a.b=value" in " ".join(_subparsers()[name].format_help().split()), name


@pytest.mark.slow
def test_python_m_ddim_jax_is_the_command():
  version = subprocess.run([sys.executable, "-m", "ddim_jax", "--version"], env=subprocess_env(1), cwd=REPO,
                           capture_output=True, text=True, timeout=120, check=False)
  assert (version.returncode, version.stdout.strip()) == (0, f"ddim-jax {ddim_jax.__version__}"), version.stderr
  assert ddim_jax.__version__ == importlib.metadata.version("ddim-jax")
  # A command runs through it (one line and exit 2 for a missing weight file).
  missing = subprocess.run([sys.executable, "-m", "ddim_jax", "info", "--weights", "no_such.safetensors"],
                           env=subprocess_env(1), cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert missing.returncode == 2 and missing.stderr.startswith("ddim-jax info: error: "), missing.stderr[-2000:]


@pytest.mark.slow
def test_help_imports_neither_jax_nor_torch():
  code = ("import sys, contextlib, io\n"
          "from ddim_jax import cli\n"
          f"for argv in [['--help']] + [[c, '--help'] for c in {list(COMMANDS)!r}]:\n"
          "  with contextlib.redirect_stdout(io.StringIO()):\n"
          "    try:\n"
          "      cli.main(argv)\n"
          "    except SystemExit as e:\n"
          "      assert e.code == 0, argv\n"
          "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'torch', 'flax', 'tensorflow'))\n"
          "print(heavy[:5])\n"
          "sys.exit(1 if heavy else 0)\n")
  result = subprocess.run([sys.executable, "-c", code], env=subprocess_env(1), cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_the_help_text_states_the_library_default():
  assert cli.DIGITS_METRIC_IMAGES == evaluation.DIGITS_METRIC_IMAGES
  assert f"(default {evaluation.DIGITS_METRIC_IMAGES})" in _subparsers()["evaluate"].format_help().replace("\n", " ")
