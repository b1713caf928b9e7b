r"""Delayed addition: add two marked numbers from a long random stream.

The classical adding problem (Hochreiter & Schmidhuber, 1997) with a long
delay before the answer. Each trial is :math:`T` steps long. Input channel 0
carries i.i.d. numbers :math:`v_t \sim U[0, 1]`; input channel 1 is a marker,
1 at exactly two steps :math:`t_1 < t_2` and 0 elsewhere, with

.. math::

  t_1 \sim U\{0, \dots, w - 1\}, \qquad
  t_2 \sim U\{t_1 + 1, \dots, \lfloor T/2 \rfloor\},

where :math:`w` is ``first_window`` (10). The target is
:math:`y^* = v_{t_1} + v_{t_2}`, reported once, after the last step:
the network (:class:`~sofo_jax.tasks.LeakyRNN`, 128 ReLU units, leak 0.25)
reads the stream and the loss is
:math:`L = \frac1B \sum_b (C h_T^{(b)} + d - y^{*(b)})^2`.
At least :math:`T/2` steps separate the second number from the answer.

Predicting the mean, 1, gives :math:`\mathrm{Var}[v_{t_1} + v_{t_2}] = 1/6`;
the usual success criterion is an absolute error below 0.04.

Batches are time-major: ``inputs`` has shape ``(T, batch, 2)``, ``target``
``(batch, 1)``, and ``marks`` (``(batch, 2)``, int32) holds
:math:`t_1, t_2`.

Example:
  >>> import jax
  >>> from sofo_jax.tasks import delayed_addition
  >>> task = delayed_addition.make(delayed_addition.Config.quick())
  >>> batch = task.sample_batch(jax.random.key(0))
  >>> batch["inputs"].shape, batch["target"].shape
  ((20, 4, 2), (4, 1))

References:
  Hochreiter, S. and Schmidhuber, J., "Long short-term memory", Neural
  Computation, 1997.

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

NAME = "delayed_addition"

#: Variance of the target, the MSE of always answering 1.
TARGET_VARIANCE = 1.0 / 6.0


@dataclasses.dataclass(frozen=True)
class Config(_base.TaskConfig):
  """Settings of the delayed addition task (defaults: the paper's).

  Attributes:
    num_hidden: number of ReLU units.
    leak: network leak.
    num_steps: trial length ``T``.
    first_window: the first marked step is drawn from ``[0, first_window)``.
    tolerance: absolute error counted as a correct answer in ``accuracy``.
    gain: recurrent weight scale at initialisation.
    batch_size, num_tangents, learning_rate, damping, adam_learning_rate: see
      :class:`sofo_jax.tasks.TaskConfig`, whose defaults hold unless set
      below.
  """

  num_hidden: int = 128
  leak: float = 0.25
  num_steps: int = 1000
  first_window: int = 10
  tolerance: float = 0.04
  gain: float = 0.9
  learning_rate: float = 0.1

  @classmethod
  def quick(cls) -> Config:
    """A tiny configuration for tests: 8 units, 4 trials of 20 steps.

    Not for long runs: see :mod:`sofo_jax.tasks`.
    """
    return cls(num_hidden=8, num_steps=20, first_window=4, batch_size=4, num_tangents=8)


def generate(key: PRNGKeyArray, config: Config) -> dict[str, Array]:
  """Samples number streams, markers and targets.

  Args:
    key: PRNG key.
    config: task settings.

  Returns:
    ``{"inputs", "target", "marks"}``, see the module docstring.
  """
  u = jax.random.uniform(key, (config.num_steps + 2, config.batch_size))
  values = u[:-2]

  def uniform_int(u, low, high):  # uniform on {low, ..., high - 1}
    return jnp.minimum(low + jnp.floor(u * (high - low)).astype(jnp.int32), high - 1)

  t1 = uniform_int(u[-2], 0, config.first_window)
  t2 = uniform_int(u[-1], t1 + 1, config.num_steps // 2 + 1)
  steps = jnp.arange(config.num_steps)[:, None]
  marks = ((steps == t1) | (steps == t2)).astype(values.dtype)
  target = jnp.sum(values * marks, axis=0)[:, None]
  return {
    "inputs": jnp.stack([values, marks], -1),
    "target": target,
    "marks": jnp.stack([t1, t2], -1).astype(jnp.int32),
  }


def make(config: Config = Config()) -> _base.Task:
  """Builds the delayed addition :class:`~sofo_jax.tasks.Task`.

  Args:
    config: task settings.

  Returns:
    A task whose ``metrics`` are ``mse`` (the loss value), ``normalised_mse``
    (``mse / (1/6)``; 1 is the trivial answer) and ``accuracy`` (fraction of
    trials with absolute error below ``tolerance``).
  """
  _base.check_common(config)
  for name in ("num_hidden", "num_steps", "first_window", "tolerance"):
    _base.check_positive(name, getattr(config, name))
  if not config.first_window <= config.num_steps // 2:
    raise ValueError(
      "`first_window` must not exceed num_steps // 2, so that the second "
      f"mark can follow the first (got {config.first_window} and "
      f"{config.num_steps})."
    )

  def build(key):
    return LeakyRNN(
      2,
      config.num_hidden,
      1,
      leak=config.leak,
      activation="relu",
      gain=config.gain,
      key=key,
    )

  init_params, static = _base.partition_model(build)

  def sample_batch(key):
    return generate(key, config)

  def final_output(model, batch):
    def step(h, x):
      return model(h, x), None

    h, _ = jax.lax.scan(
      step, model.initial_state((config.batch_size,)), batch["inputs"]
    )
    return model.readout(h)

  def loss_fn(params, batch):
    model = eqx.combine(params, static)
    return losses.mse(final_output(model, batch), batch["target"])

  def metrics(params, batch):
    y = final_output(eqx.combine(params, static), batch)
    mse = _base.mean_sq_error(y, batch["target"])
    return {
      "mse": mse,
      "normalised_mse": mse / TARGET_VARIANCE,
      "accuracy": jnp.mean(jnp.abs(y - batch["target"]) < config.tolerance),
    }

  def outputs(params, batch):
    ys, _ = eqx.combine(params, static).run(batch["inputs"])
    return {"outputs": ys, "target": batch["target"], "inputs": batch["inputs"]}

  return _base.Task(
    name=NAME,
    config=config,
    init_params=init_params,
    sample_batch=sample_batch,
    loss_fn=loss_fn,
    metrics=metrics,
    outputs=outputs,
  )
