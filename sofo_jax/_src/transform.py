"""SOFO as an Optax gradient transformation."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from sofo_jax._src import keys as keys_lib
from sofo_jax._src import sketch as sketch_lib
from sofo_jax._src import solve as solve_lib
from sofo_jax._src import spmd
from sofo_jax._src import tangents as tangents_lib
from sofo_jax._src import tree as tree_lib
from sofo_jax._src import validation


class SofoDiagnostics(NamedTuple):
  """What one SOFO step saw, for logging without extra passes.

  Attributes:
    loss: loss value at the parameters the step started from.
    max_eigenvalue: largest eigenvalue :math:`s_{\\max}` of the sketched
      Gauss–Newton matrix.
    damping: the absolute damping added to the K×K system.
    predicted_decrease: decrease of the quadratic model for a unit learning
      rate, :math:`\\tilde g^\\top w - \\tfrac12 w^\\top\\tilde G w`.
    gradient_norm: :math:`\\lVert\\tilde g\\rVert`, the sketched gradient's norm.
    eigenvalues: the spectrum of the sketched Gauss–Newton matrix, ascending.
    step_is_finite: False when the loss or the sketch was not finite; the
      step was then zero.
    num_nonfinite_steps: how many steps so far were skipped for that reason.
  """

  loss: Float[Array, ""]
  max_eigenvalue: Float[Array, ""]
  damping: Float[Array, ""]
  predicted_decrease: Float[Array, ""]
  gradient_norm: Float[Array, ""]
  eigenvalues: Float[Array, " k"]
  step_is_finite: Bool[Array, ""]
  num_nonfinite_steps: Int[Array, ""]


class ScaleBySofoState(NamedTuple):
  """State of :func:`scale_by_sofo`.

  Attributes:
    count: number of updates so far (int32).
    key: raw PRNG key data, split at every step.
    diagnostics: :class:`SofoDiagnostics` of the last step.
    aux: the closure's auxiliary output of the last step (``has_aux``), else
      ``None``.
  """

  count: Int[Array, ""]
  key: jax.Array
  diagnostics: SofoDiagnostics
  aux: Any


def _float_dtype():
  return jnp.zeros(()).dtype


def _initial_diagnostics(num_tangents: int) -> SofoDiagnostics:
  zero = jnp.zeros((), _float_dtype())
  return SofoDiagnostics(
      loss=jnp.full((), jnp.nan, _float_dtype()),
      max_eigenvalue=zero,
      damping=zero,
      predicted_decrease=zero,
      gradient_norm=zero,
      eigenvalues=jnp.zeros((num_tangents,), _float_dtype()),
      step_is_finite=jnp.array(True),
      num_nonfinite_steps=jnp.zeros((), jnp.int32),
  )


def _zeros_like_example(example: Any) -> Any:
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), example)


def scale_by_sofo(
    num_tangents: int,
    damping: ArrayLike = 1e-4,
    *,
    key: jax.Array,
    relative_damping: bool = True,
    tangent_distribution: str = "normalized_gaussian",
    has_aux: bool = False,
    aux_example: Any = None,
    mask: Any = None,
    data_axis_name: Optional[spmd.AxisName] = None,
    tangent_axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  """Second-order forward-mode optimisation (SOFO) direction.

  Each update draws K fresh tangents :math:`\\Theta \\in \\mathbb{R}^{P\\times K}`,
  computes :math:`\\tilde g = \\Theta^\\top\\nabla c` and
  :math:`\\tilde G = \\Theta^\\top G\\Theta` (Gauss–Newton) with one batched
  ``jax.jvp`` of the loss closure (no backpropagation; see
  :func:`sofo_jax.sketch`), and returns the direction

  .. math::

      \\Theta\\,(\\tilde G + \\lambda_{\\text{eff}} I)^{-1}\\tilde g,
      \\qquad \\lambda_{\\text{eff}} = \\lambda\\, s_{\\max}(\\tilde G)
      \\ \\text{(relative damping, default)}.

  With K = P orthonormal tangents this is exactly the damped Gauss–Newton
  direction. Chain it with :func:`optax.scale_by_learning_rate` (or use
  :func:`sofo`) to get a descent step.

  The update needs the keyword extra argument ``loss_fn``, a closure of the
  parameters returning a :class:`sofo_jax.losses.Loss` (or ``(Loss, aux)``
  with ``has_aux``). The incoming ``updates`` are ignored (``None`` and
  gradients alike): SOFO computes its own direction, so place it first in a
  chain. Unknown extra arguments (passed through ``optax.chain``) are ignored.

  Non-finite values never reach the parameters: if the loss, the sketch or
  the direction (e.g. overflowing a float16 leaf) is not finite the direction
  is zero and ``state.diagnostics.step_is_finite`` is False.

  Args:
    num_tangents: K, a Python int >= 1. It fixes shapes: with
      ``optax.inject_hyperparams`` list it (and ``key``) in ``static_args``.
    damping: :math:`\\lambda \\ge 0` (an array-like, injectable).
    key: PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``); split every
      step, so successive steps use fresh tangents.
    relative_damping: if True (default) the damping added is
      :math:`\\lambda s_{\\max}`; if False it is :math:`\\lambda`.
    tangent_distribution: ``"normalized_gaussian"`` (default, unit-norm
      Gaussian tangents) or ``"orthonormal"``.
    has_aux: the closure returns ``(loss, aux)``; the last aux is stored in
      ``state.aux``.
    aux_example: with ``has_aux``, a pytree of arrays or
      ``jax.ShapeDtypeStruct`` shaped like aux. If given, ``init`` stores zeros
      of that shape, so the state keeps one structure from the start (needed
      to carry it through ``lax.scan``); otherwise ``init`` stores ``None`` and
      the first update fills it in.
    mask: frozen parameters. ``None`` trains every floating leaf; otherwise a
      pytree of bools like the params (or a prefix), or a callable returning
      one: tangents are drawn only on ``True`` leaves, the others get a zero
      update. (``optax.masked`` cannot be used around SOFO, because it hides
      the frozen values the closure needs.)
    data_axis_name: data parallelism. When the update runs inside
      ``jax.shard_map(..., check_vma=False)`` with the batch split over this
      mesh axis (or tuple of axes), each device sketches its shard with the
      same tangents and the sketches are averaged: an all-reduce of
      :math:`1 + K + K^2` numbers per step, independent of the model size.
      The closure must return the mean loss of its own (equal-sized) shard.
      ``None`` (default): single device, or plain ``jax.jit`` with sharded
      inputs (then XLA inserts the reduction itself).
    tangent_axis_name: tangent parallelism. Inside ``jax.shard_map(...,
      check_vma=False)``, split the K tangents over this mesh axis (K must be
      a multiple of its size): each device runs the forward-mode pass for
      K/D tangents, all-gathering only the output tangents of each loss it
      evaluates; every device regenerates all K tangents from the shared key,
      so no parameter-sized array is communicated. See
      ``docs/distributed.md`` for the communication volumes.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with state
    :class:`ScaleBySofoState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sofo_jax
    >>> x = jax.random.normal(jax.random.key(1), (32, 3))
    >>> y = x @ jnp.array([[1.0], [-2.0], [0.5]])
    >>> params = {"w": jnp.zeros((3, 1))}
    >>> loss_fn = lambda p: sofo_jax.losses.mse(x @ p["w"], y)
    >>> opt = optax.chain(
    ...     sofo_jax.scale_by_sofo(3, 1e-6, key=jax.random.key(0),
    ...                            tangent_distribution="orthonormal"),
    ...     optax.scale_by_learning_rate(1.0))
    >>> state = opt.init(params)
    >>> updates, state = opt.update(None, state, params, loss_fn=loss_fn)
    >>> params = optax.apply_updates(params, updates)
    >>> bool(loss_fn(params).value < 1e-6)
    True

  References:
    Yu, Xia, Ma, Lengyel, Hennequin, "Second-order forward-mode optimization
    of recurrent neural networks for neuroscience", NeurIPS 2024.
  """
  tangents_lib.check_num_tangents(num_tangents)
  tangents_lib.check_distribution(tangent_distribution)
  key_data, codec = keys_lib.check_key(key, "scale_by_sofo")
  if isinstance(relative_damping, jax.Array) or not isinstance(relative_damping, bool):
    raise TypeError("relative_damping must be a Python bool.")
  validation.check_damping(damping, "scale_by_sofo")
  if aux_example is not None and not has_aux:
    raise ValueError("aux_example is only meaningful with has_aux=True.")
  spmd.check_axis_names(data_axis_name, tangent_axis_name)
  owner = "scale_by_sofo"

  def init_fn(params):
    validation.check_params(params, owner, mask)
    aux = None if aux_example is None else _zeros_like_example(aux_example)
    return ScaleBySofoState(
        count=jnp.zeros((), jnp.int32),
        key=key_data,
        diagnostics=_initial_diagnostics(num_tangents),
        aux=aux,
    )

  def update_fn(updates, state, params=None, *, loss_fn=None, **extra_args):
    del updates  # SOFO computes its own direction from loss_fn.
    validation.check_loss_fn(loss_fn, owner, extra_args)
    part = validation.check_params(params, owner, mask)
    next_key, step_key = codec.split(state.key)
    tangent_leaves = tangents_lib.sample_leaves(
        step_key, part.trainable, num_tangents, tangent_distribution
    )
    sketch, aux = sketch_lib.sketch_leaves(
        loss_fn, part, tangent_leaves, has_aux,
        data_axis_name=data_axis_name, tangent_axis_name=tangent_axis_name,
    )
    value_is_finite = jnp.isfinite(sketch.value)
    # A non-finite loss makes the whole sketch meaningless: skip the step.
    gradient = jnp.where(value_is_finite, sketch.gradient, jnp.nan)
    step = solve_lib.solve_damped(
        gradient, sketch.gauss_newton, damping, relative_damping
    )
    direction, direction_is_finite = tangents_lib.zero_if_nonfinite(
        tangents_lib.combine(step.coefficients, tangent_leaves)
    )
    step_is_finite = step.finite & direction_is_finite
    new_updates = part.fill(direction, tree_lib.zero_update)
    dtype = _float_dtype()
    diagnostics = SofoDiagnostics(
        loss=sketch.value.astype(dtype),
        max_eigenvalue=step.max_eigenvalue.astype(dtype),
        damping=step.damping.astype(dtype),
        predicted_decrease=step.predicted_decrease.astype(dtype),
        gradient_norm=jnp.linalg.norm(sketch.gradient).astype(dtype),
        eigenvalues=step.eigenvalues.astype(dtype),
        step_is_finite=step_is_finite,
        num_nonfinite_steps=state.diagnostics.num_nonfinite_steps
        + jnp.where(step_is_finite, 0, 1).astype(jnp.int32),
    )
    new_state = ScaleBySofoState(
        count=optax.safe_increment(state.count),
        key=next_key,
        diagnostics=diagnostics,
        aux=aux,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sofo(
    learning_rate: optax.ScalarOrSchedule,
    num_tangents: int,
    damping: ArrayLike = 1e-4,
    *,
    key: jax.Array,
    relative_damping: bool = True,
    tangent_distribution: str = "normalized_gaussian",
    has_aux: bool = False,
    aux_example: Any = None,
    mask: Any = None,
    data_axis_name: Optional[spmd.AxisName] = None,
    tangent_axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  """SOFO with a learning rate: ``chain(scale_by_sofo(...), scale_by_learning_rate(lr))``.

  The parameter step is :math:`-\\eta\\,\\Theta(\\tilde G +
  \\lambda_{\\text{eff}} I)^{-1}\\tilde g`. See :func:`scale_by_sofo` for the
  arguments other than ``learning_rate`` (a float or an optax schedule). The
  paper's settings are :math:`\\eta \\in [0.1, 1]`, :math:`\\lambda \\in
  [10^{-7}, 10^{-3}]` and K of 64–512. From a random initialisation, warm
  the learning rate up over the first few dozen steps (for example
  ``optax.linear_schedule(0.1, 1.0, 30)``): the first lightly damped
  Gauss–Newton steps can otherwise overshoot.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sofo_jax
    >>> opt = sofo_jax.sofo(learning_rate=1.0, num_tangents=8, damping=1e-4,
    ...                     key=jax.random.key(0))
    >>> params = {"w": jnp.ones((2, 2))}
    >>> state = opt.init(params)
    >>> loss_fn = lambda p: sofo_jax.losses.mse(p["w"], jnp.zeros((2, 2)))
    >>> updates, state = opt.update(None, state, params, loss_fn=loss_fn)
    >>> params = optax.apply_updates(params, updates)
    >>> bool(loss_fn(params).value < 4.0)
    True
  """
  return optax.chain(
      scale_by_sofo(
          num_tangents,
          damping,
          key=key,
          relative_damping=relative_damping,
          tangent_distribution=tangent_distribution,
          has_aux=has_aux,
          aux_example=aux_example,
          mask=mask,
          data_axis_name=data_axis_name,
          tangent_axis_name=tangent_axis_name,
      ),
      optax.scale_by_learning_rate(learning_rate),
  )
