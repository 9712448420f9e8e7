"""Records each peer's trajectories on the parity cases into tests/golden/<peer>.json.

Run from the repository root with the peers installed (see README, "Parity with other
libraries"):  python -m tests.golden.record [torch keras tfjs tf1 d2l]
"""

from __future__ import annotations

import importlib
import json
import sys

from tests import parity, parity_cases

PEER_MODULES = {p: f"tests.peers.{p}_peer" for p in ("torch", "keras", "tfjs", "tf1", "d2l")}


def record(peer: str) -> None:
  module = importlib.import_module(PEER_MODULES[peer])
  cases = [c for c in parity_cases.CASES if c["peer"] == peer]
  golden = {
    "peer": module.version(),
    "cases": {
      c["name"]: {"inputs_sha256": parity.inputs_digest(c), "record": parity.encode(module.run(c))}
      for c in cases
    },
  }
  path = parity.GOLDEN / f"{peer}.json"
  path.write_text(json.dumps(golden, separators=(",", ":")) + "\n")
  print(f"{path}: {len(cases)} cases from {golden['peer']}")


if __name__ == "__main__":
  for peer in sys.argv[1:] or PEER_MODULES:
    record(peer)
