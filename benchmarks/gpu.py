"""SOFO on one GPU: step cost, memory against T, a paper-size run (issue 14).

Meant for one NVIDIA H100 or H200 and about 8 minutes of device time; writes
``DIR/gpu.json`` (``--out DIR``), overwritten on a rerun and rewritten after
every section, so a run cut short keeps what it measured. Sections, in the
order they run:

1. ``memory``: peak device memory of one training step of the vanilla RNN of
   :mod:`_rnn_problem` (N = 400, B = 256) for T = 1000, 2000, ..., 256000:
   SOFO (K = 128, defaults) against Adam + BPTT and Adam + BPTT with gradient
   checkpointing (remat, about sqrt(T) segments). Each method sweeps T upwards
   in a fresh worker process, so the process's ``peak_bytes_in_use``
   (``jax.devices()[0].memory_stats()``; it cannot be reset) is the current
   point's peak; the compiled ``memory_analysis()`` temporary bytes are
   recorded too (the only figure where ``memory_stats()`` is ``None``, as on
   CPU). A sweep stops at its first out-of-memory error (recorded as
   ``"oom"``). BPTT sweeps first; SOFO and remat then go no further than the
   T where it ran out, and ``crossover_T`` is that T if SOFO ran there. The
   workers may use 95% of the device (``XLA_PYTHON_CLIENT_MEM_FRACTION``,
   unless set); this process does not preallocate, so that it leaves them
   the device. The section runs first, before this process holds any large
   buffer.
2. ``step_cost``: median time of one jitted step, timed round-robin
   (:func:`_harness.time_interleaved`, warm-up then rounds, each call up to
   ``block_until_ready``), for N in {128, 400}, B = 256, T in {100, 1000}:
   the bare vmapped jvp and a SOFO step (defaults) for K in {32, 64, 128,
   256}, Adam + BPTT and Adam + remat once per (N, T), all in one rotation
   so the ratios (SOFO / jvp, SOFO / Adam, medians of per-round ratios) are
   paired. The data are arguments of every step, not compiled-in constants.
3. ``flip_flop``: the flip-flop task at the paper's size (``Config()``),
   300 iterations of SOFO at its defaults and of Adam at the config's
   ``adam_learning_rate`` (``training.fit``: same initial parameters and
   batches), the training loss against wall-clock seconds.
4. ``mixed_precision``: the SOFO step and the bare jvp (N = 400, T = 1000,
   K = 128) under each ``jax.default_matmul_precision`` setting, timed
   round-robin, with the jvp's relative error against ``"float32"``. The
   settings bound how far XLA may lower the precision of float32 matmuls:
   ``"float32"`` not at all, ``"tensorfloat32"`` to TF32, ``"bfloat16"``
   (JAX's default) as far as the backend likes. They do not cast the
   operands: on an H200 the last two ran the same TF32 kernels (same time,
   same error; ``results/gpu.json``), so a step with bfloat16 operands is
   not measured here.

Time budget: the script tracks its elapsed time against ``--budget-s``
(default 420 s). Each section has a deadline at a share of it (memory 40%,
step cost 75%, flip-flop 90%, the rest 100%; the memory section's time goes
to BPTT, SOFO and remat as 1 : 2 : 1, unused time rolling over), and an
item (a T of a memory sweep, an (N, T) group, a method, a section) that
would start past its deadline is recorded as ``"skipped: time budget"``. An
item that has started runs to its end. A memory sweep also stops when its
next T (twice the last) is predicted to overrun.

Usage::

    python benchmarks/gpu.py --out benchmarks/results   # one H100/H200
    python benchmarks/gpu.py --sections step_cost --budget-s 80 --out DIR
    python benchmarks/gpu.py --dry-run                  # tiny sizes, a CPU, seconds

``--sections`` runs only the named ones (comma-separated), for a short
device call; their deadlines stay at their shares of ``--budget-s``, and the
JSON is then ``gpu_{sections}.json`` (``gpu_step_cost.json`` above), so a
partial run never replaces a full ``gpu.json``.

``--dry-run`` (alias ``--quick``): N = 8, B = 4, T in {10, 20}, K in {4, 8},
memory sweep T in {10, 20} (K = 8), flip-flop ``Config.quick()`` for 5
steps; writes under the temporary directory unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER_FLAG = "--memory-worker"


def _set_environment(argv: list[str]) -> None:
  """XLA settings that only take effect if set before JAX starts.

  Args:
    argv: the command-line arguments.
  """
  if WORKER_FLAG in argv:
    # BPTT's out-of-memory point is the measurement: let it fill the device.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  else:
    # Hold only what is used, so that the memory workers get the device.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if "--dry-run" in argv or "--quick" in argv:
    # Tiny sizes on a CPU, where compiling is most of the time: the CPU
    # fusion emitters more than double the compile time of a SOFO step.
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in (
      "--xla_backend_optimization_level=0",
      "--xla_cpu_use_fusion_emitters=false",
    ):
      if flag.split("=")[0] not in flags:
        flags += " " + flag
    os.environ["XLA_FLAGS"] = flags.strip()


_set_environment(sys.argv[1:])

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness
import _rnn_problem
import remat_baseline

import sofo_jax
from sofo_jax import training
from sofo_jax.tasks import flip_flop

# pylint: enable=g-import-not-at-top,wrong-import-position

SKIPPED = "skipped: time budget"
NOT_SELECTED = "skipped: not in --sections"
ADAM_LEARNING_RATE = 1e-3
# Share of --budget-s after which a section starts no new item.
DEADLINES = {"memory": 0.4, "step_cost": 0.75, "flip_flop": 0.9, "mixed_precision": 1.0}
# Share of the memory section's time per method; unused time rolls over.
MEMORY_WEIGHTS = {"bptt": 1.0, "sofo": 2.0, "remat": 1.0}
PRECISIONS = ("float32", "tensorfloat32", "bfloat16")
SIZES = {
  "full": {
    "hidden": (128, 400),
    "batch": 256,
    "horizons": (100, 1000),
    "tangents": (32, 64, 128, 256),
    "repeats": 5,
    # BPTT keeps about 1.6 MiB per step at N = 400 (compiled temp), so it
    # should run out near T = 10^5 on a 141 GB H200; SOFO stays flat.
    "memory": {
      "hidden": 400,
      "tangents": 128,
      "horizons": tuple(1000 * 2**i for i in range(9)),
    },
    "flip_flop": {"config": flip_flop.Config(), "steps": 300},
    "precision": {"hidden": 400, "horizon": 1000, "tangents": 128},
  },
  "dry_run": {
    "hidden": (8,),
    "batch": 4,
    "horizons": (10, 20),
    "tangents": (4, 8),
    "repeats": 2,
    "memory": {"hidden": 8, "tangents": 8, "horizons": (10, 20)},
    "flip_flop": {"config": flip_flop.Config.quick(), "steps": 5},
    "precision": {"hidden": 8, "horizon": 20, "tangents": 8},
  },
}


class Budget:
  """Elapsed wall-clock time against ``--budget-s``, with section deadlines."""

  def __init__(self, seconds: float):
    """Starts the clock.

    Args:
      seconds: the whole script's budget.
    """
    self.seconds = seconds
    self.start = time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def left(self, section: str) -> float:
    """Seconds until ``section``'s deadline (negative once past it)."""
    return DEADLINES[section] * self.seconds - self.elapsed()


# --------------------------------------------------------------------------
# The training steps, shared by every section.


remat_loss_fn = functools.partial(
  _rnn_problem.loss_fn, scan=remat_baseline.checkpointed_scan
)


def make_step(method: str, num_tangents: int = 0):
  """One training step of the RNN problem, jitted.

  Args:
    method: ``"sofo"`` (defaults, lr 1), ``"bptt"`` (Adam on the
      backpropagated gradient) or ``"remat"`` (the same with
      :func:`remat_baseline.checkpointed_scan`).
    num_tangents: SOFO's K.

  Returns:
    ``(init, step)``: ``init(params) -> state`` and the jitted
    ``step(params, state, xs, ys) -> (params, state)``.
  """
  if method == "sofo":
    opt = sofo_jax.sofo(1.0, num_tangents, key=jax.random.key(1))

    def step(params, state, xs, ys):
      closure = lambda p: _rnn_problem.loss_fn(p, xs, ys)
      updates, state = opt.update(None, state, params, loss_fn=closure)
      return optax.apply_updates(params, updates), state

    return opt.init, jax.jit(step)
  loss_fn = {"bptt": _rnn_problem.loss_fn, "remat": remat_loss_fn}[method]
  adam = optax.adam(ADAM_LEARNING_RATE)

  def adam_step(params, state, xs, ys):
    grads = jax.grad(lambda p: loss_fn(p, xs, ys).value)(params)
    updates, state = adam.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return adam.init, jax.jit(adam_step)


@jax.jit
def bare_jvp(params, tangents, xs, ys):
  """The loss's value and its K directional derivatives (:func:`_harness.bare_jvp`)."""
  value_fn = lambda p: _rnn_problem.loss_fn(p, xs, ys).value
  return _harness.bare_jvp(value_fn, params, tangents)


def _max_diff(a, b) -> float:
  return max(
    float(jnp.max(jnp.abs(x - y)))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def check_remat(params, xs, ys) -> dict:
  """How far the checkpointed loss and gradient are from the plain ones.

  Args:
    params, xs, ys: a problem of :func:`_rnn_problem.make`.

  Returns:
    The absolute loss difference, the largest gradient difference (absolute
    and relative to the largest gradient entry) and ``agree`` (relative
    difference below 1e-3: TF32 matmuls on a GPU round differently).
  """
  grad = lambda fn: jax.jit(jax.value_and_grad(lambda p: fn(p, xs, ys).value))(params)
  (value, grads), (remat_value, remat_grads) = (
    grad(_rnn_problem.loss_fn),
    grad(remat_loss_fn),
  )
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
  relative = _max_diff(remat_grads, grads) / scale
  return {
    "loss_abs_diff": float(jnp.abs(remat_value - value)),
    "grad_max_abs_diff": _max_diff(remat_grads, grads),
    "grad_max_rel_diff": relative,
    "agree": relative < 1e-3,
  }


# --------------------------------------------------------------------------
# Section 1: peak memory against T, one worker process per method.


def _is_oom(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _device_bytes(name: str):
  """A field of the device's memory statistics, or None where there are none."""
  stats = jax.devices()[0].memory_stats()
  return None if stats is None else stats.get(name)


def measure_memory_point(
  method: str, hidden: int, batch: int, horizon: int, num_tangents: int
) -> dict:
  """Compiles and runs one step at horizon T; its memory, in a fresh process.

  Args:
    method: as :func:`make_step`.
    hidden, batch, horizon: the problem's N, B and T.
    num_tangents: SOFO's K.

  Returns:
    ``status`` (``"ok"``, ``"oom"`` or the error), the compiled temporary,
    argument and output bytes, the process's peak bytes in use after the step
    (this point's peak: T only grows within a worker), the bytes in use
    before it (the live arguments) and the seconds compiling and running.
  """
  row = {"T": horizon, "status": "ok"}
  begin = time.perf_counter()
  try:
    params, xs, ys = _rnn_problem.make(hidden, batch, horizon)
    init, step = make_step(method, num_tangents)
    state = init(params)
    compiled = step.lower(params, state, xs, ys).compile()
    analysis = compiled.memory_analysis()
    row.update(
      temp_bytes=int(analysis.temp_size_in_bytes),
      argument_bytes=int(analysis.argument_size_in_bytes),
      output_bytes=int(analysis.output_size_in_bytes),
      compile_s=time.perf_counter() - begin,
    )
    jax.block_until_ready((params, state, xs, ys))
    row["bytes_in_use_before"] = _device_bytes("bytes_in_use")
    run_begin = time.perf_counter()
    jax.block_until_ready(compiled(params, state, xs, ys))
    row["run_s"] = time.perf_counter() - run_begin
    row["peak_bytes_in_use"] = _device_bytes("peak_bytes_in_use")
  except Exception as error:  # pylint: disable=broad-except
    # Out-of-memory ends the sweep; so does anything else, recorded verbatim.
    row["status"] = "oom" if _is_oom(error) else f"error: {str(error)[:500]}"
  row["seconds"] = time.perf_counter() - begin
  return row


def memory_worker(method: str, config: dict) -> None:
  """Sweeps T upwards for one method, printing one JSON line per point.

  Stops after the first point that is not ``"ok"``, or before a T (twice
  the last) predicted to end past ``config["deadline_s"]``; the lines reach
  the parent even if this process dies.

  Args:
    method: as :func:`make_step`.
    config: ``hidden``, ``batch``, ``tangents``, ``horizons``, ``deadline_s``.
  """
  begin = time.perf_counter()
  print(
    "MEMORY_INFO "
    + json.dumps(
      {
        "bytes_limit": _device_bytes("bytes_limit"),
        "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        "preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
      }
    ),
    flush=True,
  )
  predicted = 0.0
  for horizon in config["horizons"]:
    if time.perf_counter() - begin + predicted > config["deadline_s"]:
      row = {"T": horizon, "status": SKIPPED}
    else:
      row = measure_memory_point(
        method, config["hidden"], config["batch"], horizon, config["tangents"]
      )
      # Doubling T about doubles the run time; compiling takes about as long.
      predicted = row.get("compile_s", 0.0) + 2.2 * row.get("run_s", 0.0)
    print("MEMORY_ROW " + json.dumps(row), flush=True)
    if row["status"] != "ok":
      break


def _run_worker(method: str, config: dict) -> tuple[dict, list[dict], str]:
  """Runs :func:`memory_worker` in a subprocess and parses its lines.

  Args:
    method: as :func:`make_step`.
    config: the worker's settings (see :func:`memory_worker`).

  Returns:
    ``(info, rows, stderr_tail)``; a worker killed by the timeout (or that
    crashed) keeps the rows it printed, followed by a row saying why it ended.
  """
  command = [
    sys.executable,
    str(Path(__file__).resolve()),
    WORKER_FLAG,
    method,
    json.dumps(config),
  ]
  try:
    done = subprocess.run(
      command,
      capture_output=True,
      text=True,
      check=False,
      timeout=config["deadline_s"] + 120,
    )
    stdout, stderr, ending = done.stdout, done.stderr, done.returncode
  except subprocess.TimeoutExpired as expired:
    decode = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
    stdout, stderr, ending = decode(expired.stdout), decode(expired.stderr), "timeout"
  info, rows = {}, []
  for line in stdout.splitlines():
    if line.startswith("MEMORY_INFO "):
      info = json.loads(line.split(" ", 1)[1])
    elif line.startswith("MEMORY_ROW "):
      rows.append(json.loads(line.split(" ", 1)[1]))
  if ending != 0 and (not rows or rows[-1]["status"] == "ok"):
    # Died without saying why (e.g. killed by the out-of-memory killer).
    rows.append({"status": f"worker ended: {ending}"})
  return info, rows, stderr[-2000:]


def crossover(series: dict) -> int | None:
  """The first T at which BPTT ran out of memory and SOFO ran."""
  sofo_ok = {r["T"] for r in series.get("sofo", []) if r.get("status") == "ok"}
  for row in series.get("bptt", []):
    if row.get("status") == "oom" and row["T"] in sofo_ok:
      return row["T"]
  return None


def memory_section(sizes: dict, budget: Budget) -> dict:
  """Section 1: each method's sweep in its own worker; see the module doc.

  BPTT sweeps first; SOFO and remat then stop at the T where it ran out of
  memory (the crossover needs nothing beyond it, and time is short).
  """
  spec = sizes["memory"]
  result = {
    "N": spec["hidden"],
    "B": sizes["batch"],
    "K": spec["tangents"],
    "horizons": list(spec["horizons"]),
    "series": {},
    "worker_info": {},
  }
  horizons = list(spec["horizons"])
  weights = dict(MEMORY_WEIGHTS)
  for method in MEMORY_WEIGHTS:
    left = budget.left("memory")
    share = left * weights[method] / sum(weights.values())
    del weights[method]
    if left <= 0:
      result["series"][method] = [{"status": SKIPPED}]
      continue
    config = {
      "hidden": spec["hidden"],
      "batch": sizes["batch"],
      "tangents": spec["tangents"],
      "horizons": horizons,
      "deadline_s": share,
    }
    info, rows, stderr = _run_worker(method, config)
    if method == "bptt" and rows and rows[-1].get("status") == "oom":
      horizons = [t for t in horizons if t <= rows[-1]["T"]]
    result["series"][method] = rows
    result["worker_info"][method] = info
    if rows and rows[-1].get("status") not in ("ok", "oom", SKIPPED):
      result.setdefault("worker_stderr", {})[method] = stderr
    _harness.log(
      f"memory {method}: " + ", ".join(f"T={r.get('T')} {_mib(r)}" for r in rows)
    )
  result["crossover_T"] = crossover(result["series"])
  return result


def _mib(row: dict) -> str:
  """A memory row in a few characters: the peak (or temp) in MiB, or its status."""
  if row.get("status") != "ok":
    return row.get("status", "?")
  peak = row.get("peak_bytes_in_use")
  return (
    f"peak {peak / 2**20:.1f} MiB"
    if peak
    else f"temp {row['temp_bytes'] / 2**20:.2f} MiB"
  )


# --------------------------------------------------------------------------
# Section 2: step cost.


def step_cost_group(
  hidden: int, batch: int, horizon: int, tangent_counts, repeats: int
) -> dict:
  """Times every program of one (N, T) round-robin; rows per K.

  Args:
    hidden, batch, horizon: N, B and T.
    tangent_counts: the K of the jvp and SOFO programs.
    repeats: timed rounds.

  Returns:
    ``{"rows": [one per K], "timings": every program's samples}``.
  """
  params, xs, ys = _rnn_problem.make(hidden, batch, horizon)
  calls = {}
  for method in ("bptt", "remat"):
    init, step = make_step(method)
    calls[f"adam_{method}"] = functools.partial(step, params, init(params), xs, ys)
  for k in tangent_counts:
    init, step = make_step("sofo", k)
    tangents = sofo_jax.sample_tangents(jax.random.key(2), params, k)
    calls[f"jvp_K{k}"] = functools.partial(bare_jvp, params, tangents, xs, ys)
    calls[f"sofo_K{k}"] = functools.partial(step, params, init(params), xs, ys)
  timings = _harness.time_interleaved(calls, repeats)
  samples = {name: t["samples_s"] for name, t in timings.items()}
  ms = {name: 1e3 * t["median_s"] for name, t in timings.items()}
  rows = []
  for k in tangent_counts:
    sofo = samples[f"sofo_K{k}"]
    over = {
      name: _harness.ratio_stats(sofo, samples[name])
      for name in (f"jvp_K{k}", "adam_bptt", "adam_remat")
    }
    rows.append(
      {
        "N": hidden,
        "B": batch,
        "T": horizon,
        "K": k,
        "jvp_ms": ms[f"jvp_K{k}"],
        "sofo_ms": ms[f"sofo_K{k}"],
        "adam_bptt_ms": ms["adam_bptt"],
        "adam_remat_ms": ms["adam_remat"],
        "sofo_over_jvp": over[f"jvp_K{k}"]["median"],
        "sofo_over_jvp_iqr": [over[f"jvp_K{k}"]["q1"], over[f"jvp_K{k}"]["q3"]],
        "sofo_over_adam": over["adam_bptt"]["median"],
        "sofo_over_adam_iqr": [over["adam_bptt"]["q1"], over["adam_bptt"]["q3"]],
        "sofo_over_adam_remat": over["adam_remat"]["median"],
      }
    )
  return {"N": hidden, "T": horizon, "rows": rows, "timings": timings}


def step_cost_section(sizes: dict, repeats: int, budget: Budget) -> dict:
  """Section 2: every (N, T) group, while the budget lasts."""
  params, xs, ys = _rnn_problem.make(
    sizes["hidden"][0], sizes["batch"], sizes["horizons"][0]
  )
  result = {
    "B": sizes["batch"],
    "repeats": repeats,
    "adam_learning_rate": ADAM_LEARNING_RATE,
    "remat_check": check_remat(params, xs, ys),
    "groups": [],
    "rows": [],
  }
  for hidden in sizes["hidden"]:
    for horizon in sizes["horizons"]:
      if budget.left("step_cost") <= 0:
        result["groups"].append({"N": hidden, "T": horizon, "status": SKIPPED})
        continue
      group = step_cost_group(
        hidden, sizes["batch"], horizon, sizes["tangents"], repeats
      )
      result["groups"].append(group)
      result["rows"].extend(group["rows"])
      for row in group["rows"]:
        _harness.log(
          f"N={hidden} T={horizon} K={row['K']}: jvp {row['jvp_ms']:.2f} ms, "
          f"sofo {row['sofo_ms']:.2f} ms, adam {row['adam_bptt_ms']:.2f} ms, "
          f"remat {row['adam_remat_ms']:.2f} ms; sofo/jvp {row['sofo_over_jvp']:.2f}, "
          f"sofo/adam {row['sofo_over_adam']:.2f}"
        )
  return result


# --------------------------------------------------------------------------
# Section 3: flip-flop at the paper's size.


def flip_flop_section(sizes: dict, budget: Budget) -> dict:
  """Section 3: SOFO (defaults) and Adam on flip-flop, loss against seconds."""
  spec = sizes["flip_flop"]
  config = spec["config"]
  task = flip_flop.make(config)
  result = {
    "config": {name: getattr(config, name) for name in config.__dataclass_fields__},
    "steps": spec["steps"],
    "methods": {},
  }
  for method in ("sofo", "adam"):
    if budget.left("flip_flop") <= 0:
      result["methods"][method] = {"status": SKIPPED}
      continue
    history = training.fit(
      task, method, spec["steps"], key=jax.random.key(0), progress=False
    )
    tail = history.losses[-max(1, spec["steps"] // 10) :]
    result["methods"][method] = {
      "learning_rate": float(history.settings["learning_rate"]),
      "num_tangents": history.settings["num_tangents"],
      "loss": [float(x) for x in history.losses],
      "seconds": [float(x) for x in history.seconds],
      "final_loss": float(np.mean(tail)),
      "total_s": float(history.seconds[-1]),
      "ms_per_step": 1e3 * float(history.seconds[-1]) / spec["steps"],
      "num_nonfinite_steps": history.num_nonfinite_steps,
    }
    entry = result["methods"][method]
    _harness.log(
      f"flip_flop {method}: final loss {entry['final_loss']:.4g}, "
      f"{entry['ms_per_step']:.2f} ms/step"
    )
  return result


# --------------------------------------------------------------------------
# Section 4: matmul precision.


def _under(precision: str, fn):
  """``fn`` called with the default matmul precision set (jit retraces per setting)."""

  def call():
    with jax.default_matmul_precision(precision):
      return fn()

  return call


def precision_section(sizes: dict, repeats: int) -> dict:
  """Section 4: SOFO step and bare jvp at each matmul precision; see the module doc."""
  spec = sizes["precision"]
  params, xs, ys = _rnn_problem.make(spec["hidden"], sizes["batch"], spec["horizon"])
  init, step = make_step("sofo", spec["tangents"])
  tangents = sofo_jax.sample_tangents(jax.random.key(2), params, spec["tangents"])
  calls = {}
  for precision in PRECISIONS:
    calls[f"sofo_{precision}"] = _under(
      precision, functools.partial(step, params, init(params), xs, ys)
    )
    calls[f"jvp_{precision}"] = _under(
      precision, functools.partial(bare_jvp, params, tangents, xs, ys)
    )
  timings = _harness.time_interleaved(calls, repeats)
  reference = np.asarray(calls["jvp_float32"]()[1])
  rows = []
  for precision in PRECISIONS:
    derivatives = np.asarray(calls[f"jvp_{precision}"]()[1])
    sofo = timings[f"sofo_{precision}"]["samples_s"]
    rows.append(
      {
        "precision": precision,
        "sofo_ms": 1e3 * timings[f"sofo_{precision}"]["median_s"],
        "jvp_ms": 1e3 * timings[f"jvp_{precision}"]["median_s"],
        "sofo_over_float32": _harness.ratio_stats(
          sofo, timings["sofo_float32"]["samples_s"]
        )["median"],
        "jvp_rel_error": float(
          np.linalg.norm(derivatives - reference) / np.linalg.norm(reference)
        ),
      }
    )
    _harness.log(
      f"precision {precision}: sofo {rows[-1]['sofo_ms']:.2f} ms "
      f"({rows[-1]['sofo_over_float32']:.2f}x float32), jvp error {rows[-1]['jvp_rel_error']:.1e}"
    )
  return {
    "N": spec["hidden"],
    "B": sizes["batch"],
    "T": spec["horizon"],
    "K": spec["tangents"],
    "rows": rows,
    "timings": timings,
  }


# --------------------------------------------------------------------------
# Environment and driver.


def cuda_versions() -> dict | None:
  """CUDA versions JAX's GPU plugin reports, or None without a plugin.

  Returns:
    Every version function of the plugin's ``_versions`` module that takes
    no argument (runtime, driver, cuDNN, cuBLAS, ...), and the plugin's
    package version.
  """
  from jax._src.lib import cuda_versions as module  # pylint: disable=g-import-not-at-top

  if module is None:
    return None
  found = {}
  for name in dir(module):
    if name.endswith("_version") and not name.startswith("_"):
      # Some need an argument (a device) or a library that is absent.
      with contextlib.suppress(Exception):
        found[name] = getattr(module, name)()
  for package in ("jax-cuda13-plugin", "jax-cuda12-plugin"):
    try:
      found["plugin"] = f"{package} {importlib.metadata.version(package)}"
      break
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def _cuda_version(info: str, versions: dict | None) -> str | None:
  """``"12.8"`` from nvidia-smi's header in ``info``, else from the runtime."""
  match = re.search(r"CUDA Version:\s*([\d.]+)", info)
  if match:
    return match.group(1)
  runtime = (versions or {}).get("cuda_runtime_get_version")
  if isinstance(runtime, int) and runtime > 0:
    return f"{runtime // 1000}.{runtime % 1000 // 10}"
  return None


def environment() -> dict:
  """Device, versions and the XLA settings of this run."""
  import jaxlib  # pylint: disable=g-import-not-at-top

  info = jax.print_environment_info(return_string=True)
  versions = cuda_versions()
  devices = jax.devices()
  return {
    "device_kind": devices[0].device_kind,
    "device_count": len(devices),
    "platform": devices[0].platform,
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "cuda_version": _cuda_version(info, versions),
    "cuda_versions": versions,
    "jax_environment_info": info,
    "xla_env": {
      name: os.environ.get(name)
      for name in (
        "XLA_FLAGS",
        "XLA_PYTHON_CLIENT_PREALLOCATE",
        "XLA_PYTHON_CLIENT_MEM_FRACTION",
      )
    },
  }


def _section(name: str, budget: Budget, run) -> dict:
  """Runs a section unless the budget is spent; adds its elapsed seconds."""
  if budget.left(name) <= 0:
    _harness.log(f"{name}: {SKIPPED}")
    return {"status": SKIPPED}
  _harness.log(f"{name}: starting at {budget.elapsed():.0f} s")
  begin = time.perf_counter()
  result = run()
  result["seconds"] = time.perf_counter() - begin
  return result


def _parse(argv):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--sections",
    default=",".join(DEADLINES),
    help=f"comma-separated, from {', '.join(DEADLINES)} (default: all)",
  )
  parser.add_argument(
    "--out",
    default=None,
    help="output directory for gpu.json (default benchmarks/results; "
    "with --dry-run, under the temporary directory)",
  )
  parser.add_argument(
    "--dry-run",
    "--quick",
    dest="dry_run",
    action="store_true",
    help="tiny sizes, for a CPU, in seconds",
  )
  parser.add_argument(
    "--budget-s",
    type=float,
    default=420.0,
    help="wall-clock budget; later items are skipped past it (default 420)",
  )
  parser.add_argument(
    "--repeats",
    type=int,
    default=None,
    help="timed rounds per group (default 5; 2 with --dry-run)",
  )
  args = parser.parse_args(argv)
  args.sections = args.sections.split(",")
  unknown = sorted(set(args.sections) - set(DEADLINES))
  if unknown:
    parser.error(f"unknown sections {unknown}; choose from {list(DEADLINES)}")
  return args


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] == WORKER_FLAG:
    memory_worker(argv[1], json.loads(argv[2]))
    return None
  args = _parse(argv)
  budget = Budget(args.budget_s)
  mode = "dry_run" if args.dry_run else "full"
  sizes = SIZES[mode]
  repeats = args.repeats or sizes["repeats"]
  default_out = (
    Path(tempfile.gettempdir()) / "sofo_gpu_dry_run"
    if args.dry_run
    else _harness.RESULTS
  )
  out = Path(args.out) if args.out else default_out
  out.mkdir(parents=True, exist_ok=True)
  every = set(args.sections) == set(DEADLINES)
  path = out / ("gpu.json" if every else f"gpu_{'_'.join(args.sections)}.json")
  payload = {
    "command": [sys.executable, *sys.argv],
    "mode": mode,
    "budget_s": args.budget_s,
    "environment": environment(),
    "config": {
      "hidden": sizes["hidden"],
      "batch": sizes["batch"],
      "horizons": sizes["horizons"],
      "tangents": sizes["tangents"],
      "repeats": repeats,
      "memory": sizes["memory"],
      "flip_flop_steps": sizes["flip_flop"]["steps"],
      "precision": sizes["precision"],
    },
  }
  _harness.log(
    f"{mode} on {payload['environment']['device_kind']}, budget {args.budget_s:.0f} s, "
    f"writing {path}"
  )
  # The memory sweep runs first, before this process holds large buffers;
  # the JSON lists the sections in the order.
  sections = {
    "step_cost": None,
    "memory": None,
    "flip_flop": None,
    "mixed_precision": None,
  }
  runs = {
    "memory": lambda: memory_section(sizes, budget),
    "step_cost": lambda: step_cost_section(sizes, repeats, budget),
    "flip_flop": lambda: flip_flop_section(sizes, budget),
    "mixed_precision": lambda: precision_section(sizes, repeats),
  }
  for name, run in runs.items():
    if name in args.sections:
      sections[name] = _section(name, budget, run)
    else:
      sections[name] = {"status": NOT_SELECTED}
    payload.update(sections, elapsed_s=budget.elapsed())
    _harness.write_json(str(path.resolve()), payload)
  _harness.log(f"wrote {path} after {budget.elapsed():.0f} s")
  return payload


if __name__ == "__main__":
  main()
