"""Memory of one training step against the horizon T: SOFO against BPTT.

The model is the kalman task's RNN (ReLU units, loss accumulated inside the
task's own ``lax.scan``). The step takes the batch as an argument, so the
data (which is O(T) for every method) counts as argument memory, not as the
step's temporary memory. Two measurements:

- Compiled: ``jax.jit(step).lower(...).compile().memory_analysis()``, the
  temporary (scratch) bytes XLA plans for the step. Exact and deterministic;
  compiling needs no memory proportional to T, so it is done for every T.
- Measured: the step is executed once, in a fresh subprocess, for T up to a
  limit, and the peak resident set size (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before the step) minus the resident size at
  that moment is reported. Allocations of 1 MiB and more are made to bypass
  the malloc free lists (``mallopt``), so buffers freed by the compiler are
  not silently reused. This is an upper-level, noisy measurement (page
  granularity, runtime thread stacks, glibc behaviour); ``jax.Device
  .memory_stats()`` returns ``None`` on CPU, so there is no allocator-level
  peak to read.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _suite  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import optax

from sofo_jax import training

FORWARD = ("sofo", "fgd")
METHOD_OF = {"sofo": "sofo", "bptt": "adam"}


def _task(overrides: dict, horizon: int):
  from sofo_jax.tasks import kalman  # pylint: disable=g-import-not-at-top

  config = dataclasses.replace(kalman.Config(), **overrides, num_steps=horizon)
  return kalman, config, kalman.make(config)


def _compiled_step(kind: str, overrides: dict, horizon: int):
  """The compiled step ``(params, state, batch) -> (params, state)``."""
  _, config, task = _task(overrides, horizon)
  method = METHOD_OF[kind]
  optimizer = training.make_optimizer(
    method,
    learning_rate=0.1,
    key=jax.random.key(1),
    num_tangents=config.num_tangents,
    damping=config.damping,
  )
  params = task.init_params(jax.random.key(0))
  state = optimizer.init(params)

  def step(params, state, batch):
    closure = lambda p: task.loss_fn(p, batch)
    if method in FORWARD:
      updates, state = optimizer.update(None, state, params, loss_fn=closure)
    else:
      grads = jax.grad(lambda p: closure(p).value)(params)
      updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  shape = jax.ShapeDtypeStruct((horizon, config.batch_size, 1), jnp.float32)
  batch = {"observations": shape, "latent": shape}
  begin = time.perf_counter()
  compiled = jax.jit(step).lower(params, state, batch).compile()
  return compiled, params, state, config, time.perf_counter() - begin


def compiled_memory(kind: str, overrides: dict, horizon: int) -> dict:
  compiled, _, _, _, seconds = _compiled_step(kind, overrides, horizon)
  analysis = compiled.memory_analysis()
  return {
    "temp_bytes": int(analysis.temp_size_in_bytes),
    "argument_bytes": int(analysis.argument_size_in_bytes),
    "output_bytes": int(analysis.output_size_in_bytes),
    "compile_seconds": seconds,
  }


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"{field} not in /proc/self/status")


def _bypass_free_lists() -> bool:
  try:
    libc = ctypes.CDLL("libc.so.6")
    m_mmap_threshold = -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 20))
  except (OSError, AttributeError):
    return False


def measure_point(kind: str, overrides: dict, horizon: int) -> dict:
  """Compiled memory and measured peak RSS growth of one executed step."""
  bypass = _bypass_free_lists()
  kalman, config, _ = _task(overrides, horizon)
  compiled, params, state, config, seconds = _compiled_step(kind, overrides, horizon)
  analysis = compiled.memory_analysis()
  data = kalman.generate(jax.random.key(2), config)
  batch = {"observations": data["observations"], "latent": data["latent"]}
  jax.block_until_ready((params, state, batch))
  del data
  with contextlib.suppress(OSError, AttributeError):
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident size
  baseline = _status_kib("VmRSS")
  begin = time.perf_counter()
  jax.block_until_ready(compiled(params, state, batch))
  step_seconds = time.perf_counter() - begin
  peak = _status_kib("VmHWM")
  return {
    "temp_bytes": int(analysis.temp_size_in_bytes),
    "argument_bytes": int(analysis.argument_size_in_bytes),
    "output_bytes": int(analysis.output_size_in_bytes),
    "compile_seconds": seconds,
    "rss_growth_bytes": 1024 * (peak - baseline),
    "rss_baseline_bytes": 1024 * baseline,
    "step_seconds": step_seconds,
    "malloc_bypass": bypass,
  }


def _measure_in_subprocess(kind: str, size: str, horizon: int) -> dict:
  script = Path(__file__).resolve().parent / "run.py"
  command = [
    sys.executable,
    str(script),
    "_memory_point",
    "--kind",
    kind,
    "--size",
    size,
    "--horizon",
    str(horizon),
  ]
  done = subprocess.run(
    command, capture_output=True, text=True, check=False, env=os.environ.copy()
  )
  lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
  if done.returncode != 0 or not lines:
    return {"error": (done.stderr or done.stdout)[-2000:]}
  return json.loads(lines[-1])


def run(size: str, log) -> dict:
  """Memory against T for SOFO and BPTT; the JSON payload."""
  overrides = _suite.memory_config(size)
  horizons = _suite.MEMORY_HORIZONS[size]
  run_max = _suite.MEMORY_RUN_MAX[size]
  _, config, task = _task(overrides, horizons[0])
  num_params = sum(x.size for x in jax.tree.leaves(task.init_params(jax.random.key(0))))
  series = {}
  for kind in ("sofo", "bptt"):
    rows = []
    for horizon in horizons:
      if horizon <= run_max:
        row = _measure_in_subprocess(kind, size, horizon)
      else:
        row = compiled_memory(kind, overrides, horizon)
      row["T"] = horizon
      rows.append(row)
      log(
        f"memory {kind} T={horizon}: temp {row.get('temp_bytes', float('nan')) / 2**20:.2f} MiB"
        + (
          f", RSS growth {row['rss_growth_bytes'] / 2**20:.1f} MiB, step {row['step_seconds']:.2f}s"
          if "rss_growth_bytes" in row
          else ""
        )
        + (f" ERROR {row['error'][-300:]}" if "error" in row else "")
      )
    series[kind] = rows
  paper = {}
  if size != "quick":
    # The paper's size (100 units, batch 256, K = 128), compiled only.
    for kind in ("sofo", "bptt"):
      paper[kind] = []
      for horizon in (100, 1000, 10_000, 100_000):
        row = compiled_memory(kind, {}, horizon)
        row["T"] = horizon
        paper[kind].append(row)
        log(
          f"memory (paper size, compiled) {kind} T={horizon}: "
          f"temp {row['temp_bytes'] / 2**20:.2f} MiB"
        )
  return {
    "task": "kalman",
    "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "num_steps"},
    "num_params": num_params,
    "run_max_T": run_max,
    "series": series,
    "paper_size_compiled": paper,
    "device_memory_stats": jax.devices()[0].memory_stats(),
  }
