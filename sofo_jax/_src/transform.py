"""SOFO as an Optax gradient transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from sofo_jax._src import eager as eager_lib
from sofo_jax._src import keys as keys_lib
from sofo_jax._src import learning_rate as learning_rate_lib
from sofo_jax._src import multisteps, spmd, validation
from sofo_jax._src import sharding as sharding_lib
from sofo_jax._src import sketch as sketch_lib
from sofo_jax._src import solve as solve_lib
from sofo_jax._src import step_control as step_control_lib
from sofo_jax._src import steps as steps_lib
from sofo_jax._src import tangents as tangents_lib
from sofo_jax._src import tree as tree_lib


class SofoDiagnostics(NamedTuple):
  """What one SOFO step saw, for logging without extra passes.

  Attributes:
    loss: loss value at the parameters the step started from.
    max_eigenvalue: largest eigenvalue :math:`s_{\\max}` of the sketched
      Gauss–Newton matrix.
    damping: the absolute damping added to the K×K system for the step
      taken.
    damping_parameter: :math:`\\lambda` of the step taken (relative to
      :math:`s_{\\max}` with relative damping).
    predicted_decrease: decrease of the quadratic model for a unit learning
      rate, :math:`\\tilde g^\\top w - \\tfrac12 w^\\top\\tilde G w`.
    gradient_norm: :math:`\\lVert\\tilde g\\rVert`, the sketched gradient's norm.
    eigenvalues: the spectrum of the sketched Gauss–Newton matrix, ascending.
    step_is_finite: False when the loss or the sketch was not finite; the
      step was then zero.
    num_nonfinite_steps: how many steps so far were skipped for that reason.
    rho: ratio of the actual to the predicted decrease of the step taken
      (adaptive step control; NaN without it).
    step_rejected: True when step control rejected every trial step; the
      step was then zero.
    num_rejected_steps: how many steps so far were rejected.
    step_reverted: True when this update undid the last step, because the
      loss on the new batch showed it had generalised badly (see
      :class:`sofo_jax.StepControl`'s ``revert_ratio``).
    num_reverted_steps: how many steps so far were undone.
    trial_loss: the loss on this batch after the step (adaptive step
      control; NaN without it).
  """

  loss: Float[Array, ""]
  max_eigenvalue: Float[Array, ""]
  damping: Float[Array, ""]
  damping_parameter: Float[Array, ""]
  predicted_decrease: Float[Array, ""]
  gradient_norm: Float[Array, ""]
  eigenvalues: Float[Array, " k"]
  step_is_finite: Bool[Array, ""]
  num_nonfinite_steps: Int[Array, ""]
  rho: Float[Array, ""]
  step_rejected: Bool[Array, ""]
  num_rejected_steps: Int[Array, ""]
  step_reverted: Bool[Array, ""]
  num_reverted_steps: Int[Array, ""]
  trial_loss: Float[Array, ""]


class ScaleBySofoState(NamedTuple):
  """State of :func:`scale_by_sofo`.

  Attributes:
    count: number of updates so far (int32).
    key: raw PRNG key data, split at every step.
    damping: the damping :math:`\\lambda` for the next step (adapted by
      step control; the fixed value without it).
    last_update: the last parameter update, as the chain applies it, kept
      for the momentum tangent and the next-batch check of step control;
      ``None`` without either. Shaped like the params, with
      ``optax.MaskedNode()`` on the leaves SOFO does not train (as
      ``optax.masked`` keeps its state), so ``optax.tree_map_params``
      reaches it.
    recycled: the tangents kept for the next step (``num_recycled``), shaped
      like the params with a leading axis of ``num_recycled`` on each
      trained leaf and ``optax.MaskedNode()`` elsewhere; ``None`` without
      recycling.
    diagnostics: :class:`SofoDiagnostics` of the last step.
    aux: the closure's auxiliary output of the last step (``has_aux``), else
      ``None``.
  """

  # The field shadows tuple.count, as in optax's states; mypy flags that.
  count: Int[Array, ""]  # type: ignore[assignment]
  key: jax.Array
  damping: Float[Array, ""]
  last_update: tuple | None
  recycled: tuple | None
  diagnostics: SofoDiagnostics
  aux: Any


def _float_dtype():
  return jnp.zeros(()).dtype


def _initial_diagnostics(num_tangents: int) -> SofoDiagnostics:
  zero = jnp.zeros((), _float_dtype())
  nan = jnp.full((), jnp.nan, _float_dtype())
  return SofoDiagnostics(
    loss=nan,
    max_eigenvalue=zero,
    damping=zero,
    damping_parameter=zero,
    predicted_decrease=zero,
    gradient_norm=zero,
    eigenvalues=jnp.zeros((num_tangents,), _float_dtype()),
    step_is_finite=jnp.array(True),
    num_nonfinite_steps=jnp.zeros((), jnp.int32),
    rho=nan,
    step_rejected=jnp.array(False),
    num_rejected_steps=jnp.zeros((), jnp.int32),
    step_reverted=jnp.array(False),
    num_reverted_steps=jnp.zeros((), jnp.int32),
    trial_loss=nan,
  )


def _check_num_recycled(num_recycled) -> int:
  # None, not 0, is the default so that optax.inject_hyperparams leaves it
  # alone: it fixes shapes and must stay a Python int.
  if num_recycled is None:
    return 0
  if isinstance(num_recycled, bool) or not isinstance(num_recycled, int):
    raise TypeError(
      "num_recycled must be a Python int (it fixes array shapes); got "
      f"{type(num_recycled).__name__}. With optax.inject_hyperparams, list it "
      "in static_args."
    )
  if num_recycled < 0:
    raise ValueError(f"num_recycled must be >= 0; got {num_recycled}.")
  return num_recycled


# The fixed relative damping of the paper's optimiser (adaptive=False) when
# the user gives none; the paper tunes it in [1e-7, 1e-3].
FIXED_DAMPING = 1e-4


def default_damping(damping: ArrayLike | None, adaptive: bool) -> ArrayLike:
  """``damping``, or the default for the mode when it is ``None``."""
  if damping is not None:
    return damping
  return step_control_lib.START_DAMPING if adaptive else FIXED_DAMPING


def scale_by_sofo(
  num_tangents: int,
  damping: ArrayLike | None = None,
  *,
  key: jax.Array,
  adaptive: bool = True,
  learning_rate: optax.ScalarOrSchedule = 1.0,
  step_control: step_control_lib.StepControl = step_control_lib.StepControl(),
  momentum: bool | None = None,
  num_recycled: int | None = None,
  relative_damping: bool = True,
  tangent_distribution: str = "normalized_gaussian",
  has_aux: bool = False,
  aux_example: Any = None,
  mask: Any = None,
  data_axis_name: spmd.AxisName | None = None,
  tangent_axis_name: str | None = None,
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

  With ``adaptive`` (default), :math:`\\lambda` is chosen every step by
  Levenberg–Marquardt step control with backtracking, so that no accepted
  step raises the loss on its own batch (see :class:`sofo_jax.StepControl`).

  The update needs the keyword extra argument ``loss_fn``, a closure of the
  parameters returning a :class:`sofo_jax.losses.Loss` (or ``(Loss, aux)``
  with ``has_aux``). SOFO computes its own direction, so pass ``None`` as
  ``updates`` (or a zero tree, which ``optax.apply_if_finite`` needs) and
  place it first in a chain: nonzero incoming updates, such as gradients or
  the output of a clipping placed before it, raise an error rather than
  being silently ignored. Unknown extra arguments (passed through
  ``optax.chain``) are ignored.

  Large batches: the sketch is additive over micro-batches that share
  tangents, so a closure that sums the losses of M micro-batches in a
  ``lax.scan`` (starting from ``sofo_jax.losses.zero()``, then dividing by M)
  takes exactly the full-batch step while holding one micro-batch's
  activations at a time; this is the way to take a large effective batch
  (``docs/large_batches.md``). ``optax.MultiSteps`` cannot accumulate a SOFO
  step (it would hand over only the last micro-batch's closure) and raises a
  ``TypeError`` saying so.

  Read the state through :func:`sofo_jax.get_state` and
  :func:`sofo_jax.get_diagnostics`, which find it inside chains and
  wrappers (``sofo()``'s state is a chain's tuple).

  Non-finite values never reach the parameters: if the loss, the sketch or
  the direction (e.g. overflowing a float16 leaf) is not finite the direction
  is zero and ``get_diagnostics(state).step_is_finite`` is False.

  Args:
    num_tangents: K, a Python int >= 1. It fixes shapes: with
      ``optax.inject_hyperparams`` list it (and ``key``) in ``static_args``.
    damping: :math:`\\lambda \\ge 0` (an array-like). With ``adaptive``
      it is the starting damping, adapted every step; ``None`` (default)
      starts at 1, relative to :math:`s_{\\max}`, so the first steps are
      cautious and the damping then falls by the Levenberg–Marquardt rule
      (see :class:`sofo_jax.StepControl`), never below
      ``StepControl.min_damping`` (1e-4): a lower starting damping is
      raised to it, with a warning; for undamped Gauss–Newton steps, pass
      ``StepControl(min_damping=0)`` too. Without ``adaptive`` it is the
      fixed damping (injectable with ``optax.inject_hyperparams``), and
      ``None`` means 1e-4.
    key: PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``); split every
      step, so successive steps use fresh tangents.
    adaptive: adaptive step control (default): every step tries a ladder of
      dampings, evaluating the loss at each trial point in one batched
      forward pass, keeps the least damped step whose loss fell by at least
      a quarter of the quadratic model's prediction (``min_rho``), rejects
      the step (a zero update) if none, and adapts the damping by the
      Levenberg–Marquardt rule on :math:`\\rho`, the ratio of actual to
      predicted decrease (see :class:`sofo_jax.StepControl`). Costs
      ``step_control.num_trials`` extra forward passes of the closure per
      step. ``False`` gives the paper's fixed damping.
    learning_rate: :math:`\\eta`, the learning rate (float or optax schedule)
      that the chain applies to this direction afterwards; step control
      evaluates the loss at :math:`\\theta - \\eta d`. :func:`sofo` passes
      its own. Unused without ``adaptive``.
    step_control: the :class:`sofo_jax.StepControl` settings.
    momentum: quadratic-model momentum: one of the K tangents is the last
      update (normalised), so the K×K solve picks the momentum coefficient
      along with the rest, as kfac-jax picks its momentum from a small
      quadratic model. Keeps one parameter-sized buffer. ``None`` (default):
      on with ``adaptive`` when K >= 2 (it leaves K - 1 random tangents);
      off with ``adaptive=False``, the paper's optimiser. Measured on the
      library's five RNN tasks (``benchmarks/results/step_options.json``),
      it never lost and cut the loss 2.5× on Lorenz and 60× on delayed
      addition after 300 steps.
    num_recycled: tangent recycling: this many of the K tangents are the
      top eigen-directions :math:`\\Theta u_i` of the last step's
      :math:`\\tilde G`, so high-curvature directions found once are kept.
      Keeps ``num_recycled`` parameter-sized buffers. ``None`` (default)
      recycles none.
    relative_damping: if True (default) the damping added is
      :math:`\\lambda s_{\\max}`; if False it is :math:`\\lambda`.
    tangent_distribution: ``"normalized_gaussian"`` (default, unit-norm
      Gaussian tangents) or ``"orthonormal"``.
    has_aux: the closure returns ``(loss, aux)``; the last aux is stored in
      the state (``sofo_jax.get_state(state).aux``).
    aux_example: with ``has_aux``, a pytree of arrays or
      ``jax.ShapeDtypeStruct`` shaped like aux, e.g.
      ``jax.eval_shape(lambda p: loss_fn(p)[1], params)``. ``init`` stores
      zeros of that shape, so the state keeps one structure from the start:
      needed to carry it through ``lax.scan``, and it saves a jitted loop a
      second compilation. Without it ``init`` stores ``None``, the first
      update fills it in, and a warning says what to pass.
    mask: frozen parameters. ``None`` trains every floating leaf; otherwise a
      pytree of bools like the params (or a prefix), or a callable returning
      one: tangents are drawn only on ``True`` leaves, the others get a zero
      update. A leaf of the mask may also be a boolean array of its
      parameter's shape (``True`` = trainable entry), for fixed sparse
      connectivity: the tangents, and so the update, momentum and recycled
      directions, are exactly zero on the ``False`` entries, and P counts
      trainable entries only. (``optax.masked`` cannot be used around SOFO,
      because it hides the frozen values the closure needs.)
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
    ...     sofo_jax.scale_by_sofo(3, 1e-4, key=jax.random.key(0), momentum=False,
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
  validation.check_aux_example(has_aux, aux_example)
  spmd.check_axis_names(data_axis_name, tangent_axis_name)
  owner = "scale_by_sofo"
  if isinstance(adaptive, jax.Array) or not isinstance(adaptive, bool):
    raise TypeError("adaptive must be a Python bool.")
  damping = default_damping(damping, adaptive)
  validation.check_damping(damping, owner)
  if not isinstance(step_control, step_control_lib.StepControl):
    raise TypeError(
      f"step_control must be a sofo_jax.StepControl; got {type(step_control).__name__}."
    )
  if adaptive:
    validation.warn_if_below_floor(damping, step_control.min_damping, owner)
  validation.check_learning_rate(learning_rate, owner)
  if momentum is None:  # the paper's optimiser (adaptive=False) has none
    momentum = adaptive and num_tangents >= 2
  if isinstance(momentum, jax.Array) or not isinstance(momentum, bool):
    raise TypeError("momentum must be a Python bool (or None for the default).")
  num_recycled = _check_num_recycled(num_recycled)
  if num_recycled + int(momentum) >= num_tangents:
    raise ValueError(
      f"num_tangents={num_tangents} leaves no fresh random tangent after "
      f"{num_recycled} recycled and {int(momentum)} momentum tangent(s); "
      "raise num_tangents or lower num_recycled."
    )

  keeps_last_update = momentum or (adaptive and step_control.revert_ratio is not None)
  num_fresh = num_tangents - num_recycled - int(momentum)

  def zero_buffer(params, part, keep: bool, zeros):
    """A params-shaped buffer, ``zeros(leaf)`` on each trained leaf."""
    if not keep:
      return None
    if part is None:  # no leaves: optax.tree_map_params's placeholder
      return params
    return part.buffer(zeros(p) for p in part.trainable)

  def zero_recycled(p):
    return sharding_lib.like(jnp.zeros((num_recycled, *p.shape), p.dtype), p)

  def init_fn(params):
    multisteps.check_not_in_multisteps(owner)
    part = validation.check_params_at_init(params, owner, mask)
    aux = validation.zeros_like_example(aux_example)
    return ScaleBySofoState(
      count=jnp.zeros((), jnp.int32),
      key=jnp.array(key_data, copy=True),
      damping=jnp.asarray(damping, _float_dtype()),
      last_update=zero_buffer(params, part, keeps_last_update, jnp.zeros_like),
      recycled=zero_buffer(params, part, bool(num_recycled), zero_recycled),
      diagnostics=_initial_diagnostics(num_tangents),
      aux=aux,
    )

  def update_fn(updates, state, params=None, *, loss_fn=None, **extra_args):
    multisteps.check_not_in_multisteps(owner)
    validation.check_loss_fn(loss_fn, owner, extra_args)
    # SOFO computes its own direction from loss_fn; nonzero updates are an error.
    count = validation.checked_count(updates, state.count, owner)
    part = validation.check_params(params, owner, mask)
    validation.warn_if_aux_changes_structure(has_aux, state.aux, owner)
    next_key, step_key = codec.split(state.key)
    # The K tangents as one (K, P) matrix, cut into leaves only for the
    # closure: the vector work on them then compiles to a few kernels instead
    # of a few per leaf.
    rows = [
      tangents_lib.sample_flat(
        step_key, part.trainable, num_fresh, tangent_distribution, part.entry_masks
      )
    ]
    flat_dtype = rows[0].dtype
    if momentum:
      last = steps_lib.flat_last_update(state, flat_dtype)
      # The fresh and recycled rows already hold values of each leaf's dtype.
      rows.append(
        tangents_lib.round_to_leaves(
          tangents_lib.normalize_rows(last[None]), part.trainable
        )
      )
    if num_recycled:
      rows.append(tangents_lib.flatten(jax.tree.leaves(state.recycled), flat_dtype))
    tangents = jnp.concatenate(rows)
    tangent_leaves = tangents_lib.unflatten(tangents, part.trainable)
    sketch, aux = sketch_lib.sketch_leaves(
      loss_fn,
      part,
      tangent_leaves,
      has_aux,
      data_axis_name=data_axis_name,
      tangent_axis_name=tangent_axis_name,
    )
    value_is_finite = jnp.isfinite(sketch.value)
    # A non-finite loss makes the whole sketch meaningless: skip the step.
    gradient = jnp.where(value_is_finite, sketch.gradient, jnp.nan)
    system = solve_lib.eigensystem(gradient, sketch.gauss_newton)
    if adaptive:
      outcome = steps_lib.controlled_step(
        step_control,
        state,
        part,
        loss_fn,
        tangents,
        sketch,
        gradient,
        system,
        learning_rate,
        relative_damping,
        has_aux,
        data_axis_name,
      )
    else:
      outcome = steps_lib.fixed_step(
        damping,
        system,
        gradient,
        sketch.gauss_newton,
        tangents,
        part.trainable,
        relative_damping,
      )
    eta = learning_rate_lib.learning_rate_at(learning_rate, state.count)
    # An unusable learning rate (traced, so not refused at construction)
    # skips the step: the chain then scales a zero direction by zero.
    (direction,), direction_is_finite = tangents_lib.zero_if_nonfinite(
      [outcome.direction], learning_rate_lib.is_usable(eta)
    )
    absolute = solve_lib.absolute_damping(outcome.damping, system, relative_damping)
    step_is_finite = outcome.finite & direction_is_finite
    rejected = outcome.rejected & step_is_finite
    last_update = outcome.last_update
    if keeps_last_update and last_update is None:
      last_update = tangents_lib.round_to_leaves(
        -jnp.asarray(eta, flat_dtype) * direction, part.trainable
      )
    if last_update is not None:
      last_update = part.buffer(
        tangents_lib.unflatten(
          jnp.where(step_is_finite, last_update, jnp.zeros((), flat_dtype)),
          part.trainable,
        )
      )
    new_updates = part.fill(
      tangents_lib.unflatten(direction, part.trainable), tree_lib.zero_update
    )
    dtype = _float_dtype()
    diagnostics = SofoDiagnostics(
      loss=sketch.value.astype(dtype),
      max_eigenvalue=system.max_eigenvalue.astype(dtype),
      damping=absolute.astype(dtype),
      damping_parameter=jnp.asarray(outcome.damping).astype(dtype),
      predicted_decrease=outcome.predicted_decrease.astype(dtype),
      gradient_norm=solve_lib.scale_safe_norm(sketch.gradient).astype(dtype),
      eigenvalues=system.eigenvalues.astype(dtype),
      step_is_finite=step_is_finite,
      num_nonfinite_steps=state.diagnostics.num_nonfinite_steps
      + jnp.where(step_is_finite, 0, 1).astype(jnp.int32),
      rho=jnp.asarray(outcome.rho).astype(dtype),
      step_rejected=rejected,
      num_rejected_steps=state.diagnostics.num_rejected_steps
      + rejected.astype(jnp.int32),
      step_reverted=outcome.reverted,
      num_reverted_steps=state.diagnostics.num_reverted_steps
      + outcome.reverted.astype(jnp.int32),
      trial_loss=jnp.asarray(outcome.trial_loss).astype(dtype),
    )
    new_state = ScaleBySofoState(
      # optax annotates safe_increment's result as any chex.Numeric.
      count=optax.safe_increment(count),  # type: ignore[arg-type]
      key=next_key,
      damping=jnp.asarray(outcome.next_damping, dtype),
      last_update=last_update,
      recycled=steps_lib.top_directions(
        system, tangents, part, num_recycled, state.recycled
      ),
      diagnostics=diagnostics,
      aux=aux,
    )
    return new_updates, new_state

  eager_update = eager_lib.jit_when_eager(
    update_fn, lambda updates: validation.checked_count(updates, 0, owner)
  )
  return optax.GradientTransformationExtraArgs(init_fn, eager_update)


def sofo(
  learning_rate: optax.ScalarOrSchedule,
  num_tangents: int,
  damping: ArrayLike | None = None,
  *,
  key: jax.Array,
  adaptive: bool = True,
  step_control: step_control_lib.StepControl = step_control_lib.StepControl(),
  momentum: bool | None = None,
  num_recycled: int | None = None,
  relative_damping: bool = True,
  tangent_distribution: str = "normalized_gaussian",
  has_aux: bool = False,
  aux_example: Any = None,
  mask: Any = None,
  data_axis_name: spmd.AxisName | None = None,
  tangent_axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """SOFO with a learning rate: ``chain(scale_by_sofo(...), scale_by_learning_rate(lr))``.

  The parameter step is :math:`-\\eta\\,\\Theta(\\tilde G +
  \\lambda_{\\text{eff}} I)^{-1}\\tilde g`. See :func:`scale_by_sofo` for the
  arguments other than ``learning_rate`` (a float or an optax schedule). The
  paper's settings are :math:`\\eta \\in [0.1, 1]`, :math:`\\lambda \\in
  [10^{-7}, 10^{-3}]` and K of 64–512. With adaptive step control (the
  default) the learning rate 1 works from a random initialisation without a
  warm-up; with ``adaptive=False`` (the paper's fixed damping) warm it up
  over the first few dozen steps (for example
  ``optax.linear_schedule(0.1, 1.0, 30)``), or the first lightly damped
  Gauss–Newton steps can overshoot.

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
      adaptive=adaptive,
      learning_rate=learning_rate,
      step_control=step_control,
      momentum=momentum,
      num_recycled=num_recycled,
      relative_damping=relative_damping,
      tangent_distribution=tangent_distribution,
      has_aux=has_aux,
      aux_example=aux_example,
      mask=mask,
      data_axis_name=data_axis_name,
      tangent_axis_name=tangent_axis_name,
    ),
    learning_rate_lib.scale_by_learning_rate(learning_rate),
  )
