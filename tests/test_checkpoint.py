"""Checkpoint and resume: bitwise-identical runs, clear errors, nothing lost.

Train N steps straight; or N/2, save, restore into fresh objects (a new
optimizer, a new jitted step, templates from ``init``) and N/2 more. The two
runs must agree bit for bit: the SOFO state carries its PRNG key as raw data,
so the resumed run draws the same tangents. A corrupted, truncated or
mismatched checkpoint raises an error that says what is wrong.
"""

import os
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("orbax.checkpoint")

# After a failed read, orbax's tensorstore callbacks can reach an event loop
# orbax has already closed; the error is raised and reported correctly, the
# late callbacks only print noise.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

import sofo_jax  # pylint: disable=g-import-not-at-top
from sofo_jax import checkpoint
from sofo_jax import losses

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(32, 2)), jnp.float32)
Y = jnp.stack([jnp.sin(X[:, 0]), X[:, 0] * X[:, 1]], -1)


class Net(eqx.Module):
  hidden: eqx.nn.Linear
  out: eqx.nn.Linear
  scale: jax.Array
  steps_seen: jax.Array  # an integer leaf the optimizer must not touch

  def __call__(self, x):
    return self.out(jnp.tanh(self.scale * self.hidden(x)))


def fresh_params():
  k1, k2 = jax.random.split(jax.random.key(7))
  return Net(eqx.nn.Linear(2, 8, key=k1), eqx.nn.Linear(8, 2, key=k2),
             jnp.asarray(1.0, jnp.bfloat16), jnp.asarray(0, jnp.int32))


def loss_fn(net):
  return losses.mse(jax.vmap(net)(X), Y)


OPTIMIZERS = {
    # A chain whose state mixes SOFO's key and diagnostics with other state.
    "sofo_chain": lambda k=4: optax.chain(
        optax.clip_by_global_norm(1.0),
        sofo_jax.scale_by_sofo(k, 1e-3, key=jax.random.key(3)),
        optax.scale_by_learning_rate(0.5)),
    "sofo_injected": lambda k=4: optax.inject_hyperparams(
        sofo_jax.sofo, static_args=("num_tangents", "key", "tangent_distribution"))(
            learning_rate=0.5, num_tangents=k, damping=1e-3,
            key=jax.random.PRNGKey(3), tangent_distribution="orthonormal"),
    "forward_gradient": lambda k=4: sofo_jax.forward_gradient(
        0.01, k, key=jax.random.key(3, impl="rbg")),
}


def make_run(opt):
  """A fresh jitted loop of ``n`` steps (as a resumed process would build)."""
  @jax.jit
  def run(params, state, n_steps):
    def body(_, carry):
      params, state = carry
      updates, state = opt.update(None, state, params, loss_fn=loss_fn)
      return optax.apply_updates(params, updates), state
    return jax.lax.fori_loop(0, n_steps, body, (params, state))
  return run


def assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resume_is_bitwise_identical(name, tmp_path):
  n = 8
  opt = OPTIMIZERS[name]()
  params0 = fresh_params()
  run = make_run(opt)
  straight = run(params0, opt.init(params0), n)

  half_params, half_state = run(params0, opt.init(params0), n // 2)
  checkpoint.save(tmp_path / "ckpt", half_params, half_state, step=n // 2)

  # A new process: new optimizer object, new templates, new compiled step.
  new_opt = OPTIMIZERS[name]()
  template = fresh_params()
  restored = checkpoint.restore(tmp_path / "ckpt", like=(template, new_opt.init(template)))
  assert restored.step == n // 2
  assert_bitwise_equal(restored.params, half_params)
  assert_bitwise_equal(restored.opt_state, half_state)
  resumed = make_run(new_opt)(restored.params, restored.opt_state, n - n // 2)

  assert_bitwise_equal(resumed, straight)
  assert int(sofo_jax.get_state(resumed[1]).count) == n
  assert int(resumed[0].steps_seen) == 0
  assert resumed[0].scale.dtype == jnp.bfloat16


def test_restore_into_abstract_templates_and_python_leaves(tmp_path):
  params = {"w": jnp.arange(3.0), "empty": jnp.zeros((0, 4)), "lr_scale": 0.5,
            "n": 3, "table": np.arange(4, dtype=np.int16)}
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0))
  state = opt.init(params)
  checkpoint.save(tmp_path / "c", params, state, step=np.int64(11))
  like = (params, jax.eval_shape(opt.init, params))
  restored = checkpoint.restore(str(tmp_path / "c"), like=like)
  assert restored.step == 11
  assert restored.params["lr_scale"] == 0.5 and isinstance(restored.params["lr_scale"], float)
  assert restored.params["n"] == 3 and isinstance(restored.params["n"], int)
  assert isinstance(restored.params["table"], np.ndarray)
  assert restored.params["empty"].shape == (0, 4)
  assert isinstance(restored.opt_state[0].key, jax.Array)
  assert_bitwise_equal(restored.opt_state, state)


def test_existing_checkpoint_is_kept_unless_overwrite(tmp_path):
  params = {"w": jnp.ones(2)}
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0))
  state = opt.init(params)
  checkpoint.save(tmp_path / "c", params, state, step=1)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    checkpoint.save(tmp_path / "c", {"w": jnp.zeros(2)}, state, step=2)
  assert checkpoint.restore(tmp_path / "c", like=(params, state)).step == 1
  checkpoint.save(tmp_path / "c", {"w": jnp.zeros(2)}, state, step=2, overwrite=True)
  restored = checkpoint.restore(tmp_path / "c", like=(params, state))
  assert restored.step == 2 and float(jnp.sum(restored.params["w"])) == 0.0
  # No staging or retired directories are left behind.
  assert sorted(os.listdir(tmp_path)) == ["c"]


# Mismatches: a clear error, never a silently wrong state -----------------------


@pytest.fixture
def saved(tmp_path):
  params = {"w": jnp.asarray(RNG.normal(size=(3, 2)), jnp.float32),
            "b": jnp.zeros(2), "big": jnp.asarray(RNG.normal(size=(40, 20)), jnp.float32)}
  opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(0))
  state = opt.init(params)
  path = checkpoint.save(tmp_path / "c", params, state, step=5)
  return path, params, state


def test_different_param_shapes(saved):
  path, params, state = saved
  other = dict(params, w=jnp.ones((3, 3)))
  with pytest.raises(ValueError, match=r"\['params'\]\['w'\]: checkpoint \(3, 2\) float32, like \(3, 3\) float32"):
    checkpoint.restore(path, like=(other, state))


def test_different_dtype(saved):
  path, params, state = saved
  other = dict(params, w=jnp.ones((3, 2), jnp.bfloat16))
  with pytest.raises(ValueError, match=r"\['w'\].*float32, like \(3, 2\) bfloat16"):
    checkpoint.restore(path, like=(other, state))


def test_different_num_tangents(saved):
  path, params, _ = saved
  state_k8 = sofo_jax.sofo(1.0, 8, key=jax.random.key(0)).init(params)
  with pytest.raises(ValueError, match=r"eigenvalues: checkpoint \(4,\) float32, like \(8,\).*num_tangents"):
    checkpoint.restore(path, like=(params, state_k8))


def test_different_param_structure(saved):
  path, params, state = saved
  with pytest.raises(ValueError, match=r"only in the checkpoint: \['params'\]\['b'\].*only in `like`: \['params'\]\['c'\]"):
    checkpoint.restore(path, like=(dict(params, c=params.pop("b")), state))


def test_different_optimizer(saved):
  path, params, _ = saved
  adam_state = optax.adam(1e-3).init(params)
  with pytest.raises(ValueError, match="does not match the structure of `like`"):
    checkpoint.restore(path, like=(params, adam_state))


def test_same_leaves_different_containers(saved):
  path, params, state = saved
  # One more stateless transform in the chain: no new leaves, a new structure.
  longer_chain = tuple(state) + (optax.EmptyState(),)
  with pytest.raises(ValueError, match=r"different tree structure.*First difference"):
    checkpoint.restore(path, like=(params, longer_chain))
  # A copy of the very same tree restores fine (the check is not over-eager).
  checkpoint.restore(path, like=(params, jax.tree.map(lambda x: x, state)))


def test_like_must_be_a_pair(saved):
  path, params, state = saved
  with pytest.raises(TypeError, match=r"like=\(params, opt_state\)"):
    checkpoint.restore(path, like=params)


def test_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint at"):
    checkpoint.restore(tmp_path / "nope", like=({}, ()))


def test_typed_key_leaves_are_refused_with_a_hint(tmp_path):
  with pytest.raises(TypeError, match=r"typed PRNG key.*jax.random.key_data"):
    checkpoint.save(tmp_path / "c", {"w": jnp.ones(2), "k": jax.random.key(0)}, ())
  assert not (tmp_path / "c").exists()


# Corruption ---------------------------------------------------------------------


def _data_files(path: pathlib.Path) -> list:
  skip = {"_CHECKPOINT_METADATA", "commit_success.txt", "_METADATA", "metadata"}
  return sorted(
      p for p in path.rglob("*")
      if p.is_file() and p.name not in skip and "metadata" not in p.parts
  )


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "delete"])
def test_corrupted_array_data(saved, damage):
  path, params, state = saved
  files = _data_files(path)
  assert files, "expected orbax data files"
  for file in files:
    data = file.read_bytes()
    if damage == "truncate":
      file.write_bytes(data[: len(data) // 2])
    elif damage == "overwrite":
      file.write_bytes(bytes(reversed(data)))
    else:
      file.unlink()
  with pytest.raises(ValueError, match="is corrupted"):
    checkpoint.restore(path, like=(params, state))


def test_flipped_bits_in_array_data_caught_by_checksum(saved):
  """Flipped bits inside an uncompressed data chunk decode without complaint;
  the SHA-256 recorded at save time catches them."""
  path, params, state = saved
  chunks = [p for p in _data_files(path) if p.parent.name == "d"]
  largest = max(chunks, key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
  largest.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="is corrupted"):
    checkpoint.restore(path, like=(params, state))


@pytest.mark.parametrize("damage", ["garbage", "empty", "delete"])
def test_corrupted_metadata(saved, damage):
  path, params, state = saved
  (meta,) = [p for p in path.rglob("metadata") if p.is_file()]
  if damage == "garbage":
    meta.write_text("{not json")
  elif damage == "empty":
    meta.write_text("")
  else:
    meta.unlink()
  with pytest.raises(ValueError, match="corrupted"):
    checkpoint.restore(path, like=(params, state))


def test_not_a_sofo_checkpoint(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
    c.save(tmp_path / "other", args=ocp.args.Composite(metadata=ocp.args.JsonSave({"x": 1})))
  with pytest.raises(ValueError, match="not a sofo_jax checkpoint"):
    checkpoint.restore(tmp_path / "other", like=({}, ()))


def test_interrupted_save_leaves_no_checkpoint(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  def crash(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(ocp.Checkpointer, "save", crash)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save(tmp_path / "c", {"w": jnp.ones(2)}, ())
  assert not (tmp_path / "c").exists()
  assert os.listdir(tmp_path) == []
