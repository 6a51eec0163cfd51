"""The command line's argument types and checks: argparse ``type=`` functions (argparse prints
``ddim-jax CMD: error: argument --x: ...`` and exits 2), output paths, the environment, and the
one-line form of an error; and the form of the output: the help's defaults, the ``--json`` record
(alone on stdout with ``--json -``), a weight file's metadata decoded. ``ddim_jax.cli`` parses and
prints with them; they live here so that the command's module holds only the parser, the
subcommands and printing.
"""

import argparse
import contextlib
import json
import math
import os
import re
import stat
import sys

from ddim_jax import errors, files

# Argument types (argparse prints `ddim-jax CMD: error: argument --x: ...` and exits 2) and the
# checks of what the parser cannot know (output paths, the environment).

MAX_STEPS = 10_000  # sampler steps (network evaluations): the DDIM paper goes to 1000
MAX_UPSCALE = 64
MAX_SEED = 2 ** 32 - 1


def _integer(text: str, low: int, high: int | None, what: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = None
  if value is None or value < low or (high is not None and value > high):
    raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
  return value


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1."""
  return _integer(text, 1, None, "a positive integer")


def nonnegative_int(text: str) -> int:
  """argparse type: an integer >= 0."""
  return _integer(text, 0, None, "an integer >= 0")


def seed_int(text: str) -> int:
  """argparse type: a seed, 0..2**32-1 (JAX keys and NumPy generators both take it)."""
  return _integer(text, 0, MAX_SEED, f"a seed (an integer in 0..{MAX_SEED})")


def step_count(text: str) -> int:
  """argparse type: sampler steps, 1..MAX_STEPS."""
  return _integer(text, 1, MAX_STEPS, f"a step count (an integer in 1..{MAX_STEPS})")


def upscale_int(text: str) -> int:
  """argparse type: integer pixel upscaling, 1..MAX_UPSCALE."""
  return _integer(text, 1, MAX_UPSCALE, f"an upscaling factor (an integer in 1..{MAX_UPSCALE})")


def frame_count(text: str) -> int:
  """argparse type: interpolation frames, >= 2 (the two ends)."""
  return _integer(text, 2, None, "a frame count (an integer >= 2: the two ends and the frames between)")


def cache_image_size(text: str) -> int:
  """argparse type: the side of cached images, 0 (TFDS only) or 1..1024."""
  from ddim_jax.data import cache  # pylint: disable=import-outside-toplevel  (JAX-free --help)
  return _integer(text, 0, cache.MAX_CACHE_IMAGE_SIZE,
                  f"an image size (an integer in 1..{cache.MAX_CACHE_IMAGE_SIZE}, or 0: TFDS only)")


def eta_float(text: str) -> float:
  """argparse type: DDIM eta, a finite number >= 0."""
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not math.isfinite(value) or value < 0:
    raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0 (0: deterministic DDIM, 1: DDPM-like)")
  return value


def step_counts(text: str) -> list[int]:
  """argparse type: comma-separated step counts such as 10,20,50, each 1..MAX_STEPS."""
  from ddim_jax.inference import evaluation  # pylint: disable=import-outside-toplevel  (JAX-free --help)
  try:
    steps = evaluation.parse_step_counts(text)
  except errors.ConfigError:
    steps = []
  if not steps or max(steps) > MAX_STEPS:
    raise argparse.ArgumentTypeError(f"{text!r} is not a list of step counts such as 10,20,50 (comma-separated "
                                     f"integers in 1..{MAX_STEPS})")
  return steps


def cpu_devices_arg(text: str) -> str:
  """argparse type: 'auto' or a positive device count."""
  if text.strip().lower() != "auto":
    _integer(text, 1, None, "'auto' or a positive device count")
  return text


def check_output(option: str, path: str | None, folder: bool = False) -> None:
  """Refuses an output path that cannot be written, before any work: a folder given for a file (or a
  file for a folder), a parent that is a file, or an unwritable place. Missing folders are created
  when the output is written (as the PNG writers do). Bucket paths and '-' (stdout) are not checked."""
  if not path or path == "-" or "://" in path:
    return
  info = files.lstat_or_none(path)
  if not folder and info is not None and not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
    # A link, a FIFO, a device: never written through or replaced (files.replace_file refuses it too).
    raise files.unsafe(path, option, files.describe(info.st_mode), "it is left alone: remove it or choose another path")
  if folder and os.path.exists(path) and not os.path.isdir(path):
    raise errors.ConfigError(f"{option} {path!r} is a file; give a folder (it is created if missing)")
  if not folder and os.path.isdir(path):
    raise errors.ConfigError(f"{option} {path!r} is a folder; give the path of a file (in it or elsewhere)")
  existing = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
  while not os.path.exists(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise errors.ConfigError(f"{option} {path!r}: {existing!r} is a file, not a folder; choose another path")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise errors.ConfigError(f"{option} {path!r}: the folder {existing!r} is not writable; choose another path")


@contextlib.contextmanager
def writing(option: str, path: str):
  """Turns an OSError while writing the output of ``option`` into one line naming it."""
  try:
    yield
  except OSError as e:
    raise errors.InputError(f"{option} {path!r}: cannot write it ({e.strerror or e}); choose another path") from None


def check_environment() -> None:
  """The environment variables the commands read as numbers: one line each when they are not."""
  for name, low in (("JAX_NUM_PROCESSES", 1), ("JAX_PROCESS_ID", 0)):
    value = os.environ.get(name, "")
    if value:
      try:
        ok = int(value) >= low
      except ValueError:
        ok = False
      if not ok:
        raise errors.ConfigError(f"environment variable {name}={value!r} is invalid: must be an integer >= {low} "
                                 f"(or unset)")
  cache_dir = os.environ.get("DDIM_JAX_CACHE_DIR")
  if cache_dir is not None and not cache_dir.strip():
    raise errors.ConfigError("environment variable DDIM_JAX_CACHE_DIR is empty: set it to a folder or unset it")


def one_line(error: BaseException) -> str:
  """An error's message as one line (a multi-line message joined with ' ')."""
  text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
  return text or type(error).__name__


def join_override_values(tokens) -> list[str]:
  """``--config.a.b VALUE`` pairs as ``--config.a.b=VALUE``, so that both spellings work (the value
  may be negative: ``--config.seed -1``); every other token unchanged."""
  out, i = [], 0
  tokens = list(tokens)
  while i < len(tokens):
    token = tokens[i]
    if (token.startswith("--config.") and "=" not in token and i + 1 < len(tokens)
        and not tokens[i + 1].startswith("--")):
      out.append(f"{token}={tokens[i + 1]}")
      i += 2
    else:
      out.append(token)
      i += 1
  return out


def cpu_devices_override(args, overrides) -> list[str]:
  """``overrides`` with ``--cpu-devices N`` as ``--config.cpu_devices=N`` (before them: an explicit
  ``--config.cpu_devices`` wins)."""
  value = getattr(args, "cpu_devices", None)
  return ([f"--config.cpu_devices={value}"] if value is not None else []) + list(overrides)


# The output of the commands: the help's defaults, the --json record, human text beside it.


class DefaultOnceHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """argparse's defaults formatter, each default said once: not appended where the help says it
  already ("(default: ..." or "(default ..." in the text), nor for a default of None or False (an
  option that is off, or whose help says what happens without it)."""

  def _get_help_string(self, action):
    text = action.help or ""
    if re.search(r"\(default[:\s]", text) or action.default is None or action.default is False:
      return text
    return super()._get_help_string(action)


def emit_record(args, record: dict) -> None:
  """A command's machine-readable record, the one way every ``--json`` option gives it: ``--json -``
  prints it to stdout, where it is the only output (``human_text_to_stderr``, around every command,
  sends the other lines to stderr); ``--json PATH`` writes the file (indented JSON, keys sorted) and
  says so."""
  if not args.json:
    return
  text = json.dumps(record, indent=2, sort_keys=True)
  if args.json == "-":
    print(text, file=getattr(args, "record_stream", None) or sys.stdout, flush=True)
    return
  with writing("--json", args.json):
    files.ensure_parent(args.json, "--json")
    files.replace_text(args.json, text + "\n", "--json")
  print(f"wrote {args.json}")


@contextlib.contextmanager
def human_text_to_stderr(args):
  """With ``--json -``, stdout holds the record alone: every other line a command (or a library it
  calls) prints goes to stderr while it runs, and ``args.record_stream`` keeps the stdout of before
  for ``emit_record``."""
  if getattr(args, "json", None) != "-":
    yield
    return
  args.record_stream = sys.stdout
  with contextlib.redirect_stdout(sys.stderr):
    yield


def decoded_metadata_value(text: str):
  """A weight file's metadata value (always a string in safetensors) as what it holds: JSON (a number,
  the ``data`` object) parsed, comma-separated integers (``widths``) as a list, any other text as it is."""
  try:
    return json.loads(text)
  except ValueError:
    pass
  parts = text.split(",")
  if len(parts) > 1 and all(p.strip().lstrip("-").isdigit() for p in parts):
    return [int(p) for p in parts]
  return text
