"""A vanilla leaky rate RNN, the model shared by the recurrent tasks."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from sofo_jax import losses

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
  "tanh": jnp.tanh,
  "relu": jax.nn.relu,
}


def _is_loss(node: Any) -> bool:
  return isinstance(node, losses.Loss)


class LeakyRNN(eqx.Module):
  r"""Discrete-time leaky rate network with a linear readout.

  .. math::

    h_{t+1} = (1 - \alpha)\, h_t + \alpha\, \phi(W h_t + U x_t + b),
    \qquad y_t = C h_t + d,

  with leak :math:`\alpha = \Delta t / \tau` and :math:`\phi` either ``tanh``
  or ``relu``. This is the Euler discretisation of
  :math:`\tau \dot h = -h + \phi(W h + U x + b)`.

  Initialisation: :math:`W_{ij} \sim \mathcal N(0, g^2/n)` with gain ``g``
  (``g < 1`` keeps the linearised dynamics contracting, so activity and
  gradients neither explode nor vanish quickly at the start of training),
  :math:`U_{ij} \sim \mathcal N(0, 1/n_\mathrm{in})` so pre-activations are
  of order one, :math:`C_{ij} \sim \mathcal N(0, s^2/n)` with readout scale
  ``s``, and zero biases. The readout is not zero: a zero readout would give
  every recurrent weight a zero Jacobian and the first SOFO steps would only
  move :math:`C`.

  All methods accept any number of leading batch axes. :meth:`accumulate`
  and :meth:`run` run the network over a time-major sequence.

  Attributes:
    w_rec: recurrent weights ``W``, shape ``(n, n)``.
    w_in: input weights ``U``, shape ``(n, n_in)``.
    bias: hidden bias ``b``, shape ``(n,)``.
    w_out: readout weights ``C``, shape ``(n_out, n)``.
    b_out: readout bias ``d``, shape ``(n_out,)``.
    leak: ``alpha`` in ``(0, 1]`` (static).
    activation: ``"tanh"`` or ``"relu"`` (static).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sofo_jax.tasks import LeakyRNN
    >>> rnn = LeakyRNN(2, 16, 1, leak=0.25, activation="relu",
    ...                key=jax.random.key(0))
    >>> h = rnn.initial_state((8,))
    >>> h = rnn(h, jnp.ones((8, 2)))
    >>> rnn.readout(h).shape
    (8, 1)
  """

  w_rec: Float[Array, "n n"]
  w_in: Float[Array, "n i"]
  bias: Float[Array, " n"]
  w_out: Float[Array, "o n"]
  b_out: Float[Array, " o"]
  leak: float = eqx.field(static=True)
  activation: str = eqx.field(static=True)

  def __init__(
    self,
    num_inputs: int,
    num_hidden: int,
    num_outputs: int,
    *,
    leak: float,
    activation: str,
    key: PRNGKeyArray,
    gain: float = 0.9,
    readout_scale: float = 1.0,
    dtype=jnp.float32,
  ):
    """Builds a randomly initialised network.

    Args:
      num_inputs: input dimension ``n_in``.
      num_hidden: number of units ``n``.
      num_outputs: readout dimension.
      leak: ``alpha = dt / tau`` in ``(0, 1]``.
      activation: ``"tanh"`` or ``"relu"``.
      key: PRNG key.
      gain: spectral scale ``g`` of the recurrent weights.
      readout_scale: scale ``s`` of the readout weights.
      dtype: parameter dtype.
    """
    if activation not in _ACTIVATIONS:
      raise ValueError(
        f"`activation` must be one of {sorted(_ACTIVATIONS)}, got {activation!r}."
      )
    if not 0.0 < leak <= 1.0:
      raise ValueError(f"`leak` must lie in (0, 1], got {leak!r}.")
    for name, value in (
      ("num_inputs", num_inputs),
      ("num_hidden", num_hidden),
      ("num_outputs", num_outputs),
    ):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    shapes = [
      (num_hidden, num_hidden),
      (num_hidden, num_inputs),
      (num_outputs, num_hidden),
    ]
    sizes = [math.prod(shape) for shape in shapes]
    # One draw for all weights: every random call adds its own generator
    # kernel to the compiled program, and those dominate compile time.
    noise = jax.random.normal(key, (sum(sizes),), dtype)
    w_rec, w_in, w_out = (
      z.reshape(shape)
      for z, shape in zip(jnp.split(noise, [sizes[0], sizes[0] + sizes[1]]), shapes)
    )
    self.w_rec = gain / math.sqrt(num_hidden) * w_rec
    self.w_in = w_in / math.sqrt(num_inputs)
    self.bias = jnp.zeros((num_hidden,), dtype)
    self.w_out = readout_scale / math.sqrt(num_hidden) * w_out
    self.b_out = jnp.zeros((num_outputs,), dtype)
    self.leak = float(leak)
    self.activation = activation

  @property
  def num_hidden(self) -> int:
    return self.w_rec.shape[0]

  def initial_state(self, batch_shape: tuple[int, ...] = ()) -> Array:
    """The zero hidden state, shape ``batch_shape + (n,)``."""
    return jnp.zeros((*batch_shape, self.num_hidden), self.w_rec.dtype)

  def __call__(
    self, h: Float[Array, "*b n"], x: Float[Array, "*b i"]
  ) -> Float[Array, "*b n"]:
    """One step of the leaky dynamics: ``h_t, x_t -> h_{t+1}``."""
    phi = _ACTIVATIONS[self.activation]
    drive = h @ self.w_rec.T + x @ self.w_in.T + self.bias
    return (1.0 - self.leak) * h + self.leak * phi(drive)

  def readout(self, h: Float[Array, "*b n"]) -> Float[Array, "*b o"]:
    """Linear readout ``y = C h + d``."""
    return h @ self.w_out.T + self.b_out

  def accumulate(
    self,
    inputs: Float[Array, "T *b i"],
    targets: Any,
    per_step: Callable[[Array, Any], Any],
    initial: Any,
  ) -> Any:
    r"""Runs the network from rest and sums a per-step term over time.

    .. math::

      \mathrm{total} = \mathrm{initial} + \sum_{t=1}^{T} f(y_t, z_t),

    with :math:`y_t` the readout after input :math:`x_t` and :math:`z_t`
    the step's target. The sum is carried through one ``jax.lax.scan`` and
    nothing of length :math:`T` is kept, so the memory of the loss (and of
    a SOFO step through it) does not grow with the horizon.

    The term may be a pytree (several sums at once, for metrics): it is
    added leaf by leaf, a :class:`sofo_jax.losses.Loss` counting as one
    leaf.

    Args:
      inputs: inputs, time-major, shape ``(T, *batch, n_in)``.
      targets: a pytree of arrays with leading axis ``T``, sliced per step.
      per_step: ``(y_t, z_t) -> term``, e.g. :func:`sofo_jax.losses.mse`.
      initial: the starting total, with the term's structure, e.g.
        :func:`sofo_jax.losses.zero`.

    Returns:
      The total after the last step.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from sofo_jax import losses
      >>> from sofo_jax.tasks import LeakyRNN
      >>> rnn = LeakyRNN(2, 8, 1, leak=0.5, activation="tanh",
      ...                key=jax.random.key(0))
      >>> inputs, targets = jnp.ones((5, 4, 2)), jnp.zeros((5, 4, 1))
      >>> total = rnn.accumulate(inputs, targets, losses.mse, losses.zero())
      >>> bool(total.value >= 0)
      True
    """

    def step(carry, xs):
      h, total = carry
      x, target = xs
      h = self(h, x)
      term = per_step(self.readout(h), target)
      return (h, jax.tree.map(operator.add, total, term, is_leaf=_is_loss)), None

    h0 = self.initial_state(inputs.shape[1:-1])
    (_, total), _ = jax.lax.scan(step, (h0, initial), (inputs, targets))
    return total

  def run(
    self, inputs: Float[Array, "T *b i"]
  ) -> tuple[Float[Array, "T *b o"], Float[Array, "T *b n"]]:
    """Runs the network from rest and records every step, for plotting.

    Memory grows with the horizon; train with :meth:`accumulate`.

    Args:
      inputs: inputs, time-major, shape ``(T, *batch, n_in)``.

    Returns:
      ``(outputs, hidden)``: the readouts, shape ``(T, *batch, n_out)``,
      and the hidden states, shape ``(T, *batch, n)``, after each input.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from sofo_jax.tasks import LeakyRNN
      >>> rnn = LeakyRNN(2, 8, 1, leak=0.5, activation="tanh",
      ...                key=jax.random.key(0))
      >>> outputs, hidden = rnn.run(jnp.ones((5, 4, 2)))
      >>> outputs.shape, hidden.shape
      ((5, 4, 1), (5, 4, 8))
    """

    def step(h, x):
      h = self(h, x)
      return h, (self.readout(h), h)

    _, (outputs, hidden) = jax.lax.scan(
      step, self.initial_state(inputs.shape[1:-1]), inputs
    )
    return outputs, hidden
