"""`ddim-jax demo`, `train`, `export` and `info` end to end, and KID during training (small models).

The KID run (``kid_run``, conftest.py: 8 steps, KID every 2 with random InceptionV3 weights) is
shared with the other command tests; ``--checkpoint best|latest|N`` (and its old name ``--step``) is tested here through `export`.
"""

import json
import os
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from ddim_jax import cli, configs
from ddim_jax.inference import evaluation, pipeline
from ddim_jax.infra import checkpointing
from ddim_jax.interop import weight_files
from ddim_jax.training import trainer
from train_helpers import run, subprocess_env, tiny_config, tiny_overrides


@pytest.mark.slow
def test_demo_train_export_sample_end_to_end(tmp_path):
  """`ddim-jax demo` (shortened), then `export` (EMA and raw) and `sample` from the exported file."""
  workdir = tmp_path / "demo"
  preset = configs.load_config("demo").sample  # its sampler: recorded by export, the default of `sample`
  overrides = tiny_overrides(tmp_path / "cache", **{"train.num_steps": 4, "train.sample_every": 2,
                                                    "sample.sampler": preset.sampler,
                                                    "sample.time_grid": preset.time_grid})
  result = run([sys.executable, "-m", "ddim_jax.cli", "demo", "--workdir", str(workdir), *overrides],
               subprocess_env(1))
  assert result.returncode == 0, result.stderr[-3000:]
  assert Image.open(workdir / "samples.png").size == (2 + 2 * 66, 2 + 2 * 66)  # 4 images, 16px x4, 2px pads
  assert (workdir / "samples" / "step_0000002.png").exists()
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl", encoding="utf-8")]
  assert [r["step"] for r in records] == [2, 4] and all(r["loss"] > 0 for r in records)
  assert os.listdir(workdir / "tensorboard")
  for extra in ([], ["--raw"]):
    out = tmp_path / f"w{len(extra)}.safetensors"
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(out), *extra]) == 0
  ema = weight_files.read_weight_file(str(tmp_path / "w0.safetensors"))
  raw = weight_files.read_weight_file(str(tmp_path / "w1.safetensors"))
  assert ema[1]["weights"] == "ema" and raw[1]["weights"] == "raw" and ema[1]["step"] == "4"
  assert json.loads(ema[1]["data"])["dataset"] == "digits"  # the file knows its data
  assert (ema[1]["sampler"], ema[1]["time_grid"]) == ("dpmpp_2m", "logsnr")  # and the demo preset's sampler
  assert json.loads(weight_files.read_weight_file(str(workdir / "demo.safetensors"))[1]["data"])["dataset"] == "digits"
  assert any(np.any(ema[0][k] != raw[0][k]) for k in ema[0])  # the EMA is not the raw weights
  # `sample` of the exported file, with demo's numbers (4 images, 3 steps, seed 0), writes demo's grid: the
  # same images at the same default upscale (x4 for 16 px).
  assert cli.main(["sample", "--weights", str(tmp_path / "w0.safetensors"), "--out", str(tmp_path / "s.png"),
                   "--num-images", "4", "--steps", "3", "--seed", "0"]) == 0
  sampled, demo = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (tmp_path / "s.png",
                                                                                 workdir / "samples.png"))
  assert sampled.shape == demo.shape and np.abs(sampled - demo).max() <= 1


def test_export_without_checkpoints_is_a_clear_error(tmp_path, capsys):
  assert cli.main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2
  assert "no checkpoints" in capsys.readouterr().err


@pytest.mark.slow
def test_kid_during_training_logs_val_kid_and_keeps_the_best_checkpoint(kid_run):
  records = [json.loads(line) for line in open(os.path.join(kid_run, "metrics.jsonl"), encoding="utf-8")]
  kids = {r["step"]: r["val_kid"] for r in records if "val_kid" in r}
  assert sorted(kids) == [2, 4, 6, 8]
  assert all(np.isfinite(v) for v in kids.values()) and len(set(kids.values())) == 4
  # FID beside it (config.eval.fid), named by its settings: KID's torchvision network at 75 px is
  # not the standard FID, which alone is `val_fid`.
  assert not any("val_fid" in r for r in records)
  fids = {r["step"]: r["val_fid_torchvision_75px"] for r in records if "val_fid_torchvision_75px" in r}
  assert sorted(fids) == [2, 4, 6, 8] and all(np.isfinite(v) and v >= 0 for v in fids.values())
  best = min(kids, key=kids.get)
  with checkpointing.Checkpointer(os.path.join(kid_run, "checkpoints"), max_to_keep=1, best_metric="val_kid",
                                  async_save=False) as ckpt:
    assert ckpt.best_step() == best
    assert ckpt.all_steps() == sorted({8, best})  # the newest one plus the best-KID one
    assert ckpt.metrics(best)["val_kid"] == pytest.approx(kids[best])


def test_training_kid_without_inception_weights_warns_once_and_is_off(tmp_path):
  config = tiny_config(tmp_path / "cache", **{"train.kid_every": 2,
                                               "eval.inception_weights": str(tmp_path / "missing.pth")})
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert evaluation.make_training_kid(config, None, np.zeros((4, 16, 16, 3), np.uint8)) is None
  messages = [str(w.message) for w in caught]
  assert len(messages) == 1 and "KID during training is OFF" in messages[0], messages
  assert "inception_v3_google-0cc3c7bd.pth" in messages[0]  # says which file to get
  off = tiny_config(tmp_path / "cache")  # kid_every = 0 in the demo preset: no warning at all
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert evaluation.make_training_kid(off, None, None) is None
  assert not caught


@pytest.mark.slow
def test_step_chooses_the_best_latest_or_a_numbered_checkpoint(kid_run, tmp_path, capsys):
  """--checkpoint best loads the lowest-KID checkpoint that training kept, and says which step it used."""
  with checkpointing.Checkpointer(os.path.join(kid_run, "checkpoints"), async_save=False) as ckpt:
    steps = ckpt.all_steps()
    kids = {s: ckpt.metrics(s)["val_kid"] for s in steps}
  best = min(kids, key=kids.get)
  for which, want in (("best", best), ("latest", 8), (str(steps[0]), steps[0])):
    out = tmp_path / f"{which}.safetensors"
    assert cli.main(["export", "--workdir", kid_run, "--out", str(out), "--checkpoint", which]) == 0
    assert f"of step {want}," in capsys.readouterr().out
    _, variables, _, config, step = pipeline.restore_checkpoint(kid_run, step=want)
    written, metadata = weight_files.read_weight_file(str(out))
    assert step == want and int(metadata["step"]) == want
    expected = weight_files.flax_to_torch_state_dict(variables)
    for name, value in expected.items():
      np.testing.assert_array_equal(written[name], value, err_msg=f"{which}: {name}")
  if best != 8:  # the two checkpoints differ: best really is not the newest
    best_weights = weight_files.read_weight_file(str(tmp_path / "best.safetensors"))[0]
    latest_weights = weight_files.read_weight_file(str(tmp_path / "latest.safetensors"))[0]
    assert any(np.any(best_weights[k] != latest_weights[k]) for k in best_weights)
  assert cli.main(["sample", "--workdir", kid_run, "--step", "best", "--num-images", "2", "--steps", "2",
                   "--out", str(tmp_path / "s.png")]) == 0
  assert f"step {best} (EMA, best: val_kid" in capsys.readouterr().out
  assert cli.main(["export", "--workdir", kid_run, "--out", str(tmp_path / "x.safetensors"), "--step", "5"]) == 2
  assert f"no checkpoint of step 5 in {kid_run}" in capsys.readouterr().err
  assert cli.main(["export", "--workdir", kid_run, "--out", str(tmp_path / "x.safetensors"), "--step", "good"]) == 2
  assert "use latest, best or a step number" in capsys.readouterr().err


@pytest.mark.slow
def test_step_best_without_kid_is_a_clear_error(tmp_path, trained_weights, capsys):
  config = tiny_config(tmp_path / "cache", **{"train.num_steps": 2})
  trainer.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  assert cli.main(["sample", "--workdir", str(tmp_path / "run"), "--step", "best", "--out",
                   str(tmp_path / "s.png")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "has a KID" in err and "--checkpoint latest" in err, err
  assert cli.main(["sample", "--weights", trained_weights("keras"), "--step", "best"]) == 2
  assert "a weight file holds one step" in capsys.readouterr().err
