"""Integrity digests of a checkpoint: a uint32 per array leaf of the state, a SHA-256 of its metadata.

They exist because a flipped bit inside a compressed tensorstore chunk restores silently to wrong
values (truncated or missing files do raise). Computed on device, so a save copies the state once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _leaf_digest(x: jax.Array) -> jax.Array:
  """A uint32 position-weighted sum of the bits of `x`.

  Every weight is odd, so any single flipped bit changes the sum (odd * 2^k != 0 mod 2^32), and
  distinct weights catch swapped elements. Integer arithmetic makes it exact and independent of
  the reduction order, hence of the device layout.
  """
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    width = x.dtype.itemsize * 8
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{width}"))
    # 64-bit words split into two uint32 (an extra trailing axis); narrower ones widen.
    bits = (jax.lax.bitcast_convert_type(bits, jnp.uint32) if width == 64
            else bits.astype(jnp.uint32))
  bits = bits.ravel()
  weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
  return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _tree_digest_device(tree: Any) -> Any:
  return jax.tree.map(_leaf_digest, tree)


def _digestible(x: Any) -> bool:
  """Numeric or boolean array leaves; Python scalars and other objects are not digested."""
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    return False
  return bool(dtype == np.bool_ or jnp.issubdtype(dtype, jnp.integer)
              or jnp.issubdtype(dtype, jnp.floating))


def tree_digest(tree: Any) -> dict[str, int]:
  """{key path: uint32 digest} of every numeric array leaf of `tree` (see `_leaf_digest`)."""
  leaves = [(jax.tree_util.keystr(path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if _digestible(leaf)]
  digests = jax.device_get(_tree_digest_device([leaf for _, leaf in leaves]))
  return {key: int(d) for (key, _), d in zip(leaves, digests)}


def meta_digest(meta: Mapping[str, Any]) -> str:
  """SHA-256 (hex) of the canonical JSON of a checkpoint's ``meta`` (sorted keys)."""
  text = json.dumps(meta, sort_keys=True, allow_nan=True, separators=(",", ":"))
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def digest_mismatches(expected: Mapping[str, int], actual: Mapping[str, int]) -> list[str]:
  """The key paths whose digests differ (or that only one side has), sorted."""
  keys = sorted(set(expected) | set(actual))
  return [k for k in keys if expected.get(k) != actual.get(k)]
