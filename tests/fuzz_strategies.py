"""Strategies and oracles for tests/test_fuzz.py.

The oracles say, from the documented contract alone, whether a value must be refused and
with which error; the float64 references (tests/reference.py, and TensorFlow.js's rule and
Keras's gradient clipping transcribed here) give the result when it must not.
"""

from __future__ import annotations

import math
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, event, note, settings
from hypothesis import strategies as st

import optax_adadelta
from optax_adadelta import presets
from tests import reference
from tests.helpers import is_none

F32 = np.finfo(np.float32)
F32_MAX, F32_TINY = float(F32.max), float(F32.tiny)


def fuzz_settings(**overrides):
  """The profile's settings; OPTAX_ADADELTA_FUZZ_EXAMPLES=N runs N examples per test."""
  examples = int(os.environ.get("OPTAX_ADADELTA_FUZZ_EXAMPLES", "0"))
  return settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    **({"max_examples": examples} if examples else {}),
    **overrides,
  )


# Hyper-parameters ----------------------------------------------------------------------

_SPECIAL = [0.0, -0.0, 1.0, 0.5, -1e-6, -1.0, 1.5, math.nan, math.inf, -math.inf]
# Valid in float64 but not in float32 (the huge ones, and tiny ones for eps), or tiny but
# valid. No large valid values: λ·x or g² beyond float32's range overflows, as any float32
# computation does, and that is not what this suite looks for.
_EXTREME = [1e-45, 1e-40, 1e-300, 2e-38, 1e-30, 3.5e38, 1e39, 1e300]
_WRONG_TYPES = [None, "0.9", True, False, 1j, b"1", [0.5, 0.5], (0.5,), {"rho": 0.5}, object()]


@st.composite
def numbers(draw, low: float = -2.0, high: float = 2.0):
  """A hyper-parameter value: mostly sensible, often special, sometimes not a number at all."""
  kind = draw(st.sampled_from(["float", "float", "special", "extreme", "wrong", "array", "int"]))
  if kind == "float":
    return draw(st.floats(low, high, allow_nan=False))
  if kind == "special":
    return draw(st.sampled_from(_SPECIAL))
  if kind == "extreme":
    return draw(st.sampled_from(_EXTREME + [-x for x in _EXTREME]))
  if kind == "wrong":
    return draw(st.sampled_from(_WRONG_TYPES))
  if kind == "int":
    return draw(st.integers(-2, 3))
  value = draw(st.sampled_from(_SPECIAL[:5]) | st.floats(low, high, allow_nan=False))
  box = draw(st.sampled_from(["np32", "np64", "jnp", "jnp-vector", "np-vector", "np-1"]))
  return {
    "np32": lambda: np.float32(value),
    "np64": lambda: np.float64(value),
    "jnp": lambda: jnp.asarray(value),
    "jnp-vector": lambda: jnp.full((3,), value),
    "np-vector": lambda: np.full((2,), value),
    "np-1": lambda: np.full((1,), value),
  }[box]()


def valid_numbers(low: float, high: float):
  """Values in [low, high] as Python floats, NumPy and JAX scalars (valid where numbers is not)."""
  value = st.floats(low, high) | st.sampled_from([low, high])
  return value | value.map(np.float32).filter(lambda v: low <= v <= high) | value.map(jnp.asarray)


def expected_error(kind: str, value) -> type[Exception] | None:
  """The error the documented contract demands for `value`, or None if it is valid.

  Kinds: "unit" (ρ: [0, 1]), "positive" (ε: > 0), "nonneg" (η, λ: >= 0). A value must be
  a real scalar, finite in float32 (the precision the update is computed in); ε must also
  be a normal float32 number (smaller ones are flushed to zero).
  """
  if value is None or isinstance(value, (bool, np.bool_, str, bytes, complex, dict)):
    return TypeError
  try:
    values = np.asarray(value)
  except Exception:
    return TypeError
  if values.dtype.kind not in "iuf":
    return TypeError
  if values.ndim:
    return ValueError
  x = float(values)
  if not math.isfinite(x) or abs(x) > F32_MAX:
    return ValueError
  if kind == "unit":
    return None if 0.0 <= x <= 1.0 else ValueError
  if kind == "positive":
    return None if x >= F32_TINY else ValueError
  return None if x >= 0.0 else ValueError


def as_float(value) -> float:
  return float(np.asarray(value, np.float64))


# Trees --------------------------------------------------------------------------------

SHAPES = [(), (3,), (2, 3), (3, 2), (1, 3), (6,), (0, 2)]
NAMES = ["w", "b", "kernel", "scale"]


@st.composite
def param_specs(draw, *, dtypes=("float32",), min_leaves=1, max_leaves=3, allow_nesting=True):
  """A list of (path, shape, dtype) for distinct leaf paths; paths are tuples of keys."""
  count = draw(st.integers(min_leaves, max_leaves))
  names = draw(st.lists(st.sampled_from(NAMES), min_size=count, max_size=count, unique=True))
  specs = []
  for name in names:
    nested = allow_nesting and draw(st.booleans())
    path = ("layer", name) if nested else (name,)
    specs.append((path, draw(st.sampled_from(SHAPES)), draw(st.sampled_from(dtypes))))
  return specs


def build_tree(specs, leaves):
  tree: dict = {}
  for (path, _, _), leaf in zip(specs, leaves, strict=True):
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return tree


def random_array(rng, shape, dtype, scale=1.0, zeros=0.2):
  """Normal values times `scale` with about `zeros` of them exactly 0, in `dtype`."""
  x = rng.normal(size=shape) * scale
  x = np.where(rng.random(size=shape) < zeros, 0.0, x)
  if np.dtype(jnp.dtype(dtype)).kind == "c":
    x = x + 1j * rng.normal(size=shape) * scale
  return np.asarray(jnp.asarray(x, dtype))


def keystr(path) -> str:
  return "".join(f"[{k!r}]" for k in path)


# References ---------------------------------------------------------------------------


def tolerance(dtype) -> float:
  return {"float32": 2e-5, "complex64": 2e-5, "float16": 3e-3, "bfloat16": 2e-2}[str(dtype)]


def assert_matches(ours, want, dtype, what="update"):
  """ours ≈ want (float64), relative to the leaf's largest |value| and per element."""
  got = reference.as_real(np.asarray(ours, np.complex128 if np.iscomplexobj(ours) else None))
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{what}: shape {got.shape}, reference {want.shape}"
  rtol = tolerance(dtype)
  scale = np.max(np.abs(want), initial=0.0)
  # Below the dtype's normal numbers (float16: 6e-5) the result is flushed or subnormal.
  floor = max(1e-30, float(jnp.finfo(dtype).tiny)) if rtol > 1e-4 else 1e-30
  bad = np.abs(got - want) > rtol * (np.abs(want) + scale) + floor
  assert not np.any(bad), (
    f"{what}: silently wrong, {got[bad][:3]} where the float64 reference has {want[bad][:3]}"
  )


def tfjs_run(params, grads, *, learning_rate, rho, eps):
  """tfjs-core 4.22 adadelta_optimizer.js in float64: Δx uses the E[g²] of the last step."""
  x = [reference.as_real(p) for p in params]
  e_g2 = [np.zeros_like(p) for p in x]
  e_dx2 = [np.zeros_like(p) for p in x]
  steps = []
  for step_grads in grads:
    taken = []
    for i, g in enumerate(step_grads):
      g = reference.as_real(g)
      dx = -np.sqrt(e_dx2[i] + eps) / np.sqrt(e_g2[i] + eps) * g
      e_g2[i] = rho * e_g2[i] + (1 - rho) * g**2
      e_dx2[i] = rho * e_dx2[i] + (1 - rho) * dx**2
      taken.append(learning_rate * dx)
      x[i] = x[i] + learning_rate * dx
    steps.append(taken)
  return steps


def keras_preprocess(grads, *, loss_scale_factor, clipnorm, clipvalue, global_clipnorm):
  """Keras 3.15 BaseOptimizer.apply: unscale, then clip (at most one clip is set)."""
  out = []
  for step_grads in grads:
    g = [np.asarray(x, np.float64) for x in step_grads]
    if loss_scale_factor is not None:
      g = [x / loss_scale_factor for x in g]
    if clipnorm:
      g = [x * clipnorm / max(np.sqrt(np.sum(x * x)), clipnorm) for x in g]
    elif global_clipnorm:
      norm = np.sqrt(sum(np.sum(x * x) for x in g))
      g = [x if norm < global_clipnorm else x / norm * global_clipnorm for x in g]
    elif clipvalue:
      g = [np.clip(x, -clipvalue, clipvalue) for x in g]
    out.append(g)
  return out


# Running a case and checking its outcome -----------------------------------------------

FLAGS = st.sampled_from([False, True, False, True, 0, 1, "yes", None])
RULES = ["default", "pytorch", "keras", "tf1", "d2l"]
SCHEDULES = [optax.constant_schedule(0.5), optax.linear_schedule(1.0, 0.25, 3)]


def assert_refused(error: BaseException, expected: list[tuple[str, type]]):
  """The error is one that `expected` (name, type) demands, and its message names that."""
  message = str(error)
  named = [n for n, kind in expected if isinstance(error, kind) and n in message]
  assert named, f"{type(error).__name__}({message!r}) is none of {expected}"


def run_expecting(expected, call):
  """call()'s result, or, when `expected` lists problems, the check of the error it raises."""
  if not expected:
    result = call()
    event("accepted")
    return result
  with pytest.raises((ValueError, TypeError)) as info:
    call()
  assert_refused(info.value, expected)
  event(f"refused with a {type(info.value).__name__}")
  return None


def draw_params(data, rng, specs):
  leaves = [random_array(rng, shape, dtype) for _, shape, dtype in specs]
  return build_tree(specs, [jnp.asarray(x) for x in leaves])


def draw_grads(data, rng, params, steps, scale=None, eps=1.0):
  """Gradients of 1e-3, 1 or 10 times N(0, 1); not 10 with eps below 1e-30, where the
  default rule's (E[Δx²] + ε) / (E[g²] + ε) is flushed to zero (float32 underflow, as g²
  of 1e20 overflows; the rules with two square roots do not underflow)."""
  scales = [1e-3, 1.0, 10.0] if as_float(eps) >= 1e-30 else [1e-3, 1.0]
  scale = data.draw(st.sampled_from(scales), "gradient scale") if scale is None else scale
  return [
    jax.tree.map(lambda p: jnp.asarray(random_array(rng, p.shape, p.dtype, scale)), params)
    for _ in range(steps)
  ]


def follow(tx, params, grads, want_steps, *, check_every=True):
  """Runs tx on the gradients and compares each update with want_steps[t][i]."""
  state = tx.init(params)
  for t, g in enumerate(grads):
    updates, state = tx.update(g, state, params)
    if check_every or t == 0:
      for i, (u, p) in enumerate(
        zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True)
      ):
        assert u.dtype == p.dtype, f"update {i} has dtype {u.dtype}, its parameter {p.dtype}"
        assert_matches(u, want_steps[t][i], p.dtype, f"step {t}, leaf {i}")
    params = optax.apply_updates(params, updates)
  event(f"followed the reference for {len(grads)} step(s)")
  return params, state


def as_list(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


# adadelta and scale_by_adadelta: their arguments, and what the contract refuses --------

HYPER = {  # argument: (kind for expected_error, strategy)
  "learning_rate": ("nonneg", numbers(0.0, 3.0) | st.sampled_from(SCHEDULES)),
  "rho": ("unit", numbers(0.0, 1.0)),
  "eps": ("positive", numbers(1e-8, 1.0)),
  "weight_decay": ("nonneg", numbers(0.0, 0.5)),
}
VALID_HYPER = {
  "learning_rate": valid_numbers(0.0, 3.0) | st.sampled_from(SCHEDULES),
  "rho": valid_numbers(0.0, 1.0),
  "eps": valid_numbers(1e-8, 1.0),
  "weight_decay": valid_numbers(0.0, 0.5),
}
DTYPE_CHOICES = [None, None, "float32", jnp.bfloat16, "float16", jnp.int32, "complex64", "nonsense"]
DTYPE_CHOICES += ["float8_e4m3fn"]
OPTIONS = {  # argument: (strategy, whether a value is valid)
  "accumulator_dtype": (
    st.sampled_from(DTYPE_CHOICES),
    lambda v: v in (None, "float32", jnp.bfloat16, "float16"),
  ),
  "update_rule": (st.sampled_from([*RULES, "default", "Default", None]), lambda v: v in RULES),
  "implementation": (
    st.sampled_from(["auto", "auto", "jax", "native", "fast"]),
    lambda v: v in ("auto", "jax", "native"),
  ),
  "packed_state": (st.sampled_from([False, False, True, "yes", 1]), lambda v: isinstance(v, bool)),
  "state_bits": (
    st.sampled_from([None, None, None, 8, 4, "8", True]),
    lambda v: v is None or (v == 8 and not isinstance(v, (bool, str))),
  ),
  "stochastic_rounding": (st.sampled_from([None, None, None, "yes", 1]), lambda v: v is None),
}


def adadelta_problems(full, kwargs, options, specs):
  """What the contract refuses, in the order construction, init would meet it."""
  bad = [(n, expected_error(HYPER[n][0], v)) for n, v in kwargs.items() if not callable(v)]
  bad = [(n, e) for n, e in bad if e is not None]
  bad += [
    (n, ValueError if n in ("update_rule", "implementation", "state_bits") else TypeError)
    for n, v in options.items()
    if n in OPTIONS and not OPTIONS[n][1](v)
  ]
  bad += [
    (n, TypeError)
    for n in ("maximize", "decoupled_weight_decay")
    if n in options and not isinstance(options[n], bool)
  ]
  if bad:
    return bad
  native = options["implementation"] == "native"
  combined = []  # each combination refused, whichever is checked first
  if native and (options["update_rule"] != "default" or not optax_adadelta.native_available()):
    combined.append(("implementation", ValueError))
  if options["state_bits"] == 8 and options["packed_state"]:  # native 8-bit has its own kernel
    combined.append(("packed_state", ValueError))
  if combined:
    return combined
  dtypes = {dtype for _, _, dtype in specs}
  if options["packed_state"] and ("complex64" in dtypes or len(dtypes) > 1):
    return [("packed_state=True", TypeError)]
  narrow = str(jnp.dtype(options["accumulator_dtype"] or "float32")) in ("bfloat16", "float16")
  if "complex64" in dtypes and narrow:  # any complex leaf, whichever is met first
    return [(keystr(p), TypeError) for p, _, d in specs if d == "complex64"]
  return []


# Gradient trees unlike the parameters -------------------------------------------------

MUTATIONS = ["same", "extra", "missing", "renamed", "reshaped", "resized", "none", "int32",
             "bool", "complex", "float16", "python-float", "string", "list-leaf", "empty",
             "swapped"]  # fmt: skip
OPTIMIZERS = {
  "per-leaf": lambda: optax_adadelta.adadelta(),
  "packed": lambda: optax_adadelta.adadelta(packed_state=True),
  "coupled-decay": lambda: optax_adadelta.adadelta(weight_decay=0.1),
  "maximize": lambda: optax_adadelta.adadelta(maximize=True),
  "decoupled-decay": lambda: optax_adadelta.adadelta(weight_decay=0.1, decoupled_weight_decay=True),
  "scale-by": lambda: optax_adadelta.scale_by_adadelta(),
  "low-memory": lambda: optax_adadelta.adadelta(state_bits=8),
  "accumulate": lambda: optax_adadelta.accumulate_gradients(optax_adadelta.adadelta(), 1),
  "keras-ema": lambda: presets.keras(learning_rate=1.0, use_ema=True, clipnorm=1.0),
}


def mutate(data, grads: list, mutation: str):
  """grads (a list of leaves, or a dict) changed by `mutation`; the key or index it touched."""
  keys = list(range(len(grads))) if isinstance(grads, list) else sorted(grads)
  key = data.draw(st.sampled_from(keys), "leaf") if keys else None
  g = grads[key] if key is not None else None
  if mutation == "extra":
    key = len(grads) if isinstance(grads, list) else "extra"
    grads = [*grads, jnp.ones(2)] if isinstance(grads, list) else grads | {"extra": jnp.ones(2)}
  elif mutation == "missing" and key is not None:
    grads = (
      [x for k, x in enumerate(grads) if k != key]
      if isinstance(grads, list)
      else {k: x for k, x in grads.items() if k != key}
    )
  elif mutation == "renamed" and isinstance(grads, dict) and key is not None:
    grads = {(k + "_" if k == key else k): x for k, x in grads.items()}
  elif mutation == "swapped" and isinstance(grads, list) and len(grads) > 1:
    other = (key + 1) % len(grads)
    grads = list(grads)
    grads[key], grads[other] = grads[other], grads[key]
  elif g is not None:
    new = {
      "reshaped": lambda: g.reshape(
        data.draw(
          st.sampled_from(
            [
              s
              for s in [(g.size,), (1, g.size), (g.size, 1), tuple(reversed(g.shape))]
              if s != g.shape
            ]
            or [(1, *g.shape)]
          )
        )
      ),
      "resized": lambda: jnp.ones((g.size + 1,), g.dtype),
      "none": lambda: None,
      "int32": lambda: g.astype(jnp.int32),
      "bool": lambda: g > 0,
      "complex": lambda: g.astype(jnp.complex64),
      "float16": lambda: g.astype(jnp.float16),
      "python-float": lambda: 0.5,
      "string": lambda: "0.5",
      "list-leaf": lambda: [g, g],
    }.get(mutation, lambda: g)()
    grads = list(grads) if isinstance(grads, list) else dict(grads)
    grads[key] = new
  if mutation == "empty":
    grads = [] if isinstance(grads, list) else {}
  return grads, key


def mismatch(params, grads, optimizer):
  """Per leaf of params: None if the gradient fits, else why (for the expected message)."""
  p_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  if jax.tree.structure(grads, is_leaf=is_none) != jax.tree.structure(params):
    return "structure"
  g_leaves = jax.tree.structure(params).flatten_up_to(grads)
  for (path, p), g in zip(p_leaves, g_leaves, strict=True):
    where = jax.tree_util.keystr(path)
    if g is None:
      if optimizer in ("packed", "accumulate"):
        return where
      continue
    if isinstance(g, str) or not jnp.issubdtype(jnp.result_type(g), jnp.inexact):
      return where
    if jnp.iscomplexobj(g) != jnp.iscomplexobj(p) or jnp.shape(g) != p.shape:
      return where
    if jnp.result_type(g) != p.dtype and optimizer in ("packed", "accumulate"):
      return where
  return None


# Presets, transforms, interop, checkpoint: arguments and changes, what each must name ---

UNIT, POSITIVE = ("unit", numbers(0.0, 1.0)), ("positive", numbers(1e-8, 1.0))
LR = ("nonneg", numbers(0.0, 3.0))
PRESETS = {  # preset: its arguments as (kind, strategy), and its defaults
  "paper": ({}, {"learning_rate": 1.0, "rho": 0.95, "eps": 1e-6}),
  "pytorch": (
    {
      "lr": ("nonneg", LR[1] | st.sampled_from(SCHEDULES)),
      "rho": UNIT,
      "eps": POSITIVE,
      "weight_decay": ("nonneg", numbers(0.0, 0.5)),
      "maximize": ("flag", FLAGS),
    },
    {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0, "maximize": False},
  ),
  "tfjs": (
    {"learning_rate": LR, "rho": UNIT, "epsilon": ("positive-or-none", POSITIVE[1] | st.none())},
    {"learning_rate": 0.001, "rho": 0.95, "epsilon": None},
  ),
  "tf1": (
    {"learning_rate": LR, "rho": UNIT, "epsilon": POSITIVE},
    {"learning_rate": 0.001, "rho": 0.95, "epsilon": 1e-8},
  ),
  "d2l": ({"rho": UNIT, "eps": POSITIVE}, {"rho": 0.9, "eps": 1e-5}),
}


def argument_error(kind, value):
  if callable(value) and kind == "nonneg":
    return None
  if kind == "flag":
    return None if isinstance(value, bool) else TypeError
  if kind == "positive-or-none":
    return None if value is None else expected_error("positive", value)
  return expected_error(kind, value)


KERAS = {  # argument: (strategy, error for a value)
  "learning_rate": (
    numbers(0.0, 3.0) | st.sampled_from(SCHEDULES[:1]),
    lambda v: argument_error("nonneg", v) if callable(v) or isinstance(v, float) else ValueError,
  ),
  "rho": (UNIT[1], lambda v: expected_error("unit", v)),
  "epsilon": (POSITIVE[1], lambda v: expected_error("positive", v)),
  "weight_decay": (
    st.none() | numbers(0.0, 0.3),
    lambda v: None if v is None else expected_error("nonneg", v),
  ),
  "loss_scale_factor": (
    st.none() | numbers(0.25, 8.0),
    lambda v: None if v is None else expected_error("positive", v),
  ),
  "gradient_accumulation_steps": (
    st.sampled_from([None, None, 0, 1, 2, 3, 2.5, -1, "2", True]),
    lambda v: (
      None
      if v in (None, 0) or (isinstance(v, int) and not isinstance(v, bool) and v >= 2)
      else ValueError
    ),
  ),
  "use_ema": (FLAGS, lambda v: None),
  "ema_momentum": (UNIT[1], lambda v: expected_error("unit", v)),
  "ema_overwrite_frequency": (
    st.sampled_from([None, None, 0, 1, 2, 3, -1, 1.5, "2"]),
    lambda v: None if not v or (isinstance(v, int) and v >= 1) else ValueError,
  ),
}


def clip_error(value):
  """0 (Keras: no clipping) or a normal float32 number; tiny ones make 0 / 0 of a zero norm."""
  return None if as_float(value) == 0 else expected_error("positive", value)


for _clip in ("clipnorm", "clipvalue", "global_clipnorm"):
  KERAS[_clip] = (
    st.none() | numbers(0.05, 2.0),
    lambda v: None if v is None else expected_error("nonneg", v) or clip_error(v),
  )


COUNTS = st.sampled_from([1, 2, 3, 0, -1, 2.5, "2", True, np.int64(2), None])


def count_error(value):
  integral = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
  return None if integral and value >= 1 else (TypeError, ValueError)


def expect(name, error):
  return [] if error is None else [(name, e) for e in np.atleast_1d(error)]


TORCH_MUTATIONS = {  # mutation: what the error must name (None: the conversion is valid)
  "none": None,
  "float64": None,
  "no-state-for-one": None,
  "shape": "parameter",
  "missing-key": "acc_delta",
  "step-mismatch": "step",
  "step-nan": "step",
  "step-negative": "step",
  "step-fraction": "step",
  "negative-value": "square_avg",
  "nan-value": "acc_delta",
  "kind": "parameter",
  "str-keys": "'0'",
  "extra-index": "99",
  "fewer-params": "parameters",
  "no-params-key": "params",
  "not-a-dict": "state_dict",
  "packed-target": "packed_state",
  "low-memory-target": "state_bits",
}


def torch_averages(rng, p):
  """Non-negative averages shaped like p (complex: both parts, PyTorch's view_as_real)."""
  return (
    np.abs(random_array(rng, p.shape, p.dtype))
    if not jnp.iscomplexobj(p)
    else (
      np.abs(random_array(rng, p.shape, "float32"))
      + 1j * np.abs(random_array(rng, p.shape, "float32"))
    ).astype(np.complex64)
  )


TEMPLATES = {  # template change: what the error must name (None: restores)
  "same": None,
  "shape-dtype-structs": None,
  "renamed": "['w2']",
  "reshaped": "['w']",
  "bfloat16": "bfloat16",
  "int32": "int32",
  "extra": "['extra']",
  "missing": "['b']",
  "list": "[0]",
  "packed": "opt_state",
  "no-schedule": "opt_state",
  "keras-ema": "opt_state",
  "low-memory": "opt_state",
  "adam": "opt_state",
  "config-changed": "config",
  "config-extra": "config",
  "config-nan": "config",
  "config-object": "config",
}


# Drawing arguments and computing the references ------------------------------------------


def draw_adadelta_arguments(data, full: bool):
  """Keyword arguments of adadelta (full) or scale_by_adadelta; half the time all valid."""
  valid = data.draw(st.booleans(), "only valid arguments")  # else most cases are refused
  names = [n for n in (list(HYPER) if full else ["rho", "eps"]) if data.draw(st.booleans())]
  kwargs = {n: data.draw(VALID_HYPER[n] if valid else HYPER[n][1], n) for n in names}
  options = {n: data.draw(s.filter(ok) if valid else s, n) for n, (s, ok) in OPTIONS.items()}
  if full:
    flags = FLAGS.filter(lambda v: isinstance(v, bool)) if valid else FLAGS
    options |= {n: data.draw(flags, n) for n in ("maximize", "decoupled_weight_decay")}
  return kwargs, options


def has_16_bit_state(options, specs) -> bool:
  """Whether the state rounds to 16 bits (or 8): then only the first step is exact."""
  return bool(options["state_bits"]) or any(
    str(jnp.dtype(d or "float32")) in ("bfloat16", "float16")
    for d in [options["accumulator_dtype"], *(d for _, _, d in specs)]
  )


def _numbers(hyper: dict) -> dict:
  """Hyper-parameters as floats for the reference; schedules as functions returning floats."""
  return {
    n: (lambda t, f=v: float(f(t))) if callable(v) else v if v is None else as_float(v)
    for n, v in hyper.items()
  }


def adadelta_reference(params, grads, kwargs, options, full):
  hyper = _numbers(kwargs) | ({} if full else {"learning_rate": -1.0})  # scale_by: +Δx
  return reference.run(
    as_list(params),
    [as_list(g) for g in grads],
    **hyper,
    decoupled=options.get("decoupled_weight_decay", False),
    maximize=options.get("maximize", False),
  ).steps


def gradient_reference(optimizer: str, param, grad):
  """The first update of one leaf by OPTIMIZERS[optimizer]."""
  g = np.broadcast_to(np.asarray(grad, np.float64), param.shape)
  if optimizer == "keras-ema":
    g = keras_preprocess([[g]], loss_scale_factor=None, clipnorm=1.0, clipvalue=None,
                         global_clipnorm=None)[0][0]  # fmt: skip
  return reference.run(
    [np.asarray(param)],
    [[g]],
    weight_decay=0.1 if optimizer.endswith("-decay") else 0.0,
    rho=0.95,
    eps=1e-7 if optimizer == "keras-ema" else 1e-6,
    decoupled=optimizer == "decoupled-decay",
    learning_rate=-1.0 if optimizer == "scale-by" else 1.0,
    maximize=optimizer == "maximize",
  ).steps[0][0]


def preset_reference(name: str, kwargs, params, grads):
  h = _numbers(
    {n: v for n, v in (PRESETS[name][1] | kwargs).items() if not isinstance(v, bool)}
  ) | {"maximize": kwargs.get("maximize", False)}
  lr = h.get("lr", h.get("learning_rate", 1.0))
  eps = h.get("eps", h.get("epsilon"))
  args = (as_list(params), [as_list(g) for g in grads])
  if name == "tfjs":
    eps = presets.TFJS_CPU_EPSILON if eps is None else eps
    return tfjs_run(*args, learning_rate=lr, rho=h["rho"], eps=eps)
  return reference.run(
    *args, learning_rate=lr, rho=h["rho"], eps=eps, weight_decay=h.get("weight_decay", 0.0),
    maximize=h["maximize"],
  ).steps  # fmt: skip


def keras_reference(kwargs, params, grads):
  """Each call's update by Keras 3.15's rules: unscale, accumulate (the mean every n calls,
  zeros in between), clip, decoupled decay, Adadelta; and the EMA after each call."""
  numeric = {n: v for n, v in kwargs.items() if n in KERAS_NUMBERS}
  h = _numbers({"learning_rate": 0.001, "rho": 0.95, "epsilon": 1e-7} | numeric)
  every = int(kwargs.get("gradient_accumulation_steps") or 1)
  unscaled = [[x / (h.get("loss_scale_factor") or 1.0) for x in as_list(g)] for g in grads]
  means = [
    [np.mean([c[i] for c in unscaled[k : k + every]], axis=0) for i in range(len(unscaled[0]))]
    for k in range(0, len(grads), every)
  ]
  clip = {n: h.get(n) for n in ("clipnorm", "clipvalue", "global_clipnorm")}
  lr = h["learning_rate"]
  run = reference.run(
    as_list(params),
    keras_preprocess(means, loss_scale_factor=None, **clip),
    learning_rate=(lambda t: lr(t * every + every - 1)) if callable(lr) else lr,
    rho=h["rho"],
    eps=h["epsilon"],
    weight_decay=h.get("weight_decay") or 0.0,
    decoupled=True,
  )
  zeros = [0 * x for x in as_list(params)]
  steps = [run.steps[c // every] if (c + 1) % every == 0 else zeros for c in range(len(grads))]
  x, average, momentum = as_list(params), None, h.get("ema_momentum", 0.99)
  for c in range(len(grads)):  # Keras's EMA: momentum 0 in the first iteration
    x = [a + b for a, b in zip(x, steps[c], strict=True)]
    m = 0.0 if c // every == 0 else momentum
    average = (
      x if average is None else [m * a + (1 - m) * b for a, b in zip(average, x, strict=True)]
    )
  return steps, average


KERAS_NUMBERS = ["learning_rate", "rho", "epsilon", "weight_decay", "loss_scale_factor",
                 "clipnorm", "clipvalue", "global_clipnorm", "ema_momentum"]  # fmt: skip


def torch_state_dict(data, rng, params, mutation):
  """A state_dict as torch.optim.Adadelta writes it, spoiled by `mutation`; its state."""
  n, step = len(params), data.draw(st.integers(0, 50), "step")
  i = data.draw(st.integers(0, n - 1), "parameter")
  state = {
    k: {"step": np.float32(step), "square_avg": torch_averages(rng, p),
        "acc_delta": torch_averages(rng, p)}
    for k, p in enumerate(params)
  }  # fmt: skip
  cut = data.draw(st.integers(0, n), "first group")
  groups = [{"params": list(range(cut)), "lr": 1.0}, {"params": list(range(cut, n)), "lr": 1.0}]
  s = state[i]
  flip = lambda x: x.real if np.iscomplexobj(x) else x + 0j
  wide = np.result_type(s["square_avg"], np.float64)
  edit = {
    "float64": lambda: s.update(square_avg=s["square_avg"].astype(wide)),
    "no-state-for-one": lambda: state.pop(i),
    "shape": lambda: s.update(square_avg=s["square_avg"][..., None]),
    "missing-key": lambda: s.pop("acc_delta"),
    "step-mismatch": lambda: s.update(step=np.float32(step + 1)),
    "step-nan": lambda: [t.update(step=np.float32("nan")) for t in state.values()],
    "step-negative": lambda: [t.update(step=np.float32(-3)) for t in state.values()],
    "step-fraction": lambda: [t.update(step=np.float32(step + 0.5)) for t in state.values()],
    "negative-value": lambda: s.update(square_avg=-1 - s["square_avg"]),
    "nan-value": lambda: s.update(acc_delta=s["acc_delta"] * np.nan),
    "kind": lambda: s.update(square_avg=flip(s["square_avg"])),
    "str-keys": lambda: [state.update({str(k): state.pop(k)}) for k in range(n)],
    "extra-index": lambda: state.update({99: dict(s)}),
    "fewer-params": lambda: groups.__setitem__(slice(None), [{"params": list(range(n - 1))}]),
    "no-params-key": lambda: groups[data.draw(st.integers(0, 1))].pop("params"),
  }  # fmt: skip
  if not (mutation == "step-mismatch" and n == 1):  # one parameter: one step count
    edit.get(mutation, lambda: None)()
  state_dict = {"state": state, "param_groups": groups}
  if mutation == "not-a-dict":
    state_dict = data.draw(st.sampled_from([[state_dict], {}, {"state": state}, None]))
  unspoiled = mutation in ("negative-value", "nan-value") and params[i].size == 0
  unspoiled |= mutation == "step-mismatch" and n == 1
  return state_dict, state, step, None if unspoiled else TORCH_MUTATIONS[mutation]


def torch_template(n: int, broken: str | None):
  template = {"state": {}, "param_groups": [{"params": list(range(n)), "lr": 1.0}]}
  if broken == "fewer":
    template["param_groups"][0]["params"].pop()
  elif broken == "no-groups":
    template.pop("param_groups")
  elif broken == "no-params":
    template["param_groups"][0].pop("params")
  return [template] if broken == "list" else template


def step_error(step):
  """None for a step count (an int >= 0), else the errors that name it."""
  ok = isinstance(step, (int, np.integer)) and not isinstance(step, bool) and step >= 0
  return [] if ok else [("step", ValueError), ("step", TypeError)]


def checkpoint_templates(saved, change: str, config):
  """The params, opt_state and config given to restore, changed by `change` (TEMPLATES)."""
  params = dict(saved["params"])
  rebuild = {
    "renamed": lambda: params.update(w2=params.pop("w")),
    "reshaped": lambda: params.update(w=params["w"].reshape(3, 2)),
    "bfloat16": lambda: params.update(b=params["b"].astype(jnp.bfloat16)),
    "int32": lambda: params.update(b=params["b"].astype(jnp.int32)),
    "extra": lambda: params.update(extra=jnp.ones(1)),
    "missing": lambda: params.pop("b"),
  }
  rebuild.get(change, lambda: None)()
  other = {
    "packed": lambda: optax_adadelta.adadelta(packed_state=True),
    "no-schedule": lambda: optax_adadelta.adadelta(),
    "keras-ema": lambda: presets.keras(use_ema=True),
    "low-memory": lambda: optax_adadelta.adadelta(state_bits=8),
    "adam": lambda: optax.adam(1e-3),
  }
  opt_state = other[change]().init(params) if change in other else saved["opt_state"]
  if change == "list":
    params = [params["b"], params["w"]]
  if change == "shape-dtype-structs":
    as_struct = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    params, opt_state = jax.tree.map(as_struct, (params, opt_state))
  config = {
    "config-changed": {"rho": 0.9, "eps": 1e-6},
    "config-extra": {**saved["config"], "x": 1},
    "config-nan": {"rho": math.nan, "eps": 1e-6},
    "config-object": {"rho": object()},
  }.get(change, config)
  return params, opt_state, config


def check_mutated_gradients(data, optimizers):
  """Gradients unlike the parameters: refused naming the leaf, or the reference's update."""
  optimizer = data.draw(st.sampled_from(optimizers), "optimizer")
  specs = data.draw(param_specs(allow_nesting=False, min_leaves=1), "parameters")
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
  leaves = [jnp.asarray(random_array(rng, shape, "float32")) for _, shape, _ in specs]
  as_dict = data.draw(st.booleans(), "a dict (else a list)")
  params = build_tree(specs, leaves) if as_dict else leaves
  mutation = data.draw(st.sampled_from(MUTATIONS), "mutation")
  if optimizer == "low-memory" and mutation == "python-float":
    mutation = "same"  # an AttributeError in the low-memory format: test_fuzz.py's strict xfail
  grads, key = mutate(data, draw_grads(data, rng, params, 1, 1.0)[0], mutation)
  note(f"gradients: {jax.tree.map(lambda x: getattr(x, 'shape', x), grads)}")
  tx = OPTIMIZERS[optimizer]()
  state = tx.init(params)
  problem = mismatch(params, grads, optimizer)
  if problem is not None:
    with pytest.raises((ValueError, TypeError)) as info:
      tx.update(grads, state, params)
    message = str(info.value)
    if problem == "structure" and isinstance(params, list):  # the trees show no indices
      names = ["do not have the structure", f"[{key}]"]
    elif problem == "structure":
      names = [repr(key)]  # in the trees the message shows
    else:
      names = [problem]
    assert any(name in message for name in names), message
    return
  updates, _ = tx.update(grads, state, params)
  g_leaves = jax.tree.structure(params).flatten_up_to(grads)
  u_leaves = jax.tree.structure(params).flatten_up_to(updates)
  for p, g, u in zip(jax.tree.leaves(params), g_leaves, u_leaves, strict=True):
    assert (u is None) == (g is None), "a None gradient, and only one, gives a None update"
    if g is not None:
      dtype = "float16" if jnp.result_type(u) == jnp.float16 else "float32"
      assert_matches(u, gradient_reference(optimizer, p, g), dtype)


SAVED: dict = {}


def saved_checkpoint():
  """One checkpoint for the session (saving costs more than a failed restore); the test
  skips where orbax is not installed."""
  pytest.importorskip("orbax.checkpoint")
  from optax_adadelta import checkpoint

  if not SAVED:
    directory = tempfile.mkdtemp(prefix="fuzz-checkpoint-") + "/ckpt"
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    tx = optax_adadelta.adadelta(learning_rate=optax.constant_schedule(1.0))
    opt_state = tx.init(params)
    _, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
    config = {"rho": 0.95, "eps": 1e-6}
    checkpoint.save(directory, params, opt_state, 1, config=config)
    SAVED.update(directory=directory, params=params, opt_state=opt_state, config=config, tx=tx)
  return SAVED
