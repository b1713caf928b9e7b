r"""Three-bit flip-flop: remember the sign of the last pulse on each channel.

Task (Sussillo & Barak, 2013). Each of ``num_bits`` input channels receives
sparse pulses: at every step an idle channel starts a pulse with probability
``p`` (``pulse_prob``), of random sign :math:`\pm 1`, lasting
``pulse_duration`` steps; pulse starts during an active pulse are ignored.
The target on channel :math:`i` at step :math:`t` is the sign of the last
pulse that started at or before :math:`t`, and 0 before the first pulse:

.. math::

  x_{t,i} \in \{-1, 0, +1\}, \qquad
  y^*_{t,i} = s_i(t^*), \qquad
  t^* = \max\{t' \le t : \text{a pulse starts on } i \text{ at } t'\},

where :math:`s_i(t^*)` is the sign of that pulse.

The network (:class:`~sofo_jax.tasks.LeakyRNN`, ``tanh`` units, leak
:math:`1/\tau` with :math:`\tau = 10` steps) reads :math:`x_t`, updates its
state and reports :math:`y_t = C h_{t+1} + d`. The loss is the squared error
averaged over the :math:`T` steps,

.. math::

  L = \frac1T \sum_{t=0}^{T-1} \frac1B \sum_b
      \lVert y_{t,b} - y^*_{t,b}\rVert^2.

Batches are time-major: ``inputs`` and ``targets`` have shape
``(T, batch, num_bits)``.

Example:
  >>> import jax
  >>> from sofo_jax.tasks import flip_flop
  >>> task = flip_flop.make(flip_flop.Config.quick())
  >>> batch = task.sample_batch(jax.random.key(0))
  >>> batch["inputs"].shape
  (20, 4, 3)

References:
  Sussillo, D. and Barak, O., "Opening the black box: low-dimensional dynamics
  in high-dimensional recurrent neural networks", Neural Computation, 2013.

  Yu, Xia, Ma, Lengyel and Hennequin, "Second-order forward-mode optimization
  of recurrent neural networks for neuroscience", NeurIPS 2024.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from sofo_jax import losses
from sofo_jax.tasks import _base
from sofo_jax.tasks._rnn import LeakyRNN

NAME = "flip_flop"


@dataclasses.dataclass(frozen=True)
class Config(_base.TaskConfig):
  """Settings of the flip-flop task (defaults: the paper's).

  Attributes:
    num_bits: number of input/output channels.
    num_hidden: number of ``tanh`` units.
    num_steps: trial length ``T``.
    tau: time constant in steps; the leak is ``1 / tau``.
    pulse_prob: probability that an idle channel starts a pulse at a step.
    pulse_duration: length of a pulse in steps.
    gain: recurrent weight scale at initialisation.
    batch_size, num_tangents, learning_rate, damping, adam_learning_rate: see
      :class:`sofo_jax.tasks.TaskConfig`, whose defaults hold unless set
      below.
  """

  num_bits: int = 3
  num_hidden: int = 128
  num_steps: int = 200
  tau: float = 10.0
  pulse_prob: float = 0.02
  pulse_duration: int = 1
  gain: float = 0.9
  batch_size: int = 32

  @classmethod
  def quick(cls) -> Config:
    """A tiny configuration for tests: 8 units, 4 trials of 20 steps.

    Not for long runs: see :mod:`sofo_jax.tasks`.
    """
    return cls(num_hidden=8, num_steps=20, pulse_prob=0.2, batch_size=4, num_tangents=8)


def generate(key: PRNGKeyArray, config: Config) -> dict[str, Array]:
  """Samples a batch of pulse sequences and their flip-flop targets.

  Args:
    key: PRNG key.
    config: task settings.

  Returns:
    ``{"inputs", "targets"}``, float32 arrays of shape
    ``(num_steps, batch_size, num_bits)`` with values in ``{-1, 0, 1}``.
  """
  shape = (config.batch_size, config.num_bits)

  def step(carry, key):
    remaining, sign, last = carry
    u = jax.random.uniform(key, (2, *shape))
    start = (remaining == 0) & (u[0] < config.pulse_prob)
    new_sign = jnp.where(u[1] < 0.5, 1.0, -1.0)
    sign = jnp.where(start, new_sign, sign)
    remaining = jnp.where(start, config.pulse_duration, remaining)
    inputs = jnp.where(remaining > 0, sign, 0.0)
    last = jnp.where(start, sign, last)
    remaining = jnp.maximum(remaining - 1, 0)
    return (remaining, sign, last), (inputs, last)

  init = (jnp.zeros(shape, jnp.int32), jnp.zeros(shape), jnp.zeros(shape))
  _, (inputs, targets) = jax.lax.scan(
    step, init, _base.time_keys(key, config.num_steps)
  )
  return {"inputs": inputs, "targets": targets}


def make(config: Config = Config()) -> _base.Task:
  """Builds the flip-flop :class:`~sofo_jax.tasks.Task`.

  Args:
    config: task settings.

  Returns:
    A task whose ``metrics`` are ``mse`` (the loss value) and ``accuracy``
    (fraction of steps, after a channel's first pulse, where the output has
    the target's sign).
  """
  _base.check_common(config)
  for name in ("num_bits", "num_hidden", "num_steps", "pulse_duration", "tau"):
    _base.check_positive(name, getattr(config, name))
  if not 0.0 <= config.pulse_prob <= 1.0:
    raise ValueError(f"`pulse_prob` must lie in [0, 1], got {config.pulse_prob!r}.")

  def build(key):
    return LeakyRNN(
      config.num_bits,
      config.num_hidden,
      config.num_bits,
      leak=1.0 / config.tau,
      activation="tanh",
      gain=config.gain,
      key=key,
    )

  init_params, static = _base.partition_model(build)

  def sample_batch(key):
    return generate(key, config)

  def loss_fn(params, batch):
    model = eqx.combine(params, static)
    total = model.accumulate(
      batch["inputs"], batch["targets"], losses.mse, losses.zero()
    )
    return total / config.num_steps

  def outputs(params, batch):
    ys, hs = eqx.combine(params, static).run(batch["inputs"])
    return {
      "outputs": ys,
      "hidden": hs,
      "targets": batch["targets"],
      "inputs": batch["inputs"],
    }

  def metrics(params, batch):
    def counts(y, target):
      is_defined = target != 0
      return {
        "sq_err": jnp.sum(jnp.square(y - target)),
        "correct": jnp.sum(is_defined & (jnp.sign(y) == target)),
        "defined": jnp.sum(is_defined),
      }

    zero = jnp.zeros(())
    # Summed inside the scan, so memory does not grow with the horizon.
    total = eqx.combine(params, static).accumulate(
      batch["inputs"],
      batch["targets"],
      counts,
      {"sq_err": zero, "correct": zero, "defined": zero},
    )
    return {
      "mse": total["sq_err"] / (config.num_steps * config.batch_size),
      "accuracy": total["correct"] / jnp.maximum(total["defined"], 1.0),
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
