"""Does SOFO train at its defaults? The new user's check, on every RNN task.

``sofo_jax.sofo(1.0, K, key=key)`` with every other setting at its default,
from a random initialisation, no warm-up, on the library's RNN tasks at
small CPU sizes (and, with ``--quick``, at each task's ``Config.quick()``).
A run *blows up* when any training loss exceeds 3 times the first. Variants
(``--variants``) compare the defaults with the paper's fixed damping and
with parts of step control turned off.

Usage::

    python benchmarks/defaults_check.py                 # 3 seeds, 120 steps
    python benchmarks/defaults_check.py --quick         # quick configs
    python benchmarks/defaults_check.py --quick --steps 6000 --num-tangents 8 --adam

The last is the long-run check: each run also records how many of its
training losses exceeded 3 times the first and the median of its last
tenth, which a few blown-up batches cannot swamp.

Writes ``benchmarks/results/defaults_check.json`` (``--quick``: a file under
the system's temporary directory unless ``--output`` is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import _harness
import jax
import numpy as np
import optax

import sofo_jax
from sofo_jax import training
from sofo_jax.tasks import delayed_addition, double_reach, flip_flop, kalman, lorenz

# The sizes of the reliability issue's check: what a new user tries first.
CPU_SIZES = {
  "flip_flop": (flip_flop, dict(num_hidden=32, num_steps=100, batch_size=32)),
  "lorenz": (lorenz, dict(num_hidden=64, batch_size=64)),
  "kalman": (kalman, dict(num_hidden=32, num_steps=100)),
  "double_reach": (double_reach, dict(num_hidden=32, dt=0.01, batch_size=16)),
  "delayed_addition": (
    delayed_addition,
    dict(num_hidden=32, num_steps=100, batch_size=64),
  ),
}

VARIANTS = {
  "defaults": {},
  "paper_fixed_damping": {"adaptive": False},
  # The defaults before the starting damping became 1.
  "start_damping_1e-4": {"damping": 1e-4},
  # The defaults before the damping floor became 1e-4.
  "floor_1e-6": {"step_control": sofo_jax.StepControl(min_damping=1e-6)},
  # Higher floors, against the blow-ups of long runs at small batches.
  "floor_1e-3": {"step_control": sofo_jax.StepControl(min_damping=1e-3)},
  "floor_1e-2": {"step_control": sofo_jax.StepControl(min_damping=1e-2)},
  "no_next_batch_check": {"step_control": sofo_jax.StepControl(revert_ratio=None)},
  "fast_damping_decrease": {"step_control": sofo_jax.StepControl(decrease=0.5)},
  "min_rho": {"step_control": sofo_jax.StepControl(min_rho=0.25)},
  "min_rho_zero": {"step_control": sofo_jax.StepControl(min_rho=0.0)},
  "min_rho_half": {"step_control": sofo_jax.StepControl(min_rho=0.5)},
  "max_step_ratio_0.1": {"step_control": sofo_jax.StepControl(max_step_ratio=0.1)},
  "max_step_ratio_0.15": {"step_control": sofo_jax.StepControl(max_step_ratio=0.15)},
  # A stability margin: the step taken 1.5 times as far must still lower the loss.
  "lookahead_1.5": {"step_control": sofo_jax.StepControl(lookahead=1.5)},
  # A stricter next-batch check: undo the last step at a smaller rise.
  "revert_1.25": {"step_control": sofo_jax.StepControl(revert_ratio=1.25)},
  "revert_1.5": {"step_control": sofo_jax.StepControl(revert_ratio=1.5)},
  # The options beyond the paper, each on top of the defaults.
  "momentum": {"momentum": True},
  # The defaults without it (momentum is on by default).
  "no_momentum": {"momentum": False},
  "recycle_quarter": {"num_recycled": -4},  # K // 4, resolved in run()
  "orthonormal": {"tangent_distribution": "orthonormal"},
  # Step control below the paper's learning rate of 1 (Kalman's best in
  # benchmarks/results/learning_rate_spikes.json).
  "lr_0.3": {"learning_rate": 0.3},
  # The paper's rate for Kalman and delayed addition.
  "lr_0.1": {"learning_rate": 0.1},
  # The paper's rate at first, then the noise floor of 0.1 from step 1000.
  "lr_1_to_0.1": {"learning_rate": optax.linear_schedule(1.0, 0.1, 1000)},
  # Decoupled weight decay against the outward drift of the parameters in
  # long runs at batch 4 (their norm ended 35x Adam's on flip-flop).
  "weight_decay_1e-4": {"weight_decay": 1e-4},
  "weight_decay_1e-3": {"weight_decay": 1e-3},
  "weight_decay_1e-2": {"weight_decay": 1e-2},
}
DEFAULT_VARIANTS = (
  "defaults",
  "paper_fixed_damping",
  "no_next_batch_check",
  "fast_damping_decrease",
)
ADAM_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def make_task(name: str, quick: bool, batch_size: int | None = None):
  module, overrides = CPU_SIZES[name]
  config = (
    module.Config.quick()
    if quick
    else dataclasses.replace(module.Config(), **overrides)
  )
  if batch_size is not None:
    config = dataclasses.replace(config, batch_size=batch_size)
  return module.make(config)


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The (initialisation, batches, tangents) keys of :func:`run` for ``seed``."""
  init_key, data_key, tangent_key = jax.random.split(jax.random.key(seed), 3)
  return init_key, data_key, tangent_key


def run(task, options: dict, seed: int, num_steps: int, num_tangents: int) -> dict:
  """One training run; the losses are those of each batch before its update."""
  init_key, data_key, tangent_key = run_keys(seed)
  if options.get("num_recycled", 0) < 0:
    options = {**options, "num_recycled": num_tangents // -options["num_recycled"]}
  learning_rate = options.get("learning_rate", 1.0)
  if options.get("method") == "adam":
    optimizer = optax.with_extra_args_support(optax.adam(learning_rate))
  else:
    optimizer = _harness.sofo_from_options(options, num_tangents, tangent_key)
  method = options.get("method", "sofo")
  params = task.init_params(init_key)
  step = training.make_train_step(task, method, optimizer)

  def body(carry, batch_key):
    carry, loss = step(carry, batch_key)
    return carry, loss

  run_all = jax.jit(lambda carry, keys: jax.lax.scan(body, carry, keys))
  (params, state), losses = run_all(
    (params, optimizer.init(params)), jax.random.split(data_key, num_steps)
  )
  losses = np.asarray(losses)
  counts = (0, 0)
  if method == "sofo":
    diagnostics = sofo_jax.get_diagnostics(state)
    counts = (int(diagnostics.num_rejected_steps), int(diagnostics.num_reverted_steps))
  return {
    "first_loss": float(losses[0]),
    # The largest loss that is not NaN; the NaN ones are counted apart.
    "max_loss": float(np.nanmax(losses)) if np.isfinite(losses).any() else float("nan"),
    "nonfinite_losses": int(np.sum(~np.isfinite(losses))),
    "last20_mean": float(np.mean(losses[-20:])),
    # Over long runs: how many batches blew up, and the typical late loss
    # (a median, which the blown-up batches cannot swamp).
    "steps_above_3x_first": int(np.sum(~(losses <= 3 * losses[0]))),
    "last_tenth_median": float(np.nanmedian(losses[-max(1, losses.size // 10) :])),
    # A schedule is named by its variant.
    "learning_rate": "schedule" if callable(learning_rate) else float(learning_rate),
    "blew_up": bool(not np.all(np.isfinite(losses)) or np.max(losses) > 3 * losses[0]),
    "rejected_steps": counts[0],
    "reverted_steps": counts[1],
    # Long runs at small batches drift outward; Adam's stay near the start.
    "final_params_norm": float(optax.tree.norm(params)),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="each task's Config.quick()")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=120)
  parser.add_argument("--num-tangents", type=int, default=32)
  parser.add_argument(
    "--variants",
    default=",".join(DEFAULT_VARIANTS),
    help=f"comma-separated, from {sorted(VARIANTS)}",
  )
  parser.add_argument(
    "--adam",
    action="store_true",
    help=f"also Adam + BPTT at each rate of {ADAM_GRID}, same seeds",
  )
  parser.add_argument(
    "--batch-size", type=int, default=None, help="replaces each task's batch size"
  )
  parser.add_argument("--tasks", default=",".join(CPU_SIZES))
  parser.add_argument("--output", default=None)
  args = parser.parse_args(argv)
  output = _harness.output_path(args.output, "defaults_check.json", args.quick)
  rows = []
  variants = args.variants.split(",")
  if args.adam:
    for rate in ADAM_GRID:
      VARIANTS[f"adam_{rate:g}"] = {"method": "adam", "learning_rate": rate}
      variants.append(f"adam_{rate:g}")
  for variant in variants:
    for name in args.tasks.split(","):
      task = make_task(name, args.quick, args.batch_size)
      for seed in range(args.seeds):
        begin = time.perf_counter()
        row = run(task, VARIANTS[variant], seed, args.steps, args.num_tangents)
        row.update(variant=variant, task=name, seed=seed)
        rows.append(row)
        print(
          f"{variant:22s} {name:17s} seed {seed}  first {row['first_loss']:.3g}  "
          f"max {row['max_loss']:.3g}  last-20 mean {row['last20_mean']:.4g}  "
          f"rejected {row['rejected_steps']}  reverted {row['reverted_steps']}  "
          f"above 3x {row['steps_above_3x_first']}"
          f"{'  BLOW-UP' if row['blew_up'] else ''}  ({time.perf_counter() - begin:.0f} s)",
          flush=True,
        )
  summary = {}
  for variant in variants:
    mine = [r for r in rows if r["variant"] == variant]
    summary[variant] = {
      "blow_ups": sum(r["blew_up"] for r in mine),
      "runs": len(mine),
      "last20_mean_by_task": {
        name: float(np.mean([r["last20_mean"] for r in mine if r["task"] == name]))
        for name in args.tasks.split(",")
      },
      "steps_above_3x_first_by_task": {
        name: [r["steps_above_3x_first"] for r in mine if r["task"] == name]
        for name in args.tasks.split(",")
      },
      "last_tenth_median_by_task": {
        name: float(
          np.mean([r["last_tenth_median"] for r in mine if r["task"] == name])
        )
        for name in args.tasks.split(",")
      },
    }
    print(variant, summary[variant])
  if args.adam:
    summary["adam_best_of_grid"] = {
      name: min(
        summary[v]["last20_mean_by_task"][name]
        for v in variants
        if v.startswith("adam_")
      )
      for name in args.tasks.split(",")
    }
    print("adam_best_of_grid", summary["adam_best_of_grid"])
  result = {
    "command": "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    if argv is None
    else str(argv),
    "settings": {
      "steps": args.steps,
      "num_tangents": args.num_tangents,
      "learning_rate": 1.0,  # SOFO's, unless a variant sets its own
      "quick": args.quick,
      "batch_size": args.batch_size,
    },
    "summary": summary,
    "runs": rows,
  }
  _harness.write_json(output, result)
  print(f"wrote {output}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
