"""Curvature-aware losses: values that also know their Gauss–Newton blocks.

Every loss here is a convex function :math:`\\ell(y)` of network outputs ``y``.
It returns a :class:`Loss`, which carries the value and (inside a SOFO step)
the rows of the sketched Gauss–Newton block :math:`(J\\Theta)^\\top H
(J\\Theta)`, with :math:`H = \\nabla^2_y \\ell`. Loss objects add and scale, so
per-step losses are summed over time inside the user's own ``lax.scan``.

Reduction convention, shared by every built-in loss unless stated otherwise:
the **last axis holds features and is summed; every leading axis is a batch
axis and is averaged**. A 0-d or 1-d output has a batch of one. No factor 1/2
is applied unless the loss says so. Outside a SOFO step the losses are plain
JAX functions, so one closure serves training, evaluation and logging.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Union

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from sofo_jax._src import channel


class Loss(eqx.Module):
  """A scalar loss value plus its curvature channel.

  Attributes:
    value: the scalar loss.
    curvature: inside a SOFO sketch a K-vector whose tangent carries rows of
      the sketched Gauss–Newton matrix; elsewhere an empty array. Users never
      need to read it.

  Loss objects support ``a + b``, ``sum([...])`` (which starts from ``0``),
  ``c * a``, ``a * c`` and ``a / c`` for scalars ``c`` (Python numbers or 0-d
  arrays, traced ones included, e.g. a time mask). ``c`` must not depend on
  the parameters and must be non-negative for the Gauss–Newton matrix to stay
  positive semi-definite.

  Example:
    >>> import jax.numpy as jnp, sofo_jax
    >>> a = sofo_jax.losses.mse(jnp.ones((4, 2)), jnp.zeros((4, 2)))
    >>> float((0.5 * a + a).value)
    3.0
  """

  value: Float[Array, ""]
  curvature: Float[Array, " k"]

  def __add__(self, other: Union["Loss", int, float]) -> "Loss":
    if isinstance(other, (int, float)) and not isinstance(other, bool):
      if other == 0:  # lets the built-in sum() start from 0
        return self
    if not isinstance(other, Loss):
      raise TypeError(
          "A sofo_jax Loss can only be added to another Loss (or to 0). Got "
          f"{type(other).__name__}. To add a term whose curvature SOFO should "
          "see, wrap it: sofo_jax.losses.custom(outputs, fn)."
      )
    if self.curvature.shape != other.curvature.shape:
      raise ValueError(
          "Cannot add losses built inside and outside a SOFO step (curvature "
          f"channels of shapes {self.curvature.shape} and "
          f"{other.curvature.shape}). Build every loss inside the loss "
          "closure, and start sums from sofo_jax.losses.zero() created there."
      )
    return Loss(self.value + other.value, self.curvature + other.curvature)

  __radd__ = __add__

  def __mul__(self, scale: ArrayLike) -> "Loss":
    scale = _check_scale(scale)
    return Loss(scale * self.value, scale * self.curvature)

  __rmul__ = __mul__

  def __truediv__(self, scale: ArrayLike) -> "Loss":
    return self * (1.0 / _check_scale(scale))


def _check_scale(scale) -> Array:
  if isinstance(scale, Loss):
    raise TypeError("Two Loss objects cannot be multiplied; add them instead.")
  scale = jnp.asarray(scale)
  if scale.shape != () or not jnp.issubdtype(scale.dtype, jnp.number):
    raise TypeError(
        "A Loss can only be scaled by a real scalar; got an array of shape "
        f"{scale.shape} and dtype {scale.dtype}."
    )
  return scale


def zero(dtype=None) -> Loss:
  """The neutral loss, a starting value for a ``lax.scan`` carry.

  Create it inside the loss closure: inside a SOFO step its curvature channel
  has the size of the step's tangent count.

  Args:
    dtype: dtype of the value; the default float dtype if ``None``.

  Returns:
    A :class:`Loss` with value 0 and a zero curvature channel.

  Example:
    >>> import jax, jax.numpy as jnp, sofo_jax
    >>> def loss_fn(ys, targets):
    ...   def step(total, yt):
    ...     return total + sofo_jax.losses.mse(*yt), None
    ...   total, _ = jax.lax.scan(step, sofo_jax.losses.zero(), (ys, targets))
    ...   return total / ys.shape[0]      # mean over time
    >>> float(loss_fn(jnp.ones((5, 3, 1)), jnp.zeros((5, 3, 1))).value)
    1.0
  """
  dtype = jnp.zeros(()).dtype if dtype is None else dtype
  k = channel.num_tangents_in_scope()
  return Loss(jnp.zeros((), dtype), jnp.zeros((k or 0,), dtype))


def _make(spec: channel.CurvatureSpec, outputs, data) -> Loss:
  value, curvature = channel.evaluate(spec, outputs, data)
  return Loss(value, curvature)


def _floating(name: str, x) -> Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array; got {x.dtype}.")
  return x


def _check_same_shape(loss: str, outputs: Array, targets: Array) -> None:
  if outputs.shape != targets.shape:
    raise ValueError(
        f"{loss}: outputs of shape {outputs.shape} and targets of shape "
        f"{targets.shape} do not match."
    )


def _batch_count(x: Array) -> int:
  return math.prod(x.shape[:-1]) if x.ndim > 1 else 1


def _mean_of_feature_sums(elementwise: Array) -> Array:
  return jnp.sum(elementwise) / _batch_count(elementwise)


# Squared error ---------------------------------------------------------------


def _mse_value(outputs, targets):
  return _mean_of_feature_sums(jnp.square(outputs - targets))


def _mse_hvp(outputs, targets, vector):
  return 2.0 * vector / _batch_count(outputs)


_MSE = channel.from_functions(_mse_value, _mse_hvp)


def mse(outputs: ArrayLike, targets: ArrayLike) -> Loss:
  """Squared error, summed over features and averaged over the batch.

  .. math::

      \\ell(y) = \\frac{1}{B} \\sum_{b} \\sum_{f} (y_{bf} - t_{bf})^2,
      \\qquad H = \\frac{2}{B} I.

  No factor 1/2: with a single output feature this is the mean squared error.

  Args:
    outputs: predictions ``y``, shape ``(..., features)``.
    targets: targets ``t`` of the same shape.

  Returns:
    A :class:`Loss`.

  Example:
    >>> import jax.numpy as jnp, sofo_jax
    >>> float(sofo_jax.losses.mse(jnp.ones((2, 3)), jnp.zeros((2, 3))).value)
    3.0
  """
  outputs = _floating("mse outputs", outputs)
  targets = jnp.asarray(targets, outputs.dtype)
  _check_same_shape("mse", outputs, targets)
  return _make(_MSE, outputs, targets)


# Gaussian negative log-likelihood ---------------------------------------------


def _gaussian_value(outputs, data):
  targets, variance = data
  elementwise = jnp.square(outputs - targets) / (2.0 * variance)
  elementwise = elementwise + 0.5 * jnp.log(2.0 * jnp.pi * variance)
  return _mean_of_feature_sums(elementwise)


def _gaussian_hvp(outputs, data, vector):
  _, variance = data
  return vector / (variance * _batch_count(outputs))


_GAUSSIAN = channel.from_functions(_gaussian_value, _gaussian_hvp)


def gaussian_nll(
    outputs: ArrayLike, targets: ArrayLike, variance: ArrayLike = 1.0
) -> Loss:
  """Gaussian negative log-likelihood with a fixed variance.

  .. math::

      \\ell(y) = \\frac{1}{B}\\sum_b \\sum_f \\Big[\\frac{(y_{bf} - t_{bf})^2}
      {2\\sigma^2} + \\tfrac12 \\log(2\\pi\\sigma^2)\\Big],
      \\qquad H = \\frac{1}{B\\sigma^2} I.

  Args:
    outputs: predicted means, shape ``(..., features)``.
    targets: observations of the same shape.
    variance: the fixed variance :math:`\\sigma^2`, a positive scalar or an
      array broadcastable to ``outputs`` (not trained).

  Returns:
    A :class:`Loss`.

  Example:
    >>> import jax.numpy as jnp, sofo_jax
    >>> loss = sofo_jax.losses.gaussian_nll(jnp.zeros(3), jnp.zeros(3), 0.5)
    >>> bool(jnp.isclose(loss.value, 1.5 * jnp.log(jnp.pi)))
    True
  """
  outputs = _floating("gaussian_nll outputs", outputs)
  targets = jnp.asarray(targets, outputs.dtype)
  _check_same_shape("gaussian_nll", outputs, targets)
  variance = jnp.asarray(variance, outputs.dtype)
  try:
    jnp.broadcast_shapes(variance.shape, outputs.shape)
  except ValueError:
    raise ValueError(
        f"gaussian_nll: variance of shape {variance.shape} does not "
        f"broadcast to outputs of shape {outputs.shape}."
    ) from None
  return _make(_GAUSSIAN, outputs, (targets, variance))


# Softmax cross-entropy ---------------------------------------------------------


def _softmax_ce_value(logits, targets):
  return _mean_of_feature_sums(-targets * jax.nn.log_softmax(logits))


def _softmax_ce_hvp(logits, targets, vector):
  # Hessian of -t.log_softmax(z) is (sum t) (diag p - p p^T), per example.
  p = jax.nn.softmax(logits)
  mass = jnp.sum(targets, axis=-1, keepdims=True)
  pv = jnp.sum(p * vector, axis=-1, keepdims=True)
  return mass * (p * vector - p * pv) / _batch_count(logits)


_SOFTMAX_CE = channel.from_functions(_softmax_ce_value, _softmax_ce_hvp)


def softmax_cross_entropy(logits: ArrayLike, labels: ArrayLike) -> Loss:
  """Softmax cross-entropy, averaged over the batch.

  .. math::

      \\ell(z) = -\\frac{1}{B}\\sum_b \\sum_c t_{bc} \\log
      \\operatorname{softmax}(z_b)_c,
      \\qquad H_b = \\frac{\\sum_c t_{bc}}{B}
      \\big(\\operatorname{diag}(p_b) - p_b p_b^\\top\\big).

  Args:
    logits: unnormalised log-probabilities, shape ``(..., classes)``.
    labels: either integer class indices of shape ``logits.shape[:-1]``, or
      one-hot / probability targets of the same shape as ``logits``.

  Returns:
    A :class:`Loss`.

  Example:
    >>> import jax.numpy as jnp, sofo_jax
    >>> logits = jnp.zeros((4, 10))
    >>> loss = sofo_jax.losses.softmax_cross_entropy(logits, jnp.arange(4))
    >>> bool(jnp.isclose(loss.value, jnp.log(10.0)))
    True
  """
  logits = _floating("softmax_cross_entropy logits", logits)
  labels = jnp.asarray(labels)
  if logits.ndim == 0:
    raise ValueError("softmax_cross_entropy needs logits with a class axis.")
  if jnp.issubdtype(labels.dtype, jnp.integer):
    if labels.shape != logits.shape[:-1]:
      raise ValueError(
          "softmax_cross_entropy: integer labels must have shape "
          f"logits.shape[:-1] = {logits.shape[:-1]}; got {labels.shape}."
      )
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  else:
    _check_same_shape("softmax_cross_entropy", logits, labels)
    targets = labels.astype(logits.dtype)
  return _make(_SOFTMAX_CE, logits, targets)


# Sigmoid binary cross-entropy ----------------------------------------------------


def _sigmoid_bce_value(logits, targets):
  return _mean_of_feature_sums(jax.nn.softplus(logits) - targets * logits)


def _sigmoid_bce_hvp(logits, targets, vector):
  del targets
  p = jax.nn.sigmoid(logits)
  return p * (1.0 - p) * vector / _batch_count(logits)


_SIGMOID_BCE = channel.from_functions(_sigmoid_bce_value, _sigmoid_bce_hvp)


def sigmoid_binary_cross_entropy(logits: ArrayLike, labels: ArrayLike) -> Loss:
  """Binary cross-entropy on logits, summed over features, batch-averaged.

  .. math::

      \\ell(z) = \\frac{1}{B}\\sum_b\\sum_f \\big[\\log(1 + e^{z_{bf}})
      - t_{bf} z_{bf}\\big],
      \\qquad H = \\frac{1}{B}\\operatorname{diag}\\big(\\sigma(z)(1-\\sigma(z))\\big).

  Args:
    logits: shape ``(..., features)``.
    labels: targets in ``[0, 1]`` of the same shape.

  Returns:
    A :class:`Loss`.

  Example:
    >>> import jax.numpy as jnp, sofo_jax
    >>> loss = sofo_jax.losses.sigmoid_binary_cross_entropy(
    ...     jnp.zeros(2), jnp.ones(2))
    >>> bool(jnp.isclose(loss.value, 2 * jnp.log(2.0)))
    True
  """
  logits = _floating("sigmoid_binary_cross_entropy logits", logits)
  labels = jnp.asarray(labels, logits.dtype)
  _check_same_shape("sigmoid_binary_cross_entropy", logits, labels)
  return _make(_SIGMOID_BCE, logits, labels)


# Poisson ---------------------------------------------------------------------------


def _poisson_value(log_rates, counts):
  return _mean_of_feature_sums(jnp.exp(log_rates) - counts * log_rates)


def _poisson_hvp(log_rates, counts, vector):
  del counts
  return jnp.exp(log_rates) * vector / _batch_count(log_rates)


_POISSON = channel.from_functions(_poisson_value, _poisson_hvp)


def poisson(log_rates: ArrayLike, counts: ArrayLike) -> Loss:
  """Poisson negative log-likelihood with a log link (spike counts).

  .. math::

      \\ell(\\eta) = \\frac{1}{B}\\sum_b\\sum_f \\big[e^{\\eta_{bf}}
      - k_{bf}\\,\\eta_{bf}\\big],
      \\qquad H = \\frac{1}{B}\\operatorname{diag}(e^{\\eta}).

  The term :math:`\\log k!` is omitted: it does not depend on the parameters.

  Args:
    log_rates: predicted log firing rates :math:`\\eta` (per bin), shape
      ``(..., neurons)``.
    counts: observed spike counts :math:`k` of the same shape (integer or
      float).

  Returns:
    A :class:`Loss`.

  Example:
    >>> import jax.numpy as jnp, sofo_jax
    >>> loss = sofo_jax.losses.poisson(jnp.zeros((2, 3)), jnp.ones((2, 3)))
    >>> float(loss.value)
    3.0
  """
  log_rates = _floating("poisson log_rates", log_rates)
  counts = jnp.asarray(counts)
  _check_same_shape("poisson", log_rates, counts)
  return _make(_POISSON, log_rates, counts.astype(log_rates.dtype))


# Any convex function ------------------------------------------------------------------


class _CustomSpec:
  """Curvature by autodiff in output space only (a Hessian-vector product).

  ``fn`` is closure-converted: values it closes over (targets, often traced
  inside a scan) travel as explicit data, never as hidden constants.
  """

  def __init__(self, converted_fn: Callable[..., ArrayLike]):
    self._fn = converted_fn

  def value(self, outputs, consts):
    value = jnp.asarray(self._fn(outputs, *consts))
    if value.shape != ():
      raise ValueError(
          f"losses.custom: fn must return a scalar; got shape {value.shape}."
      )
    return value

  def hessian_vector_product(self, outputs, consts, vector):
    gradient = jax.grad(lambda y: self.value(y, consts))
    return jax.jvp(gradient, (outputs,), (vector,))[1]


def custom(outputs: Any, fn: Callable[[Any], ArrayLike]) -> Loss:
  """Wraps any convex scalar function of the outputs as a curvature-aware loss.

  The output-space curvature is obtained by forward-over-reverse autodiff of
  ``fn`` in output space only (one Hessian-vector product per tangent), so the
  network itself is never differentiated in reverse mode.

  .. math::

      \\ell(y) = f(y), \\qquad H v = \\nabla^2 f(y)\\, v.

  ``fn`` must be convex in ``y`` (so that the Gauss–Newton matrix is positive
  semi-definite) and must not close over anything that depends on the
  parameters. Its reduction is whatever ``fn`` does.

  Args:
    outputs: a pytree of floating arrays (network outputs, or even parameters
      for a regulariser).
    fn: a function of ``outputs`` returning a scalar, e.g. an optax loss
      followed by a mean.

  Returns:
    A :class:`Loss`.

  Example:
    >>> import jax.numpy as jnp, optax, sofo_jax
    >>> y, t = jnp.ones((4, 1)), jnp.zeros((4, 1))
    >>> loss = sofo_jax.losses.custom(
    ...     y, lambda y: jnp.mean(optax.huber_loss(y, t)))
    >>> float(loss.value)
    0.5
  """
  for leaf in jax.tree.leaves(outputs):
    _floating("losses.custom outputs", leaf)
  converted, consts = jax.closure_convert(fn, outputs)
  return _make(_CustomSpec(converted), outputs, tuple(consts))
