"""SOFO against an independent dense damped Gauss–Newton step (float64).

The master test: with K = P orthonormal tangents, the SOFO update equals
``-(G + lambda s_max I)^{-1} g`` for every loss, on a small MLP and a small RNN.
"""

import functools

import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
import reference
from jax.flatten_util import ravel_pytree

import sofo_jax
from sofo_jax import losses

B, T, N_IN, N_HIDDEN = 3, 4, 2, 3


def _log_softmax(z):
  return z - jax.scipy.special.logsumexp(z, axis=-1, keepdims=True)


# (name, output features, sofo loss, reference formula, target sampler).
# The reference formulas restate each loss's documented convention directly.
LOSS_CASES = {
  "mse": (
    2,
    losses.mse,
    lambda y, t: jnp.mean(jnp.sum((y - t) ** 2, -1)),
    lambda rng, shape: rng.normal(size=shape),
  ),
  "gaussian_nll": (
    2,
    lambda y, t: losses.gaussian_nll(y, t, variance=0.3),
    lambda y, t: jnp.mean(
      jnp.sum((y - t) ** 2 / 0.6 + 0.5 * jnp.log(2 * jnp.pi * 0.3), -1)
    ),
    lambda rng, shape: rng.normal(size=shape),
  ),
  "softmax_ce_labels": (
    4,
    losses.softmax_cross_entropy,
    lambda y, t: -jnp.mean(jnp.take_along_axis(_log_softmax(y), t[..., None], -1)),
    lambda rng, shape: rng.integers(0, shape[-1], shape[:-1]),
  ),
  "softmax_ce_probs": (
    4,
    losses.softmax_cross_entropy,
    lambda y, t: -jnp.mean(jnp.sum(t * _log_softmax(y), -1)),
    lambda rng, shape: np.asarray(jax.nn.softmax(rng.normal(size=shape))),
  ),
  "sigmoid_bce": (
    2,
    losses.sigmoid_binary_cross_entropy,
    lambda y, t: jnp.mean(
      jnp.sum(
        -t * jnp.log(jax.nn.sigmoid(y)) - (1 - t) * jnp.log(1 - jax.nn.sigmoid(y)), -1
      )
    ),
    lambda rng, shape: rng.uniform(size=shape),
  ),
  "poisson": (
    3,
    losses.poisson,
    lambda y, t: jnp.mean(jnp.sum(jnp.exp(y) - t * y, -1)),
    lambda rng, shape: rng.poisson(1.5, shape).astype(np.float64),
  ),
  "custom_log_cosh": (
    2,
    lambda y, t: losses.custom(
      y, lambda y: jnp.mean(jnp.sum(optax.log_cosh(y, t), -1))
    ),
    lambda y, t: jnp.mean(jnp.sum(jnp.log(jnp.cosh(y - t)), -1)),
    lambda rng, shape: rng.normal(size=shape),
  ),
}


def _problem(model, loss_name, seed):
  n_out, sofo_loss, ref_loss, sample_targets = LOSS_CASES[loss_name]
  rng = np.random.default_rng(seed)  # numpy data: nothing to compile
  if model == "mlp":
    params = models.mlp_params(rng, [N_IN, 3, n_out])
    x = rng.normal(size=(B, N_IN))
    targets = sample_targets(rng, (B, n_out))
    outputs_fn = lambda p: models.mlp(p, x)
    loss_fn = lambda p: sofo_loss(models.mlp(p, x), targets)
    loss_of_outputs = lambda y: ref_loss(y, targets)
  else:
    params = models.rnn_params(rng, N_IN, N_HIDDEN, n_out)
    xs = rng.normal(size=(T, B, N_IN))
    targets = sample_targets(rng, (T, B, n_out))
    outputs_fn = lambda p: models.rnn_outputs(p, xs)
    loss_fn = lambda p: models.rnn_scan_loss(p, xs, targets, sofo_loss)
    loss_of_outputs = lambda ys: jnp.mean(jax.vmap(ref_loss)(ys, targets))
  return params, outputs_fn, loss_fn, loss_of_outputs


FULL_RANK_CASES = [
  (model, loss_name, True)
  for model in ("mlp", "rnn")
  for loss_name in sorted(LOSS_CASES)
] + [("mlp", "mse", False), ("rnn", "poisson", False)]  # absolute damping


@pytest.mark.parametrize("model, loss_name, relative", FULL_RANK_CASES)
def test_full_rank_sofo_equals_damped_gauss_newton(x64, model, loss_name, relative):
  params, outputs_fn, loss_fn, loss_of_outputs = _problem(model, loss_name, 3)
  gradient, gauss_newton = jax.jit(
    lambda p: reference.dense_gauss_newton(p, outputs_fn, loss_of_outputs)
  )(params)
  damping = 1e-3 if relative else 1e-3 * jnp.linalg.eigvalsh(gauss_newton)[-1]
  expected = -reference.damped_gauss_newton_step(
    gradient, gauss_newton, damping, relative
  )

  num_params = gradient.size
  opt = sofo_jax.sofo(
    1.0,
    num_params,
    damping,
    key=jax.random.key(7),
    adaptive=False,
    tangent_distribution="orthonormal",
    relative_damping=relative,
  )
  updates, state = jax.jit(lambda p, s: opt.update(None, s, p, loss_fn=loss_fn))(
    params, opt.init(params)
  )
  flat_updates, _ = ravel_pytree(updates)
  assert flat_updates.dtype == jnp.float64
  scale = jnp.max(jnp.abs(expected))
  assert jnp.max(jnp.abs(flat_updates - expected)) <= 1e-8 * scale
  # The loss value in the diagnostics is the reference loss at the start.
  diagnostics = sofo_jax.get_diagnostics(state)
  assert jnp.allclose(diagnostics.loss, loss_of_outputs(outputs_fn(params)), rtol=1e-12)


@pytest.mark.parametrize("model", ["mlp", "rnn"])
@pytest.mark.parametrize("loss_name", ["mse", "softmax_ce_labels", "poisson"])
def test_sketch_matches_projected_gradient_and_gauss_newton(x64, model, loss_name):
  params, outputs_fn, loss_fn, loss_of_outputs = _problem(model, loss_name, 4)
  gradient, gauss_newton = jax.jit(
    lambda p: reference.dense_gauss_newton(p, outputs_fn, loss_of_outputs)
  )(params)
  k = 5
  tangents = sofo_jax.sample_tangents(jax.random.key(5), params, k)
  theta = jax.vmap(lambda t: ravel_pytree(t)[0])(tangents).T  # (P, K)
  value, g_sketch, G_sketch = jax.jit(functools.partial(sofo_jax.sketch, loss_fn))(
    params, tangents
  )
  # Against Theta^T (jax.grad of the loss value), as the issue asks.
  grad_of_value = ravel_pytree(jax.grad(lambda p: loss_fn(p).value)(params))[0]
  assert jnp.allclose(g_sketch, theta.T @ grad_of_value, rtol=1e-10, atol=1e-13)
  assert jnp.allclose(g_sketch, theta.T @ gradient, rtol=1e-10, atol=1e-13)
  assert jnp.allclose(G_sketch, theta.T @ gauss_newton @ theta, rtol=1e-10, atol=1e-13)
  assert jnp.allclose(value, loss_of_outputs(outputs_fn(params)), rtol=1e-12)


def test_scan_accumulated_sketch_equals_all_steps_at_once(x64):
  """Per-step losses summed in a scan == one loss on all stacked outputs."""
  rng = np.random.default_rng(8)
  params = models.rnn_params(rng, N_IN, N_HIDDEN, 2)
  xs = rng.normal(size=(T, B, N_IN))
  targets = rng.normal(size=(T, B, 2))
  tangents = sofo_jax.sample_tangents(jax.random.key(11), params, 6)
  in_scan = sofo_jax.sketch(
    lambda p: models.rnn_scan_loss(p, xs, targets), params, tangents
  )
  # mse averages over all leading axes (T*B rows) == mean over time of batch means.
  at_once = sofo_jax.sketch(
    lambda p: losses.mse(models.rnn_outputs(p, xs), targets), params, tangents
  )
  for a, b in zip(in_scan, at_once):
    assert jnp.allclose(a, b, rtol=1e-11, atol=1e-14)


def test_orthonormal_tangents_are_orthonormal(x64):
  params = models.mlp_params(np.random.default_rng(0), [3, 4, 2])
  tangents = sofo_jax.sample_tangents(jax.random.key(1), params, 10, "orthonormal")
  theta = jax.vmap(lambda t: ravel_pytree(t)[0])(tangents)
  assert jnp.allclose(theta @ theta.T, jnp.eye(10), atol=1e-12)


def test_normalized_gaussian_tangents_have_unit_norm(x64):
  params = models.mlp_params(np.random.default_rng(0), [3, 4, 2])
  tangents = sofo_jax.sample_tangents(jax.random.key(1), params, 7)
  theta = jax.vmap(lambda t: ravel_pytree(t)[0])(tangents)
  assert jnp.allclose(jnp.linalg.norm(theta, axis=1), 1.0, atol=1e-12)
  # Not orthogonal: the Gaussian draw is kept as is.
  assert jnp.max(jnp.abs(theta @ theta.T - jnp.eye(7))) > 1e-3


def _least_squares(rng, num_rows=12, num_features=4, num_outputs=2):
  x = rng.normal(size=(num_rows, num_features))
  y = rng.normal(size=(num_rows, num_outputs))
  params = {
    "w": jnp.asarray(rng.normal(size=(num_features, num_outputs))),
    "b": jnp.asarray(rng.normal(size=(num_outputs,))),
  }
  loss_fn = lambda p: losses.mse(x @ p["w"] + p["b"], y)
  outputs_fn = lambda p: x @ p["w"] + p["b"]
  loss_of_outputs = lambda out: jnp.mean(jnp.sum((out - y) ** 2, -1))
  return params, loss_fn, outputs_fn, loss_of_outputs


@pytest.mark.parametrize("learning_rate", [1.0, 0.5])
def test_adaptive_full_rank_step_on_quadratic_equals_damped_gauss_newton(
  x64, learning_rate
):
  """On a quadratic, rho = 1 for every trial: the least damped step is taken."""
  params, loss_fn, outputs_fn, loss_of_outputs = _least_squares(
    np.random.default_rng(3)
  )
  gradient, gauss_newton = reference.dense_gauss_newton(
    params, outputs_fn, loss_of_outputs
  )
  damping = 1e-3
  expected = -learning_rate * reference.damped_gauss_newton_step(
    gradient, gauss_newton, damping, True
  )
  # Without momentum: all K = P tangents are fresh and orthonormal.
  opt = sofo_jax.sofo(
    learning_rate,
    gradient.size,
    damping,
    key=jax.random.key(2),
    tangent_distribution="orthonormal",
    momentum=False,
  )
  state = opt.init(params)
  updates, state = jax.jit(lambda p, s: opt.update(None, s, p, loss_fn=loss_fn))(
    params, state
  )
  flat_updates = ravel_pytree(updates)[0]
  scale = jnp.max(jnp.abs(expected))
  assert jnp.max(jnp.abs(flat_updates - expected)) <= 1e-8 * scale
  diagnostics = sofo_jax.get_diagnostics(state)
  assert not diagnostics.step_rejected
  assert float(diagnostics.damping_parameter) == pytest.approx(damping)
  assert float(diagnostics.rho) == pytest.approx(1.0, abs=1e-8)
  # rho > 3/4: the Levenberg-Marquardt rule lowers the damping.
  assert float(sofo_jax.get_state(state).damping) == pytest.approx(
    damping * sofo_jax.StepControl().decrease
  )
  # The trial loss is the loss at the updated parameters.
  new_loss = loss_of_outputs(outputs_fn(optax.apply_updates(params, updates)))
  assert float(diagnostics.trial_loss) == pytest.approx(float(new_loss), rel=1e-10)


def test_adaptive_backtracks_to_a_more_damped_step(x64):
  """A step that overshoots (lr 2.5 on a quadratic) is rejected until damped enough.

  On a quadratic the loss after the step -eta w(lambda) is known in closed form;
  the chosen trial must be the least damped one of the ladder whose loss does
  not increase, as computed here from the dense Gauss-Newton matrix.
  """
  params, loss_fn, outputs_fn, loss_of_outputs = _least_squares(
    np.random.default_rng(4)
  )
  gradient, gauss_newton = reference.dense_gauss_newton(
    params, outputs_fn, loss_of_outputs
  )
  eta, damping = 2.5, 1e-3
  control = sofo_jax.StepControl(num_trials=4, trial_growth=10.0, revert_ratio=None)
  start = float(loss_of_outputs(outputs_fn(params)))
  flat_params, unravel = ravel_pytree(params)
  ladder = [damping * 10.0**j for j in range(4)]
  trial_losses = [
    float(
      loss_of_outputs(
        outputs_fn(
          unravel(
            flat_params
            - eta * reference.damped_gauss_newton_step(gradient, gauss_newton, d, True)
          )
        )
      )
    )
    for d in ladder
  ]
  ok = [loss <= start for loss in trial_losses]
  assert not ok[0] and any(ok)  # the problem really needs backtracking
  chosen = ok.index(True)
  opt = sofo_jax.sofo(
    eta,
    gradient.size,
    damping,
    key=jax.random.key(2),
    tangent_distribution="orthonormal",
    step_control=control,
    momentum=False,
  )
  state = opt.init(params)
  updates, state = opt.update(None, state, params, loss_fn=loss_fn)
  diagnostics = sofo_jax.get_diagnostics(state)
  assert float(diagnostics.damping_parameter) == pytest.approx(ladder[chosen])
  expected = -eta * reference.damped_gauss_newton_step(
    gradient, gauss_newton, ladder[chosen], True
  )
  flat_updates = ravel_pytree(updates)[0]
  assert jnp.max(jnp.abs(flat_updates - expected)) <= 1e-8 * jnp.max(jnp.abs(expected))
  assert float(diagnostics.trial_loss) == pytest.approx(trial_losses[chosen], rel=1e-10)
