"""Forward-gradient descent (FGD), the forward-mode baseline of the SOFO paper."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int

from sofo_jax._src import keys as keys_lib
from sofo_jax._src import losses as losses_lib
from sofo_jax._src import tangents as tangents_lib
from sofo_jax._src import tree as tree_lib
from sofo_jax._src import validation


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
  """State of :func:`scale_by_forward_gradient`."""

  count: Int[Array, ""]
  key: jax.Array
  diagnostics: ForwardGradientDiagnostics


def _value(output: Any) -> Array:
  loss = output[0] if isinstance(output, tuple) else output
  return loss.value if isinstance(loss, losses_lib.Loss) else jnp.asarray(loss)


def scale_by_forward_gradient(
    num_tangents: int,
    *,
    key: jax.Array,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Forward-gradient estimate :math:`\\frac{P}{K}\\,\\Theta\\Theta^\\top\\nabla c`.

  With K unit-norm Gaussian tangents, :math:`\\mathbb{E}[v v^\\top] = I/P`, so
  the estimate is unbiased. The directional derivatives
  :math:`\\Theta^\\top\\nabla c` come from one batched ``jax.jvp`` (no
  backpropagation). This is the FGD baseline of Yu et al. (2024); see also
  Baydin et al., "Gradients without backpropagation", 2022.

  The closure (keyword extra argument ``loss_fn``) may return a
  :class:`sofo_jax.losses.Loss`, a plain scalar, or a pair ``(loss, aux)``
  whose first element is either. The incoming ``updates`` are ignored.

  Args:
    num_tangents: K, a Python int >= 1.
    key: PRNG key, split every step.
    mask: frozen parameters, as in :func:`sofo_jax.scale_by_sofo`.

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

  def init_fn(params):
    validation.check_params(params, owner, mask)
    dtype = jnp.zeros(()).dtype
    return ScaleByForwardGradientState(
        count=jnp.zeros((), jnp.int32),
        key=key_data,
        diagnostics=ForwardGradientDiagnostics(
            loss=jnp.full((), jnp.nan, dtype),
            gradient_norm=jnp.zeros((), dtype),
            step_is_finite=jnp.array(True),
            num_nonfinite_steps=jnp.zeros((), jnp.int32),
        ),
    )

  def update_fn(updates, state, params=None, *, loss_fn=None, **extra_args):
    del updates
    validation.check_loss_fn(loss_fn, owner, extra_args)
    part = validation.check_params(params, owner, mask)
    next_key, step_key = codec.split(state.key)
    tangent_leaves = tangents_lib.sample_leaves(
        step_key, part.trainable, num_tangents, "normalized_gaussian"
    )

    def value_fn(trainable):
      return _value(loss_fn(part.rebuild(trainable)))

    def directional_derivative(tangent):
      return jax.jvp(value_fn, (part.trainable,), (tangent,))

    value, derivatives = jax.vmap(directional_derivative, out_axes=(None, 0))(
        tangent_leaves
    )
    finite = jnp.isfinite(value) & jnp.all(jnp.isfinite(derivatives))
    scale = tree_lib.num_trainable(part) / num_tangents
    coefficients = jnp.where(finite, scale * derivatives, 0.0)
    direction, direction_is_finite = tangents_lib.zero_if_nonfinite(
        tangents_lib.combine(coefficients, tangent_leaves)
    )
    finite = finite & direction_is_finite
    dtype = jnp.zeros(()).dtype
    diagnostics = ForwardGradientDiagnostics(
        loss=value.astype(dtype),
        gradient_norm=jnp.linalg.norm(derivatives).astype(dtype),
        step_is_finite=finite,
        num_nonfinite_steps=state.diagnostics.num_nonfinite_steps
        + jnp.where(finite, 0, 1).astype(jnp.int32),
    )
    new_state = ScaleByForwardGradientState(
        count=optax.safe_increment(state.count),
        key=next_key,
        diagnostics=diagnostics,
    )
    return part.fill(direction, tree_lib.zero_update), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def forward_gradient(
    learning_rate: optax.ScalarOrSchedule,
    num_tangents: int,
    *,
    key: jax.Array,
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
      scale_by_forward_gradient(num_tangents, key=key, mask=mask),
      optax.scale_by_learning_rate(learning_rate),
  )
