"""`python -m optax_adadelta` trains, reports, plots, and fails clearly on bad input."""

import re
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


def _option_help(capsys, monkeypatch) -> dict[str, str]:
  """`--help`'s text for each option, keyed by the option, on one wide terminal."""
  monkeypatch.setenv("COLUMNS", "200")
  with pytest.raises(SystemExit):
    cli.parse_args(["--help"])
  options = capsys.readouterr().out.split("options:\n", 1)[1]
  entries: dict[str, str] = {}
  for line in options.splitlines():
    if line.startswith("  -"):  # a new option; its help may follow on the same line
      invocation, _, text = line.strip().partition("  ")
      key = re.findall(r"--[\w-]+", invocation)[0]
      entries[key] = text.strip()
    elif line.strip():
      entries[key] = f"{entries[key]} {line.strip()}".strip()
  return entries


def test_help_describes_every_option_and_says_each_default_once(capsys, monkeypatch):
  entries = _option_help(capsys, monkeypatch)
  assert set(entries) == {
    "--help", "--data", "--epochs", "--lr", "--adadelta-lr", "--rho", "--eps", "--batch-size",
    "--activation", "--optimizers", "--seed", "--plot", "--no-progress",
  }  # fmt: skip
  undescribed = [option for option, text in entries.items() if not text]
  assert not undescribed
  assert all(text.count("default") <= 1 for text in entries.values()), entries
  assert not [option for option, text in entries.items() if "None" in text], entries
  assert "20" in entries["--epochs"] and "6" in entries["--epochs"]
  assert "(default: 100)" in entries["--batch-size"]
  assert "(default: tanh)" in entries["--activation"]
  assert "(default: 0)" in entries["--seed"]


def test_help_of_plot_names_both_panels_that_plot_draws(capsys, monkeypatch):
  text = _option_help(capsys, monkeypatch)["--plot"]
  assert "training loss" in text and "test error" in text
