"""Convergence: loss against iterations and wall-clock, every task and method.

For each task, every method (SOFO, Adam + BPTT, FGD, SGD + BPTT) goes through
the same three phases, all built from :mod:`sofo_jax.training`'s
``make_optimizer`` and ``make_train_step`` (so every method sees the same
initial parameters and batches for a given seed, exactly as in
``training.fit``):

1. Tuning: every point of the method's grid is trained for ``tune_steps``
   steps from one tuning seed (not used afterwards), all grid points in one
   ``vmap``-ed program. The score is the mean training loss over the last
   quarter of the run (non-finite: infinite); the lowest score wins.
2. Wall-clock: one timed run of the chosen setting from seed 0, compiled
   before the clock starts and run in chunks with ``block_until_ready``
   after each (as ``training.fit`` does). SOFO runs ``steps`` steps; its
   elapsed time ``t*`` is the equal-wall-clock budget. The other methods run
   until the first chunk boundary at or after ``t*`` (and at least
   ``steps``, at most ``max_factor * steps`` steps), so they are compared
   with SOFO at (at least) the same compute time. The parameters after
   ``steps`` steps are kept: this run is also seed 0 of phase 3.
3. Seeds: the chosen setting is trained for ``steps`` steps from the other
   seeds, in one ``vmap``-ed program. With seed 0 these curves give the
   equal-iteration numbers, and their final parameters are evaluated on
   fixed evaluation batches.

SOFO is also run (timed, seed 0) at the plan's extra values of K with its
chosen learning rate and damping.

Every run of every method warms its learning rate up linearly, from a tenth
of its value to its value, over the first ``WARMUP_FRACTION`` of the plan's
iterations (tuning runs included), as the README recommends for SOFO; the
grid value is the rate after the warm-up.
"""

from __future__ import annotations

import math
import time
from typing import Any

import _harness  # pylint: disable=g-import-not-at-top
import _suite  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np

from sofo_jax import training
from sofo_jax._src import state_utils

TUNE_SEED = 1000
EVAL_SEED = 12345
FORWARD = ("sofo", "fgd")
CURVE_POINTS = 150


WARMUP_FRACTION = 0.1


def _paper_sofo(method: str) -> dict:
  """This benchmark tunes the paper's optimiser (fixed damping) on a grid.

  Its committed results predate adaptive step control; the defaults are
  measured by ``reproduce.py`` and ``defaults_check.py``.
  """
  return {"adaptive": False} if method == "sofo" else {}


def _start(task, method, key, learning_rate, damping, num_tangents, warmup_steps):
  """A run's training step, initial ``(params, state)`` and data key.

  The parameters, the data and the tangents each get their own part of
  ``key``; the learning rate is warmed up over ``warmup_steps``.
  """
  init_key, data_key, tangent_key = jax.random.split(key, 3)
  optimizer = training.make_optimizer(
    method,
    learning_rate=training.warmup(learning_rate, warmup_steps),
    key=tangent_key,
    num_tangents=num_tangents,
    damping=damping,
    **_paper_sofo(method),
  )
  params = task.init_params(init_key)
  step = training.make_train_step(task, method, optimizer)
  return step, (params, optimizer.init(params)), data_key


def run_many(
  task,
  method: str,
  num_steps: int,
  settings,
  keys,
  num_tangents: int,
  warmup_steps: int = 0,
):
  """Trains ``len(settings)`` runs in one ``vmap``-ed, jitted program.

  Args:
    task: a :class:`sofo_jax.tasks.Task`.
    method: one of :data:`sofo_jax.training.METHODS`.
    num_steps: steps per run.
    settings: ``(learning_rate, damping)`` per run (damping ``None`` unless
      SOFO).
    keys: one PRNG key per run, split as ``training.fit`` splits its key.
    num_tangents: K for the forward-mode methods.
    warmup_steps: length of the learning-rate warm-up (:func:`sofo_jax.training.warmup`).

  Returns:
    ``(losses (runs, steps), final params (stacked), nonfinite (runs,),
    seconds)``; ``seconds`` is the wall-clock of the whole batch of runs,
    compilation excluded.
  """
  lrs = jnp.asarray([s[0] for s in settings], jnp.float32)
  dampings = jnp.asarray([0.0 if s[1] is None else s[1] for s in settings], jnp.float32)
  keys = jnp.stack(list(keys))

  def train(learning_rate, damping, key):
    step, carry, data_key = _start(
      task, method, key, learning_rate, damping, num_tangents, warmup_steps
    )
    (params, state), losses = jax.lax.scan(
      step, carry, jax.random.split(data_key, num_steps)
    )
    nonfinite = (
      state_utils.get_diagnostics(state).num_nonfinite_steps
      if method in FORWARD
      else jnp.zeros((), jnp.int32)
    )
    return losses, params, nonfinite

  compiled = jax.jit(jax.vmap(train)).lower(lrs, dampings, keys).compile()
  start = time.perf_counter()
  losses, params, nonfinite = jax.block_until_ready(compiled(lrs, dampings, keys))
  seconds = time.perf_counter() - start
  return np.asarray(losses), params, np.asarray(nonfinite), seconds


def timed_run(
  task,
  method: str,
  *,
  key,
  learning_rate: float,
  damping: float | None,
  num_tangents: int,
  max_steps: int,
  chunk: int,
  until_seconds: float | None = None,
  snapshot_step: int | None = None,
  warmup_steps: int = 0,
) -> dict:
  """One run timed like ``training.fit``: compiled first, chunks, blocking.

  Stops after ``max_steps`` steps or at the first chunk boundary after
  ``until_seconds`` of (compilation-free) wall-clock, but not before
  ``snapshot_step`` steps, where the parameters are also kept.

  Returns:
    ``{"losses", "seconds", "params", "compile_seconds"}``, and with
    ``snapshot_step`` also ``"params_at_snapshot"`` and
    ``"nonfinite_at_snapshot"`` (steps skipped so far by a forward-mode
    method).
  """
  assert max_steps % chunk == 0, (max_steps, chunk)
  damping = 1e-4 if damping is None else damping
  step, carry, data_key = _start(
    task, method, key, learning_rate, damping, num_tangents, warmup_steps
  )
  batch_keys = jax.random.split(data_key, max_steps)
  begin = time.perf_counter()
  run_chunk = (
    jax.jit(lambda c, k: jax.lax.scan(step, c, k))
    .lower(carry, batch_keys[:chunk])
    .compile()
  )
  compile_seconds = time.perf_counter() - begin
  assert snapshot_step is None or (
    snapshot_step % chunk == 0 and snapshot_step <= max_steps
  )
  losses, seconds, elapsed = [], [], 0.0
  snapshot = {}
  for start in range(0, max_steps, chunk):
    keys = batch_keys[start : start + chunk]
    begin = time.perf_counter()
    carry, chunk_losses = run_chunk(carry, keys)
    jax.block_until_ready(carry)
    spent = time.perf_counter() - begin
    losses.append(np.asarray(chunk_losses))
    seconds.append(elapsed + spent * np.arange(1, chunk + 1) / chunk)
    elapsed += spent
    if start + chunk == snapshot_step:
      snapshot["params_at_snapshot"] = carry[0]
      snapshot["nonfinite_at_snapshot"] = (
        int(state_utils.get_diagnostics(carry[1]).num_nonfinite_steps)
        if method in FORWARD
        else 0
      )
    past_snapshot = snapshot_step is None or start + chunk >= snapshot_step
    if until_seconds is not None and elapsed >= until_seconds and past_snapshot:
      break
  return {
    "losses": np.concatenate(losses),
    "seconds": np.concatenate(seconds),
    "params": carry[0],
    "compile_seconds": compile_seconds,
    **snapshot,
  }


def evaluate_many(task, params_list, num_batches: int) -> list[dict]:
  """Loss and ``task.metrics`` of each parameter set, on fixed batches."""
  eval_keys = jax.random.split(jax.random.key(EVAL_SEED), num_batches)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *params_list)

  def one(params):
    def on(k):
      batch = task.sample_batch(k)
      return {"loss": task.loss_value(params, batch), **task.metrics(params, batch)}

    return jax.tree.map(lambda x: jnp.mean(x, 0), jax.lax.map(on, eval_keys))

  results = jax.jit(lambda s: jax.lax.map(one, s))(stacked)
  results = jax.tree.map(np.asarray, results)
  return [{k: float(v[i]) for k, v in results.items()} for i in range(len(params_list))]


# -- curve statistics -------------------------------------------------------


def running_mean(x: np.ndarray, window: int) -> np.ndarray:
  """Mean of the last ``window`` values at each step (fewer at the start)."""
  x = np.asarray(x, np.float64)
  c = np.concatenate([[0.0], np.cumsum(x)])
  idx = np.arange(1, len(x) + 1)
  lo = np.maximum(0, idx - window)
  return (c[idx] - c[lo]) / (idx - lo)


def tail_mean(x: np.ndarray, fraction: float) -> float:
  n = max(1, round(fraction * len(x)))
  return float(np.mean(x[-n:]))


def steps_to_target(x: np.ndarray, target: float, window: int) -> int | None:
  """First step count at which the running-mean loss is at or below target."""
  hit = np.nonzero(running_mean(x, window) <= target)[0]
  return int(hit[0]) + 1 if hit.size else None


def loss_at_time(
  seconds: np.ndarray, losses: np.ndarray, t: float
) -> tuple[float, bool]:
  """Mean loss over the steps in ``[0.9 t, t]``; False if the run ended before t."""
  covered = bool(seconds[-1] >= t)
  t_end = t if covered else seconds[-1]
  mask = (seconds >= 0.9 * t_end) & (seconds <= t_end)
  if not mask.any():  # a single step longer than 0.1 t: take the last before t
    mask[max(0, int(np.searchsorted(seconds, t_end, side="right")) - 1)] = True
  return float(np.mean(losses[mask])), covered


def _sample_indices(n: int) -> np.ndarray:
  geo = np.geomspace(1, n, CURVE_POINTS // 2)
  lin = np.linspace(1, n, CURVE_POINTS // 2)
  return np.unique(np.round(np.concatenate([geo, lin])).astype(int)) - 1


def _finite_list(x) -> list:
  """Plot data: 4 significant digits, None for non-finite values."""
  return [
    float(f"{v:.4g}") if np.isfinite(v) else None for v in np.asarray(x, np.float64)
  ]


def _curve(losses: np.ndarray, window: int, seconds: np.ndarray | None = None) -> dict:
  """Subsampled running-mean curve(s) for the JSON file and the plots."""
  losses = np.atleast_2d(losses)
  smooth = np.stack([running_mean(row, window) for row in losses])
  idx = _sample_indices(losses.shape[1])
  out = {"step": (idx + 1).tolist(), "mean": _finite_list(np.mean(smooth, 0)[idx])}
  if losses.shape[0] > 1:
    out["min"] = _finite_list(np.min(smooth, 0)[idx])
    out["max"] = _finite_list(np.max(smooth, 0)[idx])
  if seconds is not None:
    out["seconds"] = _finite_list(seconds[idx])
  return out


# -- one task ---------------------------------------------------------------


def _round_up(n: float, chunk: int) -> int:
  return int(chunk * math.ceil(n / chunk))


def run_task(
  name: str,
  plan: _suite.Plan,
  size: str,
  grids: dict,
  num_seeds: int,
  eval_batches: int,
  max_factor: int = 100,
) -> dict:
  """Runs every method on one task; returns the task's JSON entry."""
  from sofo_jax.tasks import TASKS  # pylint: disable=g-import-not-at-top

  module = TASKS[name]
  config = _suite.task_config(module, plan)
  task = module.make(config)
  k_main = config.num_tangents
  n = plan.steps
  chunk = max(1, n // 20)
  window = max(1, n // 20)
  num_params = sum(x.size for x in jax.tree.leaves(task.init_params(jax.random.key(0))))
  _harness.log(
    f"{name}: {num_params} parameters, K = {k_main}, {n} steps, {num_seeds} seeds"
  )
  entry: dict[str, Any] = {
    "config": {
      k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
      for k, v in config.__dict__.items()
    },
    "num_params": num_params,
    "steps": n,
    "tune_steps": plan.tune_steps,
    "seeds": list(range(num_seeds)),
    "smoothing_window": window,
    "methods": {},
  }
  seed_keys = [jax.random.key(s) for s in range(num_seeds)]
  warmup = int(WARMUP_FRACTION * n)
  entry["warmup_steps"] = warmup
  eval_params, eval_labels = (
    [task.init_params(jax.random.split(jax.random.key(0), 3)[0])],
    ["init"],
  )

  chosen = {}
  for method in training.METHODS:
    grid = grids[method]
    losses, _, nonfinite, secs = run_many(
      task,
      method,
      plan.tune_steps,
      grid,
      [jax.random.key(TUNE_SEED)] * len(grid),
      k_main,
      warmup,
    )
    scores = []
    for row in losses:
      tail = row[-max(1, plan.tune_steps // 4) :]
      scores.append(float(np.mean(tail)) if np.all(np.isfinite(tail)) else math.inf)
    best = int(np.argmin(scores))
    chosen[method] = grid[best]
    entry["methods"][method] = {
      "grid": [
        {
          "learning_rate": lr,
          "damping": d,
          "score": s if math.isfinite(s) else None,
          "nonfinite_steps": int(b),
        }
        for (lr, d), s, b in zip(grid, scores, nonfinite)
      ],
      "learning_rate": grid[best][0],
      "damping": grid[best][1],
      "chosen_at_grid_edge": best in _edge_indices(grid, best),
      "all_grid_points_diverged": not any(math.isfinite(x) for x in scores),
    }
    _harness.log(
      f"{name}/{method}: grid scores {[f'{s:.3g}' for s in scores]} -> "
      f"lr {grid[best][0]}, damping {grid[best][1]} ({secs:.1f}s)"
    )

  # Timed runs from seed 0; they also provide seed 0's first n steps.
  def timed_from_seed_0(method, num_tangents=k_main, **limits):
    lr, damping = chosen[method]
    return timed_run(
      task,
      method,
      key=seed_keys[0],
      learning_rate=lr,
      damping=damping,
      num_tangents=num_tangents,
      chunk=chunk,
      warmup_steps=warmup,
      **limits,
    )

  timed = {"sofo": timed_from_seed_0("sofo", max_steps=n, snapshot_step=n)}
  t_star = float(timed["sofo"]["seconds"][-1])
  _harness.log(
    f"{name}/sofo timed: {n} steps in {t_star:.2f}s "
    f"(compile {timed['sofo']['compile_seconds']:.1f}s)"
  )
  for method in ("adam", "fgd", "sgd"):
    timed[method] = timed_from_seed_0(
      method,
      max_steps=max(n, _round_up(max_factor * n, chunk)),
      until_seconds=t_star,
      snapshot_step=n,
    )
    _harness.log(
      f"{name}/{method} timed: {len(timed[method]['losses'])} steps in "
      f"{timed[method]['seconds'][-1]:.2f}s"
    )
  for k in plan.extra_tangents:
    timed[f"sofo_k{k}"] = timed_from_seed_0("sofo", k, max_steps=n)
    _harness.log(
      f"{name}/sofo K={k} timed: final loss "
      f"{tail_mean(timed[f'sofo_k{k}']['losses'], 0.1):.4g} in "
      f"{timed[f'sofo_k{k}']['seconds'][-1]:.2f}s"
    )

  # The other seeds, n steps each, in one vmap-ed program per method.
  seed_losses = {}
  for method in training.METHODS:
    run = timed[method]
    seed_losses[method] = [run["losses"][:n]]
    eval_params.append(run["params_at_snapshot"])
    eval_labels.append(f"{method}/0")
    m = entry["methods"][method]
    m["nonfinite_steps"] = [run["nonfinite_at_snapshot"]]
    if num_seeds > 1:
      lr, damping = chosen[method]
      losses, params, nonfinite, secs = run_many(
        task,
        method,
        n,
        [(lr, damping)] * (num_seeds - 1),
        seed_keys[1:],
        k_main,
        warmup,
      )
      seed_losses[method] += list(losses)
      m["nonfinite_steps"] += nonfinite.tolist()
      for i in range(1, num_seeds):
        eval_params.append(jax.tree.map(lambda x, i=i: x[i - 1], params))
        eval_labels.append(f"{method}/{i}")
      _harness.log(f"{name}/{method}: seeds 1-{num_seeds - 1} ({secs:.1f}s)")
    _harness.log(
      f"{name}/{method}: final training loss per seed "
      f"{[round(tail_mean(r, 0.1), 4) for r in seed_losses[method]]}"
    )
  for label, run in timed.items():
    eval_params.append(run["params"])
    eval_labels.append(f"timed/{label}")

  evals = dict(zip(eval_labels, evaluate_many(task, eval_params, eval_batches)))
  entry["initial_metrics"] = evals["init"]
  if plan.target_rule == "kalman":
    target = 1.1 * evals["init"]["kalman_mse"]
    entry["target_note"] = (
      "1.1 x the true-parameter Kalman filter's MSE on the evaluation batches"
    )
  else:
    target = plan.target
  entry["target"] = target
  entry["equal_wallclock_seconds"] = t_star

  for method in training.METHODS:
    m = entry["methods"][method]
    losses = np.stack(seed_losses[method])
    run = timed[method]
    steps_needed = [steps_to_target(r, target, window) for r in losses]
    reached = [s for s in steps_needed if s is not None]
    timed_hit = steps_to_target(run["losses"], target, window)
    at_t, covered = loss_at_time(run["seconds"], run["losses"], t_star)
    # The timed run's first n steps repeat seed 0 of the seeds phase.
    m.update(
      {
        "final_loss": [tail_mean(r, 0.1) for r in losses],
        "final_loss_mean": float(np.mean([tail_mean(r, 0.1) for r in losses])),
        "steps_to_target": steps_needed,
        "steps_to_target_median": (
          float(np.median(reached)) if len(reached) == len(losses) else None
        ),
        "seeds_reaching_target": len(reached),
        "metrics": [evals[f"{method}/{i}"] for i in range(num_seeds)],
        "curve": _curve(losses, window),
        "timed": {
          "steps": len(run["losses"]),
          "seconds": float(run["seconds"][-1]),
          "seconds_per_step": float(run["seconds"][-1] / len(run["losses"])),
          "compile_seconds": run["compile_seconds"],
          "loss_at_equal_wallclock": at_t,
          "covers_equal_wallclock": covered,
          "seconds_to_target": (
            float(run["seconds"][timed_hit - 1]) if timed_hit else None
          ),
          "steps_to_target": timed_hit,
          "final_metrics": evals[f"timed/{method}"],
          "curve": _curve(run["losses"], window, run["seconds"]),
        },
      }
    )
  entry["sofo_other_k"] = {}
  for k in plan.extra_tangents:
    run = timed[f"sofo_k{k}"]
    hit = steps_to_target(run["losses"], target, window)
    entry["sofo_other_k"][str(k)] = {
      "num_tangents": k,
      "final_loss": tail_mean(run["losses"], 0.1),
      "seconds": float(run["seconds"][-1]),
      "seconds_per_step": float(run["seconds"][-1] / len(run["losses"])),
      "steps_to_target": hit,
      "final_metrics": evals[f"timed/sofo_k{k}"],
      "curve": _curve(run["losses"], window, run["seconds"]),
    }
  return entry


def _edge_indices(grid, best) -> set:
  """Grid indices on the boundary of the grid along some axis."""
  lrs = sorted({g[0] for g in grid})
  ds = sorted({g[1] for g in grid if g[1] is not None})
  lr, d = grid[best]
  on_edge = lr in (lrs[0], lrs[-1]) or (
    d is not None and len(ds) > 1 and d in (ds[0], ds[-1])
  )
  return {best} if on_edge else set()
