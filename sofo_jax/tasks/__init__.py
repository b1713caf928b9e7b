"""Benchmark tasks from the SOFO paper, behind one interface.

Every task module exposes ``Config`` (a frozen dataclass holding the paper's
settings, with ``Config.quick()`` for tiny test-sized problems), ``generate``
(the data generator) and ``make(config) -> Task``. A :class:`Task` bundles
``init_params``, ``sample_batch``, a curvature-aware ``loss_fn``, ``metrics``
and ``outputs``, so one harness can train any of them with SOFO or with a
backpropagation baseline:

>>> import jax, optax, sofo_jax
>>> from sofo_jax import tasks
>>> task = tasks.TASKS["kalman"].make(tasks.kalman.Config.quick())
>>> cfg = task.config
>>> opt = sofo_jax.sofo(cfg.learning_rate, cfg.num_tangents, cfg.damping,
...                     key=jax.random.key(0))
>>> params = task.init_params(jax.random.key(1))
>>> state = opt.init(params)
>>> batch = task.sample_batch(jax.random.key(2))
>>> updates, state = opt.update(
...     None, state, params, loss_fn=lambda p: task.loss_fn(p, batch))
>>> params = optax.apply_updates(params, updates)

``Config.quick()`` sizes are for tests and runs of a few hundred steps, not
for experiments. Their batches of 4 are so noisy that SOFO at learning
rate 1, which fits each batch's damped Gauss–Newton step almost exactly,
spikes and drifts over thousands of steps (Adam does not); train longer at
``Config()``, a larger batch, or ``learning_rate=0.1`` (benchmarks README,
"Long runs at small batches").

Tasks: ``flip_flop`` (3-bit flip-flop), ``lorenz`` (Lorenz attractor, sparse
supervision), ``kalman`` (adaptive Kalman filtering, long horizons),
``double_reach`` (two-link arm, delayed double reach), ``delayed_addition``
and ``digits`` (feedforward MLP; needs scikit-learn).
"""

from types import ModuleType

from sofo_jax.tasks import (
  delayed_addition,
  digits,
  double_reach,
  flip_flop,
  kalman,
  lorenz,
)
from sofo_jax.tasks._arm import ArmParameters, ArmState
from sofo_jax.tasks._base import Task, TaskConfig
from sofo_jax.tasks._rnn import LeakyRNN

#: Task modules by name; each has ``Config``, ``generate`` and ``make``.
TASKS: dict[str, ModuleType] = {
  module.NAME: module
  for module in (flip_flop, lorenz, kalman, double_reach, delayed_addition, digits)
}

__all__ = (
  "TASKS",
  "ArmParameters",
  "ArmState",
  "LeakyRNN",
  "Task",
  "TaskConfig",
  "delayed_addition",
  "digits",
  "double_reach",
  "flip_flop",
  "kalman",
  "lorenz",
)
