"""The learning rate that follows a forward-mode direction in the chain.

Optax's ``scale_by_learning_rate`` multiplies the update by :math:`-\\eta`.
For SOFO that is not safe enough: a skipped step is a zero update, and a
non-finite :math:`\\eta` (injected with ``optax.inject_hyperparams`` or
produced by a schedule) turns even that zero into NaN (``0 × inf``). Here an
unusable rate (not finite, or negative) gives an exactly zero step instead,
and the direction's transformation reports it in its diagnostics. A rate
given as a number is refused when the optimizer is built
(:func:`sofo_jax._src.validation.check_learning_rate`).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike, Bool


def learning_rate_at(learning_rate: optax.ScalarOrSchedule, count) -> ArrayLike:
  """The learning rate of step ``count``: a schedule's value, or the constant."""
  return learning_rate(count) if callable(learning_rate) else learning_rate


def is_usable(eta: ArrayLike) -> Bool[Array, ""]:
  """Whether :math:`\\eta` is finite and non-negative."""
  eta = jnp.asarray(eta)
  return jnp.isfinite(eta) & (eta >= 0)


def _usable_or_zero(eta: ArrayLike) -> Array:
  return jnp.where(is_usable(eta), eta, jnp.zeros_like(jnp.asarray(eta)))


def scale_by_learning_rate(
  learning_rate: optax.ScalarOrSchedule,
) -> optax.GradientTransformation:
  """``optax.scale_by_learning_rate``, with an unusable rate giving a zero step.

  The state has the same structure as optax's (a schedule keeps a count, a
  constant keeps none), so checkpoints of either load into the other.

  Args:
    learning_rate: :math:`\\eta`, a scalar or an optax schedule.

  Returns:
    A transformation multiplying updates by :math:`-\\eta`, or by 0 when
    :math:`\\eta` is not finite or is negative.

  Example:
    >>> import jax.numpy as jnp
    >>> from sofo_jax._src import learning_rate
    >>> scale = learning_rate.scale_by_learning_rate(jnp.inf)
    >>> updates, _ = scale.update({"w": jnp.ones(2)}, scale.init(None))
    >>> bool((updates["w"] == 0).all())
    True
  """
  if callable(learning_rate):
    return optax.scale_by_schedule(lambda count: -_usable_or_zero(learning_rate(count)))
  return optax.scale(-_usable_or_zero(learning_rate))
