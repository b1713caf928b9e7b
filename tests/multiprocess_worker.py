"""One of two processes of a real ``jax.distributed`` run (``test_multiprocess.py``).

``python multiprocess_worker.py PROCESS_ID PORT DIRECTORY``. Each process has
one CPU device; together they form a 2-device mesh, and CPU collectives go
through gloo. The process:

1. runs 4 data-parallel SOFO steps (``shard_map``, ``data_axis_name``), the
   batch split between the processes, the parameters and state replicated;
2. runs 2 steps, saves with ``sofo_jax.checkpoint.save`` and with a
   ``Manager`` from both processes, restores both into fresh templates and
   runs the 2 remaining steps;
3. saves to the same path again, which must raise ``FileExistsError`` in
   both processes (process 0 decides, the other hears it);
4. prints one JSON line: the straight run's parameters after each step,
   whether the resumed runs equal the straight one bit for bit, and the
   errors seen.

The test imports this module for its :func:`problem` (without the
``jax.distributed`` set-up, which runs only as a script).
"""

import json
import os
import sys

import jax

if __name__ == "__main__":
  # Before anything starts a JAX backend (importing sofo_jax does).
  PROCESS_ID, PORT, DIRECTORY = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_enable_x64", True)
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{PORT}",
    num_processes=2,
    process_id=PROCESS_ID,
    initialization_timeout=60,
  )

import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sofo_jax

sys.path.insert(0, os.path.dirname(__file__))
import models

K = 8
BATCH = 16
STEPS = 4


def problem():
  """The same data in every process (and in the test's reference run)."""
  rng = np.random.default_rng(0)
  params = models.mlp_params(rng, [3, 16, 2])
  xs = rng.normal(size=(BATCH, 3))
  ys = rng.normal(size=(BATCH, 2))
  return params, xs, ys


def optimizer(**axis_names):
  return sofo_jax.sofo(0.5, K, 1e-3, key=jax.random.key(0), **axis_names)


def step_fn(opt):
  def step(params, state, xs, ys):
    loss = lambda p: sofo_jax.losses.mse(models.mlp(p, xs), ys)
    updates, state = opt.update(None, state, params, loss_fn=loss)
    return jax.tree.map(lambda p, u: p + u, params, updates), state

  return step


def host(tree):
  """A replicated tree as NumPy (every process holds a full copy)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def same_bits(a, b):
  return all(
    np.asarray(x).tobytes() == np.asarray(y).tobytes()
    for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b)))
  )


def main(process_id: int, directory: str):
  assert jax.process_count() == 2 and jax.device_count() == 2, jax.devices()
  mesh = jax.make_mesh((2,), ("data",))
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P("data"))
  params0, xs, ys = problem()
  half = slice(process_id * BATCH // 2, (process_id + 1) * BATCH // 2)
  # Each process passes only its half of the batch.
  xs = jax.make_array_from_process_local_data(batch, xs[half])
  ys = jax.make_array_from_process_local_data(batch, ys[half])

  opt = optimizer(data_axis_name="data")
  step = jax.jit(
    jax.shard_map(
      step_fn(opt),
      mesh=mesh,
      check_vma=False,
      in_specs=(P(), P(), P("data"), P("data")),
      out_specs=P(),
    )
  )

  # device_put checks that every process passes the same value, and NaN
  # (SOFO's diagnostics before the first step) never equals itself: build
  # the replicated state inside jit instead. Recorded for the test.
  try:
    jax.device_put(opt.init(params0), replicated)
    device_put_error = None
  except AssertionError as error:
    device_put_error = str(error)
  init = jax.jit(opt.init, out_shardings=replicated)

  def fresh():
    params = jax.device_put(params0, replicated)
    return params, init(params)

  params, state = fresh()
  trajectory = []
  for _ in range(STEPS):
    params, state = step(params, state, xs, ys)
    trajectory.append(jax.tree.map(lambda x: x.tolist(), host(params)))
  straight = (params, state)

  params, state = fresh()
  for _ in range(STEPS // 2):
    params, state = step(params, state, xs, ys)
  path = os.path.join(directory, "ckpt")
  sofo_jax.checkpoint.save(path, params, state, step=STEPS // 2)
  with sofo_jax.checkpoint.Manager(os.path.join(directory, "run")) as manager:
    manager.save(STEPS // 2, params, state)
  # Process 0 decides whether the path is free; every process hears the answer.
  try:
    sofo_jax.checkpoint.save(path, params, state, step=STEPS // 2)
    exists_error = None
  except FileExistsError as error:
    exists_error = str(error)

  resumed = {}
  for how in ("save", "manager"):
    like = fresh()  # new templates, on the replicated sharding
    if how == "save":
      restored = sofo_jax.checkpoint.restore(path, like=like)
    else:
      with sofo_jax.checkpoint.Manager(os.path.join(directory, "run")) as manager:
        restored = manager.restore(like=like)
    params, state = restored.params, restored.opt_state
    on_mesh = all(x.sharding == replicated for x in jax.tree.leaves((params, state)))
    for _ in range(STEPS - restored.step):
      params, state = step(params, state, xs, ys)
    resumed[how] = dict(
      step=restored.step, on_mesh=on_mesh, bitwise=same_bits((params, state), straight)
    )
  print(
    json.dumps(
      dict(
        process=process_id,
        trajectory=trajectory,
        resumed=resumed,
        device_put_error=device_put_error,
        exists_error=exists_error,
      )
    )
  )
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(PROCESS_ID, DIRECTORY)
