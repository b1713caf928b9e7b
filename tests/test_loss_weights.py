"""Weighted and masked losses, bool-scaled losses, int data in custom losses.

Values and sketched Gauss–Newton matrices are checked against the dense
float64 reference of ``reference.py``; the weighted formulas are restated
here directly: (1/B) sum_b w_b sum_f e_bf, B the number of batch elements.
"""

import re

import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
import reference
from jax.flatten_util import ravel_pytree

import sofo_jax
from sofo_jax import losses

BATCH, N_IN, K = (2, 3), 2, 5


def _log_softmax(z):
  return z - jax.scipy.special.logsumexp(z, axis=-1, keepdims=True)


# name: (output features, weighted sofo loss, per-example reference, targets).
CASES = {
  "mse": (
    2,
    lambda y, t, w: losses.mse(y, t, weights=w),
    lambda y, t: jnp.sum((y - t) ** 2, -1),
    lambda rng, shape: rng.normal(size=shape),
  ),
  "gaussian_nll": (
    2,
    lambda y, t, w: losses.gaussian_nll(y, t, 0.3, weights=w),
    lambda y, t: jnp.sum((y - t) ** 2 / 0.6 + 0.5 * jnp.log(2 * jnp.pi * 0.3), -1),
    lambda rng, shape: rng.normal(size=shape),
  ),
  "softmax_cross_entropy": (
    4,
    lambda y, t, w: losses.softmax_cross_entropy(y, t, weights=w),
    lambda y, t: -jnp.take_along_axis(_log_softmax(y), t[..., None], -1)[..., 0],
    lambda rng, shape: rng.integers(0, shape[-1], shape[:-1]).astype(np.int32),
  ),
  "sigmoid_binary_cross_entropy": (
    2,
    lambda y, t, w: losses.sigmoid_binary_cross_entropy(y, t, weights=w),
    lambda y, t: jnp.sum(
      -t * jnp.log(jax.nn.sigmoid(y)) - (1 - t) * jnp.log(1 - jax.nn.sigmoid(y)), -1
    ),
    lambda rng, shape: rng.uniform(size=shape),
  ),
  "poisson": (
    3,
    lambda y, t, w: losses.poisson(y, t, weights=w),
    lambda y, t: jnp.sum(jnp.exp(y) - t * y, -1),
    lambda rng, shape: rng.poisson(1.5, shape).astype(np.int32),
  ),
}


def _outputs_and_targets(name, seed):
  """The loss of case ``name``, float32 outputs and targets of batch shape BATCH."""
  n_out, sofo_loss, _, sample_targets = CASES[name]
  rng = np.random.default_rng(seed)
  y = rng.normal(size=(*BATCH, n_out)).astype(np.float32)
  return sofo_loss, y, sample_targets(rng, (*BATCH, n_out))


def _weights(rng):
  weights = rng.uniform(0.5, 2.0, size=BATCH)
  weights[0, 1] = weights[1, 2] = 0.0  # zeros: those examples drop out
  return weights


@pytest.mark.parametrize("name", sorted(CASES))
def test_weighted_value_and_sketch_match_the_dense_reference(x64, name):
  n_out, sofo_loss, per_example, sample_targets = CASES[name]
  rng = np.random.default_rng(1)
  params = models.mlp_params(rng, [N_IN, 3, n_out])
  x = rng.normal(size=(*BATCH, N_IN))
  targets = sample_targets(rng, (*BATCH, n_out))
  weights = _weights(rng)
  outputs_fn = lambda p: models.mlp(p, x)
  loss_of_outputs = lambda y: (
    jnp.sum(weights * per_example(y, targets)) / np.prod(BATCH)
  )
  gradient, gauss_newton = jax.jit(
    lambda p: reference.dense_gauss_newton(p, outputs_fn, loss_of_outputs)
  )(params)
  tangents = sofo_jax.sample_tangents(jax.random.key(3), params, K)
  theta = jax.vmap(lambda t: ravel_pytree(t)[0])(tangents).T  # (P, K)

  # Weights passed as a jit argument: traced data all the way to the rule.
  @jax.jit
  def sketches(p, w):
    one = lambda w: sofo_jax.sketch(
      lambda q: sofo_loss(outputs_fn(q), targets, w), p, tangents
    )
    return one(w), one(jnp.ones_like(w))

  (value, g, G), unweighted = sketches(params, weights)
  assert jnp.allclose(value, loss_of_outputs(outputs_fn(params)), rtol=1e-12)
  assert jnp.allclose(g, theta.T @ gradient, rtol=1e-10, atol=1e-13)
  assert jnp.allclose(G, theta.T @ gauss_newton @ theta, rtol=1e-10, atol=1e-13)
  # The weights matter: with all ones the Gauss–Newton block differs.
  assert not jnp.allclose(unweighted.gauss_newton, G, rtol=1e-3)


@pytest.mark.parametrize("name", sorted(CASES))
def test_normalisation_divides_by_the_batch_size(name):
  sofo_loss, y, targets = _outputs_and_targets(name, 2)
  mask = np.zeros(BATCH, bool)
  mask[1] = True  # keep half of the batch
  plain = sofo_loss(y, targets, None).value
  ones = sofo_loss(y, targets, jnp.ones(BATCH)).value
  kept = sofo_loss(y[1], targets[1], None).value  # the mean over the kept half
  masked = sofo_loss(y, targets, mask).value
  np.testing.assert_allclose(ones, plain, rtol=1e-6)
  np.testing.assert_allclose(masked, 0.5 * kept, rtol=1e-6)  # / B, not / sum(w)
  # Broadcasting: one weight per row of the batch.
  row_weights = sofo_loss(y, targets, np.array([[0.0], [1.0]])).value
  np.testing.assert_allclose(row_weights, masked, rtol=1e-6)
  # A float 0/1 mask and a bool mask give the same loss.
  np.testing.assert_allclose(
    sofo_loss(y, targets, mask.astype(np.float32)).value, masked
  )


def test_bool_and_float_masks_give_the_same_sketch():
  rng = np.random.default_rng(3)
  params = models.mlp_params(rng, [N_IN, 3, 2], np.float32)
  x = rng.normal(size=(*BATCH, N_IN)).astype(np.float32)
  targets = rng.normal(size=(*BATCH, 2)).astype(np.float32)
  mask = rng.uniform(size=BATCH) > 0.5
  tangents = sofo_jax.sample_tangents(jax.random.key(0), params, 3)
  as_bool = sofo_jax.sketch(
    lambda p: losses.mse(models.mlp(p, x), targets, weights=mask), params, tangents
  )
  as_float = sofo_jax.sketch(
    lambda p: losses.mse(models.mlp(p, x), targets, weights=mask.astype(np.float32)),
    params,
    tangents,
  )
  for a, b in zip(as_bool, as_float):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert as_bool.gauss_newton.dtype == jnp.float32


# Bool-scaled losses: a time mask written as (t >= t0) * loss -------------------------------


T_STEPS, T0 = 4, 2


def _rnn_problem(rng):
  params = models.rnn_params(rng, N_IN, 3, 2)
  xs = rng.normal(size=(T_STEPS, 3, N_IN))
  targets = rng.normal(size=(T_STEPS, 3, 2))
  return params, xs, targets


def test_time_mask_as_a_bool_scale_matches_the_dense_reference(x64):
  params, xs, targets = _rnn_problem(np.random.default_rng(4))

  def loss_fn(p):
    model = models.rnn(p)

    def step(carry, inputs):
      h, total = carry
      t, x_t, target_t = inputs
      h = model(h, x_t)
      # A traced bool scalar scales the loss: steps before T0 are masked.
      return (h, total + (t >= T0) * losses.mse(model.readout(h), target_t)), None

    inputs = (jnp.arange(T_STEPS), xs, targets)
    h0 = model.initial_state(xs.shape[1:2])
    (_, total), _ = jax.lax.scan(step, (h0, losses.zero(xs.dtype)), inputs)
    return total / T_STEPS

  outputs_fn = lambda p: models.rnn_outputs(p, xs)
  keep = (np.arange(T_STEPS) >= T0)[:, None]
  loss_of_outputs = lambda ys: (
    jnp.sum(keep * jnp.sum((ys - targets) ** 2, -1)) / (T_STEPS * 3)
  )
  gradient, gauss_newton = jax.jit(
    lambda p: reference.dense_gauss_newton(p, outputs_fn, loss_of_outputs)
  )(params)
  tangents = sofo_jax.sample_tangents(jax.random.key(1), params, K)
  theta = jax.vmap(lambda t: ravel_pytree(t)[0])(tangents).T
  value, g, G = jax.jit(lambda p: sofo_jax.sketch(loss_fn, p, tangents))(params)
  assert value.dtype == jnp.float64
  assert jnp.allclose(value, loss_of_outputs(outputs_fn(params)), rtol=1e-12)
  assert jnp.allclose(g, theta.T @ gradient, rtol=1e-10, atol=1e-13)
  assert jnp.allclose(G, theta.T @ gauss_newton @ theta, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
  "mask", [True, np.bool_(True), jnp.array(True), jnp.arange(3)[1] >= 1]
)
def test_a_loss_scaled_by_a_true_bool_is_unchanged(mask):
  loss = losses.mse(jnp.ones((4, 2)), jnp.zeros((4, 2)))
  for scaled in (mask * loss, loss * mask):
    assert float(scaled) == 2.0
    assert scaled.value.dtype == jnp.float32


def test_a_loss_scaled_by_a_false_bool_is_zero():
  loss = losses.mse(jnp.ones((4, 2)), jnp.zeros((4, 2)))
  assert float(False * loss) == 0.0
  assert float(loss * jnp.array(False)) == 0.0


@pytest.mark.parametrize(
  "scale, dtype",
  [(jnp.ones(3), "float32"), (1j, "complex"), (jnp.ones(2, bool), "bool")],
)
def test_bad_scales_say_what_to_do_instead(scale, dtype):
  loss = losses.mse(jnp.ones((4, 2)), jnp.zeros((4, 2)))
  with pytest.raises(
    TypeError, match=rf"real scalar.*dtype {dtype}.*pass weights= to the loss"
  ):
    loss * scale


# Integer data closed over by a custom loss inside a scan ---------------------------------------


def _spiking_loss(counts_dtype):
  rng = np.random.default_rng(5)
  params = {
    "w": jnp.asarray(0.5 * rng.normal(size=(2, 2)), jnp.float32),
    "u": jnp.asarray(rng.normal(size=(2,)), jnp.float32),
  }
  xs = jnp.asarray(rng.normal(size=(T_STEPS, 3, 2)), jnp.float32)
  counts = jnp.asarray(rng.poisson(1.0, (T_STEPS, 3, 2)), counts_dtype)

  def loss_fn(p):
    def step(carry, inputs):
      h, total = carry
      x_t, counts_t = inputs  # counts_t: the scanned int32 slice
      h = jnp.tanh(h @ p["w"] + x_t)
      log_rate = h + p["u"]
      nll = lambda r: jnp.mean(jnp.sum(jnp.exp(r) - counts_t * r, -1))
      return (h, total + losses.custom(log_rate, nll)), None

    init = (jnp.zeros((3, 2), jnp.float32), losses.zero())
    (_, total), _ = jax.lax.scan(step, init, (xs, counts))
    return total / T_STEPS

  return params, loss_fn


def test_custom_loss_closing_over_int32_scan_data_in_sketch():
  params, int_loss = _spiking_loss(jnp.int32)
  _, float_loss = _spiking_loss(jnp.float32)
  tangents = sofo_jax.sample_tangents(jax.random.key(0), params, 3)
  with_ints = jax.jit(lambda p: sofo_jax.sketch(int_loss, p, tangents))(params)
  with_floats = sofo_jax.sketch(float_loss, params, tangents)
  for a, b in zip(with_ints, with_floats):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # The Gauss–Newton block is not trivially zero.
  assert float(jnp.trace(with_ints.gauss_newton)) > 0.0


def test_custom_loss_closing_over_int32_scan_data_in_a_sofo_step():
  params, int_loss = _spiking_loss(jnp.int32)
  _, float_loss = _spiking_loss(jnp.float32)
  opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(0), adaptive=False)
  state = opt.init(params)
  step = lambda fn: jax.jit(lambda p, s: opt.update(None, s, p, loss_fn=fn))
  with_ints, _ = step(int_loss)(params, state)
  with_floats, _ = step(float_loss)(params, state)
  for a, b in zip(jax.tree.leaves(with_ints), jax.tree.leaves(with_floats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert any(float(jnp.max(jnp.abs(u))) > 0 for u in jax.tree.leaves(with_ints))


# float(loss) and jax.grad ---------------------------------------------------------------------


def test_float_of_a_loss_is_its_value():
  loss = losses.poisson(jnp.zeros((2, 3)), jnp.ones((2, 3)))
  assert float(loss) == 3.0
  assert f"{float(loss):.2f}" == "3.00"


def test_float_of_a_traced_loss_is_a_concretization_error():
  with pytest.raises(jax.errors.ConcretizationTypeError):
    jax.jit(lambda y: float(losses.mse(y, jnp.zeros(2))))(jnp.ones(2))


def test_jax_grad_of_a_loss_returning_closure_hints_at_value():
  # JAX formats the returned object with str() into its message; a Loss's
  # str() says to differentiate `.value`.
  loss_fn = lambda y: losses.mse(y, jnp.zeros(2))
  with pytest.raises(
    TypeError, match=r"Output was Loss\(.*jax\.grad\(lambda p: loss_fn\(p\)\.value\)"
  ):
    jax.grad(loss_fn)(jnp.ones(2))
  np.testing.assert_allclose(
    jax.grad(lambda y: loss_fn(y).value)(jnp.ones(2)), [2.0, 2.0]
  )


# Bad weights --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_weights_of_the_wrong_shape_name_the_loss_and_shapes(name):
  sofo_loss, y, targets = _outputs_and_targets(name, 6)
  message = (
    f"{name}: weights of shape (4,) do not broadcast to the batch shape "
    f"{BATCH} (outputs of shape {y.shape}"
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    sofo_loss(y, targets, np.ones(4))
  # Per-feature weights are not per-example weights.
  with pytest.raises(ValueError, match="one weight per example"):
    sofo_loss(y, targets, np.ones(y.shape))


@pytest.mark.parametrize("name", sorted(CASES))
def test_negative_concrete_weights_are_rejected(name):
  sofo_loss, y, targets = _outputs_and_targets(name, 7)
  weights = np.ones(BATCH)
  weights[1, 1] = -0.5
  with pytest.raises(
    ValueError, match=rf"{name}: weights must be non-negative.*got -0\.5"
  ):
    sofo_loss(y, targets, weights)


def test_traced_weights_are_not_inspected():
  fn = jax.jit(
    lambda w: losses.mse(jnp.ones((2, 1)), jnp.zeros((2, 1)), weights=w).value
  )
  np.testing.assert_allclose(fn(jnp.array([1.0, 3.0])), 2.0)


def test_complex_weights_are_rejected():
  with pytest.raises(TypeError, match=r"poisson: weights must be real .*complex64"):
    losses.poisson(
      jnp.zeros((2, 1)), jnp.zeros((2, 1)), weights=jnp.ones(2, jnp.complex64)
    )


def test_integer_weights_are_cast():
  loss = losses.mse(jnp.ones((2, 1)), jnp.zeros((2, 1)), weights=np.array([0, 3]))
  assert loss.value.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), 1.5)


def test_weights_are_keyword_only():
  with pytest.raises(TypeError):
    losses.mse(jnp.ones((2, 1)), jnp.zeros((2, 1)), jnp.ones(2))
