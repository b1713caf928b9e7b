"""Per-step traces of late loss spikes, one seed at a time.

``step_control_variants.py`` reports the largest training loss over the
first; this script says what happened at each spike. It trains one seed at a
time (not vmapped over seeds, so each run takes its own floating-point path)
at the reproduction's sizes, batches and initial parameters, records SOFO's
diagnostics every step, and lists every step whose training loss exceeds
``--threshold`` times the first: its ratio, whether the next-batch check
undid the last step there (``step_reverted``: the last step caused the
spike) or not (the parameters before the last step were unstable on that
batch too), and the damping. It also records the length of every update,
so that each spike's last step can be set against the steps before it: a
trust region relative to recent steps can only stop spikes whose step is
long next to those. And it records the largest eigenvalue of the sketched
Gauss–Newton matrix, which jumps by orders of magnitude on batches that
bring the network near an instability: the trace counts such jumps
without a spike and how many of them a spike followed, to tell whether
they warn of one.

On the tasks in :data:`PER_EXAMPLE` it also records each example's loss on
the step's own batch before and after the update. A spike comes from a
fresh batch whose inputs push the network across an instability; if the
update that led there already raised the loss of a few examples of its own
batch sharply (while the mean fell), a check on the worst example could
refuse it. The trace sets that worst ratio before each spike against its
distribution over all accepted updates, and records how much of a spiking
batch's loss sits in its worst example.

Each run also records its final parameters' metrics on the reproduction's
held-out batches (``held_out``; Kalman's MSE over the optimal filter's
among them), so that a variant that spikes less can be checked to end no
worse.

Usage::

    python benchmarks/spike_trace.py                          # Kalman, 3 seeds, ~10 min
    python benchmarks/spike_trace.py --variants defaults,start_damping_1e-4
    python benchmarks/spike_trace.py --quick                  # smoke test, /tmp

Writes ``benchmarks/results/spike_trace.json``.
"""

from __future__ import annotations

import argparse
import sys
import time

import _harness
import jax
import numpy as np
import optax
import reproduce
import step_control_variants

import sofo_jax
from sofo_jax import training


def _double_reach_per_example(outputs: dict) -> jax.Array:
  """Each trial's weighted squared hand error, summed over time."""
  error = jax.numpy.sum(
    jax.numpy.square(outputs["hand_position"] - outputs["target_position"]), -1
  ) + jax.numpy.sum(jax.numpy.square(outputs["hand_velocity"]), -1)
  return jax.numpy.sum(outputs["weight"] * error, 0)


def _kalman_per_example(outputs: dict) -> jax.Array:
  """Each trial's squared estimation error, summed over time."""
  error = jax.numpy.square(outputs["estimates"] - outputs["latent"])
  return jax.numpy.sum(error, (0, 2))


# Per-example losses (up to one constant factor per task, which ratios do
# not see), from the task's ``outputs``.
PER_EXAMPLE = {
  "double_reach": _double_reach_per_example,
  "kalman": _kalman_per_example,
}

# The window of earlier updates a step's length is compared with, and of
# later steps in which a spike counts as following a curvature jump.
RECENT_STEPS = 20
# A curvature jump: the largest sketched Gauss–Newton eigenvalue above this
# many times its median over the run.
CURVATURE_JUMP = 100.0


def trace(task, optimizer, params, batch_keys) -> tuple[dict[str, np.ndarray], dict]:
  """Per-step loss, step-control diagnostics and update lengths of one run.

  Returns:
    ``(records, held_out)``: the per-step records, and the metrics of the
    final parameters on the reproduction's evaluation batches.
  """
  step = training.make_train_step(task, "sofo", optimizer)
  per_example = PER_EXAMPLE.get(task.name)

  def example_losses(params, batch_key):
    return per_example(task.outputs(params, task.sample_batch(batch_key)))

  def traced(carry, batch_key):
    before = carry[0]
    carry, loss = step(carry, batch_key)
    diagnostics = sofo_jax.get_diagnostics(carry[1])
    examples = {}
    if per_example is not None:
      old = example_losses(before, batch_key)
      new = example_losses(carry[0], batch_key)
      examples = {
        # The update's worst effect on one example of its own batch.
        "worst_example_ratio": jax.numpy.max(new / old),
        # How much of this batch's loss (before the update) one example holds.
        "worst_example_share": jax.numpy.max(old) / jax.numpy.sum(old),
      }
    return carry, {
      **examples,
      "loss": loss,
      "damping": diagnostics.damping_parameter,
      "reverted": diagnostics.step_reverted,
      "rejected": diagnostics.step_rejected,
      "max_eigenvalue": diagnostics.max_eigenvalue,
      "update_norm": optax.tree.norm(optax.tree.sub(carry[0], before)),
      "params_norm": optax.tree.norm(before),
    }

  def run(carry, keys):
    (final, _), records = jax.lax.scan(traced, carry, keys)
    return final, records

  final, records = jax.jit(run)((params, optimizer.init(params)), batch_keys)
  records = {name: np.asarray(value) for name, value in records.items()}
  # The final parameters on the reproduction's fixed evaluation batches: a
  # run can end where held-out trials cross an instability.
  held_out = reproduce.evaluate(task, reproduce.stacked(final))
  return records, {name: values[0] for name, values in held_out.items()}


def recent(index: int) -> slice:
  """The :data:`RECENT_STEPS` steps before step ``index``."""
  return slice(max(0, index - RECENT_STEPS), index)


def over_recent(records: dict[str, np.ndarray], index: int) -> float:
  """Length of update ``index`` over the median of the last accepted ones.

  Accepted updates only (not undone, not rejected), over the
  :data:`RECENT_STEPS` before ``index``; NaN when there are none.
  """
  norms = records["update_norm"]
  taken = (norms > 0) & ~records["reverted"]
  window = recent(index)
  lengths = norms[window][taken[window]]
  return float(norms[index] / np.median(lengths)) if lengths.size else float("nan")


def before_spike(
  records: dict[str, np.ndarray], curvature: np.ndarray, index: int
) -> dict:
  """The update that led to the spike at ``index``, and the steps before it.

  That update is step ``index - 1``'s (a step's loss is measured before its
  update); all None for a spike at the first step.
  """
  if index == 0:
    return dict.fromkeys(
      ("last_update_over_recent", "last_update_over_params", "curvature_jump_before")
    )
  last = index - 1
  return {
    "last_update_over_recent": over_recent(records, last),
    "last_update_over_params": float(
      records["update_norm"][last] / records["params_norm"][last]
    ),
    # The largest curvature over the run's median in the steps before.
    "curvature_jump_before": float(curvature[recent(index)].max()),
  }


def quantiles(values: np.ndarray) -> dict[str, float]:
  """The median, 90th and 99th percentiles and the largest of ``values``."""
  return {
    name: float(value)
    for name, value in zip(
      ("50", "90", "99", "max"), np.percentile(values, [50, 90, 99, 100])
    )
  }


def spikes(records: dict[str, np.ndarray], threshold: float) -> dict:
  """Summary of one run's steps with a loss above ``threshold`` × the first."""
  loss = records["loss"]
  above = loss > threshold * loss[0]
  longest = current = 0
  for flag in above:
    current = current + 1 if flag else 0
    longest = max(longest, current)
  where = np.flatnonzero(above)
  accepted = (records["update_norm"] > 0) & ~records["reverted"]
  ratios = np.array([over_recent(records, i) for i in np.flatnonzero(accepted[1:]) + 1])
  ratios = ratios[np.isfinite(ratios)]
  curvature = records["max_eigenvalue"] / np.median(records["max_eigenvalue"])
  jumps = np.flatnonzero((curvature > CURVATURE_JUMP) & ~above)
  return {
    "first_loss": float(loss[0]),
    "final_loss": reproduce.final_loss(loss),
    "max_over_first": float(np.nanmax(loss / loss[0])),
    "num_spikes": int(above.sum()),
    "num_reverted_at_spikes": int(records["reverted"][where].sum()),
    "num_reverted": int(records["reverted"].sum()),
    "num_rejected": int(records["rejected"].sum()),
    "longest_spike_run": longest,
    # How long accepted updates are next to the ones before them, over the
    # whole run: the scale a bound relative to recent steps would work on.
    "accepted_update_over_recent_quantiles": quantiles(ratios) if ratios.size else None,
    # Steps without a spike whose curvature jumped, and how many of those
    # a spike followed within RECENT_STEPS steps.
    "num_curvature_jumps": int(jumps.size),
    "curvature_jumps_followed_by_spike": int(
      sum(above[j + 1 : j + 1 + RECENT_STEPS].any() for j in jumps)
    ),
    **worst_example_summary(records, accepted),
    "spikes": [
      {
        "step": int(i),
        "over_first": float(loss[i] / loss[0]),
        "reverted": bool(records["reverted"][i]),
        "damping": float(records["damping"][i]),
        **before_spike(records, curvature, i),
        **worst_example_at(records, accepted, i),
      }
      for i in where
    ],
  }


def worst_example_summary(records: dict[str, np.ndarray], accepted: np.ndarray) -> dict:
  """Quantiles of the worst per-example ratio over all accepted updates."""
  if "worst_example_ratio" not in records:
    return {}
  ratios = records["worst_example_ratio"][accepted]
  shares = records["worst_example_share"]
  return {
    "worst_example_ratio_quantiles": quantiles(ratios),
    "worst_example_share_quantiles": quantiles(shares),
  }


def worst_example_at(
  records: dict[str, np.ndarray], accepted: np.ndarray, index: int
) -> dict:
  """The worst per-example ratio of the update before spike ``index``.

  With its percentile among all accepted updates (100: the largest of the
  run), and the share of the spiking batch's loss in its worst example.
  """
  if "worst_example_ratio" not in records or index == 0:
    return {}
  ratio = records["worst_example_ratio"][index - 1]
  others = records["worst_example_ratio"][accepted]
  return {
    "worst_example_ratio_before": float(ratio),
    "worst_example_ratio_percentile": float(100.0 * np.mean(others <= ratio)),
    "worst_example_share": float(records["worst_example_share"][index]),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--task", default="kalman")
  parser.add_argument("--variants", default="defaults,start_damping_1e-4")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--threshold", type=float, default=3.0)
  parser.add_argument(
    "--batch-size",
    type=int,
    default=None,
    help="override the reproduction's batch size (also the held-out batches')",
  )
  parser.add_argument("--output", default=None)
  args = parser.parse_args(argv)
  if args.quick:
    reproduce.NUM_TANGENTS = reproduce.QUICK_NUM_TANGENTS
  out = _harness.output_path(args.output, "spike_trace.json", args.quick)
  task = reproduce.reproduction_task(args.task, args.quick, args.batch_size)
  steps = 20 if args.quick else reproduce.STEPS.get(args.task, reproduce.DEFAULT_STEPS)
  seeds = [int(seed) for seed in args.seeds.split(",")]
  payload = {
    "command": "python " + " ".join(["benchmarks/spike_trace.py", *sys.argv[1:]]),
    "task": args.task,
    "steps": steps,
    "threshold": args.threshold,
    "batch_size": task.config.batch_size,
    "num_tangents": reproduce.NUM_TANGENTS,
    "runs": {},
  }
  for variant in args.variants.split(","):
    make, settings = step_control_variants.sofo_variant(variant)
    for seed in seeds:
      begin = time.perf_counter()
      # The same keys as reproduce.train, so the same initial parameters
      # and batches.
      init_key, data_key, tangent_key = jax.random.split(jax.random.key(seed), 3)
      records, held_out = trace(
        task,
        make(settings[0], tangent_key),
        task.init_params(init_key),
        jax.random.split(data_key, steps),
      )
      row = spikes(records, args.threshold)
      row["held_out"] = held_out
      row["seconds"] = time.perf_counter() - begin
      payload["runs"][f"{variant}/seed{seed}"] = row
      _harness.log(
        f"{variant} seed {seed}: max/first {row['max_over_first']:.3g}, "
        f"{row['num_spikes']} spikes ({row['num_reverted_at_spikes']} undone), "
        f"longest run {row['longest_spike_run']}, final {row['final_loss']:.4g}, "
        f"held out {held_out['loss']:.4g}"
      )
      _harness.write_json(out, payload)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
