"""The delayed double reach at the paper's size, SOFO against Adam at equal time.

The paper trains the double reach with 64 ReLU units, dt = 2 ms and 2 s
trials (T = 1000), batches of 256 and K = 256, and reports that SOFO
produces the delayed double reach while Adam does not. On this project's CPU
only smaller versions fit (``reproduce.py``, ``double_reach_scale.py``);
this script runs the paper's size, ``double_reach.Config()``, on one GPU.

Both methods train with :func:`sofo_jax.training.fit` from the same key, so
from the same initial parameters on the same batches, each for the same
wall-clock budget (compilation excluded; ``fit``'s ``max_seconds``):

- SOFO at its defaults, ``sofo_jax.sofo(1.0, 256, key=key)``;
- Adam at the config's ``adam_learning_rate`` (1e-3, the best of the grid
  at 64 units in ``double_reach_scale.json``), with backpropagation.

It records the loss curves against steps and seconds, both losses at equal
iterations (at the number of steps the slower method reached) and at equal
time (at the shorter run's training seconds), the reach
errors on the reproduction's fixed evaluation batches with the verdict
(both errors under 2 cm), and the hand paths (``double_reach_gpu.png``).

Time budget: ``--budget-s`` covers the whole script. Each method trains for
``--train-share`` of it (default 0.4); Adam gets no more than SOFO used and
no more than what is left before the deadline, less a reserve for compiling
and evaluating. ``DIR/double_reach_gpu.json`` (``_seed{S}`` and
``_{precision}`` added to the name for a seed other than 0 or a
``--matmul-precision``) is rewritten after each method, so a run cut short
keeps what it measured; the hand paths go beside it, as ``.png``.

At TF32, JAX's default matmul precision on the H200, step control rejected
about a third of SOFO's steps on seed 0 once the loss had levelled off, and
none with ``--matmul-precision float32`` (``benchmarks/gpu_figures.md``,
"Rejections on the GPU"); where rejections fall is recorded
(``rejected_per_100_steps``). Evaluating only step control's losses in
float32 rejected more (``double_reach_gpu_loss_float32.json``, made by this
script at commit 09f9a73 with a ``--loss-precision`` option since removed):
the rounding that matters is the sketch's.

Usage::

    python benchmarks/double_reach_gpu.py --out benchmarks/results  # one H100/H200
    python benchmarks/double_reach_gpu.py --dry-run                 # quick config, a CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _harness
import jax
import numpy as np
import reproduce

from sofo_jax import training
from sofo_jax.tasks import double_reach

STEP_LIMIT = 100_000  # far more than any budget here allows
CHUNK_STEPS = {"full": 25, "dry_run": 5}
# Seconds kept back before the deadline for Adam's compilation and the
# evaluation; the dry run's are a CPU's.
RESERVE_S = {"full": 40.0, "dry_run": 5.0}


def _loss_at(losses: np.ndarray, step: int) -> float:
  """Mean training loss over the ``SMOOTHING`` steps that end at ``step``."""
  window = losses[max(0, step - reproduce.SMOOTHING) : step]
  return float(np.mean(window))


def result_name(seed: int, matmul_precision: str | None) -> str:
  """The JSON's file stem: one per seed and precision, so a rerun keeps the others."""
  name = "double_reach_gpu"
  name += f"_seed{seed}" if seed else ""
  name += f"_{matmul_precision}" if matmul_precision else ""
  return name


def method_figures(task, history: training.History) -> dict:
  """Losses, time, blow-ups, reach errors and verdict of one training run."""
  losses = history.losses
  errors = reproduce.evaluate(task, reproduce.stacked(history.params))
  index = np.unique(np.linspace(0, losses.size - 1, 200).astype(int))
  return {
    "learning_rate": float(history.settings["learning_rate"]),
    "num_tangents": history.settings["num_tangents"],
    "steps": int(losses.size),
    "train_seconds": float(history.seconds[-1]),
    "ms_per_step": 1e3 * float(history.seconds[-1]) / losses.size,
    "first_loss": float(losses[0]),
    "final_loss": _loss_at(losses, losses.size),
    "max_over_first": float(np.nanmax(losses / losses[0])),
    "steps_above_3x_first": int(np.sum(losses > 3 * losses[0])),
    "steps_rejected": int(np.sum(history.step_rejected)),
    # Where the rejections fell: each entry counts those of 100 steps.
    "rejected_per_100_steps": [
      int(n) for n in reproduce.per_100_steps(history.step_rejected)
    ],
    "steps_reverted": int(np.sum(history.step_reverted)),
    "num_nonfinite_steps": history.num_nonfinite_steps,
    "curve": {
      "step": index.tolist(),
      "seconds": [float(history.seconds[i]) for i in index],
      "loss": [float(losses[i]) for i in index],
    },
    "eval_loss": errors["loss"][0],
    **reproduce.reach_verdict(errors),
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--dry-run", "--quick", dest="dry_run", action="store_true")
  parser.add_argument("--budget-s", type=float, default=300.0)
  parser.add_argument("--train-share", type=float, default=0.4)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--matmul-precision",
    default=None,
    choices=("float32", "tensorfloat32", "bfloat16"),
    help="jax.default_matmul_precision for both methods (default: JAX's, TF32 on "
    "recent NVIDIA GPUs); float32 tells whether TF32 rounding in step control's "
    "loss evaluations causes rejections",
  )
  parser.add_argument("--out", default=None, help="output directory")
  args = parser.parse_args(argv)
  if not 0 < args.train_share <= 0.5:
    parser.error("--train-share must be in (0, 0.5]: two methods share the budget")
  begin = time.perf_counter()
  mode = "dry_run" if args.dry_run else "full"
  config = double_reach.Config.quick() if args.dry_run else double_reach.Config()
  task = double_reach.make(config)
  name = result_name(args.seed, args.matmul_precision)
  path = _harness.output_path(
    str(Path(args.out) / f"{name}.json") if args.out else None,
    f"{name}.json",
    args.dry_run,
  )
  device = jax.devices()[0]
  payload = {
    "command": "python benchmarks/double_reach_gpu.py "
    + " ".join(sys.argv[1:] if argv is None else argv),
    "mode": mode,
    "device_kind": device.device_kind,
    "platform": device.platform,
    "jax": jax.__version__,
    "config": {
      "num_hidden": config.num_hidden,
      "dt": config.dt,
      "num_time_steps": config.num_steps,
      "batch_size": config.batch_size,
      "num_tangents": config.num_tangents,
    },
    "seed": args.seed,
    "matmul_precision": args.matmul_precision,
    "budget_s": args.budget_s,
    "reach_tolerance_m": reproduce.REACH_TOLERANCE,
    "methods": {},
  }
  key = jax.random.key(args.seed)
  train_s = args.train_share * args.budget_s
  histories = {}
  for method in ("sofo", "adam"):
    if method == "adam":
      left = args.budget_s - (time.perf_counter() - begin) - RESERVE_S[mode]
      train_s = min(histories["sofo"].seconds[-1], left)
      if train_s <= 0:
        payload["methods"][method] = {"status": "skipped: time budget"}
        break
    _harness.log(f"{method}: training for up to {train_s:.0f} s")
    with jax.default_matmul_precision(args.matmul_precision):
      history = training.fit(
        task,
        method,
        STEP_LIMIT,
        key=key,
        chunk_size=CHUNK_STEPS[mode],
        max_seconds=train_s,
        progress=False,
      )
    histories[method] = history
    figures = method_figures(task, history)
    payload["methods"][method] = figures
    payload["elapsed_s"] = time.perf_counter() - begin
    _harness.write_json(path, payload)
    _harness.log(
      f"{method}: {figures['steps']} steps, {figures['ms_per_step']:.1f} ms/step, "
      + reproduce.reach_line(figures)
    )

  if len(histories) == 2:
    # Equal iterations: both at the step count the slower method reached.
    common = min(h.losses.size for h in histories.values())
    payload["equal_iterations"] = {
      "steps": common,
      **{m: _loss_at(h.losses, common) for m, h in histories.items()},
    }
    # Equal time: both at the training seconds the shorter run reached.
    seconds = min(float(h.seconds[-1]) for h in histories.values())
    payload["equal_seconds"] = {
      "seconds": seconds,
      **{
        m: _loss_at(h.losses, int(np.searchsorted(h.seconds, seconds, "right")))
        for m, h in histories.items()
      },
    }
  payload["elapsed_s"] = time.perf_counter() - begin
  _harness.write_json(path, payload)
  reproduce.plot_hand_paths(
    task,
    {
      f"{m} ({payload['methods'][m]['steps']} it.)": h.params
      for m, h in histories.items()
    },
    path.with_suffix(".png"),
  )
  _harness.log(f"wrote {path} after {payload['elapsed_s']:.0f} s")
  return payload


if __name__ == "__main__":
  main()
