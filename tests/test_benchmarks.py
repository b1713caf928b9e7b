"""The benchmark CLI runs end to end in quick mode and writes sane outputs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from commands import run_ok

import sofo_jax
from sofo_jax.tasks import double_reach

pytest.importorskip("matplotlib")

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


def _numbers(tree):
  if isinstance(tree, dict):
    for value in tree.values():
      yield from _numbers(value)
  elif isinstance(tree, list):
    for value in tree:
      yield from _numbers(value)
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield tree


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  env = {**os.environ, "SOFO_QUICK": "1"}
  run_ok(
    [sys.executable, str(RUN), "all", "--quick", "--out", str(out)],
    env=env,
    timeout=300,
  )
  return out


def test_xla_flags_set_after_importing_sofo_jax_take_effect(tmp_path):
  """Importing sofo_jax starts no JAX backend.

  ``run.py`` reads ``SOFO_QUICK`` through ``sofo_jax.demo`` and only then sets
  the quick mode's ``XLA_FLAGS``, which JAX reads when its backend starts.
  """
  code = (
    "import os, sys\n"
    "import sofo_jax.demo, jax\n"
    "os.environ['XLA_FLAGS'] = '--xla_dump_to=' + sys.argv[1]\n"
    "jax.jit(lambda x: x + 1)(1.0)\n"
  )
  dump = tmp_path / "dump"
  run_ok([sys.executable, "-c", code, str(dump)], timeout=120)
  assert dump.is_dir() and any(dump.iterdir())


def test_writes_every_file(quick_results):
  for name in (
    "convergence.json",
    "convergence.png",
    "memory.json",
    "memory.png",
    "time_vs_k.json",
    "time_vs_k.png",
    "results.md",
  ):
    path = quick_results / name
    assert path.exists() and path.stat().st_size > 0, name
  for name in ("convergence.png", "memory.png", "time_vs_k.png"):
    assert (quick_results / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_convergence_json(quick_results):
  payload = json.loads((quick_results / "convergence.json").read_text())
  assert payload["size"] == "quick"
  entry = payload["tasks"]["flip_flop"]
  assert entry["warmup_steps"] == entry["steps"] // 10
  for method in ("sofo", "adam", "fgd", "sgd"):
    m = entry["methods"][method]
    assert m["learning_rate"] in [g["learning_rate"] for g in m["grid"]]
    assert len(m["final_loss"]) == len(entry["seeds"])
    assert all(math.isfinite(x) for x in m["final_loss"])
    assert len(m["curve"]["mean"]) == len(m["curve"]["step"]) > 0
    timed = m["timed"]
    assert timed["seconds"] > 0 and timed["steps"] >= entry["steps"]
    assert math.isfinite(timed["final_metrics"]["loss"])
  # SOFO defines the wall-clock budget; every baseline ran at least as long
  # (or hit its iteration cap).
  t_star = entry["equal_wallclock_seconds"]
  assert entry["methods"]["sofo"]["timed"]["seconds"] == pytest.approx(t_star)
  for method in ("adam", "fgd", "sgd"):
    assert entry["methods"][method]["timed"]["covers_equal_wallclock"]
  assert entry["sofo_other_k"]


def test_memory_and_time_json(quick_results):
  memory = json.loads((quick_results / "memory.json").read_text())
  for kind in ("sofo", "bptt"):
    rows = memory["series"][kind]
    assert rows and all("error" not in r for r in rows)
    assert all(r["temp_bytes"] > 0 for r in rows)
  sofo, bptt = memory["series"]["sofo"], memory["series"]["bptt"]
  # Flat for SOFO, growing for BPTT, already at quick sizes.
  assert sofo[-1]["temp_bytes"] <= 1.1 * sofo[0]["temp_bytes"]
  assert bptt[-1]["temp_bytes"] >= 5 * bptt[0]["temp_bytes"]
  assert any("rss_growth_bytes" in r for r in sofo)
  timing = json.loads((quick_results / "time_vs_k.json").read_text())
  assert [r["K"] for r in timing["rows"]] == [4, 8]
  for row in timing["rows"]:
    assert row["jvp_median_ms"] > 0 and row["sofo_over_jvp"] > 0
    assert (
      len(row["sofo"]["samples_s"]) == len(row["jvp"]["samples_s"]) == timing["repeats"]
    )
  for name in ("convergence.json", "memory.json", "time_vs_k.json"):
    payload = json.loads((quick_results / name).read_text())
    assert all(math.isfinite(x) for x in _numbers(payload)), name


def test_results_markdown(quick_results):
  text = (quick_results / "results.md").read_text()
  assert "### Targets" in text and "flip_flop" in text and "run.py all --quick" in text


def _run_script(script: str, output, *args: str) -> dict:
  """Runs a benchmark script in quick mode and returns the JSON it wrote."""
  run_ok(
    [
      sys.executable,
      str(RUN.parent / script),
      "--quick",
      *args,
      "--output",
      str(output),
    ],
    timeout=600,
  )
  return json.loads(output.read_text())


def test_step_cost_quick(tmp_path):
  payload = _run_script("step_cost.py", tmp_path / "step_cost.json", "--repeats", "2")
  assert [r["K"] for r in payload["rows"]] == [4, 8]
  for row in payload["rows"]:
    for name in ("jvp", "sofo", "adam_bptt", "sketch", "tangent_draw"):
      assert len(row["timings"][name]["samples_s"]) == 2
      assert row["timings"][name]["min_s"] > 0
    q1, q3 = row["sofo_over_jvp_iqr"]
    assert 0 < q1 <= row["sofo_over_jvp"] <= q3
  assert all(math.isfinite(x) for x in _numbers(payload))


def test_remat_baseline_quick(tmp_path):
  payload = _run_script("remat_baseline.py", tmp_path / "x.json", "--repeats", "2")
  assert payload["methods"] == ["sofo", "bptt", "remat"]
  rows = payload["rows"]
  assert [r["T"] for r in rows] == [50, 200]
  for row in rows:
    for name in payload["methods"]:
      assert row[name]["temp_bytes"] > 0 and row[name]["median_ms"] > 0
  # Checkpointing pays off at the longer horizon.
  assert rows[-1]["remat"]["temp_bytes"] < rows[-1]["bptt"]["temp_bytes"]
  assert all(math.isfinite(x) for x in _numbers(payload))


def test_reproduction_quick(tmp_path):
  payload = _run_script(
    "reproduce.py",
    tmp_path / "reproduction.json",
    "--tasks",
    "flip_flop",
    "--batch-size",
    "6",
  )
  task = payload["tasks"]["flip_flop"]
  assert task["config"]["batch_size"] == 6
  for method in ("sofo_defaults", "sofo_paper", "sofo_tuned", "adam"):
    assert math.isfinite(task[method]["final_loss"]) and task[method]["ms_per_step"] > 0
  assert len(task["adam"]["grid"]) == 7
  assert (tmp_path / "reproduction.png").read_bytes()[:4] == b"\x89PNG"


def test_defaults_check_quick(tmp_path):
  payload = _run_script(
    "defaults_check.py",
    tmp_path / "defaults.json",
    "--seeds",
    "1",
    "--steps",
    "10",
    "--tasks",
    "flip_flop",
    "--variants",
    "defaults,paper_fixed_damping,lr_0.3,lr_1_to_0.1",
  )
  runs = {row["variant"]: row for row in payload["runs"]}
  assert set(runs) == {"defaults", "paper_fixed_damping", "lr_0.3", "lr_1_to_0.1"}
  assert payload["summary"]["defaults"]["runs"] == 1
  # A variant's own learning rate reaches the optimiser.
  assert (
    runs["lr_0.3"]["learning_rate"] == 0.3 and runs["defaults"]["learning_rate"] == 1
  )
  assert runs["lr_0.3"]["last20_mean"] != runs["defaults"]["last20_mean"]
  assert runs["lr_1_to_0.1"]["learning_rate"] == "schedule"
  # The long-run counts agree with the run's own flag.
  for row in runs.values():
    assert row["blew_up"] == (
      row["steps_above_3x_first"] > 0 or not math.isfinite(row["max_loss"])
    )
    assert math.isfinite(row["last_tenth_median"])
    # A non-finite loss is also a loss above 3x the first.
    assert 0 <= row["nonfinite_losses"] <= row["steps_above_3x_first"]
  summary = payload["summary"]["defaults"]
  assert summary["steps_above_3x_first_by_task"]["flip_flop"] == [
    runs["defaults"]["steps_above_3x_first"]
  ]


def test_step_control_variants_quick_and_merge(tmp_path):
  output = tmp_path / "variants.json"
  _run_script(
    "step_control_variants.py", output, "--tasks", "kalman", "--variants", "defaults"
  )
  payload = _run_script(
    "step_control_variants.py",
    output,
    "--merge",
    "--tasks",
    "kalman",
    "--variants",
    "lr_1_to_0.3",
    "--batch-size",
    "6",
  )
  assert payload["tasks"]["kalman"]["batch_size"] == 6
  rows = payload["tasks"]["kalman"]["variants"]
  assert set(rows) == {"defaults", "lr_1_to_0.3"}
  steps = payload["tasks"]["kalman"]["steps"]
  for row in rows.values():
    assert len(row["final_loss_per_seed"]) == 1 and row["max_over_first"] >= 1.0
    (step_of_max,) = row["step_of_max_per_seed"]
    assert 0 <= step_of_max < steps
    # The held-out loss of the final parameters, one per seed.
    (held_out,) = row["eval_loss_per_seed"]
    assert math.isfinite(held_out) and held_out > 0
    # Kalman's held-out MSE over the optimal filter's, one per seed.
    (mse_ratio,) = row["mse_ratio_per_seed"]
    assert math.isfinite(mse_ratio) and mse_ratio > 0
  assert "--merge" in payload["command"]


def test_spike_trace_quick(tmp_path):
  # Threshold 0: every step counts as a spike, which pins the bookkeeping.
  payload = _run_script(
    "spike_trace.py",
    tmp_path / "spikes.json",
    "--variants",
    "defaults",
    "--seeds",
    "0",
    "--threshold",
    "0",
    "--batch-size",
    "6",
  )
  assert payload["batch_size"] == 6
  (run,) = payload["runs"].values()
  assert run["num_spikes"] == run["longest_spike_run"] == len(run["spikes"]) == 20
  assert run["num_reverted_at_spikes"] == run["num_reverted"]
  assert run["max_over_first"] >= 1.0 and math.isfinite(run["final_loss"])
  # The final parameters on held-out batches, with Kalman's own metric.
  assert math.isfinite(run["held_out"]["loss"]) and run["held_out"]["loss"] > 0
  assert run["held_out"]["mse_ratio"] > 0
  quantiles = run["accepted_update_over_recent_quantiles"]
  assert 0 < quantiles["50"] <= quantiles["90"] <= quantiles["99"] <= quantiles["max"]
  assert run["spikes"][0]["last_update_over_params"] is None  # no step before the first
  assert all(spike["last_update_over_params"] >= 0 for spike in run["spikes"][1:])
  # Every step is a spike, so no curvature jump is without one.
  assert run["num_curvature_jumps"] == run["curvature_jumps_followed_by_spike"] == 0
  assert all(spike["curvature_jump_before"] > 0 for spike in run["spikes"][1:])
  # Kalman has per-example losses: the worst example's ratio and share.
  ratios = run["worst_example_ratio_quantiles"]
  assert 0 < ratios["50"] <= ratios["90"] <= ratios["99"] <= ratios["max"]
  for spike in run["spikes"][1:]:
    assert 0 < spike["worst_example_share"] <= 1
    assert 0 <= spike["worst_example_ratio_percentile"] <= 100


def test_double_reach_scale_refuses_an_adam_variant(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      str(RUN.parent / "double_reach_scale.py"),
      "--quick",
      "--sofo-variant",
      "adam",
      "--output",
      str(tmp_path / "scale.json"),
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode != 0
  assert "'adam' is not a SOFO variant" in result.stderr
  assert not (tmp_path / "scale.json").exists()


def test_double_reach_scale_quick(tmp_path):
  payload = _run_script(
    "double_reach_scale.py", tmp_path / "scale.json", "--seeds", "0,1"
  )
  methods = payload["methods"]
  assert list(methods) == ["sofo_defaults", "adam", "adam_longer"]
  for figures in methods.values():
    assert len(figures["final_loss_per_seed"]) == 2
    assert len(figures["reach_errors_per_seed_m"]) == 2
    assert all(ratio >= 1.0 for ratio in figures["max_over_first_per_seed"])
    first, second = figures["reach_error_1_m"], figures["reach_error_2_m"]
    # The verdict follows the errors and the 2 cm tolerance.
    assert figures["double_reach_produced"] == (first < 0.02 and second < 0.02)
  assert methods["adam_longer"]["steps"] == 5 * payload["steps"]
  assert (tmp_path / "scale.png").stat().st_size > 0

  payload = _run_script(
    "double_reach_scale.py",
    tmp_path / "variant.json",
    "--sofo-variant",
    "step_ratio",
    "--no-adam",
  )
  assert list(payload["methods"]) == ["sofo_step_ratio"]

  payload = _run_script(
    "double_reach_scale.py", tmp_path / "adam.json", "--no-sofo", "--adam-rate", "2e-3"
  )
  assert list(payload["methods"]) == ["adam", "adam_longer"]
  adam = payload["methods"]["adam"]
  assert adam["grid"] == [{"learning_rate": 2e-3, "final_loss": adam["final_loss"]}]
  assert adam["at_grid_edge"] is None
  assert payload["methods"]["adam_longer"]["learning_rate"] == 2e-3


def test_neurogym_check_quick(tmp_path):
  pytest.importorskip("neurogym")
  payload = _run_script(
    "neurogym_check.py",
    tmp_path / "neurogym.json",
    "--variants",
    "defaults,max_step_ratio_0.1",
  )
  # Quick mode: one seed of each of the 2 variants asked for on each of 2
  # environments.
  assert len(payload["rows"]) == 4
  pairs = {(row["env"], row["variant"]) for row in payload["rows"]}
  assert len(pairs) == 4
  assert {variant for _, variant in pairs} == {"defaults", "max_step_ratio_0.1"}
  assert all(0.0 <= row["accuracy"] <= 1.0 for row in payload["rows"])


def test_tf32_emulation_quick(tmp_path, monkeypatch):
  payload = _run_script("tf32_emulation.py", tmp_path / "tf32.json")
  runs = payload["runs"]
  assert set(runs) == {"sofo_tf32", "sofo_float32"}
  tf32, float32 = runs["sofo_tf32"]["0"], runs["sofo_float32"]["0"]
  for run in (tf32, float32):
    assert sum(run["rejected_per_100_steps"]) == run["steps_rejected"]
    assert math.isfinite(run["final_loss"]) and run["eval_loss"] > 0
  # The emulation changes the arithmetic, a little.
  assert tf32["final_loss"] != float32["final_loss"]
  assert tf32["final_loss"] == pytest.approx(float32["final_loss"], rel=0.05)
  # ... and only inside its block.
  monkeypatch.syspath_prepend(str(RUN.parent))
  import tf32_emulation  # pylint: disable=g-import-not-at-top

  from sofo_jax.tasks import _rnn  # pylint: disable=g-import-not-at-top

  original = _rnn.LeakyRNN.__call__
  with tf32_emulation.tf32_matmuls():
    assert _rnn.LeakyRNN.__call__ is not original
  assert _rnn.LeakyRNN.__call__ is original


def test_double_reach_gpu_dry_run(tmp_path):
  """Both methods train for equal time and get a verdict; the budget is kept."""
  run_ok(
    [
      sys.executable,
      str(RUN.parent / "double_reach_gpu.py"),
      "--dry-run",
      # Four seconds of training each, as before, but a budget with room for
      # slow compiles: on a loaded CPU a 20 s budget left Adam none.
      "--budget-s",
      "60",
      "--train-share",
      "0.07",
      "--matmul-precision",
      "float32",
      "--out",
      str(tmp_path),
    ],
    timeout=600,
  )
  payload = json.loads((tmp_path / "double_reach_gpu_float32.json").read_text())
  assert payload["matmul_precision"] == "float32"
  sofo, adam = payload["methods"]["sofo"], payload["methods"]["adam"]
  assert "status" not in adam, adam  # e.g. skipped for want of time
  assert sofo["num_tangents"] == payload["config"]["num_tangents"]
  assert adam["num_tangents"] is None
  # Adam trains no longer than SOFO did (fit stops at a chunk boundary).
  assert adam["train_seconds"] <= sofo["train_seconds"] + 1.0
  for figures in (sofo, adam):
    assert figures["steps"] >= 1 and figures["first_loss"] > 0
    assert sum(figures["rejected_per_100_steps"]) == figures["steps_rejected"]
    first, second = figures["reach_error_1_m"], figures["reach_error_2_m"]
    assert figures["double_reach_produced"] == (first < 0.02 and second < 0.02)
  assert payload["equal_iterations"]["steps"] == min(sofo["steps"], adam["steps"])
  assert (tmp_path / "double_reach_gpu_float32.png").stat().st_size > 0


def test_double_reach_gpu_names_its_file_by_seed_and_precision(monkeypatch):
  monkeypatch.syspath_prepend(str(RUN.parent))
  import double_reach_gpu  # pylint: disable=g-import-not-at-top

  assert double_reach_gpu.result_name(0, None) == "double_reach_gpu"
  assert double_reach_gpu.result_name(1, None) == "double_reach_gpu_seed1"
  assert double_reach_gpu.result_name(0, "float32") == "double_reach_gpu_float32"
  assert (
    double_reach_gpu.result_name(2, "tensorfloat32")
    == "double_reach_gpu_seed2_tensorfloat32"
  )


def test_gpu_runs_only_the_sections_asked_for(tmp_path):
  args = [sys.executable, str(RUN.parent / "gpu.py"), "--dry-run", "--out"]
  run_ok([*args, str(tmp_path), "--sections", "step_cost"], timeout=300)
  assert not (tmp_path / "gpu.json").exists()  # a full run's file is kept
  payload = json.loads((tmp_path / "gpu_step_cost.json").read_text())
  assert payload["step_cost"]["groups"]
  for name in ("memory", "flip_flop", "mixed_precision"):
    assert payload[name] == {"status": "skipped: not in --sections"}
  bad = subprocess.run(
    [*args, str(tmp_path), "--sections", "speed"], capture_output=True, text=True
  )
  assert bad.returncode != 0 and "unknown sections ['speed']" in bad.stderr


def test_gpu_dry_run(tmp_path):
  """``gpu.py --dry-run`` writes all four sections with positive, finite figures."""
  run_ok(
    [sys.executable, str(RUN.parent / "gpu.py"), "--dry-run", "--out", str(tmp_path)],
    timeout=300,
  )
  payload = json.loads((tmp_path / "gpu.json").read_text())
  assert all(math.isfinite(x) for x in _numbers(payload))
  env = payload["environment"]
  assert env["device_kind"] and env["jax"] and env["jaxlib"] and "cuda_version" in env
  assert "--dry-run" in payload["command"]
  step_cost = payload["step_cost"]
  assert step_cost["remat_check"]["agree"]
  assert [(r["T"], r["K"]) for r in step_cost["rows"]] == [
    (10, 4),
    (10, 8),
    (20, 4),
    (20, 8),
  ]
  for row in step_cost["rows"]:
    for name in (
      "jvp_ms",
      "sofo_ms",
      "adam_bptt_ms",
      "adam_remat_ms",
      "sofo_over_jvp",
      "sofo_over_adam",
    ):
      assert row[name] > 0, name
  for method, rows in payload["memory"]["series"].items():
    assert [(r["T"], r["status"]) for r in rows] == [(10, "ok"), (20, "ok")], method
    assert all(r["temp_bytes"] > 0 and r["run_s"] > 0 for r in rows), method
  for method, run in payload["flip_flop"]["methods"].items():
    assert len(run["loss"]) == len(run["seconds"]) == 5, method
    assert run["final_loss"] > 0 and run["total_s"] > 0, method
  rows = payload["mixed_precision"]["rows"]
  assert [r["precision"] for r in rows] == ["float32", "tensorfloat32", "bfloat16"]
  assert all(r["sofo_ms"] > 0 and r["jvp_ms"] > 0 for r in rows)


@pytest.mark.parametrize("name", ["kalman", "double_reach"])
def test_spike_trace_per_example_losses_average_to_the_task_loss(name, monkeypatch):
  """The trace's per-example losses, from the task's outputs, are the terms
  of the task's own loss: their mean over the batch, over T, is the loss."""
  monkeypatch.syspath_prepend(str(RUN.parent))
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import spike_trace  # pylint: disable=g-import-not-at-top

  from sofo_jax import tasks  # pylint: disable=g-import-not-at-top

  module = tasks.TASKS[name]
  task = module.make(module.Config.quick())
  params = task.init_params(jax.random.key(0))
  batch = task.sample_batch(jax.random.key(1))
  per_example = spike_trace.PER_EXAMPLE[name](task.outputs(params, batch))
  assert per_example.shape == (task.config.batch_size,)
  np.testing.assert_allclose(
    np.mean(per_example) / task.config.num_steps,
    task.loss_value(params, batch),
    rtol=1e-5,
  )


def test_initial_losses_quick(tmp_path):
  payload = _run_script("initial_losses.py", tmp_path / "initial.json")
  losses = np.asarray(payload["losses"])
  assert losses.shape == (3, 2)
  np.testing.assert_allclose(payload["per_seed_mean_loss"], losses.mean(1), rtol=1e-5)
  per_seed = np.asarray(payload["per_seed_mean_loss"])
  assert payload["seeds_above_1"] == [int(s) for s in np.flatnonzero(per_seed > 1)]
  excursion = np.asarray(payload["largest_joint_excursion_rad"])
  assert excursion.shape == (3,) and np.all(excursion >= 0)
  # Seed 0's first entry, recomputed here: defaults_check's initial
  # parameters for seed 0 on the batch of key 1000.
  task = double_reach.make(double_reach.Config.quick())
  init_key = jax.random.split(jax.random.key(0), 3)[0]
  expected = task.loss_value(
    task.init_params(init_key), task.sample_batch(jax.random.key(1000))
  )
  np.testing.assert_allclose(losses[0, 0], float(expected), rtol=1e-5)


def test_machine_names_the_cpu_and_its_instruction_sets(monkeypatch):
  monkeypatch.syspath_prepend(str(RUN.parent))
  import _harness  # pylint: disable=g-import-not-at-top

  cpu = _harness.machine()
  assert isinstance(cpu["cpu_model"], str) and cpu["cpu_model"]
  assert set(cpu["cpu_isa"]) <= set(_harness._ISA_FLAGS)
  if sys.platform == "linux" and "avx2" in Path("/proc/cpuinfo").read_text():
    assert "avx2" in cpu["cpu_isa"]


def test_sofo_from_options_weight_decay_shrinks_the_parameters(monkeypatch):
  monkeypatch.syspath_prepend(str(RUN.parent))
  import _harness  # pylint: disable=g-import-not-at-top

  params = {"w": np.linspace(0.5, 2.0, 6, dtype=np.float32).reshape(3, 2)}
  x = np.arange(12, dtype=np.float32).reshape(4, 3) / 10

  def loss_fn(p):
    return sofo_jax.losses.mse(x @ p["w"], np.ones((4, 2), np.float32))

  def update(options):
    optimizer = _harness.sofo_from_options(options, 3, jax.random.key(0))
    state = optimizer.init(params)
    return optimizer.update(None, state, params, loss_fn=loss_fn)[0]["w"]

  plain, decayed = update({}), update({"weight_decay": 0.1})
  np.testing.assert_allclose(decayed, plain - 0.1 * params["w"], rtol=1e-6)
