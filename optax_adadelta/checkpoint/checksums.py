"""Checksums of a checkpoint's contents: every array and the step, and the record that holds
them.

The zarr chunks orbax writes carry no checksum, so :mod:`optax_adadelta.checkpoint` records
two 32-bit position-weighted sums of every array's bytes. They are computed on the global
array (each process sums the shards it holds first replicas of, then the processes add their
sums), so any sharding and any number of processes give the same value. The record itself
(signature, config and these sums) gets a SHA-256 digest, so an edited config is caught too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

_MASK = np.uint64(0xFFFFFFFF)
_BLOCK = 1 << 22  # words per NumPy pass, to bound the temporaries


def _words(x: np.ndarray) -> np.ndarray:
  """The bytes of `x` as 32-bit words held in uint64; 8-byte and complex values get
  trailing axes (little-endian order, as stored)."""
  if np.iscomplexobj(x):
    x = np.stack([x.real, x.imag], axis=-1)
  x = np.ascontiguousarray(x)
  size = x.dtype.itemsize
  if size == 8:
    return x.view(np.uint32).reshape(*x.shape, 2).astype(np.uint64)
  if size in (1, 2, 4):
    return x.view(f"u{size}").astype(np.uint64)
  raise TypeError(f"cannot checksum dtype {x.dtype}")


def _partial_digest(
  block: np.ndarray, start: tuple[int, ...], shape: tuple[int, ...]
) -> np.ndarray:
  """Two sums mod 2³² over one block of words at `start` in an array of words of `shape`,
  each word weighted by its position there. The sums do not depend on how the array is cut
  into shards and blocks, and a flipped bit always changes the first (its weight is odd)."""
  index = np.zeros((), np.uint64)
  for axis, (offset, length) in enumerate(zip(start, shape, strict=True)):
    coordinate = np.arange(offset, offset + block.shape[axis], dtype=np.uint64)
    index = index * np.uint64(length) + coordinate.reshape((-1,) + (1,) * (len(shape) - axis - 1))
  index &= _MASK
  weighted = np.sum(block * (2 * index + 1), dtype=np.uint64) & _MASK
  mixed = ((block ^ ((index * np.uint64(0x9E3779B9)) & _MASK)) * np.uint64(0x85EBCA6B)) & _MASK
  mixed ^= mixed >> np.uint64(16)
  return np.array([weighted, np.sum(mixed, dtype=np.uint64) & _MASK], np.uint64)


def _digest(leaf: Any) -> np.ndarray:
  """This process's part of a leaf's digest: its shards that are first replicas."""
  if not isinstance(leaf, jax.Array):
    leaf = np.asarray(leaf)
    # A NumPy value is the same on every process: only the first one counts it.
    pieces = [((slice(None),) * leaf.ndim, leaf)] if jax.process_index() == 0 else []
  else:
    pieces = [(s.index, s.data) for s in leaf.addressable_shards if s.replica_id == 0]
  total = np.zeros(2, np.uint64)
  for index, data in pieces:
    words = _words(np.asarray(data))
    start = tuple(sl.start or 0 for sl in index) + (0,) * (words.ndim - len(index))
    shape = tuple(leaf.shape) + words.shape[len(index) :]
    rows = max(1, _BLOCK // max(1, words[0].size)) if words.ndim else 1
    for row in range(0, max(1, len(words)) if words.ndim else 1, rows):
      block = words[row : row + rows] if words.ndim else words
      offset = (start[0] + row, *start[1:]) if words.ndim else start
      total += _partial_digest(block, offset, shape)
  return total & _MASK


def checksums(tree: Mapping[str, Any]) -> dict[str, str]:
  """``{path: 16 hex digits}`` for every array leaf of ``{"params", "opt_state", "step"}``
  and for the step (as an int64); every process must call it."""
  paths, digests = [], []
  tree = {**tree, "step": np.asarray(int(tree["step"]), np.int64)}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(leaf, "dtype"):
      paths.append(jax.tree_util.keystr(path))
      digests.append(_digest(leaf))
  total: np.ndarray = np.array(digests, np.uint64).reshape(-1, 2)
  if jax.process_count() > 1:  # each process summed its own shards
    gathered = np.asarray(multihost_utils.process_allgather(total.astype(np.uint32)), np.uint64)
    total = np.asarray(np.sum(gathered, axis=0, dtype=np.uint64) & _MASK)
  return {path: f"{int(a):08x}{int(b):08x}" for path, (a, b) in zip(paths, total, strict=True)}


def record_digest(record: Mapping[str, Any]) -> str:
  """SHA-256 of a record's JSON (keys sorted): its signature, config and checksums."""
  text = json.dumps(
    {key: record[key] for key in ("signature", "config", "checksums")}, sort_keys=True
  )
  return hashlib.sha256(text.encode()).hexdigest()
