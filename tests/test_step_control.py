"""Adaptive step control: acceptance, rejection, the next-batch check, defaults."""

import warnings

import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sofo_jax
from sofo_jax import losses, training
from sofo_jax import tasks as tasks_lib


def _rnn_problem(seed):
  rng = np.random.default_rng(seed)
  # A large recurrent gain makes the quadratic model poor, so that trials
  # really get rejected and backtracked.
  params = models.rnn_params(rng, 2, 6, 2, dtype=np.float32, gain=1.8)
  xs = jnp.asarray(rng.normal(size=(12, 4, 2)), jnp.float32)
  targets = jnp.asarray(rng.normal(size=(12, 4, 2)), jnp.float32)
  params = jax.tree.map(jnp.asarray, params)
  return params, lambda p: models.rnn_scan_loss(p, xs, targets)


@pytest.mark.parametrize("learning_rate", [1.0, 3.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_accepted_step_never_increases_its_own_batch_loss(seed, learning_rate):
  params, loss_fn = _rnn_problem(seed)
  opt = sofo_jax.sofo(learning_rate, 4, 1e-4, key=jax.random.key(seed))
  state = opt.init(params)
  step = jax.jit(lambda p, s: opt.update(None, s, p, loss_fn=loss_fn))
  value = jax.jit(lambda p: loss_fn(p).value)
  seen = {"accepted": 0, "rejected": 0}
  for _ in range(15):
    before = float(value(params))
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    after = float(value(params))
    diagnostics = sofo_jax.get_diagnostics(state)
    if bool(diagnostics.step_rejected):
      seen["rejected"] += 1
      assert after == before  # a rejected step is a zero update
    elif not bool(diagnostics.step_reverted):
      seen["accepted"] += 1
      assert after <= before * (1 + 1e-6) + 1e-7
  assert seen["accepted"] > 0


def test_max_step_ratio_bounds_every_step_it_accepts():
  """No accepted step is longer than the ratio times the parameters' norm."""
  ratio = 0.05
  norm = lambda tree: float(jnp.linalg.norm(ravel_pytree(tree)[0]))
  longest = {}
  for bound in (None, ratio):
    params, loss_fn = _rnn_problem(0)
    control = sofo_jax.StepControl(max_step_ratio=bound)
    opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(0), step_control=control)
    state = opt.init(params)
    step = jax.jit(lambda p, s, opt=opt, f=loss_fn: opt.update(None, s, p, loss_fn=f))
    longest[bound] = 0.0
    for _ in range(10):
      updates, state = step(params, state)
      if not bool(sofo_jax.get_diagnostics(state).step_reverted):
        longest[bound] = max(longest[bound], norm(updates) / norm(params))
      params = optax.apply_updates(params, updates)
  assert longest[None] > ratio  # the bound has something to cut
  assert 0 < longest[ratio] <= ratio * (1 + 1e-5)


@pytest.mark.parametrize(
  "lookahead, expected", [(None, 1.0 / (1.0 + 1e-4)), (1.5, 0.5)]
)
def test_lookahead_skips_a_step_next_to_a_cliff(x64, lookahead, expected):
  """f(y) = (y - 1)^2 / 2 + 1e6 relu(y - 1.2)^2 with y = theta, from theta = 0.

  The curvature at 0 is 1 and the relu term is flat there, so the ladder's
  dampings 1e-4, 1 and 1e4 (relative to s_max = 1) give the steps
  1 / (1 + lambda): about 1, 0.5 and 1e-4. The least damped lands at about
  1, the minimum, and passes on its own; taken 1.5 times as far it reaches
  1.5, beyond the cliff at 1.2, so with the margin the half step is chosen
  (1.5 x 0.5 = 0.75 is safe). By hand, not from the library.
  """
  fn = lambda y: jnp.sum(0.5 * (y - 1.0) ** 2 + 1e6 * jax.nn.relu(y - 1.2) ** 2)
  loss_fn = lambda p: losses.custom(p["theta"], fn)
  params = {"theta": jnp.zeros((1,), jnp.float64)}
  control = sofo_jax.StepControl(
    trial_growth=1e4, min_damping=1e-4, revert_ratio=None, lookahead=lookahead
  )
  opt = sofo_jax.sofo(
    1.0, 1, 1e-4, key=jax.random.key(0), step_control=control, momentum=False
  )
  updates, state = opt.update(None, opt.init(params), params, loss_fn=loss_fn)
  theta = optax.apply_updates(params, updates)["theta"]
  np.testing.assert_allclose(theta, [expected], rtol=1e-10)
  diagnostics = sofo_jax.get_diagnostics(state)
  assert not bool(diagnostics.step_rejected)
  np.testing.assert_allclose(diagnostics.rho, 1.0, rtol=1e-10)


def test_learning_rate_enters_the_trial_point():
  """The trial loss is the loss at the parameters the chain actually produces."""
  params, loss_fn = _rnn_problem(3)
  for learning_rate in (0.5, optax.linear_schedule(0.2, 1.0, 3)):
    opt = sofo_jax.sofo(learning_rate, 4, key=jax.random.key(0))
    state = opt.init(params)
    p = params
    for _ in range(3):
      updates, state = opt.update(None, state, p, loss_fn=loss_fn)
      p = optax.apply_updates(p, updates)
      diagnostics = sofo_jax.get_diagnostics(state)
      expected = (
        loss_fn(p).value if not bool(diagnostics.step_rejected) else diagnostics.loss
      )
      np.testing.assert_allclose(diagnostics.trial_loss, expected, rtol=1e-5)


def test_rejection_keeps_the_parameters_and_raises_the_damping():
  """A step whose every trial overshoots is rejected (lr far too large)."""
  x = jnp.eye(3)
  loss_fn = lambda p: losses.mse(x @ p["w"], jnp.zeros((3, 1)))
  params = {"w": jnp.ones((3, 1))}
  control = sofo_jax.StepControl(
    num_trials=2, trial_growth=2.0, revert_ratio=None, min_damping=1e-6
  )
  opt = sofo_jax.sofo(
    50.0,
    3,
    1e-6,
    key=jax.random.key(0),
    step_control=control,
    tangent_distribution="orthonormal",
  )
  state = opt.init(params)
  updates, state = opt.update(None, state, params, loss_fn=loss_fn)
  assert float(jnp.max(jnp.abs(updates["w"]))) == 0.0
  diagnostics = sofo_jax.get_diagnostics(state)
  assert bool(diagnostics.step_rejected) and int(diagnostics.num_rejected_steps) == 1
  assert bool(diagnostics.step_is_finite)
  # The next step starts from the most damped trial times `increase`.
  np.testing.assert_allclose(
    sofo_jax.get_state(state).damping, 1e-6 * 2.0 * 2.0, rtol=1e-6
  )


def test_next_batch_check_undoes_a_step_that_generalised_badly():
  """Batch A pulls w to 1; on batch B, whose optimum is 0, the loss at the new
  parameters is far above the loss at the old ones: the step is undone."""
  x = jnp.ones((4, 1))
  batch_a = lambda p: losses.mse(x * p["w"], jnp.ones((4, 1)))
  batch_b = lambda p: losses.mse(x * p["w"], jnp.zeros((4, 1)))
  params = {"w": jnp.zeros((1,))}
  opt = sofo_jax.sofo(1.0, 1, 1e-3, key=jax.random.key(0))
  state = opt.init(params)
  updates, state = opt.update(None, state, params, loss_fn=batch_a)
  moved = optax.apply_updates(params, updates)
  assert float(moved["w"][0]) > 0.9
  damping_after_a = float(sofo_jax.get_state(state).damping)
  updates, state = opt.update(None, state, moved, loss_fn=batch_b)
  back = optax.apply_updates(moved, updates)
  np.testing.assert_allclose(back["w"], params["w"], atol=1e-6)
  diagnostics = sofo_jax.get_diagnostics(state)
  assert bool(diagnostics.step_reverted) and int(diagnostics.num_reverted_steps) == 1
  np.testing.assert_allclose(
    sofo_jax.get_state(state).damping, 10.0 * damping_after_a, rtol=1e-6
  )
  # Nothing to undo twice: the next update on batch B is an ordinary step.
  _, state = opt.update(None, state, back, loss_fn=batch_b)
  assert not bool(sofo_jax.get_diagnostics(state).step_reverted)


def test_non_finite_loss_after_a_step_is_undone():
  x = jnp.ones((4, 1))
  finite = lambda p: losses.mse(x * p["w"], jnp.ones((4, 1)))
  blows_up = lambda p: losses.mse(
    x * jnp.where(p["w"] > 0.5, jnp.inf, p["w"]), jnp.ones((4, 1))
  )
  params = {"w": jnp.zeros((1,))}
  opt = sofo_jax.sofo(1.0, 1, 1e-4, key=jax.random.key(0))
  state = opt.init(params)
  updates, state = opt.update(None, state, params, loss_fn=finite)
  moved = optax.apply_updates(params, updates)
  updates, state = opt.update(None, state, moved, loss_fn=blows_up)
  back = optax.apply_updates(moved, updates)
  assert bool(jnp.all(jnp.isfinite(back["w"])))
  np.testing.assert_allclose(back["w"], params["w"], atol=1e-6)
  assert bool(sofo_jax.get_diagnostics(state).step_reverted)


@pytest.mark.parametrize(
  "options",
  [
    {},
    {"momentum": True},
    {"num_recycled": 2},
    {"step_control": sofo_jax.StepControl(revert_ratio=None)},
    {"step_control": sofo_jax.StepControl(lookahead=1.5)},
  ],
)
def test_state_is_fixed_shape_and_scans(options):
  params, loss_fn = _rnn_problem(4)
  opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(0), **options)
  state = opt.init(params)

  def body(carry, _):
    p, s = carry
    updates, s = opt.update(None, s, p, loss_fn=loss_fn)
    return (optax.apply_updates(p, updates), s), sofo_jax.get_diagnostics(s).loss

  (_p, final), losses_seen = jax.jit(lambda c: jax.lax.scan(body, c, None, length=6))(
    (params, state)
  )
  assert jax.tree.structure(final) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(state)):
    assert a.shape == b.shape and a.dtype == b.dtype
  assert bool(jnp.all(jnp.isfinite(losses_seen)))
  assert float(losses_seen[-1]) < float(losses_seen[0])


def test_recycled_tangents_are_the_top_curvature_directions():
  """With orthonormal tangents, the top recycled direction v has v'Gv = s_max."""
  params, loss_fn = _rnn_problem(5)
  opt = sofo_jax.scale_by_sofo(
    6, key=jax.random.key(1), num_recycled=2, tangent_distribution="orthonormal"
  )
  state = opt.init(params)
  _, state = opt.update(None, state, params, loss_fn=loss_fn)
  # Shaped like the params, each leaf with a leading axis of num_recycled.
  assert jax.tree.structure(state.recycled) == jax.tree.structure(params)
  for i in range(2):
    flat = jnp.concatenate([r[i].reshape(-1) for r in jax.tree.leaves(state.recycled)])
    np.testing.assert_allclose(jnp.linalg.norm(flat), 1.0, rtol=1e-5)
  # Eigenvalues ascend: the largest is last.
  tangents = jax.tree.map(lambda r: r[-1:], state.recycled)
  _, _, curvature = sofo_jax.sketch(loss_fn, params, tangents)
  np.testing.assert_allclose(
    curvature[0, 0], state.diagnostics.max_eigenvalue, rtol=1e-4
  )


def test_momentum_tangent_is_the_last_update():
  """The momentum tangent lets one solve recover the whole last step."""
  x = jax.random.normal(jax.random.key(1), (16, 3))
  y = x @ jnp.array([[1.0], [-2.0], [0.5]])
  loss_fn = lambda p: losses.mse(x @ p["w"], y)
  params = {"w": jnp.zeros((3, 1))}
  opt = sofo_jax.sofo(1.0, 2, 1e-4, key=jax.random.key(0), momentum=True)
  state = opt.init(params)
  first, state = opt.update(None, state, params, loss_fn=loss_fn)
  np.testing.assert_allclose(
    ravel_pytree(sofo_jax.get_state(state).last_update)[0],
    ravel_pytree(first)[0],
    rtol=1e-6,
  )


def test_step_control_settings_are_checked():
  with pytest.raises(ValueError, match="trial_growth"):
    sofo_jax.StepControl(trial_growth=1.0)
  with pytest.raises(ValueError, match="decrease"):
    sofo_jax.StepControl(decrease=1.5)
  with pytest.raises(ValueError, match="revert_ratio"):
    sofo_jax.StepControl(revert_ratio=0.5)
  with pytest.raises(ValueError, match="max_step_ratio"):
    sofo_jax.StepControl(max_step_ratio=0.0)
  with pytest.raises(ValueError, match="lookahead"):
    sofo_jax.StepControl(lookahead=1.0)
  with pytest.raises(TypeError, match="num_trials"):
    sofo_jax.StepControl(num_trials=2.0)
  with pytest.raises(TypeError, match="StepControl"):
    sofo_jax.sofo(1.0, 4, key=jax.random.key(0), step_control={"num_trials": 2})
  with pytest.raises(TypeError, match="adaptive"):
    sofo_jax.sofo(1.0, 4, key=jax.random.key(0), adaptive="yes")
  with pytest.raises(ValueError, match="fresh random tangent"):
    sofo_jax.sofo(1.0, 4, key=jax.random.key(0), num_recycled=3, momentum=True)
  with pytest.raises(ValueError, match="learning_rate"):
    sofo_jax.scale_by_sofo(4, key=jax.random.key(0), learning_rate=-1.0)


QUICK_STEPS = 30


@pytest.mark.parametrize(
  "name", ["flip_flop", "lorenz", "kalman", "double_reach", "delayed_addition"]
)
def test_defaults_train_every_rnn_task_at_quick_size(name):
  """sofo(1.0, K, key=key), nothing else set, no warm-up: no loss above 3x the first."""
  module = tasks_lib.TASKS[name]
  task = module.make(module.Config.quick())
  history = training.fit(
    task,
    "sofo",
    QUICK_STEPS,
    key=jax.random.key(0),
    progress=False,
    chunk_size=QUICK_STEPS,
  )
  assert history.settings["learning_rate"] == 1.0
  assert np.all(np.isfinite(history.losses))
  assert np.max(history.losses) <= 3 * history.losses[0]
  assert np.mean(history.losses[-5:]) < history.losses[0]


@pytest.mark.parametrize(
  "adaptive, damping, expected",
  [(True, None, 1.0), (False, None, 1e-4), (True, 3e-3, 3e-3), (False, 3e-3, 3e-3)],
)
def test_default_damping_depends_on_the_mode(adaptive, damping, expected):
  """Step control starts at λ = 1; the paper's fixed damping is 1e-4."""
  params, loss_fn = _rnn_problem(0)
  opt = sofo_jax.sofo(1.0, 4, damping, key=jax.random.key(0), adaptive=adaptive)
  state = opt.init(params)
  np.testing.assert_allclose(sofo_jax.get_state(state).damping, expected, rtol=1e-6)
  _, state = opt.update(None, state, params, loss_fn=loss_fn)
  used = float(sofo_jax.get_diagnostics(state).damping_parameter)
  # Step control's first trial is the starting damping, later ones 10×, 100×.
  rungs = np.log10(used / expected) if adaptive else 0.0
  np.testing.assert_allclose(rungs, np.round(rungs), atol=1e-5)
  assert 0 <= round(rungs) < 3


@pytest.mark.parametrize(
  "damping, options",
  [
    (1e-4, {}),  # at the floor
    (None, {}),  # the default start, 1
    (0.0, {"step_control": sofo_jax.StepControl(min_damping=0.0)}),
    (1e-6, {"adaptive": False}),  # no floor without step control
  ],
)
def test_no_warning_when_the_damping_is_not_below_the_floor(damping, options):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sofo_jax.sofo(1.0, 2, damping, key=jax.random.key(0), **options)


@pytest.mark.parametrize(
  "step_control, expected",
  [(None, 1e-4), (sofo_jax.StepControl(min_damping=1e-6), 1e-6)],
)
def test_damping_never_falls_below_the_floor(step_control, expected):
  """The floor is 1e-4 by default: a lower starting damping is raised to it,
  and the Levenberg–Marquardt decrease after a perfect step stops there."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(8, 1)), jnp.float32)
  loss_fn = lambda p: losses.mse(x @ p["w"], y)  # a quadratic: rho = 1
  params = {"w": jnp.zeros((3, 1))}
  options = {} if step_control is None else {"step_control": step_control}
  with pytest.warns(UserWarning, match="below StepControl.min_damping"):
    opt = sofo_jax.sofo(1.0, 3, 1e-8, key=jax.random.key(0), momentum=False, **options)
  _, state = opt.update(None, opt.init(params), params, loss_fn=loss_fn)
  diagnostics = sofo_jax.get_diagnostics(state)
  assert not diagnostics.step_rejected
  assert float(diagnostics.damping_parameter) == pytest.approx(expected)
  assert float(sofo_jax.get_state(state).damping) == pytest.approx(expected)
