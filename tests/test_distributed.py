"""Data- and tangent-parallel SOFO against the single-device update.

The multi-device checks need 8 CPU devices, which JAX only creates if
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` is set before its
backend starts. So they run in two subprocesses (``distributed_checks.py``,
one per model, side by side) and this module asserts on the JSON they print;
the rest of the suite keeps its single device. The checks compile each
program once; XLA's LLVM optimisations are turned down in the subprocesses
to keep compiles short (they do not change the HLO collectives).

Sizes: K = 8 tangents, a batch of 16, an MLP with 386 parameters and an RNN
with 500 parameters (T = 5 steps, a loss at every step), so a collective of
parameter size would stand out from the K + K² = 72 numbers of the sketch.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from commands import cpu_devices_env

import sofo_jax

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_checks.py")
MODELS = ("mlp", "rnn")
SHARD_MAP_MODES = ("data", "tangent", "data_tangent")


@pytest.fixture(scope="module")
def results():
  env = cpu_devices_env(8)
  processes = {
    part: subprocess.Popen(
      [sys.executable, SCRIPT, part],
      env=env,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
    )
    for part in MODELS
  }
  merged = {"models": {}}
  for part, process in processes.items():
    out, err = process.communicate(timeout=900)
    if process.returncode:
      pytest.fail(f"distributed_checks.py {part} failed:\n{err[-6000:]}")
    data = json.loads(out.strip().splitlines()[-1])
    merged["models"].update(data.pop("models"))
    merged.update(data)
  return merged


# Step control evaluates the loss at its trial points and at the parameters
# before the last step: one small all-reduce over the data axis.
TRIAL_LOSSES = sofo_jax.StepControl().num_trials + 1


def _collectives(results, model, mode, kind=None):
  found = results["models"][model]["modes"][mode]["collectives"]
  return [c for c in found if kind is None or c["kind"] == kind]


@pytest.mark.parametrize("mode", (*SHARD_MAP_MODES, "gspmd_jit"))
@pytest.mark.parametrize("model", MODELS)
def test_parallel_updates_equal_single_device(results, model, mode):
  # Two successive steps: the replicated key advances identically everywhere.
  entry = results["models"][model]["modes"][mode]
  assert entry["error"] < 1e-11
  if "loss_error" in entry:
    assert entry["loss_error"] < 1e-12


@pytest.mark.parametrize("model", MODELS)
def test_data_parallel_all_reduces_one_plus_k_plus_k_squared(results, model):
  k = results["models"][model]["K"]
  assert _collectives(results, model, "data") == [
    {"kind": "all-reduce", "elements": 1 + k + k * k, "count": 1},
    # Step control: the losses at the trial points and at the last point.
    {"kind": "all-reduce", "elements": TRIAL_LOSSES, "count": 1},
  ]


@pytest.mark.parametrize("model", MODELS)
def test_tangent_parallel_gathers_output_tangents_and_rows(results, model):
  info = results["models"][model]
  k, steps, outputs = info["K"], info["T"], info["outputs_per_loss"]
  assert _collectives(results, model, "tangent") == [
    # Per loss evaluation (inside the user's scan for the RNN): the output
    # tangents of all K lanes.
    {"kind": "all-gather", "elements": k * outputs, "count": steps},
    # Once: the K x K Gauss-Newton rows with the gradient as extra column.
    {"kind": "all-gather", "elements": k * (k + 1), "count": 1},
  ]


@pytest.mark.parametrize("model", MODELS)
def test_two_dimensional_mesh_communication(results, model):
  info = results["models"][model]
  k, steps, outputs = info["K"], info["T"], info["outputs_per_loss"]
  data_shards, tangent_shards = 2, 4
  block = k // tangent_shards
  found = _collectives(results, model, "data_tangent")
  assert sorted((c["kind"], c["elements"], c["count"]) for c in found) == sorted(
    [
      # Output tangents of the local half of the batch, every loss step.
      ("all-gather", k * outputs // data_shards, steps),
      # Loss, gradient block and row block of this device, over the data axis.
      ("all-reduce", 1 + block * (k + 1), 1),
      # Row blocks and gradient entries over the tangent axis.
      ("all-gather", k * (k + 1), 1),
      # Step control's trial losses, over the data axis.
      ("all-reduce", TRIAL_LOSSES, 1),
    ]
  )


@pytest.mark.parametrize("mode", (*SHARD_MAP_MODES, "gspmd_jit"))
@pytest.mark.parametrize("model", MODELS)
def test_no_collective_of_parameter_size(results, model, mode):
  num_params = results["models"][model]["num_params"]
  found = _collectives(results, model, mode)
  assert found  # something is communicated
  assert max(c["elements"] for c in found) < num_params


@pytest.mark.parametrize("model", MODELS)
def test_plain_jit_with_sharded_batch_reduces_only_the_sketch(results, model):
  info = results["models"][model]
  k = info["K"]
  found = _collectives(results, model, "gspmd_jit")
  # XLA reduces inside the user's scan: once per time step for the RNN; the
  # sketch, and step control's trial losses.
  assert sorted((c["kind"], c["elements"], c["count"]) for c in found) == sorted(
    [
      ("all-reduce", 1 + k + k * k, info["T"]),
      ("all-reduce", TRIAL_LOSSES, info["T"]),
    ]
  )


def test_public_sketch_on_a_two_dimensional_mesh(results):
  # sofo_jax.sketch with both axis names returns the single-device sketch.
  assert results["sketch_error"] < 1e-12


def test_tangent_parallel_memory_is_constant_in_horizon(results):
  temp = results["temp_bytes"]
  assert temp["8"] == temp["64"] > 0


def test_check_vma_and_indivisible_k_give_clear_errors(results):
  errors = results["errors"]
  assert "check_vma=False" in errors["check_vma"]
  assert "multiple of the size 3" in errors["indivisible"]


# In-process checks: no extra devices needed.


@pytest.mark.parametrize(
  "kwargs, error",
  [
    (dict(data_axis_name=3), TypeError),
    (dict(tangent_axis_name=("a", "b")), TypeError),
    (dict(data_axis_name=("x", "t"), tangent_axis_name="t"), ValueError),
  ],
)
def test_bad_axis_names_raise_at_construction(kwargs, error):
  with pytest.raises(error):
    sofo_jax.scale_by_sofo(4, key=jax.random.key(0), **kwargs)


@pytest.mark.parametrize("name", ["data_axis_name", "tangent_axis_name"])
def test_unbound_axis_raises_at_trace_time(name):
  opt = sofo_jax.scale_by_sofo(4, key=jax.random.key(0), **{name: "data"})
  params = {"w": jnp.ones(3)}
  loss_fn = lambda p: sofo_jax.losses.mse(p["w"], jnp.zeros(3))
  with pytest.raises(ValueError, match="not a bound axis"):
    jax.eval_shape(
      lambda p, s: opt.update(None, s, p, loss_fn=loss_fn), params, opt.init(params)
    )
