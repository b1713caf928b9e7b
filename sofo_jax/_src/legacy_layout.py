"""Reading SOFO states saved before their buffers were shaped like the params.

Until 2026-12-05, :class:`~sofo_jax.ScaleBySofoState` kept ``last_update``
and ``recycled`` as flat tuples of the trained leaves. They are now shaped
like the params, with ``optax.MaskedNode()`` on the leaves SOFO does not
train, so that ``optax.tree_map_params`` reaches them. Both layouts hold the
same arrays in the same order (the params' flattening order, untrained
leaves left out), so a checkpoint of the old layout restores into the new
one by moving the arrays, not by changing them.
"""

from __future__ import annotations

from typing import Any

import jax

from sofo_jax._src import transform

_BUFFERS = ("last_update", "recycled")


def _is_sofo_state(node: Any) -> bool:
  return isinstance(node, transform.ScaleBySofoState)


def has_buffers(opt_state: Any) -> bool:
  """Whether any SOFO state inside ``opt_state`` keeps a buffer."""
  states = jax.tree.leaves(opt_state, is_leaf=_is_sofo_state)
  return any(
    getattr(state, name) is not None
    for state in states
    if _is_sofo_state(state)
    for name in _BUFFERS
  )


def to_tuple_layout(opt_state: Any) -> Any:
  """``opt_state`` with every SOFO buffer as the tuple of its arrays."""

  def flat(node):
    if not _is_sofo_state(node):
      return node
    return node._replace(
      **{
        name: None
        if getattr(node, name) is None
        else tuple(jax.tree.leaves(getattr(node, name)))
        for name in _BUFFERS
      }
    )

  return jax.tree.map(flat, opt_state, is_leaf=_is_sofo_state)


def from_tuple_layout(restored: Any, like: Any) -> Any:
  """The inverse of :func:`to_tuple_layout`: ``restored``'s buffers shaped as in ``like``."""

  def shaped(like_node, node):
    if not _is_sofo_state(like_node):
      return node
    return node._replace(
      **{
        name: None
        if getattr(like_node, name) is None
        else jax.tree.unflatten(
          jax.tree.structure(getattr(like_node, name)), list(getattr(node, name))
        )
        for name in _BUFFERS
      }
    )

  return jax.tree.map(shaped, like, restored, is_leaf=_is_sofo_state)
