"""Refusing ``optax.MultiSteps``, which cannot accumulate a forward-mode step.

``optax.MultiSteps(opt, k)`` calls ``opt.update`` at every micro-step with
that micro-step's extra arguments, keeps the inner state only at every k-th
(the others are discarded), and carries from one micro-step to the next
nothing but the running mean of the *incoming updates*. SOFO takes no
incoming updates: its step comes from the loss closure. Wrapped in
MultiSteps it would emit, every k-th micro-step, a step computed from the
last micro-batch's closure alone. Accumulating correctly would need the
sketches :math:`(c, \\tilde g, \\tilde G)` of the earlier micro-batches
carried to the k-th, which MultiSteps gives no room for, and step control
would need the loss of the whole batch at its trial points, which needs every
micro-batch's closure at once.

What does work needs no wrapper: the sketch is additive over micro-batches
that share tangents, so one closure that sums the micro-batches' losses in a
``lax.scan`` gives exactly the full-batch step while holding one
micro-batch's activations at a time (``docs/large_batches.md``).

MultiSteps gives the transformation it wraps no sign that it is wrapped, so
:func:`check_not_in_multisteps` looks for MultiSteps' own ``init`` and
``update`` on the Python call stack, where a wrapped transformation's
``init`` and ``update`` always run (while tracing, under ``jit``, too). It
runs at trace time and adds nothing to the compiled program.
"""

from __future__ import annotations

import inspect

import optax


def _multisteps_code() -> frozenset:
  """The code objects of ``optax.MultiSteps.init`` and ``.update``."""
  wrapper = getattr(optax, "MultiSteps", None)
  methods = (getattr(wrapper, name, None) for name in ("init", "update"))
  codes = (getattr(method, "__code__", None) for method in methods)
  return frozenset(code for code in codes if code is not None)


_MULTISTEPS_CODE = _multisteps_code()

_MESSAGE = """\
{owner} cannot be wrapped in optax.MultiSteps. MultiSteps hands the wrapped \
optimizer only the last micro-step's loss_fn, so the step would be computed \
from the last micro-batch alone. For a large effective batch, pass one \
loss_fn that sums the losses of the micro-batches inside a lax.scan: the \
sketch adds up over micro-batches (same tangents), memory stays that of one \
micro-batch, and the step equals the full-batch step. For example, with xs \
and ys of shape (num_micro_batches, micro_batch_size, ...):

    def loss_fn(params):
      def body(total, batch):
        x, y = batch
        return total + sofo_jax.losses.mse(model(params, x), y), None
      total, _ = jax.lax.scan(body, sofo_jax.losses.zero(), (xs, ys))
      return total / xs.shape[0]

See docs/large_batches.md."""


def check_not_in_multisteps(owner: str) -> None:
  """Raises ``TypeError`` if called from inside ``optax.MultiSteps``.

  Args:
    owner: the transformation's name, for the message.

  Raises:
    TypeError: when ``optax.MultiSteps.init`` or ``.update`` is on the call
      stack; the message shows the micro-batch pattern to use instead.

  Example:
    >>> from sofo_jax._src import multisteps
    >>> multisteps.check_not_in_multisteps("scale_by_sofo")  # not wrapped: passes
  """
  frame = inspect.currentframe()
  try:
    while frame is not None:
      if frame.f_code in _MULTISTEPS_CODE:
        raise TypeError(_MESSAGE.format(owner=owner))
      frame = frame.f_back
  finally:
    del frame  # a frame held in a local would keep the whole stack alive
