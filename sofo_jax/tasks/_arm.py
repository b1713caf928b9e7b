r"""Planar two-link arm: rigid-body dynamics and kinematics in JAX.

Joint angles :math:`\theta = (\theta_1, \theta_2)` (shoulder, elbow; the elbow
angle is relative to the upper arm) obey

.. math::

  M(\theta)\,\ddot\theta + c(\theta, \dot\theta) + B\dot\theta = u,

  M = \begin{pmatrix} a_1 + 2 a_2\cos\theta_2 & a_3 + a_2\cos\theta_2 \\
                      a_3 + a_2\cos\theta_2 & a_3 \end{pmatrix},\quad
  c = a_2 \sin\theta_2 \begin{pmatrix} -\dot\theta_2(2\dot\theta_1 +
      \dot\theta_2) \\ \dot\theta_1^2 \end{pmatrix},

with :math:`a_1 = I_1 + I_2 + m_2 l_1^2`, :math:`a_2 = m_2 l_1 s_2`,
:math:`a_3 = I_2`, joint torques :math:`u` and viscous damping :math:`B`. The
arm moves in the horizontal plane (no gravity), so its mechanical energy is
the kinetic energy :math:`E = \tfrac12 \dot\theta^\top M(\theta)\dot\theta`
and :math:`\dot E = \dot\theta^\top u - \dot\theta^\top B \dot\theta`: with no
torque, energy only decreases.

Default constants (Li & Todorov, 2004, with both segments 0.3 m long):
segment lengths :math:`l_1 = l_2 = 0.3` m, masses :math:`m_1 = 1.4` kg,
:math:`m_2 = 1.0` kg, centre-of-mass distances from the proximal joint
:math:`s_1 = 0.11` m, :math:`s_2 = 0.16` m, moments of inertia about the
joint axes :math:`I_1 = 0.025`, :math:`I_2 = 0.045` kg m², damping
:math:`B = ((0.05, 0.025), (0.025, 0.05))` N m s/rad. (:math:`m_1` and
:math:`s_1` are already accounted for in :math:`I_1`; they are kept for the
record.)

Time stepping is semi-implicit (symplectic) Euler: velocities first, then
positions with the new velocities.

References:
  Li, W. and Todorov, E., "Iterative linear quadratic regulator design for
  nonlinear biological movement systems", ICINCO, 2004.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float


class ArmParameters(NamedTuple):
  """Physical constants of the two-link arm (SI units).

  Lengths ``l1, l2`` (m), masses ``m1, m2`` (kg), centre-of-mass distances
  from the proximal joint ``s1, s2`` (m), moments of inertia about the joint
  axes ``i1, i2`` (kg m^2) and the symmetric viscous damping matrix
  ``((b11, b12), (b12, b22))`` (N m s/rad). Defaults: Li & Todorov (2004)
  with both segments 0.3 m long. ``m1`` and ``s1`` are already accounted for
  in ``i1``: they do not enter the dynamics.
  """

  l1: float = 0.3
  l2: float = 0.3
  m1: float = 1.4
  m2: float = 1.0
  s1: float = 0.11
  s2: float = 0.16
  i1: float = 0.025
  i2: float = 0.045
  b11: float = 0.05
  b12: float = 0.025
  b22: float = 0.05


class ArmState(NamedTuple):
  """Joint angles and angular velocities, each of shape ``(..., 2)``."""

  theta: Float[Array, "*b 2"]
  theta_dot: Float[Array, "*b 2"]


def mass_matrix(
  theta: Float[Array, "*b 2"], p: ArmParameters = ArmParameters()
) -> Float[Array, "*b 2 2"]:
  r"""Inertia matrix of the arm.

  .. math::

    M = \begin{pmatrix} a_1 + 2 a_2\cos\theta_2 & a_3 + a_2\cos\theta_2 \\
                        a_3 + a_2\cos\theta_2 & a_3 \end{pmatrix},\quad
    a_1 = I_1 + I_2 + m_2 l_1^2,\ a_2 = m_2 l_1 s_2,\ a_3 = I_2.
  """
  a1 = p.i1 + p.i2 + p.m2 * p.l1**2
  a2 = p.m2 * p.l1 * p.s2
  a3 = p.i2
  c = a2 * jnp.cos(theta[..., 1])
  m11 = a1 + 2.0 * c
  m12 = a3 + c
  m22 = jnp.full_like(c, a3)
  return jnp.stack([jnp.stack([m11, m12], -1), jnp.stack([m12, m22], -1)], -2)


def damping_matrix(p: ArmParameters = ArmParameters()) -> Array:
  """Viscous damping matrix ``B``."""
  return jnp.array([[p.b11, p.b12], [p.b12, p.b22]])


def acceleration(
  state: ArmState, torque: Float[Array, "*b 2"], p: ArmParameters = ArmParameters()
) -> Float[Array, "*b 2"]:
  r"""Joint accelerations from the equations of motion.

  .. math::

    \ddot\theta = M(\theta)^{-1}\big(u - c(\theta, \dot\theta)
    - B\dot\theta\big), \qquad
    c = a_2 \sin\theta_2 \begin{pmatrix} -\dot\theta_2(2\dot\theta_1 +
    \dot\theta_2) \\ \dot\theta_1^2 \end{pmatrix},

  with :math:`M` from :func:`mass_matrix` and :math:`a_2 = m_2 l_1 s_2`.

  Args:
    state: joint angles and velocities.
    torque: joint torques :math:`u` (N m).
    p: arm constants.

  Returns:
    Joint accelerations (rad/s^2).
  """
  theta, omega = state
  a2 = p.m2 * p.l1 * p.s2
  sin2 = jnp.sin(theta[..., 1])
  coriolis = (
    a2
    * sin2[..., None]
    * jnp.stack(
      [
        -omega[..., 1] * (2.0 * omega[..., 0] + omega[..., 1]),
        jnp.square(omega[..., 0]),
      ],
      -1,
    )
  )
  damping = omega @ damping_matrix(p).astype(omega.dtype).T
  rhs = torque - coriolis - damping
  m = mass_matrix(theta, p).astype(rhs.dtype)
  # Closed-form inverse of the 2x2 symmetric positive-definite inertia matrix.
  det = m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]
  acc0 = m[..., 1, 1] * rhs[..., 0] - m[..., 0, 1] * rhs[..., 1]
  acc1 = -m[..., 1, 0] * rhs[..., 0] + m[..., 0, 0] * rhs[..., 1]
  return jnp.stack([acc0, acc1], -1) / det[..., None]


def step(
  state: ArmState,
  torque: Float[Array, "*b 2"],
  dt: float,
  p: ArmParameters = ArmParameters(),
) -> ArmState:
  """One semi-implicit Euler step of length ``dt`` under constant torque."""
  omega = state.theta_dot + dt * acceleration(state, torque, p)
  return ArmState(state.theta + dt * omega, omega)


def hand_position(
  theta: Float[Array, "*b 2"], p: ArmParameters = ArmParameters()
) -> Float[Array, "*b 2"]:
  """Cartesian hand position (shoulder at the origin), in metres."""
  t1 = theta[..., 0]
  t12 = t1 + theta[..., 1]
  return jnp.stack(
    [
      p.l1 * jnp.cos(t1) + p.l2 * jnp.cos(t12),
      p.l1 * jnp.sin(t1) + p.l2 * jnp.sin(t12),
    ],
    -1,
  )


def hand_velocity(
  state: ArmState, p: ArmParameters = ArmParameters()
) -> Float[Array, "*b 2"]:
  """Cartesian hand velocity ``J(theta) theta_dot``, in metres per second."""
  theta, omega = state
  t1 = theta[..., 0]
  t12 = t1 + theta[..., 1]
  w1 = omega[..., 0]
  w12 = w1 + omega[..., 1]
  return jnp.stack(
    [
      -p.l1 * jnp.sin(t1) * w1 - p.l2 * jnp.sin(t12) * w12,
      p.l1 * jnp.cos(t1) * w1 + p.l2 * jnp.cos(t12) * w12,
    ],
    -1,
  )


def kinetic_energy(
  state: ArmState, p: ArmParameters = ArmParameters()
) -> Float[Array, "*b"]:
  """Mechanical (kinetic) energy ``0.5 theta_dot^T M theta_dot``, in joules."""
  m = mass_matrix(state.theta, p).astype(state.theta_dot.dtype)
  omega = state.theta_dot
  return 0.5 * jnp.einsum("...i,...ij,...j->...", omega, m, omega)
