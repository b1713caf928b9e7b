"""Per-iteration time against K: a SOFO step against an Adam + BPTT step.

The problem is the kalman task's RNN at the benchmark size. Each step is the
full training step of :func:`sofo_jax.training.make_train_step` (batch
sampling, loss, direction, update), jitted as one program, warmed up, then
timed ``repeats`` times up to ``block_until_ready``; min and median are
reported. One run compares all K side by side with the same Adam step.
"""

from __future__ import annotations

import dataclasses

import jax

from sofo_jax import training

import _harness  # pylint: disable=g-import-not-at-top
import _suite  # pylint: disable=g-import-not-at-top


def _timed_step(task, method, num_tangents, repeats, learning_rate, damping):
  optimizer = training.make_optimizer(
      method, learning_rate=learning_rate, key=jax.random.key(1),
      num_tangents=num_tangents, damping=damping)
  params = task.init_params(jax.random.key(0))
  carry = (params, optimizer.init(params))
  step = training.make_train_step(task, method, optimizer)
  batch_key = jax.random.key(2)
  compiled = jax.jit(step).lower(carry, batch_key).compile()
  return _harness.time_call(lambda: compiled(carry, batch_key), repeats)


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
  adam = _timed_step(task, "adam", None, repeats, config.adam_learning_rate, None)
  log(f"time: adam step median {1e3 * adam['median_s']:.2f} ms")
  rows = []
  for k in _suite.TIME_TANGENTS[size]:
    sofo = _timed_step(task, "sofo", k, repeats, config.learning_rate, config.damping)
    rows.append({"K": k, "sofo": sofo, "adam": adam,
                 "sofo_median_ms": 1e3 * sofo["median_s"], "sofo_min_ms": 1e3 * sofo["min_s"],
                 "adam_median_ms": 1e3 * adam["median_s"], "adam_min_ms": 1e3 * adam["min_s"],
                 "ratio_median": sofo["median_s"] / adam["median_s"],
                 "ratio_min": sofo["min_s"] / adam["min_s"]})
    log(f"time: K={k} sofo median {rows[-1]['sofo_median_ms']:.2f} ms "
        f"({rows[-1]['ratio_median']:.1f}x adam)")
  return {"task": "kalman", "config": {k: v for k, v in dataclasses.asdict(config).items()},
          "num_params": num_params, "repeats": repeats, "rows": rows}
