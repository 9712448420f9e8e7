"""Presets: the peers' defaults and errors, the documented differences, Keras's zero clips,
a weight-decay mask given as a function, and the Keras pieces (params_ema, clip_by_leaf_norm,
finalize) with any optax optimizer against NumPy."""

from __future__ import annotations

import inspect
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_adadelta
from optax_adadelta import presets
from tests import parity, parity_cases, reference

# Defaults ------------------------------------------------------------------------------

DOCUMENTED_DEFAULTS = {
  presets.pytorch: {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0, "maximize": False},
  presets.keras: {"learning_rate": 0.001, "rho": 0.95, "epsilon": 1e-7, "weight_decay": None},
  presets.tfjs: {"learning_rate": 0.001, "rho": 0.95, "epsilon": None},
  presets.tf1: {"learning_rate": 0.001, "rho": 0.95, "epsilon": 1e-8},
  presets.d2l: {"rho": 0.9, "eps": 1e-5},
}


def _defaults(fn) -> dict:
  return {
    name: p.default
    for name, p in inspect.signature(fn).parameters.items()
    if p.default is not inspect.Parameter.empty
  }


@pytest.mark.parametrize("preset", DOCUMENTED_DEFAULTS, ids=lambda f: f.__name__)
def test_preset_defaults_are_the_documented_ones(preset):
  defaults = _defaults(preset)
  for name, value in DOCUMENTED_DEFAULTS[preset].items():
    assert defaults[name] == value, name


def test_pytorch_preset_has_torch_optim_adadeltas_defaults():
  parity.live_peer("torch")
  import torch

  theirs = _defaults(torch.optim.Adadelta)
  for name, value in _defaults(presets.pytorch).items():
    assert theirs[name] == value, name


def test_keras_preset_has_keras_adadeltas_arguments_and_defaults():
  parity.live_peer("keras")
  import keras

  theirs = _defaults(keras.optimizers.Adadelta)
  ours = _defaults(presets.keras)
  # Keras's optimizer.exclude_from_weight_decay(var_names=...) is a keyword here.
  assert set(ours) - {"exclude_from_weight_decay"} == set(theirs) - {"name"}
  for name, value in ours.items():
    if name != "exclude_from_weight_decay":
      assert theirs[name] == value, name


def test_paper_preset_is_algorithm_1():
  assert _defaults(optax_adadelta.adadelta)["learning_rate"] == 1.0
  params, grads = parity_cases.inputs(parity_cases._case("paper", "paper", steps=5))
  tx = presets.paper()
  state = tx.init([jnp.asarray(p) for p in params])
  ref = _reference(params, grads, rho=0.95, eps=1e-6)
  p = [jnp.asarray(x) for x in params]
  for g in grads:
    updates, state = tx.update([jnp.asarray(x) for x in g], state)
    p = optax.apply_updates(p, updates)
  for got, want in zip(p, ref, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _reference(params, grads, rho, eps, lr=1.0):
  return reference.run(params, grads, learning_rate=lr, rho=rho, eps=eps).params


# Documented differences ----------------------------------------------------------------


def test_tfjs_first_step_is_the_plain_gradient_step():
  """TF.js divides by the previous E[g²] (0 at step 1): its first step is exactly −η·g."""
  case = next(c for c in parity_cases.CASES if c["name"] == "tfjs-paper-hyper")
  golden = parity.decode(parity.load_golden("tfjs")["cases"][case["name"]]["record"], case)
  params, grads = parity_cases.inputs(case)
  for after, p, g in zip(golden["params"][0], params, grads[0], strict=True):
    np.testing.assert_array_equal(after, p - np.float32(1.0) * g)
  # The paper's first step with the same hyper-parameters is √ε/√((1−ρ)g²+ε)·g, far smaller.
  first_paper = _reference(params, grads[:1], rho=0.95, eps=1e-6)
  assert np.max(np.abs(first_paper[0] - params[0])) < 0.01 * np.max(np.abs(grads[0][0]))


def test_tfjs_preset_differs_from_the_paper_at_equal_hyper_parameters():
  case = next(c for c in parity_cases.CASES if c["name"] == "tfjs-paper-hyper")
  as_paper = dict(case, peer="d2l", kwargs={"rho": 0.95, "eps": 1e-6})
  error, _ = parity.worst_relative_error(parity.run_ours(case), parity.run_ours(as_paper))
  assert error > 0.1


def test_keras_decay_is_decoupled_and_pytorch_decay_is_coupled():
  params = [jnp.ones(3)]
  grads = [jnp.full(3, 0.5)]

  def first_update(tx):
    return tx.update(grads, tx.init(params), params)[0][0]

  # Keras: −η(Δx + λx); PyTorch: −ηΔx with g + λx inside Δx.
  keras_update = first_update(presets.keras(learning_rate=1.0, weight_decay=0.1, epsilon=1e-6))
  plain = first_update(presets.keras(learning_rate=1.0, epsilon=1e-6))
  np.testing.assert_allclose(keras_update, plain - 0.1, rtol=1e-6)
  coupled = first_update(presets.pytorch(rho=0.95, weight_decay=0.1))
  g = 0.6  # 0.5 + 0.1 · 1
  want = -np.sqrt(1e-6) / np.sqrt(0.05 * g**2 + 1e-6) * g
  np.testing.assert_allclose(coupled, want, rtol=1e-6)


# A clip of 0 -------------------------------------------------------------------------

# Keras 3.15 base_optimizer.py: `if self.clipnorm and self.clipnorm > 0` (likewise for
# global_clipnorm and clipvalue) clips, so 0 means no clipping; yet 0 `is not None`, so it
# still counts as set when the constructor refuses two clips at once.
ZERO_CLIPS = [{"clipnorm": 0.0}, {"global_clipnorm": 0.0}, {"clipvalue": 0.0}]


def _zero_clip_case(clip):
  # Gradients of ~3: clipnorm=0.5 or clipvalue=0.3 would change every step.
  return parity_cases._case(
    "keras-zero-clip", "keras", {"learning_rate": 1.0, **clip}, steps=8, grad_scale=3.0
  )


@pytest.mark.parametrize("clip", ZERO_CLIPS, ids=lambda c: ",".join(c))
def test_keras_preset_with_a_zero_clip_does_not_clip(clip):
  ours = parity.run_ours(_zero_clip_case(clip))
  unclipped = parity.run_ours(_zero_clip_case({}))
  clipped = parity.run_ours(_zero_clip_case({k: 0.3 for k in clip}))
  for key in ours:
    for got, want in zip(ours[key], unclipped[key], strict=True):
      for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=key)
  assert not np.array_equal(clipped["params"][0][0], ours["params"][0][0])  # 0.3 would clip


@pytest.mark.parametrize("clip", ZERO_CLIPS, ids=lambda c: ",".join(c))
def test_keras_preset_with_a_zero_clip_follows_live_keras(clip):
  peer = parity.live_peer("keras")
  case = _zero_clip_case(clip)
  parity.assert_follows(case, parity.run_ours(case), peer.run(case))


def test_a_zero_clipnorm_still_counts_as_set_with_another_clip_like_keras():
  parity.live_peer("keras")
  import keras

  kwargs = {"clipnorm": 0.0, "clipvalue": 0.3}
  with pytest.raises(ValueError) as theirs:
    keras.optimizers.Adadelta(**kwargs)
  with pytest.raises(ValueError) as ours:
    presets.keras(**kwargs)
  assert str(ours.value) == str(theirs.value)


# A weight-decay mask given as a function of the parameters -----------------------------


@pytest.mark.parametrize("decoupled", [False, True])
def test_weight_decay_mask_function_decays_only_the_leaves_it_selects(decoupled):
  """float64, so that g + λx (which can cancel) keeps the comparison tight."""
  rng = np.random.default_rng(11)
  names, shapes = ["b", "scale", "w"], [(3,), (3,), (4, 3)]  # sorted, as jax.tree.leaves
  params = [rng.normal(size=s) for s in shapes]
  grads = [[0.1 * rng.normal(size=s) for s in shapes] for _ in range(20)]
  hyper = {"learning_rate": 0.5, "weight_decay": 0.1, "decoupled": decoupled}
  with jax.enable_x64(True):
    tx = optax_adadelta.adadelta(
      hyper["learning_rate"],
      weight_decay=hyper["weight_decay"],
      weight_decay_mask=lambda tree: {k: v.ndim > 1 for k, v in tree.items()},  # matrices
      decoupled_weight_decay=decoupled,
    )
    x = dict(zip(names, map(jnp.asarray, params), strict=True))
    update, state = jax.jit(tx.update), tx.init(x)
    for g in grads:
      updates, state = update(dict(zip(names, map(jnp.asarray, g), strict=True)), state, x)
      x = optax.apply_updates(x, updates)
  want = reference.run(params, grads, **hyper, decay_mask=[False, False, True]).params
  decay_all = reference.run(params, grads, **hyper).params
  for name, expected, everywhere in zip(names, want, decay_all, strict=True):
    np.testing.assert_allclose(np.asarray(x[name]), expected, rtol=1e-10, atol=1e-12)
    if name != "w":  # where the mask says no, decay would have made a difference
      assert np.max(np.abs(expected - everywhere)) > 1e-3


# Keras's learning rates: a zero-argument callable ---------------------------------------


def _keras_problem(steps=6, seed=5):
  rng = np.random.default_rng(seed)
  shapes = {"kernel": (3, 2), "bias": (2,), "gamma": (2,)}
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  grads = [
    {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(steps)
  ]
  return params, grads


def _keras_trajectory(params, grads, exclude=None, **kwargs):
  """keras.optimizers.Adadelta on variables named as the dict's keys (Keras 3, JAX)."""
  import keras

  variables = {k: keras.Variable(v.copy(), name=k) for k, v in params.items()}
  optimizer = keras.optimizers.Adadelta(**kwargs)
  if exclude is not None:
    optimizer.exclude_from_weight_decay(var_names=exclude)
  names = list(params)
  out = []
  for g in grads:
    optimizer.apply([g[k].copy() for k in names], [variables[k] for k in names])
    out.append({k: np.asarray(variables[k].value) for k in names})
  return out


def _our_trajectory(tx, params, grads, jit=True):
  update = jax.jit(tx.update) if jit else tx.update
  x = {k: jnp.asarray(v) for k, v in params.items()}
  state, out = tx.init(x), []
  for g in grads:
    updates, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, x)
    x = optax.apply_updates(x, updates)
    out.append({k: np.asarray(v) for k, v in x.items()})
  return out


def _assert_same_trajectory(ours, theirs, rtol=2e-6):
  for t, (a, b) in enumerate(zip(ours, theirs, strict=True)):
    for k in b:
      scale = np.max(np.abs(b[k]))
      np.testing.assert_allclose(a[k], b[k], rtol=0, atol=rtol * scale, err_msg=f"step {t} {k}")


def test_keras_preset_takes_a_zero_argument_learning_rate_as_live_keras_does():
  parity.live_peer("keras")
  params, grads = _keras_problem()
  rate = lambda: 0.5  # Keras calls it with no arguments
  theirs = _keras_trajectory(params, grads, learning_rate=rate, weight_decay=0.1)
  ours = _our_trajectory(presets.keras(learning_rate=rate, weight_decay=0.1), params, grads)
  _assert_same_trajectory(ours, theirs)
  assert not np.allclose(theirs[-1]["kernel"], params["kernel"], atol=0.1)  # it moved


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_zero_argument_learning_rate_is_read_each_step_only_without_jit(jit):
  """As Keras: an eager optimizer.apply calls it on every step; a compiled step (jax.jit
  here, model.fit on JAX there) calls it once, while tracing."""
  params, grads = _keras_problem(steps=2)
  setting = {"rate": 0.5}
  tx = presets.keras(learning_rate=lambda: setting["rate"])
  update = jax.jit(tx.update) if jit else tx.update
  x = {k: jnp.asarray(v) for k, v in params.items()}
  state = tx.init(x)
  moved = []
  for g in grads:
    updates, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, x)
    moved.append(float(jnp.max(jnp.abs(updates["kernel"]))))
    setting["rate"] = 0.0
  assert moved[0] > 0
  assert (moved[1] > 0) == jit  # under jit the value read while tracing stays


# Keras's exclude_from_weight_decay ------------------------------------------------------


@pytest.mark.parametrize("exclude", [["bias"], ["bias", "gam+a"], ["ker"], []])
def test_keras_preset_excludes_variables_from_decay_as_live_keras(exclude):
  parity.live_peer("keras")
  params, grads = _keras_problem()
  kwargs = {"learning_rate": 1.0, "weight_decay": 0.2}
  theirs = _keras_trajectory(params, grads, exclude=exclude, **kwargs)
  ours = _our_trajectory(presets.keras(**kwargs, exclude_from_weight_decay=exclude), params, grads)
  _assert_same_trajectory(ours, theirs)
  everything = _keras_trajectory(params, grads, **kwargs)
  pattern = "|".join(exclude)
  for name in params:  # the exclusion made a difference exactly where a name matched
    excluded = bool(exclude) and re.search(pattern, name) is not None
    assert excluded == (np.max(np.abs(theirs[-1][name] - everything[-1][name])) > 1e-3), name


def test_exclude_from_weight_decay_matches_the_last_key_of_a_flax_nnx_path():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.LayerNorm(3, rngs=nnx.Rngs(0)))
  before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  tx = presets.keras(learning_rate=1.0, weight_decay=0.5, exclude_from_weight_decay=["bias"])
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  zero = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  optimizer.update(model, zero)  # zero gradients: only the decay moves anything
  after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for path, value in before.items():
    if path[-1] == "bias":
      np.testing.assert_array_equal(after[path], value)
    else:
      np.testing.assert_allclose(after[path], value * 0.5, rtol=1e-6)  # x − η·λ·x


@pytest.mark.parametrize(
  ("exclude", "error", "pattern"),
  [
    ("bias", TypeError, r"exclude_from_weight_decay must be a list of strings.*'bias'"),
    ([1], TypeError, r"exclude_from_weight_decay must be a list of strings"),
    (["bias("], ValueError, r"exclude_from_weight_decay=\['bias\('\] is not a valid"),
  ],
)
def test_exclude_from_weight_decay_rejects_what_is_not_a_list_of_patterns(exclude, error, pattern):
  with pytest.raises(error, match=pattern):
    presets.keras(weight_decay=0.1, exclude_from_weight_decay=exclude)


# Errors --------------------------------------------------------------------------------

KERAS_INVALID = [
  {"clipnorm": 1.0, "clipvalue": 1.0},
  {"clipnorm": 1.0, "global_clipnorm": 1.0},
  {"gradient_accumulation_steps": 1},
  {"use_ema": True, "ema_momentum": 1.5},
  {"use_ema": True, "ema_overwrite_frequency": 0.5},
  {"learning_rate": 1},
]


@pytest.mark.parametrize("kwargs", KERAS_INVALID, ids=lambda k: ",".join(k))
def test_keras_preset_raises_the_error_keras_raises(kwargs):
  with pytest.raises(ValueError) as ours:
    presets.keras(**kwargs)
  golden = json.loads((parity.GOLDEN / "keras_errors.json").read_text())
  assert str(ours.value) == golden[json.dumps(kwargs, sort_keys=True)]


@pytest.mark.parametrize("kwargs", KERAS_INVALID, ids=lambda k: ",".join(k))
def test_keras_preset_error_equals_live_keras(kwargs):
  parity.live_peer("keras")
  import keras

  with pytest.raises(ValueError) as theirs:
    keras.optimizers.Adadelta(**kwargs)
  with pytest.raises(ValueError) as ours:
    presets.keras(**kwargs)
  assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize(
  ("preset", "kwargs", "pattern"),
  [
    (presets.pytorch, {"lr": -1.0}, r"lr must be finite and in \[0, inf\)"),
    (presets.pytorch, {"rho": 1.5}, r"rho must be finite and in \[0, 1\]"),
    (presets.tfjs, {"epsilon": -1.0}, r"epsilon must be finite and in \(0, inf\)"),
    (presets.tf1, {"learning_rate": float("nan")}, r"learning_rate must be finite"),
    (presets.d2l, {"eps": 0.0}, r"eps must be finite and in \(0, inf\)"),
  ],
)
def test_presets_validate_with_the_peers_argument_names(preset, kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    preset(**kwargs)


# Keras pieces with any optax optimizer -------------------------------------------------


def _ema_reference(params, grads, lr, momentum, every, accumulation=1):
  """NumPy: SGD with Keras's EMA rule (momentum 0 on the first iteration, overwrite)."""
  x = np.asarray(params, np.float64)
  average = x.copy()
  for t, g in enumerate(grads):
    x = x - lr * np.asarray(g)
    k = t // accumulation
    m = 0.0 if k == 0 else momentum
    average = m * average + (1 - m) * x
    if every and (k + 1) % every == 0:
      x = average.copy()
  return x, average


@pytest.mark.parametrize("every", [None, 1, 4])
def test_params_ema_with_sgd_follows_the_keras_rule(every):
  rng = np.random.default_rng(0)
  params = jnp.asarray(rng.normal(size=5), jnp.float32)
  grads = rng.normal(size=(13, 5)).astype(np.float32)
  tx = optax.chain(optax.sgd(0.1), optax_adadelta.params_ema(0.9, every))
  state = tx.init(params)
  p = params
  for g in grads:
    updates, state = tx.update(jnp.asarray(g), state, p)
    p = optax.apply_updates(p, updates)
  want_x, want_average = _ema_reference(params, grads, 0.1, 0.9, every)
  np.testing.assert_allclose(p, want_x, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(optax_adadelta.finalize(p, state), want_average, rtol=1e-5, atol=1e-6)


def test_params_ema_counts_iterations_per_accumulation_cycle():
  rng = np.random.default_rng(1)
  params = jnp.zeros(3)
  grads = rng.normal(size=(12, 3)).astype(np.float32)
  tx = optax.chain(
    optax.MultiSteps(optax.sgd(0.1), every_k_schedule=3).gradient_transformation(),
    optax_adadelta.params_ema(0.8, accumulation_steps=3),
  )
  state = tx.init(params)
  p, averages = params, []
  for g in grads:
    updates, state = tx.update(jnp.asarray(g), state, p)
    p = optax.apply_updates(p, updates)
    averages.append(np.asarray(optax.tree.get(state, "ema")))
  # First cycle (3 calls): momentum 0, the average is the parameters themselves.
  np.testing.assert_allclose(averages[0], np.zeros(3))
  step = -0.1 * grads[:3].mean(axis=0)
  np.testing.assert_allclose(averages[2], step, rtol=1e-5)
  np.testing.assert_allclose(averages[3], 0.8 * step + 0.2 * step, rtol=1e-5)


def test_finalize_without_an_ema_returns_params_unchanged():
  params = {"w": jnp.ones(2)}
  assert optax_adadelta.finalize(params, optax.adam(1e-3).init(params)) is params


def test_finalize_rejects_two_averages():
  tx = optax.chain(optax_adadelta.params_ema(), optax_adadelta.params_ema())
  with pytest.raises(ValueError, match="holds 2 parameter averages"):
    optax_adadelta.finalize(jnp.ones(2), tx.init(jnp.ones(2)))


@pytest.mark.parametrize("max_norm", [0.5, 3.0])
def test_clip_by_leaf_norm_clips_each_leaf_on_its_own(max_norm):
  grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4]), "c": jnp.zeros(2)}
  clipped, _ = optax_adadelta.clip_by_leaf_norm(max_norm).update(grads, optax.EmptyState())
  for key, g in grads.items():
    norm = float(np.linalg.norm(g))
    want = np.asarray(g) * (max_norm / norm if norm > max_norm else 1.0)
    np.testing.assert_allclose(clipped[key], want, rtol=1e-6)


@pytest.mark.parametrize(
  ("make", "pattern"),
  [
    (lambda: optax_adadelta.params_ema(momentum=1.5), r"momentum must be in \[0, 1\], got 1.5"),
    (lambda: optax_adadelta.params_ema(overwrite_frequency=0), "overwrite_frequency must be"),
    (lambda: optax_adadelta.params_ema(accumulation_steps=0), "accumulation_steps must be"),
    (lambda: optax_adadelta.clip_by_leaf_norm(0.0), "max_norm must be > 0, got 0.0"),
  ],
)
def test_keras_pieces_reject_bad_arguments(make, pattern):
  with pytest.raises(ValueError, match=pattern):
    make()


def test_params_ema_needs_params():
  tx = optax_adadelta.params_ema()
  with pytest.raises(ValueError, match="params"):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)))


def test_keras_preset_state_keeps_its_dtypes_under_jit_and_scan():
  tx = presets.keras(
    learning_rate=optax.exponential_decay(1.0, 1, 0.9),
    use_ema=True,
    gradient_accumulation_steps=2,
    loss_scale_factor=8.0,
  )
  params = jnp.ones(3)

  def step(state, g):
    updates, state = tx.update(g, state, params)
    return state, updates

  state, _ = jax.jit(lambda s: jax.lax.scan(step, s, jnp.ones((6, 3))))(tx.init(params))
  assert int(optax.tree.get(state, "steps")) == 6


def test_optax_adadelta_with_its_default_learning_rate_ascends():
  """The claim in the README's table: optax.adadelta() (learning_rate=None) moves *with*
  the gradient, and needs params even without weight decay."""
  tx = optax.adadelta()
  params = jnp.zeros(1)
  updates, _ = tx.update(jnp.ones(1), tx.init(params), params)
  assert float(updates[0]) > 0
  with pytest.raises(ValueError, match="params"):
    tx.update(jnp.ones(1), tx.init(params))
  ours, _ = presets.paper().update(jnp.ones(1), presets.paper().init(params))
  assert float(ours[0]) < 0


def test_accumulate_gradients_steps_sgd_on_the_sum_over_every_calls():
  rng = np.random.default_rng(2)
  grads = rng.normal(size=(9, 4)).astype(np.float32)
  tx = optax_adadelta.accumulate_gradients(optax.sgd(0.5), every=3)
  params = jnp.zeros(4)
  state = tx.init(params)
  seen = []
  for g in grads:
    updates, state = tx.update(jnp.asarray(g), state, params)
    params = optax.apply_updates(params, updates)
    seen.append(np.asarray(updates))
  for t in range(9):
    if (t + 1) % 3:
      np.testing.assert_array_equal(seen[t], np.zeros(4))
    else:
      want = -0.5 * (grads[t] + (grads[t - 2] + grads[t - 1])) / 3
      np.testing.assert_allclose(seen[t], want, rtol=1e-6)


def test_accumulate_gradients_rejects_a_bad_count():
  with pytest.raises(ValueError, match="every must be an int >= 1, got 0"):
    optax_adadelta.accumulate_gradients(optax.sgd(0.1), every=0)
