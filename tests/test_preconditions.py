"""Preconditions on the data a user hands over, decided and pinned.

- Half-precision losses accumulate in float32, so a mean that fits the
  dtype never overflows on the way.
- Integer labels outside ``[0, classes)`` are refused when concrete and make
  the loss NaN (so SOFO skips and reports the step) when traced.
- A negative Loss scale is refused when concrete and makes the loss NaN when
  traced; a scale that depends on the parameters is not detected: it counts
  in the gradient and as a constant in the Gauss–Newton matrix.
- A checkpoint's ``step`` must be an integer; it is never truncated.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sofo_jax
from sofo_jax import losses

PARAMS = {"w": jnp.ones((3, 4))}
X = jax.random.normal(jax.random.key(0), (8, 3))
LABELS = jnp.arange(8) % 4


def ce_loss(p, labels=LABELS):
  return losses.softmax_cross_entropy(X @ p["w"], labels)


def test_float16_mean_does_not_overflow_in_the_sum():
  outputs = jnp.full((16, 1), 100.0, jnp.float16)  # 1e4 per example, 1.6e5 in all
  loss = losses.mse(outputs, jnp.zeros_like(outputs))
  assert loss.value.dtype == jnp.float16
  np.testing.assert_allclose(float(loss.value), 1e4, rtol=1e-3)


@pytest.mark.parametrize("bad", [-1, 4])
def test_out_of_range_concrete_labels_are_refused(bad):
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
    ce_loss(PARAMS, LABELS.at[0].set(bad))


def test_out_of_range_traced_labels_skip_the_sofo_step():
  opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(0))

  @jax.jit
  def step(params, state, labels):
    updates, state = opt.update(
      None, state, params, loss_fn=lambda p: ce_loss(p, labels)
    )
    return optax.apply_updates(params, updates), state

  assert np.isnan(
    jax.jit(lambda labels: ce_loss(PARAMS, labels).value)(LABELS.at[0].set(7))
  )
  params, state = step(PARAMS, opt.init(PARAMS), LABELS.at[0].set(7))
  np.testing.assert_array_equal(params["w"], PARAMS["w"])
  assert not bool(sofo_jax.get_diagnostics(state).step_is_finite)
  params, state = step(params, state, LABELS)
  assert bool(sofo_jax.get_diagnostics(state).step_is_finite)


def test_negative_concrete_scale_is_refused():
  with pytest.raises(ValueError, match="non-negative"):
    -1.0 * ce_loss(PARAMS)
  with pytest.raises(ValueError, match="non-negative"):
    ce_loss(PARAMS) / -2


def test_negative_traced_scale_skips_the_sofo_step():
  opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(0))

  @jax.jit
  def step(params, state, scale):
    updates, state = opt.update(
      None, state, params, loss_fn=lambda p: scale * ce_loss(p)
    )
    return optax.apply_updates(params, updates), state

  params, state = step(PARAMS, opt.init(PARAMS), -1.0)
  np.testing.assert_array_equal(params["w"], PARAMS["w"])
  assert not bool(sofo_jax.get_diagnostics(state).step_is_finite)


def test_parameter_dependent_scale_is_a_constant_in_the_curvature(x64):
  """Documented, not detected: the gradient has the product rule's term, the
  Gauss–Newton matrix treats the scale as a constant."""
  params = jax.tree.map(lambda x: x.astype(jnp.float64), PARAMS)
  scale_of = lambda p: 1.0 + jnp.sum(p["w"] ** 2)
  scaled = lambda p: scale_of(p) * ce_loss(p)
  tangents = sofo_jax.sample_tangents(jax.random.key(1), params, 3)
  got = sofo_jax.sketch(scaled, params, tangents)
  plain = sofo_jax.sketch(ce_loss, params, tangents)
  flat_tangents = jnp.stack([t.ravel() for t in tangents["w"]])
  full_gradient = jax.grad(lambda p: scaled(p).value)(params)["w"].ravel()
  np.testing.assert_allclose(got.gradient, flat_tangents @ full_gradient, rtol=1e-10)
  np.testing.assert_allclose(
    got.gauss_newton, scale_of(params) * plain.gauss_newton, rtol=1e-10
  )


def test_checkpoint_step_must_be_an_integer(tmp_path):
  pytest.importorskip("orbax.checkpoint")
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0))
  state = opt.init(PARAMS)
  for bad in (10.7, 3.0, True, np.float32(2.0), "5"):
    with pytest.raises(TypeError, match="step must be an integer"):
      sofo_jax.checkpoint.save(tmp_path / "bad", PARAMS, state, step=bad)
  sofo_jax.checkpoint.save(tmp_path / "good", PARAMS, state, step=np.int64(5))
  assert sofo_jax.checkpoint.restore(tmp_path / "good", like=(PARAMS, state)).step == 5
