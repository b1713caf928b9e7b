r"""Cognitive tasks from neurogym, trained as sofo_jax tasks.

`neurogym <https://neurogym.github.io>`_ collects the trial structures of
classic systems-neuroscience experiments (perceptual decision making,
context-dependent integration, working memory, ...) as Gymnasium
environments. For supervised training each environment defines, at every
time step :math:`t`, an observation :math:`x_t` and the correct action
:math:`c_t \in \{0, \dots, C - 1\}`, where action 0 means "keep fixating"
and the others are the responses. neurogym's ``Dataset`` concatenates
trials into sequences of ``seq_len`` steps.

The network (:class:`~sofo_jax.tasks.LeakyRNN`, ``tanh`` units, leak
:math:`\alpha = \Delta t / \tau`) reads :math:`x_t`, updates its state and
reports logits :math:`z_t = C h_{t+1} + d` over the :math:`C` actions. As
in neurogym's own examples, the loss is the softmax cross-entropy over all
time steps, fixation included:

.. math::

  L = \frac1T \sum_{t=0}^{T-1} \frac1B \sum_b
      \Big(\log \sum_k e^{z_{t,b,k}} - z_{t,b,c_{t,b}}\Big).

**Data.** neurogym generates trials with NumPy, outside JAX, so it cannot
run inside a jitted training step. :func:`make` therefore draws a fixed pool
of ``num_batches`` batches up front from neurogym's ``Dataset``, seeded with
``seed`` (:func:`generate`), and ``sample_batch(key)`` picks one of them
uniformly with ``jax.random.randint``. The pool lives on the device, so
``sample_batch`` is a pure, jit- and ``lax.scan``-compatible function, and
a run is reproducible from ``seed`` and the training key alone. Held-out
data come from :func:`generate` with another seed.

Batches are time-major: ``inputs`` has shape ``(seq_len, batch_size,
num_inputs)`` (float32) and ``labels`` has shape ``(seq_len, batch_size)``
(int32). Sequences start at a trial boundary and the network starts each
sequence from rest; trials within a sequence follow one another without a
reset, as in neurogym's examples.

The network can only learn when to respond if the inputs say when the
decision period comes. Many environments do (the fixation input turns off,
or the timing is fixed, as in ``PerceptualDecisionMaking-v0``,
``DelayComparison-v0``, ``DelayMatchSample-v0`` and ``GoNogo-v0``). In
neurogym 2.2's ``ContextDecisionMaking-v0`` the decision follows a random,
uncued delay: the network cannot know when to respond, and with Adam its
``decision_accuracy`` stayed below 1% after 1,600 updates.

Requires neurogym: ``pip install "sofo_jax[neurogym]"``. Importing
:mod:`sofo_jax` or :mod:`sofo_jax.tasks` does not import it; importing this
module does.

Example:
  >>> import jax
  >>> from sofo_jax.tasks import neurogym
  >>> task = neurogym.make(neurogym.Config.quick())
  >>> batch = task.sample_batch(jax.random.key(0))
  >>> batch["inputs"].shape, batch["labels"].shape, batch["labels"].dtype
  ((20, 4, 3), (20, 4), dtype('int32'))

References:
  Molano-Mazon, M. et al., "NeuroGym: An open resource for developing and
  sharing neuroscience tasks", PsyArXiv, 2022.

  Yu, Xia, Ma, Lengyel and Hennequin, "Second-order forward-mode optimization
  of recurrent neural networks for neuroscience", NeurIPS 2024.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sofo_jax import losses
from sofo_jax.tasks import _base
from sofo_jax.tasks._rnn import LeakyRNN

try:
  import neurogym as ngym  # pylint: disable=g-import-not-at-top
except ImportError as error:
  if error.name == "torch":
    # neurogym 2.3 imports torch without declaring it; say so rather than
    # let a missing torch look like a sofo_jax bug.
    reason = (
      "could not import neurogym: the installed version imports "
      "torch, which is missing (neurogym 2.3 does, without declaring "
      "it). Install the supported version (or torch) with:"
    )
  else:
    reason = "needs neurogym. Install it with:"
  raise ImportError(
    f'sofo_jax.tasks.neurogym {reason} pip install "sofo_jax[neurogym]"'
  ) from error

NAME = "neurogym"


@dataclasses.dataclass(frozen=True)
class Config(_base.TaskConfig):
  """Settings of a neurogym task.

  The step, sequence length, width and Adam's learning rate are those of
  neurogym's supervised-learning example for ``PerceptualDecisionMaking-v0``:
  100 ms steps, sequences of 100 steps (about 4.5 trials of 2.2 s), 64
  units, :math:`10^{-2}`.

  Attributes:
    env: neurogym environment id, e.g. ``"PerceptualDecisionMaking-v0"`` or
      ``"DelayComparison-v0"``.
    env_kwargs: further keyword arguments of ``neurogym.make`` (``timing``,
      ``sigma``, ...); ``dt`` is set by the field below.
    dt: time step in milliseconds.
    seq_len: length ``T`` of a sequence, in steps.
    num_hidden: number of ``tanh`` units.
    tau: membrane time constant in milliseconds; the leak is ``dt / tau``
      (``tau == dt`` gives a non-leaky vanilla RNN).
    gain: recurrent weight scale at initialisation.
    num_batches: number of batches in the pre-generated pool.
    seed: seed of neurogym's generator for the pool.
    batch_size, num_tangents, learning_rate, damping, adam_learning_rate: see
      :class:`sofo_jax.tasks.TaskConfig`, whose defaults hold unless set
      below.
  """

  env: str = "PerceptualDecisionMaking-v0"
  env_kwargs: Mapping[str, Any] | None = None
  dt: float = 100.0
  seq_len: int = 100
  num_hidden: int = 64
  tau: float = 200.0
  gain: float = 0.9
  num_batches: int = 128
  seed: int = 0
  batch_size: int = 32
  num_tangents: int = 64
  adam_learning_rate: float = 1e-2

  @classmethod
  def quick(cls, env: str = "PerceptualDecisionMaking-v0") -> Config:
    """A tiny configuration for tests: 8 units, a pool of 4 batches of 4 x 20
    steps, K = 8."""
    return cls(
      env=env, num_hidden=8, seq_len=20, num_batches=4, batch_size=4, num_tangents=8
    )


def _environment(config: Config):
  """The unwrapped neurogym environment (a ``neurogym.TrialEnv``)."""
  with warnings.catch_warnings():
    # Gymnasium's registry warns that neurogym's metadata lacks
    # `render_modes`; irrelevant for supervised data.
    warnings.filterwarnings("ignore", message=".*render_modes")
    env = ngym.make(config.env, dt=config.dt, **(config.env_kwargs or {}))
  # Unwrapped: the Dataset reads trial attributes (`new_trial`, `ob`, `gt`)
  # that Gymnasium's wrappers forward only with a deprecation warning.
  return env.unwrapped


def generate(
  config: Config, num_batches: int | None = None, seed: int | None = None
) -> dict[str, np.ndarray]:
  """Draws batches from neurogym's ``Dataset``, reproducibly.

  Each of the ``batch_size`` copies of the environment in the ``Dataset``
  gets its own generator, seeded with ``base + i`` where ``base`` is drawn
  from ``numpy.random.SeedSequence(seed)``, so different seeds give
  unrelated streams. The same arguments always return the same arrays.

  Args:
    config: task settings.
    num_batches: number of batches; default ``config.num_batches``.
    seed: generator seed; default ``config.seed``.

  Returns:
    ``{"inputs", "labels"}``: float32 inputs of shape ``(num_batches,
    seq_len, batch_size, num_inputs)`` and int32 labels of shape
    ``(num_batches, seq_len, batch_size)``, time-major within each batch.

  Example:
    >>> from sofo_jax.tasks import neurogym
    >>> data = neurogym.generate(neurogym.Config.quick(), num_batches=2)
    >>> data["inputs"].shape, data["labels"].shape
    ((2, 20, 4, 3), (2, 20, 4))
  """
  num_batches = config.num_batches if num_batches is None else num_batches
  seed = config.seed if seed is None else seed
  if not isinstance(num_batches, int) or num_batches < 1:
    raise ValueError(f"`num_batches` must be a positive int, got {num_batches!r}.")
  dataset = ngym.Dataset(
    _environment(config),
    batch_size=config.batch_size,
    seq_len=config.seq_len,
    batch_first=False,
  )
  if len(dataset.env.action_space.shape) != 0:
    raise ValueError(
      f"{config.env} has action space {dataset.env.action_space}; only "
      "discrete actions (integer labels) are supported."
    )
  base = int(np.random.SeedSequence(seed).generate_state(1)[0])
  dataset.seed(base % (2**32 - config.batch_size))
  # The Dataset fills its trial cache from unseeded generators when it is
  # built; refill it now that they are seeded.
  dataset._cache()  # pylint: disable=protected-access
  inputs, labels = zip(*(next(dataset) for _ in range(num_batches)))
  return {
    "inputs": np.stack(inputs).astype(np.float32),
    "labels": np.stack(labels).astype(np.int32),
  }


def make(config: Config = Config()) -> _base.Task:
  """Builds the :class:`~sofo_jax.tasks.Task` for a neurogym environment.

  Generates the pool of ``config.num_batches`` batches (see the module
  docstring); this runs neurogym's Python trial generator, a few seconds for
  the default 128 batches of 32 x 100 steps.

  Args:
    config: task settings.

  Returns:
    A task whose batches are ``{"inputs": (T, B, num_inputs), "labels":
    (T, B)}`` and whose ``metrics`` are ``loss`` (the cross-entropy, equal
    to the loss value), ``accuracy`` (fraction of all steps where the
    most likely action is the label) and ``decision_accuracy`` (the same,
    over the steps whose label is not fixation, 0: the responses). Its
    ``outputs`` (``logits`` and ``hidden``, time-major, with the batch's
    entries) take any number of sequences and need only ``inputs``.
  """
  _base.check_common(config)
  for name in ("seq_len", "num_hidden", "num_batches"):
    value = getattr(config, name)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
  for name in ("dt", "tau"):
    _base.check_positive(name, getattr(config, name))
  if config.dt > config.tau:
    raise ValueError(
      f"`dt` ({config.dt}) must not exceed `tau` "
      f"({config.tau}): the leak dt / tau must lie in (0, 1]."
    )
  pool = generate(config)
  pool_inputs = jnp.asarray(pool["inputs"])
  pool_labels = jnp.asarray(pool["labels"])
  env = _environment(config)
  num_inputs = env.observation_space.shape[0]
  num_actions = int(env.action_space.n)

  def build(key):
    return LeakyRNN(
      num_inputs,
      config.num_hidden,
      num_actions,
      leak=config.dt / config.tau,
      activation="tanh",
      gain=config.gain,
      key=key,
    )

  init_params, static = _base.partition_model(build)

  def sample_batch(key):
    index = jax.random.randint(key, (), 0, config.num_batches)
    return {"inputs": pool_inputs[index], "labels": pool_labels[index]}

  def loss_fn(params, batch):
    model = eqx.combine(params, static)
    total = model.accumulate(
      batch["inputs"], batch["labels"], losses.softmax_cross_entropy, losses.zero()
    )
    return total / batch["labels"].shape[0]

  def outputs(params, batch):
    logits, hidden = eqx.combine(params, static).run(batch["inputs"])
    return {**batch, "logits": logits, "hidden": hidden}

  def metrics(params, batch):
    def counts(logits, label):
      hit = jnp.argmax(logits, axis=-1) == label
      decision = label != 0
      return {
        "cross_entropy": jnp.sum(
          optax.softmax_cross_entropy_with_integer_labels(logits, label)
        ),
        "correct": jnp.sum(hit),
        "decision_correct": jnp.sum(hit & decision),
        "decisions": jnp.sum(decision),
      }

    zero = jnp.zeros(())
    # Summed inside the scan, so memory does not grow with seq_len.
    total = eqx.combine(params, static).accumulate(
      batch["inputs"],
      batch["labels"],
      counts,
      {
        name: zero
        for name in ("cross_entropy", "correct", "decision_correct", "decisions")
      },
    )
    count = batch["labels"].size
    return {
      "loss": total["cross_entropy"] / count,
      "accuracy": total["correct"] / count,
      "decision_accuracy": total["decision_correct"]
      / jnp.maximum(total["decisions"], 1.0),
    }

  return _base.Task(
    name=f"{NAME}/{config.env}",
    config=config,
    init_params=init_params,
    sample_batch=sample_batch,
    loss_fn=loss_fn,
    metrics=metrics,
    outputs=outputs,
  )
