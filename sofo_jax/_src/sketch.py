"""The SOFO sketch: Θᵀg and ΘᵀGΘ from one batched forward-mode pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from sofo_jax._src import channel, spmd
from sofo_jax._src import losses as losses_lib
from sofo_jax._src import tree as tree_lib


class Sketch(NamedTuple):
  """Loss value and its sketched derivatives in a K-dimensional subspace.

  Attributes:
    value: the loss value :math:`c(\\theta)`.
    gradient: :math:`\\tilde g = \\Theta^\\top \\nabla c`, shape ``(K,)``.
    gauss_newton: :math:`\\tilde G = \\Theta^\\top G \\Theta`, shape ``(K, K)``,
      symmetrised.
  """

  value: Float[Array, ""]
  gradient: Float[Array, " k"]
  gauss_newton: Float[Array, "k k"]


_PLAIN_RETURN_MESSAGE = (
  "The loss closure must return a sofo_jax.losses.Loss so that SOFO can see "
  "the curvature of the loss in output space; it returned {kind}. Write, for "
  "example, `return sofo_jax.losses.mse(predictions, targets)` (or "
  "softmax_cross_entropy, poisson, ..., or sofo_jax.losses.custom(outputs, "
  "fn) for any convex function of the outputs).{hint}"
)


def _describe(value: Any) -> str:
  # Inside the step a returned array is a tracer: name what the user wrote.
  if isinstance(value, (jax.Array, int, float)) or hasattr(value, "__array__"):
    return f"a plain array of shape {jnp.shape(value)}"
  return type(value).__name__


def split_output(output: Any, has_aux: bool) -> tuple[Any, Any]:
  """``(loss, aux)`` of what a closure returned (``aux`` None without ``has_aux``)."""
  if not has_aux:
    return output, None
  if not (isinstance(output, tuple) and len(output) == 2):
    raise TypeError(
      "With has_aux=True the loss closure must return a pair (loss, aux); "
      f"got {type(output).__name__}."
    )
  return output


def _as_loss(output: Any, has_aux: bool) -> tuple[losses_lib.Loss, Any]:
  loss, aux = split_output(output, has_aux)
  if not isinstance(loss, losses_lib.Loss):
    hint = ""
    if isinstance(output, tuple) and not has_aux:
      hint = " If it returns (loss, aux), pass has_aux=True."
    raise TypeError(_PLAIN_RETURN_MESSAGE.format(kind=_describe(loss), hint=hint))
  if loss.value.shape != ():
    raise ValueError(f"The loss value must be a scalar; got {loss.value.shape}.")
  return loss, aux


def loss_value(loss_fn: Callable[..., Any], params: Any, has_aux: bool = False):
  """The closure's scalar loss value at ``params`` (a plain forward pass)."""
  loss, _ = _as_loss(loss_fn(params), has_aux)
  return loss.value


def sketch_leaves(
  loss_fn: Callable[..., Any],
  part: tree_lib.Partition,
  tangent_leaves: list,
  has_aux: bool = False,
  *,
  data_axis_name: spmd.AxisName | None = None,
  tangent_axis_name: str | None = None,
) -> tuple[Sketch, Any]:
  """:func:`sketch` on an already partitioned parameter pytree; also returns aux.

  ``tangent_leaves`` always holds all K tangents; with ``tangent_axis_name``
  this device sketches only its block of them (see :mod:`sofo_jax._src.spmd`).
  """
  sizes = {int(t.shape[0]) for t in tangent_leaves}
  if len(sizes) != 1:
    raise ValueError(
      f"Every tangent leaf needs the same leading axis K; got sizes {sorted(sizes)}."
    )
  (num_tangents,) = sizes
  for t, p in zip(tangent_leaves, part.trainable):
    if t.shape[1:] != jnp.shape(p):
      raise ValueError(
        f"A tangent leaf of shape {t.shape} does not match its parameter of "
        f"shape {jnp.shape(p)} (expected (K, *param.shape))."
      )

  def value_and_channel(trainable):
    loss, aux = _as_loss(loss_fn(part.rebuild(trainable)), has_aux)
    if loss.curvature.shape != (num_tangents,):
      raise ValueError(
        "The Loss returned inside the SOFO step has no curvature channel of "
        f"size K={num_tangents} (got shape {loss.curvature.shape}). Build "
        "every loss inside the closure (do not reuse a Loss computed "
        "outside it)."
      )
    return (loss.value, loss.curvature), aux

  def one_tangent(tangent):
    primal, derivative, aux = jax.jvp(
      value_and_channel, (part.trainable,), (tangent,), has_aux=True
    )
    return primal[0], derivative, aux

  spmd.check_bound(data_axis_name, tangent_axis_name)
  batched = jax.vmap(
    one_tangent, out_axes=(None, 0, None), axis_name=channel.TANGENT_AXIS
  )
  if tangent_axis_name is None:
    value, (gradient, rows), aux = batched(list(tangent_leaves))
  else:
    block = spmd.local_block(tangent_leaves, num_tangents, tangent_axis_name)
    value, (gradient, rows), aux = spmd.mark_sharded(batched, tangent_axis_name)(block)
  value, gradient, rows = spmd.combine_shards(
    value, gradient, rows, data_axis_name, tangent_axis_name
  )
  gauss_newton = 0.5 * (rows + rows.T)
  return Sketch(value, gradient, gauss_newton), aux


def sketch(
  loss_fn: Callable[..., Any],
  params: Any,
  tangents: Any,
  *,
  has_aux: bool = False,
  data_axis_name: spmd.AxisName | None = None,
  tangent_axis_name: str | None = None,
) -> Sketch | tuple[Sketch, Any]:
  """Sketched gradient and Gauss–Newton matrix, by forward mode only.

  For tangents :math:`\\Theta = [v_1 \\dots v_K]` and a loss
  :math:`c(\\theta) = \\sum_t \\ell_t(y_t(\\theta))` built from
  :mod:`sofo_jax.losses`, one ``jax.vmap`` over ``jax.jvp`` computes

  .. math::

      \\tilde g = \\Theta^\\top \\nabla c, \\qquad
      \\tilde G = \\sum_t (J_t\\Theta)^\\top H_t (J_t\\Theta),

  accumulating :math:`\\tilde G` wherever the closure sums its losses (inside
  its own ``lax.scan`` for recurrent models: memory stays constant in T).

  Args:
    loss_fn: ``params -> Loss`` (or ``-> (Loss, aux)`` with ``has_aux``).
    params: the parameter pytree.
    tangents: a pytree like ``params`` with a leading axis of size K on every
      floating leaf (leaves that are not floating may hold ``None``).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    data_axis_name: inside ``jax.shard_map``, the mesh axis (or tuple of axes)
      over which the batch is split: each device sketches its shard (the
      closure returns the mean loss of its shard, shards of equal size) and
      the results are averaged over this axis, an all-reduce of
      :math:`1 + K + K^2` numbers. ``aux`` stays per device.
    tangent_axis_name: inside ``jax.shard_map``, the mesh axis over which the
      K tangents are split (K must be a multiple of its size). Every device
      passes the same, full ``tangents`` and gets the same, full sketch; it
      runs the forward-mode pass for its block of K/D tangents only.

  Returns:
    A :class:`Sketch` ``(value, gradient, gauss_newton)``, which unpacks like
    a tuple; with ``has_aux``, the pair ``(sketch, aux)``.

  Raises:
    TypeError: if ``loss_fn`` does not return a :class:`~sofo_jax.losses.Loss`,
      or if reverse-mode differentiation is attempted through the result.

  Example:
    >>> import jax, jax.numpy as jnp, sofo_jax
    >>> params = {"w": jnp.ones(3)}
    >>> x, y = jnp.eye(3), jnp.zeros(3)
    >>> loss_fn = lambda p: sofo_jax.losses.mse((x @ p["w"])[:, None], y[:, None])
    >>> tangents = {"w": jnp.eye(3)}
    >>> value, g, G = sofo_jax.sketch(loss_fn, params, tangents)
    >>> G.shape
    (3, 3)

  References:
    Yu, Xia, Ma, Lengyel, Hennequin, "Second-order forward-mode optimization
    of recurrent neural networks for neuroscience", NeurIPS 2024.
  """
  spmd.check_axis_names(data_axis_name, tangent_axis_name)
  part = tree_lib.partition(params)
  result, aux = sketch_leaves(
    loss_fn,
    part,
    tree_lib.trainable_tangents(part, tangents),
    has_aux,
    data_axis_name=data_axis_name,
    tangent_axis_name=tangent_axis_name,
  )
  return (result, aux) if has_aux else result
