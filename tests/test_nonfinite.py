"""Numerical trouble never reaches the parameters, and the state says why.

NaN or inf in the loss, in the model outputs, in the sketched gradient or in
the sketched curvature; a zero gradient; a rank-deficient sketch; damping 0;
a step that overflows a float16 leaf. In every case the parameters stay
finite (a skipped step is exactly zero), ``step_is_finite`` and
``num_nonfinite_steps`` report what happened, and training goes on when the
data is good again. Also: what ``optax.apply_if_finite`` really does around
SOFO.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sofo_jax
from sofo_jax import losses

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(16, 3)), jnp.float32)
W_TRUE = jnp.asarray([[1.0], [-2.0], [0.5]])
Y = X @ W_TRUE
PARAMS = {"w": jnp.zeros((3, 1)), "b": jnp.zeros((1,))}
# Step control without its damping floor, for the tests that ask for damping 0.
NO_FLOOR = sofo_jax.StepControl(min_damping=0.0)


def linear(p, x):
  return x @ p["w"] + p["b"]


def good_loss(p, x=X, y=Y):
  return losses.mse(linear(p, x), y)


OPTIMIZERS = {
  "sofo": lambda **kw: sofo_jax.sofo(1.0, 4, 1e-4, key=jax.random.key(0), **kw),
  "forward_gradient": lambda **kw: sofo_jax.forward_gradient(
    0.05, 4, key=jax.random.key(0), **kw
  ),
}


def train_step(opt):
  @jax.jit
  def step(params, state, x, y):
    updates, state = opt.update(
      None, state, params, loss_fn=lambda p: good_loss(p, x, y)
    )
    return optax.apply_updates(params, updates), state, updates

  return step


def assert_skipped(opt, loss_fn, params=PARAMS):
  """One update with ``loss_fn``: zero update, unchanged params, reported."""
  state = opt.init(params)
  updates, state = jax.jit(lambda p, s: opt.update(None, s, p, loss_fn=loss_fn))(
    params, state
  )
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)
  new_params = optax.apply_updates(params, updates)
  jax.tree.map(np.testing.assert_array_equal, new_params, params)
  diagnostics = sofo_jax.get_diagnostics(state)
  assert not bool(diagnostics.step_is_finite)
  assert int(diagnostics.num_nonfinite_steps) == 1
  # The key still advances, so the next step draws fresh tangents.
  assert int(sofo_jax.get_state(state).count) == 1
  return diagnostics


# What goes wrong, and where ----------------------------------------------------

BAD_LOSSES = {
  # NaN in the data reaches the loss value.
  "nan_targets": lambda p: good_loss(p, y=Y.at[3].set(jnp.nan)),
  # A model that overflows on some inputs: inf outputs, inf loss.
  "inf_outputs": lambda p: losses.mse(jnp.exp(1e3 * X[:, :1]) * linear(p, X), Y),
  # inf - inf inside the model: NaN outputs.
  "nan_outputs": lambda p: losses.mse(linear(p, X) + (jnp.inf - jnp.inf), Y),
  # Finite loss, infinite derivative: sqrt at 0 (the sketched gradient).
  "infinite_gradient": lambda p: losses.mse(jnp.sqrt(jnp.abs(linear(p, X))), Y),
  # Finite loss and gradient, infinite output-space curvature (the sketched
  # Gauss–Newton matrix): |y|^1.5 at y = 0.
  "infinite_curvature": lambda p: losses.custom(
    linear(p, X), lambda y: jnp.sum(jnp.abs(y) ** 1.5)
  ),
}


@pytest.mark.parametrize("where", sorted(BAD_LOSSES))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_nonfinite_step_is_skipped_and_reported(name, where):
  if name == "forward_gradient" and where == "infinite_curvature":
    pytest.skip("forward gradients never look at curvature")
  diagnostics = assert_skipped(OPTIMIZERS[name](), BAD_LOSSES[where])
  if where in ("infinite_gradient", "infinite_curvature"):
    # The loss itself was fine: the diagnostics locate the problem further on.
    assert bool(jnp.isfinite(diagnostics.loss))
  if where == "infinite_curvature" and name != "forward_gradient":
    assert bool(jnp.isfinite(diagnostics.gradient_norm))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_bad_batches_are_skipped_inside_a_scan_and_training_goes_on(name):
  """50 steps in ``lax.scan``; every third batch has a NaN target."""
  opt = OPTIMIZERS[name]()
  step = train_step(opt)
  num_steps = 51
  bad = (np.arange(num_steps) % 3) == 1
  ys = np.repeat(np.asarray(Y)[None], num_steps, 0)
  ys[bad, 0, 0] = np.nan

  def body(carry, y):
    params, state = carry
    params, state, _ = step(params, state, X, y)
    diagnostics = sofo_jax.get_diagnostics(state)
    return (params, state), (diagnostics.step_is_finite, diagnostics.loss)

  (params, state), (finite, loss) = jax.lax.scan(
    body, (PARAMS, opt.init(PARAMS)), jnp.asarray(ys)
  )
  chex.assert_tree_all_finite(params)
  np.testing.assert_array_equal(finite, ~bad)
  assert int(sofo_jax.get_diagnostics(state).num_nonfinite_steps) == bad.sum()
  assert int(sofo_jax.get_state(state).count) == num_steps
  good_losses = np.asarray(loss)[~bad]
  assert np.all(np.isnan(np.asarray(loss)[bad]))
  assert good_losses[-1] < 0.5 * good_losses[0]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_nan_in_params_is_not_spread(name):
  """A NaN already in one leaf leaves every other leaf bit-for-bit alone."""
  params = {"w": PARAMS["w"].at[0, 0].set(jnp.nan), "b": jnp.ones((1,))}
  opt = OPTIMIZERS[name]()
  new_params, state, _ = train_step(opt)(params, opt.init(params), X, Y)
  np.testing.assert_array_equal(new_params["b"], params["b"])
  np.testing.assert_array_equal(new_params["w"], params["w"])
  assert not bool(sofo_jax.get_diagnostics(state).step_is_finite)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_float16_overflow_is_skipped(name):
  """A finite float32 step that overflows when cast to a float16 leaf."""
  params = {"w": jnp.ones((3,), jnp.float16)}
  loss_fn = lambda p: losses.custom(
    p["w"].astype(jnp.float32), lambda w: 1e5 * jnp.sum(w) + 1e-6 * jnp.sum(w**2)
  )
  opt = (
    sofo_jax.sofo(1.0, 2, 0.0, key=jax.random.key(0), adaptive=False)
    if name.startswith("sofo")
    else OPTIMIZERS[name]()
  )
  assert_skipped(opt, loss_fn, params)


def test_float16_overflow_is_rejected_by_step_control():
  """With step control the overflowing trials have non-finite losses: rejected."""
  params = {"w": jnp.ones((3,), jnp.float16)}
  loss_fn = lambda p: losses.custom(
    p["w"].astype(jnp.float32), lambda w: 1e5 * jnp.sum(w) + 1e-6 * jnp.sum(w**2)
  )
  opt = sofo_jax.sofo(1.0, 2, 0.0, key=jax.random.key(0), step_control=NO_FLOOR)
  state = opt.init(params)
  updates, state = jax.jit(lambda p, s: opt.update(None, s, p, loss_fn=loss_fn))(
    params, state
  )
  jax.tree.map(
    np.testing.assert_array_equal, optax.apply_updates(params, updates), params
  )
  diagnostics = sofo_jax.get_diagnostics(state)
  assert bool(diagnostics.step_rejected)
  assert int(diagnostics.num_rejected_steps) == 1
  assert jax.tree.leaves(optax.apply_updates(params, updates))[0].dtype == jnp.float16


# Degenerate but finite sketches ------------------------------------------------


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_zero_gradient_gives_an_exact_zero_step(name):
  """At an exact minimum the sketch is zero: the step is zero, not NaN."""
  params = {"w": W_TRUE, "b": jnp.zeros((1,))}
  opt = OPTIMIZERS[name]()
  _new_params, state, updates = train_step(opt)(params, opt.init(params), X, Y)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)
  diagnostics = sofo_jax.get_diagnostics(state)
  assert bool(diagnostics.step_is_finite)  # nothing went wrong: nothing to do
  assert float(diagnostics.gradient_norm) == 0.0


@pytest.mark.parametrize("relative", [True, False])
def test_all_zero_sketch_with_zero_damping(relative):
  """A loss that ignores the params: G = 0, g = 0 and damping 0, so 0/0."""
  opt = sofo_jax.sofo(
    1.0, 3, 0.0, key=jax.random.key(0), relative_damping=relative, step_control=NO_FLOOR
  )
  loss_fn = lambda p: losses.mse(Y, jnp.zeros_like(Y))
  state = opt.init(PARAMS)
  updates, state = jax.jit(lambda s: opt.update(None, s, PARAMS, loss_fn=loss_fn))(
    state
  )
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)
  diagnostics = sofo_jax.get_diagnostics(state)
  assert bool(diagnostics.step_is_finite)
  np.testing.assert_array_equal(diagnostics.eigenvalues, 0.0)
  assert float(diagnostics.predicted_decrease) == 0.0


@pytest.mark.parametrize("num_tangents", [4, 9, 24])
def test_k_above_p_without_damping_is_the_exact_gauss_newton_step(num_tangents):
  """K >= P orthonormal tangents form a frame: Θ(ΘᵀGΘ)⁺Θᵀ = G⁺, so one step
  with no damping solves linear least squares, even with K > P (a
  rank-deficient K×K sketch)."""
  opt = sofo_jax.sofo(
    1.0,
    num_tangents,
    0.0,
    key=jax.random.key(1),
    tangent_distribution="orthonormal",
    momentum=False,
    # No floor either: the default floor would damp the step by 1e-4 s_max.
    step_control=NO_FLOOR,
  )
  new_params, state, _ = train_step(opt)(PARAMS, opt.init(PARAMS), X, Y)
  np.testing.assert_allclose(new_params["w"], W_TRUE, atol=1e-4)
  np.testing.assert_allclose(new_params["b"], 0.0, atol=1e-4)
  eigenvalues = sofo_jax.get_diagnostics(state).eigenvalues
  # Rank P = 4: the other K - 4 eigenvalues are exactly zero after the cutoff.
  assert int(jnp.sum(eigenvalues > 0)) == 4


@pytest.mark.parametrize("distribution", ["normalized_gaussian", "orthonormal"])
@pytest.mark.parametrize("damping", [0.0, 1e-9])
def test_outputs_independent_of_some_params_with_tiny_damping(distribution, damping):
  """The sketch is rank-deficient along parameters the outputs ignore, and
  damping 0 (or 1e-9, below float32 round-off) does not regularise it.
  Round-off along those directions must not be divided by round-off: once
  the fit has converged the steps vanish, instead of kicking the ignored
  parameters around at every step (a random walk)."""
  params = dict(PARAMS, unused=jnp.ones((6,)))  # P = 10 > K = 8
  # Noisy targets: the residual at the optimum is not zero, so neither is the
  # round-off in the sketched gradient along the ignored directions.
  y = Y + jnp.asarray(RNG.normal(size=Y.shape), jnp.float32)
  design = np.concatenate([np.asarray(X), np.ones((len(X), 1))], 1)
  residual = np.linalg.lstsq(design, np.asarray(y), rcond=None)[1][0]
  best = residual / len(X)
  opt = sofo_jax.sofo(
    1.0,
    8,
    damping,
    key=jax.random.key(2),
    tangent_distribution=distribution,
    step_control=NO_FLOOR,
  )
  step = train_step(opt)
  state = opt.init(params)
  for i in range(30):
    params, state, updates = step(params, state, X, y)
    if i >= 20:
      assert float(jnp.max(jnp.abs(updates["unused"]))) < 1e-4
  chex.assert_tree_all_finite(params)
  np.testing.assert_allclose(good_loss(params, y=y).value, best, rtol=1e-4)
  assert int(sofo_jax.get_diagnostics(state).num_nonfinite_steps) == 0


def test_zero_damping_never_increases_a_quadratic():
  """Damping 0, K < P: each step minimises the quadratic in its subspace."""
  params = {"w": jnp.zeros((3, 1)), "b": jnp.zeros((1,))}
  opt = sofo_jax.sofo(1.0, 2, 0.0, key=jax.random.key(3), step_control=NO_FLOOR)
  step = train_step(opt)
  state = opt.init(params)
  previous = float(good_loss(params).value)
  start = previous
  for _ in range(10):
    params, state, _ = step(params, state, X, Y)
    current = float(good_loss(params).value)
    assert current <= previous * (1 + 1e-5)
    previous = current
  assert previous < 0.1 * start


# Bad damping -------------------------------------------------------------------


@pytest.mark.parametrize("damping", [-1e-3, float("nan"), float("inf")])
def test_bad_concrete_damping_is_rejected_eagerly(damping):
  with pytest.raises(ValueError, match="damping must be finite and >= 0"):
    sofo_jax.sofo(1.0, 2, damping, key=jax.random.key(0))


@pytest.mark.parametrize("damping", [-1e-3, float("nan")])
def test_bad_injected_damping_skips_the_step(damping):
  """A traced damping (inject_hyperparams) cannot be checked eagerly."""
  opt = optax.inject_hyperparams(sofo_jax.sofo, static_args=("num_tangents", "key"))(
    learning_rate=1.0,
    num_tangents=3,
    damping=1e-3,
    key=jax.random.key(0),
    adaptive=False,
  )
  state = opt.init(PARAMS)
  state.hyperparams["damping"] = jnp.asarray(damping)
  new_params, state, _updates = train_step(opt)(PARAMS, state, X, Y)
  jax.tree.map(np.testing.assert_array_equal, new_params, PARAMS)
  assert not bool(sofo_jax.get_diagnostics(state).step_is_finite)


# optax.apply_if_finite ------------------------------------------------------------


def test_apply_if_finite_needs_an_updates_tree_not_none():
  """apply_if_finite builds a zero tree like the incoming updates for its
  reject branch; with ``None`` the branches differ and JAX refuses."""
  opt = optax.apply_if_finite(sofo_jax.sofo(1.0, 2, key=jax.random.key(0)), 2)
  with pytest.raises(TypeError, match="same pytree structure"):
    opt.update(None, opt.init(PARAMS), PARAMS, loss_fn=good_loss)


def test_apply_if_finite_checks_incoming_updates_so_sofo_reports_its_own_skips():
  """With a zero tree passed in, apply_if_finite always sees finite input:
  its counters stay at zero and the SOFO state is what reports a skip."""
  opt = optax.apply_if_finite(sofo_jax.sofo(1.0, 4, key=jax.random.key(0)), 2)
  state = opt.init(PARAMS)
  bad = BAD_LOSSES["nan_targets"]

  @jax.jit
  def step(p, s, use_bad):
    loss_fn = lambda q: jax.lax.cond(use_bad, bad, good_loss, q)
    updates, s = opt.update(optax.tree.zeros_like(p), s, p, loss_fn=loss_fn)
    return optax.apply_updates(p, updates), s

  params, state = step(PARAMS, state, True)
  jax.tree.map(np.testing.assert_array_equal, params, PARAMS)
  assert int(state.total_notfinite) == 0 and bool(state.last_finite)
  assert int(sofo_jax.get_diagnostics(state).num_nonfinite_steps) == 1
  params, state = step(params, state, False)
  assert bool(sofo_jax.get_diagnostics(state).step_is_finite)
  assert float(good_loss(params).value) < float(good_loss(PARAMS).value)


def test_apply_if_finite_with_gradients_passed_in_is_an_error():
  """Reverse-mode gradients passed into apply_if_finite(sofo(...)) would be
  ignored by SOFO, so they fail loudly when SOFO runs. (NaN ones make
  apply_if_finite reject the step before SOFO runs, as optax documents.)"""
  opt = optax.apply_if_finite(sofo_jax.sofo(1.0, 4, key=jax.random.key(0)), 1)
  state = opt.init(PARAMS)
  update = jax.jit(lambda g, s, p: opt.update(g, s, p, loss_fn=good_loss))
  nan_grads = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), PARAMS)
  _, rejected = update(nan_grads, state, PARAMS)
  assert int(rejected.total_notfinite) == 1
  assert int(sofo_jax.get_state(rejected).count) == 0
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  with pytest.raises(Exception, match="SOFO must come first in a chain"):
    jax.block_until_ready(update(grads, state, PARAMS))


def test_apply_if_finite_after_sofo_in_a_chain_never_sees_nan():
  """Placed after SOFO, apply_if_finite inspects SOFO's direction, which SOFO
  has already zeroed: it never triggers, and params stay finite."""
  opt = optax.chain(
    sofo_jax.scale_by_sofo(4, key=jax.random.key(0)),
    optax.apply_if_finite(optax.scale_by_learning_rate(1.0), 2),
  )
  state = opt.init(PARAMS)
  updates, state = jax.jit(
    lambda s: opt.update(None, s, PARAMS, loss_fn=BAD_LOSSES["nan_targets"])
  )(state)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)
  assert int(state[1].total_notfinite) == 0
  assert int(sofo_jax.get_diagnostics(state).num_nonfinite_steps) == 1


# Unusable learning rates --------------------------------------------------------------

BAD_RATES = (jnp.nan, jnp.inf, -jnp.inf, -1.0)
RATE_OPTIMIZERS = {
  "sofo": lambda learning_rate: sofo_jax.sofo(learning_rate, 4, key=jax.random.key(0)),
  "sofo_paper": lambda learning_rate: sofo_jax.sofo(
    learning_rate, 4, key=jax.random.key(0), adaptive=False
  ),
  "forward_gradient": lambda learning_rate: sofo_jax.forward_gradient(
    learning_rate, 4, key=jax.random.key(0)
  ),
}


@pytest.mark.parametrize("rate", BAD_RATES)
@pytest.mark.parametrize("name", sorted(RATE_OPTIMIZERS))
def test_unusable_learning_rate_is_refused_at_construction(name, rate):
  with pytest.raises(ValueError, match="learning_rate must be finite and >= 0"):
    RATE_OPTIMIZERS[name](float(rate))


@pytest.mark.parametrize("rate", BAD_RATES)
@pytest.mark.parametrize("name", sorted(RATE_OPTIMIZERS))
def test_unusable_injected_learning_rate_gives_a_zero_step_and_a_flag(name, rate):
  """Through inject_hyperparams the rate is traced: the step is exactly zero
  (not 0 × inf = NaN), step_is_finite is False, and a good rate afterwards
  trains again."""
  opt = optax.inject_hyperparams(RATE_OPTIMIZERS[name], static_args=())(
    learning_rate=0.5
  )
  state = opt.init(PARAMS)

  @jax.jit
  def step(p, s):
    updates, s = opt.update(None, s, p, loss_fn=good_loss)
    return optax.apply_updates(p, updates), s

  state.hyperparams["learning_rate"] = jnp.asarray(rate)
  params, state = step(PARAMS, state)
  jax.tree.map(np.testing.assert_array_equal, params, PARAMS)
  assert not bool(sofo_jax.get_diagnostics(state).step_is_finite)
  state.hyperparams["learning_rate"] = jnp.asarray(
    0.1 if name == "forward_gradient" else 0.5
  )
  params, state = step(params, state)
  assert bool(sofo_jax.get_diagnostics(state).step_is_finite)
  assert float(good_loss(params).value) < float(good_loss(PARAMS).value)


def test_schedule_producing_an_unusable_rate_gives_a_zero_step():
  schedule = lambda count: jnp.where(count == 0, jnp.inf, 0.5)
  opt = sofo_jax.sofo(schedule, 4, key=jax.random.key(0))
  updates, state = opt.update(None, opt.init(PARAMS), PARAMS, loss_fn=good_loss)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)
  assert not bool(sofo_jax.get_diagnostics(state).step_is_finite)


@pytest.mark.parametrize("scale", [1e-21, 1e21])
@pytest.mark.parametrize("name", ["sofo", "forward_gradient"])
def test_gradient_norm_is_scale_safe(name, scale):
  """The diagnostic is exact however the loss is scaled (float32 squares
  underflow at 1e-21 and overflow at 1e21); the step is unaffected."""
  opt = RATE_OPTIMIZERS[name](0.1)
  params = {"w": jnp.ones((3, 1)), "b": jnp.zeros((1,))}
  scaled = lambda p: scale * good_loss(p)
  _, unit_state = opt.update(None, opt.init(params), params, loss_fn=good_loss)
  _, state = opt.update(None, opt.init(params), params, loss_fn=scaled)
  unit = float(sofo_jax.get_diagnostics(unit_state).gradient_norm)
  norm = float(sofo_jax.get_diagnostics(state).gradient_norm)
  assert unit > 0
  np.testing.assert_allclose(norm, scale * unit, rtol=1e-5)
