"""Checkpoint scenarios that need a process of their own (``test_checkpoint.py``).

Run as ``python checkpoint_processes.py MODE ARGS...``:

- ``save-model PATH``: saves :func:`model` and its SOFO state, so that the
  test (another process, other function addresses) restores it;
- ``race DIR ROUNDS ID``: one of two processes that save to the same paths
  ``DIR/0 ... DIR/ROUNDS-1`` at the same time, with ``overwrite=False``;
  prints one JSON line, per round the outcome of this process's save;
- ``crash-between-renames PATH``: saves at ``PATH``, then overwrites it and
  dies (``os._exit``, no cleanup) between the overwrite's two renames.
"""

import json
import os
import sys
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

import sofo_jax


class Model(eqx.Module):
  """An equinox model whose static field is a function (its address differs
  from one process to the next, and so does ``str(treedef)``)."""

  layer: eqx.nn.Linear
  activation: Callable = eqx.field(static=True)

  def __call__(self, x):
    return self.activation(self.layer(x))


def model(seed=0):
  return Model(eqx.nn.Linear(3, 2, key=jax.random.key(seed)), jax.nn.relu)


def optimizer():
  return sofo_jax.sofo(1.0, 2, key=jax.random.key(1))


def race_params(who: int):
  return {"w": jnp.full((64,), float(who))}


def _wait_for(path: str, seconds: float = 60.0) -> None:
  deadline = time.monotonic() + seconds
  while not os.path.exists(path):
    if time.monotonic() > deadline:
      raise TimeoutError(path)
    time.sleep(0.005)


def race(directory: str, rounds: int, who: int) -> None:
  """Even rounds are forced: both saves pass the existence check before
  either writes, so only the final rename can decide. Odd rounds start
  together and race freely."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  original = ocp.Checkpointer.save
  current = {"round": 0}

  def save_after_the_other_checked(self, *args, **kwargs):
    r = current["round"]
    if r % 2 == 0:
      open(os.path.join(directory, f"checked-{r}-{who}"), "w").close()
      _wait_for(os.path.join(directory, f"checked-{r}-{1 - who}"))
    return original(self, *args, **kwargs)

  ocp.Checkpointer.save = save_after_the_other_checked
  params = race_params(who)
  state = optimizer().init(params)
  outcomes = []
  for r in range(rounds):
    current["round"] = r
    open(os.path.join(directory, f"start-{r}-{who}"), "w").close()
    _wait_for(os.path.join(directory, f"start-{r}-{1 - who}"))
    try:
      sofo_jax.checkpoint.save(os.path.join(directory, str(r)), params, state, step=who)
      outcomes.append("saved")
    except FileExistsError as error:
      outcomes.append(f"FileExistsError: {error}")
  print(json.dumps(outcomes))


def crash_between_renames(path: str) -> None:
  params = {"w": jnp.zeros(3)}
  state = optimizer().init(params)
  sofo_jax.checkpoint.save(path, params, state, step=1)
  rename = os.rename

  def rename_then_die(source, target):
    if os.fspath(target) == path and ".partial-" in os.fspath(source):
      os._exit(17)  # a kill -9 between the two renames: no cleanup at all
    return rename(source, target)

  os.rename = rename_then_die
  sofo_jax.checkpoint.save(path, {"w": jnp.ones(3)}, state, step=2, overwrite=True)


if __name__ == "__main__":
  mode, *args = sys.argv[1:]
  if mode == "save-model":
    net = model()
    sofo_jax.checkpoint.save(args[0], net, optimizer().init(net), step=3)
  elif mode == "race":
    race(args[0], int(args[1]), int(args[2]))
  elif mode == "crash-between-renames":
    crash_between_renames(args[0])
  else:
    raise SystemExit(f"unknown mode {mode}")
