"""The data loaders read MNIST in every accepted layout and reject bad folders and files."""

import gzip
import struct

import numpy as np
import pytest

from optax_adadelta.demo import datasets

NAMES = {
  "train-images-idx3-ubyte": "x_train",
  "train-labels-idx1-ubyte": "y_train",
  "t10k-images-idx3-ubyte": "x_test",
  "t10k-labels-idx1-ubyte": "y_test",
}


def fake_mnist(rng, n_train=7, n_test=5):
  return {
    "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
    "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
    "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
    "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
  }


def idx_bytes(array):
  """The IDX format written out by hand: 0, 0, type 0x08, ndim, big-endian sizes, data."""
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
  return header + array.tobytes()


def write_idx(folder, arrays, gzipped, dotted=False):
  for stem, key in NAMES.items():
    name = stem.replace("-idx", ".idx") if dotted else stem
    data = idx_bytes(arrays[key])
    if gzipped:
      (folder / (name + ".gz")).write_bytes(gzip.compress(data))
    else:
      (folder / name).write_bytes(data)


def assert_loaded(images, arrays):
  for key in NAMES.values():
    want = arrays[key]
    if key.startswith("x"):
      want = want.reshape(len(want), -1).astype(np.float64) / 255
    np.testing.assert_allclose(getattr(images, key), want, rtol=1e-6)


@pytest.mark.parametrize(("gzipped", "dotted"), [(True, False), (False, False), (True, True)])
def test_load_mnist_reads_idx_files_gzipped_or_not(tmp_path, gzipped, dotted):
  arrays = fake_mnist(np.random.default_rng(0))
  write_idx(tmp_path, arrays, gzipped, dotted)
  assert_loaded(datasets.load_mnist(tmp_path), arrays)


def test_load_mnist_reads_npz_pair_and_single_npz(tmp_path):
  arrays = fake_mnist(np.random.default_rng(1))
  (tmp_path / "pair" / "mnist").mkdir(parents=True)
  np.savez(tmp_path / "pair/mnist/mnist_train.npz", x=arrays["x_train"], y=arrays["y_train"])
  np.savez(tmp_path / "pair/mnist/mnist_test.npz", x=arrays["x_test"], y=arrays["y_test"])
  assert_loaded(datasets.load_mnist(tmp_path / "pair"), arrays)  # finds the mnist/ subfolder
  (tmp_path / "single").mkdir()
  np.savez(tmp_path / "single/mnist.npz", **arrays)
  assert_loaded(datasets.load_mnist(tmp_path / "single"), arrays)


def test_load_mnist_rejects_a_missing_folder(tmp_path):
  with pytest.raises(datasets.DataError, match="no such folder"):
    datasets.load_mnist(tmp_path / "nowhere")


def test_load_mnist_rejects_a_folder_without_mnist(tmp_path):
  with pytest.raises(datasets.DataError, match="no MNIST files found"):
    datasets.load_mnist(tmp_path)


def test_load_mnist_names_missing_idx_files(tmp_path):
  write_idx(tmp_path, fake_mnist(np.random.default_rng(2)), gzipped=True)
  (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(datasets.DataError, match="missing: t10k-labels-idx1-ubyte"):
    datasets.load_mnist(tmp_path)


def test_load_mnist_rejects_truncated_gzip(tmp_path):
  write_idx(tmp_path, fake_mnist(np.random.default_rng(3)), gzipped=True)
  path = tmp_path / "train-images-idx3-ubyte.gz"
  path.write_bytes(path.read_bytes()[:-20])
  with pytest.raises(datasets.DataError, match="not a readable gzip file"):
    datasets.load_mnist(tmp_path)


def test_load_mnist_rejects_idx_shorter_than_its_header_says(tmp_path):
  write_idx(tmp_path, fake_mnist(np.random.default_rng(4)), gzipped=False)
  path = tmp_path / "t10k-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-1])
  with pytest.raises(
    datasets.DataError, match=r"truncated or padded; header says shape \(5, 28, 28\)"
  ):
    datasets.load_mnist(tmp_path)


def test_load_mnist_rejects_bad_magic_number(tmp_path):
  write_idx(tmp_path, fake_mnist(np.random.default_rng(5)), gzipped=False)
  (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x1f\x8b\x08\x00garbage")
  with pytest.raises(datasets.DataError, match="bad magic number"):
    datasets.load_mnist(tmp_path)


def test_load_mnist_rejects_label_image_count_mismatch(tmp_path):
  arrays = fake_mnist(np.random.default_rng(6))
  arrays["y_train"] = arrays["y_train"][:-1]
  write_idx(tmp_path, arrays, gzipped=True)
  with pytest.raises(datasets.DataError, match="7 train images but 6 labels"):
    datasets.load_mnist(tmp_path)


@pytest.mark.parametrize(
  ("x_shape", "y_shape"), [((7, 784), (7,)), ((7, 28, 28), (7, 1)), ((7, 28, 28, 1), (7,))]
)
def test_load_mnist_rejects_wrong_shapes(tmp_path, x_shape, y_shape):
  np.savez(tmp_path / "mnist_train.npz", x=np.zeros(x_shape, np.uint8), y=np.zeros(y_shape))
  np.savez(tmp_path / "mnist_test.npz", x=np.zeros((2, 28, 28), np.uint8), y=np.zeros(2))
  with pytest.raises(datasets.DataError, match=r"must have shape \(N, height, width\)"):
    datasets.load_mnist(tmp_path)


def test_load_mnist_names_missing_npz_arrays_and_files(tmp_path):
  np.savez(tmp_path / "mnist_train.npz", images=np.zeros((2, 28, 28), np.uint8))
  with pytest.raises(datasets.DataError, match=r"missing arrays \['x', 'y'\]"):
    datasets.load_mnist(tmp_path)
  np.savez(tmp_path / "mnist_train.npz", x=np.zeros((2, 28, 28), np.uint8), y=np.zeros(2))
  with pytest.raises(datasets.DataError, match=r"mnist_test\.npz: no such file"):
    datasets.load_mnist(tmp_path)


def test_load_mnist_rejects_a_corrupt_npz(tmp_path):
  (tmp_path / "mnist.npz").write_bytes(b"PK\x03\x04 not really a zip")
  with pytest.raises(datasets.DataError, match="not a readable npz file"):
    datasets.load_mnist(tmp_path)


def test_load_digits_gives_the_embedded_uci_digits():
  digits = datasets.load_digits()
  assert digits.x_train.shape == (1437, 64) and digits.x_test.shape == (360, 64)
  labels = np.concatenate([digits.y_train, digits.y_test])
  # UCI optical digits, test part: the class counts published with the data set.
  np.testing.assert_array_equal(
    np.bincount(labels), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
  )
  assert digits.x_train.min() >= 0 and digits.x_train.max() == 1.0


def test_data_dir_prefers_the_environment_variable(tmp_path, monkeypatch):
  monkeypatch.setenv(datasets.ENV_VAR, str(tmp_path))
  assert datasets.data_dir() == tmp_path
  monkeypatch.delenv(datasets.ENV_VAR)
  assert datasets.data_dir(tmp_path / "repo") == tmp_path / "shared" / "data"
