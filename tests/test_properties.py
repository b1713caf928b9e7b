"""Property-based tests: SOFO and FGD on random parameter pytrees.

Hypothesis draws a parameter pytree (nested dicts, tuples, lists and equinox
modules; 0-d, 1-d, 2-d and size-0 float32 / float64 / bfloat16 arrays, Python
floats, integer arrays and Python ints), a tangent count K (often larger
than the number of parameters P), a damping, a tangent distribution and
sometimes a mask. For every draw, one jitted training step must

- give finite updates with the structure, shapes and dtypes of the params,
- leave integer leaves and masked-out leaves bit-for-bit unchanged,
- keep the optimizer state's structure, shapes and dtypes (so it can be a
  ``lax.scan`` carry or a checkpoint),
- predict a non-negative decrease of the local quadratic model, and
- trace once: feeding the step its own outputs does not recompile.

Each example compiles a new program, so the problem is tiny and the example
counts small; ``derandomize`` keeps the run reproducible.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference

import sofo_jax
from sofo_jax import losses
from sofo_jax._src import tree as tree_lib

SETTINGS = dict(
  deadline=None,
  derandomize=True,
  database=None,
  suppress_health_check=[
    hypothesis.HealthCheck.too_slow,
    hypothesis.HealthCheck.data_too_large,
  ],
)


class Block(eqx.Module):
  """An equinox module with an array, any leaf, an int counter and a static."""

  weight: Any
  extra: Any
  steps: jax.Array
  name: str = eqx.field(static=True, default="block")


# Parameter specs -------------------------------------------------------------
# Hypothesis draws a *spec* (plain Python data) and the test builds the arrays
# inside the right x64 context, so float64 leaves really are float64.

SHAPES = [(), (0,), (2,), (1, 3), (0, 2), (3,)]
FLOAT_DTYPES = ["float32", "float64", "bfloat16"]

float_leaf = st.tuples(
  st.just("array"),
  st.sampled_from(SHAPES),
  st.sampled_from(FLOAT_DTYPES),
  st.integers(0, 2**16),
)
int_leaf = st.tuples(
  st.just("int_array"),
  st.sampled_from([(), (2,)]),
  st.just("int32"),
  st.integers(0, 2**16),
)
python_float = st.tuples(st.just("pyfloat"), st.floats(-2.0, 2.0, width=32))
python_int = st.tuples(st.just("pyint"), st.integers(-5, 5))
leaf_spec = st.one_of(
  float_leaf, float_leaf, float_leaf, int_leaf, python_float, python_int
)


def _containers(children):
  return st.one_of(
    st.dictionaries(st.sampled_from("abcd"), children, min_size=1, max_size=3).map(
      lambda d: ("dict", d)
    ),
    st.lists(children, min_size=1, max_size=3).map(
      lambda items: ("tuple", tuple(items))
    ),
    st.lists(children, min_size=1, max_size=2).map(lambda items: ("list", items)),
    st.tuples(children, children).map(lambda ab: ("module", ab)),
  )


param_spec = st.recursive(leaf_spec, _containers, max_leaves=6)


def build(spec):
  """Turns a spec into a parameter pytree (call inside the x64 context)."""
  kind = spec[0]
  if kind in ("array", "int_array"):
    _, shape, dtype, seed = spec
    rng = np.random.default_rng(seed)
    if kind == "int_array":
      return jnp.asarray(rng.integers(-9, 9, size=shape), dtype)
    return jnp.asarray(rng.normal(size=shape), dtype)
  if kind in ("pyfloat", "pyint"):
    return spec[1]
  if kind == "dict":
    return {k: build(v) for k, v in spec[1].items()}
  if kind == "tuple":
    return tuple(build(v) for v in spec[1])
  if kind == "list":
    return [build(v) for v in spec[1]]
  if kind == "module":
    a, b = spec[1]
    return Block(weight=build(a), extra=build(b), steps=jnp.asarray(3, jnp.int32))
  raise AssertionError(kind)


def uses_x64(spec) -> bool:
  if spec[0] == "array":
    return spec[2] == "float64"
  if spec[0] in ("dict",):
    return any(uses_x64(v) for v in spec[1].values())
  if spec[0] in ("tuple", "list", "module"):
    return any(uses_x64(v) for v in spec[1])
  return False


# Helpers ----------------------------------------------------------------------


def is_float_leaf(leaf) -> bool:
  return (
    eqx.is_array_like(leaf)
    and not isinstance(leaf, bool)
    and bool(jnp.issubdtype(jnp.result_type(leaf), jnp.floating))
  )


def float_leaves(tree) -> list:
  return [leaf for leaf in jax.tree.leaves(tree) if is_float_leaf(leaf)]


def has_python_scalars(tree) -> bool:
  return any(isinstance(leaf, (int, float)) for leaf in jax.tree.leaves(tree))


def num_params(tree) -> int:
  return sum(int(np.size(leaf)) for leaf in float_leaves(tree))


def make_loss_fn(params):
  """A curvature-aware loss that depends on every float leaf, any pytree."""
  dtype = jnp.zeros(()).dtype
  size = num_params(params) + 1
  target = jnp.asarray(np.linspace(-1.0, 1.0, size), dtype)

  def loss_fn(p):
    pieces = [jnp.ravel(jnp.asarray(leaf)).astype(dtype) for leaf in float_leaves(p)]
    vector = jnp.concatenate([*pieces, jnp.ones((1,), dtype)])
    # Cross-terms between parameters give a non-diagonal Gauss–Newton matrix.
    outputs = jnp.stack([jnp.tanh(vector), jnp.tanh(jnp.cumsum(vector))], -1)
    return losses.mse(outputs, jnp.stack([target, -target], -1))

  return loss_fn


def to_numpy(leaf) -> np.ndarray:
  # NumPy checks: an eager jnp op would compile once per new shape and dtype.
  return np.asarray(leaf).astype(np.float64)


def avals(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def make_optimizer(name, num_tangents, damping, relative, distribution, mask):
  key = jax.random.key(0)
  if name == "sofo":
    return sofo_jax.sofo(
      0.5,
      num_tangents,
      damping,
      key=key,
      # Without a floor, so that the drawn damping (0 included) is the one used.
      step_control=sofo_jax.StepControl(min_damping=0.0),
      relative_damping=relative,
      tangent_distribution=distribution,
      mask=mask,
    )
  return sofo_jax.forward_gradient(0.01, num_tangents, key=key, mask=mask)


def random_mask(params, flags):
  """A mask with the structure of ``params`` from a list of drawn bools."""
  leaves, treedef = jax.tree.flatten(params)
  flags = (flags * (len(leaves) // max(len(flags), 1) + 1))[: len(leaves)]
  return jax.tree.unflatten(treedef, [bool(f) for f in flags])


# The property ------------------------------------------------------------------


F32_VECTOR = ("array", (3,), "float32", 1)
EDGE_CASES = {
  # name: (spec, optimizer, K, damping, relative, distribution)
  "size_zero_leaf": (
    ("dict", {"a": ("array", (0,), "float32", 0), "b": F32_VECTOR}),
    "sofo",
    4,
    1e-4,
    True,
    "normalized_gaussian",
  ),
  "only_size_zero_leaves": (
    ("tuple", (("array", (0, 2), "float32", 0),)),
    "sofo",
    2,
    0.0,
    True,
    "orthonormal",
  ),
  "bf16_and_k_above_p": (
    ("dict", {"a": ("array", (2,), "bfloat16", 2), "b": F32_VECTOR}),
    "sofo",
    12,
    0.0,
    True,
    "orthonormal",
  ),
  "scalar_leaf": (
    ("array", (), "float32", 3),
    "sofo",
    3,
    1e-4,
    False,
    "normalized_gaussian",
  ),
  "nested_tuples_with_ints": (
    ("tuple", (F32_VECTOR, ("tuple", (("pyint", 2), ("int_array", (2,), "int32", 4))))),
    "sofo",
    2,
    1e-1,
    True,
    "orthonormal",
  ),
  "module_float64": (
    ("module", (("array", (1, 3), "float64", 5), ("pyfloat", 0.5))),
    "sofo",
    5,
    1e-4,
    True,
    "normalized_gaussian",
  ),
  "fgd_bf16": (
    ("list", [("array", (1, 3), "bfloat16", 6), ("pyint", 1)]),
    "forward_gradient",
    3,
    0.0,
    True,
    "normalized_gaussian",
  ),
}


def _with_edge_cases(test):
  for spec, name, k, damping, relative, distribution in EDGE_CASES.values():
    test = hypothesis.example(
      spec=spec,
      name=name,
      num_tangents=k,
      damping=damping,
      relative=relative,
      distribution=distribution,
      mask_flags=None,
    )(test)
  return test


@hypothesis.settings(max_examples=10, **SETTINGS)
@_with_edge_cases
@hypothesis.given(
  spec=param_spec,
  name=st.sampled_from(["sofo", "sofo", "forward_gradient"]),
  num_tangents=st.integers(1, 12),
  damping=st.sampled_from([0.0, 1e-8, 1e-4, 1e-1, 10.0]),
  relative=st.booleans(),
  distribution=st.sampled_from(["normalized_gaussian", "orthonormal"]),
  mask_flags=st.one_of(st.none(), st.lists(st.booleans(), min_size=1, max_size=6)),
)
def test_one_step_is_finite_and_keeps_structure(
  spec, name, num_tangents, damping, relative, distribution, mask_flags
):
  with reference.enable_x64(uses_x64(spec)):
    params = build(spec)
    mask = None if mask_flags is None else random_mask(params, mask_flags)
    opt = make_optimizer(name, num_tangents, damping, relative, distribution, mask)
    trainable = tree_lib.partition(params, mask).trainable
    if not trainable:
      with pytest.raises(ValueError, match="no floating-point parameters"):
        opt.init(params)
      return
    loss_fn = make_loss_fn(params)
    state = opt.init(params)
    traces = []

    @jax.jit
    def step(p, s):
      traces.append(None)  # runs once per trace, never at run time
      updates, s = opt.update(None, s, p, loss_fn=loss_fn)
      return optax.apply_updates(p, updates), s, updates

    new_params, new_state, updates = step(params, state)

    # Updates: finite, shaped and typed like the params.
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      assert jnp.shape(u) == jnp.shape(p)
      if is_float_leaf(p):
        assert jnp.result_type(u) == jnp.result_type(p)
        assert np.all(np.isfinite(to_numpy(u)))

    # New params: same structure, shapes, dtypes; finite; frozen leaves exact.
    assert jax.tree.structure(new_params) == jax.tree.structure(params)
    flags = tree_lib.partition(params, mask).trainable_flags
    for flag, new, old in zip(
      flags, jax.tree.leaves(new_params), jax.tree.leaves(params)
    ):
      assert jnp.shape(new) == jnp.shape(old)
      assert jnp.result_type(new) == jnp.result_type(old)
      if is_float_leaf(old):
        assert np.all(np.isfinite(to_numpy(new)))
      if not flag:  # integer, Python int, or masked out: untouched
        np.testing.assert_array_equal(to_numpy(new), to_numpy(old))

    # State: fixed structure, shapes and dtypes; the step was taken.
    assert avals(new_state) == avals(state)
    diagnostics = sofo_jax.get_diagnostics(new_state)
    assert bool(diagnostics.step_is_finite)
    assert int(diagnostics.num_nonfinite_steps) == 0
    assert int(sofo_jax.get_state(new_state).count) == 1
    if name == "sofo":
      scale = 1.0 + float(diagnostics.gradient_norm) ** 2 / max(
        float(diagnostics.max_eigenvalue), 1e-30
      )
      assert float(diagnostics.predicted_decrease) >= -1e-4 * scale

    # No recompilation when the step is fed its own outputs. A Python scalar
    # leaf is weakly typed on the first call and a strongly typed array after
    # optax.apply_updates, which costs exactly one extra trace.
    step(new_params, new_state)
    settled = len(traces)
    assert settled == (2 if has_python_scalars(params) else 1)
    step(*step(new_params, new_state)[:2])
    assert len(traces) == settled


@hypothesis.settings(max_examples=8, **SETTINGS)
@hypothesis.given(
  num_tangents=st.integers(1, 16),
  size=st.integers(1, 5),
  distribution=st.sampled_from(["normalized_gaussian", "orthonormal"]),
  seed=st.integers(0, 2**31 - 1),
)
def test_tangents_are_finite_and_normalised(num_tangents, size, distribution, seed):
  params = {
    "a": jnp.zeros((size,)),
    "b": jnp.zeros((0, 3)),
    "c": jnp.zeros((), jnp.bfloat16),
  }
  sample = jax.jit(sofo_jax.sample_tangents, static_argnums=(2, 3))
  tangents = sample(jax.random.key(seed), params, num_tangents, distribution)
  flat = np.concatenate(
    [to_numpy(t).reshape(num_tangents, -1) for t in jax.tree.leaves(tangents)], 1
  )
  assert np.all(np.isfinite(flat))
  assert tangents["c"].dtype == jnp.bfloat16 and tangents["b"].shape == (
    num_tangents,
    0,
    3,
  )
  p = size + 1
  if distribution == "normalized_gaussian":
    # bf16 storage of one coordinate limits the precision of the norm.
    np.testing.assert_allclose(np.linalg.norm(flat, axis=1), 1.0, atol=1e-2)
  elif num_tangents <= p:
    np.testing.assert_allclose(flat @ flat.T, np.eye(num_tangents), atol=2e-2)
  else:  # a Parseval frame: Θ Θᵀ = I_P
    np.testing.assert_allclose(flat.T @ flat, np.eye(p), atol=2e-2)
