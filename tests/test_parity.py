"""Each preset follows its peer library step for step (params, E[g²], E[Δx²], EMA).

Two comparisons per case: with the golden record of the peer (tests/golden, recorded by
tests/golden/record.py), which runs everywhere, and with the live peer when it is
installed (CI installs all of them and sets OPTAX_ADADELTA_REQUIRE_PEERS=1).
"""

from __future__ import annotations

import pytest

from tests import parity, parity_cases

# float32 throughout. The presets follow each peer's order of operations; what remains is
# 1-ulp differences (fused multiply-adds in the peers' kernels, pow in schedules), which
# stay at the 1e-6 level over 40 steps. See the closing table in docs/peers.md.
TOLERANCE = 2e-6

CASE_IDS = [c["name"] for c in parity_cases.CASES]


@pytest.fixture(scope="module")
def ours_cache():
  return {}


def _ours(case, cache):
  if case["name"] not in cache:
    cache[case["name"]] = parity.run_ours(case)
  return cache[case["name"]]


@pytest.mark.parametrize("case", parity_cases.CASES, ids=CASE_IDS)
def test_preset_matches_the_golden_peer_record(case, ours_cache):
  golden = parity.load_golden(case["peer"])["cases"][case["name"]]
  assert golden["inputs_sha256"] == parity.inputs_digest(case), "inputs drifted: re-record"
  theirs = parity.decode(golden["record"], case)
  error, where = parity.worst_relative_error(_ours(case, ours_cache), theirs)
  assert error <= TOLERANCE, f"{case['name']}: relative error {error:.2e} in {where}"


@pytest.mark.parametrize("case", parity_cases.CASES, ids=CASE_IDS)
def test_preset_matches_the_live_peer(case, ours_cache):
  peer = parity.live_peer(case["peer"])
  error, where = parity.worst_relative_error(_ours(case, ours_cache), peer.run(case))
  assert error <= TOLERANCE, f"{case['name']}: relative error {error:.2e} in {where}"
