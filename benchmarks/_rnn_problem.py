"""The vanilla RNN regression problem timed by ``step_cost.py`` and ``distributed.py``.

A leaky ``tanh`` network, :math:`h_{t+1} = 0.8\\,h_t + 0.2\\tanh(h_t W_{rec} +
x_t W_{in} + b)`, read out linearly and fitted to random targets with the
squared error summed inside the user's own ``lax.scan``: the shape of a
neuroscience training loop, with nothing task-specific to get in the way of
the timing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sofo_jax import losses


def make(n_hidden, batch, horizon, n_in=3, n_out=3, seed=0):
  """Returns ``(params, xs, ys)``; ``xs`` and ``ys`` are time-major."""
  keys = jax.random.split(jax.random.key(seed), 5)
  params = {
    "w_rec": 0.9
    * jax.random.normal(keys[0], (n_hidden, n_hidden))
    / jnp.sqrt(n_hidden),
    "w_in": jax.random.normal(keys[1], (n_in, n_hidden)) / jnp.sqrt(n_in),
    "w_out": jax.random.normal(keys[2], (n_hidden, n_out)) / jnp.sqrt(n_hidden),
    "b": jnp.zeros(n_hidden),
  }
  xs = jax.random.normal(keys[3], (horizon, batch, n_in))
  ys = jax.random.normal(keys[4], (horizon, batch, n_out))
  return params, xs, ys


def _cell(p, h, x_t):
  return 0.8 * h + 0.2 * jnp.tanh(h @ p["w_rec"] + x_t @ p["w_in"] + p["b"])


def _initial_state(p, xs):
  return jnp.zeros((xs.shape[1], p["w_rec"].shape[0]), xs.dtype)


def loss_fn(p, xs, ys, scan=jax.lax.scan):
  """Mean over time of the batch-mean squared error, summed in the scan.

  ``scan`` runs the time loop; it has ``jax.lax.scan``'s signature, so a
  checkpointed scan (``gpu.checkpointed_scan``) gives the remat variant.
  """

  def step(carry, inputs):
    h, total = carry
    x_t, y_t = inputs
    h = _cell(p, h, x_t)
    return (h, total + losses.mse(h @ p["w_out"], y_t)), None

  (_, total), _ = scan(step, (_initial_state(p, xs), losses.zero()), (xs, ys))
  return total / xs.shape[0]


def final_loss_fn(p, xs, ys):
  """Squared error of the last time step only (sparse supervision)."""

  def step(h, x_t):
    return _cell(p, h, x_t), None

  h, _ = jax.lax.scan(step, _initial_state(p, xs), xs)
  return losses.mse(h @ p["w_out"], ys[-1])
