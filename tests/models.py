"""Tiny models shared by the tests (plain dict parameters)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

import sofo_jax


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


def rnn_params(rng, n_in, n_hidden, n_out, dtype=np.float64, gain=0.9):
  return {
    "w_rec": (gain * rng.normal(size=(n_hidden, n_hidden)) / np.sqrt(n_hidden)).astype(
      dtype
    ),
    "w_in": (rng.normal(size=(n_in, n_hidden)) / np.sqrt(n_in)).astype(dtype),
    "w_out": (rng.normal(size=(n_hidden, n_out)) / np.sqrt(n_hidden)).astype(dtype),
    "b": (0.1 * rng.normal(size=(n_hidden,))).astype(dtype),
  }


def _rnn_cell(params, h, x_t, leak=0.5):
  pre = h @ params["w_rec"] + x_t @ params["w_in"] + params["b"]
  return (1 - leak) * h + leak * jnp.tanh(pre)


def rnn_outputs(params, xs):
  """All outputs at once, stacked over time: shape (T, B, n_out)."""
  h0 = jnp.zeros((xs.shape[1], params["w_rec"].shape[0]), xs.dtype)

  def step(h, x_t):
    h = _rnn_cell(params, h, x_t)
    return h, h @ params["w_out"]

  return jax.lax.scan(step, h0, xs)[1]


def rnn_scan_loss(params, xs, targets, loss=sofo_jax.losses.mse):
  """The way a user writes it: per-step losses summed inside their own scan."""
  h0 = jnp.zeros((xs.shape[1], params["w_rec"].shape[0]), xs.dtype)

  def step(carry, inputs):
    h, total = carry
    x_t, target_t = inputs
    h = _rnn_cell(params, h, x_t)
    return (h, total + loss(h @ params["w_out"], target_t)), None

  (_, total), _ = jax.lax.scan(
    step, (h0, sofo_jax.losses.zero(xs.dtype)), (xs, targets)
  )
  return total / xs.shape[0]
