r"""Lorenz attractor with sparse supervision: predict the state 32 steps ahead.

The Lorenz system

.. math::

  \dot x = \sigma (y - x), \quad \dot y = x(\rho - z) - y, \quad
  \dot z = x y - \beta z, \qquad (\sigma, \rho, \beta) = (10, 28, 8/3),

is integrated with the classical fourth-order Runge–Kutta scheme (RK4) at
:math:`\Delta t = 0.01`. A trial starts from a random point on the attractor
(a Gaussian state with the attractor's mean and standard deviation, burned in
for ``burn_in`` RK4 steps) and lasts :math:`T = 32` steps. States are
normalised per dimension with the attractor's mean and standard deviation,
:math:`\tilde s = (s - \mu) / \sigma_s`, measured once from a long trajectory
(:data:`ATTRACTOR_MEAN`, :data:`ATTRACTOR_STD`).

The network (:class:`~sofo_jax.tasks.LeakyRNN`, ``tanh``) starts from
:math:`h_0 = 0`, receives the normalised initial state :math:`\tilde s_0` as
input at step 0 and zero input afterwards, and after :math:`T` updates must
report the normalised final state. Only that final state is supervised:

.. math::

  L = \frac1B \sum_b \lVert C h_T^{(b)} + d - \tilde s_T^{(b)} \rVert^2 .

The batch holds ``initial`` and ``final`` (``(batch, 3)``, normalised) and the
whole normalised trajectory ``trajectory`` (``(T + 1, batch, 3)``, for
plotting; it is not used by the loss).

Example:
  >>> import jax
  >>> from sofo_jax.tasks import lorenz
  >>> task = lorenz.make(lorenz.Config.quick())
  >>> batch = task.sample_batch(jax.random.key(0))
  >>> batch["final"].shape
  (4, 3)

References:
  Lorenz, E. N., "Deterministic nonperiodic flow", Journal of the Atmospheric
  Sciences, 1963.

  Yu, Xia, Ma, Lengyel and Hennequin, "Second-order forward-mode optimization
  of recurrent neural networks for neuroscience", NeurIPS 2024.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from sofo_jax import losses
from sofo_jax.tasks import _base
from sofo_jax.tasks._rnn import LeakyRNN

NAME = "lorenz"

SIGMA, RHO, BETA = 10.0, 28.0, 8.0 / 3.0

#: Per-dimension mean of the attractor (x and y vanish by symmetry), measured
#: on 200 trajectories of 20,000 RK4 steps (dt = 0.01) after a burn-in.
ATTRACTOR_MEAN = np.array([0.0, 0.0, 23.55])
#: Per-dimension standard deviation of the attractor, same measurement.
ATTRACTOR_STD = np.array([7.92, 9.01, 8.62])


@dataclasses.dataclass(frozen=True)
class Config(_base.TaskConfig):
  """Settings of the Lorenz task (defaults: the paper's).

  Attributes:
    num_hidden: number of ``tanh`` units.
    num_steps: trajectory length ``T`` in RK4 steps; only the state after
      ``T`` steps is supervised.
    dt: RK4 step.
    burn_in: RK4 steps from the random initial state to the trial start.
    leak: leak of the network (``1`` is a non-leaky discrete-time RNN).
    gain: recurrent weight scale at initialisation.
    batch_size, num_tangents, learning_rate, damping, adam_learning_rate: see
      :class:`sofo_jax.tasks.TaskConfig`, whose defaults hold unless set
      below.
  """

  num_hidden: int = 400
  num_steps: int = 32
  dt: float = 0.01
  burn_in: int = 1000
  leak: float = 0.1
  gain: float = 0.9

  @classmethod
  def quick(cls) -> Config:
    """A tiny configuration for tests: 8 units, 4 trials, 8 steps.

    Not for long runs: see :mod:`sofo_jax.tasks`.
    """
    return cls(num_hidden=8, num_steps=8, batch_size=4, num_tangents=8)


def vector_field(s: Float[Array, "*b 3"]) -> Float[Array, "*b 3"]:
  """The Lorenz vector field at states ``s`` (raw, unnormalised units)."""
  x, y, z = s[..., 0], s[..., 1], s[..., 2]
  return jnp.stack([SIGMA * (y - x), x * (RHO - z) - y, x * y - BETA * z], axis=-1)


def rk4_step(s: Float[Array, "*b 3"], dt: float) -> Float[Array, "*b 3"]:
  """One classical Runge–Kutta step of the Lorenz system."""
  k1 = vector_field(s)
  k2 = vector_field(s + 0.5 * dt * k1)
  k3 = vector_field(s + 0.5 * dt * k2)
  k4 = vector_field(s + dt * k3)
  return s + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


def integrate(
  s0: Float[Array, "*b 3"], num_steps: int, dt: float
) -> Float[Array, "t *b 3"]:
  """RK4 trajectory ``[s0, s1, ..., s_num_steps]`` (raw units)."""

  def step(s, _):
    s = rk4_step(s, dt)
    return s, s

  _, states = jax.lax.scan(step, s0, None, length=num_steps)
  return jnp.concatenate([s0[None], states], axis=0)


def normalise(s: Array) -> Array:
  """Maps raw states to attractor-normalised units."""
  return (s - jnp.asarray(ATTRACTOR_MEAN, s.dtype)) / jnp.asarray(
    ATTRACTOR_STD, s.dtype
  )


def denormalise(s: Array) -> Array:
  """Inverse of :func:`normalise`."""
  return s * jnp.asarray(ATTRACTOR_STD, s.dtype) + jnp.asarray(ATTRACTOR_MEAN, s.dtype)


def generate(key: PRNGKeyArray, config: Config) -> dict[str, Array]:
  """Samples trials starting at random points on the attractor.

  Args:
    key: PRNG key.
    config: task settings.

  Returns:
    ``{"initial", "final", "trajectory"}`` in normalised units; see the
    module docstring.
  """
  noise = jax.random.normal(key, (config.batch_size, 3))
  start = denormalise(noise)

  def burn(s, _):
    return rk4_step(s, config.dt), None

  start, _ = jax.lax.scan(burn, start, None, length=config.burn_in)
  trajectory = normalise(integrate(start, config.num_steps, config.dt))
  return {"initial": trajectory[0], "final": trajectory[-1], "trajectory": trajectory}


def make(config: Config = Config()) -> _base.Task:
  """Builds the Lorenz :class:`~sofo_jax.tasks.Task`.

  Args:
    config: task settings.

  Returns:
    A task whose ``metrics`` are ``mse`` (the loss value) and two baselines
    to beat: ``persistence_mse``, the error of predicting no change
    (:math:`\\tilde s_T \\approx \\tilde s_0`), and ``attractor_mean_mse``,
    the error of predicting the attractor's mean (about 3).
  """
  _base.check_common(config)
  for name in ("num_hidden", "num_steps", "dt"):
    _base.check_positive(name, getattr(config, name))
  if config.burn_in < 0:
    raise ValueError(f"`burn_in` must be non-negative, got {config.burn_in}.")

  def build(key):
    return LeakyRNN(
      3,
      config.num_hidden,
      3,
      leak=config.leak,
      activation="tanh",
      gain=config.gain,
      key=key,
    )

  init_params, static = _base.partition_model(build)

  def sample_batch(key):
    return generate(key, config)

  def _run(model, batch, record):
    def step(h, t):
      x = jnp.where(t == 0, batch["initial"], 0.0)
      h = model(h, x)
      return h, (model.readout(h) if record else None)

    h0 = model.initial_state((config.batch_size,))
    return jax.lax.scan(step, h0, jnp.arange(config.num_steps))

  def loss_fn(params, batch):
    model = eqx.combine(params, static)
    h_final, _ = _run(model, batch, record=False)
    return losses.mse(model.readout(h_final), batch["final"])

  def outputs(params, batch):
    model = eqx.combine(params, static)
    _, ys = _run(model, batch, record=True)
    return {"outputs": ys, "trajectory": batch["trajectory"]}

  def metrics(params, batch):
    model = eqx.combine(params, static)
    h_final, _ = _run(model, batch, record=False)
    return {
      "mse": _base.mean_sq_error(model.readout(h_final), batch["final"]),
      "persistence_mse": _base.mean_sq_error(batch["initial"], batch["final"]),
      "attractor_mean_mse": jnp.mean(jnp.sum(jnp.square(batch["final"]), axis=-1)),
    }

  return _base.Task(
    name=NAME,
    config=config,
    init_params=init_params,
    sample_batch=sample_batch,
    loss_fn=loss_fn,
    metrics=metrics,
    outputs=outputs,
  )
