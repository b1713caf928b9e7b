"""Tiny models shared by the tests (plain dict parameters): an MLP, the tasks' RNN."""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import sofo_jax
from sofo_jax.tasks import LeakyRNN


def mlp_params(rng, sizes, dtype=np.float64):
  """Parameters from a numpy Generator (test data needs no JAX compiles)."""
  return [
    {
      "w": (rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(dtype),
      "b": (0.1 * rng.normal(size=(n_out,))).astype(dtype),
    }
    for n_in, n_out in itertools.pairwise(sizes)
  ]


def mlp(params, x):
  for layer in params[:-1]:
    x = jnp.tanh(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


RNN_FIELDS = ("w_rec", "w_in", "bias", "w_out", "b_out")


def rnn_params(rng, n_in, n_hidden, n_out, dtype=np.float64, gain=0.9):
  """Weights of a tanh :class:`~sofo_jax.tasks.LeakyRNN` (leak 1/2), by name.

  The model is the tasks' own; only its weights are made here, by numpy, for
  the dense references: test data needs no compile, and float64 weights stay
  float64 whether or not x64 is on when they are made. They follow the
  model's initialisation, except that the two biases are drawn non-zero so
  that no derivative is special.
  """
  shapes = {
    "w_rec": ((n_hidden, n_hidden), gain / np.sqrt(n_hidden)),
    "w_in": ((n_hidden, n_in), 1 / np.sqrt(n_in)),
    "bias": ((n_hidden,), 0.1),
    "w_out": ((n_out, n_hidden), 1 / np.sqrt(n_hidden)),
    "b_out": ((n_out,), 0.1),
  }
  return {
    name: (scale * rng.normal(size=shape)).astype(dtype)
    for name, (shape, scale) in shapes.items()
  }


def rnn(params):
  """The LeakyRNN whose weights are ``params``.

  The tests keep the weights in a dict, so that masks are plain dicts too: a
  mask shaped like the model would itself be callable (an ``eqx.Module``),
  and ``mask=`` takes a callable as a function that builds the mask.
  """
  n_out, n_hidden = params["w_out"].shape
  # Shapes only: the model's own draw is traced, never run.
  skeleton = eqx.filter_eval_shape(
    lambda: LeakyRNN(
      params["w_in"].shape[1],
      n_hidden,
      n_out,
      leak=0.5,
      activation="tanh",
      key=jax.random.key(0),
    )
  )
  return eqx.tree_at(
    lambda m: tuple(getattr(m, n) for n in RNN_FIELDS),
    skeleton,
    tuple(params[n] for n in RNN_FIELDS),
  )


def rnn_outputs(params, xs):
  """All outputs at once, stacked over time: shape (T, B, n_out)."""
  model = rnn(params)

  def step(h, x_t):
    h = model(h, x_t)
    return h, model.readout(h)

  return jax.lax.scan(step, model.initial_state(xs.shape[1:2]), xs)[1]


def rnn_scan_loss(params, xs, targets, loss=sofo_jax.losses.mse):
  """The way a user writes it: per-step losses summed inside their own scan."""
  model = rnn(params)

  def step(carry, inputs):
    h, total = carry
    x_t, target_t = inputs
    h = model(h, x_t)
    return (h, total + loss(model.readout(h), target_t)), None

  carry = (model.initial_state(xs.shape[1:2]), sofo_jax.losses.zero(xs.dtype))
  (_, total), _ = jax.lax.scan(step, carry, (xs, targets))
  return total / xs.shape[0]
