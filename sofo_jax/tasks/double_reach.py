r"""Delayed double reaching with a recurrent network driving a two-link arm.

Trial structure (times in seconds, :math:`\Delta t = 2` ms, :math:`T = 1000`
steps). Two targets :math:`p_1, p_2` are drawn uniformly in angle and in
distance ``target_radius_range`` around the starting hand position
:math:`p_0` (posture :math:`\theta = (30°, 120°)`, hand at :math:`(0, 0.3)`
m). They are shown during a preparation period of random length
:math:`t_1 \sim U[0.2, 0.6]`, which ends with the first go cue; the second go
cue comes at :math:`t_2 = t_1 + 0.7`. The hand must stay at :math:`p_0` before
:math:`t_1`, be still at :math:`p_1` from :math:`t_1 + m` until :math:`t_2`,
and still at :math:`p_2` from :math:`t_2 + m` on, where :math:`m` is
``movement_time``; the movement windows are free.

Network inputs (10 channels) at step :math:`t`: two hold signals,
:math:`[t < t_1]` and :math:`[t < t_2]` (each go cue is the drop of one);
the targets relative to :math:`p_0`, in units of 10 cm, during preparation
only (so they must be remembered); and the arm's proprioceptive feedback,
joint angles relative to the initial posture (rad) and joint velocities
(rad/s). The network (:class:`~sofo_jax.tasks.LeakyRNN`, 64 ReLU units,
:math:`\tau = 20` ms, leak :math:`\Delta t/\tau = 0.1`) outputs joint torques
(N m), which drive a two-link arm (masses 1.4 / 1.0 kg, segments 0.3 m,
viscous damping; semi-implicit Euler). The arm's dynamics are exposed here as
:func:`arm_step`, :func:`acceleration`, :func:`mass_matrix`,
:func:`kinetic_energy`, :func:`hand_position` and :func:`hand_velocity`;
:func:`acceleration` states the equations of motion and :class:`ArmParameters`
the constants.

Loss, with hand position :math:`p_t` and velocity :math:`v_t` after step
:math:`t`, target position :math:`p^*_t` (:math:`p_0`, then :math:`p_1`,
then :math:`p_2`) and weights :math:`w_t` (1 during preparation, 4 during
the holds, 0 in the movement windows):

.. math::

  L = \frac1T \sum_t \frac1B \sum_b w_{t,b}\left(\lVert p_{t,b} -
  p^*_{t,b}\rVert^2 + \lVert v_{t,b}\rVert^2\right).

Per-trial weights enter as :math:`\sqrt{w}` on both sides of a squared error,
so the Gauss–Newton curvature SOFO sees is weighted exactly like the loss.

The batch holds ``target1``, ``target2`` (``(batch, 2)``, metres) and the
go-cue steps ``go1``, ``go2`` (``(batch,)``, int32); all inputs are built on
the fly inside the time loop.

Example:
  >>> import jax
  >>> from sofo_jax.tasks import double_reach
  >>> task = double_reach.make(double_reach.Config.quick())
  >>> batch = task.sample_batch(jax.random.key(0))
  >>> batch["target1"].shape
  (4, 2)

References:
  Yu, Xia, Ma, Lengyel and Hennequin, "Second-order forward-mode optimization
  of recurrent neural networks for neuroscience", NeurIPS 2024.

  Li, W. and Todorov, E., "Iterative linear quadratic regulator design for
  nonlinear biological movement systems", ICINCO, 2004.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from sofo_jax import losses
from sofo_jax.tasks import _arm, _base
from sofo_jax.tasks._arm import (
  ArmParameters,
  ArmState,
  acceleration,
  damping_matrix,
  hand_position,
  hand_velocity,
  kinetic_energy,
  mass_matrix,
)
from sofo_jax.tasks._arm import step as arm_step
from sofo_jax.tasks._rnn import LeakyRNN

__all__ = (
  "INITIAL_THETA",
  "NAME",
  "ArmParameters",
  "ArmState",
  "Config",
  "acceleration",
  "arm_step",
  "damping_matrix",
  "generate",
  "hand_position",
  "hand_velocity",
  "initial_state",
  "kinetic_energy",
  "make",
  "mass_matrix",
  "phase",
  "start_position",
)

NAME = "double_reach"

#: Initial posture (shoulder, elbow) in radians; the hand is at (0, 0.3) m.
INITIAL_THETA = (math.pi / 6.0, 2.0 * math.pi / 3.0)
NUM_INPUTS = 10
_TARGET_UNIT = 0.1  # metres per unit of target input


@dataclasses.dataclass(frozen=True)
class Config(_base.TaskConfig):
  """Settings of the double-reach task (defaults: the paper's where given).

  Attributes:
    num_hidden: number of ReLU units.
    tau: neuronal time constant (s).
    dt: integration step (s).
    duration: trial length (s); ``num_steps = round(duration / dt)``.
    prep_range: range of the preparation period, i.e. of the first go cue
      time (s).
    second_cue_delay: time from the first to the second go cue (s).
    movement_time: unpenalised time allowed after each go cue (s).
    target_radius_range: distance of the targets from the start (m).
    prep_weight: loss weight while holding at the start.
    hold_weight: loss weight while holding at a target.
    readout_scale: scale of the torque readout at initialisation (small, so
      the untrained arm does not fling itself around).
    arm: physical constants of the arm.
    batch_size, num_tangents, learning_rate, damping, adam_learning_rate: see
      :class:`sofo_jax.tasks.TaskConfig`, whose defaults hold unless set
      below; the paper gives batch 256 and K = 256, the learning rate and
      damping are sofo_jax's choices.
  """

  num_hidden: int = 64
  tau: float = 0.02
  dt: float = 0.002
  duration: float = 2.0
  prep_range: tuple[float, float] = (0.2, 0.6)
  second_cue_delay: float = 0.7
  movement_time: float = 0.5
  target_radius_range: tuple[float, float] = (0.05, 0.15)
  prep_weight: float = 1.0
  hold_weight: float = 4.0
  readout_scale: float = 0.1
  arm: ArmParameters = ArmParameters()
  num_tangents: int = 256
  learning_rate: float = 0.5
  damping: float = 1e-4

  @classmethod
  def quick(cls) -> Config:
    """A tiny configuration for tests: 8 units, 4 trials of 40 steps.

    Time is compressed (10 ms steps, 0.4 s trials) so that every phase of the
    trial still occurs. Not for long runs: see :mod:`sofo_jax.tasks`.
    """
    return cls(
      num_hidden=8,
      dt=0.01,
      duration=0.4,
      prep_range=(0.05, 0.1),
      second_cue_delay=0.15,
      movement_time=0.05,
      batch_size=4,
      num_tangents=8,
    )

  @property
  def num_steps(self) -> int:
    return round(self.duration / self.dt)

  def steps(self, seconds: float) -> int:
    """Converts a duration in seconds to a whole number of steps."""
    return round(seconds / self.dt)


def initial_state(config: Config) -> ArmState:
  """The resting arm at the initial posture, batched."""
  theta = jnp.broadcast_to(
    jnp.asarray(INITIAL_THETA, jnp.float32), (config.batch_size, 2)
  )
  return ArmState(theta, jnp.zeros_like(theta))


def start_position(config: Config) -> Array:
  """Hand position at the initial posture, shape ``(2,)``."""
  return _arm.hand_position(jnp.asarray(INITIAL_THETA, jnp.float32), config.arm)


def generate(key: PRNGKeyArray, config: Config) -> dict[str, Array]:
  """Samples targets and go-cue times.

  Args:
    key: PRNG key.
    config: task settings.

  Returns:
    ``{"target1", "target2", "go1", "go2"}``, see the module docstring.
  """
  u = jax.random.uniform(key, (5, config.batch_size))
  start = start_position(config)

  def target(u_angle, u_radius):
    angle = 2.0 * math.pi * u_angle
    low, high = config.target_radius_range
    radius = low + (high - low) * u_radius
    return start + radius[:, None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1)

  first, last = (config.steps(config.prep_range[0]), config.steps(config.prep_range[1]))
  # Uniform on {first, ..., last}.
  go1 = jnp.minimum(first + jnp.floor(u[4] * (last - first + 1)), last)
  go1 = go1.astype(jnp.int32)
  go2 = go1 + config.steps(config.second_cue_delay)
  return {
    "target1": target(u[0], u[1]),
    "target2": target(u[2], u[3]),
    "go1": go1,
    "go2": go2,
  }


def phase(t: Array, batch: dict[str, Array], config: Config) -> tuple[Array, Array]:
  """Target hand position and loss weight of every trial at step ``t``.

  Returns:
    ``(position, weight)`` of shapes ``(batch, 2)`` and ``(batch,)``.
  """
  go1, go2 = batch["go1"], batch["go2"]
  move = config.steps(config.movement_time)
  start = jnp.broadcast_to(start_position(config), batch["target1"].shape)
  position = jnp.where(
    (t < go1)[:, None],
    start,
    jnp.where((t < go2)[:, None], batch["target1"], batch["target2"]),
  )
  holding = ((t >= go1 + move) & (t < go2)) | (t >= go2 + move)
  weight = jnp.where(
    t < go1, config.prep_weight, jnp.where(holding, config.hold_weight, 0.0)
  )
  return position, weight


def make(config: Config = Config()) -> _base.Task:
  """Builds the double-reach :class:`~sofo_jax.tasks.Task`.

  Args:
    config: task settings.

  Returns:
    A task whose ``metrics`` are ``loss``; ``reach_error_1`` and
    ``reach_error_2``, the mean hand-to-target distance (m) at the end of the
    first hold (just before the second go cue) and at the end of the trial;
    and ``hold_speed``, the mean hand speed (m/s) over penalised steps.
  """
  _base.check_common(config)
  for name in ("num_hidden", "tau", "dt", "duration", "second_cue_delay"):
    _base.check_positive(name, getattr(config, name))
  if not config.dt <= config.tau:
    raise ValueError("`dt` must not exceed `tau`.")
  last_go2 = config.steps(config.prep_range[1]) + config.steps(config.second_cue_delay)
  if (
    not 0 < config.steps(config.prep_range[0]) <= config.steps(config.prep_range[1])
    or last_go2 >= config.num_steps
  ):
    raise ValueError(
      "The trial must contain a preparation period and both go cues: need "
      "0 < prep_range[0] <= prep_range[1] and prep_range[1] + "
      f"second_cue_delay < duration (got {config.prep_range}, "
      f"{config.second_cue_delay}, {config.duration})."
    )

  num_steps = config.num_steps
  start = start_position(config)
  theta0 = jnp.asarray(INITIAL_THETA, jnp.float32)

  def build(key):
    return LeakyRNN(
      NUM_INPUTS,
      config.num_hidden,
      2,
      leak=config.dt / config.tau,
      activation="relu",
      readout_scale=config.readout_scale,
      key=key,
    )

  init_params, static = _base.partition_model(build)

  def sample_batch(key):
    return generate(key, config)

  def network_inputs(t, arm, batch):
    preparing = (t < batch["go1"])[:, None]
    cues = jnp.concatenate([preparing, (t < batch["go2"])[:, None]], -1).astype(
      jnp.float32
    )
    targets = (
      jnp.concatenate([batch["target1"] - start, batch["target2"] - start], -1)
      / _TARGET_UNIT
    )
    targets = jnp.where(preparing, targets, 0.0)
    return jnp.concatenate([cues, targets, arm.theta - theta0, arm.theta_dot], -1)

  def advance(model, carry, t, batch):
    """One step: network update, torque, arm step, weighted hand error."""
    h, arm = carry
    h = model(h, network_inputs(t, arm, batch))
    torque = model.readout(h)
    arm = _arm.step(arm, torque, config.dt, config.arm)
    hand_pos = _arm.hand_position(arm.theta, config.arm)
    hand_vel = _arm.hand_velocity(arm, config.arm)
    target_pos, weight = phase(t, batch, config)
    return (h, arm), torque, hand_pos, hand_vel, target_pos, weight

  def initial_carry(model):
    return model.initial_state((config.batch_size,)), initial_state(config)

  def loss_fn(params, batch):
    model = eqx.combine(params, static)

    def step(carry, t):
      state, total = carry
      state, _, pos, vel, target, weight = advance(model, state, t, batch)
      root_w = jnp.sqrt(weight)[:, None]
      outputs = root_w * jnp.concatenate([pos, vel], -1)
      targets = root_w * jnp.concatenate([target, jnp.zeros_like(vel)], -1)
      return (state, total + losses.mse(outputs, targets)), None

    (_, total), _ = jax.lax.scan(
      step, (initial_carry(model), losses.zero()), jnp.arange(num_steps)
    )
    return total / num_steps

  def metrics(params, batch):
    model = eqx.combine(params, static)

    def step(carry, t):
      state, total, err1, err2, speed, penalised = carry
      state, _, pos, vel, target, weight = advance(model, state, t, batch)
      sq = jnp.sum(jnp.square(pos - target), -1) + jnp.sum(jnp.square(vel), -1)
      total = total + jnp.mean(weight * sq)
      dist1 = jnp.linalg.norm(pos - batch["target1"], axis=-1)
      dist2 = jnp.linalg.norm(pos - batch["target2"], axis=-1)
      err1 = err1 + jnp.mean(jnp.where(t == batch["go2"] - 1, dist1, 0.0))
      err2 = err2 + jnp.where(t == num_steps - 1, jnp.mean(dist2), 0.0)
      held = weight > 0
      speed = speed + jnp.sum(jnp.where(held, jnp.linalg.norm(vel, axis=-1), 0.0))
      penalised = penalised + jnp.sum(held)
      return (state, total, err1, err2, speed, penalised), None

    z = jnp.zeros(())
    (_, total, err1, err2, speed, penalised), _ = jax.lax.scan(
      step, (initial_carry(model), z, z, z, z, z), jnp.arange(num_steps)
    )
    return {
      "loss": total / num_steps,
      "reach_error_1": err1,
      "reach_error_2": err2,
      "hold_speed": speed / jnp.maximum(penalised, 1.0),
    }

  def outputs(params, batch):
    model = eqx.combine(params, static)

    def step(state, t):
      state, torque, pos, vel, target, weight = advance(model, state, t, batch)
      return state, {
        "hand_position": pos,
        "hand_velocity": vel,
        "torque": torque,
        "theta": state[1].theta,
        "target_position": target,
        "weight": weight,
      }

    _, out = jax.lax.scan(step, initial_carry(model), jnp.arange(num_steps))
    return out

  return _base.Task(
    name=NAME,
    config=config,
    init_params=init_params,
    sample_batch=sample_batch,
    loss_fn=loss_fn,
    metrics=metrics,
    outputs=outputs,
  )
