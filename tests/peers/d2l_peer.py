"""The Adadelta of "Dive into Deep Learning" §12.9, written in PyTorch from the book's text.

The book defines its optimizer inline (it is not in the `d2l` package), so the peer is this
transcription of its listing: s ← ρs + (1−ρ)g²; g' ← √(Δ+ε)/√(s+ε)·g; p ← p − g';
Δ ← ρΔ + (1−ρ)g'², in float32 tensors with ε = 1e-5 and ρ = 0.9 by default.
"""

from __future__ import annotations

import torch

from tests import parity_cases


def run(case: parity_cases.Case) -> dict[str, list]:
  params0, grads = parity_cases.inputs(case)
  rho = case["kwargs"].get("rho", 0.9)
  eps = case["kwargs"].get("eps", 1e-5)
  params = [torch.from_numpy(p.copy()) for p in params0]
  states = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
  record: dict[str, list] = {"params": [], "e_g2": [], "e_dx2": []}
  with torch.no_grad():
    for step_grads in grads:
      for p, (s, delta), g in zip(params, states, step_grads, strict=True):
        grad = torch.from_numpy(g.copy())
        s[:] = rho * s + (1 - rho) * torch.square(grad)
        scaled = (torch.sqrt(delta + eps) / torch.sqrt(s + eps)) * grad
        p[:] -= scaled
        delta[:] = rho * delta + (1 - rho) * scaled * scaled
      record["params"].append([p.numpy().copy() for p in params])
      record["e_g2"].append([s.numpy().copy() for s, _ in states])
      record["e_dx2"].append([d.numpy().copy() for _, d in states])
  return record


def version() -> str:
  return f"d2l §12.9 listing in torch {torch.__version__}"
