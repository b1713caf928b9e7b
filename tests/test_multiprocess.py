"""Two real processes on this machine: ``jax.distributed``, SOFO and checkpoints.

``multiprocess_worker.py`` runs twice, as process 0 and process 1 of a
``jax.distributed`` run (coordinator on 127.0.0.1, one CPU device each, CPU
collectives through gloo). Together they run data-parallel SOFO
(``data_axis_name``) on a 2-device mesh, the batch split between them, and
save and restore checkpoints from both. This module checks what they print:

- the two processes hold the same parameters after every step, equal (to
  float64 round-off) to a single-process run on the whole batch;
- a checkpoint saved by both and restored by both, with :func:`save` and
  with a :class:`Manager`, lands on the mesh and resumes bit for bit;
- a save to a taken path raises ``FileExistsError`` in both processes;
- a JAX limitation the multi-host recipe must avoid: ``jax.device_put`` of a
  state that holds NaN (SOFO's diagnostics before the first step) onto a
  sharding across processes fails, because it checks that the processes
  pass equal values and NaN != NaN.

About 10-20 s on a 2-core machine; the workers are killed after 120 s.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")

import multiprocess_worker as worker  # pylint: disable=g-import-not-at-top

SCRIPT = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
TIMEOUT_S = 120


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
  directory = tmp_path_factory.mktemp("multiprocess")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # One device per process, whatever the caller's XLA_FLAGS force.
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  port = _free_port()
  logs = [(directory / f"out{i}", directory / f"err{i}") for i in range(2)]
  processes = []
  try:
    for i, (out, err) in enumerate(logs):
      with open(out, "w") as stdout, open(err, "w") as stderr:
        processes.append(
          subprocess.Popen(
            [sys.executable, SCRIPT, str(i), str(port), str(directory / "checkpoints")],
            env=env,
            stdout=stdout,
            stderr=stderr,
          )
        )
    # If one process fails, the other would wait for it in a barrier: stop both.
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
      if any(p.poll() for p in processes):
        break
      time.sleep(0.1)
  finally:
    for process in processes:
      process.kill()
      process.wait()
  for i, (process, (_, err)) in enumerate(zip(processes, logs)):
    if process.returncode:
      pytest.fail(
        f"process {i} failed or timed out after {TIMEOUT_S} s (exit "
        f"{process.returncode}):\n{err.read_text()[-6000:]}"
      )
  return [json.loads(out.read_text().strip().splitlines()[-1]) for out, _ in logs]


def test_data_parallel_steps_across_two_processes_equal_one_process(outputs, x64):
  del x64  # float64, like the workers
  params, xs, ys = worker.problem()
  opt = worker.optimizer()
  step = jax.jit(worker.step_fn(opt))
  state = opt.init(params)
  assert outputs[0]["trajectory"] == outputs[1]["trajectory"]  # identical replicas
  initial = params
  for two_process_params in outputs[0]["trajectory"]:
    params, state = step(params, state, xs, ys)
    # JSON nests lists; the innermost lists of numbers are the arrays.
    got = jax.tree.map(
      np.asarray,
      two_process_params,
      is_leaf=lambda x: isinstance(x, list) and bool(x) and not isinstance(x[0], dict),
    )
    jax.tree.map(
      lambda want, got: np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12),
      params,
      got,
    )
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), initial, params)
  assert min(jax.tree.leaves(moved)) > 1e-3, moved  # the steps did something


@pytest.mark.parametrize("how", ["save", "manager"])
def test_checkpoint_from_both_processes_resumes_bitwise(outputs, how):
  for output in outputs:
    assert output["resumed"][how] == dict(step=2, on_mesh=True, bitwise=True)


def test_taken_path_raises_in_every_process(outputs):
  first, second = (output["exists_error"] for output in outputs)
  assert first is not None and "pass overwrite=True" in first
  assert second is not None and second.startswith("(on process 0) FileExistsError")


def test_device_put_of_a_nan_state_across_processes_fails(outputs):
  """Documents a JAX limitation (see docs/distributed.md): build a replicated
  state with ``jax.jit(opt.init, out_shardings=...)`` instead."""
  for output in outputs:
    assert "is not the same on each process" in output["device_put_error"]
