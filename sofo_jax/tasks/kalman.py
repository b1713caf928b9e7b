r"""Adaptive Kalman filtering of a switching Ornstein–Uhlenbeck latent.

Generative process, per trial. A one-dimensional latent :math:`x_t` follows an
Euler-discretised Ornstein–Uhlenbeck process whose parameters
:math:`(\tau, \mu, r)` change at random times, and is observed in Gaussian
noise:

.. math::

  x_{t+1} = x_t + \frac{\mu - x_t}{\tau} + q_\tau\, \xi_t, \qquad
  q_\tau = s \sqrt{2/\tau - 1/\tau^2}, \qquad
  y_t = x_t + r\, \varepsilon_t,

with :math:`\xi_t, \varepsilon_t \sim \mathcal N(0, 1)`. The noise scale
:math:`q_\tau` makes the stationary standard deviation equal to ``latent_std``
:math:`s` for every :math:`\tau`. At :math:`t = 0`, and afterwards at any step
at least ``min_interval`` steps after the previous change with probability
``switch_prob``, the parameters are redrawn uniformly,
:math:`\tau \sim U[1, 10]`, :math:`\mu \sim U[-3, 3]`, :math:`r \sim U[0.1,
3]`, and the latent restarts from its new stationary distribution,
:math:`x_t \sim \mathcal N(\mu, s^2)`. Generation is a ``lax.scan`` over time:
cost and memory are :math:`O(T)`, so horizons of :math:`10^4` steps and more
are cheap.

The network (:class:`~sofo_jax.tasks.LeakyRNN`, 100 ReLU units, leak 0.25)
reads :math:`y_t`, updates its state and reports an estimate
:math:`\hat x_t = C h_{t+1} + d`. The loss is the squared error averaged over
time, :math:`L = \frac1T\sum_t \frac1B\sum_b (\hat x_{t,b} - x_{t,b})^2`.

The floor is the Kalman filter that knows the true parameters and the change
times, :func:`kalman_filter`: it is the minimum-MSE causal estimator, so no
network can beat it in expectation. With the default settings its MSE is
0.49 (measured on 4096 trials of 500 steps, and on 1024 trials of 5000
steps). A filter that knows the change times and the mean but uses randomly
drawn :math:`\tau` and :math:`r` (redrawn per segment, stored in the batch as
``random_tau`` and ``random_noise_std``) gets about 0.95; reporting the
observation itself as the estimate gets :math:`E[r^2] \approx 3.1`.

Batches are time-major: ``observations`` and ``latent`` have shape
``(T, batch, 1)``; ``tau``, ``mean``, ``noise_std``, ``switch`` (bool),
``random_tau`` and ``random_noise_std`` have shape ``(T, batch)``.

Example:
  >>> import jax
  >>> from sofo_jax.tasks import kalman
  >>> config = kalman.Config.quick()
  >>> batch = kalman.generate(jax.random.key(0), config)
  >>> floor = kalman.kalman_mse(batch, config)   # the best achievable MSE
  >>> bool(floor < kalman.observation_mse(batch))
  True

References:
  Kalman, R. E., "A new approach to linear filtering and prediction
  problems", Journal of Basic Engineering, 1960.

  Yu, Xia, Ma, Lengyel and Hennequin, "Second-order forward-mode optimization
  of recurrent neural networks for neuroscience", NeurIPS 2024.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from sofo_jax import losses
from sofo_jax.tasks import _base
from sofo_jax.tasks._rnn import LeakyRNN

NAME = "kalman"


@dataclasses.dataclass(frozen=True)
class Config(_base.TaskConfig):
  """Settings of the adaptive Kalman filtering task (defaults: the paper's).

  Attributes:
    num_hidden: number of ReLU units.
    leak: network leak ``dt / tau``.
    num_steps: horizon ``T``.
    tau_range: range of the latent time constant (steps).
    mean_range: range of the latent mean.
    noise_std_range: range of the observation noise standard deviation.
    latent_std: stationary standard deviation ``s`` of the latent.
    min_interval: minimum number of steps between parameter changes.
    switch_prob: per-step probability of a change once ``min_interval`` steps
      have passed (so segments last ``min_interval + Geometric(p) - 1``).
    gain: recurrent weight scale at initialisation.
    batch_size, num_tangents, learning_rate, damping, adam_learning_rate: see
      :class:`sofo_jax.tasks.TaskConfig`, whose defaults hold unless set
      below.
  """

  num_hidden: int = 100
  leak: float = 0.25
  num_steps: int = 500
  tau_range: tuple[float, float] = (1.0, 10.0)
  mean_range: tuple[float, float] = (-3.0, 3.0)
  noise_std_range: tuple[float, float] = (0.1, 3.0)
  latent_std: float = 1.0
  min_interval: int = 100
  switch_prob: float = 0.01
  gain: float = 0.9
  learning_rate: float = 0.1
  damping: float = 1e-3

  @classmethod
  def quick(cls) -> Config:
    """A tiny configuration for tests: 8 units, 4 trials of 30 steps.

    Not for long runs: see :mod:`sofo_jax.tasks`.
    """
    return cls(
      num_hidden=8,
      num_steps=30,
      min_interval=5,
      switch_prob=0.2,
      batch_size=4,
      num_tangents=8,
    )


def _process_noise_std(tau: Array, latent_std: float) -> Array:
  return latent_std * jnp.sqrt(2.0 / tau - 1.0 / jnp.square(tau))


def generate(key: PRNGKeyArray, config: Config) -> dict[str, Array]:
  """Samples latent trajectories, observations and the generating parameters.

  Args:
    key: PRNG key.
    config: task settings.

  Returns:
    A dict of time-major arrays, see the module docstring.
  """
  b = config.batch_size

  def uniform(u, bounds):
    low, high = bounds
    return low + (high - low) * u

  def step(carry, key):
    x, tau, mean, noise_std, r_tau, r_noise_std, age, t = carry
    k_u, k_n = jax.random.split(key)
    u = jax.random.uniform(k_u, (6, b))
    n = jax.random.normal(k_n, (3, b))
    age = age + 1
    switch = (t == 0) | ((age >= config.min_interval) & (u[0] < config.switch_prob))
    tau = jnp.where(switch, uniform(u[1], config.tau_range), tau)
    mean = jnp.where(switch, uniform(u[2], config.mean_range), mean)
    noise_std = jnp.where(switch, uniform(u[3], config.noise_std_range), noise_std)
    r_tau = jnp.where(switch, uniform(u[4], config.tau_range), r_tau)
    r_noise_std = jnp.where(switch, uniform(u[5], config.noise_std_range), r_noise_std)
    age = jnp.where(switch, 0, age)
    drift = x + (mean - x) / tau + _process_noise_std(tau, config.latent_std) * n[0]
    x = jnp.where(switch, mean + config.latent_std * n[1], drift)
    y = x + noise_std * n[2]
    out = {
      "observations": y[:, None],
      "latent": x[:, None],
      "tau": tau,
      "mean": mean,
      "noise_std": noise_std,
      "switch": switch,
      "random_tau": r_tau,
      "random_noise_std": r_noise_std,
    }
    return (x, tau, mean, noise_std, r_tau, r_noise_std, age, t + 1), out

  ones = jnp.ones((b,))
  init = (
    0.0 * ones,
    ones,
    0.0 * ones,
    ones,
    ones,
    ones,
    jnp.zeros((b,), jnp.int32),
    jnp.zeros((), jnp.int32),
  )
  _, batch = jax.lax.scan(step, init, _base.time_keys(key, config.num_steps))
  return batch


# Time first, then any batch shape. A name, not an inline string, because
# "t *b" parses as a Python expression and linters would read it as one.
_TIME_BATCH = "t *b"


def kalman_filter(
  observations: Float[Array, _TIME_BATCH],
  tau: Float[Array, _TIME_BATCH],
  mean: Float[Array, _TIME_BATCH],
  noise_std: Float[Array, _TIME_BATCH],
  switch: Bool[Array, _TIME_BATCH],
  latent_std: float = 1.0,
) -> tuple[Float[Array, _TIME_BATCH], Float[Array, _TIME_BATCH]]:
  r"""Kalman filter for the switching Ornstein–Uhlenbeck process.

  At a change (``switch``) the prior on :math:`x_t` is the new stationary
  distribution :math:`\mathcal N(\mu_t, s^2)`; otherwise it is the prediction
  :math:`m^- = a m + \mu/\tau`, :math:`P^- = a^2 P + q_\tau^2` with
  :math:`a = 1 - 1/\tau`. The update with :math:`y_t` is
  :math:`k = P^-/(P^- + r^2)`, :math:`m = m^- + k (y_t - m^-)`,
  :math:`P = (1 - k) P^-`. Parameters are read at each step, so the same
  function runs the true-parameter filter and mis-specified ones.

  Args:
    observations: :math:`y_t`, time-major (a trailing feature axis of size 1,
      if any, must be squeezed first).
    tau: time constant the filter assumes at each step.
    mean: latent mean the filter assumes at each step.
    noise_std: observation noise standard deviation the filter assumes.
    switch: whether the parameters change at each step (true at ``t = 0``).
    latent_std: stationary standard deviation :math:`s`.

  Returns:
    Filtered means :math:`E[x_t \mid y_{0:t}]` and variances, same shape as
    ``observations``.
  """

  def step(carry, xs):
    m, p = carry
    y, tau_t, mean_t, r_t, switch_t = xs
    a = 1.0 - 1.0 / tau_t
    m_prior = jnp.where(switch_t, mean_t, a * m + mean_t / tau_t)
    p_prior = jnp.where(
      switch_t,
      latent_std**2,
      a * a * p + jnp.square(_process_noise_std(tau_t, latent_std)),
    )
    gain = p_prior / (p_prior + jnp.square(r_t))
    m = m_prior + gain * (y - m_prior)
    p = (1.0 - gain) * p_prior
    return (m, p), (m, p)

  init = (jnp.zeros_like(observations[0]), jnp.ones_like(observations[0]))
  _, (means, variances) = jax.lax.scan(
    step, init, (observations, tau, mean, noise_std, switch)
  )
  return means, variances


def kalman_mse(
  batch: dict[str, Array], config: Config, random_parameters: bool = False
) -> Array:
  """MSE of the Kalman filter on a batch: the floor a network should approach.

  Args:
    batch: a batch from :func:`generate`.
    config: the task settings it was generated with.
    random_parameters: if true, the filter uses the batch's randomly drawn
      ``random_tau`` and ``random_noise_std`` instead of the true ones (it
      still knows the mean and the change times).

  Returns:
    Mean over time and batch of the squared error of the filtered mean.
  """
  prefix = "random_" if random_parameters else ""
  means, _ = kalman_filter(
    batch["observations"][..., 0],
    batch[prefix + "tau"],
    batch["mean"],
    batch[prefix + "noise_std"],
    batch["switch"],
    config.latent_std,
  )
  return jnp.mean(jnp.square(means - batch["latent"][..., 0]))


def observation_mse(batch: dict[str, Array]) -> Array:
  """MSE of reporting the raw observation as the estimate."""
  return jnp.mean(jnp.square(batch["observations"] - batch["latent"]))


def make(config: Config = Config()) -> _base.Task:
  """Builds the adaptive Kalman filtering :class:`~sofo_jax.tasks.Task`.

  Args:
    config: task settings.

  Returns:
    A task whose ``metrics`` are ``mse`` (the loss value), ``kalman_mse`` (the
    true-parameter filter's floor), ``mse_ratio`` (``mse / kalman_mse``, 1 is
    optimal), ``random_kalman_mse`` and ``observation_mse``.
  """
  _base.check_common(config)
  for name in ("num_hidden", "num_steps", "latent_std"):
    _base.check_positive(name, getattr(config, name))
  if config.min_interval < 1:
    raise ValueError(f"`min_interval` must be at least 1, got {config.min_interval}.")
  if not 0.0 <= config.switch_prob <= 1.0:
    raise ValueError(f"`switch_prob` must lie in [0, 1], got {config.switch_prob!r}.")
  if not config.tau_range[0] >= 1.0:
    # a = 1 - 1/tau must stay in [0, 1) for a stable, well-defined process.
    raise ValueError(f"`tau_range` must start at 1 or above, got {config.tau_range!r}.")
  if not config.noise_std_range[0] > 0.0:
    raise ValueError(
      f"`noise_std_range` must be positive, got {config.noise_std_range!r}."
    )

  def build(key):
    return LeakyRNN(
      1,
      config.num_hidden,
      1,
      leak=config.leak,
      activation="relu",
      gain=config.gain,
      key=key,
    )

  init_params, static = _base.partition_model(build)

  def sample_batch(key):
    return generate(key, config)

  def loss_fn(params, batch):
    model = eqx.combine(params, static)
    total = model.accumulate(
      batch["observations"], batch["latent"], losses.mse, losses.zero()
    )
    return total / config.num_steps

  def network_mse(params, batch):
    model = eqx.combine(params, static)
    total = model.accumulate(
      batch["observations"],
      batch["latent"],
      lambda y, x: jnp.sum(jnp.square(y - x)),
      jnp.zeros(()),
    )
    return total / (config.num_steps * config.batch_size)

  def metrics(params, batch):
    mse = network_mse(params, batch)
    floor = kalman_mse(batch, config)
    return {
      "mse": mse,
      "kalman_mse": floor,
      "mse_ratio": mse / floor,
      "random_kalman_mse": kalman_mse(batch, config, True),
      "observation_mse": observation_mse(batch),
    }

  def outputs(params, batch):
    estimates, _ = eqx.combine(params, static).run(batch["observations"])
    kalman_means, kalman_vars = kalman_filter(
      batch["observations"][..., 0],
      batch["tau"],
      batch["mean"],
      batch["noise_std"],
      batch["switch"],
      config.latent_std,
    )
    return {
      "estimates": estimates,
      "kalman_means": kalman_means[..., None],
      "kalman_variances": kalman_vars[..., None],
      "latent": batch["latent"],
      "observations": batch["observations"],
    }

  return _base.Task(
    name=NAME,
    config=config,
    init_params=init_params,
    sample_batch=sample_batch,
    loss_fn=loss_fn,
    metrics=metrics,
    outputs=outputs,
  )
