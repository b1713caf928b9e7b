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

Weights and masks: every built-in loss takes ``weights=``, non-negative data
(never a function of the parameters) broadcastable to the batch shape
``outputs.shape[:-1]``; bool masks and integers are cast. Example ``b``'s
feature sum is multiplied by :math:`w_b`, and the result is still divided by
the number of batch elements :math:`B`, **not** by :math:`\\sum_b w_b`:

.. math::

    \\ell_w(y) = \\frac{1}{B} \\sum_b w_b \\sum_f e_{bf}(y_b), \\qquad
    H_b \\mapsto w_b H_b,

so the Gauss–Newton matrix is weighted exactly like the value, and a 0/1
mask scales the loss by the kept fraction. Dividing by :math:`B` keeps the
loss linear in the weights: per-step losses summed in a ``lax.scan`` then
count every kept (trial, time step) pair equally, whereas dividing each step
by its own :math:`\\sum w` would let a late step at which a few trials are
still running weigh as much as an early step with all of them; an all-zero
mask gives exactly zero rather than 0/0; and equal data-parallel shards
average to the global loss. For the mean over kept entries instead, rescale
the time-averaged total by ``mask.size / mask.sum()`` (a data-only scalar).
With relative damping the SOFO step ignores a constant rescaling of the loss,
so the choice only changes how steps and trials weigh against each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
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
  ``c * a``, ``a * c`` and ``a / c`` for real scalars ``c`` (Python numbers
  or 0-d arrays, traced ones included; a bool such as ``t >= t0`` is a time
  mask, cast to 0 or 1). ``c`` must not depend on the parameters and must be
  non-negative for the Gauss–Newton matrix to stay positive semi-definite.
  To weight batch elements, pass ``weights=`` to the loss instead.

  ``float(loss)`` gives the value outside ``jit``, for logging. To
  differentiate a closure returning a Loss, differentiate its value:
  ``jax.grad(lambda p: loss_fn(p).value)``.

  Example:
    >>> import jax.numpy as jnp, sofo_jax
    >>> a = sofo_jax.losses.mse(jnp.ones((4, 2)), jnp.zeros((4, 2)))
    >>> float(0.5 * a + a)
    3.0
    >>> float((jnp.arange(3) >= 1)[0] * a)   # masked out
    0.0
  """

  value: Float[Array, ""]
  curvature: Float[Array, " k"]

  def __add__(self, other: Loss | int | float) -> Loss:
    # 0 lets the built-in sum() start from 0.
    if isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0:
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

  def __mul__(self, scale: ArrayLike) -> Loss:
    scale = _check_scale(scale, self.value.dtype)
    return Loss(scale * self.value, scale * self.curvature)

  __rmul__ = __mul__

  def __truediv__(self, scale: ArrayLike) -> Loss:
    return self * (1.0 / _check_scale(scale, self.value.dtype))

  def __str__(self) -> str:
    # jax.grad formats a non-scalar output with str() into its error
    # ("Output was ..."), the one place a user who differentiated a
    # Loss-returning closure looks; so str(), unlike repr(), says what to do.
    return (
      f"{self!r} (a sofo_jax Loss; its number is .value, e.g. "
      "jax.grad(lambda p: loss_fn(p).value) or float(loss))"
    )

  def __float__(self) -> float:
    # Not __array__/__jax_array__: a Loss must never turn into an array
    # silently, or its curvature would be dropped without a word.
    return float(self.value)


def _is_real(dtype) -> bool:
  """Bool, integer or floating: what a scale or a weight may be."""
  return dtype == jnp.bool_ or any(
    jnp.issubdtype(dtype, kind) for kind in (jnp.integer, jnp.floating)
  )


def _check_scale(scale, dtype) -> Array:
  if isinstance(scale, Loss):
    raise TypeError("Two Loss objects cannot be multiplied; add them instead.")
  scale = jnp.asarray(scale)
  if scale.shape != () or not _is_real(scale.dtype):
    raise TypeError(
      "A Loss can only be scaled by a real scalar (a number, a bool or a "
      f"0-d array); got an array of shape {scale.shape} and dtype "
      f"{scale.dtype}. To weight or mask batch elements, pass weights= to "
      "the loss (e.g. sofo_jax.losses.mse(y, t, weights=mask)); to scale "
      "per-step losses, multiply each by its own scalar."
    )
  if scale.dtype == jnp.bool_:  # a mask such as (t >= t0)
    return scale.astype(dtype)
  try:
    negative = bool(np.asarray(scale) < 0)
  except jax.errors.TracerArrayConversionError:
    # Traced: a negative scale would make the Gauss–Newton matrix
    # indefinite, so it makes the loss NaN and the step is skipped.
    return jnp.where(scale >= 0, scale, jnp.nan)
  if negative:
    raise ValueError(
      f"A Loss can only be scaled by a non-negative number; got {scale}. A "
      "negative scale would make the Gauss–Newton matrix indefinite. To "
      "maximise a quantity, minimise a loss of its negation built with "
      "sofo_jax.losses.custom."
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


def _batch_weights(loss: str, weights, outputs: Array) -> Array | None:
  """Validated weights, shaped ``batch + (1,)`` to scale per-feature terms.

  Checked at trace time: the dtype and shape always, the sign only when the
  weights are concrete (a traced value cannot be inspected).
  """
  if weights is None:
    return None
  weights = jnp.asarray(weights)
  if not _is_real(weights.dtype):
    raise TypeError(
      f"{loss}: weights must be real (bool, integer or floating); got {weights.dtype}."
    )
  batch_shape = outputs.shape[:-1]
  try:
    fits = jnp.broadcast_shapes(weights.shape, batch_shape) == batch_shape
  except ValueError:
    fits = False
  if not fits:
    raise ValueError(
      f"{loss}: weights of shape {weights.shape} do not broadcast to the "
      f"batch shape {batch_shape} (outputs of shape {outputs.shape} "
      "without the last, feature axis): there is one weight per example, "
      "shared by its features."
    )
  if not isinstance(weights, jax.core.Tracer):
    concrete = np.asarray(weights)
    bad = ~(concrete >= 0)  # NaN is bad too
    if bad.any():
      raise ValueError(
        f"{loss}: weights must be non-negative (else the Gauss–Newton "
        f"matrix is not positive semi-definite); got {concrete[bad][0]}."
      )
  weights = jnp.broadcast_to(weights.astype(outputs.dtype), batch_shape)
  return weights[..., None] if outputs.ndim else weights


def _batch_count(x: Array) -> int:
  return math.prod(x.shape[:-1]) if x.ndim > 1 else 1


def _weighted_batch_mean(per_feature: Array, weights: Array | None) -> Array:
  """:math:`\\frac1B \\sum_b w_b \\sum_f x_{bf}`: the value's reduction."""
  if weights is not None:
    per_feature = weights * per_feature
  # Half-precision sums overflow long before the mean does (16 examples of
  # 1e4 exceed float16's 65504): accumulate in at least float32.
  total = jnp.sum(per_feature, dtype=jnp.promote_types(per_feature.dtype, jnp.float32))
  return (total / _batch_count(per_feature)).astype(per_feature.dtype)


def _weighted_rows(per_feature: Array, weights: Array | None) -> Array:
  """:math:`w_b x_{bf} / B`: the same reduction's factor on a Hessian product."""
  if weights is not None:
    per_feature = weights * per_feature
  return per_feature / _batch_count(per_feature)


# Squared error ---------------------------------------------------------------


def _mse_value(outputs, data):
  targets, weights = data
  return _weighted_batch_mean(jnp.square(outputs - targets), weights)


def _mse_hvp(outputs, data, vector):
  del outputs
  _, weights = data
  return _weighted_rows(2.0 * vector, weights)


_MSE = channel.from_functions(_mse_value, _mse_hvp)


def mse(
  outputs: ArrayLike, targets: ArrayLike, *, weights: ArrayLike | None = None
) -> Loss:
  """Squared error, summed over features and averaged over the batch.

  .. math::

      \\ell(y) = \\frac{1}{B} \\sum_{b} w_b \\sum_{f} (y_{bf} - t_{bf})^2,
      \\qquad H_b = \\frac{2 w_b}{B} I.

  No factor 1/2: with a single output feature this is the mean squared error.

  Args:
    outputs: predictions ``y``, shape ``(..., features)``.
    targets: targets ``t`` of the same shape.
    weights: optional non-negative weights or a bool mask :math:`w_b`,
      broadcastable to ``outputs.shape[:-1]``; data, not parameters. The sum
      is still divided by :math:`B`, not by :math:`\\sum w` (see the module
      docstring for why). ``None`` means all ones.

  Returns:
    A :class:`Loss`.

  Example:
    >>> import jax.numpy as jnp, sofo_jax
    >>> float(sofo_jax.losses.mse(jnp.ones((2, 3)), jnp.zeros((2, 3))).value)
    3.0
    >>> mask = jnp.array([True, False])           # keep the first example
    >>> float(sofo_jax.losses.mse(jnp.ones((2, 3)), jnp.zeros((2, 3)),
    ...                           weights=mask))   # 3 / B, with B = 2
    1.5
  """
  outputs = _floating("mse outputs", outputs)
  targets = jnp.asarray(targets, outputs.dtype)
  _check_same_shape("mse", outputs, targets)
  weights = _batch_weights("mse", weights, outputs)
  return _make(_MSE, outputs, (targets, weights))


# Gaussian negative log-likelihood ---------------------------------------------


def _gaussian_value(outputs, data):
  targets, variance, weights = data
  elementwise = jnp.square(outputs - targets) / (2.0 * variance)
  elementwise = elementwise + 0.5 * jnp.log(2.0 * jnp.pi * variance)
  return _weighted_batch_mean(elementwise, weights)


def _gaussian_hvp(outputs, data, vector):
  del outputs
  _, variance, weights = data
  return _weighted_rows(vector / variance, weights)


_GAUSSIAN = channel.from_functions(_gaussian_value, _gaussian_hvp)


def gaussian_nll(
  outputs: ArrayLike,
  targets: ArrayLike,
  variance: ArrayLike = 1.0,
  *,
  weights: ArrayLike | None = None,
) -> Loss:
  """Gaussian negative log-likelihood with a fixed variance.

  .. math::

      \\ell(y) = \\frac{1}{B}\\sum_b w_b \\sum_f \\Big[\\frac{(y_{bf} -
      t_{bf})^2}{2\\sigma^2} + \\tfrac12 \\log(2\\pi\\sigma^2)\\Big],
      \\qquad H_b = \\frac{w_b}{B\\sigma^2} I.

  Args:
    outputs: predicted means, shape ``(..., features)``.
    targets: observations of the same shape.
    variance: the fixed variance :math:`\\sigma^2`, a positive scalar or an
      array broadcastable to ``outputs`` (not trained).
    weights: optional non-negative weights or a bool mask :math:`w_b`,
      broadcastable to ``outputs.shape[:-1]``; divided by :math:`B`, not by
      :math:`\\sum w` (see the module docstring).

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
  weights = _batch_weights("gaussian_nll", weights, outputs)
  return _make(_GAUSSIAN, outputs, (targets, variance, weights))


# Softmax cross-entropy ---------------------------------------------------------


def _one_hot_checked(labels: Array, num_classes: int, dtype) -> Array:
  """One-hot targets; a label outside ``[0, num_classes)`` is an error.

  ``jax.nn.one_hot`` maps such a label to a zero row, which would make its
  example's loss silently 0. Concrete labels are refused at trace time;
  traced ones give a NaN row, so the loss is NaN and SOFO skips the step
  and reports it (``step_is_finite`` False) instead of training on it.
  """
  try:
    concrete = np.asarray(labels)
  except jax.errors.TracerArrayConversionError:
    concrete = None
  if (
    concrete is not None
    and concrete.size
    and (concrete.min() < 0 or concrete.max() >= num_classes)
  ):
    raise ValueError(
      f"softmax_cross_entropy: integer labels must lie in [0, {num_classes}) "
      f"for logits with {num_classes} classes; got labels from "
      f"{concrete.min()} to {concrete.max()}."
    )
  targets = jax.nn.one_hot(labels, num_classes, dtype=dtype)
  in_range = ((labels >= 0) & (labels < num_classes))[..., None]
  return jnp.where(in_range, targets, jnp.nan)


def _softmax_ce_value(logits, data):
  targets, weights = data
  return _weighted_batch_mean(-targets * jax.nn.log_softmax(logits), weights)


def _softmax_ce_hvp(logits, data, vector):
  # Hessian of -t.log_softmax(z) is (sum t) (diag p - p p^T), per example.
  targets, weights = data
  p = jax.nn.softmax(logits)
  mass = jnp.sum(targets, axis=-1, keepdims=True)
  pv = jnp.sum(p * vector, axis=-1, keepdims=True)
  return _weighted_rows(mass * (p * vector - p * pv), weights)


_SOFTMAX_CE = channel.from_functions(_softmax_ce_value, _softmax_ce_hvp)


def softmax_cross_entropy(
  logits: ArrayLike, labels: ArrayLike, *, weights: ArrayLike | None = None
) -> Loss:
  """Softmax cross-entropy, averaged over the batch.

  .. math::

      \\ell(z) = -\\frac{1}{B}\\sum_b w_b \\sum_c t_{bc} \\log
      \\operatorname{softmax}(z_b)_c,
      \\qquad H_b = \\frac{w_b \\sum_c t_{bc}}{B}
      \\big(\\operatorname{diag}(p_b) - p_b p_b^\\top\\big).

  Args:
    logits: unnormalised log-probabilities, shape ``(..., classes)``.
    labels: either integer class indices of shape ``logits.shape[:-1]``, or
      one-hot / probability targets of the same shape as ``logits``.
    weights: optional non-negative weights or a bool mask :math:`w_b`,
      broadcastable to ``logits.shape[:-1]`` (e.g. ``labels != fixation`` to
      skip the fixation period); divided by :math:`B`, not by :math:`\\sum w`
      (see the module docstring).

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
    targets = _one_hot_checked(labels, logits.shape[-1], logits.dtype)
  else:
    _check_same_shape("softmax_cross_entropy", logits, labels)
    targets = labels.astype(logits.dtype)
  weights = _batch_weights("softmax_cross_entropy", weights, logits)
  return _make(_SOFTMAX_CE, logits, (targets, weights))


# Sigmoid binary cross-entropy ----------------------------------------------------


def _sigmoid_bce_value(logits, data):
  targets, weights = data
  return _weighted_batch_mean(jax.nn.softplus(logits) - targets * logits, weights)


def _sigmoid_bce_hvp(logits, data, vector):
  _, weights = data
  p = jax.nn.sigmoid(logits)
  return _weighted_rows(p * (1.0 - p) * vector, weights)


_SIGMOID_BCE = channel.from_functions(_sigmoid_bce_value, _sigmoid_bce_hvp)


def sigmoid_binary_cross_entropy(
  logits: ArrayLike, labels: ArrayLike, *, weights: ArrayLike | None = None
) -> Loss:
  """Binary cross-entropy on logits, summed over features, batch-averaged.

  .. math::

      \\ell(z) = \\frac{1}{B}\\sum_b w_b \\sum_f \\big[\\log(1 + e^{z_{bf}})
      - t_{bf} z_{bf}\\big],
      \\qquad H_b = \\frac{w_b}{B}\\operatorname{diag}\\big(\\sigma(z_b)
      (1-\\sigma(z_b))\\big).

  Args:
    logits: shape ``(..., features)``.
    labels: targets in ``[0, 1]`` of the same shape.
    weights: optional non-negative weights or a bool mask :math:`w_b`,
      broadcastable to ``logits.shape[:-1]``; divided by :math:`B`, not by
      :math:`\\sum w` (see the module docstring).

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
  weights = _batch_weights("sigmoid_binary_cross_entropy", weights, logits)
  return _make(_SIGMOID_BCE, logits, (labels, weights))


# Poisson ---------------------------------------------------------------------------


def _poisson_value(log_rates, data):
  counts, weights = data
  return _weighted_batch_mean(jnp.exp(log_rates) - counts * log_rates, weights)


def _poisson_hvp(log_rates, data, vector):
  _, weights = data
  return _weighted_rows(jnp.exp(log_rates) * vector, weights)


_POISSON = channel.from_functions(_poisson_value, _poisson_hvp)


def poisson(
  log_rates: ArrayLike, counts: ArrayLike, *, weights: ArrayLike | None = None
) -> Loss:
  """Poisson negative log-likelihood with a log link (spike counts).

  .. math::

      \\ell(\\eta) = \\frac{1}{B}\\sum_b w_b \\sum_f \\big[e^{\\eta_{bf}}
      - k_{bf}\\,\\eta_{bf}\\big],
      \\qquad H_b = \\frac{w_b}{B}\\operatorname{diag}(e^{\\eta_b}).

  The term :math:`\\log k!` is omitted: it does not depend on the parameters.

  Args:
    log_rates: predicted log firing rates :math:`\\eta` (per bin), shape
      ``(..., neurons)``.
    counts: observed spike counts :math:`k` of the same shape (integer or
      float).
    weights: optional non-negative weights or a bool mask :math:`w_b` (e.g.
      the bins a trial lasts), broadcastable to ``log_rates.shape[:-1]``;
      divided by :math:`B`, not by :math:`\\sum w` (see the module docstring).

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
  weights = _batch_weights("poisson", weights, log_rates)
  return _make(_POISSON, log_rates, (counts.astype(log_rates.dtype), weights))


# Any convex function ------------------------------------------------------------------


class _CustomSpec:
  """Curvature by autodiff in output space only (a Hessian-vector product).

  ``fn`` is closure-converted and split in two: its traced program (static,
  held here) and every array it closes over (``consts``, passed as data).
  """

  def __init__(self, program: Callable[..., ArrayLike]):
    self._program = program

  def value(self, outputs, consts):
    value = jnp.asarray(eqx.combine(consts, self._program)(outputs))
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
  parameters. It may close over any data, traced or not, of any dtype (e.g.
  the int32 spike counts of the current step of a ``lax.scan``). Its
  reduction is whatever ``fn`` does; weight or mask inside ``fn``.

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
  # Every array fn closes over must reach the curvature rule as explicit data.
  # jax.closure_convert hoists only values that can carry a tangent, so an
  # integer tracer (a scanned int32 slice of spike counts) stayed a hidden
  # constant of the converted function. That function is a static argument of
  # the channel's custom_jvp, whose rule lax.scan traces only later, when it
  # differentiates its body, after the tracer's own trace has ended: the stale
  # tracer was baked into the rule's jaxpr and lowering failed ("No constant
  # handler for type DynamicJaxprTracer"). eqx.filter_closure_convert hoists
  # arrays of every dtype; only the traced program stays static.
  converted = eqx.filter_closure_convert(fn, outputs)
  consts, program = eqx.partition(converted, eqx.is_array)
  return _make(_CustomSpec(program), outputs, consts)
