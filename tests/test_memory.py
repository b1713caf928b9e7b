"""Memory of one SOFO step is constant in the horizon T; BPTT's grows.

Measured on the compiled program (``memory_analysis().temp_size_in_bytes``),
which is deterministic and needs no device.
"""

import jax
import jax.numpy as jnp
import models
import numpy as np
import optax

import sofo_jax

N_IN, N_HIDDEN, N_OUT, BATCH, K = 2, 32, 2, 8, 8


def _inputs(horizon):
  xs = jax.ShapeDtypeStruct((horizon, BATCH, N_IN), jnp.float32)
  ys = jax.ShapeDtypeStruct((horizon, BATCH, N_OUT), jnp.float32)
  return xs, ys


def _params():
  rng = np.random.default_rng(0)
  return jax.tree.map(
    jnp.asarray, models.rnn_params(rng, N_IN, N_HIDDEN, N_OUT, np.float32)
  )


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def sofo_step_memory(horizon):
  opt = sofo_jax.sofo(1.0, K, 1e-4, key=jax.random.key(0))
  params = _params()
  state = opt.init(params)

  def step(params, state, xs, ys):
    updates, state = opt.update(
      None, state, params, loss_fn=lambda p: models.rnn_scan_loss(p, xs, ys)
    )
    return optax.apply_updates(params, updates), state

  return _temp_bytes(step, params, state, *_inputs(horizon))


def bptt_step_memory(horizon):
  opt = optax.adam(1e-3)
  params = _params()
  state = opt.init(params)

  def step(params, state, xs, ys):
    grads = jax.grad(lambda p: models.rnn_scan_loss(p, xs, ys).value)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return _temp_bytes(step, params, state, *_inputs(horizon))


def test_sofo_memory_flat_in_horizon_while_bptt_grows():
  sofo_short, sofo_long = sofo_step_memory(100), sofo_step_memory(2000)
  bptt_short, bptt_long = bptt_step_memory(100), bptt_step_memory(2000)
  print(f"SOFO temp bytes T=100: {sofo_short}, T=2000: {sofo_long}")
  print(f"BPTT temp bytes T=100: {bptt_short}, T=2000: {bptt_long}")
  assert sofo_long <= 1.1 * sofo_short
  assert bptt_long >= 10 * bptt_short
