"""Bad input to every command (issue 20, parts 4 and 5): every file, argument, config value and
environment variable a command reads is checked where it enters.

One table (``CASES``), one row per kind of bad input, each run through ``cli.main`` in-process. A
row passes when the command exits with status 2 and

- prints exactly one non-empty line on stderr (argparse errors: usage, then the error as the last
  line), no traceback;
- that line names the thing (the option, the file, the key) and what to do or what is allowed
  (the row's ``needles``);
- nothing of its input changed: the weight files, noise files, folders, config files and the data
  cache have the same names, sizes and modification times before and after.

Below the table: the image-folder reader (FIFOs, dangling links, oversized files), the weight-file
writer's temporary file, the output-path check, the Inception loader's checks and the torch twin's
sample command.
"""

import os
import pickle
import stat
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from ddim_jax import cli, configs, data, errors, files
from ddim_jax.core import models
from ddim_jax.interop import weight_files
from ddim_jax.quality import inception, inception_weights
from ddim_jax.data import images as image_io
from train_helpers import run_with_deadline


class _CodeOnUnpickle:
  """Unpickling this object runs code: it writes ``marker`` (what a malicious .pth file would do)."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return exec, (f"open({self.marker!r}, 'w').write('unpickled')",)


def _rewrite(source, out, tensors_fn=None, meta_fn=None) -> str:
  """A copy of the weight file ``source`` with its tensors and/or metadata changed."""
  with safe_open(source, framework="numpy") as f:
    meta = dict(f.metadata())
  tensors = load_file(source)
  if tensors_fn:
    tensors_fn(tensors)
  if meta_fn:
    meta_fn(meta)
  save_file(tensors, out, metadata=meta)
  return out


def _set(key, value):
  return lambda meta: meta.update({key: value})


def _drop(key):
  return lambda meta: meta.pop(key)


def _tensor(name, fn):
  def change(tensors):
    tensors[name] = fn(tensors[name])
  return change


def _nan_at_0(x):
  x = x.copy()
  x.flat[0] = np.nan
  return x


# name: (tensor change, metadata change) of a bad copy of the trained weight file.
BAD_WEIGHT_FILES = {
    "widths_text": (None, _set("widths", "a,b")),
    "widths_one": (None, _set("widths", "8")),
    "image_size_text": (None, _set("image_size", "abc")),
    "image_size_odd": (None, _set("image_size", "18")),
    "image_size_huge": (None, _set("image_size", "4096")),
    "channels_zero": (None, _set("channels", "0")),
    "block_depth_huge": (None, _set("block_depth", "1000000000")),
    "embedding_odd": (None, _set("embedding_dims", "3")),
    "variant_unknown": (None, _set("variant", "unet3d")),
    "step_text": (None, _set("step", "last")),
    "min_rate_nan": (None, _set("min_signal_rate", "nan")),
    "max_rate_text": (None, _set("max_signal_rate", "high")),
    "rates_swapped": (None, lambda m: m.update(min_signal_rate="0.9", max_signal_rate="0.1")),
    "schedule_unknown": (None, _set("schedule", "sigmoid")),
    "target_unknown": (None, _set("target", "velocity")),
    "weights_unknown": (None, _set("weights", "best")),
    "format_version": (None, _set("format_version", "99")),
    "no_block_depth": (None, _drop("block_depth")),
    "data_text": (None, _set("data", "flowers")),
    "data_unknown_key": (None, _set("data", '{"dataset": "digits", "colour": "blue"}')),
    "no_data": (None, _drop("data")),
    "tensor_nan": (_tensor("head.weight", _nan_at_0), None),
    "tensor_inf": (_tensor("stem.bias", lambda x: x + np.inf), None),
    "tensor_float16": (_tensor("head.weight", lambda x: x.astype(np.float16)), None),
    "variance_zero": (_tensor("normalizer.variance", np.zeros_like), None),
    "mean_inf": (_tensor("normalizer.mean", lambda x: x + np.inf), None),
    "normalizer_shape": (_tensor("normalizer.mean", lambda x: np.zeros(4, np.float32)), None),
    "running_var_negative": (_tensor("mid_blocks.0.norm.running_var", lambda x: -np.ones_like(x)), None),
    "tensor_shape": (_tensor("head.weight", lambda x: np.zeros((3, 9, 1, 1), np.float32)), None),
    "tensor_extra": (lambda t: t.update({"extra.weight": np.zeros(2, np.float32)}), None),
}

NEED_NOISE = "np.save a float32 array of shape (N >= 2, 16, 16, 3)"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, trained_weights):
  """Every input file of the table, under one root; ``weights`` is the trained 16x16 keras file."""
  root = tmp_path_factory.mktemp("bad_inputs")
  p = {"root": str(root), "weights": trained_weights("keras")}

  def path(*parts):
    return os.path.join(root, *parts)

  os.makedirs(path("w"))
  for name, (tensors_fn, meta_fn) in BAD_WEIGHT_FILES.items():
    p[f"w_{name}"] = _rewrite(p["weights"], path("w", f"{name}.safetensors"), tensors_fn, meta_fn)
  with open(path("w", "text.safetensors"), "w", encoding="utf-8") as f:
    f.write("not a weight file\n")
  os.makedirs(path("w", "folder.safetensors"))
  os.mkfifo(path("w", "fifo.safetensors"))

  os.makedirs(path("noise"))
  shape = (2, 16, 16, 3)
  np.savez(path("noise", "archive.npz"), noise=np.zeros(shape, np.float32))
  np.save(path("noise", "objects.npy"), np.array([None, 1], dtype=object), allow_pickle=True)
  with open(path("noise", "pickled.npy"), "wb") as f:
    pickle.dump(np.zeros(shape, np.float32), f)
  with open(path("noise", "text.npy"), "w", encoding="utf-8") as f:
    f.write("0.1 0.2 0.3\n")
  np.save(path("noise", "integers.npy"), np.zeros(shape, np.int64))
  nan = np.zeros(shape, np.float32)
  nan[1, 2, 3, 0] = np.nan
  np.save(path("noise", "nan.npy"), nan)
  np.save(path("noise", "small.npy"), np.zeros((2, 8, 8, 3), np.float32))
  os.makedirs(path("noise", "folder.npy"))

  os.makedirs(path("pth"))
  buffer = path("pth", "state.pth")
  torch.save({"fc.weight": torch.zeros(1000, 2048)}, buffer)
  with open(buffer, "rb") as f:
    whole = f.read()
  with open(path("pth", "truncated.pth"), "wb") as f:
    f.write(whole[:len(whole) // 2])
  with open(path("pth", "text.pth"), "w", encoding="utf-8") as f:
    f.write("these are not weights\n")
  p["payload_marker"] = path("payload_ran")
  torch.save({"fc.weight": torch.zeros(2, 2), "payload": _CodeOnUnpickle(p["payload_marker"])},
             path("pth", "unsafe.pth"))
  torch.save(torch.zeros(3), path("pth", "tensor.pth"))

  os.makedirs(path("configs"))
  for name, text in {"raises": "def get_config():\n  raise RuntimeError('boom')\n",
                     "syntax": "def get_config(:\n", "no_get_config": "x = 1\n",
                     "returns_none": "def get_config():\n  return None\n"}.items():
    with open(path("configs", f"{name}.py"), "w", encoding="utf-8") as f:
      f.write(text)

  with open(path("a_file"), "w", encoding="utf-8") as f:
    f.write("a file where a folder is expected\n")
  os.makedirs(path("folder"))
  os.makedirs(path("workdir"))  # export's output is checked before the workdir is read
  with open(path("workdir", "config.json"), "w", encoding="utf-8") as f:
    f.write("{}\n")

  # The digits cache of the demo config at 16 px (figures' --image-index, evaluate's real images).
  p["cache"] = path("cache")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("DDIM_JAX_CACHE_DIR", p["cache"])
    p["num_train_digits"] = len(data.load_split(configs.load_config("demo").data, "train", 16))
  return types.SimpleNamespace(**p)


def _snapshot(*paths) -> dict:
  """Names, sizes and modification times of every entry under ``paths`` (links not followed)."""
  out = {}
  for top in paths:
    entries = [top]
    if os.path.isdir(top):
      for dirpath, dirnames, filenames in os.walk(top):
        entries += [os.path.join(dirpath, n) for n in dirnames + filenames]
    for entry in entries:
      info = os.lstat(entry)
      out[entry] = (None if stat.S_ISDIR(info.st_mode) else info.st_size, info.st_mtime_ns)
  return out


W = "{weights}"
SAMPLE = ["sample", "--weights", W, "--num-images", "1", "--steps", "1", "--out", "{root}/never/grid.png"]
NOISE = ["sample", "--weights", W, "--num-images", "2", "--steps", "1", "--out", "{root}/never/grid.png",
         "--noise-file"]
KID = ["evaluate", "--weights", W, "--metric", "kid", "--steps", "1", "--num-images", "4", "--batch-size", "2",
       "--inception-weights"]
TRAIN = ["train", "--workdir", "{root}/never_workdir", "--config"]
TINY = ["train", "--workdir", "{root}/never_workdir", "--config", "demo"]

# (id, argv, needles that the error line must hold, environment).
CASES = [
    # --- weight files: every metadata key, every tensor ---------------------------------------
    ("weights-widths-text", ["sample", "--weights", "{w_widths_text}"], ["widths_text.safetensors", "widths='a,b'",
                                                                        "comma-separated integers"]),
    ("weights-widths-one", ["info", "--weights", "{w_widths_one}"], ["widths_one.safetensors", "widths",
                                                                     "2 to 10 integers"]),
    ("weights-image-size-text", ["info", "--weights", "{w_image_size_text}"], ["image_size='abc'", "1..1024"]),
    ("weights-image-size-odd", ["info", "--weights", "{w_image_size_odd}"], ["image_size", "multiple of 4"]),
    ("weights-image-size-huge", ["info", "--weights", "{w_image_size_huge}"], ["image_size", "1..1024"]),
    ("weights-channels-zero", ["sample", "--weights", "{w_channels_zero}"], ["channels='0'", "1..4"]),
    ("weights-block-depth-huge", ["info", "--weights", "{w_block_depth_huge}"], ["block_depth", "1..16"]),
    ("weights-embedding-odd", ["info", "--weights", "{w_embedding_odd}"], ["embedding_dims", "even"]),
    ("weights-variant", ["info", "--weights", "{w_variant_unknown}"], ["variant='unet3d'", "'keras', 'r'"]),
    ("weights-step-text", ["info", "--weights", "{w_step_text}"], ["step='last'", "integer"]),
    ("weights-min-rate-nan", ["info", "--weights", "{w_min_rate_nan}"], ["min_signal_rate='nan'", "between 0 and 1"]),
    ("weights-max-rate-text", ["info", "--weights", "{w_max_rate_text}"], ["max_signal_rate='high'", "between 0"]),
    ("weights-rates-swapped", ["info", "--weights", "{w_rates_swapped}"], ["min_signal_rate < max_signal_rate"]),
    ("weights-schedule", ["info", "--weights", "{w_schedule_unknown}"], ["schedule='sigmoid'", "'cosine', 'linear'"]),
    ("weights-target", ["info", "--weights", "{w_target_unknown}"], ["target='velocity'", "'noise', 'image'"]),
    ("weights-kind", ["info", "--weights", "{w_weights_unknown}"], ["weights='best'", "'ema', 'raw'"]),
    ("weights-data-text", ["info", "--weights", "{w_data_text}"], ["data='flowers'", "JSON object"]),
    ("weights-data-unknown-key", ["info", "--weights", "{w_data_unknown_key}"], ["colour", "known:"]),
    ("weights-no-data-invert", ["invert", "--weights", "{w_no_data}", "--num-images", "2", "--steps", "1"],
     ["does not record the data", "--config PRESET_OR_FILE", "--config.data."]),
    ("weights-no-data-evaluate", ["evaluate", "--weights", "{w_no_data}", "--steps", "1"],
     ["does not record the data", "demo: the bundled digits"]),
    ("weights-config-not-data", ["invert", "--weights", W, "--config.train.num_steps=3"],
     ["--config.train.num_steps=3", "only --config.data.*"]),
    ("workdir-config-file", ["invert", "--workdir", "{root}/never_workdir", "--config", "demo"],
     ["--config is for a weight file", "--config.data.*"]),
    ("weights-format-version", ["info", "--weights", "{w_format_version}"], ["format_version='99'", "export"]),
    ("weights-missing-key", ["info", "--weights", "{w_no_block_depth}"], ["block_depth", "ddim-jax export"]),
    ("weights-tensor-nan", ["sample", "--weights", "{w_tensor_nan}"], ["tensor_nan.safetensors", "'head.weight'",
                                                                      "non-finite", "export them again"]),
    ("weights-tensor-inf", ["info", "--weights", "{w_tensor_inf}"], ["'stem.bias'", "non-finite"]),
    ("weights-float16", ["info", "--weights", "{w_tensor_float16}"], ["'head.weight'", "float16", "float32"]),
    ("weights-variance-zero", ["info", "--weights", "{w_variance_zero}"], ["'normalizer.variance'", "> 0"]),
    ("weights-mean-inf", ["info", "--weights", "{w_mean_inf}"], ["'normalizer.mean'", "non-finite"]),
    ("weights-normalizer-shape", ["info", "--weights", "{w_normalizer_shape}"], ["'normalizer.mean'", "(3,)"]),
    ("weights-running-var-negative", ["info", "--weights", "{w_running_var_negative}"],
     ["mid_blocks.0.norm.running_var", "negative"]),
    ("weights-tensor-shape", ["info", "--weights", "{w_tensor_shape}"], ["tensor_shape.safetensors", "'head.weight'",
                                                                        "expected (3, 16, 1, 1)"]),
    ("weights-tensor-extra", ["info", "--weights", "{w_tensor_extra}"], ["tensor_extra.safetensors", "not used"]),
    ("weights-text-file", ["info", "--weights", "{root}/w/text.safetensors"], ["text.safetensors", "re-export"]),
    ("weights-folder", ["info", "--weights", "{root}/w/folder.safetensors"], ["folder.safetensors",
                                                                             "not a regular file"]),
    ("weights-fifo", ["sample", "--weights", "{root}/w/fifo.safetensors"], ["fifo.safetensors", "not a regular file"]),
    # --- numbers on the command line (argparse: the last line names the option) -----------------
    ("sample-num-images-0", SAMPLE + ["--num-images", "0"], ["argument --num-images", "positive integer"]),
    ("sample-batch-size-negative", SAMPLE + ["--batch-size", "-1"], ["argument --batch-size", "positive integer"]),
    ("sample-rows-0", SAMPLE + ["--rows", "0"], ["argument --rows", "positive integer"]),
    ("sample-steps-0", SAMPLE + ["--steps", "0"], ["argument --steps", "1..10000"]),
    ("sample-steps-text", SAMPLE + ["--steps", "ten"], ["argument --steps", "1..10000"]),
    ("sample-eta-nan", SAMPLE + ["--eta", "nan"], ["argument --eta", "finite number >= 0"]),
    ("sample-eta-inf", SAMPLE + ["--eta", "inf"], ["argument --eta", "finite number >= 0"]),
    ("sample-eta-negative", SAMPLE + ["--eta", "-0.5"], ["argument --eta", "finite number >= 0"]),
    ("sample-upscale-0", SAMPLE + ["--upscale", "0"], ["argument --upscale", "1..64"]),
    ("sample-trajectory-images-0", SAMPLE + ["--trajectory", "{root}/never/t.png", "--trajectory-images", "0"],
     ["argument --trajectory-images", "positive integer"]),
    ("sample-seed-negative", SAMPLE + ["--seed", "-1"], ["argument --seed", "0..4294967295"]),
    ("sample-cpu-devices-0", SAMPLE + ["--cpu-devices", "0"], ["argument --cpu-devices", "'auto'"]),
    ("figures-image-index-negative", ["figures", "--weights", W, "--out-dir", "{root}/never", "--image-index", "-1"],
     ["argument --image-index", "integer >= 0"]),
    ("invert-steps-0", ["invert", "--weights", W, "--steps", "0,10"], ["argument --steps", "comma-separated integers"]),
    ("invert-steps-text", ["invert", "--weights", W, "--steps", "a"], ["argument --steps", "such as 10,20,50"]),
    ("invert-show-0", ["invert", "--weights", W, "--show", "0"], ["argument --show", "positive integer"]),
    ("invert-num-images-0", ["invert", "--weights", W, "--num-images", "0"], ["argument --num-images", "positive"]),
    ("interpolate-num-frames-1", ["interpolate", "--weights", W, "--num-frames", "1"],
     ["argument --num-frames", "integer >= 2"]),
    ("interpolate-pairs-0", ["interpolate", "--weights", W, "--pairs", "0"], ["argument --pairs", "positive integer"]),
    ("evaluate-batch-size-0", ["evaluate", "--weights", W, "--batch-size", "0"], ["argument --batch-size", "positive"]),
    ("evaluate-steps-empty", ["evaluate", "--weights", W, "--steps", ","], ["argument --steps", "comma-separated"]),
    ("prepare-data-image-size-huge", ["prepare-data", "--dataset", "digits", "--image-size", "100000"],
     ["argument --image-size", "1..1024"]),
    ("prepare-data-split-seed-negative", ["prepare-data", "--dataset", "digits", "--split-seed", "-1"],
     ["argument --split-seed", "0..4294967295"]),
    # --- ranges known only later -------------------------------------------------------------
    ("figures-image-index-too-large", ["figures", "--weights", W, "--out-dir", "{root}/never", "--steps", "1",
                                       "--image-index", "100000"], ["--image-index 100000", "out of range", "0.."]),
    ("evaluate-num-images-1", ["evaluate", "--weights", W, "--steps", "1", "--num-images", "1"],
     ["--num-images 1", "at least 2"]),
    # --- noise files ---------------------------------------------------------------------------
    ("noise-npz", NOISE + ["{root}/noise/archive.npz"], ["--noise-file", "archive.npz", ".npz archive", NEED_NOISE]),
    ("noise-object-array", NOISE + ["{root}/noise/objects.npy"], ["objects.npy", "pickled", NEED_NOISE]),
    ("noise-pickle", NOISE + ["{root}/noise/pickled.npy"], ["pickled.npy", "pickled", NEED_NOISE]),
    ("noise-text", NOISE + ["{root}/noise/text.npy"], ["text.npy", "not a readable .npy", NEED_NOISE]),
    ("noise-integers", NOISE + ["{root}/noise/integers.npy"], ["integers.npy", "int64", NEED_NOISE]),
    ("noise-nan", NOISE + ["{root}/noise/nan.npy"], ["nan.npy", "NaN or inf", NEED_NOISE]),
    ("noise-shape", NOISE + ["{root}/noise/small.npy"], ["small.npy", "(2, 8, 8, 3)", "(N >= 2, 16, 16, 3)"]),
    ("noise-folder", NOISE + ["{root}/noise/folder.npy"], ["folder.npy", "not a regular file", NEED_NOISE]),
    ("noise-missing", NOISE + ["{root}/noise/missing.npy"], ["missing.npy", "does not exist", NEED_NOISE]),
    ("interpolate-noise-nan", ["interpolate", "--weights", W, "--num-frames", "2", "--steps", "1", "--out",
                               "{root}/never/i.png", "--noise-file", "{root}/noise/nan.npy"], ["nan.npy", "NaN"]),
    # --- Inception weights -------------------------------------------------------------------
    ("inception-truncated", KID + ["{root}/pth/truncated.pth"], ["truncated.pth", "truncated or not a torch .pth",
                                                                "--inception-weights"]),
    ("inception-text", KID + ["{root}/pth/text.pth"], ["text.pth", "not a torch .pth", "--inception-weights"]),
    ("inception-unsafe-pickle", KID + ["{root}/pth/unsafe.pth"], ["unsafe.pth", "refused", "weights_only=True",
                                                                 "--inception-weights"]),
    ("inception-not-a-state-dict", KID + ["{root}/pth/tensor.pth"], ["tensor.pth", "not a state dict"]),
    ("inception-no-classifier", KID + ["{root}/pth/state.pth"], ["state.pth", "variables missing",
                                                                "--inception-weights"]),
    ("inception-missing", KID + ["{root}/pth/missing.pth"], ["missing.pth", "inception_v3_google-0cc3c7bd.pth",
                                                            "--inception-weights PATH"]),
    ("inception-folder", KID + ["{root}/pth"], ["not a regular file", "--inception-weights"]),
    # --- output paths: checked before any work ------------------------------------------------
    ("sample-out-is-a-folder", SAMPLE + ["--out", "{root}/folder"], ["--out", "is a folder", "path of a file"]),
    ("sample-out-below-a-file", SAMPLE + ["--out", "{root}/a_file/grid.png"], ["--out", "a_file", "not a folder",
                                                                              "choose another path"]),
    ("sample-out-dir-is-a-file", SAMPLE + ["--out-dir", "{root}/a_file"], ["--out-dir", "is a file", "give a folder"]),
    ("sample-array-out-is-a-folder", SAMPLE + ["--array-out", "{root}/folder"], ["--array-out", "is a folder"]),
    ("sample-trajectory-below-a-file", SAMPLE + ["--trajectory", "{root}/a_file/t.png"], ["--trajectory", "a_file"]),
    ("figures-out-dir-is-a-file", ["figures", "--weights", W, "--out-dir", "{root}/a_file"], ["--out-dir", "a_file",
                                                                                              "give a folder"]),
    ("invert-json-is-a-folder", ["invert", "--weights", W, "--json", "{root}/folder"], ["--json", "is a folder"]),
    ("invert-out-below-a-file", ["invert", "--weights", W, "--out", "{root}/a_file/x/inv.png"], ["--out", "a_file"]),
    ("interpolate-out-is-a-folder", ["interpolate", "--weights", W, "--out", "{root}/folder"], ["--out", "folder"]),
    ("evaluate-json-below-a-file", ["evaluate", "--weights", W, "--json", "{root}/a_file/kid.json"],
     ["--json", "a_file", "choose another path"]),
    ("export-out-is-a-folder", ["export", "--workdir", "{root}/workdir", "--out", "{root}/folder"],
     ["--out", "is a folder", "path of a file"]),
    ("export-out-below-a-file", ["export", "--workdir", "{root}/workdir", "--out", "{root}/a_file/w.safetensors"],
     ["--out", "a_file", "choose another path"]),
    # --- configs, overrides, the data options ------------------------------------------------
    ("config-file-missing", TRAIN + ["{root}/configs/missing.py"], ["missing.py", "does not exist", "get_config()"]),
    ("config-file-raises", TRAIN + ["{root}/configs/raises.py"], ["raises.py", "RuntimeError: boom", "fix the file"]),
    ("config-file-syntax", TRAIN + ["{root}/configs/syntax.py"], ["syntax.py", "SyntaxError", "fix the file"]),
    ("config-file-no-get-config", TRAIN + ["{root}/configs/no_get_config.py"], ["no_get_config.py", "get_config()"]),
    ("config-file-returns-none", TRAIN + ["{root}/configs/returns_none.py"], ["returns_none.py", "NoneType",
                                                                             "ConfigDict"]),
    ("config-is-a-folder", TRAIN + ["{root}/configs"], ["configs", "is a folder", "get_config()"]),
    ("figures-config-missing", ["figures", "--weights", W, "--out-dir", "{root}/never", "--config",
                                "{root}/configs/missing.py"], ["missing.py", "does not exist"]),
    ("override-int-text", TINY + ["--config.train.num_steps=abc"], ["--config.train.num_steps=abc", "an int"]),
    ("override-int-huge", TINY + ["--config.train.num_steps=" + "9" * 30], ["--config.train.num_steps", "an int"]),
    ("override-float-nan", TINY + ["--config.train.learning_rate=nan"], ["learning_rate=nan", "a finite float"]),
    ("override-float-overflow", TINY + ["--config.train.learning_rate=1e999"], ["learning_rate", "a finite float"]),
    ("override-bool", TINY + ["--config.data.antialias=maybe"], ["--config.data.antialias=maybe", "a bool"]),
    ("override-tuple-elements", TINY + ["--config.model.widths=(8,'a')"], ["--config.model.widths", "a tuple like"]),
    ("override-tuple-nested", TINY + ["--config.model.widths=[1,[2]]"], ["--config.model.widths", "a tuple like"]),
    ("override-group", TINY + ["--config.train=1"], ["--config.train=1", "group of keys", "--config.train."]),
    ("override-below-a-value", TINY + ["--config.seed.x=1"], ["--config.seed.x", "not a group"]),
    ("override-unknown-key", TINY + ["--config.train.num_stepz=1"], ["train.num_stepz", "known keys"]),
    ("override-without-value", TINY + ["--config.seed"], ["--config.seed", "--config.train.num_steps=100"]),
    ("prepare-data-cache-dir-is-a-file", ["prepare-data", "--dataset", "digits", "--image-size", "8", "--cache-dir",
                                          "{root}/a_file"], ["a_file", "--cache-dir", "choose a folder"]),
    ("prepare-data-folder-is-a-file", ["prepare-data", "--dataset", "folder", "--folder", "{root}/a_file",
                                       "--image-size", "8", "--cache-dir", "{root}/never"],
     ["a_file", "not a folder", "--folder"]),
    ("prepare-data-folder-missing", ["prepare-data", "--dataset", "folder", "--folder", "{root}/no_such_folder",
                                     "--image-size", "8", "--cache-dir", "{root}/never"],
     ["no_such_folder", "does not exist"]),
    # --- environment variables ---------------------------------------------------------------
    ("env-cache-dir-is-a-file", ["figures", "--weights", W, "--out-dir", "{root}/never", "--steps", "1"],
     ["a_file", "DDIM_JAX_CACHE_DIR", "choose a folder"], {"DDIM_JAX_CACHE_DIR": "{root}/a_file"}),
    ("env-num-processes-text", ["info", "--weights", W], ["JAX_NUM_PROCESSES='two'", "integer >= 1"],
     {"JAX_NUM_PROCESSES": "two"}),
    ("env-process-id-negative", ["info", "--weights", W], ["JAX_PROCESS_ID='-1'", "integer >= 0"],
     {"JAX_PROCESS_ID": "-1"}),
    # --- workdirs (ddim_jax/infra/workdir.py) --------------------------------------------------------
    ("workdir-ftp-train", ["train", "--workdir", "ftp://host/run", "--config", "demo"],
     ["ftp://host/run", "ftp:// is not supported", "gs://bucket/path"]),
    ("workdir-hdfs-export", ["export", "--workdir", "hdfs://namenode/run", "--out", "{root}/never/w.safetensors"],
     ["hdfs://namenode/run", "hdfs:// is not supported"]),
    ("workdir-ftp-sample", ["sample", "--workdir", "ftp://host/run", "--out", "{root}/never/grid.png"],
     ["ftp://host/run", "not supported"]),
    ("workdir-is-a-file-train", ["train", "--workdir", "{root}/a_file", "--config", "demo"],
     ["a_file", "is a file, not a folder"]),
    ("workdir-is-a-file-export", ["export", "--workdir", "{root}/a_file", "--out", "{root}/never/w.safetensors"],
     ["a_file", "is a file, not a folder"]),
    ("workdir-read-only-train", ["train", "--workdir", "{read_only}/run", "--config", "demo"],
     ["{read_only}/run", "train in a --workdir on a writable disk"]),
    ("workdir-locked-train", ["train", "--workdir", "{locked}", "--config", "demo"],
     ["{locked} is in use by another trainer", "pid {holder_pid} on host"]),
]


@pytest.fixture(scope="module")
def workdir_inputs(tmp_path_factory):
  """{read_only}: a read-only filesystem (a read-only tmpfs as root; else a folder without write
  permission); {locked}: a workdir whose lock a live process holds ({holder_pid})."""
  root = tmp_path_factory.mktemp("workdir_inputs")
  read_only = root / "read_only"
  read_only.mkdir()
  mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs",
                                                  str(read_only)], capture_output=True, check=False).returncode == 0
  if not mounted:
    read_only.chmod(0o555)
  locked = root / "locked"
  locked.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys, time; from ddim_jax.infra import workdir_lock as w; w.WorkdirLock(sys.argv[1]).acquire(); "
      "print('held', flush=True); time.sleep(3600)"), str(locked)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    yield {"workdir_root": str(root), "read_only": str(read_only), "read_only_mounted": mounted,
           "locked": str(locked), "holder_pid": str(holder.pid)}
  finally:
    holder.kill()
    holder.wait()
    if mounted:
      subprocess.run(["umount", str(read_only)], check=False)
    else:
      read_only.chmod(0o755)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_status_2(case, inputs, workdir_inputs, capsys, monkeypatch):
  _, argv, needles, *env = case
  paths = {**vars(inputs), **workdir_inputs}
  if case[0] == "workdir-read-only-train" and not workdir_inputs["read_only_mounted"]:
    needles = ["{read_only}/run", "not writable by this user"]
  monkeypatch.setenv("DDIM_JAX_CACHE_DIR", inputs.cache)
  monkeypatch.delenv("DDIM_JAX_DEBUG", raising=False)
  for name, value in (env[0] if env else {}).items():
    monkeypatch.setenv(name, value.format(**paths))
  argv = [a.format(**paths) for a in argv]
  watched = (inputs.root, inputs.weights, workdir_inputs["workdir_root"])
  before = _snapshot(*watched)
  capsys.readouterr()
  try:
    status = cli.main(argv)
  except SystemExit as e:  # argparse
    status, from_argparse = e.code, True
  else:
    from_argparse = False
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert status == 2, err
  assert "Traceback" not in err, err
  if from_argparse:
    assert lines[0].startswith("usage: ddim-jax"), err
  else:
    assert len(lines) == 1, err
  line = lines[-1]
  assert line.startswith(f"ddim-jax {argv[0]}: error: "), line
  for needle in needles:
    assert needle.format(**paths) in line, (needle, line)
  assert _snapshot(*watched) == before, "the command changed its input"
  assert not os.path.exists(inputs.payload_marker), "a .pth payload was unpickled"


# ------------------------------------------------------------------------------------------------
# The image-folder reader.




def test_read_image_file_refuses_fifos_links_folders_and_oversized_files(tmp_path):
  good = tmp_path / "good.png"
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(good)
  assert run_with_deadline(lambda: image_io.read_image_file(str(good))) == good.read_bytes()
  os.mkfifo(tmp_path / "fifo.png")
  os.symlink(tmp_path / "nowhere.png", tmp_path / "dangling.png")
  (tmp_path / "folder.png").mkdir()
  for name, reason in [("fifo.png", "not a regular file"), ("dangling.png", "dangling symbolic link"),
                       ("folder.png", "not a regular file")]:
    with pytest.raises(image_io.BadImageError, match=reason):
      run_with_deadline(lambda name=name: image_io.read_image_file(str(tmp_path / name)))
  with pytest.raises(image_io.BadImageError, match="over the limit"):
    image_io.read_image_file(str(good), max_bytes=good.stat().st_size - 1)
  assert image_io.read_image_file(str(good), max_bytes=good.stat().st_size) == good.read_bytes()


def test_folder_build_skips_a_fifo_a_dangling_link_and_an_oversized_file(tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  for i in range(5):
    Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(folder / f"good{i}.png")
  os.mkfifo(folder / "x.png")
  os.symlink(tmp_path / "gone.jpg", folder / "link.jpg")
  with open(folder / "huge.png", "wb") as f:
    f.truncate(image_io.MAX_IMAGE_BYTES + 1)  # sparse: no disk space used
  with pytest.warns(RuntimeWarning, match=r"skipped 3 of 8 files") as caught:
    cache = run_with_deadline(lambda: data.build_cache("folder", 8, folder=str(folder),
                                                        cache_dir=str(tmp_path / "cache")))
  message = str(caught[0].message)
  for name, reason in [("x.png", "not a regular file"), ("link.jpg", "a dangling symbolic link"),
                       ("huge.png", f"{image_io.MAX_IMAGE_BYTES + 1:,} bytes, over the limit of an image file, 100 MB")]:
    assert f"{name} ({reason}" in message, message
  assert cache["splits"]["train"] + cache["splits"]["validation"] == 5
  assert sorted(cache["skipped_names"]) == ["huge.png", "link.jpg", "x.png"]


# ------------------------------------------------------------------------------------------------
# Files the commands write, and the loaders' checks.


@pytest.mark.slow  # its fixture trains a model
def test_save_weights_leaves_no_temporary_file_and_creates_missing_folders(tmp_path, trained_model):
  model, variables, normalizer = trained_model("keras")
  target = tmp_path / "exists_as_folder.safetensors"
  target.mkdir()
  with pytest.raises(errors.ConfigError, match="is a folder"):
    weight_files.save_weights(str(target), model, variables, normalizer, 16)
  blocked = tmp_path / "blocked.safetensors"
  original = files.os.rename  # every output is a temporary renamed over its path (ddim_jax.files)

  def failing_rename(src, dst):
    assert os.path.exists(src)  # the temporary file was written...
    raise OSError(28, "No space left on device")
  files.os.rename = failing_rename
  try:
    with pytest.raises(errors.InputError, match="No space left"):
      weight_files.save_weights(str(blocked), model, variables, normalizer, 16)
  finally:
    files.os.rename = original
  assert sorted(os.listdir(tmp_path)) == ["exists_as_folder.safetensors"]  # ...and removed
  nested = tmp_path / "new" / "folder" / "w.safetensors"
  weight_files.save_weights(str(nested), model, variables, normalizer, 16)
  assert weight_files.load_weights(str(nested))[0] == model
  assert os.listdir(nested.parent) == ["w.safetensors"]


def test_output_check_refuses_an_unwritable_folder(tmp_path, monkeypatch):
  """Root writes anywhere, so the unwritable folder is simulated by os.access."""
  readonly = tmp_path / "readonly"
  readonly.mkdir()
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(readonly) else real_access(p, mode))
  with pytest.raises(errors.ConfigError, match=r"--out .*readonly.* is not writable; choose another path"):
    cli.check_output("--out", str(readonly / "sub" / "grid.png"))
  cli.check_output("--out", str(tmp_path / "writable" / "grid.png"))  # a missing folder is fine: it is created
  cli.check_output("--out", "gs://bucket/grid.png")  # buckets are not checked here
  assert os.listdir(tmp_path) == ["readonly"]  # the check creates nothing


def test_inception_state_dict_values_are_checked():
  model = inception.InceptionV3(flavour="torchvision")
  shapes = inception_weights._variable_shapes(model)  # pylint: disable=protected-access
  kernel = np.full(tuple(shapes["params"]["Conv2d_1a_3x3"]["conv"]["kernel"]), np.nan, np.float32)
  fc = np.zeros((1000, 2048), np.float32)
  with pytest.raises(errors.InputError, match="Conv2d_1a_3x3.conv.weight holds NaN"):
    inception_weights.variables_from_state_dict({"fc.weight": fc, "Conv2d_1a_3x3.conv.weight": kernel.transpose(3, 2, 0, 1)})
  var = -np.ones(tuple(shapes["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"]), np.float32)
  with pytest.raises(errors.InputError, match="negative BatchNorm variances"):
    inception_weights.variables_from_state_dict({"fc.weight": fc, "Conv2d_1a_3x3.bn.running_var": var})
  with pytest.raises(errors.InputError, match="fc.weight has shape"):
    inception_weights.variables_from_state_dict({"fc.weight": "not a tensor"})
  with pytest.raises(errors.InputError, match="unexpected key 'nodots'"):
    inception_weights.variables_from_state_dict({"fc.weight": fc, "nodots": fc})


def test_bad_overrides_keep_the_config_and_good_ones_still_parse():
  config = configs.load_config("demo", ["--config.model.widths=[8, 16]", "--config.train.learning_rate=2e-4",
                                        "--config.train.num_steps=7"])
  assert config.model.widths == (8, 16) and config.train.learning_rate == 2e-4 and config.train.num_steps == 7
  with pytest.raises(errors.ConfigError, match="expected a tuple like"):
    configs.load_config("demo", ["--config.model.widths=(8, True)"])
  with pytest.raises(errors.ConfigError, match="config.model.block_depth must be an integer in 1..16"):
    models.create_model(block_depth=10 ** 6)


@pytest.mark.parametrize("name, needles", [
    ("widths_text", ["widths_text.safetensors", "widths='a,b'"]),
    ("channels_zero", ["channels='0'", "1..4"]),
    ("tensor_nan", ["'head.weight'", "NaN"]),
    ("variance_zero", ["normalizer.variance", "> 0"]),
    ("max_rate_text", ["max_signal_rate='high'"]),
])
@pytest.mark.slow  # its fixture trains a model
def test_torch_twin_sample_refuses_the_same_weight_files(name, needles, inputs, tmp_path, capsys):
  from ddim_torch_ref import sample as ref_sample
  assert ref_sample.main(["--weights", getattr(inputs, f"w_{name}"), "--num-images", "1", "--steps", "1",
                          "--out", str(tmp_path / "grid.png")]) == 2
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("ddim_torch_ref.sample: error: "), lines
  assert all(n in lines[0] for n in needles), lines[0]
  assert not os.listdir(tmp_path)


@pytest.mark.slow  # its fixture trains a model
def test_torch_twin_sample_refuses_bad_noise_files_and_numbers(inputs, tmp_path, capsys):
  from ddim_torch_ref import sample as ref_sample
  for noise in ("archive.npz", "objects.npy", "nan.npy", "integers.npy"):
    assert ref_sample.main(["--weights", inputs.weights, "--num-images", "2", "--steps", "1", "--out",
                            str(tmp_path / "grid.png"), "--noise-file", os.path.join(inputs.root, "noise", noise)]) == 2
    err = capsys.readouterr().err
    assert f"--noise-file '{os.path.join(inputs.root, 'noise', noise)}'" in err and "Traceback" not in err, err
  with pytest.raises(SystemExit) as exit_info:
    ref_sample.main(["--weights", inputs.weights, "--num-images", "0"])
  assert exit_info.value.code == 2
  assert "argument --num-images: '0' is not a positive integer" in capsys.readouterr().err
  assert not os.listdir(tmp_path)


def test_one_line_joins_multi_line_messages():
  assert cli.one_line(errors.ConfigError("first\n  second\n\nthird")) == "first second third"
  assert cli.one_line(errors.InputError("")) == "InputError"
