"""Compile time of one training step: SOFO against Adam, and where SOFO's goes.

For a tiny MLP (the quickstart notebook's: 1-32-32-1 tanh, 256 points, K = 64)
and a tiny RNN (the flip-flop task at the suite's CPU size: 32 tanh units,
T = 100, batch 32, K = 64), measures, side by side in one run, the time to
turn each of these programs into an executable:

- ``adam``: an ``optax.adam`` step on a ``jax.grad`` gradient;
- ``sofo``: a ``sofo_jax.sofo`` step at its defaults (adaptive step control,
  momentum);
- ``sofo_fixed``: the same with ``adaptive=False`` (the paper's step), so that
  ``sofo - sofo_fixed`` is what step control adds;
- ``draw``: ``sofo_jax.sample_tangents`` alone;
- ``sketch``: ``sofo_jax.sketch`` alone, given tangents (the forward-mode pass);
- ``solve``: ``sofo_jax.solve_damped`` on a K×K system alone.

Each is timed as ``jax.jit(fn).trace(...).lower()`` (tracing and lowering to
StableHLO, Python) and ``.compile()`` (XLA), in wall-clock and in CPU seconds
of this process (less sensitive to other tenants of a shared machine), after
``jax.clear_caches()`` and with the persistent compilation cache off, so that
every repeat compiles afresh. Repeats go round-robin over the programs. The
number of kernels XLA emits (fusions, dots, custom calls, loops; read from
the compiled HLO) is recorded too: on a CPU, compile time grows with it.

A run is stored under a label in ``benchmarks/results/compile_time.json``;
runs with other labels already in the file are kept, so a run of the package
before a change (``--label before``, with that version first on
``PYTHONPATH``) and one after sit side by side, each with its command. Each
run also records fingerprints of its results from fixed inputs: the tangent
draw's bytes, and the first SOFO update of each case; the file compares them
with the other runs (bitwise, and by the largest relative difference).

Usage: ``python benchmarks/compile_time.py [--label NAME] [--note TEXT]
[--cases mlp rnn] [--repeats R] [--quick] [--output PATH]``
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness

import sofo_jax
from sofo_jax.tasks import flip_flop

PROGRAMS = ("adam", "sofo", "sofo_fixed", "draw", "sketch", "solve")
_KERNEL = re.compile(r" (fusion|dot|custom-call|while|conditional)\(")


def mlp_case(num_tangents: int = 64):
  """``(params, data, loss_fn(params, data), K)`` of the quickstart MLP."""
  model = eqx.nn.MLP(
    1, 1, width_size=32, depth=2, activation=jnp.tanh, key=jax.random.key(0)
  )
  params, static = eqx.partition(model, eqx.is_array)
  x = jnp.linspace(-2.0, 2.0, 256)[:, None]
  data = (x, jnp.sin(3.0 * x))

  def loss_fn(p, d):
    return sofo_jax.losses.mse(jax.vmap(eqx.combine(p, static))(d[0]), d[1])

  return params, data, loss_fn, num_tangents


def rnn_case(config: flip_flop.Config):
  """The flip-flop task's parameters, one batch, its loss and K."""
  task = flip_flop.make(config)
  params = task.init_params(jax.random.key(0))
  return params, task.sample_batch(jax.random.key(1)), task.loss_fn, config.num_tangents


def programs(case) -> dict:
  """``{name: (fn, args)}``: the programs compiled for one case."""
  params, data, loss_fn, k = case

  def adam_step(p, s, d):
    grads = jax.grad(lambda q: loss_fn(q, d).value)(p)
    updates, s = adam.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  def sofo_step(opt):
    def step(p, s, d):
      updates, s = opt.update(None, s, p, loss_fn=lambda q: loss_fn(q, d))
      return optax.apply_updates(p, updates), s

    return step

  adam = optax.adam(1e-3)
  sofo = sofo_jax.sofo(1.0, k, key=jax.random.key(2))
  fixed = sofo_jax.sofo(1.0, k, key=jax.random.key(2), adaptive=False)
  tangents = sofo_jax.sample_tangents(jax.random.key(3), params, k)
  rows = jax.random.normal(jax.random.key(4), (k, k))
  return {
    "adam": (adam_step, (params, adam.init(params), data)),
    "sofo": (sofo_step(sofo), (params, sofo.init(params), data)),
    "sofo_fixed": (sofo_step(fixed), (params, fixed.init(params), data)),
    "draw": (
      lambda key: sofo_jax.sample_tangents(key, params, k),
      (jax.random.key(3),),
    ),
    "sketch": (
      lambda p, t, d: sofo_jax.sketch(lambda q: loss_fn(q, d), p, t),
      (params, tangents, data),
    ),
    "solve": (
      lambda g, m: sofo_jax.solve_damped(g, m, 1e-4),
      (jnp.ones(k), rows @ rows.T),
    ),
  }


def count_kernels(hlo_text: str) -> int:
  """Kernels (fusions, dots, custom calls, loops, conditionals) in compiled HLO."""
  return len(_KERNEL.findall(hlo_text))


def compile_once(fn, args) -> dict:
  """Seconds to trace and lower, and to compile, from empty caches."""
  jax.clear_caches()
  wall, cpu = time.perf_counter(), time.process_time()
  lowered = jax.jit(fn).trace(*args).lower()
  lower_wall, lower_cpu = time.perf_counter() - wall, time.process_time() - cpu
  wall, cpu = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  compile_wall, compile_cpu = time.perf_counter() - wall, time.process_time() - cpu
  return {
    "lower_s": lower_wall,
    "compile_s": compile_wall,
    "total_s": lower_wall + compile_wall,
    "lower_cpu_s": lower_cpu,
    "compile_cpu_s": compile_cpu,
    "total_cpu_s": lower_cpu + compile_cpu,
    "kernels": count_kernels(compiled.as_text()),
  }


def _summary(samples: list[dict]) -> dict:
  out = {"kernels": samples[0]["kernels"], "repeats": len(samples)}
  for key in samples[0]:
    if key.endswith("_s"):
      values = [s[key] for s in samples]
      out[key] = {"min": min(values), "median": statistics.median(values)}
  out["samples"] = samples
  return out


def bench_case(case, repeats: int) -> dict:
  """Round-robin repeats over the programs of one case."""
  progs = programs(case)
  names = list(progs)
  samples: dict[str, list[dict]] = {name: [] for name in names}
  for round_index in range(repeats):
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      samples[name].append(compile_once(*progs[name]))
  result = {name: _summary(s) for name, s in samples.items()}
  for measure in ("total_s", "total_cpu_s", "compile_s", "lower_s"):
    result[f"sofo_over_adam_{measure[:-2]}"] = _harness.ratio_stats(
      [s[measure] for s in samples["sofo"]], [s[measure] for s in samples["adam"]]
    )
  return result


def _bytes_of(tree) -> bytes:
  return np.asarray(ravel_pytree(tree)[0]).tobytes()


def fingerprints(case, num_steps: int = 2) -> dict:
  """Results from fixed inputs: the tangent draw's hash, the first SOFO updates.

  The updates of ``num_steps`` steps from the same initial state, with and
  without step control, are kept as bytes (base64), so that runs of two
  versions can be compared bit for bit. The first step starts from the same
  state in both, later ones from wherever the earlier steps went. (From this
  initialisation step control rejects the first step, a zero update, so the
  second is the first one it takes.)
  """
  params, data, loss_fn, k = case
  draw = sofo_jax.sample_tangents(jax.random.key(3), params, k)
  out = {"draw_sha256": hashlib.sha256(_bytes_of(draw)).hexdigest()}
  for name, options in (("sofo", {}), ("sofo_fixed", {"adaptive": False})):
    opt = sofo_jax.sofo(1.0, k, key=jax.random.key(2), **options)

    @jax.jit
    def run(p, s, opt=opt):
      def body(carry, _):
        p, s = carry
        updates, s = opt.update(None, s, p, loss_fn=lambda q: loss_fn(q, data))
        return (optax.apply_updates(p, updates), s), ravel_pytree(updates)[0]

      return jax.lax.scan(body, (p, s), None, length=num_steps)[1]

    updates = np.asarray(run(params, opt.init(params)))
    out[name] = {
      "dtype": str(updates.dtype),
      "shape": list(updates.shape),
      "updates_b64": base64.b64encode(updates.tobytes()).decode(),
    }
  return out


def _updates(entry: dict) -> np.ndarray:
  flat = np.frombuffer(base64.b64decode(entry["updates_b64"]), entry["dtype"])
  return flat.reshape(entry["shape"])


def compare(runs: dict) -> dict:
  """Each pair of runs: same draws and updates bit for bit, else how far apart.

  Per step: whether the updates are equal bit for bit, and the largest
  difference relative to the largest entry of the update (0 for a zero
  update, which step control returns when it rejects a step).
  """
  labels = sorted(runs)
  out = {}
  for i, a in enumerate(labels):
    for b in labels[i + 1 :]:
      entry = {}
      for case in sorted(set(runs[a]["fingerprints"]) & set(runs[b]["fingerprints"])):
        fa, fb = runs[a]["fingerprints"][case], runs[b]["fingerprints"][case]
        row = {"draw_bitwise_equal": fa["draw_sha256"] == fb["draw_sha256"]}
        for name in ("sofo", "sofo_fixed"):
          ua, ub = _updates(fa[name]), _updates(fb[name])
          scale = np.max(np.abs(ua), axis=1)
          diff = np.max(np.abs(ua - ub), axis=1)
          row[name] = {
            "bitwise_equal_per_step": [
              x.tobytes() == y.tobytes() for x, y in zip(ua, ub)
            ],
            "max_relative_difference_per_step": np.where(
              scale > 0, diff / np.where(scale > 0, scale, 1.0), diff
            ).tolist(),
          }
        entry[case] = row
      out[f"{a} vs {b}"] = entry
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--label", default="current", help="name of this run")
  parser.add_argument(
    "--note",
    default="",
    help="what this run measured (e.g. how its sofo_jax was built)",
  )
  parser.add_argument(
    "--cases", nargs="+", default=["mlp", "rnn"], choices=["mlp", "rnn"]
  )
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--quick", action="store_true", help="one repeat, tiny RNN")
  parser.add_argument(
    "--output", default=None, help="JSON path (default benchmarks/results/...)"
  )
  args = parser.parse_args(argv)
  # Every repeat must compile afresh: no persistent compilation cache.
  jax.config.update("jax_enable_compilation_cache", False)
  quick = _harness.quick_mode(args.quick)
  repeats = args.repeats or (1 if quick else 5)
  rnn_config = (
    flip_flop.Config.quick()
    if quick
    else flip_flop.Config(num_hidden=32, num_steps=100, batch_size=32, num_tangents=64)
  )
  builders = {"mlp": mlp_case, "rnn": lambda: rnn_case(rnn_config)}

  run = {
    "command": [sys.executable, *sys.argv],
    "note": args.note,
    "sofo_jax": str(Path(sofo_jax.__file__).resolve().parent),
    "pythonpath": os.environ.get("PYTHONPATH", ""),
    "machine": _harness.machine(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "persistent_cache": bool(jax.config.jax_enable_compilation_cache),
    "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "repeats": repeats,
    "cases": {},
    "fingerprints": {},
  }
  for name in args.cases:
    case = builders[name]()
    run["cases"][name] = bench_case(case, repeats)
    run["fingerprints"][name] = fingerprints(case)
    _print_case(args.label, name, run["cases"][name])
  run["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

  output = _harness.output_path(args.output, "compile_time.json", quick)
  runs = json.loads(output.read_text())["runs"] if output.exists() else {}
  runs[args.label] = run
  path = _harness.write_json(
    output,
    {
      "config": {
        "mlp": "eqx.nn.MLP(1, 1, width_size=32, depth=2, tanh), 256 points, K = 64",
        "rnn": str(rnn_config),
      },
      "programs": list(PROGRAMS),
      "comparison": compare(runs),
      "runs": runs,
    },
  )
  print(f"wrote {path}")


def _print_case(label: str, case: str, result: dict) -> None:
  rows = [
    [
      name,
      result[name]["kernels"],
      result[name]["lower_s"]["median"],
      result[name]["compile_s"]["median"],
      result[name]["total_s"]["median"],
      result[name]["total_cpu_s"]["median"],
    ]
    for name in PROGRAMS
  ]
  print(f"{label}, {case}: medians over {result['adam']['repeats']} repeats")
  print(
    _harness.markdown_table(
      ["program", "kernels", "lower s", "compile s", "total s", "total CPU s"], rows
    )
  )
  ratio = result["sofo_over_adam_total"]
  print(f"sofo / adam (total, median of per-round ratios): {ratio['median']:.2f}")


if __name__ == "__main__":
  main()
