"""Adaptive step control: Levenberg–Marquardt damping with backtracking.

A SOFO step is an exact damped Gauss–Newton step in a random subspace, so it
is only as good as the quadratic model behind it. Far from a minimum, and in
recurrent networks whose dynamics a large step can make unstable, that model
is wrong, and a lightly damped step can raise the loss by orders of
magnitude. Step control measures the step before it is taken:

1. From the one eigendecomposition of :math:`\\tilde G`, form the directions
   :math:`w_j = U (S + \\lambda_j s_{\\max} I)^{-1} U^\\top \\tilde g` for a
   ladder of dampings :math:`\\lambda_j = \\lambda\\, \\gamma^j`,
   :math:`j = 0, \\dots, M-1` (cheap: K×K work each).
2. Evaluate the loss at every trial point :math:`\\theta - \\eta\\,\\Theta w_j`
   in one batched forward pass (M forward passes against the sketch's K
   forward-mode passes), on the step's own batch.
3. Compare with the quadratic model's prediction,

   .. math::

       \\rho_j = \\frac{c(\\theta) - c(\\theta - \\eta\\Theta w_j)}
                      {\\eta\\,\\tilde g^\\top w_j - \\tfrac{\\eta^2}{2}
                       w_j^\\top \\tilde G w_j},

   and take the least damped trial whose loss did not increase and whose
   :math:`\\rho_j \\ge \\rho_{\\min}`. If none qualifies the step is rejected
   (a zero update).
4. Set the next damping by the Levenberg–Marquardt rule on the accepted
   :math:`\\rho`: multiply by ``decrease`` when :math:`\\rho > 3/4`, by
   ``increase`` when :math:`\\rho < 1/4`; after a rejection, start from the
   most damped trial times ``increase``. Keep it in
   ``[min_damping, max_damping]``. The first step starts from the
   ``damping`` given to :func:`sofo_jax.sofo`, by default
   :data:`START_DAMPING` = 1.

The learning rate :math:`\\eta` that follows SOFO in the chain is part of the
step, so it enters both the trial points and the prediction; :func:`sofo`
passes it on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from sofo_jax._src import solve as solve_lib

# The damping step control starts from when the user gives none: relative to
# s_max, so the first steps lie between a gradient step scaled by 1/s_max and
# a Gauss–Newton step, and the damping then falls by ``decrease`` per
# well-predicted step (to 1e-4 in about 40 steps). Levenberg–Marquardt
# practice starts high when the initial point is far from a minimum, as a
# random initialisation is. Measured against 1e-4 (the fixed damping) in
# benchmarks/experiments.md, "Starting damping".
START_DAMPING = 1.0


@dataclasses.dataclass(frozen=True)
class StepControl:
  """Settings of SOFO's adaptive step control (see :mod:`step_control`).

  Attributes:
    num_trials: M, the number of dampings tried per step (extra forward
      passes of the loss closure).
    trial_growth: :math:`\\gamma`, the ratio between successive trial
      dampings.
    min_rho: smallest accepted ratio of actual to predicted decrease.
      0.25, not 0: a step whose loss fell by less than a quarter of what the
      quadratic model promised is one the model does not describe, and in
      a recurrent network such steps preceded the late spikes on a fresh
      batch. At K = 128 over 1000–1500 steps on the library's five RNN
      tasks (``benchmarks/results/step_control_variants.json``) it removed
      them (largest loss over the first: Kalman 2,760 → 1, double reach
      30 → 2) and left every final loss level or lower.
    decrease: factor applied to the damping after a step with
      :math:`\\rho > 3/4`. Deliberately slow (0.8, not the textbook 0.5):
      a recurrent network can fit its own batch well with little damping
      and still become unstable on the next; on the library's tasks 0.5
      let one in 15 runs blow up, 0.8 none.
    increase: factor applied after a step with :math:`\\rho < 1/4`, and
      after a rejection.
    min_damping: floor of the damping (relative to :math:`s_{\\max}`, like
      the damping, unless ``relative_damping=False``). :math:`10^{-4}`, the
      paper's fixed damping, not lower: on Lorenz at K = 128 the damping
      otherwise reaches the floor within a few hundred steps and stays there,
      every step well predicted on its own batch. Against a floor of
      :math:`10^{-6}` it halved Lorenz's final loss (lower on five seeds
      of six, level on the sixth), cut the Kalman runs with a late spike
      from four of six to one, and on the double reach kept every one of
      eight runs trained (the lower floor left two of eight at 30 and 300
      times the final loss of the others); flip-flop ended 6% higher,
      delayed addition level (``benchmarks/experiments.md``, "The damping
      floor"). Pass 0 for a deterministic problem that should converge to
      round-off (full-batch least squares): its last steps are then exact
      Gauss–Newton steps.
    max_damping: ceiling of the damping.
    revert_ratio: the check on the next batch. Each update first evaluates
      the loss, on its own (new) batch, at the parameters before the last
      step; if the loss at the current parameters is more than
      ``revert_ratio`` times that (or not finite while that is), the last
      step generalised badly (typically: it made the recurrent dynamics
      unstable on inputs its batch did not contain), and this update undoes
      it and multiplies the damping by ``trial_growth``. One more forward
      pass per step and one parameter-sized buffer in the state; ``None``
      turns the check off. The undo assumes the chain after SOFO only scales
      by the learning rate, as in :func:`sofo_jax.sofo`.
    max_step_ratio: a trust region in parameter space: a trial step longer
      than ``max_step_ratio`` times the norm of the trainable parameters is
      not accepted (no bound when the parameters are zero). ``None`` (the
      default) sets no bound. 0.1 cut the late fresh-batch spikes of a
      ReLU RNN on the Kalman task: at the old damping floor of
      :math:`10^{-6}` none on six seeds against four; at the current floor
      one seed of six still spiked, to 10× its first loss against 1,454×; it
      is not the default because a bound relative to the parameters' norm
      also slows problems whose optimum is far from the start, or near
      zero (``benchmarks/experiments.md``, "Late spikes").
    lookahead: a stability margin along the step. A trial step
      :math:`\\delta_j` is accepted only if the loss at
      :math:`\\theta + a\\,\\delta_j`, with :math:`a` = ``lookahead`` > 1,
      is finite and no higher than the loss before the step: the step must
      still be a descent step when taken :math:`a` times as far. On an exact
      quadratic model a full Gauss–Newton step passes for any
      :math:`a < 2` (the loss returns to its start at :math:`a = 2`); a step
      that lands near the edge of a recurrent network's stable region does
      not, because just beyond it the loss explodes. M more forward passes
      in the same batched trial pass. ``None`` (the default) sets no margin.
      At 1.5 it removed the late fresh-batch spikes of a ReLU RNN on the
      Kalman task (none in twelve runs at K = 128, against six at the
      defaults); it is not the default because on the double reach it
      moved the spikes to other seeds and left one run of eight stalled,
      and it cost flip-flop 11% and delayed addition two solved seeds of
      ten (``benchmarks/experiments.md``, "A stability margin along the
      step").

  Example:
    >>> import sofo_jax
    >>> sofo_jax.StepControl(num_trials=2).trial_growth
    10.0
  """

  num_trials: int = 3
  trial_growth: float = 10.0
  min_rho: float = 0.25
  decrease: float = 0.8
  increase: float = 2.0
  min_damping: float = 1e-4
  max_damping: float = 1e3
  revert_ratio: float | None = 2.0
  max_step_ratio: float | None = None
  lookahead: float | None = None

  def __post_init__(self):
    if isinstance(self.num_trials, bool) or not isinstance(self.num_trials, int):
      raise TypeError(
        f"StepControl.num_trials must be an int; got {self.num_trials!r}."
      )
    if self.num_trials < 1:
      raise ValueError(f"StepControl.num_trials must be >= 1; got {self.num_trials}.")
    checks: tuple[tuple[str, bool, str], ...] = (
      ("trial_growth", self.trial_growth > 1.0, "> 1"),
      ("decrease", 0.0 < self.decrease <= 1.0, "in (0, 1]"),
      ("increase", self.increase >= 1.0, ">= 1"),
      ("min_damping", self.min_damping >= 0.0, ">= 0"),
      ("max_damping", self.max_damping >= self.min_damping, ">= min_damping"),
      ("min_rho", self.min_rho < 1.0, "< 1"),
    )
    if self.revert_ratio is not None:
      checks += (("revert_ratio", self.revert_ratio >= 1.0, ">= 1 (or None)"),)
    if self.max_step_ratio is not None:
      checks += (("max_step_ratio", self.max_step_ratio > 0.0, "> 0 (or None)"),)
    if self.lookahead is not None:
      checks += (("lookahead", self.lookahead > 1.0, "> 1 (or None)"),)
    for name, ok, rule in checks:
      value = getattr(self, name)
      if not (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        # math, not jnp: a default StepControl() is built at import, and
        # importing sofo_jax must not start a JAX backend.
        and math.isfinite(value)
        and ok
      ):
        raise ValueError(
          f"StepControl.{name} must be a finite number {rule}; got {value!r}."
        )


class ControlledStep(NamedTuple):
  """The step that step control chose.

  Attributes:
    coefficients: :math:`w` of the accepted trial (zero if rejected).
    damping: the damping :math:`\\lambda_j` of the accepted trial (relative
      or absolute, as configured); the most damped trial's if rejected.
    next_damping: the damping for the next step.
    rho: :math:`\\rho` of the accepted trial (of the most damped one if
      rejected; NaN when the prediction was not positive).
    rejected: whether every trial was rejected.
    trial_loss: the loss after the accepted step (the loss before it if
      rejected).
    trial: index of the accepted trial (the most damped one if rejected).
  """

  coefficients: Float[Array, " k"]
  damping: Float[Array, ""]
  next_damping: Float[Array, ""]
  rho: Float[Array, ""]
  rejected: Bool[Array, ""]
  trial_loss: Float[Array, ""]
  trial: Int[Array, ""]


class Ladder(NamedTuple):
  """The trial steps of one update, least damped first.

  Attributes:
    dampings: :math:`\\lambda_j = \\lambda\\gamma^j`, shape ``(M,)``.
    coefficients: :math:`w_j`, shape ``(M, K)``.
    predicted: the quadratic model's decrease for each step
      :math:`-\\eta\\Theta w_j`, shape ``(M,)``.
  """

  dampings: Float[Array, " m"]
  coefficients: Float[Array, "m k"]
  predicted: Float[Array, " m"]


def ladder(
  settings: StepControl,
  system: solve_lib.Eigensystem,
  gradient: Float[Array, " k"],
  gauss_newton: Float[Array, "k k"],
  damping: ArrayLike,
  learning_rate: ArrayLike,
  relative_damping: bool,
) -> Ladder:
  """The M trial steps, all from the one eigendecomposition of :math:`\\tilde G`.

  Args:
    settings: the :class:`StepControl`.
    system: the eigensystem of :math:`\\tilde G`.
    gradient: :math:`\\tilde g`.
    gauss_newton: :math:`\\tilde G`.
    damping: the current damping :math:`\\lambda`.
    learning_rate: :math:`\\eta`, the scale the chain applies to the step.
    relative_damping: whether :math:`\\lambda` is relative to
      :math:`s_{\\max}`.

  Returns:
    A :class:`Ladder`.
  """
  dtype = system.eigenvalues.dtype
  growth = settings.trial_growth ** jnp.arange(settings.num_trials, dtype=dtype)
  # The floor also keeps a zero starting damping from giving a ladder of zeros.
  dampings = jnp.maximum(jnp.asarray(damping, dtype), settings.min_damping) * growth

  def solve_one(trial_damping):
    absolute = solve_lib.absolute_damping(trial_damping, system, relative_damping)
    coefficients, _ = solve_lib.damped_coefficients(system, absolute)
    predicted = solve_lib.model_decrease(
      gradient, gauss_newton, coefficients, learning_rate
    )
    return coefficients, predicted

  coefficients, predicted = jax.vmap(solve_one)(dampings)
  return Ladder(dampings, coefficients, predicted)


def choose(
  settings: StepControl,
  trials: Ladder,
  losses: Float[Array, " m"],
  loss: Float[Array, ""],
  finite: Bool[Array, ""],
  within: ArrayLike = True,
) -> ControlledStep:
  """Keeps the least damped trial that works and sets the next damping.

  Args:
    settings: the :class:`StepControl`.
    trials: the :class:`Ladder`.
    losses: the loss after each trial step, on this batch.
    loss: the loss before the step, on this batch.
    finite: whether the sketch was finite (if not, every trial is rejected).
    within: per trial, whether its step lies inside the trust region
      (``max_step_ratio``) and passes the ``lookahead`` margin; True when
      neither is set.

  Returns:
    A :class:`ControlledStep`.
  """
  dtype = trials.dampings.dtype
  losses = losses.astype(dtype)
  loss = loss.astype(dtype)
  predicted = trials.predicted
  positive = predicted > 0
  rho = jnp.where(
    positive, (loss - losses) / jnp.where(positive, predicted, 1.0), jnp.nan
  )
  # A trial whose prediction is not positive (a zero step) is judged on the
  # loss alone; NaN comparisons are False, so non-finite losses never pass.
  acceptable = (
    jnp.isfinite(losses)
    & (losses <= loss)
    & (~positive | (rho >= settings.min_rho))
    & finite
    & within
  )
  chosen = jnp.argmax(acceptable)  # the first, least damped, acceptable trial
  rejected = ~acceptable[chosen]  # argmax of all-False is 0 (one reduction, not two)
  chosen = jnp.where(rejected, settings.num_trials - 1, chosen)
  chosen_rho = rho[chosen]
  factor = jnp.where(
    rejected | (chosen_rho < 0.25),
    settings.increase,
    jnp.where(chosen_rho > 0.75, settings.decrease, 1.0),
  )
  next_damping = jnp.clip(
    trials.dampings[chosen] * factor, settings.min_damping, settings.max_damping
  )
  return ControlledStep(
    coefficients=jnp.where(rejected, 0.0, trials.coefficients[chosen]),
    damping=trials.dampings[chosen],
    next_damping=next_damping.astype(dtype),
    rho=chosen_rho,
    rejected=rejected,
    trial_loss=jnp.where(rejected, loss, losses[chosen]),
    trial=chosen,
  )
