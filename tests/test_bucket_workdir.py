"""A training workdir in a bucket (gs://), against a real local GCS server (gcp-storage-emulator).

Nothing of the storage layer is mocked: `ddim-jax train/export/sample` run as subprocesses whose
orbax checkpoints (tensorstore), metrics, TensorBoard events and sample grids (etils.epath ->
fsspec/gcsfs) go over HTTP to the emulator on 127.0.0.1. The environment those subprocesses get
is the one the README documents for an emulator.
"""

import importlib.util
import io
import json
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from train_helpers import run, subprocess_env, train_command

BUCKET = "ddim-test"
RUN = f"gs://{BUCKET}/run"
# A sample grid and a checkpoint every 2 steps; the first run stops at 4, the resumed one at 8.
EXTRA = {"train.sample_every": "4", "train.checkpoint_every": "2", "train.log_every": "2"}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """One preprocessed-data cache (the bundled digits), the one of tests/test_train.py."""
  return tmp_path_factory.getbasetemp().parent / "data_cache"


# gcp-storage-emulator (2026.7.19) omits the x-goog-generation header of object downloads, which
# GCS always sends; tensorstore's gcs driver needs it to re-read OCDBT manifests ("Malformed
# StorageGeneration" on the second write of a checkpoint). The server is started with that header
# added (its stored generation), nothing else changed.
EMULATOR = """
import sys
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  except NotFound:
    pass
  return _download(request, response, storage, *args, **kwargs)


objects.download = download
sys.argv[0] = "gcp-storage-emulator"
sys.exit(main())
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  """The URL of a fresh in-memory GCS emulator holding the empty bucket BUCKET."""
  if importlib.util.find_spec("gcp_storage_emulator") is None or importlib.util.find_spec("gcsfs") is None:
    pytest.skip("gcp-storage-emulator or gcsfs is not installed (both are in the dev extra: pip install -e '.[dev]')")
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path_factory.mktemp("emulator") / "emulator.log", "w")
  proc = subprocess.Popen([sys.executable, "-c", EMULATOR, "start", "--host", "127.0.0.1",
                           "--port", str(port), "--in-memory", "--default-bucket", BUCKET],
                          stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 60
    while True:
      try:
        with urllib.request.urlopen(url + "/", timeout=2) as response:  # the emulator's health check
          if response.status == 200:
            break
      except OSError:
        pass
      if proc.poll() is not None or time.time() > deadline:
        raise RuntimeError(f"the GCS emulator did not start (exit code {proc.poll()}); see {log.name}")
      time.sleep(0.2)
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()


def _bucket_env(url: str) -> dict:
  """The training subprocesses' environment plus the four variables of an emulated bucket."""
  env = subprocess_env(1)
  env.update({
      "EPATH_USE_TF": "false",  # TensorFlow is installed here: without this epath uses gfile, blind to the emulator
      "STORAGE_EMULATOR_HOST": url,  # gcsfs (epath's fsspec backend)
      "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (orbax's arrays)
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: no real credentials
      # gcsfs's default filesystem asks the gRPC storage-control API for the bucket type: against an
      # emulator (or with credentials present) that retries for minutes. The plain filesystem does not.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  })
  return env


def _fs(url: str):
  """gcsfs on the emulator, to list and read what the subprocesses wrote (the plain filesystem: see above)."""
  from gcsfs.core import GCSFileSystem
  return GCSFileSystem(endpoint_url=url, token="anon")


def _check(result, what: str):
  assert result.returncode == 0, f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def _tensors(path) -> dict:
  from safetensors.numpy import load_file
  return load_file(str(path))


def test_train_resume_export_and_sample_with_a_bucket_workdir(tmp_path, cache_dir, emulator):
  env = _bucket_env(emulator)
  fs = _fs(emulator)
  cwd = tmp_path / "cwd"
  cwd.mkdir()

  # 1. Four steps into the bucket.
  first = subprocess.run(train_command(RUN, cache_dir, **{**EXTRA, "train.num_steps": "4"}), env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=600, check=False)
  _check(first, "train (4 steps) into the bucket")
  assert "resuming" not in first.stdout
  objects = fs.find(f"{BUCKET}/run")
  names = {o[len(f"{BUCKET}/run/"):] for o in objects}
  assert "samples/step_0000004.png" in names, sorted(names)
  assert "metrics.jsonl" in names, sorted(names)
  assert any(n.startswith("tensorboard/events.out.tfevents.") for n in names), sorted(names)
  assert any(n.startswith("checkpoints/4/") for n in names), sorted(names)
  assert not (cwd / "gs:").exists() and not any(cwd.iterdir()), "a bucket path was treated as a local one"
  metrics = [json.loads(line) for line in fs.cat(f"{BUCKET}/run/metrics.jsonl").decode().splitlines()]
  assert [m["step"] for m in metrics] == [2, 4]
  grid = np.asarray(Image.open(io.BytesIO(fs.cat(f"{BUCKET}/run/samples/step_0000004.png"))))
  assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[-1] == 3

  # 2. Resumed to eight steps: the earlier metrics are kept (a bucket object cannot be appended to).
  second = subprocess.run(train_command(RUN, cache_dir, **{**EXTRA, "train.num_steps": "8"}), env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600, check=False)
  _check(second, "resumed training in the bucket")
  assert f"resuming from step 4 ({RUN}/checkpoints)" in second.stdout, second.stdout[-2000:]
  names = {o[len(f"{BUCKET}/run/"):] for o in fs.find(f"{BUCKET}/run")}
  assert {"samples/step_0000004.png", "samples/step_0000008.png"} <= names, sorted(names)
  assert any(n.startswith("checkpoints/8/") for n in names), sorted(names)
  assert sum(n.startswith("tensorboard/events.out.tfevents.") for n in names) == 2, sorted(names)
  metrics = [json.loads(line) for line in fs.cat(f"{BUCKET}/run/metrics.jsonl").decode().splitlines()]
  assert [m["step"] for m in metrics] == [2, 4, 6, 8]
  assert not any(cwd.iterdir())

  # 3. export and sample read the bucket workdir.
  exported = tmp_path / "bucket.safetensors"
  _check(run([sys.executable, "-m", "ddim_jax.cli", "export", "--workdir", RUN, "--out", str(exported)], env),
         "export from the bucket")
  grid_path = tmp_path / "grid.png"
  _check(run([sys.executable, "-m", "ddim_jax.cli", "sample", "--workdir", RUN, "--out", str(grid_path),
              "--num-images", "4", "--steps", "2"], env), "sample from the bucket")
  assert Image.open(grid_path).size[0] > 0

  # 4. The same run in a local workdir, uninterrupted: the storage must not change a single bit.
  local = tmp_path / "local"
  _check(run(train_command(local, cache_dir, **{**EXTRA, "train.num_steps": "8"}), subprocess_env(1)),
         "train in a local workdir")
  local_export = tmp_path / "local.safetensors"
  _check(run([sys.executable, "-m", "ddim_jax.cli", "export", "--workdir", str(local), "--out", str(local_export)],
             subprocess_env(1)), "export from the local workdir")
  got, want = _tensors(exported), _tensors(local_export)
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert fs.cat(f"{BUCKET}/run/samples/step_0000008.png") == (local / "samples" / "step_0000008.png").read_bytes()
  local_steps = [json.loads(line)["step"] for line in (local / "metrics.jsonl").read_text().splitlines()]
  assert local_steps == [2, 4, 6, 8]
