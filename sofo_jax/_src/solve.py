"""The damped K×K Gauss–Newton solve in the tangent subspace."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float


class SubspaceStep(NamedTuple):
  """Solution of the damped subspace system and what it says about the step.

  Attributes:
    coefficients: :math:`w`, so that the step direction is :math:`\\Theta w`.
    eigenvalues: the spectrum of :math:`\\tilde G` (ascending, clipped at 0).
    max_eigenvalue: its largest eigenvalue :math:`s_{\\max}`.
    damping: the absolute damping :math:`\\lambda_{\\text{eff}}` that was added.
    predicted_decrease: :math:`\\tilde g^\\top w - \\tfrac12 w^\\top \\tilde G w`,
      the decrease of the quadratic model for a unit learning rate.
    finite: whether the sketch was finite (otherwise ``w = 0``).
  """

  coefficients: Float[Array, " k"]
  eigenvalues: Float[Array, " k"]
  max_eigenvalue: Float[Array, ""]
  damping: Float[Array, ""]
  predicted_decrease: Float[Array, ""]
  finite: Bool[Array, ""]


def solve_damped(
    gradient: Float[Array, " k"],
    gauss_newton: Float[Array, "k k"],
    damping: ArrayLike,
    relative_damping: bool = True,
) -> SubspaceStep:
  """Solves :math:`(\\tilde G + \\lambda_{\\text{eff}} I) w = \\tilde g`.

  With the eigendecomposition :math:`\\tilde G = U S U^\\top`,

  .. math::

      w = U (S + \\lambda_{\\text{eff}} I)^{-1} U^\\top \\tilde g, \\qquad
      \\lambda_{\\text{eff}} = \\begin{cases} \\lambda\\, s_{\\max} &
      \\text{relative (default, as in Yu et al., 2024)} \\\\ \\lambda &
      \\text{absolute.} \\end{cases}

  Eigenvalues at round-off level, :math:`s \\le K\\varepsilon\\, s_{\\max}`, are
  treated as exactly zero, and directions whose damped eigenvalue
  :math:`s + \\lambda_{\\text{eff}}` is still at round-off level get a zero
  coefficient (a truncated pseudo-inverse, as ``numpy.linalg.pinv``): with no
  damping, a rank-deficient sketch (K > P, or parameters the outputs do not
  depend on) does not amplify round-off into a large step. A non-finite
  input gives ``w = 0`` and ``finite = False``: nothing non-finite reaches
  ``eigh``; so does a damping that is negative or not finite. The solve runs
  in at least float32.

  Args:
    gradient: :math:`\\tilde g`, shape ``(K,)``.
    gauss_newton: :math:`\\tilde G`, symmetric PSD, shape ``(K, K)``.
    damping: :math:`\\lambda \\ge 0`.
    relative_damping: scale :math:`\\lambda` by :math:`s_{\\max}`.

  Returns:
    A :class:`SubspaceStep`.

  Example:
    >>> import jax.numpy as jnp
    >>> from sofo_jax import solve_damped
    >>> step = solve_damped(jnp.ones(2), jnp.diag(jnp.array([1.0, 2.0])), 0.0)
    >>> step.coefficients
    Array([1. , 0.5], dtype=float32)
  """
  dtype = jnp.promote_types(gradient.dtype, jnp.float32)
  gradient = gradient.astype(dtype)
  gauss_newton = gauss_newton.astype(dtype)
  damping = jnp.asarray(damping, dtype)
  finite = jnp.all(jnp.isfinite(gradient)) & jnp.all(jnp.isfinite(gauss_newton))
  # A traced damping cannot be checked eagerly; a bad one skips the step.
  finite = finite & jnp.isfinite(damping) & (damping >= 0)
  gradient = jnp.where(finite, gradient, 0.0)
  gauss_newton = jnp.where(finite, gauss_newton, 0.0)

  eigenvalues, eigenvectors = jnp.linalg.eigh(gauss_newton)
  # Round-off can make a PSD matrix's smallest eigenvalues slightly negative.
  eigenvalues = jnp.maximum(eigenvalues, 0.0)
  max_eigenvalue = eigenvalues[-1]
  # Below this, an eigenvalue (and the gradient along its eigenvector) is
  # round-off: dividing by it would turn noise into a step.
  cutoff = max_eigenvalue * gradient.shape[0] * jnp.finfo(dtype).eps
  eigenvalues = jnp.where(eigenvalues > cutoff, eigenvalues, 0.0)
  effective_damping = damping * max_eigenvalue if relative_damping else damping
  denominator = eigenvalues + effective_damping
  positive = denominator > cutoff
  inverse = jnp.where(positive, 1.0 / jnp.where(positive, denominator, 1.0), 0.0)
  coefficients = eigenvectors @ (inverse * (eigenvectors.T @ gradient))
  # Guards against overflow in the solve itself (e.g. a huge gradient).
  solved_finite = jnp.all(jnp.isfinite(coefficients))
  coefficients = jnp.where(solved_finite, coefficients, 0.0)
  predicted = gradient @ coefficients - 0.5 * coefficients @ (
      gauss_newton @ coefficients
  )
  return SubspaceStep(
      coefficients=coefficients,
      eigenvalues=eigenvalues,
      max_eigenvalue=max_eigenvalue,
      damping=effective_damping,
      predicted_decrease=predicted,
      finite=finite & solved_finite,
  )
