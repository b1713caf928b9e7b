"""SOFO's acceptance threshold on neurogym decision tasks, several seeds.

``training.fit(task, "sofo", N, key=jax.random.key(seed))`` at the library's
defaults (``StepControl.min_rho = 0.25``) and with ``min_rho = 0.5``, on
MultiSensoryIntegration-v0 and PerceptualDecisionMaking-v0 at
``neurogym.Config`` defaults (64 units, batch 32, 100 steps, K = 64).
Reports the mean of the last 20 training losses and the accuracies on 8
held-out batches (neurogym seed 2024). Needs ``sofo_jax[neurogym]``.

Usage::

    python benchmarks/neurogym_check.py            # 3 seeds, 200 updates: ~3 min, 2-core CPU
    python benchmarks/neurogym_check.py --quick    # a smoke test, writes under /tmp

Writes ``benchmarks/results/neurogym_check.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import _harness
import jax
import numpy as np

import sofo_jax
from sofo_jax import training
from sofo_jax.tasks import neurogym

ENVS = ("MultiSensoryIntegration-v0", "PerceptualDecisionMaking-v0")
VARIANTS = {
  "defaults": {},
  # The defaults before the starting damping became 1.
  "start_damping_1e-4": {"damping": 1e-4},
  # The defaults before the damping floor became 1e-4.
  "floor_1e-6": {"step_control": sofo_jax.StepControl(min_damping=1e-6)},
  "min_rho_0.5": {"step_control": sofo_jax.StepControl(min_rho=0.5)},
  # A trust region: no step longer than a tenth of the parameters' norm.
  "max_step_ratio_0.1": {"step_control": sofo_jax.StepControl(max_step_ratio=0.1)},
  # A stability margin: the step taken 1.5 times as far must still lower the loss.
  "lookahead_1.5": {"step_control": sofo_jax.StepControl(lookahead=1.5)},
}
HELD_OUT_SEED = 2024
HELD_OUT_BATCHES = 8


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--output", default=None)
  parser.add_argument(
    "--variants",
    default=",".join(VARIANTS),
    help=f"comma-separated, from {sorted(VARIANTS)}",
  )
  args = parser.parse_args(argv)
  out = _harness.output_path(args.output, "neurogym_check.json", args.quick)
  steps, seeds = (3, 1) if args.quick else (200, 3)
  rows = []
  for env in ENVS:
    config = neurogym.Config.quick(env) if args.quick else neurogym.Config(env=env)
    task = neurogym.make(config)
    pool = neurogym.generate(config, num_batches=HELD_OUT_BATCHES, seed=HELD_OUT_SEED)
    held_out = [{k: v[i] for k, v in pool.items()} for i in range(HELD_OUT_BATCHES)]
    for variant in args.variants.split(","):
      options = VARIANTS[variant]
      for seed in range(seeds):
        history = training.fit(
          task, "sofo", steps, key=jax.random.key(seed), progress=False, **options
        )
        metrics = [task.metrics(history.params, batch) for batch in held_out]
        row = {
          "env": env,
          "variant": variant,
          "seed": seed,
          "last20_loss": float(np.mean(history.losses[-20:])),
          **{k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
  payload = {
    "command": "python " + " ".join(["benchmarks/neurogym_check.py", *sys.argv[1:]]),
    "steps": steps,
    "config": dataclasses.asdict(neurogym.Config()),
    "rows": rows,
  }
  _harness.write_json(out, payload)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
