"""The vanilla RNN problem of the timing benchmarks and of ``long_run.py``.

Timed by ``step_cost.py``, ``distributed.py`` and ``gpu.py``: the tasks' leaky ``tanh`` network (:class:`sofo_jax.tasks.LeakyRNN`, leak
0.2 by default: :math:`h_{t+1} = 0.8\\,h_t + 0.2\\tanh(W h_t + U x_t + b)`),
read out linearly and fitted to random targets with the squared error summed
inside the user's own ``lax.scan``: the shape of a neuroscience training
loop, with nothing task-specific to get in the way of the timing.
"""

from __future__ import annotations

import jax

from sofo_jax import losses
from sofo_jax.tasks import LeakyRNN


def model(key, n_in, n_hidden, n_out, leak=0.2) -> LeakyRNN:
  """A ``tanh`` :class:`~sofo_jax.tasks.LeakyRNN`: the parameters."""
  return LeakyRNN(n_in, n_hidden, n_out, leak=leak, activation="tanh", key=key)


def make(n_hidden, batch, horizon, n_in=3, n_out=3, seed=0):
  """Returns ``(params, xs, ys)``; ``xs`` and ``ys`` are time-major."""
  k_model, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
  params = model(k_model, n_in, n_hidden, n_out)
  xs = jax.random.normal(k_x, (horizon, batch, n_in))
  ys = jax.random.normal(k_y, (horizon, batch, n_out))
  return params, xs, ys


def loss_fn(p, xs, ys, scan=jax.lax.scan):
  """Mean over time of the batch-mean squared error, summed in the scan.

  ``scan`` runs the time loop; it has ``jax.lax.scan``'s signature, so a
  checkpointed scan (``remat_baseline.checkpointed_scan``) gives the remat variant.
  """

  def step(carry, inputs):
    h, total = carry
    x_t, y_t = inputs
    h = p(h, x_t)
    return (h, total + losses.mse(p.readout(h), y_t)), None

  initial = (p.initial_state(xs.shape[1:2]), losses.zero())
  (_, total), _ = scan(step, initial, (xs, ys))
  return total / xs.shape[0]


def final_loss_fn(p, xs, ys):
  """Squared error of the last time step only (sparse supervision)."""

  def step(h, x_t):
    return p(h, x_t), None

  h, _ = jax.lax.scan(step, p.initial_state(xs.shape[1:2]), xs)
  return losses.mse(p.readout(h), ys[-1])
