"""Loss values, conventions and arithmetic, outside any SOFO step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sofo_jax import losses

RNG = np.random.default_rng(0)
Y = jnp.asarray(RNG.normal(size=(5, 3)), jnp.float32)
T = jnp.asarray(RNG.normal(size=(5, 3)), jnp.float32)


def test_mse_convention():
  expected = np.mean(np.sum((np.asarray(Y) - np.asarray(T)) ** 2, -1))
  np.testing.assert_allclose(losses.mse(Y, T).value, expected, rtol=1e-6)


def test_mse_batch_axes_are_all_leading_axes():
  ys = jnp.asarray(RNG.normal(size=(2, 4, 3)))
  ts = jnp.zeros((2, 4, 3))
  np.testing.assert_allclose(
    losses.mse(ys, ts).value, np.sum(np.asarray(ys) ** 2) / 8, rtol=1e-6
  )


def test_softmax_ce_matches_optax_for_labels_and_probabilities():
  labels = jnp.asarray(RNG.integers(0, 3, 5))
  expected = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(Y, labels))
  np.testing.assert_allclose(
    losses.softmax_cross_entropy(Y, labels).value, expected, rtol=1e-6
  )
  probs = jax.nn.softmax(T)
  expected = jnp.mean(optax.softmax_cross_entropy(Y, probs))
  np.testing.assert_allclose(
    losses.softmax_cross_entropy(Y, probs).value, expected, rtol=1e-6
  )


def test_sigmoid_bce_matches_optax():
  labels = jnp.asarray(RNG.uniform(size=(5, 3)), jnp.float32)
  expected = jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(Y, labels), -1))
  np.testing.assert_allclose(
    losses.sigmoid_binary_cross_entropy(Y, labels).value, expected, rtol=1e-6
  )


def test_poisson_matches_the_likelihood_up_to_log_factorial():
  counts = jnp.asarray(RNG.poisson(2.0, (5, 3)), jnp.float32)
  log_pmf = jax.scipy.stats.poisson.logpmf(counts, jnp.exp(Y))
  log_factorial = jax.scipy.special.gammaln(counts + 1)
  expected = -jnp.mean(jnp.sum(log_pmf + log_factorial, -1))
  np.testing.assert_allclose(losses.poisson(Y, counts).value, expected, rtol=1e-5)


def test_gaussian_nll_matches_the_density():
  expected = -jnp.mean(jnp.sum(jax.scipy.stats.norm.logpdf(T, Y, jnp.sqrt(0.7)), -1))
  np.testing.assert_allclose(losses.gaussian_nll(Y, T, 0.7).value, expected, rtol=1e-5)


def test_custom_value_is_fn():
  fn = lambda y: jnp.mean(optax.huber_loss(y, T))
  np.testing.assert_allclose(losses.custom(Y, fn).value, fn(Y), rtol=1e-6)


def test_custom_requires_a_scalar():
  with pytest.raises(ValueError, match="must return a scalar"):
    losses.custom(Y, lambda y: y)


def test_arithmetic_sums_and_scales():
  a, b = losses.mse(Y, T), losses.mse(Y, 0 * T)
  np.testing.assert_allclose((a + b).value, a.value + b.value)
  np.testing.assert_allclose(sum([a, b, a]).value, 2 * a.value + b.value, rtol=1e-6)
  np.testing.assert_allclose((0.5 * a).value, 0.5 * a.value)
  np.testing.assert_allclose((a * 2).value, 2 * a.value)
  np.testing.assert_allclose((a / 4).value, a.value / 4)
  assert (losses.zero() + a).curvature.shape == (0,)


def test_mean_over_time_in_a_scan():
  ys = jnp.asarray(RNG.normal(size=(6, 5, 3)), jnp.float32)

  def loss_fn(ys):
    total, _ = jax.lax.scan(
      lambda c, y: (c + losses.mse(y, jnp.zeros_like(y)), None), losses.zero(), ys
    )
    return total / ys.shape[0]

  np.testing.assert_allclose(
    loss_fn(ys).value, np.sum(np.asarray(ys) ** 2) / 30, rtol=1e-5
  )


def test_grad_outside_sofo_is_ordinary():
  fn = lambda y: losses.softmax_cross_entropy(y, jnp.arange(5) % 3).value
  reference = lambda y: jnp.mean(
    optax.softmax_cross_entropy_with_integer_labels(y, jnp.arange(5) % 3)
  )
  np.testing.assert_allclose(
    jax.grad(fn)(Y), jax.grad(reference)(Y), rtol=1e-5, atol=1e-7
  )


def test_losses_jit_and_vmap():
  value = jax.jit(lambda y, t: losses.mse(y, t).value)(Y, T)
  per_row = jax.vmap(lambda y, t: losses.mse(y, t).value)(Y, T)
  np.testing.assert_allclose(value, jnp.mean(per_row), rtol=1e-6)
