"""The step SOFO takes from a sketch: the paper's, or a controlled one.

:func:`fixed_step` solves the damped K×K system at one fixed damping, as in
Yu et al. (2024). :func:`controlled_step` is adaptive step control (see
:mod:`sofo_jax._src.step_control` for the K-space rules): it evaluates the
loss at the trial steps of a damping ladder and at the parameters before the
last step, in one batched forward pass of the closure, keeps the least
damped trial that works, and undoes the last step when the new batch shows
it generalised badly. Both return an :class:`Outcome`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float

from sofo_jax._src import learning_rate as learning_rate_lib
from sofo_jax._src import sketch as sketch_lib
from sofo_jax._src import solve as solve_lib
from sofo_jax._src import step_control as step_control_lib
from sofo_jax._src import tangents as tangents_lib


def trial_losses(loss_fn, part, offsets, has_aux, data_axis_name):
  """Losses at :math:`\\theta + \\delta_j` for each stacked offset :math:`\\delta_j`.

  One batched forward pass of the closure over all trial points; the trial
  parameters are formed as ``optax.apply_updates`` would, in each leaf's
  dtype.
  """

  def one(offset):
    trial = [(p + d).astype(p.dtype) for p, d in zip(part.trainable, offset)]
    return sketch_lib.loss_value(loss_fn, part.rebuild(trial), has_aux)

  losses = jax.vmap(one)(offsets)
  if data_axis_name is not None:
    losses = jax.lax.pmean(losses, data_axis_name)
  return losses


class Outcome(NamedTuple):
  """What one update decided.

  Attributes:
    direction: the direction handed to the chain (which scales it by
      :math:`-\\eta`), flat: shape ``(P,)``, as the rows of the tangent
      matrix.
    damping: :math:`\\lambda` of the step taken.
    next_damping: :math:`\\lambda` for the next step.
    rho: actual over predicted decrease (NaN without step control).
    rejected: every trial was rejected; the direction is zero.
    reverted: the direction undoes the last step.
    trial_loss: the loss after the step on this batch (NaN without step
      control).
    predicted_decrease: the quadratic model's decrease for a unit learning
      rate.
    finite: whether the step is meaningful (the sketch was finite, or the
      step is an undo).
    last_update: the parameter update this step makes, for the next one,
      flat like ``direction``; ``None`` when step control keeps none.
  """

  direction: Array
  damping: Float[Array, ""]
  next_damping: Float[Array, ""]
  rho: Float[Array, ""]
  rejected: Bool[Array, ""]
  reverted: Bool[Array, ""]
  trial_loss: Float[Array, ""]
  predicted_decrease: Float[Array, ""]
  finite: Bool[Array, ""]
  last_update: Array | None


def is_spike(loss, previous_loss, ratio):
  """Whether ``loss`` exceeds ``ratio`` times ``previous_loss``.

  Written as an increase relative to ``|previous_loss|``, so that it also
  reads right for losses that can be negative. A non-finite ``loss`` is a
  spike when ``previous_loss`` is finite.
  """
  bound = previous_loss + (ratio - 1.0) * jnp.abs(previous_loss)
  return jnp.isfinite(previous_loss) & ~(loss <= bound)


def flat_last_update(state, dtype):
  """The last update (a params-shaped buffer in the state) as one flat vector."""
  return tangents_lib.flatten(jax.tree.leaves(state.last_update), dtype, batch_ndim=0)


def controlled_step(
  settings,
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
):
  """Step control: the ladder of trials, the choice, and the next-batch check.

  ``tangents`` is the ``(K, P)`` tangent matrix (see
  :func:`sofo_jax._src.tangents.flatten`); directions come back flat.
  """
  eta = learning_rate_lib.learning_rate_at(learning_rate, state.count)
  trials = step_control_lib.ladder(
    settings,
    system,
    gradient,
    sketch.gauss_newton,
    state.damping,
    eta,
    relative_damping,
  )
  dtype = tangents.dtype
  steps = tangents_lib.combine_flat(trials.coefficients, tangents, part.trainable)
  offsets = -jnp.asarray(eta, dtype) * steps
  last_update = (
    flat_last_update(state, dtype) if settings.revert_ratio is not None else None
  )
  num_trials = settings.num_trials
  points = offsets
  if settings.lookahead is not None:
    # M more trial points: each step taken `lookahead` times as far.
    points = jnp.concatenate([points, settings.lookahead * offsets])
  if last_update is not None:
    # One more trial point: the parameters before the last step.
    points = jnp.concatenate([points, -last_update[None]])
  losses = trial_losses(
    loss_fn,
    part,
    tangents_lib.unflatten(points, part.trainable),
    has_aux,
    data_axis_name,
  )
  loss_before = sketch.value
  within = True
  if settings.max_step_ratio is not None:
    # Per-leaf sums of squares: no parameter-sized copy on the hot path.
    params_norm = optax.tree.norm(part.trainable).astype(dtype)
    step_norms = jnp.linalg.norm(offsets, axis=-1)
    within = ~(step_norms > settings.max_step_ratio * params_norm) | (params_norm == 0)
  if settings.lookahead is not None:
    beyond = losses[num_trials : 2 * num_trials].astype(loss_before.dtype)
    # NaN compares False: a non-finite loss further on fails the margin.
    within = within & (beyond <= loss_before)
  chosen = step_control_lib.choose(
    settings,
    trials,
    losses[:num_trials],
    loss_before,
    system.finite,
    within,
  )
  # The accepted trial's step, already computed; zero if every trial failed.
  direction = jnp.where(chosen.rejected, jnp.zeros((), dtype), steps[chosen.trial])
  predicted = solve_lib.model_decrease(
    gradient, sketch.gauss_newton, chosen.coefficients
  )
  if last_update is None:
    return Outcome(
      direction,
      chosen.damping,
      chosen.next_damping,
      chosen.rho,
      chosen.rejected,
      jnp.array(False),
      chosen.trial_loss,
      predicted,
      system.finite,
      None,
    )
  previous_loss = losses[-1]
  reverted = is_spike(loss_before, previous_loss, settings.revert_ratio)
  # The chain multiplies this transform's output by -eta: hand it the last
  # update over eta, and the parameters go back to where they were.
  inverse_eta = jnp.where(jnp.asarray(eta) > 0, 1.0 / jnp.asarray(eta), 0.0)
  undo = tangents_lib.round_to_leaves(
    last_update * inverse_eta.astype(dtype), part.trainable
  )
  direction = jnp.where(reverted, undo, direction)
  taken = jnp.where(
    reverted, jnp.zeros((), dtype), -jnp.asarray(eta, dtype) * direction
  )
  taken = tangents_lib.round_to_leaves(taken, part.trainable)
  k_dtype = chosen.next_damping.dtype
  raised = jnp.clip(
    jnp.asarray(state.damping, k_dtype) * settings.trial_growth,
    settings.min_damping,
    settings.max_damping,
  )
  return Outcome(
    direction=direction,
    damping=jnp.where(reverted, jnp.asarray(state.damping, k_dtype), chosen.damping),
    next_damping=jnp.where(reverted, raised, chosen.next_damping),
    rho=jnp.where(reverted, jnp.nan, chosen.rho),
    rejected=chosen.rejected & ~reverted,
    reverted=reverted,
    trial_loss=jnp.where(reverted, previous_loss, chosen.trial_loss),
    predicted_decrease=jnp.where(reverted, 0.0, predicted),
    finite=system.finite | reverted,
    last_update=taken,
  )


def top_directions(system, tangents, part, count, previous):
  """The ``count`` highest-curvature directions :math:`\\Theta u_i`, normalised.

  Returned as a buffer like ``previous`` (see ``Partition.buffer``), which a
  non-finite sketch keeps.
  """
  if not count:
    return None
  top = system.eigenvectors[:, -count:].T  # (count, K), largest last
  directions = tangents_lib.normalize_rows(
    tangents_lib.combine_flat(top, tangents, part.trainable)
  )
  return part.buffer(
    jnp.where(system.finite, d, p)
    for d, p in zip(
      tangents_lib.unflatten(directions, part.trainable), jax.tree.leaves(previous)
    )
  )


def fixed_step(
  damping, system, gradient, gauss_newton, tangents, trainable, relative_damping
):
  """The paper's step: one fixed damping, no trials."""
  # The closure's damping, not a stored one: an injected damping
  # (optax.inject_hyperparams) may change from step to step.
  coefficients, solved = solve_lib.damped_coefficients(
    system, solve_lib.absolute_damping(damping, system, relative_damping)
  )
  nan = jnp.full((), jnp.nan, system.eigenvalues.dtype)
  return Outcome(
    direction=tangents_lib.combine_flat(coefficients, tangents, trainable),
    damping=jnp.asarray(damping, system.eigenvalues.dtype),
    next_damping=jnp.asarray(damping, system.eigenvalues.dtype),
    rho=nan,
    rejected=jnp.array(False),
    reverted=jnp.array(False),
    trial_loss=nan,
    predicted_decrease=solve_lib.model_decrease(gradient, gauss_newton, coefficients),
    finite=system.finite & solved,
    last_update=None,
  )
