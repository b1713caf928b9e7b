"""Bad input gets a clear error at construction or trace time.

The message must say what is wrong and, where there is one, what to write
instead; these tests pin both, once for every public entry point that checks.
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


@pytest.mark.parametrize(
  "build",
  [
    lambda k: sofo_jax.sofo(1.0, k, key=jax.random.key(0)),
    lambda k: sofo_jax.forward_gradient(1.0, k, key=jax.random.key(0)),
    lambda k: sofo_jax.sample_tangents(jax.random.key(0), PARAMS, k),
  ],
  ids=["sofo", "forward_gradient", "sample_tangents"],
)
@pytest.mark.parametrize(
  "k, error, match",
  [
    (0, ValueError, "num_tangents must be >= 1; got 0"),
    (-3, ValueError, "num_tangents must be >= 1; got -3"),
    (2.0, TypeError, r"num_tangents must be a Python int.*got float.*static_args"),
    (1.5, TypeError, r"num_tangents must be a Python int.*got float"),
    (True, TypeError, r"num_tangents must be a Python int.*got bool"),
  ],
)
def test_bad_num_tangents(build, k, error, match):
  with pytest.raises(error, match=match):
    build(k)


@pytest.mark.parametrize(
  "build",
  [
    lambda d: sofo_jax.sofo(1.0, 2, key=jax.random.key(0), tangent_distribution=d),
    lambda d: sofo_jax.sample_tangents(jax.random.key(0), PARAMS, 2, d),
  ],
  ids=["sofo", "sample_tangents"],
)
def test_bad_tangent_distribution(build):
  with pytest.raises(
    ValueError,
    match=r"tangent_distribution must be one of .*'orthonormal'.*got 'sobol'",
  ):
    build("sobol")


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


@pytest.mark.parametrize("name", sorted(OWNER))
@pytest.mark.parametrize(
  "key, error, match",
  [
    (0, TypeError, r" needs a PRNG key, e\.g\. key=jax\.random\.key\(0\); got int"),
    (jnp.ones(3), TypeError, r" needs a PRNG key.*dtype float32 and shape \(3,\)"),
    (jnp.zeros(2), TypeError, r" needs a PRNG key.*dtype float32 and shape \(2,\)"),
    (
      jnp.zeros((2, 2), jnp.uint32),
      TypeError,
      r" needs a PRNG key.*dtype uint32 and shape \(2, 2\)",
    ),
    (
      jax.random.split(jax.random.key(0), 3),
      ValueError,
      r": expected a single key; got shape \(3,\)",
    ),
  ],
  ids=["python_int", "float_vector", "float_of_key_shape", "uint32_matrix", "batch"],
)
def test_bad_key_names_the_optimizer(name, key, error, match):
  # The raw-key messages name dtype and shape; all name the transform.
  with pytest.raises(error, match=re.escape(OWNER[name]) + match):
    getattr(sofo_jax, name)(1.0, 2, key=key)


def test_aux_example_without_has_aux():
  with pytest.raises(ValueError, match="aux_example is only meaningful"):
    sofo_jax.sofo(1.0, 2, key=jax.random.key(0), aux_example={"a": jnp.zeros(())})


# Update-time checks, for both optimizers ------------------------------------------


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_loss_fn_not_callable(name):
  opt = FACTORIES[name]()
  with pytest.raises(
    TypeError, match=rf"{OWNER[name]}: loss_fn must be callable; got float"
  ):
    opt.update(None, opt.init(PARAMS), PARAMS, loss_fn=1.0)


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize(
  "extra, ending",
  [
    ({}, r"\.$"),
    # A misspelt keyword is named, so the typo is easy to find.
    (
      {"loss_function": good_loss},
      r" \(received extra arguments \['loss_function'\]\)\.$",
    ),
  ],
  ids=["no_extra_args", "misspelt_keyword"],
)
def test_missing_loss_fn_names_the_call_and_the_extra_args(name, extra, ending):
  opt = FACTORIES[name]()
  call = r"opt\.update\(grads_or_None, state, params, loss_fn=loss_fn\)"
  with pytest.raises(
    ValueError, match=rf"{OWNER[name]} needs the loss closure: call {call}{ending}"
  ):
    opt.update(None, opt.init(PARAMS), PARAMS, **extra)


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


@pytest.mark.parametrize(
  "mask",
  [{"w": True, "c": False}, lambda p: [True, False]],
  ids=["wrong_keys", "callable_returning_a_list"],
)
def test_mask_of_the_wrong_structure(mask):
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0), mask=mask)
  with pytest.raises(
    ValueError, match="mask must be a pytree of Python bools with the structure"
  ):
    opt.init(PARAMS)


# The loss closure ---------------------------------------------------------------------

_WRITE_A_LOSS = r"sofo_jax.losses.mse\(predictions, targets\)"


@pytest.mark.filterwarnings("ignore:.*built without aux_example:UserWarning")
@pytest.mark.parametrize(
  "closure, has_aux, match",
  [
    (
      lambda p: jnp.mean((X @ p["w"] + p["b"] - Y) ** 2),
      False,
      r"must return a sofo_jax.losses.Loss.*plain array of shape \(\).*"
      + _WRITE_A_LOSS,
    ),
    (lambda p: 0.0, False, r"returned a plain array of shape \(\).*" + _WRITE_A_LOSS),
    (
      lambda p: (jnp.sum((X @ p["w"] - Y) ** 2), {"n": 1}),
      True,
      r"returned a plain array of shape \(\).*" + _WRITE_A_LOSS,
    ),
    (
      lambda p: {"loss": good_loss(p)},
      False,
      r"must return a sofo_jax.losses.Loss.*it returned dict",
    ),
  ],
  ids=["jax_scalar", "python_float", "scalar_with_aux", "dict"],
)
def test_closure_not_returning_a_loss_says_what_to_write(closure, has_aux, match):
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0), has_aux=has_aux)
  with pytest.raises(TypeError, match=match):
    update(opt, closure)


def _update_or_sketch(entry, loss_fn, has_aux):
  if entry == "update":
    return update(
      sofo_jax.sofo(1.0, 2, key=jax.random.key(0), has_aux=has_aux), loss_fn
    )
  tangents = sofo_jax.sample_tangents(jax.random.key(0), PARAMS, 2)
  return sofo_jax.sketch(loss_fn, PARAMS, tangents, has_aux=has_aux)


@pytest.mark.filterwarnings("ignore:.*built without aux_example:UserWarning")
@pytest.mark.parametrize("entry", ["update", "sketch"])
@pytest.mark.parametrize(
  "closure, has_aux, match",
  [
    (
      lambda p: (good_loss(p), 1.0),
      False,
      r"it returned tuple\..*If it returns \(loss, aux\), pass has_aux=True",
    ),
    (
      good_loss,
      True,
      r"has_aux=True the loss closure must return a pair \(loss, aux\); got Loss",
    ),
    (
      lambda p: (good_loss(p), 1, 2),
      True,
      r"must return a pair \(loss, aux\); got tuple",
    ),
  ],
  ids=["pair_without_has_aux", "loss_with_has_aux", "triple_with_has_aux"],
)
def test_has_aux_mismatch(entry, closure, has_aux, match):
  with pytest.raises(TypeError, match=match):
    _update_or_sketch(entry, closure, has_aux)


def test_loss_with_a_non_scalar_value():
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"The loss value must be a scalar; got \(2,\)"):
    update(opt, lambda p: losses.Loss(jnp.ones(2), jnp.zeros(2)))


@pytest.mark.parametrize(
  "tangents, match",
  [
    ({"w": jnp.ones((3, 3, 3)), "b": jnp.ones((3, 2))}, "does not match its parameter"),
    ({"w": jnp.ones((3, 3, 2)), "b": jnp.ones((2, 2))}, "same leading axis K"),
    ({"w": jnp.ones((2, 3, 2))}, "tangents must have the structure of the parameters"),
  ],
  ids=["leaf_shape", "leading_axis", "structure"],
)
def test_sketch_with_bad_tangents(tangents, match):
  with pytest.raises(ValueError, match=match):
    sofo_jax.sketch(good_loss, PARAMS, tangents)


def _nonlinear(p):
  return losses.mse(jnp.tanh(X @ p["w"] + p["b"]), Y)


def _grad_through_sketch(params):
  tangents = sofo_jax.sample_tangents(jax.random.key(0), PARAMS, 3)
  return jax.grad(
    lambda p: sofo_jax.sketch(_nonlinear, p, tangents).gauss_newton.sum()
  )(params)


def _grad_through_update(params):
  # e.g. meta-learning: jax.grad of a function of the SOFO *update*.
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0))
  state = opt.init(PARAMS)
  through_update = lambda p: jnp.sum(
    opt.update(None, state, p, loss_fn=_nonlinear)[0]["w"]
  )
  return jax.jit(jax.grad(through_update))(params)


@pytest.mark.parametrize(
  "grad", [_grad_through_sketch, _grad_through_update], ids=["sketch", "update"]
)
def test_reverse_mode_through_the_curvature_channel_fails_clearly(grad):
  with pytest.raises(
    TypeError,
    match=r"Reverse-mode differentiation.*not supported.*jax.grad\(lambda p: loss_fn\(p\).value\)",
  ):
    grad(PARAMS)


def test_loss_built_outside_the_step_is_rejected():
  outside = good_loss(PARAMS)
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0))
  with pytest.raises(ValueError, match="Cannot add losses built inside and outside"):
    update(opt, lambda p: good_loss(p) + outside)
  with pytest.raises(ValueError, match="no curvature channel"):
    update(opt, lambda p: outside)


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

  step = lambda s: opt.update(None, s, PARAMS, loss_fn=leaky)
  # JAX's own check catches it: never a silent reuse of stale curvature. With
  # step control the closure is called twice per trace (the sketch, then the
  # trial points), so the first trace already reuses the kept loss.
  with pytest.raises(jax.errors.UnexpectedTracerError, match="escape the scope"):
    _, state = jax.jit(step)(opt.init(PARAMS))
    jax.jit(lambda s: step(s))(state)  # a new trace calls the closure again


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


def test_integer_labels_of_wrong_shape():
  with pytest.raises(ValueError, match=r"integer labels must have shape"):
    losses.softmax_cross_entropy(jnp.zeros((4, 3)), jnp.zeros((4, 3), jnp.int32))


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


@pytest.mark.parametrize(
  "operation, match",
  [
    (lambda a: a + jnp.ones(()), "can only be added to another Loss"),
    (lambda a: a * jnp.ones(3), r"can only be scaled by a real scalar.*shape \(3,\)"),
    (lambda a: a * a, "Two Loss objects cannot be multiplied"),
    (lambda a: a / a, "Two Loss objects cannot be multiplied"),
  ],
  ids=["add_an_array", "scale_by_a_vector", "multiply_losses", "divide_losses"],
)
def test_loss_arithmetic_errors(operation, match):
  with pytest.raises(TypeError, match=match):
    operation(good_loss(PARAMS))


# Reading state -----------------------------------------------------------------------------


def test_get_state_on_another_optimizer():
  with pytest.raises(ValueError, match="No sofo_jax optimizer state was found"):
    sofo_jax.get_state(optax.adam(1e-3).init(PARAMS))
  with pytest.raises(ValueError, match="No sofo_jax optimizer state was found"):
    sofo_jax.get_diagnostics(optax.adam(1e-3).init(PARAMS))


def test_get_state_with_two_sofo_states_is_ambiguous():
  state = sofo_jax.sofo(1.0, 2, key=jax.random.key(0)).init(PARAMS)
  with pytest.raises(ValueError, match="holds 2 sofo_jax optimizer states"):
    sofo_jax.get_state({"encoder": state, "decoder": state})
