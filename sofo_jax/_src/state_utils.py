"""Finding sofo_jax's state inside any optax state."""

from __future__ import annotations

from typing import Any

import jax

from sofo_jax._src import forward_gradient, transform

_STATE_KINDS = (
  transform.ScaleBySofoState,
  forward_gradient.ScaleByForwardGradientState,
)


def get_state(
  state: Any,
) -> transform.ScaleBySofoState | forward_gradient.ScaleByForwardGradientState:
  """The first SOFO or forward-gradient state nested anywhere in ``state``.

  Works through ``optax.chain``, ``inject_hyperparams``, ``apply_if_finite``
  and any other nesting of NamedTuples, tuples, lists and dicts.

  Args:
    state: an optimizer state.

  Returns:
    The :class:`ScaleBySofoState` or :class:`ScaleByForwardGradientState`.

  Raises:
    ValueError: if there is none.

  Example:
    >>> import jax, jax.numpy as jnp, sofo_jax
    >>> opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(0))
    >>> sofo_jax.get_state(opt.init({"w": jnp.ones(3)})).count
    Array(0, dtype=int32)
  """
  is_ours = lambda node: isinstance(node, _STATE_KINDS)
  for node in jax.tree.leaves(state, is_leaf=is_ours):
    if is_ours(node):
      return node
  raise ValueError("No sofo_jax optimizer state was found in this state.")


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
