"""`python -m optax_adadelta` trains, reports, plots, and fails clearly on bad input."""

import subprocess
import sys

import numpy as np
import pytest

from optax_adadelta.demo import cli


def test_demo_trains_every_optimizer_and_writes_the_table_and_plot(tmp_path, capsys):
  plot = tmp_path / "out.png"
  assert cli.main(["--epochs", "3", "--no-progress", "--plot", str(plot)]) == 0
  out = capsys.readouterr().out
  rows = {line.split()[0]: line.split() for line in out.splitlines() if line.endswith("s")}
  assert set(cli.OPTIMIZERS) <= set(rows)
  # On the 8x8 digits three epochs take every method well below chance (90 % error).
  errors = {name: float(rows[name][3].rstrip("%")) for name in cli.OPTIMIZERS}
  assert all(0 <= error < 50 for error in errors.values()), errors
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_reads_mnist_from_a_data_folder(tmp_path, capsys):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (300, 28, 28), dtype=np.uint8)
  y = rng.integers(0, 10, 300, dtype=np.uint8)
  np.savez(tmp_path / "mnist.npz", x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
  args = ["--data", str(tmp_path), "--epochs", "1", "--optimizers", "sgd", "--no-progress"]
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert "200 train / 100 test images; MLP 784-500-300-10" in out


def test_module_entry_point_reports_a_missing_data_folder(tmp_path):
  missing = tmp_path / "nowhere"
  result = subprocess.run(
    [sys.executable, "-m", "optax_adadelta", "--data", str(missing)],
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 2
  assert f"--data {str(missing)!r}: no such folder" in result.stderr


@pytest.mark.parametrize(
  ("argv", "message"),
  [
    (["--optimizers", "adam"], "unknown ['adam']"),
    (["--lr", "-1"], "must be > 0, got -1"),
    (["--activation", "sigmoid"], "invalid choice: 'sigmoid'"),
  ],
)
def test_bad_arguments_are_rejected_with_the_allowed_values(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_out_of_range_adadelta_hyperparameter_is_reported_before_training(capsys):
  assert cli.main(["--rho", "1.5", "--no-progress"]) == 2
  assert "rho must be finite and in [0, 1]" in capsys.readouterr().err


def test_batch_larger_than_the_data_is_an_error(capsys):
  assert cli.main(["--batch-size", "5000", "--no-progress"]) == 2
  assert "--batch-size 5000 is larger than the 1437 training images" in capsys.readouterr().err


def test_console_script_help_lists_the_options():
  result = subprocess.run(
    [sys.executable, "-m", "optax_adadelta", "--help"], capture_output=True, text=True, check=True
  )
  assert result.stdout.startswith("usage: optax-adadelta")
  assert "--no-progress" in result.stdout


@pytest.mark.parametrize(
  ("argv", "message"),
  [
    ([], "progress bars (or pass --no-progress) needs tqdm"),
    (["--no-progress", "--plot", "x.png"], "--plot needs matplotlib"),
  ],
)
def test_a_missing_demo_extra_is_named_with_the_install_command(argv, message, capsys, monkeypatch):
  monkeypatch.setattr(cli, "find_spec", lambda name: None)
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert message in err
  assert 'pip install "optax-adadelta[demo]"' in err


def test_importing_the_package_loads_neither_the_demo_nor_its_extras():
  code = (
    "import sys, optax_adadelta; "
    "print(sorted(m for m in ('tqdm', 'matplotlib', 'optax_adadelta.demo') if m in sys.modules))"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert result.stdout.strip() == "[]"
