"""Forward-gradient descent (FGD), the forward-mode baseline of the SOFO paper."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int

from sofo_jax._src import eager as eager_lib
from sofo_jax._src import keys as keys_lib
from sofo_jax._src import learning_rate as learning_rate_lib
from sofo_jax._src import losses as losses_lib
from sofo_jax._src import multisteps, validation
from sofo_jax._src import sketch as sketch_lib
from sofo_jax._src import solve as solve_lib
from sofo_jax._src import tangents as tangents_lib
from sofo_jax._src import tree as tree_lib


class ForwardGradientDiagnostics(NamedTuple):
  """What one forward-gradient step saw.

  Attributes:
    loss: loss value at the parameters the step started from.
    gradient_norm: norm of the sketched gradient :math:`\\Theta^\\top\\nabla c`.
    step_is_finite: False when the loss or its directional derivatives were
      not finite; the step was then zero.
    num_nonfinite_steps: how many steps so far were skipped for that reason.
  """

  loss: Float[Array, ""]
  gradient_norm: Float[Array, ""]
  step_is_finite: Bool[Array, ""]
  num_nonfinite_steps: Int[Array, ""]


class ScaleByForwardGradientState(NamedTuple):
  """State of :func:`scale_by_forward_gradient`.

  Attributes:
    count: number of updates so far (int32).
    key: raw PRNG key data, split at every step.
    diagnostics: :class:`ForwardGradientDiagnostics` of the last step.
    aux: the closure's auxiliary output of the last step (``has_aux``),
      else ``None``.
  """

  # The field shadows tuple.count, as in optax's states; mypy flags that.
  count: Int[Array, ""]  # type: ignore[assignment]
  key: jax.Array
  diagnostics: ForwardGradientDiagnostics
  aux: Any = None


def _split_output(output: Any, has_aux: bool) -> tuple[Array, Any]:
  """``(loss value, aux)`` of what the closure returned."""
  if isinstance(output, tuple) and not has_aux:
    raise TypeError(
      "The loss closure returned a tuple; if it is (loss, aux), pass "
      "has_aux=True (the aux is then kept in the state)."
    )
  loss, aux = sketch_lib.split_output(output, has_aux)
  value = loss.value if isinstance(loss, losses_lib.Loss) else jnp.asarray(loss)
  return value, aux


def scale_by_forward_gradient(
  num_tangents: int,
  *,
  key: jax.Array,
  learning_rate: optax.ScalarOrSchedule = 1.0,
  has_aux: bool = False,
  aux_example: Any = None,
  mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Forward-gradient estimate :math:`\\frac{P}{K}\\,\\Theta\\Theta^\\top\\nabla c`.

  With K unit-norm Gaussian tangents, :math:`\\mathbb{E}[v v^\\top] = I/P`, so
  the estimate is unbiased. The directional derivatives
  :math:`\\Theta^\\top\\nabla c` come from one batched ``jax.jvp`` (no
  backpropagation). This is the FGD baseline of Yu et al. (2024); see also
  Baydin et al., "Gradients without backpropagation", 2022.

  The closure (keyword extra argument ``loss_fn``) may return a
  :class:`sofo_jax.losses.Loss` or a plain scalar, or with ``has_aux`` a
  pair ``(loss, aux)`` whose first element is either. As with SOFO, pass
  ``None`` as ``updates``; nonzero incoming updates are an error.

  Args:
    num_tangents: K, a Python int >= 1.
    key: PRNG key, split every step.
    learning_rate: the learning rate the chain applies afterwards (as in
      :func:`sofo_jax.scale_by_sofo`); only checked here: a traced rate that
      is not finite or is negative gives a zero step and ``step_is_finite``
      False. :func:`forward_gradient` passes its own.
    has_aux: the closure returns ``(loss, aux)``; the last aux is kept in
      the state (``sofo_jax.get_state(state).aux``).
    aux_example: with ``has_aux``, a pytree shaped like aux, so that
      ``init`` stores zeros of that shape (see
      :func:`sofo_jax.scale_by_sofo`).
    mask: frozen parameters or entries, as in :func:`sofo_jax.scale_by_sofo`;
      P counts the trainable entries only, the subspace the tangents span.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, sofo_jax
    >>> opt = sofo_jax.scale_by_forward_gradient(4, key=jax.random.key(0))
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 2)
    >>> updates, state = opt.update(None, state, params, loss_fn=loss_fn)
    >>> updates["w"].shape
    (3,)
  """
  tangents_lib.check_num_tangents(num_tangents)
  key_data, codec = keys_lib.check_key(key, "scale_by_forward_gradient")
  owner = "scale_by_forward_gradient"
  validation.check_aux_example(has_aux, aux_example)
  validation.check_learning_rate(learning_rate, owner)

  def init_fn(params):
    multisteps.check_not_in_multisteps(owner)
    validation.check_params_at_init(params, owner, mask)
    dtype = jnp.zeros(()).dtype
    return ScaleByForwardGradientState(
      count=jnp.zeros((), jnp.int32),
      key=jnp.array(key_data, copy=True),
      diagnostics=ForwardGradientDiagnostics(
        loss=jnp.full((), jnp.nan, dtype),
        gradient_norm=jnp.zeros((), dtype),
        step_is_finite=jnp.array(True),
        num_nonfinite_steps=jnp.zeros((), jnp.int32),
      ),
      aux=validation.zeros_like_example(aux_example),
    )

  def update_fn(updates, state, params=None, *, loss_fn=None, **extra_args):
    multisteps.check_not_in_multisteps(owner)
    validation.check_loss_fn(loss_fn, owner, extra_args)
    count = validation.checked_count(updates, state.count, owner)
    part = validation.check_params(params, owner, mask)
    next_key, step_key = codec.split(state.key)
    tangents = tangents_lib.sample_flat(
      step_key, part.trainable, num_tangents, "normalized_gaussian", part.entry_masks
    )
    tangent_leaves = tangents_lib.unflatten(tangents, part.trainable)

    validation.warn_if_aux_changes_structure(has_aux, state.aux, owner)

    def value_fn(trainable):
      return _split_output(loss_fn(part.rebuild(trainable)), has_aux)

    def directional_derivative(tangent):
      (value, aux), (derivative, _) = jax.jvp(value_fn, (part.trainable,), (tangent,))
      return value, aux, derivative

    value, aux, derivatives = jax.vmap(
      directional_derivative, out_axes=(None, None, 0)
    )(tangent_leaves)
    finite = jnp.isfinite(value) & jnp.all(jnp.isfinite(derivatives))
    scale = tree_lib.num_trainable(part) / num_tangents
    coefficients = jnp.where(finite, scale * derivatives, 0.0)
    eta = learning_rate_lib.learning_rate_at(learning_rate, state.count)
    direction, direction_is_finite = tangents_lib.zero_if_nonfinite(
      tangents_lib.unflatten(
        tangents_lib.combine_flat(coefficients, tangents, part.trainable),
        part.trainable,
      ),
      learning_rate_lib.is_usable(eta),
    )
    finite = finite & direction_is_finite
    dtype = jnp.zeros(()).dtype
    diagnostics = ForwardGradientDiagnostics(
      loss=value.astype(dtype),
      gradient_norm=solve_lib.scale_safe_norm(derivatives).astype(dtype),
      step_is_finite=finite,
      num_nonfinite_steps=state.diagnostics.num_nonfinite_steps
      + jnp.where(finite, 0, 1).astype(jnp.int32),
    )
    new_state = ScaleByForwardGradientState(
      # optax annotates safe_increment's result as any chex.Numeric.
      count=optax.safe_increment(count),  # type: ignore[arg-type]
      key=next_key,
      diagnostics=diagnostics,
      aux=aux,
    )
    return part.fill(direction, tree_lib.zero_update), new_state

  eager_update = eager_lib.jit_when_eager(
    update_fn, lambda updates: validation.checked_count(updates, 0, owner)
  )
  return optax.GradientTransformationExtraArgs(init_fn, eager_update)


def forward_gradient(
  learning_rate: optax.ScalarOrSchedule,
  num_tangents: int,
  *,
  key: jax.Array,
  has_aux: bool = False,
  aux_example: Any = None,
  mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Forward-gradient descent: ``chain(scale_by_forward_gradient, scale_by_learning_rate)``.

  The step is :math:`-\\eta\\,\\frac{P}{K}\\Theta\\Theta^\\top\\nabla c`; see
  :func:`scale_by_forward_gradient`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sofo_jax
    >>> opt = sofo_jax.forward_gradient(0.1, 8, key=jax.random.key(0))
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> loss_fn = lambda p: jnp.sum(p["w"] ** 2)
    >>> updates, state = opt.update(None, state, params, loss_fn=loss_fn)
    >>> params = optax.apply_updates(params, updates)
  """
  return optax.chain(
    scale_by_forward_gradient(
      num_tangents,
      key=key,
      learning_rate=learning_rate,
      has_aux=has_aux,
      aux_example=aux_example,
      mask=mask,
    ),
    learning_rate_lib.scale_by_learning_rate(learning_rate),
  )
