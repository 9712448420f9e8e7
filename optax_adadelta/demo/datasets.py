"""Data for the demo, the notebooks and the examples: MNIST, the embedded digits, airfoil.

Every loader returns NumPy arrays and raises `DataError` with the path and what was expected
when a folder or file is missing, truncated or of the wrong shape.
"""

from __future__ import annotations

import gzip
import os
import zipfile
import zlib
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np

ENV_VAR = "OPTAX_ADADELTA_DATA"

# IDX magic numbers: 0x08 = unsigned byte, then the number of dimensions.
_IDX_UBYTE = 0x08
_MNIST_IDX = {
  "x_train": "train-images-idx3-ubyte",
  "y_train": "train-labels-idx1-ubyte",
  "x_test": "t10k-images-idx3-ubyte",
  "y_test": "t10k-labels-idx1-ubyte",
}
_DIGITS_TRAIN = 1437


class DataError(ValueError):
  """A data folder or file is missing or is not what the loader expects."""


class Images(NamedTuple):
  """A classification data set: flattened float32 images in [0, 1] and int32 labels."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  name: str


def data_dir(root: str | Path | None = None) -> Path:
  """The shared data folder: `$OPTAX_ADADELTA_DATA`, else `shared/data` beside `root`.

  Args:
    root: the repository root (default: the current directory).
  """
  if os.environ.get(ENV_VAR):
    return Path(os.environ[ENV_VAR])
  root = Path(root) if root is not None else Path.cwd()
  return root.resolve().parent / "shared" / "data"


def load_digits() -> Images:
  """The UCI optical digits (8×8, 1797 images) embedded in the package; CC BY 4.0."""
  with resources.files("optax_adadelta.demo").joinpath("data/digits.npz").open("rb") as f:
    arrays = np.load(f)
    x, y = arrays["x"], arrays["y"]
  x = x.reshape(len(x), -1).astype(np.float32) / 16.0
  y = y.astype(np.int32)
  n = _DIGITS_TRAIN
  return Images(x[:n], y[:n], x[n:], y[n:], "UCI optical digits (8x8)")


def load_mnist(directory: str | Path) -> Images:
  """MNIST from `directory`: the four IDX files (gzipped or not) or two/one npz files.

  Accepted layouts, looked for in `directory` and then in `directory/mnist`:
  `train-images-idx3-ubyte[.gz]` and the other three IDX files (a `.` in place of the
  `-` before `idx` is accepted too); `mnist_train.npz` and `mnist_test.npz` with `x`
  (N, 28, 28) and `y` (N,); or one `mnist.npz` with `x_train`, `y_train`, `x_test`, `y_test`.
  """
  directory = Path(directory)
  if not directory.is_dir():
    raise DataError(f"--data {str(directory)!r}: no such folder")
  for folder in (directory, directory / "mnist"):
    arrays = _find_mnist(folder)
    if arrays is not None:
      return _as_images(arrays, f"MNIST ({folder})")
  raise DataError(
    f"--data {str(directory)!r}: no MNIST files found; want the four IDX files "
    f"({', '.join(_MNIST_IDX.values())}, optionally .gz), or mnist_train.npz and "
    "mnist_test.npz, or mnist.npz"
  )


def _find_mnist(folder: Path) -> dict[str, np.ndarray] | None:
  if not folder.is_dir():
    return None
  idx = {key: _find_idx(folder, stem) for key, stem in _MNIST_IDX.items()}
  if all(idx.values()):
    return {key: _read_idx(path) for key, path in idx.items() if path is not None}
  if any(idx.values()):
    missing = [_MNIST_IDX[key] for key, path in idx.items() if path is None]
    raise DataError(f"{folder}: MNIST IDX files missing: {', '.join(missing)}")
  pair = folder / "mnist_train.npz", folder / "mnist_test.npz"
  if pair[0].is_file() or pair[1].is_file():
    train, test = (_read_npz(path, ("x", "y")) for path in pair)
    return {"x_train": train["x"], "y_train": train["y"], "x_test": test["x"], "y_test": test["y"]}
  if (folder / "mnist.npz").is_file():
    return _read_npz(folder / "mnist.npz", ("x_train", "y_train", "x_test", "y_test"))
  return None


def _find_idx(folder: Path, stem: str) -> Path | None:
  dotted = stem.replace("-idx", ".idx")
  for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
    if (folder / name).is_file():
      return folder / name
  return None


def _read_idx(path: Path) -> np.ndarray:
  try:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
  except (OSError, EOFError, zlib.error) as error:
    raise DataError(f"{path}: not a readable gzip file ({error})") from error
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE:
    raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number {raw[:4].hex()})")
  ndim = raw[3]
  header = 4 + 4 * ndim
  shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  if len(raw) != header + int(np.prod(shape)):
    raise DataError(
      f"{path}: truncated or padded; header says shape {shape} "
      f"({header + int(np.prod(shape))} bytes), file has {len(raw)} bytes"
    )
  return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
  if not path.is_file():
    raise DataError(f"{path}: no such file")
  try:
    with np.load(path) as arrays:
      missing = [key for key in keys if key not in arrays]
      if missing:
        raise DataError(f"{path}: missing arrays {missing}; it has {sorted(arrays.files)}")
      return {key: arrays[key] for key in keys}
  except DataError:
    raise
  except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as error:
    raise DataError(f"{path}: not a readable npz file ({error})") from error


def _as_images(arrays: dict[str, np.ndarray], name: str) -> Images:
  out = []
  for split in ("train", "test"):
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.ndim != 3 or y.ndim != 1:
      raise DataError(
        f"{name}: {split} images must have shape (N, height, width) and labels (N,); "
        f"got {x.shape} and {y.shape}"
      )
    if len(x) != len(y):
      raise DataError(f"{name}: {len(x)} {split} images but {len(y)} labels")
    if y.size and (y.min() < 0 or y.max() > 9):
      raise DataError(f"{name}: {split} labels must be in 0..9, got {y.min()}..{y.max()}")
    out += [x.reshape(len(x), -1).astype(np.float32) / 255.0, y.astype(np.int32)]
  if out[0].shape[1] != out[2].shape[1]:
    raise DataError(f"{name}: train images are {out[0].shape[1]} pixels, test {out[2].shape[1]}")
  x_train, y_train, x_test, y_test = out
  return Images(x_train, y_train, x_test, y_test, name)


def load_airfoil(directory: str | Path | None = None, rows: int = 1500) -> tuple[np.ndarray, ...]:
  """The airfoil self-noise data as "Dive into Deep Learning" uses it.

  Every column standardised over all 1503 rows, then the first `rows` rows.

  Returns:
    `(features, target)`: float32 arrays of shapes (rows, 5) and (rows,).
  """
  directory = Path(directory) if directory is not None else data_dir()
  path = directory / "airfoil" / "airfoil_self_noise.dat"
  if not path.is_file():
    raise DataError(
      f"airfoil data not found at {path}; set {ENV_VAR} to the folder that holds "
      "airfoil/airfoil_self_noise.dat"
    )
  data = np.genfromtxt(path, dtype=np.float32, delimiter="\t")
  if data.ndim != 2 or data.shape[1] != 6 or not np.isfinite(data).all():
    raise DataError(f"{path} is not the airfoil data (want 6 numeric tab-separated columns)")
  data = (data - data.mean(axis=0)) / data.std(axis=0)
  return data[:rows, :-1], data[:rows, -1]
