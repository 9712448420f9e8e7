"""Fuzzed input to the whole public API: the right result, or an error naming what is wrong.

For every call the property is the same: the result equals the float64 reference
(tests/reference.py; TensorFlow.js's rule and Keras's clipping in tests/fuzz_strategies.py),
or the call raises a ValueError or TypeError whose message names the argument or the leaf.
Never a silently wrong update. Hypothesis draws wrong types, shapes and dtypes; NaN,
infinite, negative and float32-overflowing hyper-parameters; gradient trees with an extra,
missing, renamed, swapped or reshaped leaf (the same size too), None leaves, empty trees.

Cases: the hypothesis profile's per test, or OPTAX_ADADELTA_FUZZ_EXAMPLES=N. Count them with
``pytest tests/test_fuzz.py --hypothesis-show-statistics``.
"""

from __future__ import annotations

import math
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optax_adadelta
from optax_adadelta import interop, presets
from optax_adadelta.formats import packed
from tests import fuzz_strategies as fs
from tests import reference

# adadelta and scale_by_adadelta ------------------------------------------------------


@fs.fuzz_settings()
@given(st.data())
def test_adadelta_and_scale_by_adadelta_follow_the_reference_or_name_the_bad_argument(data):
  full = data.draw(st.booleans(), "adadelta (else scale_by_adadelta)")
  kwargs, options = fs.draw_adadelta_arguments(data, full)
  dtypes = ("float32",) * 6 + ("complex64", "bfloat16", "float16")
  specs = data.draw(fs.param_specs(dtypes=dtypes, min_leaves=0), "parameters")
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
  params = fs.draw_params(data, rng, specs)
  make = optax_adadelta.adadelta if full else optax_adadelta.scale_by_adadelta
  problems = fs.adadelta_problems(full, kwargs, options, specs)
  fs.run_expecting(problems, lambda: make(**kwargs, **options).init(params))
  if problems:
    return
  narrow = fs.has_16_bit_state(options, specs)  # then only the first step is exact
  steps = 1 if narrow else data.draw(st.integers(1, 3), "steps")
  grads = fs.draw_grads(data, rng, params, steps, eps=kwargs.get("eps", 1.0))
  want = fs.adadelta_reference(params, grads, kwargs, options, full)
  small = options["packed_state"] and data.draw(st.booleans(), "some leaves unpacked")
  with mock.patch.object(packed, "PACKED_BELOW", 4 if small else packed.PACKED_BELOW):
    fs.follow(make(**kwargs, **options), params, grads, want, check_every=not narrow)


# Gradient trees unlike the parameters --------------------------------------------------


@fs.fuzz_settings()
@given(st.data())
def test_gradients_unlike_the_parameters_are_refused_naming_the_leaf_or_follow_the_reference(
  data,
):
  fs.check_mutated_gradients(data, sorted(fs.OPTIMIZERS))


def test_the_low_memory_state_takes_a_python_float_gradient_as_the_per_leaf_state_does():
  params = {"s": jnp.ones(())}
  want = None
  for tx in (optax_adadelta.adadelta(), optax_adadelta.adadelta(state_bits=8)):
    updates, _ = tx.update({"s": 0.5}, tx.init(params))
    want = updates["s"] if want is None else want
    np.testing.assert_array_equal(updates["s"], want)


# Presets -------------------------------------------------------------------------------


@fs.fuzz_settings()
@given(st.data())
def test_each_preset_follows_its_peers_reference_or_names_the_bad_argument(data):
  name = data.draw(st.sampled_from(sorted(fs.PRESETS)), "preset")
  arguments, _ = fs.PRESETS[name]
  kwargs = {n: data.draw(s, n) for n, (_, s) in arguments.items() if data.draw(st.booleans())}
  problems = [(n, fs.argument_error(arguments[n][0], v)) for n, v in kwargs.items()]
  problems = [(n, e) for n, e in problems if e is not None]
  tx = fs.run_expecting(problems, lambda: getattr(presets, name)(**kwargs))
  if problems:
    return
  specs = data.draw(fs.param_specs(dtypes=("float32", "complex64")), "parameters")
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
  params = fs.draw_params(data, rng, specs)
  eps = kwargs.get("eps", kwargs.get("epsilon")) or 1.0
  grads = fs.draw_grads(data, rng, params, data.draw(st.integers(1, 3), "steps"), eps=eps)
  fs.follow(tx, params, grads, fs.preset_reference(name, kwargs, params, grads))


@fs.fuzz_settings()
@given(st.data())
def test_keras_preset_follows_keras_or_names_the_bad_argument(data):
  kwargs = {n: data.draw(s, n) for n, (s, _) in fs.KERAS.items() if data.draw(st.booleans())}
  if not kwargs.get("use_ema"):
    kwargs.pop("ema_momentum", None)  # Keras reads them only with use_ema
    kwargs.pop("ema_overwrite_frequency", None)
  problems = [(n, fs.KERAS[n][1](v)) for n, v in kwargs.items()]
  problems = [(n, e) for n, e in problems if e]
  clips = [n for n in ("clipnorm", "clipvalue", "global_clipnorm") if kwargs.get(n) is not None]
  if len(clips) > 1:
    problems += [(n, ValueError) for n in clips]
  tx = fs.run_expecting(problems, lambda: presets.keras(**kwargs))
  if problems:
    return
  specs = data.draw(fs.param_specs(), "parameters")
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
  params = fs.draw_params(data, rng, specs)
  every = int(kwargs.get("gradient_accumulation_steps") or 1)
  calls = every * data.draw(st.integers(1, 2), "steps")
  grads = fs.draw_grads(data, rng, params, calls, eps=kwargs.get("epsilon", 1.0))
  frequency = int(kwargs.get("ema_overwrite_frequency") or 0) if kwargs.get("use_ema") else 0
  grads = grads[: (frequency - 1) * every] if frequency else grads  # before the overwrite
  if not grads:
    return
  want, average = fs.keras_reference(kwargs, params, grads)
  final, state = fs.follow(tx, params, grads, want)
  if kwargs.get("use_ema"):
    for ours, theirs in zip(
      fs.as_list(optax_adadelta.finalize(final, state)), average, strict=True
    ):
      fs.assert_matches(ours, theirs, "float32", "the parameter average")


# Transforms ----------------------------------------------------------------------------


@fs.fuzz_settings()
@given(st.data())
def test_clip_by_leaf_norm_clips_each_leaf_or_names_max_norm(data):
  max_norm = data.draw(fs.numbers(0.05, 5.0), "max_norm")
  problems = fs.expect("max_norm", fs.expected_error("positive", max_norm))
  tx = fs.run_expecting(problems, lambda: optax_adadelta.clip_by_leaf_norm(max_norm))
  if problems:
    return
  specs = data.draw(fs.param_specs(dtypes=("float32", "complex64"), min_leaves=0), "gradients")
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
  grads = fs.draw_params(data, rng, specs)
  clipped, _ = tx.update(grads, tx.init(grads))
  c = fs.as_float(max_norm)
  for ours, g in zip(jax.tree.leaves(clipped), fs.as_list(grads), strict=True):
    g = g.astype(np.complex128 if np.iscomplexobj(g) else np.float64)
    norm = np.sqrt(np.sum(np.abs(g) ** 2))
    fs.assert_matches(ours, reference.as_real(g * c / max(norm, c)), ours.dtype, "clipped")


@fs.fuzz_settings()
@given(st.data())
def test_params_ema_follows_its_rule_or_names_the_bad_argument(data):
  momentum = data.draw(fs.numbers(0.0, 1.0), "momentum")
  frequency = data.draw(fs.COUNTS | st.none(), "overwrite_frequency")
  every = data.draw(fs.COUNTS, "accumulation_steps")
  problems = fs.expect("momentum", fs.expected_error("unit", momentum))
  problems += (
    [] if frequency is None else fs.expect("overwrite_frequency", fs.count_error(frequency))
  )
  problems += fs.expect("accumulation_steps", fs.count_error(every))
  make = lambda: optax_adadelta.params_ema(momentum, frequency, accumulation_steps=every)
  ema = fs.run_expecting(problems, make)
  if problems:
    return
  specs = data.draw(fs.param_specs(), "parameters")
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
  params = fs.draw_params(data, rng, specs)
  tx = optax.chain(optax.sgd(0.5), ema)
  state = tx.init(params)
  m_value, x, average = fs.as_float(momentum), fs.as_list(params), None
  for t, g in enumerate(fs.draw_grads(data, rng, params, data.draw(st.integers(1, 4), "steps"))):
    passed = data.draw(st.sampled_from(["same", "same", "reshaped", "missing", "none"]), "params")
    wrong = {
      "same": params,
      "none": None,
      "missing": dict(list(params.items())[1:]),
      "reshaped": jax.tree.map(lambda p: p.reshape((*p.shape, 1)), params),
    }[passed]
    if passed != "same":
      with pytest.raises((ValueError, TypeError)) as info:
        tx.update(g, state, wrong)
      first = jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(params)[0][0][0])
      names = {"none": "needs the parameters", "missing": "structure", "reshaped": first}
      assert names[passed] in str(info.value), str(info.value)
    updates, state = tx.update(g, state, params)
    k = t // int(every)
    x = [a - 0.5 * np.asarray(b, np.float64) for a, b in zip(x, fs.as_list(g), strict=True)]
    m = 0.0 if k == 0 else m_value
    average = (
      x if average is None else [m * a + (1 - m) * b for a, b in zip(average, x, strict=True)]
    )
    if frequency is not None and (k + 1) % int(frequency) == 0:
      x = [a.copy() for a in average]
    params = optax.apply_updates(params, updates)
    for ours, want in zip(fs.as_list(params), x, strict=True):
      fs.assert_matches(ours, want, "float32", f"parameters after step {t}")
  for ours, want in zip(fs.as_list(optax_adadelta.finalize(params, state)), average, strict=True):
    fs.assert_matches(ours, want, "float32", "the average")


@fs.fuzz_settings()
@given(st.data())
def test_accumulate_gradients_steps_on_the_mean_or_names_what_is_wrong(data):
  every = data.draw(fs.COUNTS, "every")
  problems = fs.expect("every", fs.count_error(every))
  tx = fs.run_expecting(
    problems, lambda: optax_adadelta.accumulate_gradients(optax.sgd(0.5), every)
  )
  if problems:
    return
  specs = data.draw(fs.param_specs(allow_nesting=False), "parameters")
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
  params = fs.draw_params(data, rng, specs)
  state = tx.init(params)
  grads = fs.draw_grads(data, rng, params, int(every))  # each call compiles lax.cond: one cycle
  total = [np.zeros(np.shape(p)) for p in fs.as_list(params)]
  for c, g in enumerate(grads):
    mutation = data.draw(st.sampled_from(fs.MUTATIONS), "mutation")
    wrong, key = fs.mutate(data, g, mutation)
    if fs.mismatch(params, wrong, "accumulate") is not None:
      with pytest.raises((ValueError, TypeError)) as info:
        tx.update(wrong, state, params)
      assert repr(key) in str(info.value) or "do not have the structure" in str(info.value)
    with jax.disable_jit():  # lax.cond as a Python `if`: nothing to compile per call
      updates, state = tx.update(g, state, params)
    total = [a + b for a, b in zip(total, fs.as_list(g), strict=True)]
    step = (c + 1) % int(every) == 0
    for ours, s in zip(fs.as_list(updates), total, strict=True):
      fs.assert_matches(ours, -0.5 * s / int(every) if step else 0 * s, "float32")
    total = [0 * s for s in total] if step else total


@fs.fuzz_settings()
@given(st.data())
def test_finalize_returns_the_average_or_names_the_leaf_unlike_params(data):
  specs = data.draw(fs.param_specs(allow_nesting=False), "parameters")
  params = fs.draw_params(data, np.random.default_rng(0), specs)
  tx = optax.chain(optax.sgd(0.1), optax_adadelta.params_ema(0.9))
  state = tx.init(params)
  mutation = data.draw(st.sampled_from(["same", "reshaped", "renamed", "extra", "float16"]))
  other, key = fs.mutate(data, params, mutation)
  if fs.mismatch(params, other, "accumulate") is None:
    assert optax_adadelta.finalize(other, state) is optax.tree.get(state, "ema")
    return
  with pytest.raises(ValueError) as info:
    optax_adadelta.finalize(other, state)
  assert repr(key) in str(info.value), str(info.value)


# interop -------------------------------------------------------------------------------


@fs.fuzz_settings()
@given(st.data())
def test_from_torch_loads_the_state_dict_or_names_what_does_not_fit(data):
  specs = data.draw(fs.param_specs(dtypes=("float32", "complex64"), allow_nesting=False))
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
  params = [jnp.asarray(fs.random_array(rng, shape, dtype)) for _, shape, dtype in specs]
  mutation = data.draw(st.sampled_from(["none"] * 6 + sorted(fs.TORCH_MUTATIONS)), "mutation")
  tx = {
    "packed-target": optax_adadelta.adadelta(packed_state=True),
    "low-memory-target": optax_adadelta.adadelta(state_bits=8),
  }.get(mutation, presets.pytorch(lr=fs.SCHEDULES[0]))
  if mutation == "packed-target" and any(d == "complex64" for _, _, d in specs):
    tx = optax_adadelta.adadelta(packed_state=True, accumulator_dtype=None)
    params = [p.real for p in params]
  opt_state = tx.init(params)
  state_dict, state, step, name = fs.torch_state_dict(data, rng, params, mutation)
  expected = [] if name is None else [(name, ValueError), (name, TypeError)]
  loaded = fs.run_expecting(expected, lambda: interop.from_torch(opt_state, state_dict))
  if name is not None:
    return
  ours = optax.tree.get(loaded, "e_g2"), optax.tree.get(loaded, "e_dx2")
  for field, leaves in zip(("square_avg", "acc_delta"), ours, strict=True):
    for k, (got, p) in enumerate(zip(jax.tree.leaves(leaves), params, strict=True)):
      want = state[k][field] if k in state else np.zeros(p.shape, p.dtype)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want).astype(p.dtype))
  assert int(optax.tree.get(loaded, "count")) == (step if state else 0)


@fs.fuzz_settings()
@given(st.data())
def test_to_torch_writes_a_loadable_state_dict_or_names_what_is_wrong(data):
  torch = pytest.importorskip("torch")
  specs = data.draw(fs.param_specs(dtypes=("float32", "complex64"), allow_nesting=False))
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
  params = [jnp.asarray(fs.random_array(rng, shape, dtype)) for _, shape, dtype in specs]
  counted = data.draw(st.booleans(), "a state with a step counter")
  tx = presets.pytorch(lr=fs.SCHEDULES[0]) if counted else optax_adadelta.adadelta()
  opt_state, taken = tx.init(params), data.draw(st.integers(0, 2), "steps taken")
  for g in fs.draw_grads(data, rng, params, taken, 1.0):
    _, opt_state = tx.update(g, opt_state, params)
  broken = data.draw(st.sampled_from([None] * 4 + ["fewer", "no-groups", "no-params", "list"]))
  template = fs.torch_template(len(params), broken)
  step = data.draw(st.sampled_from([None, None, 0, 3, -1, 2.5, math.nan, True, "3", np.int64(4)]))
  expected = {
    None: [] if step is not None else [] if counted else [("step=", ValueError)],
    "fewer": [("parameters", ValueError)],
    "no-groups": [("param_groups", ValueError)],
    "no-params": [("params", ValueError)],
    "list": [("template", ValueError), ("template", TypeError)],
  }[broken]
  if broken is None and step is not None:
    expected = fs.step_error(step)
  written = fs.run_expecting(expected, lambda: interop.to_torch(opt_state, template, step))
  if expected:
    return
  assert int(written["state"][0]["step"]) == (taken if step is None else int(step))
  e_g2 = jax.tree.leaves(optax.tree.get(opt_state, "e_g2"))
  for k, leaf in enumerate(e_g2):
    np.testing.assert_array_equal(written["state"][k]["square_avg"].numpy(), np.asarray(leaf))
  back = interop.from_torch(tx.init(params), written)
  for field in ("e_g2", "e_dx2"):
    for a, b in zip(
      *(jax.tree.leaves(optax.tree.get(s, field)) for s in (back, opt_state)), strict=True
    ):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert isinstance(written["state"][0]["acc_delta"], torch.Tensor)


@fs.fuzz_settings()
@given(st.data())
def test_keras_interop_converts_or_names_the_parameter_that_does_not_fit(data):
  keras = pytest.importorskip("keras")
  shapes = data.draw(st.lists(st.sampled_from(fs.SHAPES[:6]), min_size=1, max_size=3), "shapes")
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
  use_ema = data.draw(st.booleans(), "use_ema")
  variables = [keras.Variable(np.zeros(s, np.float32)) for s in shapes]
  optimizer = keras.optimizers.Adadelta(use_ema=use_ema)
  optimizer.build(variables)
  slots = [*optimizer._accumulated_grads, *optimizer._accumulated_delta_vars]
  for v in slots + list(getattr(optimizer, "_model_variables_moving_average", None) or []):
    v.assign(np.abs(rng.normal(size=v.shape)).astype(np.float32))
  optimizer.iterations.assign(data.draw(st.integers(0, 9), "iterations"))
  ours = [np.zeros(s, np.float32) for s in shapes]
  mutation = data.draw(st.sampled_from(["same", "same", "extra", "missing", "reshaped", "complex"]))
  k = data.draw(st.integers(0, len(shapes) - 1), "parameter")
  if mutation == "extra":
    ours.append(np.zeros(2, np.float32))
  elif mutation == "missing":
    ours.pop(k)
  elif mutation == "reshaped":
    ours[k] = ours[k][..., None]
  elif mutation == "complex":
    ours[k] = ours[k].astype(np.complex64)
  params = [jnp.asarray(x) for x in ours]
  tx = presets.keras(use_ema=use_ema)
  names = {
    "same": None,
    "extra": "parameters",
    "missing": "parameters",
    "complex": f"parameter {k}",
    "reshaped": f"parameter {k}",
  }[mutation]
  expected = [] if names is None else [(names, ValueError), (names, TypeError)]
  if mutation == "complex" and use_ema:
    expected = [(f"parameter {k}", TypeError)]
  before = [np.asarray(v.value) for v in slots], int(optimizer.iterations)
  loaded = fs.run_expecting(expected, lambda: interop.from_keras(tx.init(params), optimizer))
  fs.run_expecting(expected, lambda: interop.to_keras(tx.init(params), optimizer))
  if expected:
    return
  averages = jax.tree.leaves((optax.tree.get(loaded, "e_g2"), optax.tree.get(loaded, "e_dx2")))
  for got, want, now in zip(averages, before[0], slots, strict=True):
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(now.value), np.zeros_like(want))  # written back
  assert int(optimizer.iterations) == (0 if use_ema else before[1])  # the EMA counts steps


# checkpoint ----------------------------------------------------------------------------


@fs.fuzz_settings()
@given(st.data())
def test_restore_into_wrong_templates_or_config_is_refused_naming_the_difference(checkpoint, data):
  saved = fs.saved_checkpoint()
  change = data.draw(st.sampled_from(sorted(fs.TEMPLATES)), "template change")
  config = None if data.draw(st.booleans(), "without config") else dict(saved["config"])
  params, opt_state, config = fs.checkpoint_templates(saved, change, config)
  name = fs.TEMPLATES[change]
  expected = [] if name is None else [(name, ValueError), (name, TypeError)]
  restored = fs.run_expecting(
    expected, lambda: checkpoint.restore(saved["directory"], params, opt_state, config=config)
  )
  if expected:
    return
  assert restored.step == 1
  for got, want in zip(
    jax.tree.leaves(restored[:2]),
    jax.tree.leaves((saved["params"], saved["opt_state"])),
    strict=True,
  ):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@fs.fuzz_settings()
@given(st.data())
def test_save_refuses_a_bad_step_or_config_naming_it(checkpoint, data):
  step = data.draw(st.sampled_from([3, np.int64(3), -1, 1.5, True, "3", None, math.nan]), "step")
  config = data.draw(
    st.sampled_from([None, {"rho": 0.9}, {"rho": math.nan}, {"rho": math.inf}, "rho=0.9",
                     {"dtype": jnp.float32}, {"f": object()}])
  )  # fmt: skip
  config_ok = config is None or config == {"rho": 0.9}
  expected = fs.step_error(step) + (
    [] if config_ok else [("config", TypeError), ("config", ValueError)]
  )
  directory = tempfile.mkdtemp(prefix="fuzz-save-") + "/ckpt"
  params = {"w": jnp.ones(2)}
  opt_state = optax_adadelta.adadelta().init(params)
  save = lambda: checkpoint.save(directory, params, opt_state, step, config=config)
  fs.run_expecting(expected, save)
  if not expected:
    restored = checkpoint.restore(directory, params, opt_state, config=config)
    assert restored.step == int(step)
