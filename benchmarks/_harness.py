"""Shared benchmark plumbing: timing with warm-up, machine facts, JSON out."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

RESULTS = Path(__file__).resolve().parent / "results"


def quick_mode(flag: bool = False) -> bool:
  """True with ``--quick`` or ``SOFO_QUICK=1``."""
  return flag or os.environ.get("SOFO_QUICK", "0") not in ("", "0")


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


def machine() -> dict:
  """Where and with what a benchmark ran."""
  import optax  # pylint: disable=g-import-not-at-top

  devices = jax.devices()
  return {
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "backend": jax.default_backend(),
    "devices": [d.device_kind for d in devices],
  }


def write_json(name: str, payload: dict) -> Path:
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / name
  payload = {
    "machine": machine(),
    "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    **payload,
  }
  path.write_text(json.dumps(payload, indent=2))
  return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    cells = []
    for c in columns:
      v = row.get(c, "")
      cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
