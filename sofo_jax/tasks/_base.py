"""The task interface shared by every benchmark in :mod:`sofo_jax.tasks`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

Params = Any
Batch = Any


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """The settings every task ``Config`` carries, so one harness can drive them all.

  Each task module's ``Config`` is a frozen dataclass that extends this one
  with the task's own fields, overrides the defaults below where the paper's
  settings for that task differ, and has a ``quick()`` constructor for tiny
  CI-sized problems.

  Attributes:
    batch_size: number of independent trials in one batch.
    num_tangents: number of SOFO tangents ``K``.
    learning_rate: SOFO learning rate ``eta``.
    damping: SOFO damping ``lambda``, relative to the largest eigenvalue of
      the sketched Gauss-Newton matrix.
    adam_learning_rate: learning rate of the Adam (backpropagation) baseline.
  """

  batch_size: int = 256
  num_tangents: int = 128
  learning_rate: float = 1.0
  damping: float = 1e-5
  adam_learning_rate: float = 1e-3


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """A training problem: model initialisation, data, loss and metrics.

  Every function is pure, deterministic given its key and compatible with
  ``jax.jit``; shapes are fixed by the task's ``config``. Parameters are a
  pytree of arrays (the array part of an equinox model, see
  ``equinox.partition``); the static part of the model is closed over.

  Attributes:
    name: registry name of the task, e.g. ``"kalman"``.
    config: the frozen ``Config`` the task was built from (see
      :class:`TaskConfig` for the fields every config has).
    init_params: ``key -> params``.
    sample_batch: ``key -> batch``, a pytree of arrays. Sequences are stored
      time-major, ``(T, batch, ...)``, so that they can be scanned over.
    loss_fn: ``(params, batch) -> sofo_jax.losses.Loss``. Recurrent tasks
      accumulate per-step losses inside their own ``jax.lax.scan``, so the
      SOFO step runs in memory independent of the horizon.
    metrics: ``(params, batch) -> dict`` of scalar arrays computed with plain
      ``jax.numpy`` (task error, baselines, accuracies).
    outputs: ``(params, batch) -> dict`` of full trajectories for plotting.
      Memory grows with the horizon; not meant for training.

  Example:
    >>> import jax
    >>> from sofo_jax.tasks import flip_flop
    >>> task = flip_flop.make(flip_flop.Config.quick())
    >>> params = task.init_params(jax.random.key(0))
    >>> batch = task.sample_batch(jax.random.key(1))
    >>> float(task.loss_value(params, batch)) > 0
    True
  """

  name: str
  config: Any
  init_params: Callable[[PRNGKeyArray], Params]
  sample_batch: Callable[[PRNGKeyArray], Batch]
  loss_fn: Callable[[Params, Batch], Any]
  metrics: Callable[[Params, Batch], Mapping[str, Array]]
  outputs: Callable[[Params, Batch], Mapping[str, Array]]

  def loss_value(self, params: Params, batch: Batch) -> Array:
    """Scalar loss value, differentiable with ``jax.grad`` (for baselines)."""
    return self.loss_fn(params, batch).value


def partition_model(
  build: Callable[[PRNGKeyArray], Any],
) -> tuple[Callable[[PRNGKeyArray], Params], Any]:
  """Splits an equinox model factory into ``init_params`` and a static part.

  Args:
    build: ``key -> model``, an equinox module whose arrays are parameters.

  Returns:
    ``(init_params, static)``: ``init_params(key)`` returns the array leaves of
    ``build(key)`` (other leaves ``None``), and ``eqx.combine(params, static)``
    rebuilds the model. The static part is found by abstract evaluation, so
    nothing is computed here.
  """
  shapes = eqx.filter_eval_shape(build, jax.random.key(0))
  _, static = eqx.partition(shapes, lambda leaf: isinstance(leaf, jax.ShapeDtypeStruct))

  def init_params(key: PRNGKeyArray) -> Params:
    return eqx.partition(build(key), eqx.is_array)[0]

  return init_params, static


def check_positive(name: str, value: float | int) -> None:
  """Raises ``ValueError`` unless a configuration value is positive."""
  if not value > 0:
    raise ValueError(f"`{name}` must be positive, got {value!r}.")


def check_common(config: Any) -> None:
  """Validates the fields of :class:`TaskConfig`."""
  for name in ("batch_size", "num_tangents"):
    value = getattr(config, name)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
  for name in ("learning_rate", "adam_learning_rate"):
    check_positive(name, getattr(config, name))
  if not config.damping >= 0:
    raise ValueError(f"`damping` must be non-negative, got {config.damping!r}.")


def mean_sq_error(outputs: Array, targets: Array) -> Array:
  """Mean over leading axes of the feature-summed squared error.

  The same reduction as ``sofo_jax.losses.mse``, in plain ``jax.numpy``, for
  metrics.
  """
  return jnp.mean(jnp.sum(jnp.square(outputs - targets), axis=-1))


def time_keys(key: PRNGKeyArray, num_steps: int) -> PRNGKeyArray:
  """One key per time step, to draw per-step noise inside ``lax.scan``.

  Drawing inside the scan keeps the generator's temporary memory independent
  of the number of steps (only the generated sequence itself is ``O(T)``).
  """
  return jax.random.split(key, num_steps)
