"""Which parameter leaves SOFO trains, and how to split and rebuild a pytree.

A leaf is *trainable* when it is a floating-point array (or Python float) and
the user's mask, if any, selects it. Other leaves (integer counters, frozen
weights, functions stored in equinox modules) are closed over: they get no
tangent and a zero update.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import equinox as eqx
import jax
import jax.numpy as jnp
import optax


def _is_none(x) -> bool:
  return x is None


class Partition(NamedTuple):
  """The trainable leaves of a pytree and how to put them back.

  Attributes:
    trainable: the trainable leaves, in flattening order.
    trainable_flags: one bool per leaf of the full pytree.
    leaves: all leaves of the full pytree.
    treedef: its structure.
  """

  trainable: list
  trainable_flags: tuple
  leaves: list
  treedef: Any

  def rebuild(self, trainable_leaves) -> Any:
    """The full pytree with its trainable leaves replaced."""
    replacements = iter(trainable_leaves)
    leaves = [
        next(replacements) if flag else leaf
        for flag, leaf in zip(self.trainable_flags, self.leaves)
    ]
    return jax.tree.unflatten(self.treedef, leaves)

  def fill(self, trainable_values, other: Callable[[Any], Any]) -> Any:
    """A pytree like the full one: given values on trainable leaves, ``other(leaf)`` elsewhere."""
    values = iter(trainable_values)
    leaves = [
        next(values) if flag else other(leaf)
        for flag, leaf in zip(self.trainable_flags, self.leaves)
    ]
    return jax.tree.unflatten(self.treedef, leaves)


def _reject_masked_nodes(params: Any) -> None:
  is_masked = lambda node: isinstance(node, optax.MaskedNode)
  if any(is_masked(leaf) for leaf in jax.tree.leaves(params, is_leaf=is_masked)):
    raise TypeError(
        "scale_by_sofo received parameters masked by optax.masked, which "
        "hides the frozen values that the loss closure needs. Pass "
        "`mask=` to sofo_jax.scale_by_sofo / sofo_jax.sofo instead: SOFO then "
        "draws tangents only on the selected leaves and leaves the others "
        "unchanged."
    )


def _is_floating(leaf) -> bool:
  if not eqx.is_array_like(leaf) or isinstance(leaf, bool):
    return False
  dtype = jnp.result_type(leaf)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise TypeError(
        "sofo_jax does not train complex parameters; split them into real "
        "and imaginary parts."
    )
  return bool(jnp.issubdtype(dtype, jnp.floating))


def resolve_mask(mask, params) -> Optional[Any]:
  """Turns a mask (pytree prefix of bools, or callable) into a full bool tree."""
  if mask is None:
    return None
  mask_tree = mask(params) if callable(mask) else mask
  try:
    return jax.tree.map(
        lambda m, p: jax.tree.map(lambda _: bool(m), p), mask_tree, params
    )
  except (ValueError, TypeError) as error:
    raise ValueError(
        "mask must be a pytree of Python bools with the structure of the "
        f"parameters (or a prefix of it): {error}"
    ) from None


def partition(params: Any, mask: Any = None) -> Partition:
  """Splits ``params`` into trainable leaves and the rest.

  Args:
    params: any pytree.
    mask: ``None`` (train every floating leaf), or a pytree of bools like
      ``params`` (or a prefix of it), or a callable ``params -> such a tree``.

  Returns:
    A :class:`Partition`.
  """
  _reject_masked_nodes(params)
  leaves, treedef = jax.tree.flatten(params)
  flags = [_is_floating(leaf) for leaf in leaves]
  mask_tree = resolve_mask(mask, params)
  if mask_tree is not None:
    mask_leaves = jax.tree.leaves(mask_tree)
    flags = [f and m for f, m in zip(flags, mask_leaves)]
  trainable = [leaf for flag, leaf in zip(flags, leaves) if flag]
  return Partition(trainable, tuple(flags), leaves, treedef)


def num_trainable(part: Partition) -> int:
  """Number of trainable scalars P."""
  return sum(int(jnp.size(leaf)) for leaf in part.trainable)


def trainable_tangents(part: Partition, tangents: Any) -> list:
  """The tangent leaves matching the trainable parameter leaves.

  ``tangents`` has the structure of the parameters; leaves that are not
  trainable may be ``None`` (or anything: they are ignored).
  """
  # Flatten up to the parameters' structure: a None standing for a leaf that
  # is not trained, and a None that is an empty node of the parameters (as
  # eqx.partition leaves), are then told apart.
  try:
    tangent_leaves = part.treedef.flatten_up_to(tangents)
  except (ValueError, TypeError):
    raise ValueError(
        "tangents must have the structure of the parameters (with a leading "
        f"axis of size K on each leaf); got {jax.tree.structure(tangents)}, "
        f"expected {part.treedef}."
    ) from None
  return [t for flag, t in zip(part.trainable_flags, tangent_leaves) if flag]


def zero_update(leaf) -> Union[jax.Array, None]:
  """The update of a leaf SOFO does not train: zeros for arrays, else None."""
  return jnp.zeros_like(leaf) if eqx.is_array_like(leaf) else None
