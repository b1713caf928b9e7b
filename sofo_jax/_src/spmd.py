"""Data- and tangent-parallel sketches with JAX's own SPMD (``jax.shard_map``).

A SOFO step only ever needs three small things from the loss: its value
:math:`c`, the sketched gradient :math:`\\tilde g = \\Theta^\\top\\nabla c`
(K numbers) and the sketched Gauss–Newton matrix :math:`\\tilde G` (K×K).
All three are sums (or means) over examples, so they split cleanly.

**Data-parallel** (``data_axis_name``). Each device sees a shard of the batch
and the same K tangents (the optimizer state, key included, is replicated).
It sketches its shard, and the three results are averaged over the data axis:
one all-reduce of :math:`1 + K + K^2` numbers per step, whatever the number
P of parameters. Data-parallel SGD all-reduces all P gradient entries.

**Tangent-parallel** (``tangent_axis_name``). The K tangents are split into
D blocks of K/D; device d runs the batched forward-mode pass for its block
only. Every device regenerates all K tangents from the shared key (as cheap
as the single-device step), so nothing of parameter size is ever exchanged:
the solve is repeated on every device and every device forms
:math:`\\Theta w` itself. Only the cross-block products of
:math:`\\tilde G` need communication: wherever the loss closure evaluates a
curvature-aware loss, the output tangents of that loss (K/D × its outputs
per device) are all-gathered over the tangent axis, so each device can form
its K/D rows of the step's Gauss–Newton block. At the end the row blocks and
the gradient entries, :math:`K(K+1)` numbers, are all-gathered. Output
tangents are never stored across time steps, so memory stays constant in T.

Both axes may be used at once (a 2-D mesh ``("data", "tangent")``).

The loss closure's curvature channel finds the tangent mesh axis through
JAX's axis environment: the sketch binds a size-1 ``vmap`` axis whose name,
:class:`ShardedTangents`, records the mesh axis. The axis environment is part
of every JAX tracing cache key, so a function traced in one mode is never
reused in the other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

AxisName = str | tuple


@dataclasses.dataclass(frozen=True)
class ShardedTangents:
  """Name of the size-1 marker axis that says the tangents are split.

  Attributes:
    mesh_axis: the mesh axis (of the enclosing ``shard_map``) over which the
      K tangents are split.
  """

  mesh_axis: Hashable


def _manual_mesh_axes() -> tuple:
  get_abstract_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
  if get_abstract_mesh is None:
    return ()
  mesh = get_abstract_mesh()
  return tuple(getattr(mesh, "manual_axes", ()) or ())


def sharded_tangent_axis() -> Hashable | None:
  """The mesh axis the tangents are split over, or ``None`` if they are not."""
  for name in _manual_mesh_axes():
    try:
      jax.lax.axis_size(ShardedTangents(name))
    except NameError:
      continue
    return name
  return None


def mark_sharded(
  fn: Callable[..., Any], tangent_axis_name: Hashable
) -> Callable[..., Any]:
  """Runs ``fn`` with the marker axis for ``tangent_axis_name`` bound."""
  return jax.vmap(
    fn,
    in_axes=None,
    out_axes=None,
    axis_size=1,
    axis_name=ShardedTangents(tangent_axis_name),
  )


def check_axis_names(
  data_axis_name: AxisName | None, tangent_axis_name: Hashable | None
) -> None:
  """Eager checks on the axis names given to a transform or a sketch."""
  data_names = _as_tuple(data_axis_name)
  for name in data_names:
    if not isinstance(name, str):
      raise TypeError(
        "data_axis_name must be a mesh axis name (a str) or a tuple of "
        f"them; got {data_axis_name!r}."
      )
  if tangent_axis_name is None:
    return
  if not isinstance(tangent_axis_name, str):
    raise TypeError(
      "tangent_axis_name must be a single mesh axis name (a str); got "
      f"{tangent_axis_name!r}."
    )
  if tangent_axis_name in data_names:
    raise ValueError(
      f"The axis {tangent_axis_name!r} cannot split both the batch "
      "(data_axis_name) and the tangents (tangent_axis_name)."
    )
  if getattr(jax.sharding, "get_abstract_mesh", None) is None:
    raise NotImplementedError(
      "tangent_axis_name needs jax.sharding.get_abstract_mesh (a newer "
      "JAX); data_axis_name works without it."
    )


def _as_tuple(axis_name: AxisName | None) -> tuple:
  if axis_name is None:
    return ()
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


_CHECK_VMA_MESSAGE = (
  "sofo_jax under jax.shard_map needs check_vma=False: the curvature "
  "channel gathers output tangents over the vmap axis of the K tangents, "
  "and JAX's varying-manual-axes checker does not accept collectives over "
  "vmap axes inside shard_map. Write jax.shard_map(step, mesh=..., "
  "in_specs=..., out_specs=..., check_vma=False)."
)


def _is_typed_varying(value: Array) -> bool:
  """Whether JAX tracks device variance for ``value`` (``check_vma=True``)."""
  aval = jax.typeof(value)
  manual_type = getattr(aval, "mat", None)
  varying = getattr(manual_type, "varying", None)
  if varying is None:
    varying = getattr(aval, "vma", None)
  return bool(varying)


def axis_size(axis_name: AxisName, role: str) -> int:
  """Size of a bound mesh axis, with a clear error when it is not bound.

  Also rejects ``shard_map(..., check_vma=True)``, under which the curvature
  channel cannot run (see :data:`_CHECK_VMA_MESSAGE`).
  """
  try:
    size = jax.lax.axis_size(axis_name)
    index = jax.lax.axis_index(axis_name)
  except NameError:
    raise ValueError(
      f"{role}={axis_name!r} is not a bound axis here. Call the SOFO update "
      "inside jax.shard_map over a mesh with that axis (see "
      "docs/distributed.md)."
    ) from None
  if _is_typed_varying(index):
    raise ValueError(_CHECK_VMA_MESSAGE)
  return size


def check_bound(data_axis_name: AxisName | None, tangent_axis_name: str | None) -> None:
  """Trace-time checks, before the sketch: the axes exist, ``check_vma`` is off."""
  if data_axis_name is not None:
    axis_size(data_axis_name, "data_axis_name")
  if tangent_axis_name is not None:
    axis_size(tangent_axis_name, "tangent_axis_name")


def local_block(
  tangent_leaves: list, num_tangents: int, tangent_axis_name: str
) -> list:
  """This device's block of K/D tangents (all devices hold all K)."""
  shards = axis_size(tangent_axis_name, "tangent_axis_name")
  if num_tangents % shards:
    raise ValueError(
      f"num_tangents={num_tangents} must be a multiple of the size "
      f"{shards} of the tangent axis {tangent_axis_name!r}."
    )
  block = num_tangents // shards
  start = jax.lax.axis_index(tangent_axis_name) * block
  return [
    jax.lax.dynamic_slice_in_dim(leaf, start, block, axis=0) for leaf in tangent_leaves
  ]


def combine_shards(
  value: Float[Array, ""],
  gradient: Float[Array, " block"],
  rows: Float[Array, "block k"],
  data_axis_name: AxisName | None,
  tangent_axis_name: str | None,
) -> tuple[Float[Array, ""], Float[Array, " k"], Float[Array, "k k"]]:
  """Averages over the data axis, then gathers row blocks over the tangent axis.

  Communication per step and device: an all-reduce of
  ``1 + block * (K + 1)`` numbers over the data axis and an all-gather
  of ``K * (K + 1)`` numbers over the tangent axis (block = K/D).
  """
  if data_axis_name is not None:
    # One all-reduce for all three: each device computed the mean loss of
    # its (equal-sized) shard, so the global mean is the mean of the means.
    value, gradient, rows = jax.lax.pmean((value, gradient, rows), data_axis_name)
  if tangent_axis_name is not None:
    # Gradient entries travel as an extra column of the row block: one
    # collective instead of two.
    block = jnp.concatenate([gradient[:, None], rows], axis=1)
    block = jax.lax.all_gather(block, tangent_axis_name, tiled=True)
    gradient, rows = block[:, 0], block[:, 1:]
  return value, gradient, rows
