"""SOFO actually trains: exact on least squares, and beats tuned Adam on an RNN."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sofo_jax
import sofo_jax.tasks
from sofo_jax import losses, training
from sofo_jax.tasks import LeakyRNN


def test_linear_least_squares_solved_in_three_steps():
  rng = np.random.default_rng(0)
  x = jnp.asarray(
    rng.normal(size=(64, 6)) * np.array([1, 3, 10, 0.3, 1, 30]), jnp.float32
  )
  w_true = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)
  y = x @ w_true + 0.01 * jnp.asarray(rng.normal(size=(64, 2)), jnp.float32)
  params = {"w": jnp.zeros((6, 2)), "b": jnp.zeros(2)}
  loss_fn = lambda p: losses.mse(x @ p["w"] + p["b"], y)
  # The optimum, independently: ordinary least squares on [x, 1].
  design = jnp.concatenate([x, jnp.ones((64, 1))], axis=1)
  optimum = jnp.linalg.lstsq(design, y)[0]
  best = float(losses.mse(design @ optimum, y).value)
  initial = float(loss_fn(params).value)

  num_params = 14
  # A deterministic problem: no damping floor, so the steps become exact
  # Gauss-Newton steps (the default floor of 1e-4 s_max would leave a
  # relative excess of about 1e-4 after three steps).
  opt = sofo_jax.sofo(
    1.0,
    num_params,
    1e-9,
    key=jax.random.key(0),
    step_control=sofo_jax.StepControl(min_damping=0.0),
  )
  state = opt.init(params)
  step = jax.jit(lambda p, s: opt.update(None, s, p, loss_fn=loss_fn))
  for _ in range(3):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  relative_excess = (float(loss_fn(params).value) - best) / initial
  assert relative_excess <= 1e-6


# A task where Adam is known to struggle: teacher-student regression of a slow
# leaky tanh RNN (a LeakyRNN, leak 0.1: time constant 10 steps; T = 50): the loss
# surface is ill-conditioned along the slow recurrent modes. Seeds: teacher 123,
# student init 0, batches from 100, tangents from 1, evaluation batch 999.
N, N_IN, N_OUT, HORIZON, BATCH, LEAK, STEPS = 16, 2, 2, 50, 32, 0.1, 150
# The grid brackets Adam's best rate (1e-1 here): its end points do worse.
ADAM_LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def _init(key, gain):
  return LeakyRNN(N_IN, N, N_OUT, leak=LEAK, activation="tanh", gain=gain, key=key)


TEACHER = _init(jax.random.key(123), 1.5)


def _batch(key):
  xs = jax.random.normal(key, (HORIZON, BATCH, N_IN))

  def step(h, x_t):
    h = TEACHER(h, x_t)
    return h, TEACHER.readout(h)

  return xs, jax.lax.scan(step, TEACHER.initial_state((BATCH,)), xs)[1]


def _loss(model, xs, ys):
  def step(carry, inputs):
    h, total = carry
    h = model(h, inputs[0])
    return (h, total + losses.mse(model.readout(h), inputs[1])), None

  carry = (model.initial_state((BATCH,)), losses.zero())
  (_, total), _ = jax.lax.scan(step, carry, (xs, ys))
  return total / HORIZON


def _train(opt, uses_sofo):
  params = _init(jax.random.key(0), 1.0)

  def one(carry, key):
    params, state = carry
    xs, ys = _batch(key)
    if uses_sofo:
      updates, state = opt.update(
        None, state, params, loss_fn=lambda p: _loss(p, xs, ys)
      )
    else:
      grads = jax.grad(lambda p: _loss(p, xs, ys).value)(params)
      updates, state = opt.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  keys = jax.random.split(jax.random.key(100), STEPS)
  (params, _), _ = jax.jit(lambda c, k: jax.lax.scan(one, c, k))(
    (params, opt.init(params)), keys
  )
  return float(_loss(params, *_batch(jax.random.key(999))).value)


def test_sofo_beats_tuned_adam_on_a_slow_rnn():
  adam = {lr: _train(optax.adam(lr), False) for lr in ADAM_LEARNING_RATES}
  best_adam = min(adam.values())
  sofo = _train(sofo_jax.sofo(1.0, 64, 1e-4, key=jax.random.key(1)), True)
  print(f"Adam final losses by learning rate: {adam}; SOFO (K=64): {sofo}")
  assert np.isfinite(sofo)
  assert sofo < 0.5 * best_adam


RNN_TASKS = ("flip_flop", "lorenz", "kalman", "double_reach", "delayed_addition")


@pytest.mark.parametrize("method", ["fgd", "sgd"])
@pytest.mark.parametrize("name", RNN_TASKS)
def test_fit_defaults_train_forward_gradient_and_sgd(name, method):
  """training.fit gives FGD and SGD rates of their own: no blow-up at quick size.

  (SOFO at its defaults is pinned in test_step_control.py.)
  """
  module = sofo_jax.tasks.TASKS[name]
  task = module.make(module.Config.quick())
  history = training.fit(
    task, method, 20, key=jax.random.key(0), progress=False, chunk_size=20
  )
  assert history.settings["learning_rate"] == training.DEFAULT_LEARNING_RATES[method]
  assert np.all(np.isfinite(history.losses))
  assert np.max(history.losses) <= 3 * history.losses[0]


def test_fit_passes_sofo_options_and_rejects_them_for_other_methods():
  task = sofo_jax.tasks.flip_flop.make(sofo_jax.tasks.flip_flop.Config.quick())
  # The paper's fixed damping overshoots here, and fit says so.
  with pytest.warns(RuntimeWarning, match="without step control"):
    history = training.fit(
      task, "sofo", 2, key=jax.random.key(0), progress=False, adaptive=False
    )
  assert history.settings["adaptive"] is False
  with pytest.raises(ValueError, match="SOFO only"):
    training.fit(task, "adam", 2, key=jax.random.key(0), progress=False, adaptive=False)
  with pytest.raises(ValueError, match="method must be one of"):
    training.fit(task, "lbfgs", 2, key=jax.random.key(0), progress=False)


def _one_weight_task(name, loss_fn, sample_batch):
  """A task with one scalar weight ``w``, starting at 0, and no metrics."""
  return sofo_jax.tasks.Task(
    name=name,
    config=sofo_jax.tasks.TaskConfig(batch_size=4, num_tangents=1),
    init_params=lambda key: {"w": jnp.zeros((1,))},
    sample_batch=sample_batch,
    loss_fn=loss_fn,
    metrics=lambda params, batch: {},
    outputs=lambda params, batch: {},
  )


def _task_that_blows_up_on_some_batches():
  """A one-weight task whose loss is infinite on some batches once w > 0.5.

  A quarter of the batches pull w towards 0.8, the rest towards 0.2 and make
  the loss infinite for w > 0.5. A step that takes w past 0.5, followed by
  a batch of the second kind, is undone by the next-batch check, and the
  loss recorded at that update is infinite (the spike that was undone).
  """
  x = jnp.ones((4, 1))

  def loss_fn(params, blows_up):
    weight = jnp.where(blows_up & (params["w"] > 0.5), jnp.inf, params["w"])
    return losses.mse(x * weight, jnp.where(blows_up, 0.2, 0.8) * x)

  return _one_weight_task(
    "blows_up", loss_fn, lambda key: jax.random.bernoulli(key, 0.75)
  )


def test_fit_records_which_steps_were_undone():
  task = _task_that_blows_up_on_some_batches()
  with pytest.warns(RuntimeWarning, match="times the first"):
    history = training.fit(
      task, "sofo", 16, key=jax.random.key(2), chunk_size=5, progress=False
    )
  assert history.step_reverted.shape == history.step_rejected.shape == (16,)
  assert history.step_reverted.any()
  assert np.all(np.isinf(history.losses[history.step_reverted]))
  assert np.all(np.isfinite(history.params["w"]))
  adam = training.fit(task, "adam", 3, key=jax.random.key(0), progress=False)
  assert not adam.step_reverted.any() and not adam.step_rejected.any()


def test_fit_stops_at_a_chunk_boundary_once_max_seconds_is_spent():
  task = sofo_jax.tasks.flip_flop.make(sofo_jax.tasks.flip_flop.Config.quick())
  key = jax.random.key(0)
  # A zero budget is spent after the first chunk, whatever the machine.
  cut = training.fit(
    task, "sofo", 9, key=key, chunk_size=4, max_seconds=0.0, progress=False
  )
  assert cut.losses.shape == cut.seconds.shape == cut.step_rejected.shape == (4,)
  assert cut.settings["num_steps"] == 9
  # The steps that ran are those of the full run, which an ample budget allows.
  full = training.fit(
    task, "sofo", 9, key=key, chunk_size=4, max_seconds=1e9, progress=False
  )
  assert full.losses.shape == (9,)
  np.testing.assert_allclose(cut.losses, full.losses[:4], rtol=1e-6)
  with pytest.raises(ValueError, match="max_seconds"):
    training.fit(task, "sofo", 2, key=key, max_seconds=-1.0, progress=False)


def _task_at_the_loss_precision_limit():
  """One weight, and a constant residual that lifts the loss to about 1.8e4.

  Float32 resolves changes of about 2e-3 there, so once the weight is near
  its optimum no step's decrease shows, and step control rejects nearly
  every step: what TF32 rounding in the sketch did near a plateau on a GPU.
  """
  x = jnp.ones((4, 1))

  def loss_fn(params, batch):
    del batch
    predictions = jnp.concatenate([x * params["w"], jnp.full((1, 1), 300.0)])
    return losses.mse(predictions, jnp.concatenate([0.8 * x, jnp.zeros((1, 1))]))

  return _one_weight_task("precision_limit", loss_fn, lambda key: jnp.zeros(()))


def _fit_warnings(task, num_steps, match, *, seed=0, chunk_size=50, **options):
  """SOFO's fit history, and the messages of its warnings that contain ``match``."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    history = training.fit(
      task,
      "sofo",
      num_steps,
      key=jax.random.key(seed),
      chunk_size=chunk_size,
      progress=False,
      **options,
    )
  return history, [str(w.message) for w in caught if match in str(w.message)]


def _rejection_warnings(task):
  return _fit_warnings(task, 200, "rejected")


def _task_unstable_on_some_batches():
  """A one-weight regression whose loss is infinite on about a fifth of batches.

  What a recurrent model that is unstable on some inputs shows: SOFO skips
  those batches and trains on the rest.
  """
  x = jnp.ones((4, 1))

  def loss_fn(params, unstable):
    blown_up = jnp.where(unstable, jnp.inf, 0.0)
    return losses.mse(x * params["w"] + blown_up, 0.8 * x)

  return _one_weight_task(
    "unstable_batches", loss_fn, lambda key: jax.random.bernoulli(key, 0.2)
  )


def test_fit_warns_once_when_many_training_losses_are_not_finite():
  history, messages = _fit_warnings(
    _task_unstable_on_some_batches(), 200, "non-finite loss"
  )
  nonfinite = ~np.isfinite(history.losses)
  assert 0.1 < nonfinite.mean() < 0.3
  assert history.num_nonfinite_steps == nonfinite.sum()
  # The skipped batches did not stop training on the others.
  assert np.isfinite(np.asarray(history.params["w"])).all()
  trained = history.losses[~nonfinite]
  assert trained[-10:].max() < 0.1 * trained[0]
  assert len(messages) == 1
  assert "of the last 100 training batches" in messages[0]
  assert "learning_rate=0.1" in messages[0]
  # A task that trains does not warn, of non-finite losses or of spikes.
  flip_flop = sofo_jax.tasks.flip_flop
  _, messages = _fit_warnings(flip_flop.make(flip_flop.Config.quick()), 200, "")
  assert not [m for m in messages if "non-finite loss" in m or "times the first" in m]


def _task_with_rare_steep_batches():
  """A one-weight regression where about one batch in ten is 30 times steeper.

  From w = 0 every batch's loss is 0.64. Once w has moved towards its target
  of 0.8, a steep batch (inputs 30, targets 0.8) has a loss of several
  hundred: a finite spike far above 3x the first.
  """

  def loss_fn(params, steep):
    x = jnp.where(steep, 30.0, 1.0) * jnp.ones((4, 1))
    return losses.mse(x * params["w"], jnp.full((4, 1), 0.8))

  return _one_weight_task(
    "steep_batches", loss_fn, lambda key: jax.random.bernoulli(key, 0.1)
  )


# From w = 0 the first step overshoots onto a steep batch (step 1) and is
# undone; from w = 0.7 a steep batch is steep before and after the last step,
# and the first comes in a later chunk (step 31).
@pytest.mark.parametrize("start, seed, undone", [(0.0, 0, True), (0.7, 3, False)])
def test_fit_warns_once_at_the_first_loss_above_three_times_the_first(
  start, seed, undone
):
  history, messages = _fit_warnings(
    _task_with_rare_steep_batches(),
    60,
    "times the first",
    seed=seed,
    chunk_size=5,
    params={"w": jnp.full((1,), start)},
  )
  spikes = np.flatnonzero(history.losses > training.SPIKE_RATIO * history.losses[0])
  assert spikes.size >= 2  # several spikes, one warning
  assert len(messages) == 1
  step = int(spikes[0])
  assert messages[0].startswith(f"At step {step} SOFO's training loss was")
  ratio = history.losses[step] / history.losses[0]
  assert f"{ratio:.3g} times the first" in messages[0]
  assert bool(history.step_reverted[step]) == undone
  assert ("check undid the step" in messages[0]) == undone
  assert "validation_batches" in messages[0] and "larger" in messages[0]


def test_fit_spike_warning_in_paper_mode_points_to_step_control():
  # The paper's fixed damping overshoots on flip-flop's first step.
  task = sofo_jax.tasks.flip_flop.make(sofo_jax.tasks.flip_flop.Config.quick())
  history, messages = _fit_warnings(task, 3, "times the first", adaptive=False)
  assert history.losses.max() > training.SPIKE_RATIO * history.losses[0]
  assert len(messages) == 1
  assert "adaptive=False" in messages[0] and "next-batch check" not in messages[0]


def test_fit_spike_warning_ignores_non_finite_and_unscaled_losses():
  assert training._first_spike(np.array([1.0, np.inf, np.nan, 2.9]), 1.0) is None
  assert training._first_spike(np.array([1.0, 3.5, 4.0]), 1.0) == 1
  # A first loss that is not positive gives no scale.
  assert training._first_spike(np.array([5.0, 100.0]), 0.0) is None
  assert training._first_spike(np.array([5.0, 100.0]), -1.0) is None
  assert training._first_spike(np.array([5.0, 100.0]), np.nan) is None


def test_fit_warns_once_when_most_steps_are_rejected_on_an_accelerator(monkeypatch):
  task = _task_at_the_loss_precision_limit()
  history, messages = _rejection_warnings(task)
  assert history.step_rejected[-100:].mean() >= 0.5
  assert messages == []  # a CPU's matmuls are float32: nothing to advise
  # As if on a GPU at JAX's default precision (TF32 there).
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  _, messages = _rejection_warnings(task)
  assert len(messages) == 1
  assert "of the last 100 steps" in messages[0]
  assert 'jax.default_matmul_precision("float32")' in messages[0]
  with jax.default_matmul_precision("float32"):
    assert _rejection_warnings(task)[1] == []
  # A task that trains does not warn.
  flip_flop = sofo_jax.tasks.flip_flop
  assert _rejection_warnings(flip_flop.make(flip_flop.Config.quick()))[1] == []


def _validation_loss(task, params, key, num_batches):
  """The mean loss on fit's validation batches, computed here from their rule."""
  keys = jax.random.split(
    jax.random.fold_in(key, training.VALIDATION_STREAM), num_batches
  )
  return np.mean([float(task.loss_value(params, task.sample_batch(k))) for k in keys])


def test_fit_validation_keeps_the_best_parameters_and_leaves_training_unchanged():
  task = sofo_jax.tasks.flip_flop.make(sofo_jax.tasks.flip_flop.Config.quick())
  key = jax.random.key(0)
  history = training.fit(
    task, "sofo", 30, key=key, progress=False, chunk_size=10, validation_batches=2
  )
  plain = training.fit(task, "sofo", 30, key=key, progress=False, chunk_size=10)
  np.testing.assert_array_equal(history.losses, plain.losses)
  assert plain.validation_losses is None and plain.best_params is None
  np.testing.assert_array_equal(history.validation_steps, [10, 20, 30])
  best = int(np.argmin(history.validation_losses))
  assert history.best_step == history.validation_steps[best]
  np.testing.assert_allclose(
    _validation_loss(task, history.best_params, key, 2),
    history.validation_losses[best],
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    _validation_loss(task, history.params, key, 2),
    history.validation_losses[-1],
    rtol=1e-5,
  )


def test_fit_validation_keeps_finite_parameters_when_training_diverges():
  task = sofo_jax.tasks.flip_flop.make(sofo_jax.tasks.flip_flop.Config.quick())
  # Plain SGD at rate 1 overflows within 20 steps on this task.
  history = training.fit(
    task,
    "sgd",
    40,
    key=jax.random.key(0),
    learning_rate=1.0,
    progress=False,
    chunk_size=10,
    validation_batches=2,
  )
  assert not np.all(np.isfinite(history.validation_losses))
  assert history.best_step == 10
  leaves = jax.tree.leaves(history.best_params)
  assert leaves and all(np.all(np.isfinite(leaf)) for leaf in leaves)


@pytest.mark.parametrize("bad", [-1, 1.5, True, None])
def test_fit_refuses_a_bad_validation_batches(bad):
  task = sofo_jax.tasks.flip_flop.make(sofo_jax.tasks.flip_flop.Config.quick())
  with pytest.raises(ValueError, match="validation_batches"):
    training.fit(
      task, "sgd", 1, key=jax.random.key(0), progress=False, validation_batches=bad
    )
