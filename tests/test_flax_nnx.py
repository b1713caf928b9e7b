"""SOFO with Flax NNX models: ``nnx.Optimizer`` and the split/merge pattern.

The loss closure SOFO calls receives the parameters as a pure ``nnx.State``
(arrays, not ``nnx.Variable``s), so it rebuilds the model with
``nnx.merge(graphdef, params, rest)``. ``nnx.Optimizer.update`` forwards its
keyword arguments to the optax update, which is how ``loss_fn`` reaches SOFO.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sofo_jax
from sofo_jax import losses

nnx = pytest.importorskip("flax.nnx")


class MLP(nnx.Module):
  """A tiny MLP with a non-parameter variable (a call counter) to keep apart."""

  def __init__(self, rngs):
    self.hidden = nnx.Linear(3, 16, rngs=rngs)
    self.out = nnx.Linear(16, 2, rngs=rngs)
    self.calls = nnx.Variable(jnp.array(0))

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


class RNN(nnx.Module):
  """A leaky tanh RNN, unrolled with ``lax.scan`` inside the module."""

  def __init__(self, rngs, num_in=2, num_hidden=8, num_out=1):
    self.w_in = nnx.Linear(num_in, num_hidden, rngs=rngs)
    self.w_rec = nnx.Linear(
      num_hidden,
      num_hidden,
      use_bias=False,
      rngs=rngs,
      kernel_init=nnx.initializers.orthogonal(0.9),
    )
    self.readout = nnx.Linear(num_hidden, num_out, rngs=rngs)
    self.num_hidden = num_hidden

  def loss(self, xs, targets):
    def step(carry, inputs):
      h, total = carry
      x, target = inputs
      h = 0.8 * h + 0.2 * jnp.tanh(self.w_rec(h) + self.w_in(x))
      return (h, total + losses.mse(self.readout(h), target)), None

    h0 = jnp.zeros((xs.shape[1], self.num_hidden))
    (_, total), _ = jax.lax.scan(step, (h0, losses.zero()), (xs, targets))
    return total / xs.shape[0]


def _regression_data():
  x = jax.random.normal(jax.random.key(1), (64, 3))
  return x, jnp.stack([jnp.sin(x[:, 0]), x[:, 1] * x[:, 2]], -1)


def _param_arrays(model):
  return [np.array(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_nnx_optimizer_trains_an_mlp():
  x, y = _regression_data()
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(
    model, sofo_jax.sofo(1.0, 16, key=jax.random.key(0)), wrt=nnx.Param
  )
  before = _param_arrays(model)

  @nnx.jit
  def train_step(model, optimizer):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):  # params: a pure nnx.State of the nnx.Param arrays
      return losses.mse(nnx.merge(graphdef, params, rest)(x), y)

    # SOFO computes its own direction: pass None where gradients would go.
    optimizer.update(model, None, loss_fn=loss_fn)

  start = float(losses.mse(model(x), y).value)
  for _ in range(8):
    train_step(model, optimizer)
  assert float(losses.mse(model(x), y).value) < 0.5 * start
  after = _param_arrays(model)
  assert all(np.any(a != b) for a, b in zip(after, before))
  assert int(optimizer.step[...]) == 8
  diagnostics = sofo_jax.get_diagnostics(optimizer.opt_state)
  assert int(diagnostics.num_nonfinite_steps) == 0
  assert int(model.calls[...]) == 0  # other variables are left alone


def test_split_merge_with_a_plain_optax_loop_trains_an_rnn():
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(10, 8, 2)).astype(np.float32)
  targets = np.tanh(np.cumsum(xs[..., :1], 0) / 3).astype(np.float32)
  model = RNN(nnx.Rngs(0))
  before = {
    "bias": np.array(model.w_in.bias[...]),
    "kernel": np.array(model.w_rec.kernel[...]),
  }
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # Freeze the biases (a mask over the State, like any pytree of params).
  mask = lambda p: jax.tree.map(lambda leaf: leaf.ndim == 2, p)
  opt = sofo_jax.sofo(1.0, 16, key=jax.random.key(0), mask=mask)
  state = opt.init(params)

  def loss_fn(p):
    return nnx.merge(graphdef, p, rest).loss(xs, targets)

  @jax.jit
  def step(p, s):
    updates, s = opt.update(None, s, p, loss_fn=loss_fn)
    return optax.apply_updates(p, updates), s

  start = float(loss_fn(params).value)
  trained = params
  for _ in range(10):
    trained, state = step(trained, state)
  assert float(loss_fn(trained).value) < 0.7 * start
  nnx.update(model, trained)  # write the trained arrays back into the module
  assert float(model.loss(xs, targets).value) == pytest.approx(
    float(loss_fn(trained).value)
  )
  np.testing.assert_array_equal(model.w_in.bias[...], before["bias"])  # masked out
  assert np.all(np.asarray(model.w_rec.kernel[...]) != before["kernel"])
