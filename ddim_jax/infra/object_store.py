"""Bucket paths: which paths are remote, a fast check that a bucket can be reached, and s3:// routed to
tensorstore's s3 driver.

``check_access``: before the storage libraries start (each retries a missing credential or an
unreachable host for seconds to minutes, printing hundreds of lines), a few cheap probes with short
timeouts make a bucket that cannot be reached one line naming the store, the bucket and the settings
to check. See docs/checkpoints.md ("Buckets that cannot be reached").

orbax 0.12.8 gives tensorstore a native kvstore only for gs:// paths; an s3:// one becomes a local
`file` kvstore and fails ("Checkpoint path should be absolute. Got s3:/bucket/..."). Its non-array
files go through etils.epath (s3fs), so only the path -> kvstore step is patched, for s3:// only.

Light on purpose (no orbax, JAX or TensorFlow at import): the CLI checks a bucket before loading them.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from ddim_jax import errors


def is_remote(path: str | os.PathLike) -> bool:
  """True for a bucket path (``gs://...``, ``s3://...``, any ``scheme://``), False for a local one."""
  return "://" in os.fspath(path)


def _s3_kvstore_spec(path: str) -> dict[str, Any]:
  """tensorstore's kvstore spec of ``s3://bucket/key``.

  tensorstore reads the credentials (AWS_ACCESS_KEY_ID, ...) from the environment itself but not an
  endpoint: a custom one (MinIO, moto, ...) is taken from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL,
  the variables botocore (so s3fs) honours too; the region from AWS_REGION or AWS_DEFAULT_REGION.
  """
  bucket, _, key = path[len("s3://"):].partition("/")
  spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": key}
  endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
  if endpoint:
    spec["endpoint"] = endpoint
  region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
  if region:
    spec["aws_region"] = region
  return spec


def route_s3_paths_to_tensorstore() -> None:
  """Makes orbax's array I/O use tensorstore's s3 driver for s3:// paths (idempotent).

  Patches three private names of orbax 0.12.8 (called for s3:// directories only, so that local and
  gs:// runs never depend on them); if a later orbax renamed them, says so instead of failing obscurely.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel  (heavy: only for s3:// workdirs)
  from orbax.checkpoint._src.path import gcs_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
  if getattr(ts_utils, "_ddim_jax_s3", False):
    return
  try:
    normalize, use_native, native_spec = ts_utils._normalize_path, ts_utils._use_gcs_driver, gcs_utils.get_kvstore_for_gcs
  except AttributeError as e:
    raise NotImplementedError(f"s3:// checkpoints need orbax-checkpoint 0.12.x internals ({e}); "
                              f"this is {ocp.__version__}") from e

  def normalize_path(path: str) -> str:
    out = normalize(path)  # os.path.normpath: "s3://b/k" -> "s3:/b/k"
    return "s3://" + out[len("s3:/"):] if out.startswith("s3:/") and not out.startswith("s3://") else out

  def get_kvstore(path: str) -> dict[str, Any]:
    return _s3_kvstore_spec(path) if str(path).startswith("s3://") else native_spec(path)

  ts_utils._normalize_path = normalize_path
  ts_utils._use_gcs_driver = lambda directory: use_native(directory) or directory.startswith("s3://")
  gcs_utils.get_kvstore_for_gcs = get_kvstore
  ts_utils._ddim_jax_s3 = True


# ----------------------------------------------------------------------------------------------
# Can the bucket be reached? One line, in seconds, instead of the storage libraries' retries.


class BucketAccessError(errors.Error, ConnectionError):
  """A bucket that cannot be reached: no credentials, credentials refused, no network, no endpoint."""


# Each probe's limit. A network that answers slower than this cannot run a training job either.
PROBE_TIMEOUT_S = 5.0
# The GCE metadata server answers within milliseconds on a Google Cloud VM; elsewhere nothing answers.
METADATA_TIMEOUT_S = 2.0
# DDIM_JAX_BUCKET_CHECK=off skips the probes (a set-up they misjudge; the libraries then report it).
CHECK_ENV = "DDIM_JAX_BUCKET_CHECK"
_FALSE = ("0", "false", "no", "off")
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
GCS_SETTINGS = ("GOOGLE_APPLICATION_CREDENTIALS (a service-account key file), `gcloud auth application-default "
                "login`, or a Google Cloud VM's service account; STORAGE_EMULATOR_HOST for a local emulator")
S3_SETTINGS = ("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN for temporary keys), or AWS_PROFILE "
               "(a profile in ~/.aws/credentials), or an instance role; AWS_ENDPOINT_URL for an S3-compatible server")

_reachable: set[tuple[str, str]] = set()  # (scheme, bucket) already checked in this process


def check_access(path: str | os.PathLike) -> None:
  """Checks within seconds that the bucket of a ``gs://`` or ``s3://`` path can be used (other paths: nothing).

  gs://: an emulator (STORAGE_EMULATOR_HOST) must list the bucket; otherwise credentials must exist
  (GOOGLE_APPLICATION_CREDENTIALS, gcloud's application-default file, or a GCE metadata server) and
  storage.googleapis.com must be reachable. s3://: botocore must find credentials and the endpoint
  must list the bucket with them. Each probe has a timeout of a few seconds; a bucket passes once
  per process. ``DDIM_JAX_BUCKET_CHECK=off`` skips the checks.

  Raises:
    BucketAccessError: no credentials, credentials refused, no network, an endpoint that does not answer.
    errors.MissingInputError: the bucket does not exist.
    errors.ConfigError: a set-up that cannot work (etils.epath would send the path to TensorFlow's
      file system, which has no s3:// and ignores an emulator: EPATH_USE_TF=false).
  """
  text = os.fspath(path)
  scheme, _, rest = text.partition("://")
  scheme = scheme.lower()
  if not rest or scheme not in ("gs", "s3") or os.environ.get(CHECK_ENV, "").strip().lower() in _FALSE:
    return
  bucket, _, key = rest.partition("/")
  if not bucket:
    raise errors.ConfigError(f"{text!r} names no bucket: use {scheme}://BUCKET/path")
  if (scheme, bucket) in _reachable:
    return
  if scheme == "gs":
    _check_gcs(bucket, key.rstrip("/"))
  else:
    _check_s3(bucket, key.rstrip("/"))
  _reachable.add((scheme, bucket))


def _epath_uses_tensorflow() -> bool:
  """Whether etils.epath sends bucket paths to TensorFlow's gfile (its rule: TensorFlow importable and
  EPATH_USE_TF not false), without importing anything."""
  if os.environ.get("EPATH_USE_TF", "").lower() in ("false", "no", "f", "0"):
    return False
  return importlib.util.find_spec("tensorflow") is not None


def _http_status(url: str, timeout: float, headers: dict | None = None) -> tuple[int, dict]:
  """(status, headers) of a GET of ``url``; an HTTP error status is returned, a network failure raises OSError."""
  request = urllib.request.Request(url, headers=headers or {})
  # Direct, never through HTTP(S)_PROXY: the endpoints asked this way are an emulator and the metadata server.
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
  try:
    with opener.open(request, timeout=timeout) as response:
      return response.status, dict(response.headers)
  except urllib.error.HTTPError as e:
    return e.code, dict(e.headers or {})


def _tcp_reachable(host: str, port: int, timeout: float) -> str | None:
  """None when a TCP connection to ``host:port`` opens within ``timeout`` s (name lookup included), else why not."""
  outcome: dict[str, str | None] = {}

  def connect():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      outcome["error"] = None
    except OSError as e:
      outcome["error"] = str(e) or type(e).__name__

  # getaddrinfo has no timeout of its own (a resolver that does not answer takes 5 s per try): a thread.
  thread = threading.Thread(target=connect, daemon=True, name="ddim-jax bucket probe")
  thread.start()
  thread.join(timeout)
  if thread.is_alive():
    return f"no answer within {timeout:.0f} s"
  return outcome["error"]


# ----- gs://


def _check_gcs(bucket: str, key: str) -> None:
  where = f"gs://{bucket}"
  emulator = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
  if emulator:
    if _epath_uses_tensorflow():
      raise errors.ConfigError(
          f"{where}: STORAGE_EMULATOR_HOST={emulator} is set, but with TensorFlow installed etils.epath sends "
          "gs:// paths to TensorFlow's file system, which ignores it: set EPATH_USE_TF=false (gcsfs then "
          "honours the emulator)")
    url = (emulator if "://" in emulator else f"http://{emulator}").rstrip("/")
    query = urllib.parse.urlencode({"maxResults": 1, "prefix": key})
    try:
      status, _ = _http_status(f"{url}/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o?{query}",
                               PROBE_TIMEOUT_S)
    except OSError as e:
      raise BucketAccessError(f"{where}: the GCS emulator at STORAGE_EMULATOR_HOST={emulator} does not answer "
                              f"({getattr(e, 'reason', e)}): start it, or fix or unset STORAGE_EMULATOR_HOST") from None
    if status == 404:
      raise errors.MissingInputError(f"{where}: the bucket does not exist on the GCS emulator at {emulator}: "
                                     "create it (gcp-storage-emulator: --default-bucket) or fix the name")
    if status >= 400:
      raise BucketAccessError(f"{where}: the GCS emulator at STORAGE_EMULATOR_HOST={emulator} answers HTTP "
                              f"{status} to listing the bucket: check the emulator")
    return
  source = _gcs_credentials(where)
  if source is None:
    raise BucketAccessError(f"{where}: no Google Cloud credentials found (GOOGLE_APPLICATION_CREDENTIALS is unset, "
                            f"no application-default file in {_gcloud_config_dir()}, no GCE metadata server): set "
                            f"{GCS_SETTINGS}")
  if any(os.environ.get(name) for name in _PROXY_VARIABLES):
    return  # through a proxy: a direct connection proves nothing; the libraries use the proxy
  host = "storage.googleapis.com"
  why = _tcp_reachable(host, 443, PROBE_TIMEOUT_S)
  if why is not None:
    raise BucketAccessError(f"{where}: cannot reach {host}:443 ({why}; credentials: {source}): check the network, "
                            "DNS and proxy (HTTPS_PROXY); for a local emulator set STORAGE_EMULATOR_HOST")


def _gcloud_config_dir() -> str:
  return os.environ.get("CLOUDSDK_CONFIG") or os.path.join(os.path.expanduser("~"), ".config", "gcloud")


def _gcs_credentials(where: str) -> str | None:
  """Where application default credentials would come from (google-auth's order), or None.

  Raises:
    BucketAccessError: GOOGLE_APPLICATION_CREDENTIALS names a file that does not exist.
  """
  named = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS", "").strip()
  if named:
    if not os.path.isfile(named):
      raise BucketAccessError(f"{where}: GOOGLE_APPLICATION_CREDENTIALS={named} is no file: point it at a "
                              "service-account key file, or unset it and run `gcloud auth application-default "
                              "login`")
    return f"GOOGLE_APPLICATION_CREDENTIALS={named}"
  adc = os.path.join(_gcloud_config_dir(), "application_default_credentials.json")
  if os.path.isfile(adc):
    return adc
  # google-auth's metadata server: GCE_METADATA_HOST, else GCE_METADATA_IP, else 169.254.169.254. The
  # IP, not metadata.google.internal: off Google Cloud that name's lookup itself can take seconds.
  host = os.environ.get("GCE_METADATA_HOST") or os.environ.get("GCE_METADATA_IP") or "169.254.169.254"
  try:
    _, headers = _http_status(f"http://{host}/computeMetadata/v1/instance/service-accounts/", METADATA_TIMEOUT_S,
                              {"Metadata-Flavor": "Google"})
  except OSError:
    return None
  # Another cloud's metadata service may answer on the same address, without this header.
  if {k.lower(): v for k, v in headers.items()}.get("metadata-flavor") == "Google":
    return f"the GCE metadata server at {host}"
  return None


# ----- s3://


def _check_s3(bucket: str, key: str) -> None:
  where = f"s3://{bucket}"
  if _epath_uses_tensorflow() and importlib.util.find_spec("tensorflow_io") is None:
    raise errors.ConfigError(
        f"{where}: with TensorFlow installed etils.epath sends s3:// paths to TensorFlow's file system, which has "
        "no s3:// (that needs tensorflow-io): set EPATH_USE_TF=false (s3fs is then used)")
  try:
    import botocore.config  # pylint: disable=import-outside-toplevel  (s3fs's dependency, light)
    import botocore.exceptions  # pylint: disable=import-outside-toplevel
    import botocore.session  # pylint: disable=import-outside-toplevel
  except ImportError:
    return  # no s3fs either: epath names the missing package itself
  endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
  at = f" at AWS_ENDPOINT_URL={endpoint}" if endpoint else ""
  session = botocore.session.Session()
  try:
    # botocore's chain: the variables, AWS_PROFILE and the files in ~/.aws, SSO, web identity, a
    # container's or an instance's role (its metadata service: one try of 1 s by default).
    credentials = session.get_credentials()
  except botocore.exceptions.BotoCoreError as e:
    raise BucketAccessError(f"{where}: the AWS credentials set-up does not work ({e}): check {S3_SETTINGS}") from None
  if credentials is None:
    raise BucketAccessError(f"{where}: no AWS credentials found: set {S3_SETTINGS}")
  region = (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or session.get_config_variable("region")
            or "us-east-1")
  config = botocore.config.Config(connect_timeout=PROBE_TIMEOUT_S, read_timeout=PROBE_TIMEOUT_S,
                                  retries={"max_attempts": 1, "mode": "standard"})
  client = session.create_client("s3", region_name=region, endpoint_url=endpoint, config=config)
  try:
    # Listing is what orbax does first (the steps); it needs the permission training needs anyway.
    client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
  except botocore.exceptions.ClientError as e:
    code = e.response.get("Error", {}).get("Code", "")
    message = e.response.get("Error", {}).get("Message", "") or str(e)
    if code == "NoSuchBucket":
      raise errors.MissingInputError(f"{where}: the bucket does not exist{at}: create it (aws s3 mb {where}) or fix "
                                     "the name") from None
    raise BucketAccessError(f"{where}: listing the bucket{at} is refused ({code}: {message}): check {S3_SETTINGS}, "
                            "and that they may list and write the bucket") from None
  except botocore.exceptions.BotoCoreError as e:  # no connection, a timeout, a bad endpoint URL
    target = f"AWS_ENDPOINT_URL={endpoint}" if endpoint else f"the S3 endpoint of region {region}"
    raise BucketAccessError(f"{where}: cannot reach {target} ({e}): check the network, DNS and proxy "
                            "(HTTPS_PROXY), or AWS_ENDPOINT_URL for an S3-compatible server") from None
  finally:
    client.close()
