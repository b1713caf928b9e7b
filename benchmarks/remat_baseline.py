"""One training step against the horizon T: SOFO, BPTT and checkpointed BPTT.

On the kalman task's RNN (ReLU units, loss accumulated over time), for each
horizon T, three steps side by side:

- ``sofo``: ``sofo_jax.sofo(1.0, K)`` used as an optax transform (forward
  mode, memory independent of T);
- ``bptt``: Adam on ``jax.value_and_grad`` of the task's own loss (stores
  every step's activations, memory O(T));
- ``remat``: Adam on the gradient of the same loss computed with gradient
  checkpointing of the time loop, the baseline a user reaches for to save
  memory. Time is split into about sqrt(T) segments; an outer ``lax.scan``
  over segments runs a ``jax.checkpoint``-ed inner scan over a segment's
  steps, so only segment-boundary hidden states are stored and each segment
  is recomputed once in the backward pass (memory O(sqrt(T)), one extra
  forward pass).

For each step: the compiled temporary memory
(``compiled.memory_analysis().temp_size_in_bytes``, as in :mod:`_memory`) and
the median wall-clock time, the three timed round-robin
(:func:`_harness.time_interleaved`) after warm-up; ratios are to SOFO. Before
timing, the checkpointed loss and gradient are checked against the plain ones
at the smallest T.

Usage: ``python benchmarks/remat_baseline.py [--quick] [--num-tangents K]
[--repeats R] [--output PATH]``. Writes ``benchmarks/results/
remat_baseline.json`` (``--quick``: a file under the temporary directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # pylint: disable=g-import-not-at-top
import _suite  # pylint: disable=g-import-not-at-top

import sofo_jax  # pylint: disable=g-import-not-at-top
from sofo_jax import losses  # pylint: disable=g-import-not-at-top
from sofo_jax.tasks import kalman  # pylint: disable=g-import-not-at-top

METHODS = ("sofo", "bptt", "remat")
HORIZONS = {"quick": (50, 200), "full": (100, 300, 1000, 3000, 10_000)}
ADAM_LEARNING_RATE = 1e-3


def segment_length(horizon: int) -> int:
  """Steps per checkpointed segment: about sqrt(T), balancing the two costs.

  Stored boundary states grow as T / S and the recomputed segment's
  activations as S, so S = sqrt(T) minimises their sum.
  """
  return max(1, math.isqrt(horizon))


def checkpointed_scan(f, init, xs):
  """``jax.lax.scan(f, init, xs)`` with gradient checkpointing over time.

  The T steps are split into segments of :func:`segment_length` (about
  sqrt(T)); an outer scan over segments runs a ``jax.checkpoint``-ed
  inner scan, so the backward pass stores only the carries at segment
  boundaries and recomputes each segment once (memory O(sqrt(T)), one extra
  forward pass). A shorter last segment takes the rest when T is not a
  multiple of the length.

  Args:
    f: the per-step function ``(carry, x_t) -> (carry, y_t)``.
    init: the initial carry.
    xs: the inputs, time-major (a pytree).

  Returns:
    ``(carry, ys)``, as ``jax.lax.scan``.
  """
  horizon = jax.tree.leaves(xs)[0].shape[0]
  length = segment_length(horizon)
  num_segments = horizon // length
  split = num_segments * length
  # Inside a scan XLA cannot fold the recomputation back into the forward
  # pass, so prevent_cse's extra barriers would only cost time.
  segment = jax.checkpoint(
    lambda carry, x: jax.lax.scan(f, carry, x), prevent_cse=False
  )
  head = jax.tree.map(
    lambda x: x[:split].reshape((num_segments, length, *x.shape[1:])), xs
  )
  carry, ys = jax.lax.scan(segment, init, head)
  ys = jax.tree.map(lambda y: y.reshape((split, *y.shape[2:])), ys)
  if split < horizon:
    carry, tail = segment(carry, jax.tree.map(lambda x: x[split:], xs))
    ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, tail)
  return carry, ys


def remat_loss_fn(config: kalman.Config):
  """The kalman loss with its time loop in a :func:`checkpointed_scan`.

  Args:
    config: the task settings (horizon, batch size).

  Returns:
    ``(params, batch) -> Loss``, equal to ``kalman.make(config).loss_fn``: the
    same model call and the same ``losses.mse`` accumulation, step for step,
    so the two losses agree to rounding. The task's parameters are the whole
    ``LeakyRNN`` (its non-array fields are static), so they are called
    directly as the model.
  """

  def loss_fn(params, batch):
    def step(carry, inputs):
      h, total = carry
      y, x = inputs
      h = params(h, y)
      return (h, total + losses.mse(params.readout(h), x)), None

    carry = (params.initial_state((config.batch_size,)), losses.zero())
    inputs = (batch["observations"], batch["latent"])
    (_, total), _ = checkpointed_scan(step, carry, inputs)
    return total / config.num_steps

  return loss_fn


def _problem(overrides: dict, horizon: int):
  """``(config, task, params, batch)`` for the kalman task at horizon T."""
  config = dataclasses.replace(kalman.Config(), **overrides, num_steps=horizon)
  task = kalman.make(config)
  params = task.init_params(jax.random.key(0))
  data = kalman.generate(jax.random.key(2), config)
  # Only what the loss reads: the step takes the batch as an argument, so its
  # O(T) data is argument memory, not the step's temporary memory.
  batch = {"observations": data["observations"], "latent": data["latent"]}
  return config, task, params, batch


def check_remat(overrides: dict, horizon: int) -> dict:
  """Asserts the checkpointed loss and gradient equal the plain ones.

  Args:
    overrides: kalman ``Config`` overrides.
    horizon: T to check at.

  Returns:
    The largest absolute differences, for the record.
  """
  config, task, params, batch = _problem(overrides, horizon)
  plain = jax.jit(jax.value_and_grad(lambda p: task.loss_fn(p, batch).value))
  remat = jax.jit(jax.value_and_grad(lambda p: remat_loss_fn(config)(p, batch).value))
  (value, grads), (remat_value, remat_grads) = plain(params), remat(params)
  np.testing.assert_allclose(remat_value, value, rtol=1e-5, atol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    remat_grads,
    grads,
  )
  grad_diff = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads))
  )
  return {
    "T": horizon,
    "segment_length": segment_length(horizon),
    "loss_abs_diff": float(jnp.abs(remat_value - value)),
    "grad_max_abs_diff": grad_diff,
  }


def _steps(config, task, num_tangents: int):
  """The three steps ``(params, state, batch) -> (params, state)`` and inits."""
  sofo = sofo_jax.sofo(1.0, num_tangents, key=jax.random.key(1))
  adam = optax.adam(ADAM_LEARNING_RATE)
  remat = remat_loss_fn(config)

  def sofo_step(params, state, batch):
    closure = lambda p: task.loss_fn(p, batch)
    updates, state = sofo.update(None, state, params, loss_fn=closure)
    return optax.apply_updates(params, updates), state

  def adam_step(loss_fn):
    def step(params, state, batch):
      _, grads = jax.value_and_grad(lambda p: loss_fn(p, batch).value)(params)
      updates, state = adam.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return step

  steps = {
    "sofo": sofo_step,
    "bptt": adam_step(task.loss_fn),
    "remat": adam_step(remat),
  }
  inits = {"sofo": sofo.init, "bptt": adam.init, "remat": adam.init}
  return steps, inits


def _memory(compiled) -> dict:
  """Temporary, argument and output bytes XLA plans for a compiled step."""
  analysis = compiled.memory_analysis()
  return {
    "temp_bytes": int(analysis.temp_size_in_bytes),
    "argument_bytes": int(analysis.argument_size_in_bytes),
    "output_bytes": int(analysis.output_size_in_bytes),
  }


def bench_horizon(
  overrides: dict, horizon: int, num_tangents: int, repeats: int
) -> dict:
  """Memory and time of one step of each method at horizon T; one row."""
  config, task, params, batch = _problem(overrides, horizon)
  steps, inits = _steps(config, task, num_tangents)
  row = {"T": horizon, "segment_length": segment_length(horizon)}
  calls = {}
  for name in METHODS:
    state = inits[name](params)
    begin = time.perf_counter()
    compiled = jax.jit(steps[name]).lower(params, state, batch).compile()
    row[name] = {**_memory(compiled), "compile_seconds": time.perf_counter() - begin}
    calls[name] = lambda c=compiled, s=state: c(params, s, batch)
  timings = _harness.time_interleaved(calls, repeats)
  for name in METHODS:
    row[name]["time"] = timings[name]
    row[name]["median_ms"] = 1e3 * timings[name]["median_s"]
  for name in METHODS[1:]:
    row[f"{name}_over_sofo"] = {
      "temp_bytes": row[name]["temp_bytes"] / row["sofo"]["temp_bytes"],
      "time": _harness.ratio_stats(
        timings[name]["samples_s"], timings["sofo"]["samples_s"]
      ),
    }
  return row


def _print_row(row: dict) -> None:
  mib = lambda name: row[name]["temp_bytes"] / 2**20
  print(
    f"T={row['T']} (segments of {row['segment_length']}): temp MiB "
    + ", ".join(f"{n} {mib(n):.3f}" for n in METHODS)
    + "; median ms "
    + ", ".join(f"{n} {row[n]['median_ms']:.2f}" for n in METHODS)
    + "; over sofo (memory, time) "
    + ", ".join(
      f"{n} {row[f'{n}_over_sofo']['temp_bytes']:.2f}x "
      f"{row[f'{n}_over_sofo']['time']['median']:.2f}x"
      for n in METHODS[1:]
    ),
    flush=True,
  )


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--quick", action="store_true", help="two short horizons, K = 8, for CI"
  )
  parser.add_argument(
    "--num-tangents",
    type=int,
    default=None,
    help="SOFO's K (default 128; 8 with --quick)",
  )
  parser.add_argument(
    "--repeats", type=int, default=None, help="timed rounds (default 10; 3 quick)"
  )
  parser.add_argument(
    "--output",
    default=None,
    help="JSON path (default benchmarks/results/remat_baseline.json; "
    "with --quick, a file under the temporary directory)",
  )
  args = parser.parse_args(argv)
  quick = _harness.quick_mode(args.quick)
  num_tangents = args.num_tangents or (8 if quick else 128)
  repeats = args.repeats or (3 if quick else 10)
  horizons = HORIZONS["quick" if quick else "full"]
  # The 'cpu' memory size (32 units, batch 32) at the requested K.
  overrides = {**_suite.memory_config("cpu"), "num_tangents": num_tangents}

  check = check_remat(overrides, horizons[0])
  print(
    f"remat check at T={check['T']}: |loss diff| {check['loss_abs_diff']:.2e}, "
    f"max |grad diff| {check['grad_max_abs_diff']:.2e}",
    flush=True,
  )
  rows = []
  for horizon in horizons:
    rows.append(bench_horizon(overrides, horizon, num_tangents, repeats))
    _print_row(rows[-1])

  output = _harness.output_path(args.output, "remat_baseline.json", quick)
  config = {
    k: v
    for k, v in dataclasses.asdict(kalman.Config(**overrides)).items()
    if k != "num_steps"
  }
  path = _harness.write_json(
    output,
    {
      "command": [sys.executable, *sys.argv],
      "quick": quick,
      "task": "kalman",
      "config": {
        "num_hidden": config["num_hidden"],
        "batch_size": config["batch_size"],
        "num_tangents": num_tangents,
        "repeats": repeats,
        "adam_learning_rate": ADAM_LEARNING_RATE,
        "task_config": config,
      },
      "methods": list(METHODS),
      "remat_check": check,
      "rows": rows,
    },
  )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
