"""Per-iteration time against K: a SOFO step, its bare forward-mode pass, Adam.

The problem is the kalman task's RNN at the benchmark size. Each step is the
full training step of :func:`sofo_jax.training.make_train_step` (batch
sampling, loss, direction, update), jitted as one program. For each K three
programs are timed round-robin (:func:`_harness.time_interleaved`): the SOFO
step, the bare ``vmap`` of ``jax.jvp`` of the task's loss over K given
tangents on one batch (the irreducible cost of any K-tangent forward-mode
method), and the Adam + BPTT step. Min and median are reported, and the
median over rounds of SOFO / jvp.
"""

from __future__ import annotations

import dataclasses
import functools

import _harness  # pylint: disable=g-import-not-at-top
import _suite  # pylint: disable=g-import-not-at-top
import jax

import sofo_jax
from sofo_jax import training


def _compiled_step(task, method, num_tangents, learning_rate, damping):
  """A zero-argument call of one compiled training step."""
  optimizer = training.make_optimizer(
    method,
    learning_rate=learning_rate,
    key=jax.random.key(1),
    num_tangents=num_tangents,
    damping=damping,
  )
  params = task.init_params(jax.random.key(0))
  carry = (params, optimizer.init(params))
  step = training.make_train_step(task, method, optimizer)
  batch_key = jax.random.key(2)
  compiled = jax.jit(step).lower(carry, batch_key).compile()
  return lambda: compiled(carry, batch_key)


def _compiled_bare_jvp(task, num_tangents):
  """A zero-argument call of the vmapped jvp of the loss over K tangents."""
  params = task.init_params(jax.random.key(0))
  batch = task.sample_batch(jax.random.key(2))
  tangents = sofo_jax.sample_tangents(jax.random.key(3), params, num_tangents)
  value_fn = lambda p: task.loss_fn(p, batch).value
  bare_jvp = functools.partial(_harness.bare_jvp, value_fn)
  compiled = jax.jit(bare_jvp).lower(params, tangents).compile()
  return lambda: compiled(params, tangents)


def run(size: str, log) -> dict:
  from sofo_jax.tasks import kalman  # pylint: disable=g-import-not-at-top

  overrides = _suite.memory_config(size)
  if size == "quick":
    overrides = {**overrides, "num_steps": 30}
  elif size == "cpu":
    overrides = {**overrides, "num_steps": 200}
  config = dataclasses.replace(kalman.Config(), **overrides)
  task = kalman.make(config)
  num_params = sum(x.size for x in jax.tree.leaves(task.init_params(jax.random.key(0))))
  repeats = _suite.TIME_REPEATS[size]
  adam_step = _compiled_step(task, "adam", None, config.adam_learning_rate, None)
  rows = []
  for k in _suite.TIME_TANGENTS[size]:
    timings = _harness.time_interleaved(
      {
        "sofo": _compiled_step(task, "sofo", k, config.learning_rate, config.damping),
        "jvp": _compiled_bare_jvp(task, k),
        "adam": adam_step,
      },
      repeats,
    )
    sofo, jvp, adam = timings["sofo"], timings["jvp"], timings["adam"]
    rows.append(
      {
        "K": k,
        "sofo": sofo,
        "jvp": jvp,
        "adam": adam,
        "sofo_median_ms": 1e3 * sofo["median_s"],
        "sofo_min_ms": 1e3 * sofo["min_s"],
        "jvp_median_ms": 1e3 * jvp["median_s"],
        "jvp_min_ms": 1e3 * jvp["min_s"],
        "adam_median_ms": 1e3 * adam["median_s"],
        "adam_min_ms": 1e3 * adam["min_s"],
        "sofo_over_jvp": _harness.ratio_stats(sofo["samples_s"], jvp["samples_s"])[
          "median"
        ],
        "ratio_median": sofo["median_s"] / adam["median_s"],
        "ratio_min": sofo["min_s"] / adam["min_s"],
      }
    )
    log(
      f"time: K={k} sofo median {rows[-1]['sofo_median_ms']:.2f} ms "
      f"({rows[-1]['sofo_over_jvp']:.2f}x bare jvp, {rows[-1]['ratio_median']:.1f}x adam)"
    )
  return {
    "task": "kalman",
    "config": {k: v for k, v in dataclasses.asdict(config).items()},
    "num_params": num_params,
    "repeats": repeats,
    "rows": rows,
  }
