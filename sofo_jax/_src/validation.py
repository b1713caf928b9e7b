"""Eager checks shared by the optimizers: clear errors at trace time."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import numpy as np

from sofo_jax._src import tree as tree_lib


def _check_nonnegative_scalar(value: Any, name: str, owner: str, kind: str) -> None:
  """Rejects a concrete value that is not a finite real scalar >= 0.

  A traced value (``optax.inject_hyperparams``) cannot be checked here.
  """
  try:
    array = np.asarray(value)
  except jax.errors.TracerArrayConversionError:
    return
  if array.shape != () or not np.issubdtype(array.dtype, np.number):
    raise TypeError(
        f"{owner}: {name} must be {kind}; got {type(value).__name__} "
        f"of shape {array.shape} and dtype {array.dtype}."
    )
  if not (np.isfinite(array) and array >= 0):
    raise ValueError(f"{owner}: {name} must be finite and >= 0; got {array}.")


def check_damping(damping: Any, owner: str) -> None:
  """Rejects a concrete damping that is not a finite scalar >= 0.

  A traced damping cannot be checked here; the solve then skips the step
  instead (``step_is_finite`` is False).
  """
  _check_nonnegative_scalar(damping, "damping", owner, "a real scalar")


def check_learning_rate(learning_rate: Any, owner: str) -> None:
  """Rejects a concrete learning rate that is not a finite scalar >= 0.

  A schedule (a callable) is accepted as it is.
  """
  if not callable(learning_rate):
    _check_nonnegative_scalar(
        learning_rate, "learning_rate", owner, "a real scalar or an optax schedule")


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
