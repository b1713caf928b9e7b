"""Entry masks and sign constraints: the biological constraints of rate RNNs.

- An entry mask (a boolean array in ``mask=``) freezes single entries: every
  tangent, and so every update, momentum and recycled direction, is exactly
  zero there, over many steps and with every step option.
- With K equal to the number of trainable entries and orthonormal tangents,
  the step is the dense damped Gauss–Newton step restricted to those entries
  (float64, against ``tests/reference.py``).
- Dale's law kept by a parametrisation (W = |W̃| D) or by a projection after
  the step (``optax.projections``): zero sign violations after training.
"""

import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
import reference
from jax.flatten_util import ravel_pytree

import sofo_jax
from sofo_jax import losses
from sofo_jax._src import tree as tree_lib

N_IN, N_HIDDEN, N_OUT, T, B = 2, 5, 2, 4, 3


def _rnn_problem(seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  params = models.rnn_params(rng, N_IN, N_HIDDEN, N_OUT, dtype=dtype)
  xs = rng.normal(size=(T, B, N_IN)).astype(dtype)
  targets = rng.normal(size=(T, B, N_OUT)).astype(dtype)
  connectivity = rng.random((N_HIDDEN, N_HIDDEN)) < 0.5
  mask = {
    "w_rec": connectivity,
    "w_in": True,
    "bias": False,
    "w_out": rng.random((N_OUT, N_HIDDEN)) < 0.7,
    "b_out": True,
  }
  loss_fn = lambda p: models.rnn_scan_loss(p, xs, targets)
  return params, mask, loss_fn


def _frozen(mask, params):
  """``~mask`` as full boolean arrays like ``params`` (True = frozen entry)."""
  return jax.tree.map(
    lambda m, p: ~np.broadcast_to(np.asarray(m), np.shape(p)), mask, params
  )


# Exactly zero on frozen entries, over several steps --------------------------------


OPTIMIZERS = {
  "defaults": lambda mask: sofo_jax.sofo(1.0, 6, key=jax.random.key(0), mask=mask),
  "paper": lambda mask: sofo_jax.sofo(
    0.5, 6, 1e-3, key=jax.random.key(0), adaptive=False, mask=mask
  ),
  "recycled_orthonormal": lambda mask: sofo_jax.sofo(
    1.0,
    6,
    key=jax.random.key(0),
    num_recycled=2,
    tangent_distribution="orthonormal",
    mask=mask,
  ),
  "forward_gradient": lambda mask: sofo_jax.forward_gradient(
    0.05, 6, key=jax.random.key(0), mask=mask
  ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_updates_are_exactly_zero_on_frozen_entries_over_steps(name):
  params, mask, loss_fn = _rnn_problem()
  frozen = _frozen(mask, params)
  opt = OPTIMIZERS[name](mask)
  state = opt.init(params)
  step = jax.jit(lambda p, s: opt.update(None, s, p, loss_fn=loss_fn))
  start = params
  for _ in range(6):
    updates, state = step(params, state)
    for u, f in zip(jax.tree.leaves(updates), jax.tree.leaves(frozen)):
      assert np.all(np.asarray(u)[f] == 0)
    params = optax.apply_updates(params, updates)
  for p, p0, f in zip(
    jax.tree.leaves(params), jax.tree.leaves(start), jax.tree.leaves(frozen)
  ):
    np.testing.assert_array_equal(np.asarray(p)[f], np.asarray(p0)[f])  # bit for bit
    assert np.all(
      np.asarray(p)[~f] != np.asarray(p0)[~f]
    )  # every trainable entry moved
  # The buffers the next step builds tangents from respect the mask too.
  inner = sofo_jax.get_state(state)
  if name == "defaults":  # momentum is on by default: its buffer is checked below
    assert inner.last_update is not None
  if name == "recycled_orthonormal":
    assert inner.recycled is not None
  part = tree_lib.partition(params, mask)
  flags = [f for f, t in zip(jax.tree.leaves(frozen), part.trainable_flags) if t]
  for buffer in (getattr(inner, "last_update", None), getattr(inner, "recycled", None)):
    if buffer is not None:
      # Shaped like the params, with optax.MaskedNode on untrained leaves.
      is_masked = lambda node: isinstance(node, optax.MaskedNode)
      masked = jax.tree.leaves(jax.tree.map(is_masked, buffer, is_leaf=is_masked))
      assert masked == [not t for t in part.trainable_flags]
      leaves = jax.tree.leaves(buffer)
      assert any(np.any(np.asarray(b) != 0) for b in leaves)
      for b, f in zip(leaves, flags, strict=True):
        assert np.all(np.asarray(b)[..., f] == 0)


@pytest.mark.parametrize("distribution", ["normalized_gaussian", "orthonormal"])
def test_masked_tangents_live_in_the_trainable_subspace(x64, distribution):
  params, mask, _ = _rnn_problem(2, np.float64)
  frozen = ravel_pytree(_frozen(mask, params))[0].astype(bool)
  num_free = int((~frozen).sum())
  part = tree_lib.partition(params, mask)
  assert tree_lib.num_trainable(part) == num_free  # entries, not leaf sizes
  for k in (5, num_free, num_free + 4):
    tangents = sofo_jax.sample_tangents(
      jax.random.key(k), params, k, distribution, mask=mask
    )
    assert tangents["bias"] is None  # a leaf-level False draws nothing
    tangents["bias"] = jnp.zeros((k, N_HIDDEN))
    theta = jax.vmap(lambda t: ravel_pytree(t)[0])(tangents)  # (K, P)
    assert np.all(np.asarray(theta)[:, frozen] == 0)
    if distribution == "normalized_gaussian":
      np.testing.assert_allclose(jnp.linalg.norm(theta, axis=1), 1.0, atol=1e-12)
    elif k <= num_free:  # orthonormal in the subspace of trainable entries
      np.testing.assert_allclose(theta @ theta.T, np.eye(k), atol=1e-12)
    else:  # a Parseval frame of that subspace: the projector onto it
      np.testing.assert_allclose(theta.T @ theta, np.diag(~frozen * 1.0), atol=1e-12)


def test_all_or_nothing_entry_masks_are_leaf_flags():
  params, _, _ = _rnn_problem()
  mask = {
    "w_rec": np.ones((N_HIDDEN, N_HIDDEN), bool),
    "w_in": np.zeros((N_HIDDEN, N_IN), bool),
    "bias": False,
    "w_out": True,
    "b_out": False,
  }
  part = tree_lib.partition(params, mask)
  assert part.entry_masks == (None, None)  # w_out and w_rec, whole
  assert tree_lib.num_trainable(part) == N_HIDDEN * N_HIDDEN + N_HIDDEN * N_OUT
  nothing = jax.tree.map(lambda p: np.zeros(np.shape(p), bool), params)
  with pytest.raises(ValueError, match="no floating-point parameters"):
    sofo_jax.sofo(1.0, 2, key=jax.random.key(0), mask=nothing).init(params)


def test_forward_gradient_counts_only_trainable_entries():
  """With one trainable entry every tangent is ±e_i, so FGD's (P/K)ΘΘᵀ∇c is exact there.

  P must be the number of trainable entries (1), not of the leaf's entries.
  """
  params, _, loss_fn = _rnn_problem(3)
  only = np.zeros((N_HIDDEN, N_HIDDEN), bool)
  only[1, 2] = True
  mask = {"w_rec": only, "w_in": False, "bias": False, "w_out": False, "b_out": False}
  opt = sofo_jax.scale_by_forward_gradient(4, key=jax.random.key(0), mask=mask)
  updates, _ = opt.update(None, opt.init(params), params, loss_fn=loss_fn)
  gradient = jax.grad(lambda p: loss_fn(p).value)(params)["w_rec"]
  expected = np.where(only, gradient, 0.0)
  np.testing.assert_allclose(updates["w_rec"], expected, rtol=1e-5, atol=1e-8)


def test_traced_entry_mask_from_a_callable():
  """A callable may build the mask from the (traced) params inside jit."""
  params, _, loss_fn = _rnn_problem(4)
  params["w_rec"] = params["w_rec"] * (np.abs(params["w_rec"]) > 0.3)  # pruned
  nonzero = lambda p: {**jax.tree.map(lambda _: True, p), "w_rec": p["w_rec"] != 0}
  opt = sofo_jax.sofo(0.5, 4, 1e-3, key=jax.random.key(0), adaptive=False, mask=nonzero)
  step = jax.jit(lambda p, s: opt.update(None, s, p, loss_fn=loss_fn))
  updates, _ = step(params, opt.init(params))
  pruned = np.asarray(params["w_rec"]) == 0
  assert pruned.any() and np.all(np.asarray(updates["w_rec"])[pruned] == 0)
  assert np.all(np.asarray(updates["w_rec"])[~pruned] != 0)


# Against the dense reference -------------------------------------------------------


def _restricted_problem(model, seed):
  rng = np.random.default_rng(seed)
  if model == "mlp":
    params = models.mlp_params(rng, [N_IN, 3, N_OUT])
    x = rng.normal(size=(B, N_IN))
    targets = rng.normal(size=(B, N_OUT))
    outputs_fn = lambda p: models.mlp(p, x)
    mask = [
      {"w": rng.random((N_IN, 3)) < 0.6, "b": False},
      {"w": True, "b": np.array([True, False])},
    ]
  else:
    params = models.rnn_params(rng, N_IN, 3, N_OUT)
    xs = rng.normal(size=(T, B, N_IN))
    targets = rng.normal(size=(T, B, N_OUT))
    outputs_fn = lambda p: models.rnn_outputs(p, xs)
    mask = {
      "w_rec": rng.random((3, 3)) < 0.5,
      "w_in": True,
      "bias": False,
      "w_out": rng.random((N_OUT, 3)) < 0.6,
      "b_out": True,
    }
  loss_fn = lambda p: losses.mse(outputs_fn(p), targets)
  loss_of_outputs = lambda y: jnp.mean(jnp.sum((y - targets) ** 2, -1))
  return params, mask, outputs_fn, loss_fn, loss_of_outputs


def _restricted_step(params, mask, outputs_fn, loss_of_outputs, damping, relative):
  """The dense damped Gauss–Newton step on the trainable entries, zero elsewhere."""
  gradient, gauss_newton = reference.dense_gauss_newton(
    params, outputs_fn, loss_of_outputs
  )
  free = ~ravel_pytree(_frozen(mask, params))[0].astype(bool)
  step = reference.damped_gauss_newton_step(
    gradient[free], gauss_newton[np.ix_(free, free)], damping, relative
  )
  return np.asarray(jnp.zeros(gradient.size).at[free].set(step)), int(free.sum())


@pytest.mark.parametrize("model", ["mlp", "rnn"])
@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("traced_mask", [False, True])
def test_masked_step_equals_restricted_damped_gauss_newton(
  x64, model, relative, traced_mask
):
  params, mask, outputs_fn, loss_fn, loss_of_outputs = _restricted_problem(model, 5)
  damping = 1e-3
  expected, num_free = _restricted_step(
    params, mask, outputs_fn, loss_of_outputs, damping, relative
  )
  # A mask computed from the params inside jit is traced (leaf-level bools
  # become traced all-True or all-False arrays); both must give the same step.
  traced = lambda p: jax.tree.map(lambda m, x: jnp.logical_and(m, x == x), mask, p)
  as_given = traced if traced_mask else mask
  opt = sofo_jax.sofo(
    1.0,
    num_free,
    damping,
    key=jax.random.key(3),
    adaptive=False,
    tangent_distribution="orthonormal",
    relative_damping=relative,
    mask=as_given,
  )
  updates, _ = jax.jit(lambda p, s: opt.update(None, s, p, loss_fn=loss_fn))(
    params, opt.init(params)
  )
  flat = ravel_pytree(updates)[0]
  assert jnp.max(jnp.abs(flat + expected)) <= 1e-8 * np.max(np.abs(expected))


def test_adaptive_masked_step_on_a_quadratic_equals_restricted_gauss_newton(x64):
  """Step control at its defaults (no momentum, so all K = P_trainable tangents are fresh)."""
  rng = np.random.default_rng(6)
  x, y = rng.normal(size=(12, 4)), rng.normal(size=(12, 2))
  params = {"w": rng.normal(size=(4, 2)), "b": rng.normal(size=(2,))}
  mask = {"w": rng.random((4, 2)) < 0.5, "b": np.array([False, True])}
  outputs_fn = lambda p: x @ p["w"] + p["b"]
  loss_of_outputs = lambda out: jnp.mean(jnp.sum((out - y) ** 2, -1))
  expected, num_free = _restricted_step(
    params, mask, outputs_fn, loss_of_outputs, 1e-3, True
  )
  opt = sofo_jax.sofo(
    1.0,
    num_free,
    1e-3,
    key=jax.random.key(2),
    momentum=False,
    tangent_distribution="orthonormal",
    mask=mask,
  )
  updates, state = opt.update(
    None, opt.init(params), params, loss_fn=lambda p: losses.mse(outputs_fn(p), y)
  )
  assert not sofo_jax.get_diagnostics(state).step_rejected
  flat = ravel_pytree(updates)[0]
  assert jnp.max(jnp.abs(flat + expected)) <= 1e-8 * np.max(np.abs(expected))


# Bad masks --------------------------------------------------------------------------


PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}


@pytest.mark.parametrize(
  "mask, match",
  [
    (
      {"w": np.ones((3, 2)), "b": True},
      r"mask\['w'\] must have dtype bool \(True = trainable entry\); got float64",
    ),
    (
      {"w": np.ones((2, 3), bool), "b": True},
      r"mask\['w'\] has shape \(2, 3\), but the parameter it masks has shape \(3, 2\)",
    ),
    ({"w": True, "b": np.ones((1, 2), bool)}, r"mask\['b'\] has shape \(1, 2\)"),
    (
      np.ones((3, 2), bool),
      r"mask is an array, so it must stand for a single parameter leaf",
    ),
  ],
  ids=["float_dtype", "transposed", "extra_axis", "array_for_a_subtree"],
)
@pytest.mark.parametrize(
  "factory",
  [
    lambda mask: sofo_jax.sofo(1.0, 2, key=jax.random.key(0), mask=mask),
    lambda mask: sofo_jax.forward_gradient(0.1, 2, key=jax.random.key(0), mask=mask),
  ],
  ids=["sofo", "forward_gradient"],
)
def test_bad_entry_masks_raise_clear_errors(factory, mask, match):
  with pytest.raises(ValueError, match=match):
    factory(mask).init(PARAMS)
  with pytest.raises(ValueError, match=match):
    sofo_jax.sample_tangents(jax.random.key(0), PARAMS, 2, mask=mask)


def test_traced_entry_mask_of_the_wrong_shape_fails_at_trace_time():
  opt = sofo_jax.sofo(
    1.0, 2, key=jax.random.key(0), mask=lambda p: {"w": p["w"][:2] > 0, "b": True}
  )
  with pytest.raises(ValueError, match=r"mask\['w'\] has shape \(2, 2\)"):
    jax.jit(opt.init)(PARAMS)  # the mask is a tracer here


# Dale's law ----------------------------------------------------------------------------

N_EI, N_EXC, T_EI, B_EI = 10, 8, 12, 8
SIGNS = np.where(np.arange(N_EI) < N_EXC, 1.0, -1.0)  # presynaptic: E +, I -


def _ei_data(seed=0):
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(T_EI, B_EI, 2)).astype(np.float32)
  targets = np.tanh(np.cumsum(xs, 0) / 3).astype(np.float32)
  return rng, xs, targets


def _ei_loss(w_rec, params, xs, targets):
  """A leaky ReLU-rate network: Δh = 0.2 (−h + relu(W h + U x)); W[i, j] from j to i."""

  def step(carry, inputs):
    h, total = carry
    x, target = inputs
    h = 0.8 * h + 0.2 * jax.nn.relu(h @ w_rec.T + x @ params["w_in"].T)
    return (h, total + losses.mse(h @ params["w_out"].T, target)), None

  h0 = jnp.zeros((xs.shape[1], N_EI))
  (_, total), _ = jax.lax.scan(step, (h0, losses.zero()), (xs, targets))
  return total / xs.shape[0]


def _violations(w_rec):
  """Entries whose sign differs from their presynaptic neuron's (column's) sign."""
  return int(np.sum(np.asarray(w_rec) * SIGNS[None, :] < 0))


def test_dale_by_parametrisation_with_sparse_connectivity():
  """W = |W̃| D, D = diag(±1): the optimiser trains W̃ freely; absent synapses are masked."""
  rng, xs, targets = _ei_data()
  connectivity = rng.random((N_EI, N_EI)) < 0.5
  params = {
    "w_tilde": np.where(connectivity, rng.normal(size=(N_EI, N_EI)) / N_EI, 0.0).astype(
      np.float32
    ),
    "w_in": rng.normal(size=(N_EI, 2)).astype(np.float32),
    "w_out": (rng.normal(size=(2, N_EI)) / np.sqrt(N_EI)).astype(np.float32),
  }
  effective = lambda p: jnp.abs(p["w_tilde"]) * SIGNS[None, :]
  loss_fn = lambda p: _ei_loss(effective(p), p, xs, targets)
  mask = {"w_tilde": connectivity, "w_in": True, "w_out": True}
  opt = sofo_jax.sofo(1.0, 8, key=jax.random.key(0), mask=mask)
  state = opt.init(params)

  @jax.jit
  def step(p, s):
    updates, s = opt.update(None, s, p, loss_fn=loss_fn)
    return optax.apply_updates(p, updates), s

  start_loss = float(loss_fn(params).value)
  start = params
  for _ in range(10):
    params, state = step(params, state)
    assert _violations(effective(params)) == 0
  assert float(loss_fn(params).value) < start_loss
  w_tilde = np.asarray(params["w_tilde"])
  assert np.all(w_tilde[~connectivity] == 0)  # absent synapses stay absent
  assert np.all(w_tilde[connectivity] != np.asarray(start["w_tilde"])[connectivity])


def test_dale_and_bounds_by_projection_after_the_step():
  """W = M D with M >= 0 kept by optax.projections after each step; a leak kept in a box."""
  rng, xs, targets = _ei_data(1)
  params = {
    "magnitude": (0.05 * np.abs(rng.normal(size=(N_EI, N_EI)))).astype(np.float32),
    "w_in": rng.normal(size=(N_EI, 2)).astype(np.float32),
    "w_out": (rng.normal(size=(2, N_EI)) / np.sqrt(N_EI)).astype(np.float32),
    "leak": np.float32(0.2),
  }
  lower, upper = 0.05, 0.25

  def loss_fn(p):
    w_rec = p["magnitude"] * SIGNS[None, :]

    def step(carry, inputs):
      h, total = carry
      x, target = inputs
      h = h + p["leak"] * (-h + jax.nn.relu(h @ w_rec.T + x @ p["w_in"].T))
      return (h, total + losses.mse(h @ p["w_out"].T, target)), None

    (_, total), _ = jax.lax.scan(
      step, (jnp.zeros((B_EI, N_EI)), losses.zero()), (xs, targets)
    )
    return total / T_EI

  opt = sofo_jax.sofo(1.0, 8, key=jax.random.key(1))
  state = opt.init(params)

  @jax.jit
  def step(p, s):
    updates, s = opt.update(None, s, p, loss_fn=loss_fn)
    p = optax.apply_updates(p, updates)
    clipped = jnp.sum(p["magnitude"] < 0)  # what the projection undoes
    p["magnitude"] = optax.projections.projection_non_negative(p["magnitude"])
    p["leak"] = optax.projections.projection_box(p["leak"], lower, upper)
    return p, s, clipped

  start_loss = float(loss_fn(params).value)
  total_clipped = 0
  for _ in range(10):
    params, state, clipped = step(params, state)
    total_clipped += int(clipped)
    assert _violations(params["magnitude"] * SIGNS[None, :]) == 0
    assert lower <= float(params["leak"]) <= upper
  assert total_clipped > 0  # the projection was needed
  assert float(loss_fn(params).value) < start_loss
