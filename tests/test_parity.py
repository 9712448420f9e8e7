"""Each preset follows its peer library step for step (params, E[g²], E[Δx²], EMA).

Two comparisons per case: with the golden record of the peer (tests/golden, recorded by
tests/golden/record.py), which runs everywhere, and with the live peer when it is
installed (CI installs all of them and sets OPTAX_ADADELTA_REQUIRE_PEERS=1). Each checks
the recorded values and, separately, the parameters' steps x_{t+1} − x_t relative to their
own size (`parity.assert_follows`).
"""

from __future__ import annotations

import pytest

from tests import parity, parity_cases

CASE_IDS = [c["name"] for c in parity_cases.CASES]
# Keras, TF.js and TF1 at their default learning rate, 1e-3: steps of ~1e-6 of |x|.
SMALL_STEP_CASES = [
  c
  for c in parity_cases.CASES
  if c["peer"] in ("keras", "tfjs", "tf1") and "learning_rate" not in c["kwargs"]
]


@pytest.fixture(scope="module")
def ours_cache():
  return {}


def _ours(case, cache):
  if case["name"] not in cache:
    cache[case["name"]] = parity.run_ours(case)
  return cache[case["name"]]


def _golden(case):
  golden = parity.load_golden(case["peer"])["cases"][case["name"]]
  assert golden["inputs_sha256"] == parity.inputs_digest(case), "inputs drifted: re-record"
  return parity.decode(golden["record"], case)


@pytest.mark.parametrize("case", parity_cases.CASES, ids=CASE_IDS)
def test_preset_matches_the_golden_peer_record(case, ours_cache):
  parity.assert_follows(case, _ours(case, ours_cache), _golden(case))


@pytest.mark.parametrize("case", parity_cases.CASES, ids=CASE_IDS)
def test_preset_matches_the_live_peer(case, ours_cache):
  peer = parity.live_peer(case["peer"])
  parity.assert_follows(case, _ours(case, ours_cache), peer.run(case))


@pytest.mark.parametrize("case", SMALL_STEP_CASES, ids=lambda c: c["name"])
def test_a_step_ten_percent_too_long_at_the_default_learning_rate_is_rejected(case):
  theirs = _golden(case)
  faulty = parity.run_ours(case, step_error=0.1)
  error, where = parity.worst_step_error(faulty, theirs, parity_cases.inputs(case)[0])
  assert error > 0.05, (error, where)  # the 10 %, not a rounding effect
  with pytest.raises(AssertionError, match="relative"):
    parity.assert_follows(case, faulty, theirs)


def test_the_value_check_alone_passes_a_step_ten_percent_too_long_in_tf1s_defaults():
  """Why the steps are compared on their own: relative to max|x|, the values barely move."""
  (case,) = [c for c in parity_cases.CASES if c["name"] == "tf1-defaults"]
  error, _ = parity.worst_relative_error(parity.run_ours(case, step_error=0.1), _golden(case))
  assert error <= parity.TOLERANCE
