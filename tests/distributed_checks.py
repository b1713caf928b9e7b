"""Distributed SOFO checks, run in a subprocess by ``test_distributed.py``.

JAX fixes the number of (forced) CPU devices when its backend starts, so these
checks run in their own process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. They print one JSON
object: for each model and parallel mode, the largest deviation of two
updates from the single-device updates, the collectives of the compiled step,
and the sizes they are compared against.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import sofo_jax

sys.path.insert(0, os.path.dirname(__file__))
# The HLO-text reader is a benchmark helper, shared with the distributed
# benchmark rather than shipped in the package.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import _hlo as hlo
import models

K = 8
BATCH = 16
T = 5


def problem(model, rng, steps=T):
  if model == "mlp":
    params = models.mlp_params(rng, [3, 64, 2])
    xs = rng.normal(size=(BATCH, 3))
    ys = rng.normal(size=(BATCH, 2))
    loss = lambda p, x, y: sofo_jax.losses.mse(models.mlp(p, x), y)
    return params, xs, ys, loss, P("data"), BATCH * 2
  params = models.rnn_params(rng, 2, 20, 2)
  xs = rng.normal(size=(steps, BATCH, 2))
  ys = rng.normal(size=(steps, BATCH, 2))
  loss = lambda p, x, y: models.rnn_scan_loss(p, x, y)
  return params, xs, ys, loss, P(None, "data"), BATCH * 2


def make_step(loss, **axis_names):
  opt = sofo_jax.sofo(0.5, K, 1e-3, key=jax.random.key(0), **axis_names)

  def step(params, state, xs, ys):
    updates, state = opt.update(None, state, params, loss_fn=lambda p: loss(p, xs, ys))
    return jax.tree.map(jnp.add, params, updates), state

  return opt, step


def run_two_steps(fn, params, state, xs, ys):
  outs = []
  for _ in range(2):
    params, state = fn(params, state, xs, ys)
    outs.append(params)
  return outs, state


def max_relative_error(reference, other):
  worst = 0.0
  for ref_params, params in zip(reference, other):
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
      worst = max(worst, float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30)))
  return worst


def summarise(found):
  return [dict(kind=c.kind, elements=c.elements, count=c.count) for c in found]


MODES = {
  # name: (mesh shape, mesh axes, SOFO axis-name arguments)
  "data": ((8,), ("data",), dict(data_axis_name="data")),
  "tangent": ((8,), ("tangent",), dict(tangent_axis_name="tangent")),
  "data_tangent": (
    (2, 4),
    ("data", "tangent"),
    dict(data_axis_name="data", tangent_axis_name="tangent"),
  ),
}


def shard_map_step(step, mesh, batch_spec):
  return jax.jit(
    jax.shard_map(
      step,
      mesh=mesh,
      in_specs=(P(), P(), batch_spec, batch_spec),
      out_specs=P(),
      check_vma=False,
    )
  )


def check_model(model):
  rng = np.random.default_rng(0)
  params, xs, ys, loss, batch_spec, outputs_per_loss = problem(model, rng)
  opt, step = make_step(loss)
  state = opt.init(params)
  reference, ref_state = run_two_steps(jax.jit(step), params, state, xs, ys)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  result = dict(
    num_params=num_params,
    K=K,
    T=T if model == "rnn" else 1,
    outputs_per_loss=outputs_per_loss,
    modes={},
  )

  for mode, (shape, axes, names) in MODES.items():
    mesh = jax.make_mesh(shape, axes, axis_types=(AxisType.Explicit,) * len(axes))
    spec = batch_spec if "data" in axes else P()
    _, dist_step = make_step(loss, **names)
    fn = shard_map_step(dist_step, mesh, spec)
    args = (
      params,
      state,
      jax.device_put(xs, NamedSharding(mesh, spec)),
      jax.device_put(ys, NamedSharding(mesh, spec)),
    )
    compiled = fn.lower(*args).compile()
    outs, dist_state = run_two_steps(compiled, *args)
    text = compiled.as_text()
    result["modes"][mode] = dict(
      shape=shape,
      error=max_relative_error(reference, outs),
      loss_error=abs(
        float(
          sofo_jax.get_diagnostics(dist_state).loss
          - sofo_jax.get_diagnostics(ref_state).loss
        )
      ),
      collectives=summarise(hlo.collectives(text)),
    )

  # Plain jit, batch-sharded input, XLA's own partitioner (GSPMD).
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  sharding = NamedSharding(mesh, batch_spec)
  args = (params, state, jax.device_put(xs, sharding), jax.device_put(ys, sharding))
  compiled = jax.jit(step).lower(*args).compile()
  outs, _ = run_two_steps(compiled, *args)
  text = compiled.as_text()
  result["modes"]["gspmd_jit"] = dict(
    shape=(8,),
    error=max_relative_error(reference, outs),
    collectives=summarise(hlo.collectives(text)),
  )
  return result


def temp_bytes_tangent_parallel(steps):
  """Compiled temporary memory of a tangent-parallel RNN step over T steps."""
  params, xs, ys, loss, _, _ = problem("rnn", np.random.default_rng(1), steps)
  opt, step = make_step(loss, tangent_axis_name="tangent")
  mesh = jax.make_mesh((4,), ("tangent",), axis_types=(AxisType.Explicit,))
  fn = shard_map_step(step, mesh, P())
  compiled = fn.lower(params, opt.init(params), xs, ys).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def error_messages():
  params, xs, ys, loss, batch_spec, _ = problem("mlp", np.random.default_rng(2))
  messages = {}
  cases = {
    # K = 8 tangents cannot be split over 3 devices.
    "indivisible": (((3,), ("tangent",)), dict(tangent_axis_name="tangent"), False),
    # JAX's varying-axes checker rejects collectives over vmap axes.
    "check_vma": (((8,), ("data",)), dict(data_axis_name="data"), True),
  }
  for name, ((shape, axes), names, check_vma) in cases.items():
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    mesh = jax.sharding.Mesh(devices, axes)
    opt, step = make_step(loss, **names)
    spec = batch_spec if "data" in axes else P()
    fn = jax.jit(
      jax.shard_map(
        step,
        mesh=mesh,
        in_specs=(P(), P(), spec, spec),
        out_specs=P(),
        check_vma=check_vma,
      )
    )
    sharding = NamedSharding(mesh, spec)
    try:
      fn.lower(
        params,
        opt.init(params),
        jax.device_put(xs, sharding),
        jax.device_put(ys, sharding),
      )
      messages[name] = None
    except ValueError as error:
      messages[name] = str(error)
  return messages


def sketch_error():
  """``sofo_jax.sketch`` on a 2 x 4 data x tangent mesh vs one device."""
  params, xs, ys, loss, batch_spec, _ = problem("rnn", np.random.default_rng(3))
  tangents = sofo_jax.sample_tangents(jax.random.key(4), params, K)
  reference = sofo_jax.sketch(lambda p: loss(p, xs, ys), params, tangents)
  mesh = jax.make_mesh((2, 4), ("data", "tangent"), axis_types=(AxisType.Explicit,) * 2)

  def sharded(params, tangents, xs, ys):
    return sofo_jax.sketch(
      lambda p: loss(p, xs, ys),
      params,
      tangents,
      data_axis_name="data",
      tangent_axis_name="tangent",
    )

  fn = jax.jit(
    jax.shard_map(
      sharded,
      mesh=mesh,
      out_specs=P(),
      check_vma=False,
      in_specs=(P(), P(), batch_spec, batch_spec),
    )
  )
  sharding = NamedSharding(mesh, batch_spec)
  result = fn(
    params, tangents, jax.device_put(xs, sharding), jax.device_put(ys, sharding)
  )
  return max(
    float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
    for a, b in zip(reference, result)
  )


def main(part):
  """Runs one part of the checks ("mlp" or "rnn"): the test runs both at once."""
  assert jax.device_count() == 8, jax.devices()
  result = dict(models={part: check_model(part)})
  if part == "rnn":
    result["sketch_error"] = sketch_error()
  if part == "mlp":  # balances the two processes
    result["temp_bytes"] = {str(t): temp_bytes_tangent_parallel(t) for t in (8, 64)}
    result["errors"] = error_messages()
  print(json.dumps(result))


if __name__ == "__main__":
  jax.config.update("jax_enable_x64", True)
  main(sys.argv[1])
