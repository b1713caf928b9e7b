"""Determinism: the key in the state is the only source of randomness.

Same key, same updates bit for bit (whole trajectories, not just one step);
every step draws fresh tangents, skipped steps included; typed keys of every
implementation and raw ``PRNGKey`` data work, in ``jit`` and ``lax.scan``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sofo_jax
from sofo_jax import losses

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(16, 3)), jnp.float32)
Y = jnp.asarray(RNG.normal(size=(16, 2)), jnp.float32)
PARAMS = {"w": jnp.asarray(RNG.normal(size=(3, 2)), jnp.float32), "b": jnp.zeros(2)}


def loss_fn(p):
  return losses.mse(jnp.tanh(X @ p["w"] + p["b"]), Y)


FACTORIES = {
  "sofo": lambda key: sofo_jax.sofo(0.5, 3, 1e-3, key=key),
  "sofo_orthonormal": lambda key: sofo_jax.sofo(
    0.5, 3, 1e-3, key=key, tangent_distribution="orthonormal"
  ),
  "forward_gradient": lambda key: sofo_jax.forward_gradient(0.05, 3, key=key),
}


def make_trajectory(opt, num_steps=12, fixed_params=False):
  """A jitted run of ``num_steps`` steps from a given state, in one scan.

  Returns the stacked flat updates and the state's key after each step. The
  optimizer's own key is only used by ``init``: the run's randomness is the
  key in the state it is given.
  """

  def body(carry, _):
    params, state = carry
    updates, state = opt.update(None, state, params, loss_fn=loss_fn)
    if not fixed_params:
      params = optax.apply_updates(params, updates)
    return (params, state), (ravel_pytree(updates)[0], sofo_jax.get_state(state).key)

  @jax.jit
  def run(state):
    return jax.lax.scan(body, (PARAMS, state), None, length=num_steps)[1]

  return lambda state: tuple(np.asarray(x) for x in run(state))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_same_key_same_trajectory_bit_for_bit(name):
  # Two optimizer objects, two traces, two compilations: same bits.
  first_opt, second_opt = (
    FACTORIES[name](jax.random.key(11)),
    FACTORIES[name](jax.random.key(11)),
  )
  first, _ = make_trajectory(first_opt)(first_opt.init(PARAMS))
  second, _ = make_trajectory(second_opt)(second_opt.init(PARAMS))
  assert first.tobytes() == second.tobytes()
  other, _ = make_trajectory(first_opt)(
    FACTORIES[name](jax.random.key(12)).init(PARAMS)
  )
  assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("name", ["sofo", "forward_gradient"])
def test_every_step_draws_fresh_tangents(name):
  """From the *same* params, 12 successive steps give 12 different updates:
  only the key changed between them. (Without momentum: its tangent, the
  last update, would keep successive updates nearly parallel.)"""
  opt = (
    sofo_jax.sofo(0.5, 3, 1e-3, key=jax.random.key(0), momentum=False)
    if name == "sofo"
    else FACTORIES[name](jax.random.key(0))
  )
  updates, keys = make_trajectory(opt, fixed_params=True)(opt.init(PARAMS))
  assert len({k.tobytes() for k in keys}) == len(keys)
  assert len({u.tobytes() for u in updates}) == len(updates)
  # Not just different: not even parallel (different random subspaces).
  norms = np.linalg.norm(updates, axis=1)
  cosines = np.abs(updates @ updates.T) / np.outer(norms, norms)
  assert np.max(cosines - np.eye(len(updates))) < 0.999


def test_a_skipped_step_still_advances_the_key():
  opt = sofo_jax.sofo(1.0, 3, key=jax.random.key(0))
  nan_loss = lambda p: losses.mse(X @ p["w"] * jnp.nan, Y)

  @jax.jit
  def update(state, bad):
    closure = lambda p: jax.lax.cond(bad, nan_loss, loss_fn, p)
    updates, state = opt.update(None, state, PARAMS, loss_fn=closure)
    return ravel_pytree(updates)[0], state

  state = opt.init(PARAMS)
  _, skipped = update(state, True)
  assert not bool(sofo_jax.get_diagnostics(skipped).step_is_finite)
  assert not np.array_equal(
    sofo_jax.get_state(skipped).key, sofo_jax.get_state(state).key
  )
  # ...so the retry uses tangents the failed step did not.
  u_retry, _ = update(skipped, False)
  u_first, _ = update(state, False)
  assert not np.array_equal(u_retry, u_first)


@pytest.mark.parametrize(
  "name, impl",
  [
    ("sofo", "threefry2x32"),
    ("sofo", "rbg"),
    ("sofo", "unsafe_rbg"),
    ("forward_gradient", "rbg"),
  ],
)
def test_typed_keys_of_every_implementation(name, impl):
  key = jax.random.key(5, impl=impl)
  opt = FACTORIES[name](key)
  state = opt.init(PARAMS)
  # The state holds raw uint32 data of the implementation's shape.
  key_data = sofo_jax.get_state(state).key
  assert key_data.dtype == jnp.uint32
  assert key_data.shape == jax.random.key_data(key).shape
  run = make_trajectory(opt, num_steps=4)
  updates, keys = run(state)
  assert np.all(np.isfinite(updates)) and np.all(np.linalg.norm(updates, axis=1) > 0)
  assert keys.shape == (4, *key_data.shape)
  assert (
    run(FACTORIES[name](jax.random.key(5, impl=impl)).init(PARAMS))[0].tobytes()
    == updates.tobytes()
  )


def test_typed_and_raw_threefry_keys_give_the_same_run():
  # (For SOFO this is in test_transform.py.)
  typed_opt = FACTORIES["forward_gradient"](jax.random.key(9))
  raw_opt = FACTORIES["forward_gradient"](jax.random.PRNGKey(9))
  typed, _ = make_trajectory(typed_opt, num_steps=4)(typed_opt.init(PARAMS))
  raw, _ = make_trajectory(raw_opt, num_steps=4)(raw_opt.init(PARAMS))
  assert typed.tobytes() == raw.tobytes()


def test_sample_tangents_is_a_pure_function_of_the_key():
  for distribution in ("normalized_gaussian", "orthonormal"):
    a = sofo_jax.sample_tangents(jax.random.key(1), PARAMS, 5, distribution)
    b = sofo_jax.sample_tangents(jax.random.PRNGKey(1), PARAMS, 5, distribution)
    c = sofo_jax.sample_tangents(jax.random.key(2), PARAMS, 5, distribution)
    assert ravel_pytree(a)[0].tobytes() == ravel_pytree(b)[0].tobytes()
    assert not np.array_equal(ravel_pytree(a)[0], ravel_pytree(c)[0])


@pytest.mark.parametrize("batch", [1, 3, 5, 1000])
def test_tangents_do_not_depend_on_the_cpu_draw_batch(monkeypatch, batch):
  # On a CPU the tangents are drawn a few at a time, elsewhere all at once;
  # both must give the same numbers. With P = 8 parameters, a draw batch of
  # `batch` tangents (the remainder included: K = 7) must match drawing each
  # tangent alone from its own key, which is what vmap over all K does.
  from sofo_jax._src import tangents as tangents_lib  # pylint: disable=g-import-not-at-top

  num_params = sum(x.size for x in jax.tree.leaves(PARAMS))
  monkeypatch.setattr(tangents_lib, "_CPU_DRAW_BATCH", batch * num_params)
  drawn = sofo_jax.sample_tangents(jax.random.key(4), PARAMS, 7)
  keys = jax.random.split(jax.random.key(4), 7)
  flat = np.stack([np.asarray(jax.random.normal(k, (num_params,))) for k in keys])
  expected = flat / np.linalg.norm(flat, axis=1, keepdims=True)
  leaves, treedef = jax.tree.flatten(PARAMS)
  sizes = np.cumsum([0] + [x.size for x in leaves])
  expected_tree = treedef.unflatten(
    [
      expected[:, a:b].reshape((7, *x.shape))
      for a, b, x in zip(sizes[:-1], sizes[1:], leaves)
    ]
  )
  for got, want in zip(jax.tree.leaves(drawn), jax.tree.leaves(expected_tree)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)


def test_accelerator_draw_path_gives_the_same_tangents(monkeypatch):
  # Off CPU, all K tangents are drawn in one vmap; run that branch here.
  cpu = sofo_jax.sample_tangents(jax.random.key(4), PARAMS, 7)
  monkeypatch.setattr(
    jax.lax, "platform_dependent", lambda *args, default, **per_platform: default(*args)
  )
  accelerator = sofo_jax.sample_tangents(jax.random.key(4), PARAMS, 7)
  np.testing.assert_allclose(
    ravel_pytree(accelerator)[0], ravel_pytree(cpu)[0], rtol=1e-6, atol=1e-7
  )
