"""Explicit sharding: moving leaves in and out of SOFO's flat tangent matrix.

Under a mesh whose axes are ``AxisType.Explicit`` (the default of
``jax.make_mesh`` in recent JAX), every array's type carries its sharding, and
JAX refuses a reshape or concatenate whose output sharding it cannot infer.
SOFO cuts its ``(K, P)`` tangent matrix into parameter-shaped leaves and
flattens leaves back into rows, so it states both shardings here: the flat
matrix is replicated (each device holds all K rows, as it does without a
mesh), and each leaf block takes its parameter's sharding again. Under Auto
meshes and without a mesh both functions return their input unchanged.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def _explicit_sharding(array) -> NamedSharding | None:
  """The array's sharding if it is split over an Explicit mesh axis, else None."""
  sharding = getattr(jax.typeof(array), "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return None
  explicit = {
    name
    for name, kind in zip(sharding.mesh.axis_names, sharding.mesh.axis_types)
    if kind == AxisType.Explicit
  }
  for entry in sharding.spec:
    names = entry if isinstance(entry, tuple) else (entry,)
    if any(name in explicit for name in names):
      return sharding
  return None


def replicate(array: jax.Array) -> jax.Array:
  """``array`` replicated across an Explicit mesh, so that it can be reshaped."""
  sharding = _explicit_sharding(array)
  if sharding is None:
    return array
  return jax.sharding.reshard(array, NamedSharding(sharding.mesh, PartitionSpec()))


def like(block: jax.Array, leaf) -> jax.Array:
  """``block`` (shape ``(..., *leaf.shape)``) sharded as ``leaf`` on its last axes."""
  sharding = _explicit_sharding(leaf)
  if sharding is None:
    return block
  batch = block.ndim - jax.typeof(leaf).ndim
  spec = PartitionSpec(*([None] * batch), *sharding.spec)
  return jax.sharding.reshard(block, NamedSharding(sharding.mesh, spec))
