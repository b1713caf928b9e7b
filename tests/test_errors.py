"""Bad input gets a clear error at construction or trace time."""

import jax
import jax.numpy as jnp
import optax
import pytest

import sofo_jax
from sofo_jax import losses

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
X = jnp.ones((4, 3))
Y = jnp.zeros((4, 2))


def good_loss(p):
  return losses.mse(X @ p["w"] + p["b"], Y)


def _update(opt, loss_fn=good_loss, params=PARAMS, **kwargs):
  return opt.update(None, opt.init(params), params, loss_fn=loss_fn, **kwargs)


@pytest.mark.parametrize(
  "k, error, match",
  [
    (0, ValueError, "num_tangents must be >= 1"),
    (-3, ValueError, "num_tangents must be >= 1"),
    (2.0, TypeError, "num_tangents must be a Python int"),
    (True, TypeError, "num_tangents must be a Python int"),
  ],
)
def test_bad_num_tangents(k, error, match):
  with pytest.raises(error, match=match):
    sofo_jax.sofo(1.0, k, key=jax.random.key(0))
  with pytest.raises(error, match=match):
    sofo_jax.forward_gradient(1.0, k, key=jax.random.key(0))


def test_missing_loss_fn_names_the_call_and_the_extra_args():
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0))
  with pytest.raises(
    ValueError, match=r"needs the loss closure.*loss_fn=loss_fn.*loss_function"
  ):
    opt.update(None, opt.init(PARAMS), PARAMS, loss_function=good_loss)


def test_missing_params():
  opt = sofo_jax.scale_by_sofo(2, key=jax.random.key(0))
  with pytest.raises(ValueError, match="needs the current params"):
    opt.update(None, opt.init(PARAMS), None, loss_fn=good_loss)


def test_plain_scalar_closure_says_what_to_write():
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0))
  plain = lambda p: jnp.mean((X @ p["w"] + p["b"] - Y) ** 2)
  with pytest.raises(
    TypeError,
    match=r"must return a sofo_jax.losses.Loss.*sofo_jax.losses.mse\(predictions, targets\)",
  ):
    _update(opt, plain)


def test_tuple_without_has_aux_suggests_has_aux():
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0))
  with pytest.raises(TypeError, match="pass has_aux=True"):
    _update(opt, lambda p: (good_loss(p), 1.0))


def test_has_aux_without_pair():
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0), has_aux=True)
  with pytest.raises(
    TypeError, match=r"has_aux=True the loss closure must return a pair"
  ):
    _update(opt, good_loss)


@pytest.mark.parametrize(
  "loss",
  [
    losses.mse,
    losses.poisson,
    losses.sigmoid_binary_cross_entropy,
    losses.gaussian_nll,
    losses.softmax_cross_entropy,
  ],
)
def test_mismatched_shapes(loss):
  with pytest.raises(ValueError, match=r"shape \(4, 2\).*\(4, 3\)|do not match"):
    loss(jnp.zeros((4, 2)), jnp.zeros((4, 3)))


def test_integer_labels_of_wrong_shape():
  with pytest.raises(ValueError, match=r"integer labels must have shape"):
    losses.softmax_cross_entropy(jnp.zeros((4, 3)), jnp.zeros((4, 3), jnp.int32))


def test_integer_only_params():
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0))
  with pytest.raises(ValueError, match="no floating-point parameters"):
    opt.init({"n": jnp.arange(3)})


def test_complex_params():
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0))
  with pytest.raises(TypeError, match="complex parameters"):
    opt.init({"z": jnp.ones(3, jnp.complex64)})


@pytest.mark.parametrize(
  "key, match",
  [
    (0, "needs a PRNG key"),
    (jnp.ones(3), "needs a PRNG key"),
    (jax.random.split(jax.random.key(0), 2), "expected a single key"),
  ],
)
def test_bad_key(key, match):
  with pytest.raises((TypeError, ValueError), match=match):
    sofo_jax.sofo(1.0, 2, key=key)


def test_bad_tangent_distribution():
  with pytest.raises(ValueError, match="tangent_distribution must be one of"):
    sofo_jax.sofo(1.0, 2, key=jax.random.key(0), tangent_distribution="rademacher")


def test_optax_masked_around_sofo_points_to_mask_argument():
  opt = optax.masked(
    sofo_jax.scale_by_sofo(2, key=jax.random.key(0)), {"w": True, "b": False}
  )
  with pytest.raises(TypeError, match="Pass `mask=`"):
    opt.init(PARAMS)


def test_reverse_mode_through_the_curvature_channel_fails_clearly():
  tangents = sofo_jax.sample_tangents(jax.random.key(0), PARAMS, 3)
  nonlinear = lambda p: losses.mse(jnp.tanh(X @ p["w"] + p["b"]), Y)
  with pytest.raises(TypeError, match="Reverse-mode differentiation"):
    jax.grad(lambda p: sofo_jax.sketch(nonlinear, p, tangents).gauss_newton.sum())(
      PARAMS
    )


def test_loss_built_outside_the_step_is_rejected():
  outside = good_loss(PARAMS)
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0))
  with pytest.raises(ValueError, match="Cannot add losses built inside and outside"):
    _update(opt, lambda p: good_loss(p) + outside)
  with pytest.raises(ValueError, match="no curvature channel"):
    _update(opt, lambda p: outside)


def test_loss_arithmetic_errors():
  a = good_loss(PARAMS)
  with pytest.raises(TypeError, match="can only be added to another Loss"):
    a + jnp.ones(())
  with pytest.raises(TypeError, match="real scalar"):
    a * jnp.ones(3)
  with pytest.raises(TypeError, match="cannot be multiplied"):
    a * a


def test_bad_mask_structure():
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0), mask={"w": True, "c": False})
  with pytest.raises(ValueError, match="mask must be a pytree of Python bools"):
    opt.init(PARAMS)


def test_tangent_shape_mismatch_in_sketch():
  with pytest.raises(ValueError, match="does not match its parameter"):
    sofo_jax.sketch(
      good_loss, PARAMS, {"w": jnp.ones((3, 3, 3)), "b": jnp.ones((3, 2))}
    )
  with pytest.raises(ValueError, match="same leading axis K"):
    sofo_jax.sketch(
      good_loss, PARAMS, {"w": jnp.ones((3, 3, 2)), "b": jnp.ones((2, 2))}
    )


def test_aux_example_without_has_aux():
  with pytest.raises(ValueError, match="aux_example is only meaningful"):
    sofo_jax.sofo(1.0, 2, key=jax.random.key(0), aux_example={"a": jnp.zeros(())})
