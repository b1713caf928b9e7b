"""Training loops that drive any :mod:`sofo_jax.tasks` task with any method.

One harness for the demo, the benchmarks and the notebooks, so that SOFO,
Adam, forward-gradient descent and SGD are always compared the same way:
same initial parameters, same batches (drawn from the same key stream), the
loss recorded on each training batch before its update, and wall-clock time
measured on compiled code only (compilation is done before the clock starts).
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sofo_jax._src import forward_gradient as forward_gradient_lib
from sofo_jax._src import state_utils, transform

METHODS = ("sofo", "adam", "fgd", "sgd")

# Seconds between progress-bar refreshes when stderr is not a terminal.
LOG_REFRESH_SECONDS = 60.0

# Learning rates used when neither the caller nor the task says otherwise.
# SOFO's is the paper's; its adaptive step control makes it safe from a
# random initialisation. SGD's raw gradient needs a far smaller step: 1e-2
# was the best or next-to-best point of the benchmark grid on every task.
# Forward-gradient descent's update (P/K) Θ g̃ is noisier still (variance
# about P/K times the gradient's): at 1e-2 it diverged on the Kalman and
# double-reach tasks' quick sizes, at 1e-3 on none.
DEFAULT_LEARNING_RATES = {"sofo": 1.0, "fgd": 1e-3, "sgd": 1e-2}


# On an accelerator whose float32 matmuls JAX rounds by default, fit warns
# once when step control rejected at least this share of the last
# REJECTION_WINDOW SOFO steps. On an H200 at TF32 a run rejected four in
# five from step 500 on and its loss stopped falling; none did with float32
# matmuls. Not on a CPU, whose matmuls are float32: there no run on the
# library's tasks rejected more than three steps in 1000-1500, and a
# full-batch problem that has converged rejects every step, rightly.
REJECTION_WINDOW = 100
REJECTION_WARNING_SHARE = 0.5
# Matmul precisions at which float32 matmuls are not rounded.
_FULL_PRECISIONS = ("float32", "highest")
# fit also warns once when at least this share of the last REJECTION_WINDOW
# SOFO training losses were not finite. SOFO skips such a batch, so the run
# goes on, but the model is unstable on some inputs and learns nothing from
# them. At batch 4 and lr 1 it began after about 1,900 steps on the double
# reach's quick size, on about a tenth of the batches; runs that train well
# have none.
NONFINITE_WARNING_SHARE = 0.05
# fit also warns once when a finite SOFO training loss goes above SPIKE_RATIO
# times the first: the benchmarks' bar for a blow-up. On the library's RNN
# tasks such a spike came from a step that made the network unstable on
# inputs its own batch did not hold; the run usually recovered, but one
# Kalman run's final parameters were unstable on held-out batches (loss
# 1,506 against 0.67), which the training curve alone did not show.
SPIKE_RATIO = 3.0
# fit's validation batches come from fold_in(key, VALIDATION_STREAM), a
# stream apart from the (initialisation, batches, tangents) split of the
# same key, so asking for validation changes nothing else in a run.
VALIDATION_STREAM = 0x5EED


@dataclasses.dataclass
class History:
  """What a training run recorded.

  Attributes:
    method: the method's name.
    losses: training-batch loss before each update, shape ``(num_steps,)``
      (fewer steps if ``fit``'s ``max_seconds`` ended the run).
    seconds: wall-clock seconds elapsed after each step (compilation
      excluded), shape ``(num_steps,)``.
    params: the final parameters.
    settings: the hyperparameters used.
    num_nonfinite_steps: steps skipped for non-finite values (forward-mode
      methods; 0 for the others).
    step_rejected: per step, whether step control rejected that update
      (SOFO only; all False for the other methods), shape ``(num_steps,)``.
    step_reverted: per step, whether that update undid the previous step
      because its loss on this step's batch was far above the loss before
      it (the next-batch check); ``losses`` at such a step is the spike
      that was undone. Shape ``(num_steps,)``.
    validation_losses: with ``fit(..., validation_batches=N)``, the mean
      loss on the N fixed validation batches after each compiled chunk,
      shape ``(num_chunks,)``; else None.
    validation_steps: the number of updates done at each of those
      evaluations, shape ``(num_chunks,)``; else None.
    best_params: the parameters at the evaluation with the lowest finite
      validation loss; None without validation, or if no evaluation gave a
      finite loss. A late spike can leave the final parameters unstable on
      inputs the last batches did not hold; these are the parameters to
      keep.
    best_step: the number of updates done at that evaluation, or None.
  """

  method: str
  losses: np.ndarray
  seconds: np.ndarray
  params: Any
  settings: dict
  num_nonfinite_steps: int = 0
  step_rejected: np.ndarray | None = None
  step_reverted: np.ndarray | None = None
  validation_losses: np.ndarray | None = None
  validation_steps: np.ndarray | None = None
  best_params: Any = None
  best_step: int | None = None


def warmup(peak: float | jax.Array, warmup_steps: int) -> optax.ScalarOrSchedule:
  """A learning rate that ramps linearly from ``peak / 10`` to ``peak``.

  .. math::

      \\eta_t = \\eta \\left(0.1 + 0.9 \\min(t / t_w, 1)\\right).

  SOFO's first exact, lightly damped Gauss–Newton steps from a random
  initialisation can overshoot; a short warm-up lets it run at the paper's
  learning rate of 1 afterwards.

  This is ``optax.linear_schedule(0.1 * peak, peak, warmup_steps)`` except
  for ``warmup_steps=0``, where optax's schedule would stay at
  ``0.1 * peak`` for ever and this returns ``peak``. For other shapes (a
  decay after the warm-up, say) compose optax's schedules directly, e.g.
  ``optax.join_schedules``.

  Args:
    peak: the learning rate after the warm-up (may be a traced scalar).
    warmup_steps: :math:`t_w`; ``0`` returns ``peak`` itself.

  Returns:
    ``peak``, or an optax schedule.

  Example:
    >>> from sofo_jax import training
    >>> schedule = training.warmup(1.0, 30)
    >>> round(float(schedule(0)), 6), float(schedule(30))
    (0.1, 1.0)
  """
  if warmup_steps < 1:
    return peak
  return optax.linear_schedule(0.1 * peak, peak, transition_steps=warmup_steps)


def make_optimizer(
  method: str,
  *,
  learning_rate: optax.ScalarOrSchedule,
  key: jax.Array | None = None,
  num_tangents: int | None = None,
  damping: float | None = None,
  **sofo_options,
) -> optax.GradientTransformationExtraArgs:
  """The optimizer behind a method name.

  Args:
    method: ``"sofo"``, ``"adam"``, ``"fgd"`` (forward-gradient descent) or
      ``"sgd"``.
    learning_rate: the step size, a float or an optax schedule.
    key: PRNG key for the forward-mode methods.
    num_tangents: K for the forward-mode methods.
    damping: SOFO's relative damping (its starting value with adaptive step
      control); ``None``: :func:`sofo_jax.sofo`'s default.
    **sofo_options: further keyword arguments of :func:`sofo_jax.sofo`
      (``adaptive``, ``step_control``, ``tangent_distribution``, ...).

  Returns:
    An optax transformation.

  Example:
    >>> import jax
    >>> opt = make_optimizer("sofo", learning_rate=1.0, key=jax.random.key(0),
    ...                      num_tangents=8)
  """
  if sofo_options and method != "sofo":
    raise ValueError(
      f"Options {sorted(sofo_options)} apply to SOFO only, not {method!r}."
    )
  # A key or num_tangents left as None goes on to the optimizer's own checks,
  # whose errors say what to pass.
  if method == "sofo":
    if damping is not None:
      sofo_options["damping"] = damping
    return transform.sofo(learning_rate, num_tangents, key=key, **sofo_options)  # type: ignore[arg-type]
  if method == "fgd":
    return forward_gradient_lib.forward_gradient(learning_rate, num_tangents, key=key)  # type: ignore[arg-type]
  if method == "adam":
    return optax.with_extra_args_support(optax.adam(learning_rate))
  if method == "sgd":
    return optax.with_extra_args_support(optax.sgd(learning_rate))
  raise ValueError(f"method must be one of {METHODS}; got {method!r}.")


def _uses_forward_mode(method: str) -> bool:
  return method in ("sofo", "fgd")


def make_train_step(task, method: str, optimizer) -> Callable:
  """``(params, state, batch_key) -> ((params, state), loss)`` for one step."""

  def step(carry, batch_key):
    params, state = carry
    batch = task.sample_batch(batch_key)
    closure = lambda p: task.loss_fn(p, batch)
    if _uses_forward_mode(method):
      updates, state = optimizer.update(None, state, params, loss_fn=closure)
      loss = state_utils.get_diagnostics(state).loss
    else:
      loss, grads = jax.value_and_grad(lambda p: closure(p).value)(params)
      updates, state = optimizer.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), loss

  return step


def fit(
  task,
  method: str = "sofo",
  num_steps: int = 100,
  *,
  key: jax.Array,
  learning_rate: optax.ScalarOrSchedule | None = None,
  num_tangents: int | None = None,
  damping: float | None = None,
  chunk_size: int | None = None,
  max_seconds: float | None = None,
  progress: bool = True,
  params: Any = None,
  validation_batches: int = 0,
  **sofo_options,
) -> History:
  """Trains ``task`` with ``method`` for ``num_steps`` steps.

  Steps run in jitted ``lax.scan`` chunks; a tqdm progress bar (if tqdm is
  installed and ``progress``) advances per chunk. Unspecified settings are
  the library's defaults: SOFO at learning rate 1 with adaptive step control
  and its default damping, FGD and SGD at :data:`DEFAULT_LEARNING_RATES`,
  Adam at the task's ``config.adam_learning_rate``, K from
  ``config.num_tangents``. (The task configs' ``learning_rate`` and
  ``damping`` are the paper's fixed-damping settings; pass them explicitly,
  with ``adaptive=False``, to reproduce the paper's optimiser.)

  Args:
    task: a :class:`sofo_jax.tasks.Task`.
    method: one of :data:`METHODS`.
    num_steps: number of updates.
    key: PRNG key; it is split into (initialisation, batches, tangents), so
      every method sees the same initial parameters and batches.
    learning_rate: overrides the config's; a float or an optax schedule
      (e.g. a warm-up, ``optax.linear_schedule``).
    num_tangents: overrides the config's K.
    damping: SOFO's (starting) damping.
    chunk_size: steps per compiled chunk (default: about 20 chunks).
    max_seconds: a wall-clock budget for training (compilation excluded):
      no chunk starts once it is spent, so the run may end before
      ``num_steps``, at a chunk boundary and after at least one chunk. The
      returned history holds the steps that ran. For comparisons at equal
      wall-clock time.
    progress: show a progress bar.
    params: start from these parameters instead of a fresh initialisation.
    validation_batches: N > 0 draws N fixed batches that no step trains on
      (from ``jax.random.fold_in(key, VALIDATION_STREAM)``, so the run is
      otherwise unchanged), evaluates the mean loss on them after every
      chunk (outside the timed region), and keeps the parameters where it
      was lowest: :attr:`History.best_params`. Costs N forward passes per
      chunk.
    **sofo_options: further keyword arguments of :func:`sofo_jax.sofo`.

  Returns:
    A :class:`History`.

  Warns:
    RuntimeWarning: once, on a GPU or TPU at JAX's default matmul
      precision, if SOFO's step control rejected at least
      :data:`REJECTION_WARNING_SHARE` of the last :data:`REJECTION_WINDOW`
      steps (see :attr:`History.step_rejected`); the message says what to
      try. And once, anywhere, if at least :data:`NONFINITE_WARNING_SHARE`
      of the last :data:`REJECTION_WINDOW` SOFO training losses were not
      finite (those steps are skipped). And once, at the first finite SOFO
      training loss above :data:`SPIKE_RATIO` times a positive first loss,
      with what removed such spikes on the library's tasks.

  Example:
    >>> import jax
    >>> from sofo_jax import training
    >>> from sofo_jax.tasks import flip_flop
    >>> task = flip_flop.make(flip_flop.Config.quick())
    >>> history = training.fit(task, "sofo", 4, key=jax.random.key(0),
    ...                        progress=False)
    >>> history.losses.shape
    (4,)
  """
  config = task.config
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
  if learning_rate is None:
    learning_rate = (
      config.adam_learning_rate if method == "adam" else DEFAULT_LEARNING_RATES[method]
    )
  if num_tangents is None:
    num_tangents = config.num_tangents
  if max_seconds is not None and not max_seconds >= 0:
    raise ValueError(f"max_seconds must be >= 0 or None; got {max_seconds!r}.")
  if (
    isinstance(validation_batches, bool)
    or not isinstance(validation_batches, int)
    or validation_batches < 0
  ):
    raise ValueError(
      f"validation_batches must be an int >= 0; got {validation_batches!r}."
    )
  init_key, data_key, tangent_key = jax.random.split(key, 3)
  optimizer = make_optimizer(
    method,
    learning_rate=learning_rate,
    key=tangent_key,
    num_tangents=num_tangents,
    damping=damping,
    **sofo_options,
  )
  if params is None:
    params = task.init_params(init_key)
  state = optimizer.init(params)
  step = make_train_step(task, method, optimizer)

  def recorded_step(carry, batch_key):
    carry, loss = step(carry, batch_key)
    if method == "sofo":
      # "sofo" always holds scale_by_sofo's state, never forward_gradient's.
      diagnostics = cast(
        transform.SofoDiagnostics, state_utils.get_diagnostics(carry[1])
      )
      return carry, (loss, diagnostics.step_rejected, diagnostics.step_reverted)
    return carry, (loss, jnp.array(False), jnp.array(False))

  chunk_size = chunk_size or max(1, -(-num_steps // 20))
  run_chunk = jax.jit(lambda carry, keys: jax.lax.scan(recorded_step, carry, keys))
  batch_keys = jax.random.split(data_key, num_steps)

  # Compile every chunk shape before the clock (and the progress bar) start.
  carry = (params, state)
  starts = range(0, num_steps, chunk_size)
  compiled = {}
  for start in starts:
    keys = batch_keys[start : start + chunk_size]
    if keys.shape[0] not in compiled:
      compiled[keys.shape[0]] = run_chunk.lower(carry, keys).compile()
  validation = _Validation(task, key, validation_batches, params)
  losses: list[np.ndarray] = []
  rejected, reverted, seconds, elapsed = [], [], [], 0.0
  warned = warned_nonfinite = warned_spike = False
  bar = _progress_bar(num_steps, f"{task.name}/{method}", progress)
  for start in starts:
    if max_seconds is not None and losses and elapsed >= max_seconds:
      break
    keys = batch_keys[start : start + chunk_size]
    size = keys.shape[0]
    begin = time.perf_counter()
    carry, (chunk_losses, chunk_rejected, chunk_reverted) = compiled[size](carry, keys)
    jax.block_until_ready(carry)
    spent = time.perf_counter() - begin
    losses.append(np.asarray(chunk_losses))
    rejected.append(np.asarray(chunk_rejected))
    if not warned and _matmuls_rounded():
      count = _count_in_last_window(rejected)
      warned = count >= REJECTION_WARNING_SHARE * REJECTION_WINDOW
      if warned:
        _warn_many_rejections(count)
    if not warned_nonfinite and method == "sofo":
      count = _count_in_last_window(losses, lambda chunk: ~np.isfinite(chunk))
      warned_nonfinite = count >= NONFINITE_WARNING_SHARE * REJECTION_WINDOW
      if warned_nonfinite:
        _warn_nonfinite_losses(count)
    reverted.append(np.asarray(chunk_reverted))
    if not warned_spike and method == "sofo":
      first = float(losses[0][0])
      spike = _first_spike(losses[-1], first)
      if spike is not None:
        warned_spike = True
        _warn_spike(
          start + spike,
          float(losses[-1][spike]),
          first,
          bool(reverted[-1][spike]),
          sofo_options.get("adaptive", True),
        )
    seconds.append(elapsed + spent * np.arange(1, size + 1) / size)
    elapsed += spent
    validation.record(carry[0], start + size)
    if bar is not None:
      bar.update(size)
      bar.set_postfix(loss=f"{float(chunk_losses[-1]):.4g}", refresh=False)
  if bar is not None:
    bar.close()
  params, state = carry
  nonfinite = 0
  if _uses_forward_mode(method):
    nonfinite = int(state_utils.get_diagnostics(state).num_nonfinite_steps)
  return History(
    method=method,
    losses=np.concatenate(losses),
    seconds=np.concatenate(seconds),
    params=params,
    settings={
      "learning_rate": learning_rate,
      "num_tangents": num_tangents if _uses_forward_mode(method) else None,
      "damping": damping if method == "sofo" else None,
      "num_steps": num_steps,
      **sofo_options,
    },
    num_nonfinite_steps=nonfinite,
    step_rejected=np.concatenate(rejected),
    step_reverted=np.concatenate(reverted),
    **validation.results(),
  )


class _Validation:
  """fit's validation: the mean loss on fixed batches, and the best parameters."""

  def __init__(self, task, key: jax.Array, num_batches: int, params: Any):
    self.enabled = num_batches > 0
    self.losses: list[float] = []
    self.steps: list[int] = []
    self.best_params: Any = None
    self.best_step: int | None = None
    if not self.enabled:
      return
    keys = jax.random.split(jax.random.fold_in(key, VALIDATION_STREAM), num_batches)

    def mean_loss(params):
      # The batches are drawn again from their keys at each evaluation
      # rather than held: cheap next to the forward passes, and no batch
      # has to stay in memory.
      return jnp.mean(
        jax.lax.map(lambda k: task.loss_value(params, task.sample_batch(k)), keys)
      )

    # Compiled before fit's clock starts, like the training chunks.
    self._mean_loss = jax.jit(mean_loss).lower(params).compile()

  def record(self, params: Any, step: int) -> None:
    if not self.enabled:
      return
    loss = float(self._mean_loss(params))
    self.losses.append(loss)
    self.steps.append(step)
    best = min((v for v in self.losses[:-1] if np.isfinite(v)), default=np.inf)
    if np.isfinite(loss) and loss < best:
      self.best_params = params
      self.best_step = step

  def results(self) -> dict:
    if not self.enabled:
      return {}
    return {
      "validation_losses": np.asarray(self.losses),
      "validation_steps": np.asarray(self.steps),
      "best_params": self.best_params,
      "best_step": self.best_step,
    }


def _count_in_last_window(chunks: list[np.ndarray], flag=np.asarray) -> int:
  """How many of the last :data:`REJECTION_WINDOW` recorded steps ``flag`` marks.

  0 until that many steps are recorded, so no warning comes from fewer.
  """
  # Each chunk holds at least one step, so the last WINDOW chunks cover the
  # last WINDOW steps.
  recent = np.concatenate(chunks[-REJECTION_WINDOW:])[-REJECTION_WINDOW:]
  return int(np.sum(flag(recent))) if recent.size == REJECTION_WINDOW else 0


def _warn_nonfinite_losses(count: int) -> None:
  warnings.warn(
    f"{count} of the last {REJECTION_WINDOW} training batches gave a"
    " non-finite loss. SOFO skipped those steps (History.num_nonfinite_steps"
    " counts them), so the parameters are finite, but the model is unstable"
    " on some inputs and cannot learn from them. With small batches at"
    " learning rate 1, SOFO fits each batch's noise and its parameters"
    " drift: use a larger batch, or learning_rate=0.1. See 'Very small"
    " batches over long runs' in docs/getting_started.md.",
    RuntimeWarning,
    stacklevel=3,
  )


def _first_spike(chunk: np.ndarray, first: float) -> int | None:
  """Index of the chunk's first finite loss above :data:`SPIKE_RATIO` × ``first``.

  None if there is none, or if ``first`` is not a positive number (a loss
  that can be negative has no scale to compare with). Non-finite losses have
  their own warning.
  """
  if not (np.isfinite(first) and first > 0):
    return None
  above = np.flatnonzero(np.isfinite(chunk) & (chunk > SPIKE_RATIO * first))
  return int(above[0]) if above.size else None


def _warn_spike(
  step: int, loss: float, first: float, undone: bool, adaptive: bool
) -> None:
  if not adaptive:
    advice = (
      "SOFO runs without step control (adaptive=False, the paper's fixed"
      " damping), which at learning rate 1 from a random initialisation"
      " overshoots on most of the library's tasks: use the defaults, or warm"
      " the learning rate up (training.warmup). See 'Choosing settings' in"
      " docs/getting_started.md."
    )
  else:
    cause = (
      "The next-batch check undid the step before it: that step had made"
      " the model unstable on inputs its own batch did not hold."
      if undone
      else "Nothing was undone: the parameters before the last step did"
      " about as badly on this batch, or the next-batch check is off."
    )
    advice = (
      f"{cause} Runs usually recover, but the final parameters can stay"
      " unstable on inputs the last batches did not hold: check them on"
      " held-out batches (validation_batches=N keeps History.best_params)."
      " On the library's recurrent tasks a larger batch (four times as"
      " large) removed such spikes, and so, on the Kalman task, did"
      " learning_rate=0.3. See 'Late spikes on a fresh batch' in"
      " docs/getting_started.md."
    )
  warnings.warn(
    f"At step {step} SOFO's training loss was {loss / first:.3g} times the"
    f" first ({loss:.4g} against {first:.4g}). {advice}",
    RuntimeWarning,
    stacklevel=3,
  )


def _matmuls_rounded() -> bool:
  """Whether JAX may round float32 matmul operands here (TF32, bfloat16)."""
  precision = jax.config.jax_default_matmul_precision  # type: ignore[attr-defined]
  return jax.default_backend() != "cpu" and precision not in _FULL_PRECISIONS


def _warn_many_rejections(count: int) -> None:
  warnings.warn(
    f"SOFO's step control rejected {count} of the last {REJECTION_WINDOW}"
    " steps: the steps it proposes no longer lower the loss on their own"
    f" batches. On a {jax.default_backend().upper()}, JAX's default float32 matmuls"
    " round their operands (TF32 on recent NVIDIA GPUs), and near a plateau"
    " that rounding in the sketch can make most steps fail and stall"
    ' training: train under jax.default_matmul_precision("float32"). (On a'
    " full-batch problem it can also mean the loss has converged.) See"
    " 'Many rejected steps on a GPU' in docs/getting_started.md.",
    RuntimeWarning,
    stacklevel=3,
  )


def _progress_bar(total: int, description: str, enabled: bool):
  if not enabled:
    return None
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  # A terminal or a notebook redraws the bar in place; in a log file every
  # redraw is a new line, so there it refreshes at most once a minute.
  redraws_in_place = sys.stderr.isatty() or "ipykernel" in sys.modules
  return tqdm(
    total=total,
    desc=description,
    leave=False,
    mininterval=0.1 if redraws_in_place else LOG_REFRESH_SECONDS,
  )


def evaluate(task, params: Any, *, key: jax.Array, num_batches: int = 1) -> dict:
  """Mean of ``task.metrics`` (and the loss) over fresh batches.

  Example:
    >>> import jax
    >>> from sofo_jax import training
    >>> from sofo_jax.tasks import flip_flop
    >>> task = flip_flop.make(flip_flop.Config.quick())
    >>> params = task.init_params(jax.random.key(0))
    >>> "loss" in training.evaluate(task, params, key=jax.random.key(1))
    True
  """

  @jax.jit
  def one(k):
    batch = task.sample_batch(k)
    return {"loss": task.loss_fn(params, batch).value, **task.metrics(params, batch)}

  results = [one(k) for k in jax.random.split(key, num_batches)]
  return {
    name: float(jnp.mean(jnp.stack([r[name] for r in results]))) for name in results[0]
  }
