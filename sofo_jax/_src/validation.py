"""Eager checks shared by the optimizers: clear errors at trace time."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import numpy as np

from sofo_jax._src import tree as tree_lib


def check_damping(damping: Any, owner: str) -> None:
  """Rejects a concrete damping that is not a finite scalar >= 0.

  A traced damping (``optax.inject_hyperparams``) cannot be checked here; the
  solve then skips the step instead (``step_is_finite`` is False).
  """
  try:
    value = np.asarray(damping)
  except jax.errors.TracerArrayConversionError:
    return
  if value.shape != () or not np.issubdtype(value.dtype, np.number):
    raise TypeError(
        f"{owner}: damping must be a real scalar; got {type(damping).__name__} "
        f"of shape {value.shape} and dtype {value.dtype}."
    )
  if not (np.isfinite(value) and value >= 0):
    raise ValueError(f"{owner}: damping must be finite and >= 0; got {value}.")


def check_learning_rate(learning_rate: Any, owner: str) -> None:
  """Rejects a concrete learning rate that is not a finite scalar > 0.

  Schedules (callables) and traced values are checked only for being
  callables or scalars.
  """
  if callable(learning_rate):
    return
  try:
    value = np.asarray(learning_rate)
  except jax.errors.TracerArrayConversionError:
    return
  if value.shape != () or not np.issubdtype(value.dtype, np.number):
    raise TypeError(
        f"{owner}: learning_rate must be a real scalar or an optax schedule; "
        f"got {type(learning_rate).__name__}."
    )
  if not (np.isfinite(value) and value >= 0):
    raise ValueError(f"{owner}: learning_rate must be finite and >= 0; got {value}.")


def check_loss_fn(loss_fn: Optional[Callable], owner: str, extra_args: dict) -> None:
  if loss_fn is None:
    others = f" (received extra arguments {sorted(extra_args)})" if extra_args else ""
    raise ValueError(
        f"{owner} needs the loss closure: call "
        "opt.update(grads_or_None, state, params, loss_fn=loss_fn)" + others + "."
    )
  if not callable(loss_fn):
    raise TypeError(f"{owner}: loss_fn must be callable; got {type(loss_fn).__name__}.")


def check_params(params: Any, owner: str, mask: Any) -> tree_lib.Partition:
  if params is None:
    raise ValueError(f"{owner} needs the current params: opt.update(updates, state, params, ...).")
  part = tree_lib.partition(params, mask)
  if not part.trainable:
    raise ValueError(
        f"{owner} found no floating-point parameters to train (integer and "
        "boolean leaves, and leaves outside the mask, are left unchanged)."
    )
  return part
