"""The curvature channel: how per-step losses report Gauss–Newton blocks.

Inside a SOFO sketch the loss closure runs under ``jax.vmap`` (over the K
tangents, with the axis name :data:`TANGENT_AXIS`) of ``jax.jvp``. A
curvature-aware loss then returns, besides its value, a K-vector whose primal
is zero and whose tangent in lane ``i`` is row ``i`` of the loss's sketched
Gauss–Newton block

.. math::

    [\\tilde G]_{ij} = (J v_i)^\\top H (J v_j),

where ``J v_i`` is the output tangent of lane ``i`` and ``H`` the Hessian of the
loss value with respect to its outputs. Row ``i`` needs the output tangents of
all lanes, so the rule gathers them over the tangent axis. Because the rows are
tangents, summing loss objects over time inside a user's ``lax.scan`` sums the
blocks on the fly: nothing of size T is kept.

Whether a sketch is being traced is read from JAX's own axis environment (is
:data:`TANGENT_AXIS` bound?), which is part of every JAX tracing cache key, so
a function traced once outside a sketch is retraced inside one.

The rule is not linear in the tangents, so it must never be transposed: its
output goes through :func:`forward_only`, whose reverse rule raises.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from sofo_jax._src import sharding as sharding_lib
from sofo_jax._src import spmd

TANGENT_AXIS = "sofo_jax_tangents"


def num_tangents_in_scope() -> int | None:
  """Returns K when traced inside a SOFO sketch, else ``None``."""
  try:
    size = jax.lax.axis_size(TANGENT_AXIS)
  except NameError:
    return None
  mesh_axis = spmd.sharded_tangent_axis()
  if mesh_axis is not None:  # tangent-parallel: this device holds one block
    size *= jax.lax.axis_size(mesh_axis)
  return size


REVERSE_MODE_MESSAGE = (
  "Reverse-mode differentiation (jax.grad, jax.vjp, jax.linearize) through "
  "the curvature channel of a sofo_jax loss is not supported: the "
  "Gauss-Newton rows it carries are not linear in the tangents, so a "
  "transposed rule would give wrong numbers. Differentiate the loss outside "
  "the SOFO step instead (e.g. jax.grad(lambda p: loss_fn(p).value))."
)


@jax.custom_vjp
def forward_only(x):
  """Identity whose reverse-mode rule raises a clear error."""
  return x


def _forward_only_fwd(x):
  return x, None


def _forward_only_bwd(residuals, cotangent):
  del residuals, cotangent
  raise TypeError(REVERSE_MODE_MESSAGE)


forward_only.defvjp(_forward_only_fwd, _forward_only_bwd)


class CurvatureSpec(Protocol):
  """A loss value and the product of its output-space Hessian with a vector."""

  def value(self, outputs: Any, data: Any) -> Array: ...

  def hessian_vector_product(self, outputs: Any, data: Any, vector: Any) -> Any: ...


def _contract_with_all(gathered, own) -> Float[Array, " k"]:
  """``[<gathered_j, own>]_j`` summed over the leaves of two matching pytrees.

  Written as a matrix-vector product per leaf so that, batched over the K
  lanes by ``vmap``, it becomes one (K × n) @ (n × K) matrix product instead
  of a K × K × n elementwise temporary.
  """

  def leaf(g, o):
    g, o = sharding_lib.replicate(g), sharding_lib.replicate(o)
    return g.reshape(g.shape[0], -1) @ o.reshape(-1)

  rows = jax.tree.map(leaf, gathered, own)
  return functools.reduce(jnp.add, jax.tree.leaves(rows))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def value_with_channel(spec: CurvatureSpec, outputs, data):
  """Returns ``(value, zeros(K))``; the zeros' tangent is a Gauss–Newton row."""
  value = spec.value(outputs, data)
  return value, jnp.zeros((num_tangents_in_scope(),), value.dtype)


@value_with_channel.defjvp
def _value_with_channel_jvp(spec: CurvatureSpec, primals, tangents):
  outputs, data = primals
  d_outputs, d_data = tangents
  value, d_value = jax.jvp(spec.value, (outputs, data), (d_outputs, d_data))
  # H (J v_i) for this lane, contracted with every lane's J v_j.
  curved = spec.hessian_vector_product(outputs, data, d_outputs)
  all_d_outputs = jax.lax.all_gather(d_outputs, TANGENT_AXIS)
  mesh_axis = spmd.sharded_tangent_axis()
  if mesh_axis is not None:
    # Tangent-parallel: the other blocks' output tangents of this loss only,
    # never stored across steps (see sofo_jax._src.spmd).
    all_d_outputs = jax.lax.all_gather(all_d_outputs, mesh_axis, tiled=True)
  row = _contract_with_all(all_d_outputs, curved)
  channel = jnp.zeros((num_tangents_in_scope(),), value.dtype)
  return (value, channel), (d_value, forward_only(row.astype(value.dtype)))


def evaluate(spec: CurvatureSpec, outputs, data) -> tuple[Array, Array]:
  """Value and curvature channel of a loss, in or out of a SOFO sketch.

  Outside a sketch the channel has size 0 and the value is an ordinary JAX
  function of the outputs, so ``jax.grad`` works as usual.
  """
  if num_tangents_in_scope() is None:
    value = spec.value(outputs, data)
    return value, jnp.zeros((0,), value.dtype)
  return value_with_channel(spec, outputs, data)


def from_functions(
  value_fn: Callable[[Any, Any], Array],
  hvp_fn: Callable[[Any, Any, Any], Any],
) -> CurvatureSpec:
  """Builds a :class:`CurvatureSpec` from two plain functions."""
  return _FunctionSpec(value_fn, hvp_fn)


class _FunctionSpec:
  """Holds the two functions; hashed by identity as a nondiff argument."""

  def __init__(self, value_fn, hvp_fn):
    self._value_fn = value_fn
    self._hvp_fn = hvp_fn

  def value(self, outputs, data):
    return self._value_fn(outputs, data)

  def hessian_vector_product(self, outputs, data, vector):
    return self._hvp_fn(outputs, data, vector)
