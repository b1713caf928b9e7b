"""Shared benchmark plumbing: timing with warm-up, machine facts, JSON out."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import sofo_jax
from sofo_jax.demo import quick_mode  # noqa: F401  (re-exported for the scripts)

RESULTS = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
  """Prints ``message`` after the time of day, at once (progress of long runs)."""
  print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sofo_from_options(
  options: dict, num_tangents: int, key: jax.Array
) -> optax.GradientTransformationExtraArgs:
  """SOFO as a benchmark variant's options describe it.

  Args:
    options: ``learning_rate`` (a number or an optax schedule; default 1, the
      paper's), optionally ``num_tangents`` and ``weight_decay``, and any
      other keyword of :func:`sofo_jax.sofo`.
    num_tangents: K, unless ``options`` gives it.
    key: the tangents' PRNG key.

  Returns:
    ``sofo_jax.sofo(learning_rate, K, key=key, **rest)``; with a
    ``weight_decay`` of w, followed by ``optax.add_decayed_weights(-w)``, so
    that each update also shrinks the parameters by the factor 1 - w
    (decoupled from the learning rate; step control judges the SOFO step
    alone).
  """
  rest = dict(options)
  learning_rate = rest.pop("learning_rate", 1.0)
  weight_decay = rest.pop("weight_decay", None)
  optimizer = sofo_jax.sofo(
    learning_rate, rest.pop("num_tangents", num_tangents), key=key, **rest
  )
  if weight_decay is None:
    return optimizer
  # sofo's updates are already -lr d: add -w theta to shrink the parameters.
  return optax.chain(optimizer, optax.add_decayed_weights(-weight_decay))


def short(x: float | None, digits: int = 3) -> str:
  """``x`` to ``digits`` significant digits; a dash for a missing or non-finite one."""
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "—"
  return f"{x:.{digits}g}"


def bare_jvp(value_fn: Callable[[Any], Any], params: Any, tangents: Any) -> Any:
  """``value_fn(params)`` and its K directional derivatives: ``vmap`` of ``jvp``.

  ``tangents`` has the structure of ``params`` with a leading axis K. This is
  the irreducible cost of any K-tangent forward-mode method, against which
  a SOFO step is timed.
  """
  return jax.vmap(lambda v: jax.jvp(value_fn, (params,), (v,)))(tangents)


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> dict:
  """Min / median / mean wall-clock seconds of ``fn()`` after warm-up.

  ``fn`` must return JAX arrays; each call is timed up to
  ``block_until_ready`` so asynchronous dispatch is not mistaken for speed.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    samples.append(time.perf_counter() - start)
  return _stats(samples)


def _stats(samples: list[float]) -> dict:
  return {
    "min_s": min(samples),
    "median_s": statistics.median(samples),
    "mean_s": statistics.fmean(samples),
    "repeats": len(samples),
  }


def time_interleaved(
  fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2
) -> dict:
  """Times several functions side by side, round-robin.

  Each round times every function once (up to ``block_until_ready``), in an
  order rotated from round to round, so slow drifts of a shared machine (other
  tenants, frequency scaling) hit all of them alike instead of whichever was
  timed last. Ratios are then taken within a round.

  Returns:
    ``{name: {"min_s", "median_s", "mean_s", "repeats", "samples_s"}}``.
  """
  names = list(fns)
  for _ in range(warmup):
    for name in names:
      jax.block_until_ready(fns[name]())
  samples = {name: [] for name in names}
  for round_index in range(repeats):
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      start = time.perf_counter()
      jax.block_until_ready(fns[name]())
      samples[name].append(time.perf_counter() - start)
  return {name: {**_stats(s), "samples_s": s} for name, s in samples.items()}


def ratio_stats(numerator: list[float], denominator: list[float]) -> dict:
  """Median and quartiles of per-round ratios, and the ratio of the minima."""
  ratios = sorted(n / d for n, d in zip(numerator, denominator))
  quartiles = (
    statistics.quantiles(ratios, n=4, method="inclusive")
    if len(ratios) > 1
    else ratios * 3
  )
  return {
    "median": statistics.median(ratios),
    "q1": quartiles[0],
    "q3": quartiles[2],
    "of_minima": min(numerator) / min(denominator),
  }


# The instruction sets XLA's CPU code generation and kernels choose by.
_ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile")


def cpu() -> dict:
  """The CPU's model name and instruction sets (Linux), else what ``platform`` knows.

  ``platform.processor()`` says only ``x86_64`` on Linux. The CPU matters:
  XLA picks its CPU kernels by the host's instruction sets, so the same
  program can round differently on another CPU, and a long training run
  can end elsewhere.
  """
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
      for line in cpuinfo:
        name, _, value = line.partition(":")
        if name.strip() == "model name":
          model = value.strip()
        elif name.strip() == "flags":
          flags = set(value.split())
          break
  except OSError:
    pass
  return {"cpu_model": model, "cpu_isa": [f for f in _ISA_FLAGS if f in flags]}


def machine() -> dict:
  """Where and with what a benchmark ran."""
  import optax  # pylint: disable=g-import-not-at-top

  devices = jax.devices()
  return {
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
    **cpu(),
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "backend": jax.default_backend(),
    "devices": [d.device_kind for d in devices],
  }


def output_path(output: str | None, name: str, quick: bool) -> Path:
  """Where a script writes its JSON.

  ``output`` (a ``--output`` path) if given; otherwise ``name`` under
  ``benchmarks/results/``, or in quick mode ``<stem>_quick<suffix>`` under the
  temporary directory, so that a smoke test leaves the results alone.
  """
  if output:
    return Path(output).resolve()
  if quick:
    name = Path(name)
    return Path(tempfile.gettempdir()) / f"{name.stem}_quick{name.suffix}"
  return RESULTS / name


def write_json(path: str | Path, payload: dict) -> Path:
  """Writes ``payload`` after the machine, the load and the time; returns the path.

  ``path`` is a file name under ``benchmarks/results/`` or any absolute path.
  Floats keep 6 significant digits and non-finite ones become ``null``, so
  the file is strict JSON; one line per top-level entry keeps it small and
  diffable.
  """
  path = RESULTS / path
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = {
    "machine": machine(),
    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    **payload,
  }
  lines = [
    f" {json.dumps(k)}: {json.dumps(v, separators=(',', ':'), allow_nan=False)}"
    for k, v in _plain(payload).items()
  ]
  path.write_text("{\n" + ",\n".join(lines) + "\n}\n")
  return path


def _plain(x):
  """JSON-ready copy: lists for arrays, 6-digit floats, None for non-finite ones."""
  if isinstance(x, dict):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    return _plain(np.asarray(x).tolist())
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float):
    return float(f"{x:.6g}") if math.isfinite(x) else None
  if x is None or isinstance(x, (bool, int, str)):
    return x
  return str(x)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence | dict]) -> str:
  """A Markdown table with columns ``header``.

  A row is a sequence of cells, or a dict read at the names in ``header``
  (a missing one is left blank). Floats are shown to 4 significant digits.
  """

  def cells(row):
    values = [row.get(c, "") for c in header] if isinstance(row, dict) else row
    return [f"{v:.4g}" if isinstance(v, float) else str(v) for v in values]

  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
  return "\n".join(lines)
