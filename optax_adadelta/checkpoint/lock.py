"""One writer at a time for each checkpoint path, and the save's checks made under it.

Orbax writes a checkpoint into a temporary directory named after the final one
(``<name>.orbax-checkpoint-tmp``) and first deletes that directory if it exists, so two
processes saving to one path at once write into each other's files and both can report
success. :func:`one_writer` therefore takes an exclusive lock on a file in the directory
where orbax creates its temporary one, and runs the save's own checks (does the checkpoint
exist already?) while holding it. A second writer fails at once with
:class:`CheckpointInUseError`, naming the holder.

The lock is ``fcntl.flock``: the kernel releases it when its holder exits or crashes, so a
stale lock never blocks (the next writer reuses the file that a crashed one left behind). It
works on local file systems and on NFS (where Linux maps it to a POSIX lock). Creating the
lock file also proves that orbax can write there: a read-only directory fails here with a
clear error, before orbax starts background threads that would hold the process for minutes.

In a multi-process run, process 0 takes the lock and makes the checks; every process learns
the outcome (one small collective) and all raise the same error, or all go on to save.
Object stores (``gs://`` and other URLs) and platforms without ``fcntl`` get no lock.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import socket
import threading
import warnings
from collections.abc import Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

try:
  import fcntl
except ImportError:  # Windows
  fcntl = None  # type: ignore[assignment]

LOCK_SUFFIX = ".optax_adadelta-lock"


class CheckpointInUseError(RuntimeError):
  """Another save to the same checkpoint path is in progress (in this or another process)."""


_held: set[str] = set()  # lock files this process holds (NFS locks do not exclude threads)
_held_guard = threading.Lock()


def _describe_self() -> str:
  now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
  return f"process {os.getpid()} on host {socket.gethostname()}, since {now}"


def _open_locked(lock_path: str, target: str) -> int | None:
  """An open descriptor of `lock_path` holding its exclusive lock; None where the file
  system cannot lock."""
  while True:
    try:
      fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
      raise type(error)(
        error.errno,
        f"Cannot save the checkpoint {target}: cannot create a file in "
        f"{os.path.dirname(lock_path)} ({os.strerror(error.errno or 0)}); is that "
        "directory read-only? Save to a directory this process can write.",
        lock_path,
      ) from error
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another writer"
      os.close(fd)
      raise CheckpointInUseError(
        f"Cannot save the checkpoint {target}: another save to it is in progress ({holder}; "
        f"lock file {lock_path}). Two writers to one path would mix their files: save to "
        "another path, or wait for that save to end."
      ) from None
    except OSError as error:
      os.close(fd)
      if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise
      warnings.warn(
        f"The file system of {lock_path} cannot lock files ({error}); saving {target} "
        "without excluding a concurrent save to the same path.",
        RuntimeWarning,
        stacklevel=4,
      )
      with contextlib.suppress(OSError):
        os.unlink(lock_path)
      return None
    # The previous holder removes the file as it ends: a lock on a file no longer at
    # `lock_path` excludes nobody, so open the new one instead.
    try:
      current = os.path.samestat(os.fstat(fd), os.stat(lock_path))
    except FileNotFoundError:
      current = False
    if current:
      os.ftruncate(fd, 0)
      os.pwrite(fd, _describe_self().encode(), 0)
      return fd
    os.close(fd)


@contextlib.contextmanager
def _exclusive(lock_path: str, target: str) -> Iterator[None]:
  with _held_guard:
    if lock_path in _held:
      raise CheckpointInUseError(
        f"Cannot save the checkpoint {target}: another thread of this process is saving to "
        f"it (lock file {lock_path}). Save to another path, or wait for that save to end."
      )
    _held.add(lock_path)
  try:
    fd = _open_locked(lock_path, target)
    try:
      yield
    finally:
      if fd is not None:
        with contextlib.suppress(FileNotFoundError):
          os.unlink(lock_path)  # before the unlock: see _open_locked
        os.close(fd)
  finally:
    with _held_guard:
      _held.discard(lock_path)


# Each process raises the same type when process 0 could not start the save.
_OUTCOMES: list[type[Exception]] = [CheckpointInUseError, ValueError, OSError, RuntimeError]


def _code(failure: Exception | None) -> int:
  """0 for success, else 1 + the index in _OUTCOMES of the type the others raise."""
  if failure is None:
    return 0
  kinds = [i for i, kind in enumerate(_OUTCOMES) if isinstance(failure, kind)]
  return 1 + (kinds[0] if kinds else len(_OUTCOMES) - 1)


@contextlib.contextmanager
def one_writer(lock_path: str, target: str, checks: Callable[[], None]) -> Iterator[None]:
  """Holds the lock `lock_path` for a save of `target` on process 0, with `checks()` run
  there under it; every process raises if either failed. Every process must call it."""
  stack = contextlib.ExitStack()
  failure: Exception | None = None
  if jax.process_index() == 0:
    try:
      if "://" not in lock_path:
        os.makedirs(os.path.dirname(lock_path), exist_ok=True)  # as orbax would
        if fcntl is not None:
          stack.enter_context(_exclusive(lock_path, target))
      checks()
    except Exception as error:  # every process must learn of it, or they would wait for 0
      stack.close()
      failure = error
  if jax.process_count() > 1:
    code = int(multihost_utils.broadcast_one_to_all(np.int32(_code(failure))))
    if failure is None and code:
      failure = _OUTCOMES[code - 1](
        f"Cannot save the checkpoint {target}: process 0 could not start the save "
        f"({_OUTCOMES[code - 1].__name__}; its error says why)."
      )
  if failure is not None:
    raise failure
  with stack:
    yield
