"""Plots and the markdown results tables, built from the JSON files only."""

from __future__ import annotations

import math
from pathlib import Path

import _harness  # pylint: disable=g-import-not-at-top
import _suite  # pylint: disable=g-import-not-at-top
import numpy as np

from sofo_jax import training

COLORS = {"sofo": "C0", "adam": "C1", "fgd": "C2", "sgd": "C3"}
README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"
REACH_TOLERANCE_M = 0.02


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def _arr(values) -> np.ndarray:
  return np.array([np.nan if v is None else v for v in values], np.float64)


# -- plots ------------------------------------------------------------------


def _save(fig, path: Path) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  _plt().close(fig)


def plot_convergence(payload: dict, path: Path) -> None:
  plt = _plt()
  tasks = payload["tasks"]
  fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.2 * len(tasks)), squeeze=False)
  for row, (name, entry) in zip(axes, tasks.items()):
    ax_it, ax_t = row
    for method in training.METHODS:
      m = entry["methods"][method]
      c = m["curve"]
      label = f"{_suite.LABELS[method]} (lr {m['learning_rate']:g}" + (
        f", λ {m['damping']:g})" if m["damping"] is not None else ")"
      )
      ax_it.plot(c["step"], _arr(c["mean"]), color=COLORS[method], label=label)
      if "min" in c:  # a range only with several seeds
        ax_it.fill_between(
          c["step"], _arr(c["min"]), _arr(c["max"]), color=COLORS[method], alpha=0.2
        )
      tc = m["timed"]["curve"]
      ax_t.plot(_arr(tc["seconds"]), _arr(tc["mean"]), color=COLORS[method])
    for i, (k, other) in enumerate(entry.get("sofo_other_k", {}).items()):
      oc = other["curve"]
      style = (":", "--", "-.")[i % 3]
      ax_it.plot(
        oc["step"],
        _arr(oc["mean"]),
        color="C0",
        ls=style,
        alpha=0.7,
        label=f"SOFO K={k} (seed 0)",
      )
      ax_t.plot(_arr(oc["seconds"]), _arr(oc["mean"]), color="C0", ls=style, alpha=0.7)
    # Clip diverging runs: show from below the best loss to above the start.
    starts = [entry["methods"][m]["curve"]["mean"][0] for m in training.METHODS]
    curves = [entry["methods"][m]["curve"] for m in training.METHODS]
    lows = [v for c in curves for v in c.get("min", c["mean"]) if v is not None]
    top = 3 * max(v for v in starts if v is not None)
    bottom = 0.5 * min([v for v in lows if v > 0] + [entry.get("target") or top])
    for ax in (ax_it, ax_t):
      ax.set_yscale("log")
      ax.set_ylim(bottom, top)
      if entry.get("target"):
        ax.axhline(entry["target"], color="k", ls=":", lw=0.8)
      ax.set_ylabel("training loss")
    ax_t.axvline(entry["equal_wallclock_seconds"], color="0.5", ls="--", lw=0.8)
    ax_it.set_xlabel("iteration")
    ax_t.set_xlabel("wall-clock seconds (compilation excluded, seed 0)")
    k = entry["config"].get("num_tangents")
    ax_it.set_title(f"{name}: mean and range over {len(entry['seeds'])} seeds (K={k})")
    ax_t.set_title(f"{name}: against time; dashed line = SOFO's time")
    ax_it.legend(fontsize=7)
  _save(fig, path)


def plot_memory(payload: dict, path: Path) -> None:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for kind, color, label in (("sofo", "C0", "SOFO"), ("bptt", "C1", "Adam + BPTT")):
    rows = [r for r in payload["series"][kind] if "temp_bytes" in r]
    ax.plot(
      [r["T"] for r in rows],
      [r["temp_bytes"] / 2**20 for r in rows],
      "o-",
      color=color,
      label=f"{label}: compiled temp",
    )
    meas = [r for r in rows if "rss_growth_bytes" in r]
    if meas:
      ax.plot(
        [r["T"] for r in meas],
        [max(r["rss_growth_bytes"], 1) / 2**20 for r in meas],
        "x",
        color=color,
        ms=9,
        label=f"{label}: measured peak RSS growth",
      )
    paper = payload.get("paper_size_compiled", {}).get(kind, [])
    if paper:
      ax.plot(
        [r["T"] for r in paper],
        [r["temp_bytes"] / 2**20 for r in paper],
        "s--",
        color=color,
        alpha=0.5,
        label=f"{label}: compiled temp, paper size",
      )
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("horizon T")
  ax.set_ylabel("MiB")
  ax.set_title("Memory of one training step (kalman RNN)")
  ax.legend(fontsize=7)
  _save(fig, path)


def plot_time(payload: dict, path: Path) -> None:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  rows = payload["rows"]
  ks = [r["K"] for r in rows]
  ax.plot(
    ks, [r["sofo_median_ms"] for r in rows], "o-", color="C0", label="SOFO (median)"
  )
  ax.plot(
    ks, [r["sofo_min_ms"] for r in rows], "v", color="C0", alpha=0.5, label="SOFO (min)"
  )
  if "jvp_median_ms" in rows[0]:
    ax.plot(
      ks,
      [r["jvp_median_ms"] for r in rows],
      "s--",
      color="C2",
      label="bare vmapped jvp (median)",
    )
  ax.plot(
    ks,
    [r["adam_median_ms"] for r in rows],
    "-",
    color="C1",
    label="Adam + BPTT (median)",
  )
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("K (tangents)")
  ax.set_ylabel("ms per iteration")
  ax.set_title("Time of one training step (kalman RNN)")
  ax.legend(fontsize=8)
  _save(fig, path)


# -- tables -----------------------------------------------------------------


def _mean(values) -> float | None:
  values = [v for v in values if v is not None and math.isfinite(v)]
  return float(np.mean(values)) if values else None


def _eval_loss(m: dict) -> float | None:
  return _mean([x["loss"] for x in m["metrics"]])


def convergence_tables(payload: dict) -> tuple[str, list[dict]]:
  tasks = payload["tasks"]
  out = []
  settings = []
  for name, e in tasks.items():
    c = e["config"]
    ms = e["methods"]
    horizon = c.get("num_steps", "—")
    if name == "double_reach":
      horizon = round(c["duration"] / c["dt"])
    settings.append(
      [
        name,
        str(e["num_params"]),
        str(c.get("num_tangents")),
        str(horizon),
        str(c.get("batch_size")),
        str(e["steps"]),
        f"{ms['sofo']['learning_rate']:g} / {ms['sofo']['damping']:g}",
        f"{ms['adam']['learning_rate']:g}",
        f"{ms['fgd']['learning_rate']:g}",
        f"{ms['sgd']['learning_rate']:g}",
      ]
    )
  out.append(
    "**Sizes and chosen settings** (P parameters, K tangents, T horizon, B batch, "
    "N iterations; chosen from the grids by a short tuning run, see below):\n"
  )
  out.append(
    _harness.markdown_table(
      ["task", "P", "K", "T", "B", "N", "SOFO lr / λ", "Adam lr", "FGD lr", "SGD lr"],
      settings,
    )
  )

  rows = []
  for name, e in tasks.items():
    ms = e["methods"]
    losses = {m: _eval_loss(ms[m]) for m in training.METHODS}
    ratio = (
      (losses["sofo"] / losses["adam"]) if losses["sofo"] and losses["adam"] else None
    )
    rows.append(
      [name]
      + [_harness.short(losses[m]) for m in training.METHODS]
      + [_harness.short(ratio, 2)]
    )
  out.append(
    f"\n**Loss at equal iterations** (after N iterations; loss of the final parameters on "
    f"{payload['eval_batches']} fixed evaluation batches, mean over "
    f"{len(next(iter(tasks.values()))['seeds'])} seeds):\n"
  )
  out.append(
    _harness.markdown_table(["task", "SOFO", "Adam", "FGD", "SGD", "SOFO / Adam"], rows)
  )

  rows = []
  for name, e in tasks.items():
    ms = e["methods"]
    cells = [name, _harness.short(e["equal_wallclock_seconds"])]
    for m in ("sofo", "adam", "fgd", "sgd"):
      t = ms[m]["timed"]
      mark = "" if t["covers_equal_wallclock"] else " †"
      cells.append(
        f"{_harness.short(t['final_metrics']['loss'])} ({t['steps']} it){mark}"
      )
    rows.append(cells)
  out.append(
    "\n**Loss at equal wall-clock** (seed 0; each method runs until the first chunk "
    "boundary at or after t*, SOFO's time for N iterations; loss of the final parameters "
    "on the evaluation batches; in brackets the iterations done; † = stopped by the "
    "iteration cap before t*):\n"
  )
  out.append(
    _harness.markdown_table(["task", "t* (s)", "SOFO", "Adam", "FGD", "SGD"], rows)
  )

  rows = []
  for name, e in tasks.items():
    ms = e["methods"]
    cells = [name, _harness.short(e["target"])]
    for m in training.METHODS:
      x = ms[m]
      s = x["steps_to_target_median"]
      seeds = len(x["steps_to_target"])
      it = (
        f"{s:.0f}"
        if s is not None
        else f"not reached ({x['seeds_reaching_target']}/{seeds} seeds)"
      )
      tt = x["timed"]["seconds_to_target"]
      cells.append(f"{it}; {_harness.short(tt)} s" if tt is not None else f"{it}; —")
    rows.append(cells)
  out.append(
    "\n**Iterations to target** (first iteration at which the running mean of the "
    "training loss over N/20 iterations is at or below the target; median over seeds, "
    "within N iterations; then the wall-clock seconds to the target in the timed seed-0 "
    "run, which for the baselines goes on until t*):\n"
  )
  out.append(
    _harness.markdown_table(["task", "target", "SOFO", "Adam", "FGD", "SGD"], rows)
  )

  other = []
  for name, e in tasks.items():
    for k, o in e.get("sofo_other_k", {}).items():
      other.append(
        [
          name,
          k,
          _harness.short(o["final_metrics"]["loss"]),
          _harness.short(1e3 * o["seconds_per_step"]),
          str(o["steps_to_target"] or "—"),
        ]
      )
    main = e["methods"]["sofo"]
    other.append(
      [
        name,
        f"{e['config']['num_tangents']} (main)",
        _harness.short(main["timed"]["final_metrics"]["loss"]),
        _harness.short(1e3 * main["timed"]["seconds_per_step"]),
        str(main["timed"]["steps_to_target"] or "—"),
      ]
    )
  out.append(
    "\n**SOFO at several K** (seed 0, N iterations, chosen lr / λ; evaluation loss, "
    "ms per iteration, iterations to target):\n"
  )
  out.append(
    _harness.markdown_table(["task", "K", "loss", "ms / it", "it. to target"], other)
  )

  grid_rows = []
  for method in training.METHODS:
    any_entry = next(iter(tasks.values()))["methods"][method]["grid"]
    values = ", ".join(
      f"{g['learning_rate']:g}"
      + (f"/{g['damping']:g}" if g["damping"] is not None else "")
      for g in any_entry
    )
    edge = [n for n, e in tasks.items() if e["methods"][method]["chosen_at_grid_edge"]]
    diverged = [
      n
      for n, e in tasks.items()
      if e["methods"][method].get("all_grid_points_diverged")
    ]
    grid_rows.append(
      [
        _suite.LABELS[method],
        values,
        ", ".join(edge) or "none",
        ", ".join(diverged) or "none",
      ]
    )
  out.append(
    f"\n**Grids** (lr, or lr/λ for SOFO; each point trained {_tune_steps(tasks)} "
    "iterations from a separate tuning seed, scored by the mean training loss over the "
    "last quarter):\n"
  )
  out.append(
    _harness.markdown_table(
      [
        "method",
        "grid",
        "chosen at an edge of the grid in",
        "every grid point diverged in",
      ],
      grid_rows,
    )
  )
  return "\n".join(out), _targets(payload)


def _tune_steps(tasks: dict) -> str:
  values = sorted({e["tune_steps"] for e in tasks.values()})
  return "/".join(str(v) for v in values)


def _targets(payload: dict) -> list[dict]:
  """The issue's targets, judged on the measured numbers."""
  tasks = payload["tasks"]
  verdicts = []
  for name in ("flip_flop", "lorenz", "delayed_addition"):
    if name not in tasks:
      continue
    ms = tasks[name]["methods"]
    s, a = _eval_loss(ms["sofo"]), _eval_loss(ms["adam"])
    met = s is not None and a is not None and s <= 0.1 * a
    verdicts.append(
      {
        "target": f"{name}: SOFO loss ≤ 0.1 × Adam's at equal iterations",
        "measured": f"SOFO {_harness.short(s)}, Adam {_harness.short(a)} (ratio {_harness.short(s / a if s and a else None, 2)})",
        "met": met,
      }
    )
  if "kalman" in tasks:
    ms = tasks["kalman"]["methods"]
    ratio = _mean([x["mse_ratio"] for x in ms["sofo"]["metrics"]])
    adam_ratio = _mean([x["mse_ratio"] for x in ms["adam"]["metrics"]])
    floor = tasks["kalman"]["initial_metrics"]["kalman_mse"]
    verdicts.append(
      {
        "target": "kalman: SOFO's MSE within 10% of the true-parameter Kalman filter's",
        "measured": f"SOFO MSE / KF MSE = {_harness.short(ratio)} (Adam {_harness.short(adam_ratio)}; KF MSE {_harness.short(floor)})",
        "met": ratio is not None and ratio <= 1.1,
      }
    )
  if "double_reach" in tasks:
    ms = tasks["double_reach"]["methods"]

    def reach(method):
      ms_ = ms[method]["metrics"]
      return _mean([x["reach_error_1"] for x in ms_]), _mean(
        [x["reach_error_2"] for x in ms_]
      )

    s1, s2 = reach("sofo")
    a1, a2 = reach("adam")
    sofo_ok = s1 is not None and s2 is not None and max(s1, s2) < REACH_TOLERANCE_M
    adam_ok = a1 is not None and a2 is not None and max(a1, a2) < REACH_TOLERANCE_M
    verdicts.append(
      {
        "target": (
          "double_reach: SOFO produces the delayed double reach, Adam does not, at equal "
          f"iterations (both mean reach errors < {100 * REACH_TOLERANCE_M:g} cm)"
        ),
        "measured": (
          f"SOFO errors {_harness.short(100 * s1 if s1 is not None else None)} / "
          f"{_harness.short(100 * s2 if s2 is not None else None)} cm, Adam "
          f"{_harness.short(100 * a1 if a1 is not None else None)} / "
          f"{_harness.short(100 * a2 if a2 is not None else None)} cm"
        ),
        "met": sofo_ok and not adam_ok,
      }
    )
  return verdicts


def memory_verdict(payload: dict) -> tuple[str, list[dict]]:
  series = payload["series"]

  def temp(kind, horizon):
    for r in series[kind]:
      if r["T"] == horizon and "temp_bytes" in r:
        return r["temp_bytes"]
    return None

  horizons = [r["T"] for r in series["sofo"]]
  rows = []
  for h in horizons:
    cells = [str(h)]
    for kind in ("sofo", "bptt"):
      r = next(r for r in series[kind] if r["T"] == h)
      cells.append(
        _harness.short(r["temp_bytes"] / 2**20) if "temp_bytes" in r else "error"
      )
      cells.append(
        _harness.short(r["rss_growth_bytes"] / 2**20)
        if "rss_growth_bytes" in r
        else "not run"
      )
    rows.append(cells)
  text = [
    _harness.markdown_table(
      [
        "T",
        "SOFO temp (MiB)",
        "SOFO RSS growth (MiB)",
        "BPTT temp (MiB)",
        "BPTT RSS growth (MiB)",
      ],
      rows,
    )
  ]
  paper = payload.get("paper_size_compiled") or {}
  if paper:
    prow = []
    for i, r in enumerate(paper["sofo"]):
      prow.append(
        [
          str(r["T"]),
          _harness.short(r["temp_bytes"] / 2**20),
          _harness.short(paper["bptt"][i]["temp_bytes"] / 2**20),
        ]
      )
    text.append(
      "\nAt the paper's size (100 units, batch 256, K = 128), compiled only:\n"
    )
    text.append(
      _harness.markdown_table(["T", "SOFO temp (MiB)", "BPTT temp (MiB)"], prow)
    )
  verdicts = []
  lo, hi = horizons[0], 10_000 if 10_000 in horizons else horizons[-1]
  s_lo, s_hi = temp("sofo", lo), temp("sofo", hi)
  if s_lo and s_hi:
    verdicts.append(
      {
        "target": f"SOFO step memory flat in T (≤ 1.1× from T = {lo} to T = {hi})",
        "measured": f"compiled temp {s_lo / 2**20:.3g} → {s_hi / 2**20:.3g} MiB "
        f"(× {s_hi / s_lo:.3g})",
        "met": s_hi <= 1.1 * s_lo,
      }
    )
  b = [
    (r["T"], r["temp_bytes"])
    for r in series["bptt"]
    if "temp_bytes" in r and r["T"] >= 1000
  ]
  if len(b) >= 2:
    slope = np.polyfit(np.log([t for t, _ in b]), np.log([x for _, x in b]), 1)[0]
    verdicts.append(
      {
        "target": "BPTT step memory linear in T",
        "measured": f"log-log slope of compiled temp for T ≥ 1000: {slope:.3f}; "
        f"T = {b[0][0]}: {b[0][1] / 2**20:.3g} MiB, T = {b[-1][0]}: "
        f"{b[-1][1] / 2**20:.3g} MiB",
        "met": abs(slope - 1) < 0.1,
      }
    )
  return "\n".join(text), verdicts


def time_table(payload: dict) -> str:
  rows = [
    [
      str(r["K"]),
      _harness.short(r["sofo_min_ms"]),
      _harness.short(r["sofo_median_ms"]),
      _harness.short(r.get("jvp_median_ms")),
      _harness.short(r.get("sofo_over_jvp"), 3),
      _harness.short(r["adam_median_ms"]),
      _harness.short(r["ratio_median"], 2),
    ]
    for r in payload["rows"]
  ]
  return _harness.markdown_table(
    [
      "K",
      "SOFO min (ms)",
      "SOFO median (ms)",
      "bare jvp median (ms)",
      "SOFO / jvp",
      "Adam median (ms)",
      "SOFO / Adam",
    ],
    rows,
  )


def machine_line(payload: dict) -> str:
  m = payload["machine"]
  load = payload.get("load_average")
  return (
    f"{m['processor']}, {m['cpu_count']} CPU cores, backend {m['backend']}, Python {m['python']}, "
    f"JAX {m['jax']}, Optax {m['optax']}, {m['platform']}"
    + (f"; 1-minute load average when it finished {load[0]:.1f}" if load else "")
  )


def results_markdown(out_dir: Path, command_note: str) -> str:
  import json  # pylint: disable=g-import-not-at-top

  parts = [command_note]
  verdicts = []
  conv = out_dir / "convergence.json"
  if conv.exists():
    payload = json.loads(conv.read_text())
    tables, v = convergence_tables(payload)
    verdicts += v
    parts.append(
      f"### Convergence ({payload['size']} size)\n\nMachine: {machine_line(payload)}. "
      f"Finished {payload['timestamp']}, {payload['seconds'] / 60:.0f} minutes.\n"
    )
    parts.append(tables)
    parts.append("\n![convergence](results/convergence.png)\n")
  mem = out_dir / "memory.json"
  mem_v = []
  if mem.exists():
    payload = json.loads(mem.read_text())
    table, mem_v = memory_verdict(payload)
    c = payload["config"]
    parts.append(
      f"### Memory of one training step against T ({payload['size']} size)\n\n"
      f"Kalman RNN, {c['num_hidden']} ReLU units, batch {c['batch_size']}, "
      f"K = {c['num_tangents']} ({payload['num_params']} parameters). Compiled temporary "
      f"memory from `memory_analysis()` for every T; peak RSS growth of one executed step "
      f"(fresh subprocess) for T ≤ {payload['run_max_T']}. Machine: {machine_line(payload)}.\n"
    )
    parts.append(table)
    parts.append("\n![memory](results/memory.png)\n")
  tk = out_dir / "time_vs_k.json"
  if tk.exists():
    payload = json.loads(tk.read_text())
    c = payload["config"]
    parts.append(
      f"### Time per iteration against K ({payload['size']} size)\n\n"
      f"Kalman RNN, {c['num_hidden']} units, T = {c['num_steps']}, batch "
      f"{c['batch_size']} ({payload['num_params']} parameters); full jitted training step "
      f"against the bare vmapped jvp of the same loss and an Adam + BPTT step, "
      f"warm-up then {payload['repeats']} rounds timed round-robin; SOFO / jvp is "
      f"the median of per-round ratios. Machine: {machine_line(payload)}.\n"
    )
    parts.append(time_table(payload))
    parts.append("\n![time vs K](results/time_vs_k.png)\n")
  verdicts += mem_v
  if verdicts:
    parts.insert(
      1,
      "### Targets\n\n"
      + _harness.markdown_table(
        ["target", "measured", "met"],
        [
          [v["target"], v["measured"], "**met**" if v["met"] else "**not met**"]
          for v in verdicts
        ],
      )
      + "\n",
    )
  return "\n".join(parts) + "\n"


def update_readme(readme: Path, markdown: str) -> bool:
  if not readme.exists():
    return False
  text = readme.read_text()
  if README_START not in text or README_END not in text:
    return False
  head, rest = text.split(README_START, 1)
  _, tail = rest.split(README_END, 1)
  readme.write_text(head + README_START + "\n" + markdown + README_END + tail)
  return True
