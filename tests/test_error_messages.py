"""Error paths not covered in test_errors.py, each with its message checked.

The message must say what is wrong and, where there is one, what to write
instead; these tests pin both.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sofo_jax
from sofo_jax import losses

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
X = jnp.ones((4, 3))
Y = jnp.zeros((4, 2))


def good_loss(p):
  return losses.mse(X @ p["w"] + p["b"], Y)


def update(opt, loss_fn=good_loss, params=PARAMS):
  return opt.update(None, opt.init(params), params, loss_fn=loss_fn)


FACTORIES = {
  "sofo": lambda **kw: sofo_jax.sofo(1.0, 2, key=jax.random.key(0), **kw),
  "forward_gradient": lambda **kw: sofo_jax.forward_gradient(
    1.0, 2, key=jax.random.key(0), **kw
  ),
}
OWNER = {"sofo": "scale_by_sofo", "forward_gradient": "scale_by_forward_gradient"}


# Construction -------------------------------------------------------------------


def test_relative_damping_must_be_a_python_bool():
  with pytest.raises(TypeError, match="relative_damping must be a Python bool"):
    sofo_jax.sofo(1.0, 2, key=jax.random.key(0), relative_damping=jnp.array(True))
  with pytest.raises(TypeError, match="relative_damping must be a Python bool"):
    sofo_jax.sofo(1.0, 2, key=jax.random.key(0), relative_damping=1)


@pytest.mark.parametrize(
  "damping, error, match",
  [
    (-1.0, ValueError, r"damping must be finite and >= 0; got -1.0"),
    (np.inf, ValueError, r"damping must be finite and >= 0; got inf"),
    (jnp.ones(2), TypeError, r"damping must be a real scalar.*shape \(2,\)"),
    ("1e-3", TypeError, r"damping must be a real scalar"),
  ],
)
def test_bad_damping(damping, error, match):
  with pytest.raises(error, match=match):
    sofo_jax.scale_by_sofo(2, damping, key=jax.random.key(0))


def test_raw_key_of_the_wrong_shape_names_dtype_and_shape():
  with pytest.raises(
    TypeError, match=r"scale_by_sofo needs a PRNG key.*dtype uint32 and shape \(2, 2\)"
  ):
    sofo_jax.sofo(1.0, 2, key=jnp.zeros((2, 2), jnp.uint32))
  with pytest.raises(
    TypeError, match=r"needs a PRNG key.*dtype float32 and shape \(2,\)"
  ):
    sofo_jax.sofo(1.0, 2, key=jnp.zeros(2))


def test_forward_gradient_key_errors_name_forward_gradient():
  with pytest.raises(TypeError, match="scale_by_forward_gradient needs a PRNG key"):
    sofo_jax.forward_gradient(1.0, 2, key=3)
  with pytest.raises(
    ValueError, match="scale_by_forward_gradient: expected a single key"
  ):
    sofo_jax.forward_gradient(1.0, 2, key=jax.random.split(jax.random.key(0), 3))


@pytest.mark.parametrize(
  "k, error, match",
  [
    (0, ValueError, "num_tangents must be >= 1; got 0"),
    (1.5, TypeError, r"num_tangents must be a Python int.*got float.*static_args"),
  ],
)
def test_sample_tangents_checks_k_and_distribution(k, error, match):
  with pytest.raises(error, match=match):
    sofo_jax.sample_tangents(jax.random.key(0), PARAMS, k)
  with pytest.raises(
    ValueError,
    match=r"tangent_distribution must be one of .*'orthonormal'.*got 'sobol'",
  ):
    sofo_jax.sample_tangents(jax.random.key(0), PARAMS, 2, "sobol")


# Update-time checks, for both optimizers ------------------------------------------


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_loss_fn_not_callable(name):
  opt = FACTORIES[name]()
  with pytest.raises(
    TypeError, match=rf"{OWNER[name]}: loss_fn must be callable; got float"
  ):
    opt.update(None, opt.init(PARAMS), PARAMS, loss_fn=1.0)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_missing_loss_fn(name):
  opt = FACTORIES[name]()
  with pytest.raises(
    ValueError, match=rf"{OWNER[name]} needs the loss closure.*loss_fn=loss_fn"
  ):
    opt.update(None, opt.init(PARAMS), PARAMS)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_missing_params_at_update(name):
  opt = FACTORIES[name]()
  with pytest.raises(ValueError, match=rf"{OWNER[name]} needs the current params"):
    opt.update(None, opt.init(PARAMS), loss_fn=good_loss)


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize(
  "params",
  [
    {"n": jnp.arange(3)},
    {"flag": jnp.array([True, False])},
    {"n": 3, "f": True},
  ],
  ids=["int", "bool", "python_int_and_bool"],
)
def test_no_floating_params(name, params):
  with pytest.raises(
    ValueError, match=rf"{OWNER[name]} found no floating-point parameters"
  ):
    FACTORIES[name]().init(params)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_mask_excluding_every_float_leaf(name):
  opt = FACTORIES[name](mask={"w": False, "b": False})
  with pytest.raises(
    ValueError, match=r"no floating-point parameters.*outside the mask"
  ):
    opt.init(PARAMS)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_complex_params(name):
  with pytest.raises(
    TypeError,
    match=r"does not train complex parameters; split them into real and imaginary",
  ):
    FACTORIES[name]().init({"z": jnp.ones(2, jnp.complex64), "w": jnp.ones(2)})


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_optax_masked_around_either_optimizer(name):
  opt = optax.masked(FACTORIES[name](), {"w": True, "b": False})
  with pytest.raises(TypeError, match=r"optax.masked.*Pass `mask=`"):
    opt.init(PARAMS)


def test_mask_callable_returning_the_wrong_structure():
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0), mask=lambda p: [True, False])
  with pytest.raises(
    ValueError, match="mask must be a pytree of Python bools with the structure"
  ):
    opt.init(PARAMS)


# The loss closure ---------------------------------------------------------------------


def test_has_aux_with_a_plain_scalar_loss_says_what_to_write():
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0), has_aux=True)
  plain = lambda p: (jnp.sum((X @ p["w"] - Y) ** 2), {"n": 1})
  with pytest.raises(
    TypeError,
    match=r"returned a plain array of shape \(\).*sofo_jax.losses.mse\(predictions, targets\)",
  ):
    update(opt, plain)


def test_plain_python_float_says_plain_array():
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0))
  with pytest.raises(TypeError, match=r"returned a plain array of shape \(\)"):
    update(opt, lambda p: 0.0)


def test_closure_returning_a_dict_names_the_type():
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0))
  with pytest.raises(
    TypeError, match=r"must return a sofo_jax.losses.Loss.*it returned dict"
  ):
    update(opt, lambda p: {"loss": good_loss(p)})


def test_has_aux_with_a_triple():
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0), has_aux=True)
  with pytest.raises(TypeError, match=r"must return a pair \(loss, aux\); got tuple"):
    update(opt, lambda p: (good_loss(p), 1, 2))


def test_loss_with_a_non_scalar_value():
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"The loss value must be a scalar; got \(2,\)"):
    update(opt, lambda p: losses.Loss(jnp.ones(2), jnp.zeros(2)))


def test_sketch_tangents_with_another_structure():
  with pytest.raises(
    ValueError, match="tangents must have the structure of the parameters"
  ):
    sofo_jax.sketch(good_loss, PARAMS, {"w": jnp.ones((2, 3, 2))})


def test_sketch_has_aux_mismatch():
  tangents = sofo_jax.sample_tangents(jax.random.key(0), PARAMS, 2)
  with pytest.raises(TypeError, match="pass has_aux=True"):
    sofo_jax.sketch(lambda p: (good_loss(p), 0.0), PARAMS, tangents)
  with pytest.raises(
    TypeError, match="has_aux=True the loss closure must return a pair"
  ):
    sofo_jax.sketch(good_loss, PARAMS, tangents, has_aux=True)


def test_reverse_mode_through_the_sofo_update():
  """jax.grad of a function of the SOFO *update* (e.g. meta-learning)."""
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0))
  state = opt.init(PARAMS)
  nonlinear = lambda p: losses.mse(jnp.tanh(X @ p["w"] + p["b"]), Y)
  through_update = lambda p: jnp.sum(
    opt.update(None, state, p, loss_fn=nonlinear)[0]["w"]
  )
  with pytest.raises(
    TypeError,
    match=r"Reverse-mode differentiation.*not supported.*jax.grad\(lambda p: loss_fn\(p\).value\)",
  ):
    jax.jit(jax.grad(through_update))(PARAMS)


def test_a_loss_kept_from_a_previous_step_is_rejected():
  """A Loss built in one SOFO step and reused in the next (e.g. kept in a
  closure variable as a running total) carries the old tangents' channel."""
  opt = sofo_jax.sofo(1.0, 3, key=jax.random.key(0))
  kept = []

  def leaky(p):
    loss = good_loss(p)
    if kept:
      return kept[0]
    kept.append(loss)
    return loss

  update = lambda s: opt.update(None, s, PARAMS, loss_fn=leaky)
  # JAX's own check catches it: never a silent reuse of stale curvature. With
  # step control the closure is called twice per trace (the sketch, then the
  # trial points), so the first trace already reuses the kept loss.
  with pytest.raises(jax.errors.UnexpectedTracerError, match="escape the scope"):
    _, state = jax.jit(update)(opt.init(PARAMS))
    jax.jit(lambda s: update(s))(state)  # a new trace calls the closure again


# Losses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "loss, args, match",
  [
    (
      losses.mse,
      (jnp.ones((2, 2), jnp.int32), jnp.ones((2, 2))),
      "mse outputs must be a floating-point array; got int32",
    ),
    (
      losses.poisson,
      (jnp.ones(2, jnp.int32), jnp.ones(2)),
      "poisson log_rates must be a floating-point array",
    ),
    (
      losses.gaussian_nll,
      (jnp.ones(2, jnp.int32), jnp.ones(2)),
      "gaussian_nll outputs must be a floating-point array",
    ),
    (
      losses.sigmoid_binary_cross_entropy,
      (jnp.ones(2, jnp.int32), jnp.ones(2)),
      "sigmoid_binary_cross_entropy logits must be a floating-point",
    ),
    (
      losses.softmax_cross_entropy,
      (jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3))),
      "softmax_cross_entropy logits must be a floating-point",
    ),
    (
      losses.custom,
      ({"y": jnp.ones(2, jnp.int32)}, jnp.sum),
      "losses.custom outputs must be a floating-point array",
    ),
  ],
)
def test_integer_outputs(loss, args, match):
  with pytest.raises(TypeError, match=match):
    loss(*args)


def test_softmax_needs_a_class_axis():
  with pytest.raises(
    ValueError, match="softmax_cross_entropy needs logits with a class axis"
  ):
    losses.softmax_cross_entropy(jnp.zeros(()), jnp.zeros((), jnp.int32))


def test_gaussian_variance_must_broadcast():
  with pytest.raises(
    ValueError,
    match=r"variance of shape \(3,\) does not broadcast to outputs of shape \(4, 2\)",
  ):
    losses.gaussian_nll(jnp.zeros((4, 2)), jnp.zeros((4, 2)), jnp.ones(3))


@pytest.mark.parametrize(
  "loss, outputs, targets",
  [
    (losses.mse, jnp.zeros((4, 2)), jnp.zeros((4, 3))),
    (losses.gaussian_nll, jnp.zeros((4, 2)), jnp.zeros((2, 4))),
    (losses.poisson, jnp.zeros((4, 2)), jnp.zeros((4,))),
    (losses.sigmoid_binary_cross_entropy, jnp.zeros((4, 2)), jnp.zeros((4, 2, 1))),
    (losses.softmax_cross_entropy, jnp.zeros((4, 2)), jnp.zeros((4, 3))),
  ],
)
def test_mismatched_shapes_name_the_loss_and_both_shapes(loss, outputs, targets):
  name = loss.__name__
  message = (
    f"{name}: outputs of shape {outputs.shape} and targets of shape "
    f"{targets.shape} do not match"
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    loss(outputs, targets)


def test_custom_fn_returning_a_vector():
  with pytest.raises(
    ValueError, match=r"losses.custom: fn must return a scalar; got shape \(2,\)"
  ):
    losses.custom(jnp.ones(2), lambda y: y * 2)


def test_loss_divided_by_a_loss():
  a = good_loss(PARAMS)
  with pytest.raises(TypeError, match="Two Loss objects cannot be multiplied"):
    a / a


def test_loss_scaled_by_a_vector():
  with pytest.raises(TypeError, match=r"can only be scaled by a real scalar"):
    good_loss(PARAMS) * jnp.array([1, 2])


# Reading state -----------------------------------------------------------------------------


def test_get_state_on_another_optimizer():
  with pytest.raises(ValueError, match="No sofo_jax optimizer state was found"):
    sofo_jax.get_state(optax.adam(1e-3).init(PARAMS))
  with pytest.raises(ValueError, match="No sofo_jax optimizer state was found"):
    sofo_jax.get_diagnostics(optax.adam(1e-3).init(PARAMS))
