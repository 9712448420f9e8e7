"""Random problems and hyper-parameters, each preset against its live peer (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import parity, parity_cases

shapes = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=2), min_size=1, max_size=3)


def _check(case):
  """Values and steps, with the tolerances of test_parity.py."""
  peer = parity.live_peer(case["peer"])
  parity.assert_follows(case, parity.run_ours(case), peer.run(case))


@settings(max_examples=12)
@given(
  shapes=shapes,
  seed=st.integers(0, 2**31),
  rho=st.floats(0.5, 0.999),
  eps=st.sampled_from([1e-8, 1e-6, 1e-4]),
  lr=st.sampled_from([1.0, 0.3]),
  weight_decay=st.sampled_from([0.0, 0.05]),
  maximize=st.booleans(),
  complex_=st.booleans(),
  grad_scale=st.sampled_from([1e-3, 1.0, 30.0]),
)
def test_pytorch_preset_follows_torch_on_random_problems(
  shapes, seed, rho, eps, lr, weight_decay, maximize, complex_, grad_scale
):
  kwargs = {"lr": lr, "rho": rho, "eps": eps, "weight_decay": weight_decay, "maximize": maximize}
  _check(
    parity_cases._case(
      "random",
      "torch",
      kwargs,
      shapes=shapes,
      seed=seed,
      complex=complex_,
      grad_scale=grad_scale,
      steps=25,
    )
  )


@pytest.mark.slow
@settings(max_examples=12)
@given(
  shapes=shapes,
  seed=st.integers(0, 2**31),
  rho=st.floats(0.5, 0.999),
  clip=st.sampled_from([{}, {"clipnorm": 0.5}, {"global_clipnorm": 1.0}, {"clipvalue": 0.2}]),
  ema=st.sampled_from([{}, {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 4}]),
  accumulation=st.sampled_from([None, 2, 3]),
  weight_decay=st.sampled_from([None, 0.01]),
)
def test_keras_preset_follows_keras_on_random_problems(
  shapes, seed, rho, clip, ema, accumulation, weight_decay
):
  kwargs = {"learning_rate": 1.0, "rho": rho, "weight_decay": weight_decay, **clip, **ema}
  if accumulation:
    kwargs["gradient_accumulation_steps"] = accumulation
  _check(parity_cases._case("random", "keras", kwargs, shapes=shapes, seed=seed, steps=24))
