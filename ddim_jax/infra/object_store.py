"""Bucket paths for checkpoints: which paths are remote, and s3:// routed to tensorstore's s3 driver.

orbax 0.12.8 gives tensorstore a native kvstore only for gs:// paths; an s3:// one becomes a local
`file` kvstore and fails ("Checkpoint path should be absolute. Got s3:/bucket/..."). Its non-array
files go through etils.epath (s3fs), so only the path -> kvstore step is patched, for s3:// only.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


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
