"""A reproduction that can decide the paper's claims, at CPU sizes.

For each of the five RNN tasks (flip-flop, Lorenz, Kalman, double reach,
delayed addition), at the benchmark suite's ``cpu`` sizes (the double reach
at dt = 10 ms, batch 16) with K = 128 and 3 seeds, every method starts from the same initial parameters and sees the
same batches (``jax.random.split(seed_key, 3)`` as in ``training.fit``):

- ``sofo_defaults``: ``sofo_jax.sofo(1.0, 128, key=key)``, nothing tuned, no
  warm-up.
- ``sofo_paper``: the paper's optimiser, fixed relative damping, at the
  task's paper settings (``config.learning_rate``, ``config.damping``),
  no warm-up; seed 0 only.
- ``sofo_tuned``: fixed damping with a 10% warm-up, best of a learning-rate
  × damping grid trained ``TUNE_STEPS`` steps from a separate tuning seed;
  then seed 0 only.
- ``adam``: Adam + BPTT, best of a 7-point learning-rate grid, each point
  trained on all 3 seeds for the full run (the best mean final loss wins;
  tuning on the evaluation seeds favours Adam). The chosen point is flagged
  if it sits at an edge of the grid. For the equal-wall-clock comparison the
  chosen Adam is run on as many steps as fit in SOFO's time.

Reported per task: the training loss at equal iterations (mean of the last
20 steps, mean over seeds) and the evaluation loss on fixed batches;
iterations to the suite's targets (20-step running mean); ms per step; loss
at equal wall-clock; the Kalman MSE ratio to the optimal filter; and for the
double reach the two reach errors and a plot of hand paths.

Usage::

    python benchmarks/reproduce.py            # about an hour on a 2-core CPU
    python benchmarks/reproduce.py --quick    # a smoke test, writes under /tmp

Writes ``benchmarks/results/reproduction.json`` and ``reproduction.png``
(and ``reproduction_double_reach.png``), after every task.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import _harness
import _suite
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sofo_jax
from sofo_jax import tasks as tasks_lib
from sofo_jax import training

TASKS = ("flip_flop", "lorenz", "delayed_addition", "kalman", "double_reach")
STEPS = {"double_reach": 1500}
DEFAULT_STEPS = 1000
NUM_TANGENTS = 128
# --quick: the tasks' tiny quick configurations, a smoke test of the script.
QUICK_NUM_TANGENTS = 8
SEEDS = (0, 1, 2)
# The paper's fixed damping and the tuned SOFO run on the first seed only: on
# a 2-core CPU three seeds of every SOFO variant at K = 128 would take hours.
# The defaults and Adam run on all three.
SINGLE_SEED = (0,)
# The double reach at the reliability check's size (dt = 10 ms, so T = 200,
# batch 16), a quarter of the cost of the suite's cpu size, so that it can
# run 2000 iterations.
CONFIG_OVERRIDES = {"double_reach": dict(dt=0.01, batch_size=16)}
TUNE_SEED = 1000
EVAL_SEED = 12345
EVAL_BATCHES = 4
TUNE_STEPS = 200
WARMUP_FRACTION = 0.1
ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SOFO_GRID = tuple((lr, d) for lr in (0.3, 1.0) for d in (1e-4, 1e-3, 1e-2))
MAX_WALL_CLOCK_FACTOR = 5  # Adam's equal-time run is at most this many times longer
SMOOTHING = 20
REACH_TOLERANCE = 0.02  # metres: "both reach errors < 2 cm"


def train(task, make_optimizer, method: str, num_steps: int, settings, seeds):
  """Trains every (setting, seed) pair in one vmapped, jitted program.

  Args:
    task: the task.
    make_optimizer: ``(setting, tangent_key) -> optax transformation``;
      ``setting`` is a row of traced scalars.
    method: ``"sofo"`` or ``"adam"`` (how the step gets its loss).
    num_steps: steps per run.
    settings: ``(S, n)`` array of settings.
    seeds: the seeds, each run on every setting.

  Returns:
    ``(losses (S, seeds, steps), final params, seconds per step)``; the time
    is that of the whole batched program (compilation excluded) per step.
  """
  settings = jnp.asarray(settings, jnp.float32)
  keys = jnp.stack([jax.random.key(s) for s in seeds])

  def one(setting, key):
    init_key, data_key, tangent_key = jax.random.split(key, 3)
    optimizer = make_optimizer(setting, tangent_key)
    params = task.init_params(init_key)
    step = training.make_train_step(task, method, optimizer)
    (params, _), losses = jax.lax.scan(
      step, (params, optimizer.init(params)), jax.random.split(data_key, num_steps)
    )
    return losses, params

  program = jax.jit(jax.vmap(jax.vmap(one, (None, 0)), (0, None)))
  compiled = program.lower(settings, keys).compile()
  begin = time.perf_counter()
  losses, params = jax.block_until_ready(compiled(settings, keys))
  seconds = time.perf_counter() - begin
  return np.asarray(losses), params, seconds / num_steps


def sofo_defaults(setting, key):
  del setting
  return sofo_jax.sofo(1.0, NUM_TANGENTS, key=key)


def sofo_fixed(warmup_steps: int):
  def make(setting, key):
    learning_rate = training.warmup(setting[0], warmup_steps)
    return sofo_jax.sofo(
      learning_rate, NUM_TANGENTS, setting[1], key=key, adaptive=False
    )

  return make


def adam(setting, key):
  del key
  return optax.with_extra_args_support(optax.adam(setting[0]))


def smoothed(losses: np.ndarray) -> np.ndarray:
  """Running mean over the last ``SMOOTHING`` steps (last axis)."""
  kernel = np.ones(SMOOTHING) / SMOOTHING
  return np.apply_along_axis(lambda x: np.convolve(x, kernel, mode="valid"), -1, losses)


def final_loss(losses: np.ndarray) -> float:
  """Mean over seeds of the mean of the last ``SMOOTHING`` training losses."""
  value = float(np.mean(losses[..., -SMOOTHING:]))
  return value if math.isfinite(value) else float("inf")


def per_100_steps(values: np.ndarray, reduce=np.sum) -> list[float]:
  """``reduce`` over each block of 100 steps (the last may be shorter)."""
  return [float(reduce(values[i : i + 100])) for i in range(0, values.size, 100)]


def steps_to_target(losses: np.ndarray, target: float) -> list:
  """Per seed, the first step where the running mean reaches ``target``."""
  result = []
  for curve in smoothed(losses):
    hits = np.nonzero(curve <= target)[0]
    result.append(int(hits[0]) + SMOOTHING if hits.size else None)
  return result


def evaluate(task, stacked_params) -> dict:
  """Metrics on fixed evaluation batches, per seed."""
  batches = [
    task.sample_batch(k)
    for k in jax.random.split(jax.random.key(EVAL_SEED), EVAL_BATCHES)
  ]

  @jax.jit
  def one(params):
    rows = [
      {"loss": task.loss_fn(params, b).value, **task.metrics(params, b)}
      for b in batches
    ]
    return {name: jnp.mean(jnp.stack([r[name] for r in rows])) for name in rows[0]}

  per_seed = jax.vmap(one)(stacked_params)
  return {
    name: [float(v) for v in np.asarray(values)] for name, values in per_seed.items()
  }


def curve(losses: np.ndarray, points: int = 150) -> dict:
  mean = np.mean(losses.reshape(-1, losses.shape[-1]), axis=0)
  index = np.unique(np.linspace(0, mean.size - 1, points).astype(int))
  return {"step": index.tolist(), "loss": [float(v) for v in mean[index]]}


def method_summary(task, losses, params, seconds, target, **extra) -> dict:
  return {
    "final_loss": final_loss(losses),
    "final_loss_per_seed": [final_loss(run) for run in losses],
    "steps_to_target": steps_to_target(losses, target),
    "ms_per_step": 1e3 * seconds,
    "max_over_first": float(np.nanmax(losses / losses[:, :1])),
    "eval": evaluate(task, params),
    "curve": curve(losses),
    **extra,
  }


def target_for(name: str, task) -> float:
  rule = _suite.TARGETS[name]
  if "target" in rule:
    return rule["target"]
  params = task.init_params(jax.random.key(0))
  floor = np.mean(evaluate(task, stacked(params))["kalman_mse"])
  return 1.1 * float(floor)


def reproduction_task(
  name: str, quick: bool, batch_size: int | None = None, **overrides
):
  """Task ``name`` at the reproduction's size (the suite's quick plan if
  ``quick``, else its cpu plan with :data:`CONFIG_OVERRIDES`), with
  ``overrides`` of its config on top; ``batch_size`` (None: the plan's)
  sets the training and held-out batches alike."""
  if batch_size is not None:
    overrides["batch_size"] = batch_size
  module = tasks_lib.TASKS[name]
  plan = _suite.plans("quick" if quick else "cpu")[name]
  config = _suite.task_config(module, plan)
  fixed = {} if quick else CONFIG_OVERRIDES.get(name, {})
  return module.make(dataclasses.replace(config, **{**fixed, **overrides}))


def run_task(name: str, quick: bool, out: Path, batch_size: int | None = None) -> dict:
  """Every method of the reproduction on task ``name``; ``batch_size``
  overrides the task's (training and held-out batches alike)."""
  task = reproduction_task(name, quick, batch_size, num_tangents=NUM_TANGENTS)
  config = task.config
  steps = 20 if quick else STEPS.get(name, DEFAULT_STEPS)
  tune_steps = 10 if quick else TUNE_STEPS
  seeds = SEEDS[:1] if quick else SEEDS
  target = target_for(name, task)
  result = {"config": dataclasses.asdict(config), "steps": steps, "target": target}

  _harness.log(f"{name}: SOFO at its defaults")
  losses, params, seconds = train(task, sofo_defaults, "sofo", steps, [[0.0]], seeds)
  result["sofo_defaults"] = method_summary(
    task, losses[0], params_at(params, 0), seconds, target
  )
  sofo_first_seed = params_at(params_at(params, 0), 0)
  sofo_seconds = seconds * steps

  _harness.log(f"{name}: SOFO at the paper's fixed damping")
  paper = [[config.learning_rate, config.damping]]
  losses, params, seconds = train(
    task, sofo_fixed(0), "sofo", steps, paper, SINGLE_SEED
  )
  result["sofo_paper"] = method_summary(
    task,
    losses[0],
    params_at(params, 0),
    seconds,
    target,
    learning_rate=config.learning_rate,
    damping=config.damping,
  )

  _harness.log(f"{name}: SOFO grid ({len(SOFO_GRID)} points, {tune_steps} steps)")
  warmup = max(1, int(WARMUP_FRACTION * tune_steps))
  grid_losses, _, _ = train(
    task, sofo_fixed(warmup), "sofo", tune_steps, SOFO_GRID, (TUNE_SEED,)
  )
  scores = [final_loss(run) for run in grid_losses]
  best = int(np.argmin(scores))
  _harness.log(
    f"{name}: SOFO tuned, lr {SOFO_GRID[best][0]} damping {SOFO_GRID[best][1]}"
  )
  warmup = max(1, int(WARMUP_FRACTION * steps))
  losses, params, seconds = train(
    task, sofo_fixed(warmup), "sofo", steps, [SOFO_GRID[best]], SINGLE_SEED
  )
  result["sofo_tuned"] = method_summary(
    task,
    losses[0],
    params_at(params, 0),
    seconds,
    target,
    learning_rate=SOFO_GRID[best][0],
    damping=SOFO_GRID[best][1],
    grid=[
      {"learning_rate": lr, "damping": d, "tune_loss": s}
      for (lr, d), s in zip(SOFO_GRID, scores)
    ],
  )

  _harness.log(f"{name}: Adam grid ({len(ADAM_GRID)} points x {len(seeds)} seeds)")
  grid = [[lr] for lr in ADAM_GRID]
  grid_losses, grid_params, seconds = train(task, adam, "adam", steps, grid, seeds)
  scores = [final_loss(run) for run in grid_losses]
  best = int(np.argmin(scores))
  adam_seconds_per_step = seconds / len(ADAM_GRID)
  result["adam"] = method_summary(
    task,
    grid_losses[best],
    params_at(grid_params, best),
    adam_seconds_per_step,
    target,
    learning_rate=ADAM_GRID[best],
    at_grid_edge=best in (0, len(ADAM_GRID) - 1),
    grid=[{"learning_rate": lr, "final_loss": s} for lr, s in zip(ADAM_GRID, scores)],
  )

  equal_steps = int(
    min(
      MAX_WALL_CLOCK_FACTOR * steps,
      math.ceil(sofo_seconds / max(adam_seconds_per_step, 1e-9)),
    )
  )
  if equal_steps > steps:
    _harness.log(f"{name}: Adam at equal wall-clock ({equal_steps} steps)")
    losses, params, seconds = train(
      task, adam, "adam", equal_steps, [[ADAM_GRID[best]]], seeds
    )
    losses = losses[0]
    equal = {
      "steps": equal_steps,
      "final_loss": final_loss(losses),
      "eval": evaluate(task, params_at(params, 0)),
      "ms_per_step": 1e3 * seconds,
    }
  else:
    equal = {
      "steps": steps,
      "final_loss": result["adam"]["final_loss"],
      "eval": result["adam"]["eval"],
      "ms_per_step": result["adam"]["ms_per_step"],
    }
  equal["sofo_seconds"] = sofo_seconds
  result["adam_equal_wall_clock"] = equal

  if name == "double_reach":
    result["double_reach"] = double_reach_verdict(task, result)
    plot_hand_paths(
      task,
      {
        "SOFO defaults": sofo_first_seed,
        f"Adam (lr {ADAM_GRID[best]:g})": params_at(params_at(grid_params, best), 0),
      },
      out.with_name(out.stem + "_double_reach.png"),
    )
  if name == "kalman":
    result["kalman_mse_ratio"] = {
      m: float(np.mean(result[m]["eval"]["mse_ratio"]))
      for m in ("sofo_defaults", "sofo_paper", "sofo_tuned", "adam")
    }
  return result


def params_at(stacked, index: int):
  return jax.tree.map(lambda x: x[index], stacked)


def stacked(params):
  """One run's parameters with a leading run axis of 1, as :func:`evaluate` takes."""
  return jax.tree.map(lambda x: x[None], params)


def reach_verdict(errors: dict) -> dict:
  """Mean reach errors (m) over seeds of :func:`evaluate`'s metrics, and the verdict."""
  first = float(np.mean(errors["reach_error_1"]))
  second = float(np.mean(errors["reach_error_2"]))
  return {
    "reach_error_1_m": first,
    "reach_error_2_m": second,
    "double_reach_produced": first < REACH_TOLERANCE and second < REACH_TOLERANCE,
  }


def reach_line(figures: dict) -> str:
  """ "loss L, reach errors a / b cm" of a figures dict with :func:`reach_verdict`'s keys."""
  return (
    f"loss {figures['final_loss']:.4g}, reach errors "
    f"{100 * figures['reach_error_1_m']:.1f} / "
    f"{100 * figures['reach_error_2_m']:.1f} cm"
  )


def double_reach_verdict(task, result: dict) -> dict:
  return {
    method: reach_verdict(result[method]["eval"])
    for method in ("sofo_defaults", "sofo_tuned", "adam")
  }


def plot(payload: dict, path: Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  names = list(payload["tasks"])
  fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
  labels = {
    "sofo_defaults": "SOFO defaults",
    "sofo_paper": "SOFO paper (fixed damping)",
    "sofo_tuned": "SOFO tuned",
    "adam": "Adam best of grid",
  }
  for ax, name in zip(axes[0], names):
    for method, label in labels.items():
      c = payload["tasks"][name][method]["curve"]
      ax.plot(c["step"], np.clip(c["loss"], None, 1e6), label=label)
    ax.set_yscale("log")
    ax.set_title(name)
    ax.set_xlabel("iteration")
  axes[0][0].set_ylabel("training loss (mean of seeds)")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_hand_paths(task, params_by_method: dict, path: Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  batch = task.sample_batch(jax.random.key(EVAL_SEED))
  fig, axes = plt.subplots(
    1, len(params_by_method), figsize=(4.2 * len(params_by_method), 4), squeeze=False
  )
  for ax, (label, params) in zip(axes[0], params_by_method.items()):
    out = jax.jit(task.outputs)(params, batch)
    hand = np.asarray(out["hand_position"])
    for trial in range(min(8, hand.shape[1])):
      (line,) = ax.plot(hand[:, trial, 0], hand[:, trial, 1], lw=1)
      for target in ("target1", "target2"):
        point = np.asarray(batch[target])[trial]
        ax.plot(
          point[0],
          point[1],
          "o",
          color=line.get_color(),
          ms=5,
          mfc="none" if target == "target1" else line.get_color(),
        )
    ax.set_title(label)
    ax.set_aspect("equal")
    ax.set_xlabel("x (m)")
  axes[0][0].set_ylabel("y (m)")
  fig.suptitle("Hand paths (open circle: first target, filled: second)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _median_steps(steps: list) -> str:
  reached = [s for s in steps if s is not None]
  if not reached:
    return f"not reached (0/{len(steps)})"
  return f"{int(np.median(reached))} ({len(reached)}/{len(steps)})"


def report(payload: dict) -> str:
  """Markdown tables of a reproduction JSON (``--table``)."""
  g = _harness.short
  rows = []
  for name, t in payload["tasks"].items():
    d, p, tu, a = (t[m] for m in ("sofo_defaults", "sofo_paper", "sofo_tuned", "adam"))
    edge = ", at grid edge" if a["at_grid_edge"] else ""
    rows.append(
      [
        name,
        t["steps"],
        g(d["final_loss"]),
        f"{g(p['final_loss'])} (max/first {g(p['max_over_first'])})",
        f"{g(tu['final_loss'])} (lr {tu['learning_rate']:g}, λ {tu['damping']:g})",
        f"{g(a['final_loss'])} (lr {a['learning_rate']:g}{edge})",
        g(d["final_loss_per_seed"][0] / tu["final_loss"]),
        g(d["final_loss"] / a["final_loss"]),
      ]
    )
  losses = _harness.markdown_table(
    [
      "task",
      "iterations",
      "SOFO defaults (3 seeds)",
      "SOFO paper, fixed damping (seed 0)",
      "SOFO tuned (seed 0)",
      "Adam best of grid (3 seeds)",
      "defaults / tuned (seed 0)",
      "defaults / Adam",
    ],
    rows,
  )
  rows = []
  for name, t in payload["tasks"].items():
    d, a, eq = t["sofo_defaults"], t["adam"], t["adam_equal_wall_clock"]
    rows.append(
      [
        name,
        g(t["target"]),
        _median_steps(d["steps_to_target"]),
        _median_steps(a["steps_to_target"]),
        g(d["max_over_first"]),
        f"{g(float(np.mean(d['eval']['loss'])))} / "
        f"{g(float(np.mean(a['eval']['loss'])))}",
        f"{eq['sofo_seconds']:.0f} s",
        f"{eq['steps']}, {g(eq['final_loss'])}",
      ]
    )
  speed = _harness.markdown_table(
    [
      "task",
      "target",
      "iterations to target, SOFO defaults",
      "Adam",
      "max loss / first, SOFO defaults",
      "eval loss SOFO / Adam",
      "SOFO time for N it. (3 seeds)",
      "Adam at equal time: it., loss",
    ],
    rows,
  )
  return losses + "\n\n" + speed


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--tasks", default=",".join(TASKS))
  parser.add_argument("--output", default=None, help="JSON path")
  parser.add_argument(
    "--merge",
    action="store_true",
    help="keep the tasks already in the output JSON (to run in parts)",
  )
  parser.add_argument(
    "--batch-size",
    type=int,
    default=None,
    help="override every task's batch size (write to another --output)",
  )
  parser.add_argument(
    "--table",
    action="store_true",
    help="print the markdown tables of an existing JSON and exit",
  )
  args = parser.parse_args(argv)
  if args.table:
    path = Path(args.output) if args.output else _harness.RESULTS / "reproduction.json"
    print(report(json.loads(path.read_text())))
    return 0
  global NUM_TANGENTS
  if args.quick:
    NUM_TANGENTS = QUICK_NUM_TANGENTS
  out = _harness.output_path(args.output, "reproduction.json", args.quick)
  out.parent.mkdir(parents=True, exist_ok=True)
  payload = {
    "command": "python benchmarks/reproduce.py "
    + " ".join(sys.argv[1:] if argv is None else argv),
    "settings": {
      "num_tangents": NUM_TANGENTS,
      "seeds": list(SEEDS),
      "adam_grid": ADAM_GRID,
      "sofo_grid": SOFO_GRID,
      "tune_steps": TUNE_STEPS,
      "smoothing": SMOOTHING,
    },
    "tasks": {},
  }
  if args.merge and out.exists():
    previous = json.loads(out.read_text())
    payload["tasks"] = previous["tasks"]
    payload["command"] = previous["command"] + " && " + payload["command"]
  begin = time.perf_counter()
  for name in args.tasks.split(","):
    payload["tasks"][name] = run_task(name, args.quick, out, args.batch_size)
    payload["seconds"] = time.perf_counter() - begin
    _harness.write_json(out, payload)
    plot(payload, out.with_suffix(".png"))
    _harness.log(f"{name} done; wrote {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
