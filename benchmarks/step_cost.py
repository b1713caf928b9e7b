"""Cost of one SOFO step against its irreducible part and against Adam + BPTT.

For a vanilla RNN (N = 128, B = 64, T = 100 by default) and K in {16, 64, 128},
times, side by side in one run:

- ``jvp``: the bare ``vmap`` of ``jax.jvp`` of the loss over K given tangents
  (the irreducible cost of any K-tangent forward-mode method);
- ``sofo``: a full SOFO training step (tangent sampling, sketch with
  Gauss–Newton assembly, K×K solve, parameter update), jitted as one program;
- ``adam_bptt``: an Adam step with a backpropagated gradient;
- ``sketch`` and ``tangent_draw``: the sketch alone (given tangents) and the
  tangent draw alone, parts of the SOFO step for the breakdown.

The first three are timed round-robin (:func:`_harness.time_interleaved`),
so machine drift hits them alike, and ``sofo_over_jvp`` is the median over
rounds of the per-round ratio (with its interquartile range and the ratio of
the minima); the two parts are then timed round-robin with the jvp
(``sketch_over_jvp``). Writes ``benchmarks/results/step_cost.json`` and
prints a table. The target is ``sofo / jvp <= 1.15``.

Usage: ``python benchmarks/step_cost.py [--quick] [--repeats R]``
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # pylint: disable=g-import-not-at-top
import _rnn_problem  # pylint: disable=g-import-not-at-top

import sofo_jax  # pylint: disable=g-import-not-at-top


def make_problem(n_hidden, batch, horizon):
  """``(params, loss_fn)`` for the RNN of :mod:`_rnn_problem` on fixed data."""
  params, xs, ys = _rnn_problem.make(n_hidden, batch, horizon)
  return params, lambda p: _rnn_problem.loss_fn(p, xs, ys)


def bench(n_hidden, batch, horizon, tangent_counts, repeats):
  params, loss_fn = make_problem(n_hidden, batch, horizon)
  value_fn = lambda q: loss_fn(q).value
  adam = optax.adam(1e-3)
  adam_state = adam.init(params)

  @jax.jit
  def adam_step(p, s):
    updates, s = adam.update(jax.grad(value_fn)(p), s, p)
    return optax.apply_updates(p, updates), s

  rows = []
  for k in tangent_counts:
    tangents = sofo_jax.sample_tangents(jax.random.key(1), params, k)
    opt = sofo_jax.sofo(1.0, k, 1e-4, key=jax.random.key(2))
    state = opt.init(params)

    bare_jvp = jax.jit(functools.partial(_harness.bare_jvp, value_fn))

    @jax.jit
    def sofo_step(p, s):
      updates, s = opt.update(None, s, p, loss_fn=loss_fn)  # pylint: disable=cell-var-from-loop
      return optax.apply_updates(p, updates), s

    # Parts of the SOFO step, for the breakdown only.
    sketch_only = jax.jit(lambda p, t: sofo_jax.sketch(loss_fn, p, t))
    draw_only = jax.jit(lambda key: sofo_jax.sample_tangents(key, params, k))  # pylint: disable=cell-var-from-loop

    # The comparison first, three programs a round so that each round is short
    # and its ratio well paired; then the breakdown, against the jvp again.
    timings = _harness.time_interleaved(
      {
        "jvp": lambda: bare_jvp(params, tangents),  # pylint: disable=cell-var-from-loop
        "sofo": lambda: sofo_step(params, state),  # pylint: disable=cell-var-from-loop
        "adam_bptt": lambda: adam_step(params, adam_state),
      },
      repeats,
    )
    parts = _harness.time_interleaved(
      {
        "jvp": lambda: bare_jvp(params, tangents),  # pylint: disable=cell-var-from-loop
        "sketch": lambda: sketch_only(params, tangents),  # pylint: disable=cell-var-from-loop
        "tangent_draw": lambda: draw_only(jax.random.key(3)),  # pylint: disable=cell-var-from-loop
      },
      max(2, repeats // 2),
    )
    timings["sketch"], timings["tangent_draw"] = parts["sketch"], parts["tangent_draw"]
    sketch_ratio = _harness.ratio_stats(
      parts["sketch"]["samples_s"], parts["jvp"]["samples_s"]
    )
    ratio = _harness.ratio_stats(
      timings["sofo"]["samples_s"], timings["jvp"]["samples_s"]
    )
    ms = {name: 1e3 * t["median_s"] for name, t in timings.items()}
    rows.append(
      {
        "K": k,
        "jvp_ms": ms["jvp"],
        "sofo_ms": ms["sofo"],
        "adam_bptt_ms": ms["adam_bptt"],
        "sketch_ms": ms["sketch"],
        "tangent_draw_ms": ms["tangent_draw"],
        "sofo_over_jvp": ratio["median"],
        "sofo_over_jvp_iqr": [ratio["q1"], ratio["q3"]],
        "sofo_over_jvp_of_minima": ratio["of_minima"],
        "sofo_over_adam": ms["sofo"] / ms["adam_bptt"],
        "sketch_over_jvp": sketch_ratio["median"],
        "timings": timings,
      }
    )
    print(
      f"K={k}: jvp {ms['jvp']:.2f} ms, sofo {ms['sofo']:.2f} ms "
      f"(median ratio {ratio['median']:.3f}, IQR {ratio['q1']:.3f}-{ratio['q3']:.3f}), "
      f"adam+bptt {ms['adam_bptt']:.2f} ms; sketch {sketch_ratio['median']:.3f}x jvp, "
      f"tangent draw {ms['tangent_draw']:.2f} ms",
      flush=True,
    )
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument(
    "--output",
    default=None,
    help="file name under benchmarks/results/, or an absolute path",
  )
  args = parser.parse_args(argv)
  quick = _harness.quick_mode(args.quick)
  if quick:
    config = dict(n_hidden=16, batch=8, horizon=20, tangent_counts=(4, 8))
  else:
    config = dict(n_hidden=128, batch=64, horizon=100, tangent_counts=(16, 64, 128))
  repeats = args.repeats or (3 if quick else 20)
  rows = bench(**config, repeats=repeats)
  output = args.output or ("step_cost_quick.json" if quick else "step_cost.json")
  path = _harness.write_json(
    output, {"config": {**config, "repeats": repeats, "quick": quick}, "rows": rows}
  )
  print(
    _harness.markdown_table(
      [
        "K",
        "jvp_ms",
        "sofo_ms",
        "adam_bptt_ms",
        "sofo_over_jvp",
        "sofo_over_jvp_of_minima",
        "sketch_over_jvp",
        "tangent_draw_ms",
      ],
      rows,
    )
  )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
