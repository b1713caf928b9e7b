"""How much the loss at a random initialisation varies, across seeds and batches.

``defaults_check.py`` counts a run's training losses above 3× its first.
That bar is only as even as the first loss. This script measures where the
first loss's spread comes from: for each initialisation seed (the
initial parameters ``defaults_check.run`` draws for that seed), the loss on
the same few fixed batches. If it varies far more across seeds than across
batches, the initial parameters set it. For the double reach it also
records how far the untrained network turns the arm's joints within a trial
(radians from the start): an untrained closed loop of network and arm that
spins a joint is what a high first loss looks like there.

Usage::

    python benchmarks/initial_losses.py                   # double reach, 100 seeds, seconds
    python benchmarks/initial_losses.py --task kalman --seeds 20
    python benchmarks/initial_losses.py --quick           # smoke test, /tmp

Writes ``benchmarks/results/initial_losses.json``.
"""

from __future__ import annotations

import argparse
import sys

import _harness
import defaults_check
import jax
import jax.numpy as jnp
import numpy as np


def initial_params(task, seed: int):
  """The initial parameters of ``defaults_check.run`` for ``seed``."""
  init_key, _, _ = defaults_check.run_keys(seed)
  return task.init_params(init_key)


def measure(task, seeds: range, num_batches: int) -> dict:
  """Per seed: the loss on each fixed batch, and the largest joint excursion."""
  batches = [task.sample_batch(jax.random.key(1000 + b)) for b in range(num_batches)]
  turns_joints = task.name == "double_reach"

  @jax.jit
  def one(params, batch):
    loss = task.loss_value(params, batch)
    if not turns_joints:
      return loss, jnp.zeros(())
    theta = task.outputs(params, batch)["theta"]
    return loss, jnp.max(jnp.abs(theta - theta[0]))

  losses = np.zeros((len(seeds), num_batches))
  excursion = np.zeros((len(seeds), num_batches))
  for i, seed in enumerate(seeds):
    params = initial_params(task, seed)
    for b, batch in enumerate(batches):
      loss, turn = one(params, batch)
      losses[i, b], excursion[i, b] = float(loss), float(turn)
  return {
    "losses": losses,
    "excursion": excursion.max(axis=1) if turns_joints else None,
  }


def summarise(losses: np.ndarray, excursion: np.ndarray | None) -> dict:
  """Spread across seeds (of the mean over batches) and across batches."""
  per_seed = losses.mean(axis=1)
  summary = {
    "per_seed_mean_loss": per_seed,
    "quantiles_across_seeds": dict(
      zip(("10", "50", "90", "99"), np.percentile(per_seed, [10, 50, 90, 99]))
    ),
    "max_over_min_across_seeds": float(per_seed.max() / per_seed.min()),
    # For each seed, the largest batch's loss over the smallest's.
    "max_over_min_across_batches_median": float(
      np.median(losses.max(axis=1) / losses.min(axis=1))
    ),
    "max_over_min_across_batches_max": float(
      np.max(losses.max(axis=1) / losses.min(axis=1))
    ),
    "seeds_above_1": [int(s) for s in np.flatnonzero(per_seed > 1.0)],
  }
  if excursion is not None:
    summary["largest_joint_excursion_rad"] = excursion
    summary["seeds_turning_a_joint_past_pi"] = [
      int(s) for s in np.flatnonzero(excursion > np.pi)
    ]
  return summary


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="the quick config, 3 seeds")
  parser.add_argument(
    "--task", default="double_reach", choices=sorted(defaults_check.CPU_SIZES)
  )
  parser.add_argument("--seeds", type=int, default=100)
  parser.add_argument("--batches", type=int, default=6)
  parser.add_argument("--output", default=None, help="JSON path")
  args = parser.parse_args(argv)

  num_seeds = 3 if args.quick else args.seeds
  num_batches = 2 if args.quick else args.batches
  task = defaults_check.make_task(args.task, args.quick)
  figures = measure(task, range(num_seeds), num_batches)
  out = _harness.output_path(args.output, "initial_losses.json", args.quick)
  summary = summarise(figures["losses"], figures["excursion"])
  _harness.write_json(
    out,
    {
      "command": "python benchmarks/initial_losses.py "
      + " ".join(sys.argv[1:] if argv is None else argv),
      "task": args.task,
      "size": "quick" if args.quick else "cpu",
      "seeds": num_seeds,
      "batches": num_batches,
      **summary,
      "losses": figures["losses"],
    },
  )
  _harness.log(
    f"{args.task}: median initial loss {summary['quantiles_across_seeds']['50']:.3g}, "
    f"seeds above 1: {summary['seeds_above_1']}; max/min across seeds "
    f"{summary['max_over_min_across_seeds']:.3g}, across batches (median) "
    f"{summary['max_over_min_across_batches_median']:.3g}"
  )
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
