"""Tests for sofo_jax.tasks: data generators, dynamics, losses and metrics.

Everything runs on the quick configurations; task-specific properties are
checked against independent float64 NumPy references.
"""

import dataclasses
import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sofo_jax
from sofo_jax import tasks
from sofo_jax.tasks import (
  delayed_addition,
  digits,
  double_reach,
  flip_flop,
  kalman,
  lorenz,
)

NAMES = ("flip_flop", "lorenz", "kalman", "double_reach", "delayed_addition", "digits")

# Expected batch leaves for the quick configurations: (shape, dtype).
F32, I32 = jnp.float32, jnp.int32
EXPECTED_BATCH = {
  "flip_flop": {"inputs": ((20, 4, 3), F32), "targets": ((20, 4, 3), F32)},
  "lorenz": {
    "initial": ((4, 3), F32),
    "final": ((4, 3), F32),
    "trajectory": ((9, 4, 3), F32),
  },
  "kalman": {
    "observations": ((30, 4, 1), F32),
    "latent": ((30, 4, 1), F32),
    "tau": ((30, 4), F32),
    "mean": ((30, 4), F32),
    "noise_std": ((30, 4), F32),
    "switch": ((30, 4), jnp.bool_),
    "random_tau": ((30, 4), F32),
    "random_noise_std": ((30, 4), F32),
  },
  "double_reach": {
    "target1": ((4, 2), F32),
    "target2": ((4, 2), F32),
    "go1": ((4,), I32),
    "go2": ((4,), I32),
  },
  "delayed_addition": {
    "inputs": ((20, 4, 2), F32),
    "target": ((4, 1), F32),
    "marks": ((4, 2), I32),
  },
  "digits": {"images": ((32, 64), F32), "labels": ((32,), I32)},
}
# The metric that must equal the loss value.
LOSS_METRIC = {
  "flip_flop": "mse",
  "lorenz": "mse",
  "kalman": "mse",
  "double_reach": "loss",
  "delayed_addition": "mse",
  "digits": "loss",
}


@functools.cache
def _setup(name):
  """Builds a quick task once per test session (compiles dominate runtime)."""
  module = tasks.TASKS[name]
  task = module.make(module.Config.quick())
  params = jax.jit(task.init_params)(jax.random.key(0))
  batch = jax.jit(task.sample_batch)(jax.random.key(1))
  return task, params, batch


@functools.cache
def _evaluate(name):
  """Loss, gradient and metrics of a quick task, in one compile."""
  task, params, batch = _setup(name)

  @jax.jit
  def evaluate(params, batch):
    value, grads = jax.value_and_grad(task.loss_value)(params, batch)
    return value, grads, task.metrics(params, batch)

  return jax.device_get(evaluate(params, batch))


def _leaves_equal(a, b):
  return all(
    np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


# --- the shared interface ----------------------------------------------------


def test_registry_lists_every_task_with_its_interface():
  assert tuple(tasks.TASKS) == NAMES
  for name, module in tasks.TASKS.items():
    assert name == module.NAME
    config = module.Config.quick()
    assert dataclasses.is_dataclass(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
      config.batch_size = 3
    for field in (
      "batch_size",
      "num_tangents",
      "learning_rate",
      "damping",
      "adam_learning_rate",
    ):
      assert getattr(module.Config(), field) > 0
    assert module.Config.quick().batch_size < module.Config().batch_size


def test_paper_defaults():
  assert (
    flip_flop.Config().num_tangents,
    flip_flop.Config().learning_rate,
    flip_flop.Config().damping,
  ) == (128, 1.0, 1e-5)
  assert lorenz.Config().num_hidden == 400
  assert lorenz.Config().batch_size == 256
  config = kalman.Config()
  assert (
    config.num_hidden,
    config.leak,
    config.num_steps,
    config.batch_size,
    config.learning_rate,
    config.damping,
  ) == (100, 0.25, 500, 256, 0.1, 1e-3)
  config = double_reach.Config()
  assert (
    config.num_hidden,
    config.num_steps,
    config.batch_size,
    config.num_tangents,
    round(config.dt / config.tau, 9),
  ) == (64, 1000, 256, 256, 0.1)
  config = delayed_addition.Config()
  assert (
    config.num_hidden,
    config.num_steps,
    config.learning_rate,
    config.damping,
  ) == (128, 1000, 0.1, 1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_batch_shapes_and_dtypes(name):
  _, _, batch = _setup(name)
  expected = EXPECTED_BATCH[name]
  assert set(batch) == set(expected)
  for key, (shape, dtype) in expected.items():
    assert batch[key].shape == shape, key
    assert batch[key].dtype == dtype, key


@pytest.mark.parametrize("name", NAMES)
def test_sampling_is_deterministic_given_the_key(name):
  task, _, batch = _setup(name)
  again = jax.jit(task.sample_batch)(jax.random.key(1))
  other = jax.jit(task.sample_batch)(jax.random.key(2))
  assert _leaves_equal(batch, again)
  assert not _leaves_equal(batch, other)


@pytest.mark.parametrize("name", NAMES)
def test_init_params_are_deterministic_float_arrays(name):
  task, params, _ = _setup(name)
  leaves = jax.tree.leaves(params)
  assert leaves and all(x.dtype == jnp.float32 for x in leaves)
  init = jax.jit(task.init_params)
  assert _leaves_equal(params, init(jax.random.key(0)))
  assert not _leaves_equal(params, init(jax.random.key(5)))


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_a_finite_scalar_that_matches_the_metrics(name):
  value, _, metrics = _evaluate(name)
  assert value.shape == () and np.isfinite(value) and value > 0
  assert all(m.shape == () and np.isfinite(m) for m in metrics.values())
  np.testing.assert_allclose(metrics[LOSS_METRIC[name]], value, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_backprop_gradient_is_finite_and_nonzero(name):
  grads = _evaluate(name)[1]
  flat = np.concatenate([g.ravel() for g in jax.tree.leaves(grads)])
  assert np.all(np.isfinite(flat)) and np.abs(flat).max() > 0


@pytest.mark.parametrize("name", NAMES)
def test_outputs_cover_the_whole_batch(name):
  task, params, batch = _setup(name)
  # Abstract evaluation: traces the whole program without compiling it.
  outputs = jax.eval_shape(task.outputs, params, batch)
  assert outputs
  for key, value in outputs.items():
    assert task.config.batch_size in value.shape[:2], key


@pytest.mark.parametrize("name", NAMES)
def test_one_sofo_step_runs_and_descends(name):
  task, params, batch = _setup(name)
  config = task.config
  opt = sofo_jax.sofo(
    config.learning_rate, config.num_tangents, 1e-1, key=jax.random.key(3)
  )
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(
      None, state, params, loss_fn=lambda p: task.loss_fn(p, batch)
    )
    return updates, state

  updates, _ = step(params, state)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  _, grads, _ = _evaluate(name)
  flat_u = np.concatenate([u.ravel() for u in jax.tree.leaves(updates)])
  flat_g = np.concatenate([g.ravel() for g in jax.tree.leaves(grads)])
  assert np.all(np.isfinite(flat_u)) and np.abs(flat_u).max() > 0
  # A descent direction: its first-order change of the loss is negative.
  assert float(flat_u @ flat_g) < 0


# --- the leaky RNN -----------------------------------------------------------


def test_leaky_rnn_step_matches_its_equation():
  rnn = eqx.filter_jit(tasks.LeakyRNN)(
    3, 5, 2, leak=0.25, activation="relu", key=jax.random.key(0)
  )
  rng = np.random.default_rng(0)
  h = rng.normal(size=(4, 5)).astype(np.float32)
  x = rng.normal(size=(4, 3)).astype(np.float32)
  expected = 0.75 * h + 0.25 * np.maximum(
    np.asarray(h) @ np.asarray(rnn.w_rec).T
    + np.asarray(x) @ np.asarray(rnn.w_in).T
    + np.asarray(rnn.bias),
    0.0,
  )
  step = eqx.filter_jit(lambda rnn, h, x: (rnn(h, x), rnn.readout(h)))
  new_h, y = step(rnn, h, x)
  np.testing.assert_allclose(new_h, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    y,
    np.asarray(h) @ np.asarray(rnn.w_out).T + np.asarray(rnn.b_out),
    rtol=1e-5,
    atol=1e-6,
  )
  # Only arrays are parameters; leak and activation are static.
  params, _ = eqx.partition(rnn, eqx.is_array)
  assert len(jax.tree.leaves(params)) == 5


def test_leaky_rnn_run_and_accumulate_match_a_float64_loop():
  rnn = tasks.LeakyRNN(2, 6, 3, leak=0.5, activation="tanh", key=jax.random.key(1))
  w_rec, w_in, bias, w_out, b_out = (
    np.asarray(a, np.float64)
    for a in (rnn.w_rec, rnn.w_in, rnn.bias, rnn.w_out, rnn.b_out)
  )
  rng = np.random.default_rng(1)
  inputs = rng.normal(size=(7, 4, 2)).astype(np.float32)
  targets = rng.normal(size=(7, 4, 3)).astype(np.float32)
  h, outputs, hidden, squared_error, positive = np.zeros((4, 6)), [], [], 0.0, 0
  for x, target in zip(inputs.astype(np.float64), targets.astype(np.float64)):
    h = 0.5 * h + 0.5 * np.tanh(h @ w_rec.T + x @ w_in.T + bias)
    y = h @ w_out.T + b_out
    outputs.append(y)
    hidden.append(h)
    squared_error += np.sum((y - target) ** 2)
    positive += np.sum(y > 0)

  got_outputs, got_hidden = eqx.filter_jit(tasks.LeakyRNN.run)(rnn, inputs)
  np.testing.assert_allclose(got_outputs, np.stack(outputs), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_hidden, np.stack(hidden), rtol=1e-5, atol=1e-6)
  total = rnn.accumulate(
    inputs, targets, lambda y, z: jnp.sum(jnp.square(y - z)), jnp.zeros(())
  )
  np.testing.assert_allclose(total, squared_error, rtol=1e-5)
  # With sofo_jax.losses the sum is a Loss: squared error over the batch of 4.
  loss = rnn.accumulate(inputs, targets, sofo_jax.losses.mse, sofo_jax.losses.zero())
  np.testing.assert_allclose(loss.value, squared_error / 4, rtol=1e-5)
  # Several sums at once (as the tasks' metrics), a Loss among them.
  totals = rnn.accumulate(
    inputs,
    targets,
    lambda y, z: {"loss": sofo_jax.losses.mse(y, z), "positive": jnp.sum(y > 0)},
    {"loss": sofo_jax.losses.zero(), "positive": jnp.zeros((), jnp.int32)},
  )
  np.testing.assert_allclose(totals["loss"].value, squared_error / 4, rtol=1e-5)
  assert int(totals["positive"]) == positive > 0


@pytest.mark.parametrize(
  "kwargs", [dict(activation="sigmoid"), dict(leak=0.0), dict(leak=1.5)]
)
def test_leaky_rnn_rejects_bad_settings(kwargs):
  settings = dict(leak=0.5, activation="tanh") | kwargs
  with pytest.raises(ValueError):
    tasks.LeakyRNN(1, 4, 1, key=jax.random.key(0), **settings)


@pytest.mark.parametrize(
  "module, bad",
  [
    (flip_flop, dict(pulse_prob=1.5)),
    (kalman, dict(min_interval=0)),
    (kalman, dict(tau_range=(0.5, 10.0))),
    (delayed_addition, dict(first_window=11)),
    (double_reach, dict(second_cue_delay=0.4)),
    (lorenz, dict(num_tangents=0)),
  ],
)
def test_make_rejects_inconsistent_configs(module, bad):
  with pytest.raises(ValueError):
    module.make(dataclasses.replace(module.Config.quick(), **bad))


# --- flip-flop ---------------------------------------------------------------


@pytest.mark.parametrize("duration", [1, 3])
def test_flip_flop_targets_are_the_sign_of_the_last_pulse(duration):
  if duration == 1:
    batch = _setup("flip_flop")[2]  # the quick config
  else:
    config = dataclasses.replace(
      flip_flop.Config.quick(), num_steps=60, pulse_duration=duration
    )
    batch = jax.jit(functools.partial(flip_flop.generate, config=config))(
      jax.random.key(4)
    )
  inputs, targets = np.asarray(batch["inputs"]), np.asarray(batch["targets"])
  assert set(np.unique(inputs)) == {-1.0, 0.0, 1.0}
  expected = np.zeros_like(inputs)
  last = np.zeros(inputs.shape[1:])
  for t in range(inputs.shape[0]):
    last = np.where(inputs[t] != 0, inputs[t], last)
    expected[t] = last
  np.testing.assert_array_equal(targets, expected)
  # Pulses last exactly `duration` steps: every run of non-zero input has a
  # length that is a multiple of it.
  for b in range(inputs.shape[1]):
    for i in range(inputs.shape[2]):
      runs = np.diff(np.flatnonzero(np.diff(np.r_[0, inputs[:, b, i] != 0, 0])))[::2]
      runs = runs[:-1] if inputs[-1, b, i] != 0 else runs  # cut at T
      assert np.all(runs % duration == 0)


# --- Lorenz ------------------------------------------------------------------


def _lorenz_rk4_numpy(s, dt, steps):
  def field(s):
    x, y, z = s[..., 0], s[..., 1], s[..., 2]
    return np.stack([10.0 * (y - x), x * (28.0 - z) - y, x * y - 8.0 / 3.0 * z], -1)

  for _ in range(steps):
    k1 = field(s)
    k2 = field(s + dt / 2 * k1)
    k3 = field(s + dt / 2 * k2)
    k4 = field(s + dt * k3)
    s = s + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
  return s


def test_lorenz_final_state_matches_an_independent_integration():
  _, _, batch = _setup("lorenz")
  config = lorenz.Config.quick()
  start = np.asarray(batch["initial"], np.float64) * lorenz.ATTRACTOR_STD + (
    lorenz.ATTRACTOR_MEAN
  )
  final = _lorenz_rk4_numpy(start, config.dt, config.num_steps)
  expected = (final - lorenz.ATTRACTOR_MEAN) / lorenz.ATTRACTOR_STD
  np.testing.assert_allclose(batch["final"], expected, atol=1e-4)
  np.testing.assert_allclose(batch["trajectory"][-1], batch["final"])


def test_lorenz_trials_start_on_the_attractor():
  config = dataclasses.replace(lorenz.Config.quick(), batch_size=1024)
  batch = jax.jit(functools.partial(lorenz.generate, config=config))(jax.random.key(6))
  raw = np.asarray(lorenz.denormalise(batch["trajectory"])).reshape(-1, 3)
  # Bounding box of the attractor (a long run stays within |x| < 20,
  # |y| < 27, 1 < z < 48).
  assert np.all(np.abs(raw[:, 0]) < 21) and np.all(np.abs(raw[:, 1]) < 29)
  assert np.all((raw[:, 2] > 0) & (raw[:, 2] < 50))
  # Normalised states have roughly zero mean and unit variance.
  normed = np.asarray(batch["trajectory"]).reshape(-1, 3)
  np.testing.assert_allclose(normed.mean(0), 0.0, atol=0.15)
  np.testing.assert_allclose(normed.std(0), 1.0, atol=0.1)


# --- Kalman ------------------------------------------------------------------


def _kalman_numpy(y, tau, mean, r, switch, s=1.0):
  """Textbook predict/update Kalman filter, one float64 loop per trial."""
  y, tau, mean, r = (np.asarray(a, np.float64) for a in (y, tau, mean, r))
  out = np.zeros_like(y)
  for b in range(y.shape[1]):
    m = p = 0.0
    for t in range(y.shape[0]):
      if switch[t, b]:
        m, p = mean[t, b], s * s
      else:
        f = 1.0 - 1.0 / tau[t, b]
        q = s * s * (2.0 / tau[t, b] - 1.0 / tau[t, b] ** 2)
        m, p = f * m + mean[t, b] / tau[t, b], f * p * f + q
      k = p / (p + r[t, b] ** 2)
      m, p = m + k * (y[t, b] - m), (1.0 - k) * p
      out[t, b] = m
  return out


def test_kalman_floor_matches_an_independent_float64_filter():
  config = kalman.Config.quick()
  batch = _setup("kalman")[2]
  assert batch["switch"][1:].any()  # the filter is also tested across changes
  y = batch["observations"][..., 0]
  means, variances = kalman.kalman_filter(
    y, batch["tau"], batch["mean"], batch["noise_std"], batch["switch"]
  )
  expected = _kalman_numpy(
    y, batch["tau"], batch["mean"], batch["noise_std"], np.asarray(batch["switch"])
  )
  np.testing.assert_allclose(means, expected, rtol=1e-4, atol=1e-5)
  assert bool(jnp.all(variances > 0))
  floor = np.mean((expected - np.asarray(batch["latent"][..., 0], np.float64)) ** 2)
  np.testing.assert_allclose(kalman.kalman_mse(batch, config), floor, rtol=1e-4)
  # The random-parameter filter is the same filter with other parameters.
  random = _kalman_numpy(
    y,
    batch["random_tau"],
    batch["mean"],
    batch["random_noise_std"],
    np.asarray(batch["switch"]),
  )
  np.testing.assert_allclose(
    kalman.kalman_mse(batch, config, random_parameters=True),
    np.mean((random - np.asarray(batch["latent"][..., 0])) ** 2),
    rtol=1e-4,
  )


def test_kalman_generator_follows_the_switching_process_in_linear_time():
  # A long horizon: generation is a scan, O(T) in time and memory.
  config = dataclasses.replace(
    kalman.Config.quick(), num_steps=10_000, min_interval=100, switch_prob=0.01
  )
  generate = functools.partial(kalman.generate, config=config)
  batch = jax.jit(generate)(jax.random.key(8))
  assert batch["observations"].shape == (10_000, 4, 1)
  # The Kalman floor is about 0.49 for these settings, and beats filtering
  # with random parameters, which beats reporting the raw observations.
  floor = float(kalman.kalman_mse(batch, config))
  random = float(kalman.kalman_mse(batch, config, random_parameters=True))
  assert 0.35 < floor < 0.65
  assert floor < random < float(kalman.observation_mse(batch))
  batch = jax.tree.map(np.asarray, batch)
  switch = batch["switch"]
  assert switch[0].all()
  for b in range(config.batch_size):
    starts = np.flatnonzero(switch[:, b])
    assert len(starts) > 20 and np.diff(starts).min() >= config.min_interval
  # Parameters are constant between changes and within their ranges.
  for key, (low, high) in (
    ("tau", config.tau_range),
    ("mean", config.mean_range),
    ("noise_std", config.noise_std_range),
  ):
    values = batch[key]
    assert np.all(values[1:][~switch[1:]] == values[:-1][~switch[1:]])
    assert values.min() >= low and values.max() <= high
  # Within segments, the standardised innovations of the OU process are
  # N(0, 1), and so are the standardised observation errors.
  x, tau, mu = batch["latent"][..., 0], batch["tau"], batch["mean"]
  keep = ~switch[1:]
  innovation = (x[1:] - x[:-1] - (mu[1:] - x[:-1]) / tau[1:]) / np.sqrt(
    2.0 / tau[1:] - 1.0 / tau[1:] ** 2
  )
  assert abs(innovation[keep].mean()) < 0.05
  assert abs(innovation[keep].std() - 1.0) < 0.05
  obs_err = (batch["observations"][..., 0] - x) / batch["noise_std"]
  assert abs(obs_err.std() - 1.0) < 0.05


# --- double reach: the arm ---------------------------------------------------


def _euler_lagrange_acceleration(theta, omega, torque, p):
  """Accelerations from the Lagrangian built from the link geometry."""

  def kinetic(theta, omega):
    t1, t12 = theta[0], theta[0] + theta[1]
    w1, w12 = omega[0], omega[0] + omega[1]
    # Link 1 rotates about the shoulder; link 2's centre of mass moves with
    # the elbow, and link 2 rotates about it (i2 is about the elbow).
    v = jnp.array(
      [
        -p.l1 * jnp.sin(t1) * w1 - p.s2 * jnp.sin(t12) * w12,
        p.l1 * jnp.cos(t1) * w1 + p.s2 * jnp.cos(t12) * w12,
      ]
    )
    return (
      0.5 * p.i1 * w1**2 + 0.5 * p.m2 * v @ v + 0.5 * (p.i2 - p.m2 * p.s2**2) * w12**2
    )

  mass = jax.hessian(kinetic, argnums=1)(theta, omega)
  d_dtheta_dl_domega = (
    jax.jacfwd(jax.grad(kinetic, argnums=1), argnums=0)(theta, omega) @ omega
  )
  dl_dtheta = jax.grad(kinetic, argnums=0)(theta, omega)
  damping = jnp.array([[p.b11, p.b12], [p.b12, p.b22]])
  rhs = torque - damping @ omega - d_dtheta_dl_domega + dl_dtheta
  return jnp.linalg.solve(mass, rhs)


def test_arm_acceleration_matches_the_euler_lagrange_equations():
  p = double_reach.ArmParameters()
  keys = jax.random.split(jax.random.key(10), 3)
  theta = jax.random.uniform(keys[0], (16, 2), minval=-3.0, maxval=3.0)
  omega = 3.0 * jax.random.normal(keys[1], (16, 2))
  torque = jax.random.normal(keys[2], (16, 2))
  got = double_reach.acceleration(double_reach.ArmState(theta, omega), torque, p)
  want = jax.jit(jax.vmap(functools.partial(_euler_lagrange_acceleration, p=p)))(
    theta, omega, torque
  )
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_arm_energy_never_increases_without_torque():
  p = double_reach.ArmParameters()
  keys = jax.random.split(jax.random.key(11))
  state = double_reach.ArmState(
    jax.random.uniform(keys[0], (32, 2), minval=-2.0, maxval=2.0),
    3.0 * jax.random.normal(keys[1], (32, 2)),
  )

  def step(state, _):
    state = double_reach.arm_step(state, jnp.zeros((32, 2)), 0.002, p)
    return state, double_reach.kinetic_energy(state, p)

  _, energy = jax.lax.scan(step, state, None, length=1000)
  energy = np.concatenate(
    [np.asarray(double_reach.kinetic_energy(state, p))[None], np.asarray(energy)]
  )
  assert np.all(np.diff(energy, axis=0) <= 1e-7 * energy[:-1])
  assert np.all(energy[-1] < 0.5 * energy[0])


def test_resting_arm_stays_at_rest_and_hand_velocity_is_the_jacobian():
  config = double_reach.Config.quick()
  rest = double_reach.initial_state(config)
  state = rest
  for _ in range(10):
    state = double_reach.arm_step(state, jnp.zeros((4, 2)), config.dt)
  np.testing.assert_array_equal(state.theta, rest.theta)
  np.testing.assert_array_equal(state.theta_dot, 0.0)
  np.testing.assert_allclose(double_reach.start_position(config), [0.0, 0.3], atol=1e-6)
  theta = jnp.array([0.3, 1.1])
  omega = jnp.array([0.7, -1.9])
  jac = jax.jacfwd(double_reach.hand_position)(theta)
  np.testing.assert_allclose(
    double_reach.hand_velocity(double_reach.ArmState(theta, omega)),
    jac @ omega,
    rtol=1e-5,
  )


def test_double_reach_trial_structure():
  config = dataclasses.replace(double_reach.Config(), batch_size=64)
  batch = jax.jit(functools.partial(double_reach.generate, config=config))(
    jax.random.key(12)
  )
  go1, go2 = np.asarray(batch["go1"]), np.asarray(batch["go2"])
  assert np.all((go1 >= 100) & (go1 <= 300))  # 0.2 s to 0.6 s at 2 ms
  np.testing.assert_array_equal(go2 - go1, 350)  # 0.7 s
  start = np.asarray(double_reach.start_position(config))
  for key in ("target1", "target2"):
    distance = np.linalg.norm(np.asarray(batch[key]) - start, axis=-1)
    assert np.all((distance >= 0.05 - 1e-6) & (distance <= 0.15 + 1e-6))
  move = config.steps(config.movement_time)
  positions, weights = jax.jit(
    jax.vmap(lambda t: double_reach.phase(t, batch, config))
  )(jnp.arange(1000))
  positions, weights = np.asarray(positions), np.asarray(weights)
  for b in range(4):
    t1, t2 = go1[b], go2[b]
    np.testing.assert_array_equal(weights[:t1, b], 1.0)
    np.testing.assert_array_equal(weights[t1 : t1 + move, b], 0.0)
    np.testing.assert_array_equal(weights[t1 + move : t2, b], 4.0)
    np.testing.assert_array_equal(weights[t2 : t2 + move, b], 0.0)
    np.testing.assert_array_equal(weights[t2 + move :, b], 4.0)
    np.testing.assert_allclose(positions[t1 - 1, b], start, atol=1e-6)
    np.testing.assert_allclose(positions[t2 - 1, b], batch["target1"][b])
    np.testing.assert_allclose(positions[-1, b], batch["target2"][b])


# --- delayed addition --------------------------------------------------------


def test_delayed_addition_target_is_the_sum_of_the_marked_numbers():
  config = delayed_addition.Config.quick()
  batch = jax.tree.map(np.asarray, _setup("delayed_addition")[2])
  values, marker = batch["inputs"][..., 0], batch["inputs"][..., 1]
  assert np.all((values >= 0) & (values <= 1))
  assert set(np.unique(marker)) == {0.0, 1.0}
  for b in range(config.batch_size):
    marked = np.flatnonzero(marker[:, b])
    assert len(marked) == 2
    t1, t2 = marked
    assert t1 < config.first_window and t2 <= config.num_steps // 2
    np.testing.assert_array_equal(batch["marks"][b], marked)
    np.testing.assert_allclose(
      batch["target"][b, 0], values[t1, b] + values[t2, b], rtol=1e-6
    )


# --- digits ------------------------------------------------------------------


def test_digits_data_split_and_ranges():
  config = digits.Config.quick()
  data = digits.load(config)
  assert data["train_images"].shape == (1438, 64)
  assert data["test_images"].shape == (359, 64)
  for split in ("train", "test"):
    images, labels = data[split + "_images"], data[split + "_labels"]
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert set(np.unique(labels)) == set(range(10))
  # The two splits are disjoint (no image appears in both).
  train = {row.tobytes() for row in data["train_images"]}
  overlap = sum(row.tobytes() in train for row in data["test_images"])
  assert overlap <= 5  # the raw dataset holds a few exact duplicates
  task, params, batch = _setup("digits")
  assert int(batch["labels"].min()) >= 0 and int(batch["labels"].max()) < 10
  metrics = jax.jit(task.metrics)(params, batch)
  for key in ("accuracy", "test_accuracy"):
    assert 0.0 <= float(metrics[key]) <= 1.0
  np.testing.assert_allclose(
    float(metrics["loss"]), math.log(10.0), rtol=0.2
  )  # near-uniform at init
