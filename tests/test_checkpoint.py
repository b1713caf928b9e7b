"""Checkpoint and resume: bitwise-identical runs, clear errors, nothing lost.

Train N steps straight; or N/2, save, restore into fresh objects (a new
optimizer, a new jitted step, templates from ``init``) and N/2 more. The two
runs must agree bit for bit: the SOFO state carries its PRNG key as raw data,
so the resumed run draws the same tangents. A corrupted, truncated or
mismatched checkpoint raises an error that says what is wrong.

Nothing is lost: two processes racing for one path (exactly one wins), an
overwrite killed between its two renames (``restore`` finds the checkpoint),
a save that fails (nothing is left behind), a restart (the structure is
stored as leaf paths and node types, not ``str(treedef)``). Scenarios that
need a process of their own run ``checkpoint_processes.py``.
"""

import gc
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import chex
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
pytestmark = pytest.mark.filterwarnings(
  "ignore::pytest.PytestUnraisableExceptionWarning"
)

import sofo_jax  # pylint: disable=g-import-not-at-top
from sofo_jax import checkpoint, losses


@pytest.fixture(autouse=True)
def _collect_orbax_leftovers():
  """Finalises orbax's abandoned read coroutines inside this module's tests.

  Left to the garbage collector, they surface later, under the filters of
  whichever test runs next in the process, as pages of unraisable-exception
  warnings.
  """
  yield
  gc.collect()


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
  return Net(
    eqx.nn.Linear(2, 8, key=k1),
    eqx.nn.Linear(8, 2, key=k2),
    jnp.asarray(1.0, jnp.bfloat16),
    jnp.asarray(0, jnp.int32),
  )


def loss_fn(net):
  return losses.mse(jax.vmap(net)(X), Y)


OPTIMIZERS = {
  # A chain whose state mixes SOFO's key and diagnostics with other state.
  "sofo_chain": lambda k=4: optax.chain(
    optax.clip_by_global_norm(1.0),
    sofo_jax.scale_by_sofo(k, 1e-3, key=jax.random.key(3)),
    optax.scale_by_learning_rate(0.5),
  ),
  "sofo_injected": lambda k=4: optax.inject_hyperparams(
    sofo_jax.sofo, static_args=("num_tangents", "key", "tangent_distribution")
  )(
    learning_rate=0.5,
    num_tangents=k,
    damping=1e-3,
    key=jax.random.PRNGKey(3),
    tangent_distribution="orthonormal",
  ),
  "forward_gradient": lambda k=4: sofo_jax.forward_gradient(
    0.01, k, key=jax.random.key(3, impl="rbg")
  ),
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
  restored = checkpoint.restore(
    tmp_path / "ckpt", like=(template, new_opt.init(template))
  )
  assert restored.step == n // 2
  assert_bitwise_equal(restored.params, half_params)
  assert_bitwise_equal(restored.opt_state, half_state)
  resumed = make_run(new_opt)(restored.params, restored.opt_state, n - n // 2)

  assert_bitwise_equal(resumed, straight)
  assert int(sofo_jax.get_state(resumed[1]).count) == n
  assert int(resumed[0].steps_seen) == 0
  assert resumed[0].scale.dtype == jnp.bfloat16


def test_restore_into_abstract_templates_and_python_leaves(tmp_path):
  params = {
    "w": jnp.arange(3.0),
    "empty": jnp.zeros((0, 4)),
    "lr_scale": 0.5,
    "n": 3,
    "table": np.arange(4, dtype=np.int16),
  }
  opt = sofo_jax.sofo(1.0, 2, key=jax.random.key(0))
  state = opt.init(params)
  checkpoint.save(tmp_path / "c", params, state, step=np.int64(11))
  like = (params, jax.eval_shape(opt.init, params))
  restored = checkpoint.restore(str(tmp_path / "c"), like=like)
  assert restored.step == 11
  assert restored.params["lr_scale"] == 0.5 and isinstance(
    restored.params["lr_scale"], float
  )
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
  params = {
    "w": jnp.asarray(RNG.normal(size=(3, 2)), jnp.float32),
    "b": jnp.zeros(2),
    "big": jnp.asarray(RNG.normal(size=(40, 20)), jnp.float32),
  }
  opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(0))
  state = opt.init(params)
  path = checkpoint.save(tmp_path / "c", params, state, step=5)
  return path, params, state


@pytest.mark.parametrize(
  "shape, dtype, match",
  [
    (
      (3, 3),
      jnp.float32,
      r"\['params'\]\['w'\]: checkpoint \(3, 2\) float32, like \(3, 3\) float32",
    ),
    (
      (3, 2),
      jnp.bfloat16,
      r"\['params'\]\['w'\]: checkpoint \(3, 2\) float32, like \(3, 2\) bfloat16",
    ),
  ],
  ids=["shape", "dtype"],
)
def test_different_param_shape_or_dtype(saved, shape, dtype, match):
  path, params, state = saved
  other = dict(params, w=jnp.ones(shape, dtype))
  with pytest.raises(ValueError, match=match):
    checkpoint.restore(path, like=(other, state))


def test_different_num_tangents(saved):
  path, params, _ = saved
  state_k8 = sofo_jax.sofo(1.0, 8, key=jax.random.key(0)).init(params)
  with pytest.raises(
    ValueError,
    match=r"eigenvalues: checkpoint \(4,\) float32, like \(8,\).*num_tangents",
  ):
    checkpoint.restore(path, like=(params, state_k8))


def test_different_param_structure(saved):
  path, params, state = saved
  with pytest.raises(
    ValueError,
    match=r"only in the checkpoint: \['params'\]\['b'\].*only in `like`: \['params'\]\['c'\]",
  ):
    checkpoint.restore(path, like=(dict(params, c=params.pop("b")), state))


def test_different_optimizer(saved):
  path, params, _ = saved
  adam_state = optax.adam(1e-3).init(params)
  with pytest.raises(ValueError, match="does not match the structure of `like`"):
    checkpoint.restore(path, like=(params, adam_state))


def test_same_leaves_different_containers(saved):
  path, params, state = saved
  # One more stateless transform in the chain: no new leaves, a new structure.
  longer_chain = (*tuple(state), optax.EmptyState())
  with pytest.raises(ValueError, match=r"different tree structure.*First difference"):
    checkpoint.restore(path, like=(params, longer_chain))
  # A copy of the very same tree restores fine (the check is not over-eager).
  checkpoint.restore(path, like=(params, jax.tree.map(lambda x: x, state)))


def test_like_must_be_a_pair(saved):
  path, params, _state = saved
  with pytest.raises(TypeError, match=r"like=\(params, opt_state\)"):
    checkpoint.restore(path, like=params)


def test_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint at"):
    checkpoint.restore(tmp_path / "nope", like=({}, ()))


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_typed_keys_round_trip_through_key_data(tmp_path, impl):
  key = jax.random.key(0, impl=impl)
  params = {
    "w": jnp.ones(2),
    "key": key,
    "keys": jax.random.split(key, 3),
    "no_keys": jax.random.split(key, 0),
  }
  checkpoint.save(tmp_path / "c", params, (), step=1)
  for like in (params, jax.eval_shape(lambda: params)):
    restored = checkpoint.restore(tmp_path / "c", like=(like, ()))
    for name in ("key", "keys", "no_keys"):
      assert restored.params[name].dtype == params[name].dtype
      assert_bitwise_equal(
        jax.random.key_data(restored.params[name]), jax.random.key_data(params[name])
      )
  other = "rbg" if impl != "rbg" else "threefry2x32"
  like = dict(params, key=jax.random.key(0, impl=other))
  with pytest.raises(ValueError, match=r"\['params'\]\['key'\]: checkpoint \(\) key<"):
    checkpoint.restore(tmp_path / "c", like=(like, ()))


# Corruption ---------------------------------------------------------------------


def _data_files(path: pathlib.Path) -> list:
  skip = {"_CHECKPOINT_METADATA", "commit_success.txt", "_METADATA", "metadata"}
  return sorted(
    p
    for p in path.rglob("*")
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
  data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
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
    c.save(
      tmp_path / "other", args=ocp.args.Composite(metadata=ocp.args.JsonSave({"x": 1}))
    )
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


# Failed saves write nothing ----------------------------------------------------


@pytest.mark.parametrize(
  "bad",
  ["a string", lambda x: x, np.array(["a", "b"]), object()],
  ids=["str", "function", "str_array", "object"],
)
def test_unsaveable_leaf_is_a_type_error_before_anything_is_written(tmp_path, bad):
  with pytest.raises(TypeError, match=r"Leaf \['params'\]\['bad'\] .*cannot be saved"):
    checkpoint.save(tmp_path / "c", {"w": jnp.ones(2), "bad": bad}, ())
  assert os.listdir(tmp_path) == []


def test_failed_write_leaves_no_temporary_directory(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  seen = []

  async def disk_full(self, *args, **kwargs):
    seen.extend(os.listdir(tmp_path))  # orbax's temporary directory exists by now
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", disk_full)
  with pytest.raises(OSError, match="No space left"):
    checkpoint.save(tmp_path / "c", {"w": jnp.ones(2)}, ())
  assert any("orbax-checkpoint-tmp" in name for name in seen), seen
  assert os.listdir(tmp_path) == []
  time.sleep(1.0)  # orbax's other writer threads do not come back
  assert os.listdir(tmp_path) == []


# The manifest is sealed by a checksum ----------------------------------------------


def _flip(file: pathlib.Path, bit: int) -> bytes:
  """Flips one bit of ``file``; returns the original bytes."""
  data = file.read_bytes()
  flipped = bytearray(data)
  flipped[bit // 8] ^= 1 << (bit % 8)
  file.write_bytes(bytes(flipped))
  return data


def test_any_bit_flip_in_the_manifest_is_a_value_error(saved):
  """Every bit of the step's digits and of its key, and 60 random bits: a
  flip never changes the step silently and never raises a KeyError."""
  path, params, state = saved
  (manifest,) = [p for p in path.rglob("metadata") if p.is_file()]
  text = manifest.read_bytes()
  start = text.index(b'"step": 5') + 1
  bits = list(range(8 * start, 8 * (start + len('step": 5'))))
  bits += list(np.random.default_rng(1).choice(8 * len(text), 60, replace=False))
  for bit in bits:
    original = _flip(manifest, int(bit))
    with pytest.raises(ValueError, match="corrupted"):
      checkpoint.restore(path, like=(params, state))
    manifest.write_bytes(original)
  assert checkpoint.restore(path, like=(params, state)).step == 5


def test_bit_flips_in_orbax_files_never_change_the_state_silently(saved):
  """orbax's own files (its JSON, OCDBT manifests, array data): a flipped bit
  either raises the documented ValueError or leaves the state unchanged."""
  path, params, state = saved
  files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != "metadata")
  rng = np.random.default_rng(2)
  outcomes = {"ValueError": 0, "unchanged": 0}
  for file in files:
    for bit in rng.choice(8 * file.stat().st_size, 3, replace=False):
      original = _flip(file, int(bit))
      try:
        restored = checkpoint.restore(path, like=(params, state))
      except ValueError:
        outcomes["ValueError"] += 1
      else:
        assert restored.step == 5
        assert_bitwise_equal(restored.params, params)
        assert_bitwise_equal(restored.opt_state, state)
        outcomes["unchanged"] += 1
      file.write_bytes(original)
  assert outcomes["ValueError"] > 0, outcomes


# Concurrent saves: one atomic decision -----------------------------------------------


SCRIPT = pathlib.Path(__file__).parent / "checkpoint_processes.py"


def _run(*args, timeout=120):
  """Runs checkpoint_processes.py; kills it if it overstays."""
  process = subprocess.Popen(
    [sys.executable, str(SCRIPT), *map(str, args)],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    out, err = process.communicate(timeout=timeout)
  finally:
    process.kill()
  return process.returncode, out, err


def test_two_processes_racing_for_one_path_exactly_one_wins(tmp_path):
  rounds = 6
  processes = [
    subprocess.Popen(
      [sys.executable, str(SCRIPT), "race", str(tmp_path), str(rounds), str(who)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for who in (0, 1)
  ]
  try:
    results = [process.communicate(timeout=120) for process in processes]
  finally:
    for process in processes:
      process.kill()
  for process, (_, err) in zip(processes, results):
    assert process.returncode == 0, err[-3000:]
  outcomes = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
  import checkpoint_processes  # pylint: disable=g-import-not-at-top

  for r in range(rounds):
    pair = [outcomes[0][r], outcomes[1][r]]
    assert sorted(o == "saved" for o in pair) == [False, True], (r, pair)
    winner = pair.index("saved")
    loser_message = pair[1 - winner]
    # Forced rounds (even): both passed the existence check; the rename decided.
    expected = (
      "Another save created" if r % 2 == 0 else "Another save created|already exists"
    )
    assert re.search(f"FileExistsError: ({expected})", loser_message), loser_message
    like = checkpoint_processes.race_params(0)
    like = (like, checkpoint_processes.optimizer().init(like))
    restored = checkpoint.restore(tmp_path / str(r), like=like)
    assert restored.step == winner
    assert_bitwise_equal(restored.params, checkpoint_processes.race_params(winner))
  # Nothing of the losers is left behind.
  assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


# A structure that survives a restart ---------------------------------------------------


def test_static_function_field_restores_in_another_process(tmp_path):
  """The manifest holds leaf paths and node types, not ``str(treedef)`` with
  the address of the model's activation function, which differs here."""
  code, _, err = _run("save-model", tmp_path / "c")
  assert code == 0, err[-3000:]
  import checkpoint_processes  # pylint: disable=g-import-not-at-top

  net = checkpoint_processes.model()
  opt = checkpoint_processes.optimizer()
  restored = checkpoint.restore(tmp_path / "c", like=(net, opt.init(net)))
  assert restored.step == 3
  assert restored.params.activation is jax.nn.relu
  assert_bitwise_equal(restored.params, net)
  assert " at 0x" not in (tmp_path / "c" / "metadata" / "metadata").read_text()


# Overwrite: atomic where it can be, recoverable where it cannot ------------------------


def test_overwrite_failing_between_its_renames_keeps_the_old_checkpoint(
  saved, monkeypatch
):
  path, params, state = saved
  rename = os.rename

  def failing_rename(source, target):
    if os.fspath(target) == str(path) and ".partial-" in os.fspath(source):
      raise KeyboardInterrupt
    return rename(source, target)

  monkeypatch.setattr(os, "rename", failing_rename)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save(
      path, jax.tree.map(jnp.zeros_like, params), state, step=6, overwrite=True
    )
  monkeypatch.setattr(os, "rename", rename)
  restored = checkpoint.restore(path, like=(params, state))
  assert restored.step == 5
  assert_bitwise_equal(restored.params, params)
  assert os.listdir(path.parent) == [path.name]


def test_overwrite_killed_between_its_renames_is_recovered_by_restore(tmp_path):
  path = tmp_path / "c"
  code, _, err = _run("crash-between-renames", path)
  assert code == 17, err[-3000:]
  assert not path.exists()  # the crash left both checkpoints under hidden names
  import checkpoint_processes  # pylint: disable=g-import-not-at-top

  params = {"w": jnp.zeros(3)}
  like = (params, checkpoint_processes.optimizer().init(params))
  with pytest.warns(RuntimeWarning, match="overwrite was interrupted"):
    restored = checkpoint.restore(path, like=like)
  assert restored.step == 2 and float(restored.params["w"].sum()) == 3.0  # the new one
  # If the new one is damaged, the old one is restored.
  (new,) = tmp_path.glob(".c.partial-*")
  (new / "metadata" / "metadata").write_text("{}")
  with pytest.warns(RuntimeWarning, match="overwrite was interrupted"):
    assert checkpoint.restore(path, like=like).step == 1
  # A later save to the path works as usual and restore then reads it.
  checkpoint.save(path, params, like[1], step=3)
  assert checkpoint.restore(path, like=like).step == 3


@pytest.mark.parametrize("kind", ["file", "symlink", "directory"])
def test_overwrite_refuses_what_is_not_a_checkpoint_before_writing(tmp_path, kind):
  params = {"w": jnp.ones(2)}
  state = sofo_jax.sofo(1.0, 2, key=jax.random.key(0)).init(params)
  target = tmp_path / "c"
  if kind == "file":
    target.write_text("notes")
  elif kind == "symlink":
    checkpoint.save(tmp_path / "real", params, state, step=1)
    target.symlink_to(tmp_path / "real")
  else:
    target.mkdir()
    (target / "notes.txt").write_text("keep me")

  def snapshot():
    return sorted(
      (
        str(p.relative_to(tmp_path)),
        p.is_symlink(),
        p.read_bytes() if p.is_file() and not p.is_symlink() else b"",
      )
      for p in tmp_path.rglob("*")
    )

  before = snapshot()
  with pytest.raises(FileExistsError, match="Nothing was written"):
    checkpoint.save(target, params, state, step=2, overwrite=True)
  assert snapshot() == before


# Manager: a directory of steps on orbax's CheckpointManager ----------------------------


@pytest.mark.parametrize("async_save", [False, True])
def test_resume_through_a_manager_is_bitwise_identical(tmp_path, async_save):
  n = 6
  opt = OPTIMIZERS["sofo_chain"]()
  params0 = fresh_params()
  run = make_run(opt)
  straight = run(params0, opt.init(params0), n)
  with checkpoint.Manager(
    tmp_path / "run", max_to_keep=2, async_save=async_save
  ) as manager:
    params, state = params0, opt.init(params0)
    for step in range(1, n // 2 + 1):
      params, state = run(params, state, 1)
      manager.save(step, params, state)
  assert sorted(os.listdir(tmp_path / "run")) == ["2", "3"]

  new_opt = OPTIMIZERS["sofo_chain"]()
  template = fresh_params()
  with checkpoint.Manager(tmp_path / "run") as manager:
    assert manager.latest_step() == 3 and manager.all_steps() == [2, 3]
    restored = manager.restore(like=(template, new_opt.init(template)))
  assert restored.step == 3
  resumed = make_run(new_opt)(restored.params, restored.opt_state, n - 3)
  assert_bitwise_equal(resumed, straight)
  # A step directory is in the format of save(): restore() reads it too.
  again = checkpoint.restore(
    tmp_path / "run" / "3", like=(template, new_opt.init(template))
  )
  assert_bitwise_equal(again.opt_state, restored.opt_state)


def test_manager_restores_the_newest_intact_step(tmp_path, saved):
  _, params, state = saved
  with checkpoint.Manager(tmp_path / "run") as manager:
    manager.save(1, params, state)
    manager.save(2, jax.tree.map(jnp.zeros_like, params), state)
    _flip(tmp_path / "run" / "2" / "metadata" / "metadata", 8 * 40)
    with pytest.warns(RuntimeWarning, match="Skipping step 2"):
      restored = manager.restore(like=(params, state))
    assert restored.step == 1
    assert_bitwise_equal(restored.params, params)
    with pytest.raises(ValueError, match="corrupted"):
      manager.restore(like=(params, state), step=2)
    # A checkpoint that does not fit `like` is an error, not a reason to go back.
    state_k8 = sofo_jax.sofo(1.0, 8, key=jax.random.key(0)).init(params)
    manager.save(3, params, state_k8)
    with pytest.raises(ValueError, match="eigenvalues"):
      manager.restore(like=(params, state))


def test_manager_refuses_steps_that_do_not_increase(tmp_path):
  params = {"w": jnp.ones(2)}
  with checkpoint.Manager(tmp_path / "run") as manager:
    with pytest.raises(FileNotFoundError, match="No checkpoint in"):
      manager.restore(like=(params, ()))
    manager.save(5, params, ())
    with pytest.raises(ValueError, match="newest saved step is 5"):
      manager.save(3, params, ())
    with pytest.raises(TypeError, match="cannot be saved"):
      manager.save(6, {"w": "text"}, ())
    with pytest.raises(FileNotFoundError, match="No step 4"):
      manager.restore(like=(params, ()), step=4)
    assert manager.all_steps() == [5]


# Checkpoints of the first format ----------------------------------------------------

VERSION_1 = pathlib.Path(__file__).parent / "data" / "checkpoint_v1"


def _version_1_like():
  params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros((3,))}
  return params, optax.adam(1e-3).init(params)


def test_a_version_1_checkpoint_still_restores(tmp_path):
  """Written by the first format (leaf_00000 names, str(treedef)): nothing a
  user saved is lost with the new format."""
  copy = tmp_path / "old"
  shutil.copytree(VERSION_1, copy)
  restored = checkpoint.restore(copy, like=_version_1_like())
  assert restored.step == 7
  np.testing.assert_array_equal(restored.params["w"], np.arange(6.0).reshape(2, 3))
  np.testing.assert_array_equal(restored.params["b"], np.full(3, 0.5))
  assert int(restored.opt_state[0].count) == 1
  np.testing.assert_allclose(
    restored.opt_state[0].mu["w"], 0.1 * np.arange(6.0).reshape(2, 3)
  )


TUPLE_LAYOUT = pathlib.Path(__file__).parent / "data" / "checkpoint_v2_sofo_tuple_state"


def _tuple_layout_run(steps):
  """The run saved in TUPLE_LAYOUT after 2 steps by the sofo_jax of
  2026-12-04, whose SOFO state kept last_update and recycled as tuples of
  the trained leaves."""
  params = {
    "w": jnp.arange(6.0).reshape(2, 3) / 10,
    "b": jnp.full((3,), 0.5),
    "frozen": jnp.ones((3,)),
    "n": jnp.array(3),
  }
  mask = {"w": True, "b": True, "frozen": False, "n": False}
  x = jnp.linspace(-1, 1, 8).reshape(4, 2)

  def loss_fn(p):
    out = jnp.tanh(x @ p["w"] + p["b"]) * p["frozen"]
    return losses.mse(out, jnp.full_like(out, 0.3))

  opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(0), mask=mask, num_recycled=1)
  state = opt.init(params)
  like = (params, state)
  for _ in range(steps):
    updates, state = opt.update(None, state, params, loss_fn=loss_fn)
    params = optax.apply_updates(params, updates)
  return like, params, state, opt, loss_fn


def test_a_sofo_state_saved_with_tuple_buffers_restores_into_the_new_layout(tmp_path):
  """Nothing a user saved is lost when the state's layout changes: the
  buffers come back shaped like the params, each array in its own place."""
  copy = tmp_path / "old"
  shutil.copytree(TUPLE_LAYOUT, copy)
  like, params, state, opt, loss_fn = _tuple_layout_run(steps=2)
  restored = checkpoint.restore(copy, like=like)
  assert restored.step == 2
  inner = sofo_jax.get_state(restored.opt_state)
  assert isinstance(inner.last_update["frozen"], optax.MaskedNode)
  assert isinstance(inner.recycled["n"], optax.MaskedNode)
  assert inner.recycled["w"].shape == (1, 2, 3)
  assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state)
  # The same two steps run now: every array where this code puts it (the
  # leaves differ, so a swap would show). Rounding may differ by CPU.
  chex.assert_trees_all_close(restored.params, params, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(restored.opt_state, state, rtol=1e-5, atol=1e-7)
  # It trains on, and the new layout saves and restores as such.
  _, resumed = opt.update(None, restored.opt_state, restored.params, loss_fn=loss_fn)
  assert jax.tree.structure(resumed) == jax.tree.structure(state)
  checkpoint.save(tmp_path / "new", restored.params, resumed, step=3)
  again = checkpoint.restore(tmp_path / "new", like=like)
  chex.assert_trees_all_equal(again.opt_state, resumed)


@pytest.mark.parametrize("container", [list, tuple, dict])
def test_old_and_new_buffer_layouts_both_restore(tmp_path, container):
  """Where the two layouts have the same leaf paths (params in a list or a
  tuple), the stored structure tells them apart."""
  from sofo_jax._src import legacy_layout

  leaves = [jnp.linspace(0.0, 1.0, 3), jnp.ones((2, 3))]
  params = dict(zip("ab", leaves)) if container is dict else container(leaves)
  x = jnp.linspace(-1, 1, 8).reshape(4, 2)

  def loss_fn(p):
    b, w = jax.tree.leaves(p)
    return losses.mse(jnp.tanh(x @ w) + b, jnp.full((4, 3), 0.3))

  opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(0), num_recycled=1)
  like = (params, opt.init(params))
  _, state = opt.update(None, like[1], params, loss_fn=loss_fn)
  old_state = legacy_layout.to_tuple_layout(state)
  for name, saved in (("new", state), ("old", old_state)):
    checkpoint.save(tmp_path / name, params, saved, step=1)
    restored = checkpoint.restore(tmp_path / name, like=like)
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state)
    chex.assert_trees_all_equal(restored.opt_state, state)


def test_a_corrupted_version_1_checkpoint_is_a_value_error(tmp_path):
  copy = tmp_path / "old"
  shutil.copytree(VERSION_1, copy)
  metadata = copy / "metadata" / "metadata"
  body = json.loads(metadata.read_text())
  body["leaves"][0]["sha256"] = "0" * 64
  metadata.write_text(json.dumps(body))
  with pytest.raises(ValueError, match="does not match the checksum"):
    checkpoint.restore(copy, like=_version_1_like())
