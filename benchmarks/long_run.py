"""Long-run stability: 10^4 SOFO steps on a small vanilla RNN.

The task is a delayed copy: a vanilla RNN (tanh, N = 16 units, one input,
one output) sees white noise ``x_t`` and must output ``x_{t-3}``; T = 20 steps,
a fresh batch of 32 sequences at every step, squared error summed over time
inside the user's own ``lax.scan``. The steps run inside ``lax.scan`` in
chunks of 250 (one compiled program), so progress is printed between chunks
without leaving the device.

After every chunk the script checks that every parameter is finite and that
every loss is finite, except on steps SOFO reports as skipped
(``step_is_finite`` False: a zero step was taken). It records the loss
curve (chunk means), the number of skipped steps, the largest parameter
magnitude, the final curvature spectrum and the wall time, and, for
reference, the same run with Adam on backpropagated gradients.

Writes ``benchmarks/results/long_run.json`` (``long_run_quick.json`` with
``--quick``) and exits with status 1 if any parameter became non-finite.

Usage: ``python benchmarks/long_run.py [--quick] [--steps S]``
(``--quick`` or ``SOFO_QUICK=1``: 200 steps).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # pylint: disable=g-import-not-at-top,wrong-import-position
import _rnn_problem  # pylint: disable=g-import-not-at-top,wrong-import-position

import sofo_jax  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIG = {
  "n_hidden": 16,
  "horizon": 20,
  "delay": 3,
  "batch": 32,
  "num_tangents": 32,
  "learning_rate": 0.5,
  "damping": 1e-3,
  "adam_learning_rate": 3e-3,
  "chunk": 250,
  "seed": 0,
}


def init_params(key, n_hidden):
  """A plain (leak 1) ``tanh`` RNN, one input and one output."""
  return _rnn_problem.model(key, 1, n_hidden, 1, leak=1.0)


def batch(key, config):
  """White-noise inputs and their delayed copy, time-major (T, B, 1)."""
  xs = jax.random.normal(key, (config["horizon"], config["batch"], 1))
  delay = config["delay"]
  ys = jnp.concatenate([jnp.zeros_like(xs[:delay]), xs[:-delay]], 0)
  return xs, ys


def all_finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree))


def make_chunk(update, config):
  """``chunk`` training steps in one ``lax.scan``; returns per-step records."""

  @jax.jit
  def run_chunk(params, state, data_key, first_step):
    def body(carry, step):
      params, state = carry
      xs, ys = batch(jax.random.fold_in(data_key, step), config)
      params, state, record = update(params, state, xs, ys)
      return (params, state), record

    steps = first_step + jnp.arange(config["chunk"])
    return jax.lax.scan(body, (params, state), steps)

  return run_chunk


def sofo_update(config):
  opt = sofo_jax.sofo(
    config["learning_rate"],
    config["num_tangents"],
    config["damping"],
    key=jax.random.key(config["seed"] + 1),
  )

  def update(params, state, xs, ys):
    updates, state = opt.update(
      None, state, params, loss_fn=lambda p: _rnn_problem.loss_fn(p, xs, ys)
    )
    diagnostics = sofo_jax.get_diagnostics(state)
    return (
      optax.apply_updates(params, updates),
      state,
      {
        "loss": diagnostics.loss,
        "finite": diagnostics.step_is_finite,
      },
    )

  return opt, update


def adam_update(config):
  opt = optax.adam(config["adam_learning_rate"])

  def update(params, state, xs, ys):
    value, grads = jax.value_and_grad(lambda p: _rnn_problem.loss_fn(p, xs, ys).value)(
      params
    )
    updates, state = opt.update(grads, state, params)
    return (
      optax.apply_updates(params, updates),
      state,
      {
        "loss": value,
        "finite": jnp.isfinite(value),
      },
    )

  return opt, update


def train(name, make, num_steps, config):
  opt, update = make(config)
  params = init_params(jax.random.key(config["seed"]), config["n_hidden"])
  state = opt.init(params)
  data_key = jax.random.key(config["seed"] + 2)
  run_chunk = make_chunk(update, config)

  start = time.perf_counter()
  compiled = run_chunk.lower(params, state, data_key, 0).compile()
  compile_s = time.perf_counter() - start

  chunk_means, skipped, nonfinite_params_at = [], 0, None
  start = time.perf_counter()
  for first in range(0, num_steps, config["chunk"]):
    (params, state), record = compiled(params, state, data_key, first)
    loss = np.asarray(record["loss"])
    finite = np.asarray(record["finite"])
    skipped += int(np.sum(~finite))
    if not all_finite(params) and nonfinite_params_at is None:
      nonfinite_params_at = first + config["chunk"]
    if not np.all(np.isfinite(loss[finite])):
      raise RuntimeError(f"{name}: a step reported finite has a non-finite loss")
    chunk_means.append(float(np.mean(loss[finite])) if finite.any() else float("nan"))
    done = first + config["chunk"]
    print(
      f"  {name:5s} step {done:6d}/{num_steps}  loss {chunk_means[-1]:.5f}  "
      f"skipped {skipped}  {time.perf_counter() - start:6.1f}s",
      flush=True,
    )
  wall_s = time.perf_counter() - start

  result = {
    "steps": num_steps,
    "wall_s": wall_s,
    "ms_per_step": 1e3 * wall_s / num_steps,
    "compile_s": compile_s,
    "first_chunk_loss": chunk_means[0],
    "final_chunk_loss": chunk_means[-1],
    "chunk_mean_losses": chunk_means,
    "skipped_steps": skipped,
    "params_finite": nonfinite_params_at is None,
    "nonfinite_params_after_step": nonfinite_params_at,
    "max_abs_param": float(max(jnp.max(jnp.abs(x)) for x in jax.tree.leaves(params))),
  }
  if name == "sofo":
    diagnostics = sofo_jax.get_diagnostics(state)
    result["num_nonfinite_steps_in_state"] = int(diagnostics.num_nonfinite_steps)
    result["step_count_in_state"] = int(sofo_jax.get_state(state).count)
    eigenvalues = np.asarray(diagnostics.eigenvalues)
    result["final_max_eigenvalue"] = float(eigenvalues[-1])
    result["final_min_eigenvalue"] = float(eigenvalues[0])
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="200 steps")
  parser.add_argument("--steps", type=int, default=None)
  args = parser.parse_args()
  quick = _harness.quick_mode(args.quick)
  config = dict(CONFIG)
  num_steps = args.steps or (200 if quick else 10_000)
  if quick:
    config["chunk"] = 50
  num_steps = config["chunk"] * math.ceil(num_steps / config["chunk"])
  params = init_params(jax.random.key(0), config["n_hidden"])
  num_params = sum(x.size for x in jax.tree.leaves(params))
  print(
    f"long run: {num_steps} steps, vanilla RNN N={config['n_hidden']}, "
    f"P={num_params}, K={config['num_tangents']}, T={config['horizon']}"
  )

  results = {}
  for name, make in (("sofo", sofo_update), ("adam", adam_update)):
    results[name] = train(name, make, num_steps, config)

  payload = {
    "config": {**config, "steps": num_steps, "num_params": num_params, "quick": quick},
    "versions": {
      "sofo_jax": sofo_jax.__version__,
      "jaxlib": jaxlib.__version__,
      "numpy": np.__version__,
    },
    "task": "delayed copy (y_t = x_{t-3}), white-noise inputs, fresh batch each step",
    "results": results,
    # Predicting x_{t-3} with nothing learned (output 0) costs 1 per step
    # except the first `delay` steps: a reference for the losses above.
    "zero_output_loss": (config["horizon"] - config["delay"]) / config["horizon"],
  }
  path = _harness.write_json(
    "long_run_quick.json" if quick else "long_run.json", payload
  )
  columns = [
    "method",
    "steps",
    "wall_s",
    "ms_per_step",
    "final_chunk_loss",
    "skipped_steps",
    "params_finite",
  ]
  rows = [{"method": name, **result} for name, result in results.items()]
  print(_harness.markdown_table(columns, rows))
  print(f"wrote {path}")
  if not all(r["params_finite"] for r in results.values()):
    sys.exit(1)


if __name__ == "__main__":
  main()
