"""SOFO under a mesh with Explicit axes, JAX's default for ``jax.make_mesh``.

Under Explicit axes every array's type carries its sharding, and reshapes or
concatenations whose output sharding JAX cannot infer are errors at trace
time. SOFO flattens parameter leaves into one tangent matrix and the loss
outputs into curvature rows; these tests run two steps (the second uses the
momentum tangent) on two CPU devices, data-parallel and model-parallel, with
the defaults, the paper's step, the tangent options and forward gradients,
and compare them with the same steps without a mesh.
"""

import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from commands import cpu_devices_env, run_ok
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import sofo_jax
from sofo_jax import losses

pytestmark = pytest.mark.skipif(
  not hasattr(jax, "set_mesh"), reason="jax.set_mesh needs a newer JAX"
)


def _problem():
  rng = np.random.default_rng(0)
  params = {
    "w": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=6), jnp.float32),
  }
  x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
  return params, x, y


# The defaults, the paper's step, and the options that touch the tangents.
OPTIMIZERS = {
  "defaults": lambda: sofo_jax.sofo(1.0, 4, key=jax.random.key(0)),
  "paper": lambda: sofo_jax.sofo(0.5, 4, key=jax.random.key(0), adaptive=False),
  "orthonormal, recycled": lambda: sofo_jax.sofo(
    1.0,
    4,
    key=jax.random.key(0),
    tangent_distribution="orthonormal",
    num_recycled=1,
    mask={"w": np.arange(24).reshape(4, 6) % 3 > 0, "b": True},
  ),
  "forward gradient": lambda: sofo_jax.forward_gradient(0.1, 4, key=jax.random.key(0)),
}


def _dense_loss(params, x, y):
  # tanh: a nonlinear model, so that the Gauss–Newton matrix depends on w.
  return losses.mse(jnp.tanh(x @ params["w"] + params["b"]), y)


def _two_steps(opt, params, x, y, loss=_dense_loss):
  """Parameters, updates and state after two jitted steps of ``opt``."""
  loss_fn = lambda p: loss(p, x, y)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(None, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), updates, state

  state = opt.init(params)
  params, _, state = step(params, state)
  params, updates, state = step(params, state)
  return params, updates, state


def _check_explicit_mesh():
  assert len(jax.devices()) >= 2
  params, x, y = _problem()
  mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Explicit,))
  layouts = {
    # Data-parallel: the batch split over the devices, the params replicated.
    "data": ({"w": P(), "b": P()}, P("data", None)),
    # Model-parallel: the weight's columns split, the inputs replicated.
    "model": ({"w": P(None, "data"), "b": P("data")}, P()),
  }
  for (name, (param_specs, x_spec)), (label, make) in itertools.product(
    layouts.items(), OPTIMIZERS.items()
  ):
    expected = _two_steps(make(), params, x, y)
    assert bool(jnp.any(expected[1]["w"] != 0)), label
    with jax.set_mesh(mesh):
      sharded = {
        k: jax.device_put(v, NamedSharding(mesh, param_specs[k]))
        for k, v in params.items()
      }
      y_spec = P("data", None) if name == "data" else P(None, "data")
      got = _two_steps(
        make(),
        sharded,
        jax.device_put(x, NamedSharding(mesh, x_spec)),
        jax.device_put(y, NamedSharding(mesh, y_spec)),
      )
    for key, leaf in got[0].items():
      want_sharding = NamedSharding(mesh, param_specs[key])
      assert leaf.sharding.is_equivalent_to(want_sharding, leaf.ndim), (name, label)
    for want, have in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
      np.testing.assert_allclose(
        np.asarray(have, np.float64),
        np.asarray(want, np.float64),
        rtol=2e-4,
        atol=1e-6,
        err_msg=f"{name}-parallel, {label}",
      )


def _rnn_loss(params, xs, ys):
  """A loss summed inside a ``lax.scan`` over time, as in docs/distributed.md."""

  def step(carry, inputs):
    h, total = carry
    x_t, y_t = inputs
    h = jnp.tanh(h @ params["w_rec"] + x_t @ params["w_in"])
    return (h, total + losses.mse(h @ params["w_out"], y_t)), None

  # Zeros carrying the batch's sharding: under Explicit axes the scan's carry
  # must keep one type.
  h0 = 0.0 * (xs[0] @ params["w_in"])
  (_, total), _ = jax.lax.scan(step, (h0, losses.zero()), (xs, ys))
  return total / xs.shape[0]


def _check_scan_loss_under_an_explicit_mesh():
  rng = np.random.default_rng(1)
  shapes = {"w_rec": (6, 6), "w_in": (3, 6), "w_out": (6, 2)}
  params = {
    k: jnp.asarray(rng.normal(size=s) / 3, jnp.float32) for k, s in shapes.items()
  }
  xs = jnp.asarray(rng.normal(size=(5, 8, 3)), jnp.float32)  # (T, batch, features)
  ys = jnp.asarray(rng.normal(size=(5, 8, 2)), jnp.float32)
  opt = lambda: sofo_jax.sofo(1.0, 4, key=jax.random.key(1))

  def two_steps(xs, ys):
    return _two_steps(opt(), params, xs, ys, loss=_rnn_loss)

  expected = two_steps(xs, ys)
  mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    batch = NamedSharding(mesh, P(None, "data"))
    got = two_steps(jax.device_put(xs, batch), jax.device_put(ys, batch))
  for want, have in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(
      np.asarray(have, np.float64), np.asarray(want, np.float64), rtol=2e-4, atol=1e-6
    )


def test_sofo_steps_under_an_explicit_mesh_match_the_unsharded_steps():
  if len(jax.devices()) >= 2:
    _check_explicit_mesh()
    _check_scan_loss_under_an_explicit_mesh()
    return
  tests = os.path.dirname(os.path.abspath(__file__))
  code = (
    "import test_explicit_sharding as t; t._check_explicit_mesh(); "
    "t._check_scan_loss_under_an_explicit_mesh()"
  )
  run_ok([sys.executable, "-c", code], timeout=600, cwd=tests, env=cpu_devices_env(2))
