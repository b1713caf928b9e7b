"""The benchmark suite: SOFO against Adam, FGD and SGD on the paper's tasks.

Usage::

  python benchmarks/run.py {convergence,memory,time_vs_k,table,all}
      [--tasks NAME ...] [--quick | --paper-size] [--seeds S] [--out DIR]

Subcommands:

- ``convergence``: every task x method (SOFO, Adam + BPTT, forward-gradient
  descent, SGD + BPTT): a short grid search per method, then the chosen
  settings on several seeds, a timed run for loss against wall-clock, and
  SOFO at several K. Writes ``convergence.json`` and ``convergence.png``.
- ``memory``: memory of one training step against the horizon T (kalman
  RNN), SOFO against BPTT: compiled temporary memory for T = 100 ... 10^5
  and measured peak RSS growth where the step is run. Writes
  ``memory.json`` and ``memory.png``.
- ``time_vs_k``: time per iteration for K = 8 ... 512 against an Adam step.
  Writes ``time_vs_k.json`` and ``time_vs_k.png``.
- ``table``: the markdown results tables and the plots, from the JSON
  files only (``results.md``; with the default output directory also the
  results section of ``benchmarks/README.md``).
- ``all``: the four above, in that order.

Sizes: the default is the ``cpu`` size (the paper's tasks shrunk to run in
about half an hour on a 2-core CPU, see ``_suite.py``); ``--paper-size``
uses the tasks' default configs (the paper's settings; for a GPU);
``--quick`` (or ``SOFO_QUICK=1``) is a smoke test of the pipeline in about a
minute whose numbers mean nothing (it also lowers XLA's CPU optimisation
level to compile faster). Outputs go to ``benchmarks/results/`` (cpu),
``benchmarks/results/paper/`` or ``benchmarks/results/quick/`` unless
``--out`` is given.
"""

from __future__ import annotations

import os
import sys

from sofo_jax.demo import quick_mode  # starts no JAX backend


def _quick_requested(argv) -> bool:
  return quick_mode("--quick" in argv or ("--size" in argv and "quick" in argv))


if _quick_requested(
  sys.argv[1:]
) and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  # Before JAX starts its backend: compile fast, run slow (quick mode only).
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    " --xla_llvm_disable_expensive_passes=true"
  ).strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness
import _suite

RESULTS = _harness.RESULTS
README = Path(__file__).resolve().parent / "README.md"
COMMANDS = ("convergence", "memory", "time_vs_k", "table", "all")


def _size(args) -> str:
  if quick_mode(args.quick):
    return "quick"
  return "paper" if args.paper_size else "cpu"


def _out_dir(args, size: str) -> Path:
  if args.out:
    return Path(args.out)
  return {"cpu": RESULTS, "paper": RESULTS / "paper", "quick": RESULTS / "quick"}[size]


def _write(out_dir: Path, name: str, payload: dict, size: str, command: str) -> Path:
  return _harness.write_json(
    (out_dir / name).resolve(), {"size": size, "command": command, **payload}
  )


def convergence(args, size: str, out_dir: Path, command: str) -> dict:
  import _convergence
  import _report

  plans = _suite.plans(size)
  grids = _suite.grids(size)
  seeds = args.seeds or _suite.SEEDS[size]
  names = args.tasks or (list(_suite.QUICK_TASKS) if size == "quick" else list(plans))
  path = out_dir / "convergence.json"
  tasks = {}
  if path.exists():  # running a subset updates those tasks only
    previous = json.loads(path.read_text())
    if previous.get("size") == size:
      tasks = previous.get("tasks", {})
  start = time.perf_counter()
  for name in names:
    t0 = time.perf_counter()
    tasks[name] = _convergence.run_task(
      name, plans[name], size, grids, seeds, _suite.EVAL_BATCHES[size]
    )
    tasks[name]["task_seconds"] = time.perf_counter() - t0
    _harness.log(f"{name}: done in {tasks[name]['task_seconds']:.0f}s")
  order = [n for n in plans if n in tasks]
  payload = {
    "tasks": {n: tasks[n] for n in order},
    "eval_batches": _suite.EVAL_BATCHES[size],
    "grids": {m: [list(g) for g in grids[m]] for m in grids},
    "seconds": time.perf_counter() - start,
  }
  path = _write(out_dir, "convergence.json", payload, size, command)
  payload = json.loads(path.read_text())
  _report.plot_convergence(payload, out_dir / "convergence.png")
  _harness.log(f"wrote {path} and {out_dir / 'convergence.png'}")
  return payload


def _measure_and_plot(
  name: str, run, plot, size: str, out_dir: Path, command: str
) -> dict:
  """Runs one benchmark, writes ``<name>.json`` and plots it to ``<name>.png``."""
  start = time.perf_counter()
  payload = run(size, _harness.log)
  payload["seconds"] = time.perf_counter() - start
  path = _write(out_dir, f"{name}.json", payload, size, command)
  payload = json.loads(path.read_text())
  plot(payload, out_dir / f"{name}.png")
  _harness.log(f"wrote {path} and {out_dir / f'{name}.png'}")
  return payload


def memory(args, size: str, out_dir: Path, command: str) -> dict:
  import _memory
  import _report

  return _measure_and_plot(
    "memory", _memory.run, _report.plot_memory, size, out_dir, command
  )


def time_vs_k(args, size: str, out_dir: Path, command: str) -> dict:
  import _report
  import _time_vs_k

  return _measure_and_plot(
    "time_vs_k", _time_vs_k.run, _report.plot_time, size, out_dir, command
  )


def table(args, size: str, out_dir: Path, command: str) -> str:
  import _report

  # The plots are redrawn from the JSON files too (cheap, no training).
  for name, plot in (
    ("convergence", _report.plot_convergence),
    ("memory", _report.plot_memory),
    ("time_vs_k", _report.plot_time),
  ):
    if (out_dir / f"{name}.json").exists():
      plot(json.loads((out_dir / f"{name}.json").read_text()), out_dir / f"{name}.png")
  commands = []
  for name in ("convergence.json", "memory.json", "time_vs_k.json"):
    if (out_dir / name).exists():
      commands.append(json.loads((out_dir / name).read_text()).get("command", "?"))
  note = (
    "Commands that produced these numbers (from the JSON files):\n\n"
    + "\n".join(f"    {c}" for c in dict.fromkeys(commands))
    + "\n"
  )
  markdown = _report.results_markdown(out_dir, note)
  (out_dir / "results.md").write_text(markdown)
  _harness.log(f"wrote {out_dir / 'results.md'}")
  if out_dir.resolve() == RESULTS.resolve() and _report.update_readme(README, markdown):
    _harness.log(f"updated the results section of {README}")
  print(markdown)
  return markdown


def _memory_point(argv) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--kind", choices=("sofo", "bptt"), required=True)
  parser.add_argument("--size", choices=("quick", "cpu", "paper"), required=True)
  parser.add_argument("--horizon", type=int, required=True)
  args = parser.parse_args(argv)
  import _memory

  result = _memory.measure_point(
    args.kind, _suite.memory_config(args.size), args.horizon
  )
  print(json.dumps(result))


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "_memory_point":
    _memory_point(argv[1:])
    return None
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("command", choices=COMMANDS)
  parser.add_argument(
    "--tasks",
    nargs="+",
    choices=list(_suite.CPU),
    default=None,
    help="tasks for `convergence` (default: all six; flip_flop with --quick)",
  )
  size_group = parser.add_mutually_exclusive_group()
  size_group.add_argument(
    "--quick", action="store_true", help="tiny smoke-test sizes (also SOFO_QUICK=1)"
  )
  size_group.add_argument(
    "--paper-size", action="store_true", help="the paper's sizes (for a GPU)"
  )
  parser.add_argument(
    "--seeds",
    type=int,
    default=None,
    help="seeds per method (default 3; 1 with --quick)",
  )
  parser.add_argument("--out", default=None, help="output directory")
  args = parser.parse_args(argv)
  size = _size(args)
  out_dir = _out_dir(args, size)
  command = "python benchmarks/run.py " + " ".join(argv)
  _harness.log(f"{args.command}: {size} size, writing to {out_dir}")
  results = {}
  steps = (
    ("convergence", "memory", "time_vs_k", "table")
    if args.command == "all"
    else (args.command,)
  )
  for step in steps:
    results[step] = globals()[step](args, size, out_dir, command)
  return results


if __name__ == "__main__":
  main()
