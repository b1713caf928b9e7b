"""Which parameter leaves SOFO trains, and how to split and rebuild a pytree.

A leaf is *trainable* when it is a floating-point array (or Python float) and
the user's mask, if any, selects it. Other leaves (integer counters, frozen
weights, functions stored in equinox modules) are closed over: they get no
tangent and a zero update.

A mask leaf may also be a boolean array shaped like its parameter leaf
(``True`` = trainable entry): an *entry mask*, for fixed sparse connectivity
or pinned entries. The leaf is then trainable and keeps its mask, which the
tangent sampler applies, so every tangent, and hence every update, is exactly
zero on the frozen entries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax


def _is_none(x) -> bool:
  return x is None


class Partition(NamedTuple):
  """The trainable leaves of a pytree and how to put them back.

  Splitting and rebuilding are ``eqx.partition`` and ``eqx.combine``. What
  this adds is the flat list of trainable leaves (the tangent sampler and the
  batched ``jax.jvp`` work on it), the per-leaf flags and the entry masks.

  Attributes:
    trainable: the trainable leaves, in flattening order.
    trainable_flags: one bool per leaf of the full pytree.
    frozen: the full pytree with its trainable leaves replaced by ``None``
      (the second half of ``eqx.partition``).
    trainable_treedef: the structure of the first half (``None`` where a leaf
      is not trained), into which ``trainable`` unflattens.
    treedef: the structure of the full pytree.
    entry_masks: one per trainable leaf: ``None`` when every entry is
      trainable, else a boolean array of the leaf's shape (``True`` =
      trainable entry; a NumPy array when the mask is concrete).
  """

  trainable: list
  trainable_flags: tuple
  frozen: Any
  trainable_treedef: Any
  treedef: Any
  entry_masks: tuple

  def rebuild(self, trainable_leaves) -> Any:
    """The full pytree with its trainable leaves replaced."""
    trained = jax.tree.unflatten(self.trainable_treedef, list(trainable_leaves))
    return eqx.combine(trained, self.frozen)

  def fill(self, trainable_values, other: Callable[[Any], Any]) -> Any:
    """A pytree like the full one: given values on trainable leaves, ``other(leaf)`` elsewhere."""
    trained = jax.tree.unflatten(self.trainable_treedef, list(trainable_values))
    return eqx.combine(trained, jax.tree.map(other, self.frozen))

  def buffer(self, trainable_values) -> Any:
    """Per-leaf optimizer state shaped like the params, as optax keeps it.

    ``trainable_values`` go on the trainable leaves and ``optax.MaskedNode()``
    everywhere else, as in the state of ``optax.masked``, so that
    ``optax.tree_map_params`` finds the field; ``jax.tree.leaves`` of the
    result gives ``trainable_values`` back, in order.
    """
    return self.fill(trainable_values, lambda _: optax.MaskedNode())


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


class _MaskLeafError(ValueError):
  """A mask leaf that is wrong in itself (not a structure mismatch)."""


def _as_leaf_bool(m) -> bool | None:
  """``m`` as a leaf-level Python bool, or None when it is an entry mask."""
  if isinstance(m, (bool, np.bool_)):
    return bool(m)
  if jnp.ndim(m) == 0:
    try:  # a concrete 0-d value (0, 1, jnp.array(True)) reads as before
      return bool(m)
    except jax.errors.ConcretizationTypeError:
      return None  # a traced 0-d mask: an entry mask of a scalar leaf
  return None


def _entry_mask(m, param, path) -> Any:
  """Checks an array mask leaf against its parameter leaf."""
  where = f"mask{jax.tree_util.keystr(path)}"
  if param is None or not jax.tree_util.treedef_is_leaf(jax.tree.structure(param)):
    raise _MaskLeafError(
      f"{where} is an array, so it must stand for a single parameter leaf "
      "(an entry mask of the same shape); there it stands for a subtree. "
      "Use a Python bool to freeze or train a whole subtree."
    )
  dtype = m.dtype if hasattr(m, "dtype") else jnp.result_type(m)
  if dtype != np.bool_:
    raise _MaskLeafError(
      f"{where} must have dtype bool (True = trainable entry); got "
      f"{dtype}. Write e.g. `connectivity != 0`."
    )
  if jnp.shape(m) != jnp.shape(param):
    raise _MaskLeafError(
      f"{where} has shape {jnp.shape(m)}, but the parameter it masks has "
      f"shape {jnp.shape(param)}; an entry mask must have the same shape."
    )
  try:
    return np.asarray(m)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return m  # traced (a callable mask under jit): applied as it is


def resolve_mask(mask, params) -> Any | None:
  """Turns a mask (pytree prefix of bools, or callable) into a full mask tree.

  Each leaf of the result is a Python bool, or a boolean array of its
  parameter leaf's shape (an entry mask).
  """
  # Not eqx.partition's filter_spec: that takes bools and callables only
  # (an array leaf is a ValueError), so it has no entry masks, and its
  # structure errors do not say what a mask should look like.
  if mask is None:
    return None
  mask_tree = mask(params) if callable(mask) else mask

  def expand(path, m, subtree):
    flag = _as_leaf_bool(m)
    if flag is None:
      return _entry_mask(m, subtree, path)
    return jax.tree.map(lambda _: flag, subtree)

  try:
    return jax.tree_util.tree_map_with_path(expand, mask_tree, params)
  except _MaskLeafError as error:
    raise ValueError(str(error)) from None
  except (ValueError, TypeError) as error:
    raise ValueError(
      "mask must be a pytree of Python bools with the structure of the "
      "parameters (or a prefix of it); a leaf may also be a boolean array "
      f"of its parameter's shape, to freeze single entries: {error}"
    ) from None


def _leaf_flag_and_mask(floating: bool, m) -> tuple[bool, Any]:
  """Whether a leaf is trained, and its entry mask (None: all entries)."""
  if isinstance(m, bool):
    return floating and m, None
  if isinstance(m, np.ndarray):
    # Concrete masks that select all or nothing are plain leaf flags: no
    # masking cost, and an all-False leaf counts as frozen in every check.
    if m.all():
      return floating, None
    if not m.any():
      return False, None
  return floating, m


def partition(params: Any, mask: Any = None) -> Partition:
  """Splits ``params`` into trainable leaves and the rest.

  Args:
    params: any pytree.
    mask: ``None`` (train every floating leaf), or a pytree like ``params``
      (or a prefix of it) of Python bools and, at single leaves, boolean
      arrays of that leaf's shape (``True`` = trainable entry), or a callable
      ``params -> such a tree``.

  Returns:
    A :class:`Partition`.
  """
  _reject_masked_nodes(params)
  leaves, treedef = jax.tree.flatten(params)
  flags = [_is_floating(leaf) for leaf in leaves]
  masks = [None] * len(leaves)
  mask_tree = resolve_mask(mask, params)
  if mask_tree is not None:
    # Arrays are leaves of the mask tree, so its leaves line up with params'.
    resolved = [
      _leaf_flag_and_mask(f, m) for f, m in zip(flags, jax.tree.leaves(mask_tree))
    ]
    flags = [flag for flag, _ in resolved]
    masks = [m for _, m in resolved]
  trained, frozen = eqx.partition(params, jax.tree.unflatten(treedef, flags))
  trainable, trainable_treedef = jax.tree.flatten(trained)
  entry_masks = tuple(m for flag, m in zip(flags, masks) if flag)
  return Partition(
    trainable, tuple(flags), frozen, trainable_treedef, treedef, entry_masks
  )


def num_trainable(part: Partition) -> int | jax.Array:
  """Number of trainable scalars P: entries outside an entry mask do not count.

  A Python int, unless an entry mask is traced (then a traced int32).
  """
  counts = [
    int(jnp.size(leaf))
    if m is None
    else int(m.sum())
    if isinstance(m, np.ndarray)
    else jnp.sum(m, dtype=jnp.int32)
    for leaf, m in zip(part.trainable, part.entry_masks)
  ]
  return sum(counts)


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


def zero_update(leaf) -> jax.Array | None:
  """The update of a leaf SOFO does not train: zeros for arrays, else None."""
  return jnp.zeros_like(leaf) if eqx.is_array_like(leaf) else None
