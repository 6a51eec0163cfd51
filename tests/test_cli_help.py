"""`ddim-jax --help`: every subcommand's options each have a help line with its default, and the help
answers without importing JAX or torch (its time is a benchmark line: scripts/benchmark.py --cli-help)."""

import subprocess
import sys

import pytest

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
