"""Finding sofo_jax's state inside any optax state."""

from __future__ import annotations

from typing import Any

import optax

from sofo_jax._src import forward_gradient, transform

_STATE_KINDS = (
  transform.ScaleBySofoState,
  forward_gradient.ScaleByForwardGradientState,
)


def get_state(
  state: Any,
) -> transform.ScaleBySofoState | forward_gradient.ScaleByForwardGradientState:
  """The SOFO or forward-gradient state nested anywhere in ``state``.

  Works through ``optax.chain``, ``inject_hyperparams``, ``apply_if_finite``
  and any other nesting of NamedTuples, tuples, lists and dicts: it is
  :func:`optax.tree.get_all_with_path` looking for the state's class name,
  with clearer errors.

  Args:
    state: an optimizer state.

  Returns:
    The :class:`ScaleBySofoState` or :class:`ScaleByForwardGradientState`.

  Raises:
    ValueError: if there is none, or more than one (then pick one with
      ``optax.tree.get_all_with_path(state, "ScaleBySofoState")``).

  Example:
    >>> import jax, jax.numpy as jnp, sofo_jax
    >>> opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(0))
    >>> sofo_jax.get_state(opt.init({"w": jnp.ones(3)})).count
    Array(0, dtype=int32)
  """
  # optax matches a NamedTuple by class name; the isinstance filter keeps out
  # a field or dict key of that name and another library's class of that name.
  found = [
    value
    for kind in _STATE_KINDS
    for _, value in optax.tree.get_all_with_path(
      state, kind.__name__, filtering=lambda _, value: isinstance(value, _STATE_KINDS)
    )
  ]
  if not found:
    raise ValueError("No sofo_jax optimizer state was found in this state.")
  if len(found) > 1:
    raise ValueError(
      f"This state holds {len(found)} sofo_jax optimizer states, so which one "
      "to return is ambiguous; pick one from "
      'optax.tree.get_all_with_path(state, "ScaleBySofoState") (or '
      '"ScaleByForwardGradientState").'
    )
  return found[0]


def get_diagnostics(
  state: Any,
) -> transform.SofoDiagnostics | forward_gradient.ForwardGradientDiagnostics:
  """The diagnostics of the last step, from any optax state holding SOFO.

  Example:
    >>> import jax, jax.numpy as jnp, sofo_jax
    >>> opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(0))
    >>> diagnostics = sofo_jax.get_diagnostics(opt.init({"w": jnp.ones(3)}))
    >>> diagnostics.eigenvalues.shape
    (4,)
  """
  return get_state(state).diagnostics
