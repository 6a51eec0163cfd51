"""Training workdirs in buckets (gs:// and s3://), against real local object-store servers.

Nothing of the storage layer is mocked: `ddim-jax train/export/sample` run as subprocesses whose
orbax checkpoints (tensorstore), metrics, TensorBoard events and sample grids (etils.epath ->
fsspec: gcsfs or s3fs) go over HTTP to a server on 127.0.0.1: gcp-storage-emulator for gs://,
moto's server for s3://. The environment those subprocesses get is the one the README documents.
"""

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from train_helpers import BUCKET_RUN, TWO_PROCESS_RUN, free_port, run, subprocess_env, train_command, two_processes

BUCKET = "ddim-test"


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


def _wait_for_server(proc, url: str, log, what: str) -> None:
  """Polls ``url`` until the server answers 200 (or raises naming its log)."""
  deadline = time.time() + 60
  while True:
    try:
      with urllib.request.urlopen(url + "/", timeout=2) as response:  # health check / ListBuckets
        if response.status == 200:
          return
    except OSError:
      pass
    if proc.poll() is not None or time.time() > deadline:
      raise RuntimeError(f"the {what} did not start (exit code {proc.poll()}); see {log.name}")
    time.sleep(0.2)


def _serve(cmd, tmp_path_factory, what: str):
  """Starts a server process on a free port; yields (proc, url, log) and stops it afterwards."""
  port = free_port()
  log = open(tmp_path_factory.mktemp("server") / "server.log", "w")
  proc = subprocess.Popen([sys.executable, *cmd(port)], stdout=log, stderr=subprocess.STDOUT)
  try:
    _wait_for_server(proc, f"http://127.0.0.1:{port}", log, what)
    yield f"http://127.0.0.1:{port}"
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()


def _require(*modules: str) -> None:
  missing = [m for m in modules if importlib.util.find_spec(m) is None]
  if missing:
    pytest.skip(f"{', '.join(missing)} not installed (all are in the dev extra: pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def gcs_server(tmp_path_factory):
  """The URL of a fresh in-memory GCS emulator holding the empty bucket BUCKET."""
  _require("gcp_storage_emulator", "gcsfs")
  yield from _serve(lambda port: ["-c", EMULATOR, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory",
                                  "--default-bucket", BUCKET], tmp_path_factory, "GCS emulator")


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
  """The URL of a fresh in-memory moto S3 server holding the empty bucket BUCKET."""
  _require("moto", "flask", "s3fs")
  for url in _serve(lambda port: ["-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], tmp_path_factory,
                    "moto S3 server"):
    _s3_fs(url).mkdir(BUCKET)  # s3fs: a top-level mkdir creates the bucket
    yield url


def _gcs_env(url: str) -> dict:
  """The four variables of an emulated GCS bucket (and the one that keeps TensorFlow out)."""
  return {
      "EPATH_USE_TF": "false",  # TensorFlow is installed here: without this epath uses gfile, blind to the emulator
      "STORAGE_EMULATOR_HOST": url,  # gcsfs (epath's fsspec backend)
      "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (orbax's arrays)
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: no real credentials
      # gcsfs's default filesystem asks the gRPC storage-control API for the bucket type: against an
      # emulator (or with credentials present) that retries for minutes. The plain filesystem does not.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }


# moto accepts any key pair, but tensorstore's unsigned (credential-less) requests get a 403.
S3_KEY, S3_SECRET, S3_REGION = "testing", "testing", "us-east-1"


def _s3_env(url: str, tmp_path) -> dict:
  """The variables of an S3-compatible endpoint (and none of the developer's own AWS set-up)."""
  return {
      "EPATH_USE_TF": "false",  # without this epath uses gfile, which has no s3
      # botocore (so s3fs, epath's fsspec backend) and ddim_jax.infra.object_store, which passes it to
      # tensorstore's s3 spec as "endpoint" (tensorstore itself ignores this variable).
      "AWS_ENDPOINT_URL": url,
      "AWS_ACCESS_KEY_ID": S3_KEY,  # botocore and tensorstore
      "AWS_SECRET_ACCESS_KEY": S3_SECRET,  # botocore and tensorstore
      "AWS_DEFAULT_REGION": S3_REGION,  # botocore, and ddim_jax.infra.object_store -> tensorstore's "aws_region"
      # No ~/.aws/config or credentials file: a real profile must not redirect anything.
      "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
      "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
  }


def _gcs_fs(url: str):
  """gcsfs on the emulator, to list and read what the subprocesses wrote (the plain filesystem: see above)."""
  from gcsfs.core import GCSFileSystem
  return GCSFileSystem(endpoint_url=url, token="anon")


def _s3_fs(url: str):
  """s3fs on the server, to list and read what the subprocesses wrote (no listing cache)."""
  from s3fs import S3FileSystem
  # No region: with one, s3fs's mkdir sends LocationConstraint=us-east-1, which S3 (and moto) reject.
  return S3FileSystem(endpoint_url=url, key=S3_KEY, secret=S3_SECRET, skip_instance_cache=True,
                      use_listings_cache=False)


class Bucket:
  """A bucket on a local server: ``path(name)`` for workdirs, ``env`` for subprocesses, ``fs`` to read."""

  def __init__(self, scheme: str, env: dict, fs):
    self.scheme, self.env, self.fs = scheme, env, fs

  def path(self, name: str) -> str:
    return f"{self.scheme}://{BUCKET}/{name}"

  def names(self, name: str) -> set[str]:
    """The object names under workdir ``name``, relative to it."""
    self.fs.invalidate_cache()
    return {o[len(f"{BUCKET}/{name}/"):] for o in self.fs.find(f"{BUCKET}/{name}")}

  def cat(self, name: str) -> bytes:
    return self.fs.cat(f"{BUCKET}/{name}")


@pytest.fixture(params=["gs", "s3"])
def bucket(request, tmp_path):
  """A gs:// (GCS emulator) or s3:// (moto) bucket."""
  if request.param == "gs":
    url = request.getfixturevalue("gcs_server")
    return Bucket("gs", {**subprocess_env(1), **_gcs_env(url)}, _gcs_fs(url))
  url = request.getfixturevalue("s3_server")
  env = subprocess_env(1)
  for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
    env.pop(name, None)  # nothing of the developer's own AWS set-up
  return Bucket("s3", {**env, **_s3_env(url, tmp_path)}, _s3_fs(url))


def _check(result, what: str):
  assert result.returncode == 0, f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def _tensors(path) -> dict:
  from safetensors.numpy import load_file
  return load_file(str(path))


@pytest.mark.slow
def test_train_resume_export_and_sample_with_a_bucket_workdir(tmp_path, cache_dir, bucket, bucket_run_reference):
  env, run_path = bucket.env, bucket.path("run")
  cwd = tmp_path / "cwd"
  cwd.mkdir()

  # 1. Four steps into the bucket.
  first = subprocess.run(train_command(run_path, cache_dir, **{**BUCKET_RUN, "train.num_steps": "4"}), env=env,
                         cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
  _check(first, "train (4 steps) into the bucket")
  assert "resuming" not in first.stdout
  names = bucket.names("run")
  assert "samples/step_0000004.png" in names, sorted(names)
  assert "metrics.jsonl" in names, sorted(names)
  assert any(n.startswith("tensorboard/events.out.tfevents.") for n in names), sorted(names)
  # Steps are written in place and committed with commit_success.txt (a bucket has no atomic rename).
  assert {"checkpoints/2/commit_success.txt", "checkpoints/4/commit_success.txt"} <= names, sorted(names)
  assert any(n.startswith("checkpoints/4/state/") for n in names), sorted(names)
  assert not any("orbax-checkpoint-tmp" in n for n in names), sorted(names)
  assert not any(cwd.iterdir()), "a bucket path was treated as a local one"
  metrics = [json.loads(line) for line in bucket.cat("run/metrics.jsonl").decode().splitlines()]
  assert [m["step"] for m in metrics] == [2, 4]
  grid = np.asarray(Image.open(io.BytesIO(bucket.cat("run/samples/step_0000004.png"))))
  assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[-1] == 3

  # 2. Resumed to eight steps: the earlier metrics are kept (a bucket object cannot be appended to).
  second = subprocess.run(train_command(run_path, cache_dir, **{**BUCKET_RUN, "train.num_steps": "8"}), env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
  _check(second, "resumed training in the bucket")
  assert f"resuming from step 4 ({run_path}/checkpoints)" in second.stdout, second.stdout[-2000:]
  names = bucket.names("run")
  assert {"samples/step_0000004.png", "samples/step_0000008.png"} <= names, sorted(names)
  assert any(n.startswith("checkpoints/8/state/") for n in names), sorted(names)
  # Retention (the newest 3) deleted step 2 from the bucket.
  assert {n.split("/")[1] for n in names if n.startswith("checkpoints/")} == {"4", "6", "8"}, sorted(names)
  assert sum(n.startswith("tensorboard/events.out.tfevents.") for n in names) == 2, sorted(names)
  metrics = [json.loads(line) for line in bucket.cat("run/metrics.jsonl").decode().splitlines()]
  assert [m["step"] for m in metrics] == [2, 4, 6, 8]
  # The run record: the newest start's config, and one record per start (rewritten whole each time).
  assert json.loads(bucket.cat("run/config.json"))["train"]["num_steps"] == 8
  runs = [json.loads(line) for line in bucket.cat("run/runs.jsonl").decode().splitlines()]
  assert [r["start_step"] for r in runs] == [0, 4] and runs[1]["config_changes"] == {"train.num_steps": [4, 8]}
  assert not any(cwd.iterdir())

  # 3. export and sample read the bucket workdir.
  exported = tmp_path / "bucket.safetensors"
  _check(run([sys.executable, "-m", "ddim_jax.cli", "export", "--workdir", run_path, "--out", str(exported)], env),
         "export from the bucket")
  grid_path = tmp_path / "grid.png"
  _check(run([sys.executable, "-m", "ddim_jax.cli", "sample", "--workdir", run_path, "--out", str(grid_path),
              "--num-images", "4", "--steps", "2"], env), "sample from the bucket")
  assert Image.open(grid_path).size[0] > 0

  # 4. The same run in a local workdir, uninterrupted (conftest.bucket_run_reference, shared by gs://
  # and s3://): the storage must not change a single bit.
  local, local_export = bucket_run_reference
  got, want = _tensors(exported), _tensors(local_export)
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert bucket.cat("run/samples/step_0000008.png") == (local / "samples" / "step_0000008.png").read_bytes()
  local_steps = [json.loads(line)["step"] for line in (local / "metrics.jsonl").read_text().splitlines()]
  assert local_steps == [2, 4, 6, 8]


# Every leaf of the newest checkpoint of a workdir (local or bucket), dumped by a subprocess that has
# the bucket's environment: the TrainState leaves, the step and the data-iterator position.
DUMP = """
import json, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[3])
from train_helpers import final_state
step, state, meta = final_state(sys.argv[1])
np.savez(sys.argv[2], *[np.asarray(x) for x in jax.tree.leaves(state)])
with open(sys.argv[2] + ".json", "w") as f:
  json.dump({"step": step, "data_iterator": meta["data_iterator"]}, f)
"""


def _dumped_state(workdir: str, out, env) -> tuple[dict, list[np.ndarray]]:
  """({step, data_iterator}, every TrainState leaf) of ``workdir``'s newest checkpoint, read by a
  subprocess with ``env``."""
  _check(run([sys.executable, "-c", DUMP, workdir, str(out), os.path.dirname(os.path.abspath(__file__))], env),
         f"reading the newest checkpoint of {workdir}")
  with np.load(str(out) + ".npz") as arrays, open(str(out) + ".json", encoding="utf-8") as f:
    return json.load(f), [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


@pytest.mark.slow
def test_two_processes_sigkilled_in_a_bucket_resume_bit_exactly(tmp_path, cache_dir, gcs_server,
                                                                 two_process_reference):
  """2 processes x 2 CPU devices train into gs://, are SIGKILLed mid-run, and the resumed run equals
  an uninterrupted local 2-process run (conftest.two_process_reference) in every state leaf."""
  env = _gcs_env(gcs_server)
  fs = _gcs_fs(gcs_server)
  extra = TWO_PROCESS_RUN
  reference = two_process_reference.workdir

  workdir = f"gs://{BUCKET}/run2"

  def committed() -> list[int]:
    fs.invalidate_cache()
    found = fs.glob(f"{BUCKET}/run2/checkpoints/*/commit_success.txt")
    return sorted(int(name.split("/")[-2]) for name in found)

  cmd = train_command(workdir, cache_dir, **extra)
  procs = two_processes(cmd, free_port(), env)
  deadline = time.time() + 300
  while not committed() and time.time() < deadline and all(p.poll() is None for p in procs):
    time.sleep(0.1)
  for p in procs:
    p.kill()
  for p in procs:
    p.communicate(timeout=60)
  steps = committed()
  assert [p.returncode for p in procs] == [-9, -9], "a process had stopped before the SIGKILL"
  assert steps and steps[-1] < 100, steps  # killed mid-run, after at least one committed checkpoint

  procs = two_processes(cmd, free_port(), env)
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  resumed = int(re.search(r"resuming from step (\d+)", outputs[0][0]).group(1))
  assert resumed >= steps[-1], (resumed, steps)
  (got_meta, got), (want_meta, want) = (_dumped_state(workdir, tmp_path / "bucket", {**subprocess_env(1), **env}),
                                        _dumped_state(str(reference), tmp_path / "local", subprocess_env(1)))
  assert got_meta == want_meta and want_meta["step"] == 100  # the step and the data-iterator position
  assert len(got) == len(want)
  for i, (a, b) in enumerate(zip(got, want)):  # raw and EMA weights, BatchNorm statistics, AdamW state, step
    np.testing.assert_array_equal(a, b, err_msg=f"leaf {i}")


LOCK_SCRIPT = """
import json, os, sys, time, warnings
from ddim_jax.infra import workdir_lock as w
path, out = sys.argv[1], {}
w.HEARTBEAT_SECONDS = 0.2
lock = w.WorkdirLock(path).acquire()
fs, key = lock._fs()
first = w.Holder.parse(fs.cat_file(key))
out["holder_is_me"] = first.pid == os.getpid()
time.sleep(1.0)
fs.invalidate_cache(key)
out["heartbeat_advanced"] = w.Holder.parse(fs.cat_file(key)).heartbeat > first.heartbeat
try:
  w.WorkdirLock(path).acquire()
  out["second"] = "acquired"
except w.WorkdirLockedError as e:
  out["second"] = str(e)
lock.release()
out["removed"] = not fs.exists(key)
fs.pipe_file(key, w.Holder("elsewhere", 1, "then", time.time()).to_bytes())  # a live trainer on another host
try:
  w.WorkdirLock(path).acquire()
  out["fresh_elsewhere"] = "acquired"
except w.WorkdirLockedError as e:
  out["fresh_elsewhere"] = str(e)
fs.pipe_file(key, w.Holder("elsewhere", 1, "then", time.time() - w.STALE_SECONDS - 1).to_bytes())  # killed there
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  lock = w.WorkdirLock(path).acquire()
out["stale_warned"] = any("host elsewhere" in str(c.message) for c in caught)
fs.invalidate_cache(key)
out["taken_over"] = w.Holder.parse(fs.cat_file(key)).pid == os.getpid()
lock.release()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_one_trainer_per_bucket_workdir(bucket, tmp_path):
  """The bucket lock: created if absent, refreshed, refused to a second trainer (naming the holder),
  taken over from a holder whose heartbeat stopped, removed at the end."""
  result = subprocess.run([sys.executable, "-c", LOCK_SCRIPT, bucket.path("locked")], env=bucket.env,
                          capture_output=True, text=True, timeout=300, check=False)
  _check(result, "the lock script")
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["holder_is_me"] and out["heartbeat_advanced"] and out["removed"], out
  assert "in use by another trainer: pid" in out["second"] and bucket.path("locked") in out["second"], out
  assert "pid 1 on host elsewhere" in out["fresh_elsewhere"], out
  assert out["stale_warned"] and out["taken_over"], out


def test_s3_lock_creation_is_atomic(s3_server):
  """On S3 the lock is created with If-None-Match: * (moto enforces it): of two creators, one wins."""
  fs = _s3_fs(s3_server)
  key = f"{BUCKET}/atomic/train.lock"
  fs.pipe_file(key, b"first", mode="create")
  with pytest.raises(FileExistsError):
    fs.pipe_file(key, b"second", mode="create")
  assert fs.cat_file(key) == b"first"


SET_ASIDE_SCRIPT = """
import json, sys
from etils import epath
from ddim_jax.infra.run_dir import RunDir
root = epath.Path(sys.argv[1])
(root / "checkpoints" / "4").mkdir(parents=True, exist_ok=True)
(root / "checkpoints" / "4" / "state").write_text("state of step 4")
(root / "metrics.jsonl").write_text("metrics")
(root / "train.lock").write_text("lock")
print(json.dumps({"moved": RunDir(sys.argv[1]).set_aside()}))
"""


def test_fresh_sets_a_bucket_run_aside(bucket):
  """``train --fresh`` in a bucket: every object of the old run copied under previous/<time>/, the
  originals deleted, the lock kept (a bucket has no folder rename)."""
  result = subprocess.run([sys.executable, "-c", SET_ASIDE_SCRIPT, bucket.path("used")], env=bucket.env,
                          capture_output=True, text=True, timeout=300, check=False)
  _check(result, "the set-aside script")
  moved = json.loads(result.stdout.strip().splitlines()[-1])["moved"]
  prefix = bucket.path("used") + "/previous/"
  assert moved.startswith(prefix), moved
  stamp = moved[len(prefix):]
  assert bucket.names("used") == {"train.lock", f"previous/{stamp}/checkpoints/4/state",
                                  f"previous/{stamp}/metrics.jsonl"}
  assert bucket.cat(f"used/previous/{stamp}/checkpoints/4/state") == b"state of step 4"
  assert bucket.cat("used/train.lock") == b"lock"
