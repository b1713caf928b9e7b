"""The optimizer common suite and composition with optax, equinox and JAX."""

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sofo_jax
from sofo_jax import losses


def _regression(dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  params = models.mlp_params(rng, [3, 4, 2], dtype=np.float32)
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
  x = jnp.asarray(rng.normal(size=(16, 3)), dtype)
  y = jnp.asarray(rng.normal(size=(16, 2)), dtype)
  return params, (lambda p: losses.mse(models.mlp(p, x), y))


def _step_fn(opt, loss_fn):
  def step(params, state):
    updates, state = opt.update(None, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  return step


OPTIMIZERS = {
  "sofo": lambda: sofo_jax.sofo(0.5, 6, 1e-3, key=jax.random.key(0)),
  "sofo_orthonormal": lambda: sofo_jax.sofo(
    0.5, 6, 1e-3, key=jax.random.key(0), tangent_distribution="orthonormal"
  ),
  "forward_gradient": lambda: sofo_jax.forward_gradient(0.01, 6, key=jax.random.key(0)),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_jit_matches_eager(name):
  params, loss_fn = _regression()
  opt = OPTIMIZERS[name]()
  state = opt.init(params)
  eager = _step_fn(opt, loss_fn)(params, state)
  jitted = jax.jit(_step_fn(opt, loss_fn))(params, state)
  chex.assert_trees_all_close(eager[0], jitted[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_single_compilation(name):
  params, _ = _regression()
  x = jnp.ones((16, 3))
  traces = []

  def loss_fn(p, y):
    traces.append(1)  # runs only while tracing
    return losses.mse(models.mlp(p, x), y)

  opt = OPTIMIZERS[name]()

  @jax.jit
  def step(params, state, y):
    updates, state = opt.update(None, state, params, loss_fn=lambda p: loss_fn(p, y))
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  params, state = step(params, state, jnp.zeros((16, 2)))
  first = len(traces)
  params, state = step(params, state, jnp.ones((16, 2)))
  params, state = step(params, state, 2 * jnp.ones((16, 2)))
  assert len(traces) == first
  assert step._cache_size() == 1


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_preserved(name, dtype):
  params, loss_fn = _regression(dtype)
  opt = OPTIMIZERS[name]()
  state = opt.init(params)
  updates, state = jax.jit(lambda p, s: opt.update(None, s, p, loss_fn=loss_fn))(
    params, state
  )
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype and u.shape == p.shape
    assert jnp.all(jnp.isfinite(u.astype(jnp.float32)))
  assert (
    float(
      jnp.linalg.norm(
        ravel_pytree(jax.tree.map(lambda u: u.astype(jnp.float32), updates))[0]
      )
    )
    > 0
  )


def test_state_structure_and_dtypes_fixed_across_steps():
  params, loss_fn = _regression()
  opt = OPTIMIZERS["sofo"]()
  state0 = opt.init(params)
  _, state1 = jax.jit(_step_fn(opt, loss_fn))(params, state0)
  assert jax.tree.structure(state0) == jax.tree.structure(state1)
  for a, b in zip(jax.tree.leaves(state0), jax.tree.leaves(state1)):
    assert a.shape == b.shape and a.dtype == b.dtype
  assert sofo_jax.get_state(state1).count.dtype == jnp.int32
  assert int(sofo_jax.get_state(state1).count) == 1


@pytest.mark.parametrize("name", ["sofo", "forward_gradient"])
def test_lax_scan_over_updates_matches_python_loop(name):
  params, loss_fn = _regression()
  opt = OPTIMIZERS[name]()
  step = jax.jit(_step_fn(opt, loss_fn))
  p_loop, s_loop = params, opt.init(params)
  for _ in range(4):
    p_loop, s_loop = step(p_loop, s_loop)

  def body(carry, _):
    return _step_fn(opt, loss_fn)(*carry), None

  (p_scan, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, length=4))(
    (params, opt.init(params))
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p_loop, p_scan
  )


def test_inject_hyperparams_changes_learning_rate_and_damping():
  params, loss_fn = _regression()
  # The paper's fixed damping: injected values act on every step.
  opt = optax.inject_hyperparams(sofo_jax.sofo, static_args=("num_tangents", "key"))(
    learning_rate=1.0,
    num_tangents=5,
    damping=1e-3,
    key=jax.random.key(0),
    adaptive=False,
  )
  state = opt.init(params)
  update = jax.jit(lambda p, s: opt.update(None, s, p, loss_fn=loss_fn))
  u1, s1 = update(params, state)
  state.hyperparams["learning_rate"] = jnp.asarray(0.25, jnp.float32)
  state.hyperparams["damping"] = jnp.asarray(1e-1, jnp.float32)
  u2, s2 = update(params, state)
  assert update._cache_size() == 1  # no retrace for new values
  d1, d2 = sofo_jax.get_diagnostics(s1), sofo_jax.get_diagnostics(s2)
  np.testing.assert_allclose(d1.damping, 1e-3 * d1.max_eigenvalue, rtol=1e-5)
  np.testing.assert_allclose(d2.damping, 1e-1 * d2.max_eigenvalue, rtol=1e-5)
  # Same tangents (same inner key), larger damping: a strictly shorter step, scaled by 1/4.
  n1 = jnp.linalg.norm(ravel_pytree(u1)[0])
  n2 = jnp.linalg.norm(ravel_pytree(u2)[0])
  assert n2 < 0.25 * n1


def test_inject_hyperparams_without_static_num_tangents_says_what_to_do():
  params, _ = _regression()
  opt = optax.inject_hyperparams(sofo_jax.sofo)(
    learning_rate=1.0, num_tangents=5, key=jax.random.key(0)
  )
  with pytest.raises(TypeError, match="static_args"):
    jax.jit(opt.init)(params)


def test_schedule_learning_rate():
  params, loss_fn = _regression()
  schedule = optax.exponential_decay(1.0, transition_steps=1, decay_rate=0.5)
  with_schedule = sofo_jax.sofo(schedule, 5, key=jax.random.key(0), adaptive=False)
  constant = sofo_jax.sofo(1.0, 5, key=jax.random.key(0), adaptive=False)
  s_sched, s_const = with_schedule.init(params), constant.init(params)
  u_sched, s_sched = with_schedule.update(None, s_sched, params, loss_fn=loss_fn)
  u_const, s_const = constant.update(None, s_const, params, loss_fn=loss_fn)
  np.testing.assert_allclose(
    ravel_pytree(u_sched)[0], ravel_pytree(u_const)[0], rtol=1e-6
  )
  u_sched, _ = with_schedule.update(None, s_sched, params, loss_fn=loss_fn)
  u_const, _ = constant.update(None, s_const, params, loss_fn=loss_fn)
  np.testing.assert_allclose(
    ravel_pytree(u_sched)[0], 0.5 * ravel_pytree(u_const)[0], rtol=1e-5, atol=1e-7
  )


def test_chain_with_clipping_momentum_weight_decay():
  params, loss_fn = _regression()
  # Transforms between SOFO and the learning rate change the step that step
  # control would evaluate: the paper's fixed damping composes freely.
  opt = optax.chain(
    sofo_jax.scale_by_sofo(5, 1e-3, key=jax.random.key(0), adaptive=False),
    optax.clip_by_global_norm(1e-2),
    optax.trace(decay=0.9),
    optax.add_decayed_weights(1e-4),
    optax.scale_by_learning_rate(1.0),
  )
  state = opt.init(params)
  step = jax.jit(_step_fn(opt, loss_fn))
  start = loss_fn(params).value
  p = params
  for _ in range(3):
    p_next, state = step(p, state)
    # Clipped SOFO direction plus momentum and a tiny decay: bounded steps.
    assert (
      jnp.linalg.norm(ravel_pytree(p_next)[0] - ravel_pytree(p)[0]) < 3 * 1e-2 + 1e-3
    )
    p = p_next
  assert loss_fn(p).value < start


def test_unknown_extra_arguments_are_ignored_in_a_chain():
  params, loss_fn = _regression()
  opt = optax.chain(sofo_jax.scale_by_sofo(4, key=jax.random.key(0)), optax.scale(-1.0))
  state = opt.init(params)
  u_extra, _ = opt.update(None, state, params, loss_fn=loss_fn, value=1.0, grad=None)
  u_plain, _ = opt.update(None, state, params, loss_fn=loss_fn)
  np.testing.assert_array_equal(ravel_pytree(u_extra)[0], ravel_pytree(u_plain)[0])


def test_incoming_gradients_are_an_error_not_silently_ignored():
  """Gradients passed in, eagerly or under jit, and the usual optax order
  chain(clip, sofo) fed gradients, fail loudly; None and zeros pass."""
  params, loss_fn = _regression()
  opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(0))
  state = opt.init(params)
  grads = jax.grad(lambda p: loss_fn(p).value)(params)
  with pytest.raises(TypeError, match="SOFO must come first in a chain"):
    opt.update(grads, state, params, loss_fn=loss_fn)
  jitted = jax.jit(lambda g, s, p: opt.update(g, s, p, loss_fn=loss_fn))
  with pytest.raises(Exception, match="SOFO must come first in a chain"):
    jax.block_until_ready(jitted(grads, state, params))
  clipped_first = optax.chain(optax.clip_by_global_norm(1.0), opt)
  with pytest.raises(Exception, match="SOFO must come first in a chain"):
    jax.block_until_ready(
      jax.jit(lambda g, s, p: clipped_first.update(g, s, p, loss_fn=loss_fn))(
        grads, clipped_first.init(params), params
      )
    )
  u_zeros, _ = jitted(optax.tree.zeros_like(params), state, params)
  u_none, _ = opt.update(None, state, params, loss_fn=loss_fn)
  np.testing.assert_array_equal(ravel_pytree(u_zeros)[0], ravel_pytree(u_none)[0])


def test_apply_if_finite_composes():
  # apply_if_finite inspects the incoming updates and needs their structure:
  # with SOFO pass a zero tree (SOFO ignores it) instead of None.
  params, loss_fn = _regression()
  plain = sofo_jax.sofo(1.0, 4, key=jax.random.key(0), adaptive=False)
  opt = optax.apply_if_finite(plain, 3)
  state = opt.init(params)

  @jax.jit
  def step(p, s):
    return opt.update(optax.tree.zeros_like(p), s, p, loss_fn=loss_fn)

  updates, state = step(params, state)
  expected, _ = plain.update(None, plain.init(params), params, loss_fn=loss_fn)
  assert bool(state.last_finite)
  assert float(jnp.max(jnp.abs(ravel_pytree(expected)[0]))) > 0
  np.testing.assert_allclose(
    ravel_pytree(updates)[0], ravel_pytree(expected)[0], rtol=1e-5, atol=1e-6
  )


def test_mask_freezes_leaves_and_draws_no_tangents_there():
  params, loss_fn = _regression()
  mask = [{"w": True, "b": False}, {"w": True, "b": True}]
  opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(0), mask=mask)
  state = opt.init(params)
  updates, _ = jax.jit(lambda p, s: opt.update(None, s, p, loss_fn=loss_fn))(
    params, state
  )
  assert jnp.all(updates[0]["b"] == 0)
  assert jnp.any(updates[0]["w"] != 0) and jnp.any(updates[1]["b"] != 0)
  tangents = sofo_jax.sample_tangents(jax.random.key(0), params, 4, mask=mask)
  assert tangents[0]["b"] is None and tangents[0]["w"].shape == (4, 3, 4)


def test_mask_as_callable():
  params, loss_fn = _regression()
  only_weights = lambda p: jax.tree.map(lambda x: x.ndim == 2, p)
  opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(0), mask=only_weights)
  updates, _ = opt.update(None, opt.init(params), params, loss_fn=loss_fn)
  assert all(jnp.all(layer["b"] == 0) for layer in updates)


def test_equinox_module_through_partition():
  model = eqx.nn.MLP(3, 2, 8, 1, key=jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (32, 3))
  y = jnp.stack([jnp.sin(x[:, 0]), x[:, 1] * x[:, 2]], -1)
  params, static = eqx.partition(model, eqx.is_array)

  def loss_fn(p):
    return losses.mse(jax.vmap(eqx.combine(p, static))(x), y)

  opt = sofo_jax.sofo(1.0, 16, 1e-3, key=jax.random.key(2))
  state = opt.init(params)

  @jax.jit
  def step(p, s):
    updates, s = opt.update(None, s, p, loss_fn=loss_fn)
    return eqx.apply_updates(p, updates), s

  start = loss_fn(params).value
  for _ in range(15):
    params, state = step(params, state)
  assert loss_fn(params).value < 0.5 * start


def test_integer_leaves_left_alone():
  params, loss_fn = _regression()
  params_with_int = {"net": params, "step": jnp.asarray(3, jnp.int32)}
  opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(0))
  state = opt.init(params_with_int)
  updates, _ = opt.update(
    None, state, params_with_int, loss_fn=lambda p: loss_fn(p["net"])
  )
  new = optax.apply_updates(params_with_int, updates)
  assert new["step"].dtype == jnp.int32 and int(new["step"]) == 3


def test_same_key_bitwise_identical_and_steps_use_fresh_tangents():
  params, loss_fn = _regression()
  updates = []
  for _ in range(2):
    opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(42))
    state = opt.init(params)
    u, state = jax.jit(lambda p, s, opt=opt: opt.update(None, s, p, loss_fn=loss_fn))(
      params, state
    )
    updates.append(ravel_pytree(u)[0])
  np.testing.assert_array_equal(updates[0], updates[1])
  # From the same params, the second step's tangents differ from the first's.
  u_second, _ = opt.update(None, state, params, loss_fn=loss_fn)
  assert not np.array_equal(ravel_pytree(u_second)[0], updates[0])
  # A different key gives a different direction.
  other = sofo_jax.sofo(1.0, 4, key=jax.random.key(43))
  u_other, _ = other.update(None, other.init(params), params, loss_fn=loss_fn)
  assert not np.array_equal(ravel_pytree(u_other)[0], updates[0])


def test_typed_and_raw_keys_agree():
  params, loss_fn = _regression()
  results = []
  for key in (jax.random.key(5), jax.random.PRNGKey(5)):
    opt = sofo_jax.sofo(1.0, 4, key=key)
    state = opt.init(params)
    for _ in range(2):
      u, state = opt.update(None, state, params, loss_fn=loss_fn)
    results.append(ravel_pytree(u)[0])
  np.testing.assert_array_equal(results[0], results[1])


def test_has_aux_returns_aux_and_loss_without_second_pass():
  params, _ = _regression()
  x = jnp.ones((16, 3))
  y = jnp.zeros((16, 2))
  calls = []

  def loss_fn(p):
    calls.append(1)
    preds = models.mlp(p, x)
    return losses.mse(preds, y), {"mean_prediction": jnp.mean(preds)}

  example = {"mean_prediction": jax.ShapeDtypeStruct((), jnp.float32)}
  opt = sofo_jax.sofo(
    1.0, 4, key=jax.random.key(0), has_aux=True, aux_example=example, adaptive=False
  )
  state = opt.init(params)
  assert float(state[0].aux["mean_prediction"]) == 0.0
  _, new_state = jax.jit(lambda p, s: opt.update(None, s, p, loss_fn=loss_fn))(
    params, state
  )
  assert len(calls) == 1  # traced once: the loss and aux come from the same pass
  sofo_state = sofo_jax.get_state(new_state)
  np.testing.assert_allclose(
    sofo_state.aux["mean_prediction"], jnp.mean(models.mlp(params, x)), rtol=1e-6
  )
  np.testing.assert_allclose(
    sofo_state.diagnostics.loss, losses.mse(models.mlp(params, x), y).value, rtol=1e-6
  )
  assert jax.tree.structure(state) == jax.tree.structure(new_state)


def test_forward_gradient_is_unbiased():
  """Averaged over keys, the FGD direction (P/K) Theta Theta^T g is the gradient."""
  w = jnp.array([0.5, -1.0, 2.0, 0.3])
  target = jnp.array([1.0, 2.0, -1.0, 0.0])
  loss_fn = lambda p: jnp.sum((p["w"] - target) ** 2)
  opt = sofo_jax.scale_by_forward_gradient(2, key=jax.random.key(0))
  state = opt.init({"w": w})

  def one(key_data):
    s = state._replace(key=key_data)
    return opt.update(None, s, {"w": w}, loss_fn=loss_fn)[0]["w"]

  keys = jax.random.key_data(jax.random.split(jax.random.key(1), 20000))
  mean = jnp.mean(jax.jit(jax.vmap(one))(keys), axis=0)
  gradient = 2 * (w - target)
  np.testing.assert_allclose(mean, gradient, atol=0.08 * jnp.linalg.norm(gradient))


def test_forward_gradient_accepts_loss_objects_and_plain_scalars():
  params, loss_fn = _regression()
  opt = sofo_jax.forward_gradient(0.1, 4, key=jax.random.key(0))
  state = opt.init(params)
  u_obj, _ = opt.update(None, state, params, loss_fn=loss_fn)
  u_plain, _ = opt.update(None, state, params, loss_fn=lambda p: loss_fn(p).value)
  np.testing.assert_allclose(
    ravel_pytree(u_obj)[0], ravel_pytree(u_plain)[0], rtol=1e-6
  )


def test_sketch_accepts_sampled_tangents_for_partitioned_equinox_modules():
  model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_array)
  x = jnp.ones((3, 2))
  loss_fn = lambda p: losses.mse(jax.vmap(eqx.combine(p, static))(x), jnp.zeros((3, 1)))
  tangents = sofo_jax.sample_tangents(jax.random.key(1), params, 3)
  value, g, G = sofo_jax.sketch(loss_fn, params, tangents)
  assert g.shape == (3,) and G.shape == (3, 3)
  np.testing.assert_allclose(value, loss_fn(params).value, rtol=1e-6)
  with pytest.raises(ValueError, match="structure of the parameters"):
    sofo_jax.sketch(loss_fn, params, {"not": "params"})
