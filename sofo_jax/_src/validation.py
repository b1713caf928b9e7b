"""Eager checks shared by the optimizers: clear errors at trace time."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike

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


def warn_if_below_floor(damping: Any, floor: float, owner: str) -> None:
  """Warns that a concrete starting damping below the floor will be raised.

  Step control never damps below ``StepControl.min_damping``, so a user who
  asks for less (say 1e-6, or 0 for undamped steps) would
  otherwise get the floor without a word.
  """
  try:
    value = float(np.asarray(damping))
  except jax.errors.TracerArrayConversionError:
    return
  if value < floor:
    warnings.warn(
      f"{owner}: damping={value:g} is below StepControl.min_damping="
      f"{floor:g}; step control starts at the floor and never damps less. "
      "For less damping pass step_control=sofo_jax.StepControl("
      f"min_damping={value:g}) as well.",
      stacklevel=3,
    )


def check_learning_rate(learning_rate: Any, owner: str) -> None:
  """Rejects a concrete learning rate that is not a finite scalar >= 0.

  A schedule (a callable) is accepted as it is.
  """
  if not callable(learning_rate):
    _check_nonnegative_scalar(
      learning_rate, "learning_rate", owner, "a real scalar or an optax schedule"
    )


def check_loss_fn(loss_fn: Callable | None, owner: str, extra_args: dict) -> None:
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
    raise ValueError(
      f"{owner} needs the current params: opt.update(updates, state, params, ...)."
    )
  part = tree_lib.partition(params, mask)
  if not part.trainable:
    raise ValueError(
      f"{owner} found no floating-point parameters to train (integer and "
      "boolean leaves, and leaves outside the mask, are left unchanged)."
    )
  return part


def check_params_at_init(
  params: Any, owner: str, mask: Any
) -> tree_lib.Partition | None:
  """:func:`check_params`, except that a tree with no leaves gives ``None``.

  ``optax.tree_map_params`` calls ``init`` on a placeholder with no leaves
  to learn which fields of the state are shaped like the params. Such a
  tree cannot be trained, and ``update`` still refuses it.
  """
  if params is not None and not jax.tree.leaves(params):
    return None
  return check_params(params, owner, mask)


def _ignored_updates_message(owner: str) -> str:
  return (
    f"{owner} computes its own step from loss_fn, so the updates passed in "
    "are ignored, and these are not zero (gradients, or the output of a "
    "transformation placed before it in a chain?). Pass None as updates "
    "(optax.apply_if_finite needs a tree: pass optax.tree.zeros_like(params)). "
    "SOFO must come first in a chain: put clipping, weight decay etc. after "
    "it, e.g. optax.chain(sofo_jax.scale_by_sofo(...), "
    "optax.clip_by_global_norm(1.0), optax.scale_by_learning_rate(lr))."
  )


def checked_count(updates: Any, count: ArrayLike, owner: str) -> ArrayLike:
  """Makes updates that SOFO would silently ignore an error.

  ``None`` and zero trees (the ``optax.apply_if_finite`` pattern) pass. A
  concrete nonzero tree raises ``TypeError`` at once; a traced one cannot be
  inspected while tracing, so ``count`` (which every state carries on) is
  tied to an ``equinox.error_if`` that raises when the step runs. Its cost
  is one reduction over the incoming tree, and nothing when it is ``None``.

  Returns:
    ``count``, possibly carrying the run-time check.
  """
  leaves = jax.tree.leaves(updates)
  if not leaves:
    return count
  try:
    nonzero = any(bool(np.any(np.asarray(leaf) != 0)) for leaf in leaves)
  except jax.errors.TracerArrayConversionError:
    nonzero = None
  if nonzero:
    raise TypeError(_ignored_updates_message(owner))
  if nonzero is False:
    return count
  any_nonzero = jnp.any(jnp.stack([jnp.any(leaf != 0) for leaf in leaves]))
  return eqx.error_if(count, any_nonzero, _ignored_updates_message(owner))


def check_aux_example(has_aux: bool, aux_example: Any) -> None:
  if aux_example is not None and not has_aux:
    raise ValueError("aux_example is only meaningful with has_aux=True.")


def zeros_like_example(example: Any) -> Any:
  """Zeros shaped like ``aux_example`` (arrays or ShapeDtypeStructs); None stays None."""
  if example is None:
    return None
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), example)


def warn_if_aux_changes_structure(has_aux: bool, stored_aux: Any, owner: str) -> None:
  """Warns, while tracing, that the state's structure is about to change.

  Without ``aux_example`` the state holds ``None`` until the first update
  stores the closure's aux, so the state that comes out differs in structure
  from the one that went in: ``lax.scan`` refuses it (with an error about
  the carry that does not name aux) and a jitted loop compiles twice.
  """
  if has_aux and stored_aux is None:
    warnings.warn(
      f"{owner}(has_aux=True) was built without aux_example, so this first "
      "update changes the state's structure (its aux goes from None to the "
      "closure's aux): lax.scan over steps fails and jax.jit compiles a "
      "second time. Pass aux_example=jax.eval_shape(lambda p: "
      "loss_fn(p)[1], params) when building the optimizer.",
      stacklevel=3,
    )
