"""Data- and tangent-parallel SOFO: time and communication per step vs devices.

For a vanilla RNN (N = 128, B = 64, T = 100, K = 32 by default; a loss at
every time step inside the user's ``lax.scan``) and D in {1, 2, 4, 8} devices,
times one jitted training step, side by side:

- ``sofo_data``: ``jax.shard_map`` over a ``"data"`` axis, batch split D ways,
  ``sofo(..., data_axis_name="data")``;
- ``sofo_tangent``: ``jax.shard_map`` over a ``"tangent"`` axis, K tangents
  split D ways, ``sofo(..., tangent_axis_name="tangent")``;
- ``sofo_gspmd``: plain ``jax.jit`` with the batch sharded by a
  ``NamedSharding`` (XLA's partitioner places the reductions itself);
- ``sgd_data``: data-parallel SGD with a backpropagated gradient and a
  ``pmean`` of it, the usual baseline (all-reduces all P gradient entries);
- ``sofo_tangent_final``: tangent-parallel with sparse supervision (a loss on
  the last time step only, as in the Lorenz task), where the per-step
  exchange of output tangents happens once instead of T times.

Communication is read from the compiled HLO: the number of elements in the
results of all collectives, times how often each runs per step (collectives
inside the scan run T times).

The devices are forced host (CPU) devices
(``--xla_force_host_platform_device_count=8``, set by this script): they share
the machine's cores, so no speed-up is expected here; the timings show the
overhead of the parallel programs, and the communication volumes are what a
real multi-accelerator run would move.

Writes ``benchmarks/results/distributed.json`` and prints a table.

Usage: ``python benchmarks/distributed.py [--quick] [--repeats R]``
(``SOFO_QUICK=1`` is the same as ``--quick``).
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness
import _hlo as hlo
import _rnn_problem

import sofo_jax


def sofo_step(loss_fn, num_tangents, **axis_names):
  opt = sofo_jax.sofo(0.5, num_tangents, 1e-3, key=jax.random.key(1), **axis_names)

  def step(params, state, xs, ys):
    updates, state = opt.update(
      None, state, params, loss_fn=lambda p: loss_fn(p, xs, ys)
    )
    return optax.apply_updates(params, updates), state

  return opt, step


def sgd_step(loss_fn):
  opt = optax.sgd(1e-2)

  def step(params, state, xs, ys):
    grads = jax.grad(lambda p: loss_fn(p, xs, ys).value)(params)
    grads = jax.lax.pmean(grads, "data")
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return opt, step


def analytic(mode, k, devices, horizon, outputs_per_step, num_params):
  """Elements in collective results per step, from the formulas in the docs.

  On one device the shard_map programs keep their (no-op) collectives; plain
  jit has none.
  """
  if mode == "sofo_data":
    return 1 + k + k * k
  if mode == "sofo_gspmd":
    return 0 if devices == 1 else horizon * (1 + k + k * k)  # reduced in the scan
  if mode == "sofo_tangent":
    return horizon * k * outputs_per_step + k * (k + 1)
  if mode == "sofo_tangent_final":
    return k * outputs_per_step + k * (k + 1)
  return num_params


def run(n_hidden, batch, horizon, k, device_counts, repeats):
  params, xs, ys = _rnn_problem.make(n_hidden, batch, horizon)
  loss_fn, final_loss_fn = _rnn_problem.loss_fn, _rnn_problem.final_loss_fn
  num_params = sum(x.size for x in jax.tree.leaves(params))
  outputs_per_step = batch * ys.shape[-1]
  rows = []

  references = {}
  for name, fn in (("sofo_single", loss_fn), ("sofo_single_final", final_loss_fn)):
    single_opt, single = sofo_step(fn, k)
    single_state = single_opt.init(params)
    compiled = jax.jit(single).lower(params, single_state, xs, ys).compile()
    references[name] = compiled(params, single_state, xs, ys)[0]
    timing = _harness.time_call(lambda: compiled(params, single_state, xs, ys), repeats)
    rows.append(
      dict(
        devices=1,
        mode=name,
        **_ms(timing),
        collectives=0,
        elements_per_step=0,
        analytic_elements=0,
        bytes_per_step=0,
        max_update_diff=0.0,
      )
    )

  for devices in device_counts:
    for mode in (
      "sofo_data",
      "sofo_tangent",
      "sofo_gspmd",
      "sgd_data",
      "sofo_tangent_final",
    ):
      axis = "tangent" if mode.startswith("sofo_tangent") else "data"
      mesh_devices = np.array(jax.devices()[:devices])
      if mode == "sofo_gspmd":
        mesh = jax.sharding.Mesh(mesh_devices, (axis,), axis_types=(AxisType.Auto,))
      else:
        mesh = jax.sharding.Mesh(mesh_devices, (axis,), axis_types=(AxisType.Explicit,))
      batch_spec = P(None, "data") if axis == "data" else P()
      if mode == "sgd_data":
        opt, step = sgd_step(loss_fn)
      elif mode == "sofo_data":
        opt, step = sofo_step(loss_fn, k, data_axis_name="data")
      elif mode == "sofo_tangent":
        opt, step = sofo_step(loss_fn, k, tangent_axis_name="tangent")
      elif mode == "sofo_tangent_final":
        opt, step = sofo_step(final_loss_fn, k, tangent_axis_name="tangent")
      else:
        opt, step = sofo_step(loss_fn, k)
      if mode != "sofo_gspmd":
        step = jax.shard_map(
          step,
          mesh=mesh,
          in_specs=(P(), P(), batch_spec, batch_spec),
          out_specs=P(),
          check_vma=False,
        )
      state = opt.init(params)
      sharding = NamedSharding(mesh, batch_spec)
      replicated = NamedSharding(mesh, P())
      args = (
        jax.device_put(params, replicated),
        jax.device_put(state, replicated),
        jax.device_put(xs, sharding),
        jax.device_put(ys, sharding),
      )
      compiled = jax.jit(step).lower(*args).compile()
      found = hlo.collectives(compiled.as_text())
      new_params = compiled(*args)[0]
      diff = 0.0
      if mode != "sgd_data":
        reference = references[
          "sofo_single_final" if mode.endswith("final") else "sofo_single"
        ]
        diff = max(
          float(jnp.max(jnp.abs(a - b)))
          for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(new_params))
        )
      timing = _harness.time_call(lambda: compiled(*args), repeats)
      elements = hlo.total_elements(found)
      rows.append(
        dict(
          devices=devices,
          mode=mode,
          **_ms(timing),
          collectives=len(found),
          elements_per_step=elements,
          analytic_elements=analytic(
            mode, k, devices, horizon, outputs_per_step, num_params
          ),
          bytes_per_step=sum(c.bytes * (c.count or 0) for c in found),
          max_update_diff=diff,
        )
      )
      print(
        f"D={devices} {mode}: {rows[-1]['median_ms']:.2f} ms, {elements} elements/step",
        flush=True,
      )
  return rows, num_params, outputs_per_step


def _ms(timing):
  return {
    "min_ms": 1e3 * timing["min_s"],
    "median_ms": 1e3 * timing["median_s"],
    "repeats": timing["repeats"],
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--repeats", type=int, default=None)
  args = parser.parse_args()
  quick = _harness.quick_mode(args.quick)
  if quick:
    config = dict(n_hidden=32, batch=32, horizon=20, k=16)
  else:
    config = dict(n_hidden=128, batch=64, horizon=100, k=32)
  repeats = args.repeats or (5 if quick else 20)
  device_counts = [d for d in (1, 2, 4, 8) if d <= jax.device_count()]
  rows, num_params, outputs_per_step = run(
    **config, device_counts=device_counts, repeats=repeats
  )
  columns = [
    "devices",
    "mode",
    "min_ms",
    "median_ms",
    "collectives",
    "elements_per_step",
    "analytic_elements",
    "bytes_per_step",
    "max_update_diff",
  ]
  print()
  print(
    f"RNN N={config['n_hidden']} B={config['batch']} T={config['horizon']} "
    f"K={config['k']}: P={num_params} parameters, "
    f"{outputs_per_step} outputs per loss step"
  )
  print(_harness.markdown_table(columns, rows))
  path = _harness.write_json(
    "distributed_quick.json" if quick else "distributed.json",
    {
      "benchmark": "distributed",
      "quick": quick,
      "config": {
        **config,
        "num_params": num_params,
        "outputs_per_step": outputs_per_step,
        "device_counts": device_counts,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jaxlib": jaxlib.__version__,
        "load_average_at_end": os.getloadavg(),
        "note": "forced host devices sharing the CPU cores: no "
        "speed-up is expected; elements_per_step counts the "
        "elements in the results of all collectives per step",
      },
      "rows": rows,
    },
  )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
