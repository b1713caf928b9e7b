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


class Eigensystem(NamedTuple):
  """The sketched Gauss–Newton matrix in its eigenbasis, cleaned for solving.

  Attributes:
    eigenvalues: :math:`S`, ascending, clipped at 0, with round-off-level
      values set to exactly 0.
    eigenvectors: :math:`U`.
    projected_gradient: :math:`U^\\top \\tilde g`.
    max_eigenvalue: :math:`s_{\\max}`.
    cutoff: :math:`K\\varepsilon\\, s_{\\max}`, the round-off level.
    finite: whether the inputs were finite (otherwise everything is zero).
  """

  eigenvalues: Float[Array, " k"]
  eigenvectors: Float[Array, "k k"]
  projected_gradient: Float[Array, " k"]
  max_eigenvalue: Float[Array, ""]
  cutoff: Float[Array, ""]
  finite: Bool[Array, ""]


def eigensystem(
  gradient: Float[Array, " k"], gauss_newton: Float[Array, "k k"]
) -> Eigensystem:
  """Eigendecomposes :math:`\\tilde G` once, so that any damping is cheap.

  A non-finite input gives an all-zero system with ``finite = False``:
  nothing non-finite reaches ``eigh``. Runs in at least float32.
  """
  dtype = jnp.promote_types(gradient.dtype, jnp.float32)
  gradient = gradient.astype(dtype)
  gauss_newton = gauss_newton.astype(dtype)
  finite = jnp.all(jnp.isfinite(gradient)) & jnp.all(jnp.isfinite(gauss_newton))
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
  return Eigensystem(
    eigenvalues=eigenvalues,
    eigenvectors=eigenvectors,
    projected_gradient=eigenvectors.T @ gradient,
    max_eigenvalue=max_eigenvalue,
    cutoff=cutoff,
    finite=finite,
  )


def damped_coefficients(
  system: Eigensystem, absolute_damping: ArrayLike
) -> tuple[Float[Array, " k"], Bool[Array, ""]]:
  """:math:`w = U (S + \\lambda I)^{-1} U^\\top\\tilde g` for an absolute damping.

  Directions whose damped eigenvalue is still at round-off level get a zero
  coefficient (a truncated pseudo-inverse). A damping that is negative or
  not finite, or a solve that overflows, gives ``w = 0`` and False.
  """
  damping = jnp.asarray(absolute_damping, system.eigenvalues.dtype)
  valid = jnp.isfinite(damping) & (damping >= 0)
  denominator = system.eigenvalues + jnp.where(valid, damping, 0.0)
  positive = denominator > system.cutoff
  inverse = jnp.where(positive, 1.0 / jnp.where(positive, denominator, 1.0), 0.0)
  coefficients = system.eigenvectors @ (inverse * system.projected_gradient)
  # Guards against overflow in the solve itself (e.g. a huge gradient).
  finite = valid & jnp.all(jnp.isfinite(coefficients))
  return jnp.where(finite, coefficients, 0.0), finite


def model_decrease(
  gradient: Float[Array, " k"],
  gauss_newton: Float[Array, "k k"],
  coefficients: Float[Array, " k"],
  learning_rate: ArrayLike = 1.0,
) -> Float[Array, ""]:
  """Decrease of the quadratic model for the step :math:`-\\eta\\,\\Theta w`.

  .. math::

      \\eta\\, \\tilde g^\\top w - \\tfrac{\\eta^2}{2}\\, w^\\top \\tilde G w.
  """
  dtype = coefficients.dtype
  gradient = jnp.where(jnp.isfinite(gradient), gradient, 0.0).astype(dtype)
  gauss_newton = jnp.where(jnp.isfinite(gauss_newton), gauss_newton, 0.0).astype(dtype)
  eta = jnp.asarray(learning_rate, dtype)
  return eta * (gradient @ coefficients) - 0.5 * eta**2 * (
    coefficients @ (gauss_newton @ coefficients)
  )


def absolute_damping(
  damping: ArrayLike, system: Eigensystem, relative_damping: bool
) -> Float[Array, ""]:
  """:math:`\\lambda s_{\\max}` (relative) or :math:`\\lambda` (absolute)."""
  damping = jnp.asarray(damping, system.eigenvalues.dtype)
  return damping * system.max_eigenvalue if relative_damping else damping


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
  system = eigensystem(gradient, gauss_newton)
  effective_damping = absolute_damping(damping, system, relative_damping)
  coefficients, solved = damped_coefficients(system, effective_damping)
  return SubspaceStep(
    coefficients=coefficients,
    eigenvalues=system.eigenvalues,
    max_eigenvalue=system.max_eigenvalue,
    damping=effective_damping,
    predicted_decrease=model_decrease(gradient, gauss_newton, coefficients),
    finite=system.finite & solved,
  )


def scale_safe_norm(vector: Float[Array, " k"]) -> Float[Array, ""]:
  """:math:`\\lVert v\\rVert_2` without squaring's underflow or overflow.

  ``jnp.linalg.norm`` squares the entries, so in float32 a sketched gradient
  of a loss scaled by 1e-21 underflows to 0 and one scaled by 1e21
  overflows to inf, while the step itself (a ratio) is fine. Dividing by
  :math:`\\max_i |v_i|` first keeps every square in range.

  Example:
    >>> import jax.numpy as jnp
    >>> round(float(scale_safe_norm(jnp.array([3e30, 4e30]))) / 1e30, 4)
    5.0
  """
  largest = jnp.max(jnp.abs(vector))
  safe = jnp.where((largest > 0) & jnp.isfinite(largest), largest, 1)
  norm = jnp.where(largest > 0, safe * jnp.linalg.norm(vector / safe), 0)
  return jnp.where(jnp.isfinite(largest), norm, largest)  # inf stays inf, NaN NaN
