"""Rough edges a new user hits, each pinned by a test.

Auxiliary outputs in forward gradients, a state structure that changes
under ``lax.scan``, keys of the wrong shape or donated away, progress bars
in log files, and the README's list of extras.
"""

import io
import re
import tomllib
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sofo_jax
from sofo_jax import training
from sofo_jax.tasks import flip_flop

ROOT = Path(__file__).resolve().parents[1]
X = jax.random.normal(jax.random.key(1), (16, 3))
Y = X @ jnp.array([[1.0], [-2.0], [0.5]])
PARAMS = {"w": jnp.zeros((3, 1))}


def loss_with_aux(p):
  outputs = X @ p["w"]
  return sofo_jax.losses.mse(outputs, Y), {"mean_output": jnp.mean(outputs)}


def plain_loss(p):
  return loss_with_aux(p)[0]


# forward_gradient's aux ------------------------------------------------------------


def test_forward_gradient_keeps_the_aux_in_its_state():
  opt = sofo_jax.forward_gradient(0.1, 3, key=jax.random.key(0), has_aux=True)
  state = opt.init(PARAMS)
  params = {"w": jnp.ones((3, 1))}
  with pytest.warns(UserWarning, match="without aux_example"):
    _, state = opt.update(None, state, params, loss_fn=loss_with_aux)
  aux = sofo_jax.get_state(state).aux
  np.testing.assert_allclose(aux["mean_output"], jnp.mean(X @ params["w"]), rtol=1e-6)


def test_forward_gradient_refuses_a_pair_without_has_aux():
  opt = sofo_jax.forward_gradient(0.1, 3, key=jax.random.key(0))
  with pytest.raises(TypeError, match="has_aux=True"):
    opt.update(None, opt.init(PARAMS), PARAMS, loss_fn=loss_with_aux)


def test_forward_gradient_aux_example_makes_the_state_scannable():
  example = jax.eval_shape(lambda p: loss_with_aux(p)[1], PARAMS)
  opt = sofo_jax.forward_gradient(
    0.01, 3, key=jax.random.key(0), has_aux=True, aux_example=example
  )

  def body(carry, _):
    params, state = carry
    updates, state = opt.update(None, state, params, loss_fn=loss_with_aux)
    return (optax.apply_updates(params, updates), state), None

  (_, state), _ = jax.lax.scan(body, (PARAMS, opt.init(PARAMS)), length=3)
  assert int(sofo_jax.get_state(state).count) == 3


# SOFO's aux without aux_example ----------------------------------------------------


def test_aux_without_example_warns_and_says_what_to_pass():
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0), has_aux=True)
  with pytest.warns(UserWarning, match=r"aux_example=jax.eval_shape"):
    opt.update(None, opt.init(PARAMS), PARAMS, loss_fn=loss_with_aux)


def test_aux_example_gives_one_compilation_and_no_warning():
  example = jax.eval_shape(lambda p: loss_with_aux(p)[1], PARAMS)
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0), has_aux=True, aux_example=example)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(None, state, params, loss_fn=loss_with_aux)
    return optax.apply_updates(params, updates), state

  params, state = PARAMS, opt.init(PARAMS)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for _ in range(3):
      params, state = step(params, state)
  assert step._cache_size() == 1


# Docstrings point to what works on sofo()'s chained state ---------------------------


def test_docstrings_point_to_get_state_not_to_chain_attributes():
  doc = sofo_jax.scale_by_sofo.__doc__
  assert "get_state" in doc and "get_diagnostics" in doc
  assert not re.search(r"``state\.(aux|diagnostics)", doc)
  assert "ascending" in sofo_jax.SofoDiagnostics.__doc__
  # What the docstring points to works on sofo()'s state, a chain's tuple.
  opt = sofo_jax.sofo(
    1.0,
    2,
    key=jax.random.key(0),
    has_aux=True,
    aux_example=jax.eval_shape(lambda p: loss_with_aux(p)[1], PARAMS),
  )
  _, state = opt.update(None, opt.init(PARAMS), PARAMS, loss_fn=loss_with_aux)
  assert "mean_output" in sofo_jax.get_state(state).aux
  eigenvalues = np.asarray(sofo_jax.get_diagnostics(state).eigenvalues)
  assert np.all(np.diff(eigenvalues) >= 0)


# Gradients passed to forward gradients are an error too -----------------------------


def test_forward_gradient_refuses_gradients_passed_in():
  opt = sofo_jax.forward_gradient(0.1, 3, key=jax.random.key(0))
  grads = jax.grad(lambda p: plain_loss(p).value)({"w": jnp.ones((3, 1))})
  with pytest.raises(TypeError, match="SOFO must come first in a chain"):
    opt.update(grads, opt.init(PARAMS), PARAMS, loss_fn=plain_loss)


# Keys -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3,), (2, 2), (4,), ()])
def test_raw_key_of_the_wrong_shape_fails_at_construction(shape):
  bad = jnp.zeros(shape, jnp.uint32)
  for build in (
    lambda: sofo_jax.sofo(1.0, 2, key=bad),
    lambda: sofo_jax.forward_gradient(0.1, 2, key=bad),
  ):
    with pytest.raises(TypeError, match=r"uint32 of shape \(2,\)"):
      build()


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey])
def test_donating_the_state_deletes_neither_the_users_key_nor_later_inits(make_key):
  key = make_key(0)
  opt = sofo_jax.sofo(1.0, 2, key=key)

  def step(params, state):
    updates, state = opt.update(None, state, params, loss_fn=plain_loss)
    return optax.apply_updates(params, updates), state

  donated = jax.jit(step, donate_argnums=(0, 1))
  first = opt.init(PARAMS)
  expected_key = np.asarray(
    jax.random.key_data(key) if make_key is jax.random.key else key
  )
  params, _ = donated({"w": jnp.zeros((3, 1))}, first)
  again = opt.init(params)  # failed with "Array has been deleted"
  np.testing.assert_array_equal(sofo_jax.get_state(again).key, expected_key)
  np.testing.assert_array_equal(
    jax.random.key_data(key) if make_key is jax.random.key else key, expected_key
  )


# Progress bars in log files ---------------------------------------------------------


def test_progress_bar_does_not_flood_a_log_file(monkeypatch):
  pytest.importorskip("tqdm")
  log = io.StringIO()
  monkeypatch.setattr("sys.stderr", log)
  task = flip_flop.make(flip_flop.Config.quick())
  training.fit(task, "adam", 40, key=jax.random.key(0), chunk_size=2, progress=True)
  redraws = log.getvalue().count("\r")
  assert 0 < redraws <= 4, log.getvalue()


# The README's install section -------------------------------------------------------


def test_readme_install_section_lists_every_extra():
  extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
    "optional-dependencies"
  ]
  readme = (ROOT / "README.md").read_text()
  install = readme[readme.index("## Install") : readme.index("## Quickstart")]
  for extra in extras:
    assert f'".[{extra}]"' in install, extra


# Un-jitted updates compile once ----------------------------------------------------


@pytest.mark.parametrize(
  "build",
  [
    lambda: sofo_jax.sofo(1.0, 3, key=jax.random.key(0)),
    lambda: sofo_jax.forward_gradient(0.1, 3, key=jax.random.key(0)),
  ],
)
def test_eager_updates_trace_the_closure_once(build):
  """Outside jit, every update used to be compiled afresh (about a second
  and a few MB never freed, per call); now the closure is traced once and
  the compiled update reused."""
  traces = []

  def counting_loss(p):
    traces.append(1)  # runs only while JAX traces the closure
    return plain_loss(p)

  opt = build()
  params, state = PARAMS, opt.init(PARAMS)
  for _ in range(4):
    updates, state = opt.update(None, state, params, loss_fn=counting_loss)
    params = optax.apply_updates(params, updates)
  first = len(traces)
  for _ in range(4):
    updates, state = opt.update(None, state, params, loss_fn=counting_loss)
    params = optax.apply_updates(params, updates)
  assert len(traces) == first
  assert int(sofo_jax.get_state(state).count) == 8
  assert float(plain_loss(params).value) < float(plain_loss(PARAMS).value)


def test_eager_update_matches_the_jitted_one():
  opt = sofo_jax.sofo(1.0, 3, key=jax.random.key(0))
  state = opt.init(PARAMS)
  eager, _ = opt.update(None, state, PARAMS, loss_fn=plain_loss)
  jitted, _ = jax.jit(lambda s, p: opt.update(None, s, p, loss_fn=plain_loss))(
    state, PARAMS
  )
  np.testing.assert_array_equal(eager["w"], jitted["w"])
