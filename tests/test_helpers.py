"""tests/helpers.py's ulp distance, on values whose distance np.nextafter gives."""

import ml_dtypes
import numpy as np
import pytest

from tests.helpers import ulps, worst_ulps


def _steps_from(x, n, toward):
  for _ in range(n):
    x = np.nextafter(x, toward)
  return x


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("start", [1.0, 3.0, 1e-3, -7.5, 0.0])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_n_representable_steps_within_a_binade_are_n_ulps(dtype, start, n):
  x = dtype(start)
  y = _steps_from(x, n, dtype(np.inf) if start >= 0 else dtype(-np.inf))
  assert ulps(x, y) == n and ulps(y, x) == n


def test_a_difference_across_a_power_of_two_counts_the_finer_spacing():
  one = np.float32(1.0)
  below = _steps_from(one, 2, np.float32(0))  # spacing 2**-24 below 1, 2**-23 above
  above = _steps_from(one, 1, np.float32(2))
  assert ulps(one, below) == 2 and ulps(below, one) == 2
  assert ulps(below, above) == 4  # 2·2**-24 + 2**-23, in units of 2**-24


def test_nan_and_infinities():
  nan, inf = np.float32(np.nan), np.float32(np.inf)
  got = np.array([nan, nan, inf, inf, -inf, 1.0], np.float32)
  want = np.array([nan, 1.0, inf, 1.0, inf, nan], np.float32)
  np.testing.assert_array_equal(ulps(got, want), [0, np.inf, 0, np.inf, np.inf, np.inf])


def test_bfloat16_counts_its_own_spacing_and_complex_the_worse_part():
  b = np.array([1.0, 1.0078125, 256.0], ml_dtypes.bfloat16)  # 1 + 2**-7: one bfloat16 ulp
  np.testing.assert_array_equal(ulps(b[:1], b[1:2]), [1.0])
  assert float(ulps(b[:1].astype(np.float32), b[1:2].astype(np.float32))[0]) == 2**16
  z = np.complex64(1 + 1j)
  w = np.complex64(complex(1, _steps_from(np.float32(1), 3, np.float32(2))))
  assert ulps(z, w) == 3


def test_worst_ulps_over_a_tree_checks_the_other_leaves_exactly():
  one = np.float32(1.0)
  got = {"w": np.array([one, _steps_from(one, 3, np.float32(2))]), "count": np.int32(4)}
  want = {"w": np.array([one, one]), "count": np.int32(4)}
  assert worst_ulps(got, want) == 3
  with pytest.raises(AssertionError):
    worst_ulps({**got, "count": np.int32(5)}, want)
  with pytest.raises(AssertionError):
    worst_ulps({**got, "w": got["w"].astype(np.float64)}, want)
  got["w"][0] = np.nan  # a NaN on one side is never "0 ulps", whatever its position
  assert worst_ulps(got, want) == np.inf


def test_arrays_of_different_dtypes_are_refused():
  with pytest.raises(TypeError, match=r"float32.*float64"):
    ulps(np.float32(1), np.float64(1))
