"""optax's common suite for contributed optimizers, ported to SOFO.

In the spirit of ``optax/contrib/_common_test.py``: convergence on its four
objectives (written as Loss closures), dtype, state and sharding stability,
unknown extra arguments and no recompilation, ``optax.inject_hyperparams``,
learning-rate schedules, and gradient accumulation, which for SOFO means
micro-batches summed inside the closure (``optax.MultiSteps`` is refused).
"""

import functools
import os
import sys

import chex
import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
import reference
from commands import cpu_devices_env, run_ok
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sofo_jax
from sofo_jax import losses

# --- optax's four objectives, as Loss closures -------------------------------
# Each target returns (initial params, optimum, Loss closure, plain objective);
# the plain objective is optax's formula, checked against the closure's value.


def _parabola(dtype):
  final = jnp.array([1.0, -1.0, 1.0], dtype)
  plain = lambda p: jnp.sum((p - final) ** 2)
  # A 1-d output is a batch of one: mse sums its features, no factor 1/2.
  return (
    jnp.array([-1.0, 10.0, 1.0], dtype),
    final,
    lambda p: losses.mse(p, final),
    plain,
  )


def _rosenbrock(dtype):
  a, b = 1.0, 100.0

  def residual(p):  # (a - x)^2 + b (y - x^2)^2 is the sum of its squares
    return jnp.stack([a - p[0], np.sqrt(b) * (p[1] - p[0] ** 2)])

  plain = lambda p: (a - p[0]) ** 2 + b * (p[1] - p[0] ** 2) ** 2
  loss_fn = lambda p: losses.mse(residual(p), jnp.zeros(2, dtype))
  return jnp.zeros(2, dtype), jnp.array([a, a**2], dtype), loss_fn, plain


def _matrix_parabola(dtype):
  final = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype)
  plain = lambda p: jnp.sum((p - final) ** 2)
  loss_fn = lambda p: losses.mse(p.reshape(-1), final.reshape(-1))
  return jnp.zeros((2, 2), dtype), final, loss_fn, plain


def _mixed_tensors(dtype):
  final = (
    jnp.array([1.0, -1.0, 2.0], dtype),
    jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype),
  )
  plain = lambda p: jnp.sum((p[0] - final[0]) ** 2) + jnp.sum((p[1] - final[1]) ** 2)

  def loss_fn(p):
    return losses.mse(p[0], final[0]) + losses.mse(
      p[1].reshape(-1), final[1].reshape(-1)
    )

  initial = (jnp.zeros(3, dtype), jnp.zeros((2, 2), dtype))
  return initial, final, loss_fn, plain


# K per target: with momentum (the default) one tangent is the last update.
# The matrix (P = 4) and mixed (P = 7) targets are solved in subspaces
# smaller than P, fresh each step.
TARGETS = {
  "parabola": (_parabola, 3),
  "rosenbrock": (_rosenbrock, 3),
  "matrix_parabola": (_matrix_parabola, 3),
  "mixed_tensors": (_mixed_tensors, 4),
}


def _step(opt, loss_fn):
  def step(params, state):
    updates, state = opt.update(None, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  return step


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_converges_to_the_optimum(name):
  setup, num_tangents = TARGETS[name]
  initial, final, loss_fn, plain = setup(jnp.float32)
  # The closure is optax's objective, not a rescaled one.
  np.testing.assert_allclose(loss_fn(initial).value, plain(initial), rtol=1e-6)
  opt = sofo_jax.sofo(1.0, num_tangents, key=jax.random.key(0))  # the defaults
  state = opt.init(initial)

  def body(carry, _):
    return _step(opt, loss_fn)(*carry), None

  # Step control needs about 60 steps on Rosenbrock (it damps the
  # Gauss–Newton steps that would climb the valley's wall), the others fewer.
  (params, state), _ = jax.jit(lambda c: jax.lax.scan(body, c, length=100))(
    (initial, state)
  )
  for p, f in zip(jax.tree.leaves(params), jax.tree.leaves(final)):
    assert p.dtype == f.dtype
    np.testing.assert_allclose(p, f, atol=1e-3)
  assert float(plain(params)) < 1e-6
  assert int(sofo_jax.get_diagnostics(state).num_nonfinite_steps) == 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_state_shape_dtype_stability(dtype):
  """Updates keep the params' dtype, the state its structure, shapes and dtypes.

  As in optax, the step runs inside ``lax.cond`` against the identity, which
  only traces if both branches return the same types; a second call with the
  new state must reuse the compiled program, and an argument the optimizer
  does not know is ignored.
  """
  with reference.enable_x64(dtype == "float64"):
    dtype = jnp.dtype(dtype)
    initial, _, loss_fn, _ = _parabola(dtype)
    opt = sofo_jax.sofo(1.0, 3, key=jax.random.key(0))
    traces = []

    @jax.jit
    def step(params, state, take_step):
      traces.append(1)  # runs only while tracing
      # take_step is traced, so both branches are compiled.
      updates, new_state = jax.lax.cond(
        take_step,
        lambda: opt.update(None, state, params, loss_fn=loss_fn, unexpected_argument=1),
        lambda: (jnp.zeros_like(params), state),
      )
      return updates, new_state

    state0 = opt.init(initial)
    take_step = jnp.array(True)
    updates, state1 = step(initial, state0, take_step)
    assert updates.dtype == dtype and updates.shape == initial.shape
    _, state2 = step(optax.apply_updates(initial, updates), state1, take_step)
    assert len(traces) == 1 and step._cache_size() == 1
    for state in (state1, state2):
      assert jax.tree.structure(state) == jax.tree.structure(state0)
      for before, after in zip(jax.tree.leaves(state0), jax.tree.leaves(state)):
        assert (after.shape, after.dtype) == (before.shape, before.dtype)
    assert int(sofo_jax.get_state(state2).count) == 2
    assert bool(jnp.any(updates != 0)) and bool(jnp.all(jnp.isfinite(updates)))


def _assert_sharded_like(leaf, sharding):
  """``leaf`` has ``sharding``: the same layout, and the same partition spec."""
  assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
  # On a single device every layout is equivalent; the spec still tells
  # whether the params' sharding was carried through.
  assert isinstance(leaf.sharding, NamedSharding)
  padded = lambda spec: tuple(spec) + (None,) * (leaf.ndim - len(spec))
  assert padded(leaf.sharding.spec) == padded(sharding.spec)


def _check_state_sharding():
  """Parameter-shaped state and the updates keep the params' sharding.

  The CPU devices form a 1-D mesh; a matrix leaf is split over it and a
  vector leaf replicated. The mesh axis is of type ``Auto``, the kind
  ``jax.jit`` propagates through. As with optax's own optimizers, ``init``
  called outside ``jit`` puts the parameter-shaped buffers where the params
  are, and the scalars on one device; from the first step on, every leaf
  keeps one sharding, so later steps reuse the compiled program.
  """
  n = len(jax.devices())
  assert n >= 2, "on one device every layout is the same"
  mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  shardings = {"w": NamedSharding(mesh, P("data")), "b": NamedSharding(mesh, P())}
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(2 * n, 3)), "b": rng.normal(size=3)}
  params = jax.device_put(jax.tree.map(jnp.float32, params), shardings)
  w_target, b_target = jnp.ones((2 * n, 3)), jnp.zeros(3)
  loss_fn = lambda p: losses.mse(p["w"], w_target) + losses.mse(p["b"], b_target)
  opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(0))  # momentum keeps last_update
  state = opt.init(params)
  for name, leaf in sofo_jax.get_state(state).last_update.items():
    _assert_sharded_like(leaf, shardings[name])

  @jax.jit
  def step(params, state):
    updates, state = opt.update(None, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), updates, state

  params, updates, state1 = step(params, state)
  params, _, state2 = step(params, state1)
  params, _, _ = step(params, state2)
  assert step._cache_size() <= 2  # the first step's state, then one layout
  for tree in (params, updates):
    for name, leaf in tree.items():
      _assert_sharded_like(leaf, shardings[name])
  for name, leaf in sofo_jax.get_state(state2).last_update.items():
    _assert_sharded_like(leaf, shardings[name])
  replicated = NamedSharding(mesh, P())
  for leaf in jax.tree.leaves(sofo_jax.get_diagnostics(state2)):
    _assert_sharded_like(leaf, replicated)
  for before, after in zip(jax.tree.leaves(state1), jax.tree.leaves(state2)):
    assert after.sharding.is_equivalent_to(before.sharding, after.ndim)


def test_state_sharding_follows_the_params():
  if len(jax.devices()) >= 2:
    _check_state_sharding()
    return
  # The suite runs on one CPU device, on which every layout is the same: run
  # the check where JAX has been given two (it must be told before it starts).
  tests = os.path.dirname(os.path.abspath(__file__))
  code = "import test_common_suite as t; t._check_state_sharding()"
  run_ok([sys.executable, "-c", code], timeout=600, cwd=tests, env=cpu_devices_env(2))


# --- inject_hyperparams and schedules ----------------------------------------

_KEY = 3
_NUM_TANGENTS = 4


def _mixed():
  initial, _, loss_fn, _ = _mixed_tensors(jnp.float32)
  return initial, loss_fn


_TREE_MAP_OPTIMIZERS = {
  "sofo": lambda: sofo_jax.sofo(1.0, 4, key=jax.random.key(0)),
  "sofo_recycled": lambda: sofo_jax.sofo(1.0, 4, key=jax.random.key(0), num_recycled=1),
  "sofo_fixed_damping": lambda: sofo_jax.sofo(
    1.0, 4, key=jax.random.key(0), adaptive=False
  ),
  "forward_gradient": lambda: sofo_jax.forward_gradient(0.1, 4, key=jax.random.key(0)),
  "injected": lambda: optax.inject_hyperparams(
    sofo_jax.sofo, static_args=("num_tangents", "key")
  )(learning_rate=1.0, num_tangents=4, key=jax.random.key(0)),
}


@pytest.mark.parametrize("name", sorted(_TREE_MAP_OPTIMIZERS))
def test_tree_map_params_reaches_every_params_shaped_buffer(name):
  """optax.tree_map_params, used to build the state's partition specs: it
  maps exactly the fields shaped like the params and nothing else."""
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
  loss_fn = lambda p: losses.mse(jnp.tanh(x @ p["w"] + p["b"]), jnp.ones((4, 2)))
  opt = _TREE_MAP_OPTIMIZERS[name]()
  _, state = opt.update(None, opt.init(params), params, loss_fn=loss_fn)
  specs = {"w": P("data", None), "b": P()}
  mapped = optax.tree_map_params(
    opt, lambda _, spec: spec, state, specs, transform_non_params=lambda _: "other"
  )
  inner, mapped_inner = sofo_jax.get_state(state), sofo_jax.get_state(mapped)
  buffers = [
    field
    for field in ("last_update", "recycled")
    if getattr(inner, field, None) is not None
  ]
  assert buffers == {
    "sofo": ["last_update"],  # the momentum tangent
    "sofo_recycled": ["last_update", "recycled"],
    "injected": ["last_update"],
  }.get(name, [])
  for field in buffers:
    assert getattr(mapped_inner, field) == specs
  # Everything else (count, key, damping, diagnostics) is not params-shaped.
  others = [leaf for leaf in jax.tree.leaves(mapped) if not isinstance(leaf, P)]
  assert others and set(others) == {"other"}
  assert len(others) == len(jax.tree.leaves(state)) - 2 * len(buffers)


def test_tree_map_params_with_untrained_leaves_follows_optax_masked():
  """Leaves SOFO does not train (outside the mask, or integer) hold
  optax.MaskedNode in the buffers, as in optax.masked's state: tree_map_params
  reaches them with the same is_leaf."""
  params = {"w": jnp.ones((3, 2)), "frozen": jnp.ones(2), "n": jnp.array(3)}
  opt = sofo_jax.sofo(
    1.0, 4, key=jax.random.key(0), mask={"w": True, "frozen": False, "n": False}
  )
  state = opt.init(params)
  is_masked = lambda node: isinstance(node, optax.MaskedNode)
  as_bfloat16 = optax.tree_map_params(
    opt,
    lambda p: p if is_masked(p) else p.astype(jnp.bfloat16),
    state,
    is_leaf=is_masked,
  )
  last_update = sofo_jax.get_state(as_bfloat16).last_update
  assert last_update["w"].dtype == jnp.bfloat16
  assert is_masked(last_update["frozen"]) and is_masked(last_update["n"])
  assert sofo_jax.get_state(as_bfloat16).damping.dtype == jnp.float32


def test_params_with_no_leaves_init_for_tree_map_params_but_do_not_train():
  opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(0))
  state = opt.init({})  # what optax.tree_map_params does with its placeholder
  with pytest.raises(ValueError, match="no floating-point parameters"):
    opt.update(None, state, {}, loss_fn=lambda p: losses.mse(jnp.zeros(1), jnp.ones(1)))


@functools.cache
def _injected():
  """``inject_hyperparams(sofo)`` and its jitted step (shared by two tests)."""
  _, loss_fn = _mixed()
  opt = optax.inject_hyperparams(sofo_jax.sofo, static_args=("num_tangents", "key"))(
    learning_rate=1.0, num_tangents=_NUM_TANGENTS, key=jax.random.key(_KEY)
  )
  return opt, jax.jit(_step(opt, loss_fn))


def test_inject_hyperparams_matches_the_plain_optimizer():
  params, loss_fn = _mixed()
  plain = sofo_jax.sofo(1.0, _NUM_TANGENTS, key=jax.random.key(_KEY))
  injected, injected_step = _injected()
  plain_step = jax.jit(_step(plain, loss_fn))
  s_plain, s_injected = plain.init(params), injected.init(params)
  p_plain = p_injected = params
  for _ in range(3):
    p_plain, s_plain = plain_step(p_plain, s_plain)
    p_injected, s_injected = injected_step(p_injected, s_injected)
  chex.assert_trees_all_close(p_injected, p_plain, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(
    sofo_jax.get_state(s_injected), sofo_jax.get_state(s_plain), rtol=1e-6, atol=1e-7
  )
  assert (
    float(jnp.linalg.norm(ravel_pytree(p_plain)[0] - ravel_pytree(params)[0])) > 0.1
  )


def test_schedule_equals_the_learning_rate_injected_step_by_step():
  """``sofo(optax.linear_schedule(...))`` takes at step t the step that the
  injected optimizer takes with its learning rate set to ``schedule(t)``,
  from the same parameters and SOFO state (step control included: it
  evaluates its trial points at that rate). The injected step compiles once.
  """
  params, loss_fn = _mixed()
  schedule = optax.linear_schedule(0.25, 1.0, transition_steps=3)
  scheduled = sofo_jax.sofo(schedule, _NUM_TANGENTS, key=jax.random.key(_KEY))
  injected, injected_step = _injected()
  scheduled_step = jax.jit(_step(scheduled, loss_fn))
  s_scheduled, s_injected = scheduled.init(params), injected.init(params)
  moves = []
  for t in range(4):
    s_injected.hyperparams["learning_rate"] = jnp.asarray(schedule(t), jnp.float32)
    p_injected, s_injected = injected_step(params, s_injected)
    new_params, s_scheduled = scheduled_step(params, s_scheduled)
    chex.assert_trees_all_close(new_params, p_injected, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(
      sofo_jax.get_state(s_scheduled),
      sofo_jax.get_state(s_injected),
      rtol=1e-6,
      atol=1e-7,
    )
    moves.append(
      float(jnp.linalg.norm(ravel_pytree(new_params)[0] - ravel_pytree(params)[0]))
    )
    params = new_params
  assert injected_step._cache_size() == 1  # new rates, no recompilation
  assert min(moves) > 0


# --- gradient accumulation: micro-batches, and optax.MultiSteps ---------------


@pytest.mark.parametrize(
  "make",
  [
    lambda: sofo_jax.sofo(1.0, 3, key=jax.random.key(0)),
    lambda: sofo_jax.forward_gradient(0.1, 3, key=jax.random.key(0)),
  ],
  ids=["sofo", "forward_gradient"],
)
def test_multisteps_is_refused_with_the_micro_batch_pattern(make):
  """MultiSteps would use the last micro-batch's closure only: a clear error.

  Raised by ``init`` and, for a state built without it, by ``update`` at
  trace time.
  """
  initial, _, loss_fn, _ = _parabola(jnp.float32)
  accumulated = optax.MultiSteps(make(), every_k_schedule=4)
  for init in (accumulated.init, jax.jit(accumulated.init)):
    with pytest.raises(TypeError, match=r"optax\.MultiSteps") as error:
      init(initial)
    assert "lax.scan" in str(error.value) and "losses.zero()" in str(error.value)
  state = optax.MultiStepsState(
    mini_step=jnp.zeros((), jnp.int32),
    gradient_step=jnp.zeros((), jnp.int32),
    inner_opt_state=make().init(initial),
    acc_grads=jnp.zeros_like(initial),
  )
  update = jax.jit(
    lambda p, s: accumulated.update(jnp.zeros_like(p), s, p, loss_fn=loss_fn)
  )
  with pytest.raises(TypeError, match=r"optax\.MultiSteps"):
    update(initial, state)


def _classification(num_micro_batches=4, micro_batch_size=3):
  """An MLP's float64 data, as micro-batches (M, b, ...) and as one batch."""
  rng = np.random.default_rng(7)
  params = models.mlp_params(rng, [3, 5, 4])
  n = num_micro_batches * micro_batch_size
  x = rng.normal(size=(n, 3))
  labels = rng.integers(0, 4, n)
  micro = (
    x.reshape(num_micro_batches, micro_batch_size, 3),
    labels.reshape(num_micro_batches, micro_batch_size),
  )
  return params, (x, labels), micro


def _micro_batched_loss(params, xs, ys):
  """The documented pattern: micro-batch losses summed in a scan, then averaged."""

  def body(total, batch):
    x, y = batch
    return total + losses.softmax_cross_entropy(models.mlp(params, x), y), None

  total, _ = jax.lax.scan(body, losses.zero(), (xs, ys))
  return total / xs.shape[0]


def test_micro_batched_sketch_equals_the_dense_full_batch_sketch(x64):
  params, (x, labels), (xs, ys) = _classification()
  rng = np.random.default_rng(1)
  tangents = jax.tree.map(lambda p: rng.normal(size=(5, *p.shape)), params)
  value, g, gauss_newton = sofo_jax.sketch(
    lambda p: _micro_batched_loss(p, xs, ys), params, tangents
  )

  def plain_loss(outputs):  # mean over the whole batch, written out
    log_p = jax.nn.log_softmax(outputs)
    return -jnp.mean(jnp.take_along_axis(log_p, jnp.asarray(labels)[:, None], -1))

  outputs_fn = lambda p: models.mlp(p, x)
  g_dense, gn_dense = reference.dense_gauss_newton(params, outputs_fn, plain_loss)
  theta = jax.vmap(lambda t: ravel_pytree(t)[0])(tangents)  # (K, P)
  np.testing.assert_allclose(value, plain_loss(outputs_fn(params)), rtol=1e-13)
  np.testing.assert_allclose(g, theta @ g_dense, rtol=1e-11, atol=1e-14)
  np.testing.assert_allclose(
    gauss_newton, theta @ gn_dense @ theta.T, rtol=1e-11, atol=1e-14
  )


def test_one_step_with_micro_batches_equals_the_full_batch_step(x64):
  """Same key, so same tangents: the micro-batched closure gives the same
  sketch, step control sees the same trial losses, and so the same updates
  and state, over two steps (the second uses momentum)."""
  params, (x, labels), (xs, ys) = _classification()
  full = lambda p: losses.softmax_cross_entropy(models.mlp(p, x), labels)
  micro = lambda p: _micro_batched_loss(p, xs, ys)
  results = []
  for loss_fn in (full, micro):
    opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(2))
    step = jax.jit(_step(opt, loss_fn))
    p, s = params, opt.init(params)
    trajectory = []
    for _ in range(2):
      p, s = step(p, s)
      trajectory.append((p, sofo_jax.get_state(s)))
    results.append(trajectory)
  for (p_full, s_full), (p_micro, s_micro) in zip(*results):
    chex.assert_trees_all_close(p_micro, p_full, rtol=1e-10, atol=1e-13)
    chex.assert_trees_all_close(s_micro, s_full, rtol=1e-9, atol=1e-12)
  moved = ravel_pytree(results[0][-1][0])[0] - ravel_pytree(params)[0]
  assert float(jnp.linalg.norm(moved)) > 1e-3
  assert not bool(results[0][-1][1].diagnostics.step_rejected)
