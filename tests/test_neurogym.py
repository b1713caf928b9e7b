"""Tests for sofo_jax.tasks.neurogym: neurogym environments as sofo_jax tasks.

Everything runs on ``Config.quick()``: pools of 4 batches of 4 x 20 steps.
The import tests need no neurogym; the others are skipped without it.
"""

import dataclasses
import functools
import importlib
import importlib.util
import sys

import jax
import numpy as np
import pytest
from commands import run_ok

from sofo_jax import training

HAS_NEUROGYM = importlib.util.find_spec("neurogym") is not None
needs_neurogym = pytest.mark.skipif(
  not HAS_NEUROGYM, reason='needs neurogym: pip install "sofo_jax[neurogym]"'
)

# (environment, number of inputs, number of actions)
# ContextDecisionMaking-v0 has trials of random length.
ENVS = (
  ("PerceptualDecisionMaking-v0", 3, 3),
  ("DelayComparison-v0", 2, 3),
  ("ContextDecisionMaking-v0", 5, 3),
)


@functools.cache
def _task(env):
  from sofo_jax.tasks import neurogym  # pylint: disable=g-import-not-at-top

  return neurogym.make(neurogym.Config.quick(env))


@needs_neurogym
@pytest.mark.parametrize("env,num_inputs,num_actions", ENVS, ids=[e[0] for e in ENVS])
def test_batches_are_time_major_with_integer_labels(env, num_inputs, num_actions):
  task = _task(env)
  config = task.config
  batch = jax.jit(task.sample_batch)(jax.random.key(0))
  shape = (config.seq_len, config.batch_size)
  assert batch["inputs"].shape == (*shape, num_inputs)
  assert batch["inputs"].dtype == np.float32
  assert batch["labels"].shape == shape
  assert batch["labels"].dtype == np.int32
  labels = np.asarray(batch["labels"])
  assert labels.min() >= 0 and labels.max() < num_actions

  params = task.init_params(jax.random.key(1))
  value = task.loss_value(params, batch)
  metrics = task.metrics(params, batch)
  assert set(metrics) == {"loss", "accuracy", "decision_accuracy"}
  np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
  # At initialisation the network is near chance over num_actions classes.
  assert 0.5 * np.log(num_actions) < value < 2.0 * np.log(num_actions)
  # `outputs` takes any number of sequences (e.g. single trials).
  out = task.outputs(params, jax.tree.map(lambda x: x[:, :3], batch))
  assert out["logits"].shape == (config.seq_len, 3, num_actions)
  assert out["hidden"].shape == (config.seq_len, 3, config.num_hidden)


@needs_neurogym
def test_the_same_seed_gives_the_same_data():
  from sofo_jax.tasks import neurogym  # pylint: disable=g-import-not-at-top

  config = neurogym.Config.quick()
  first, second = neurogym.generate(config), neurogym.generate(config)
  other = neurogym.generate(dataclasses.replace(config, seed=1))
  for name in ("inputs", "labels"):
    np.testing.assert_array_equal(first[name], second[name])
  assert not np.array_equal(first["inputs"], other["inputs"])
  # Within a batch, the environment copies draw different trials.
  assert not np.array_equal(first["inputs"][0, :, 0], first["inputs"][0, :, 1])
  # sample_batch returns one of those batches, the same one for the same key.
  task = _task(config.env)
  key = jax.random.key(3)
  batch = task.sample_batch(key)
  np.testing.assert_array_equal(batch["labels"], task.sample_batch(key)["labels"])
  matches = [
    i
    for i in range(config.num_batches)
    if np.array_equal(batch["inputs"], first["inputs"][i])
    and np.array_equal(batch["labels"], first["labels"][i])
  ]
  assert len(matches) == 1


@needs_neurogym
def test_fit_with_sofo_lowers_the_loss():
  task = _task("PerceptualDecisionMaking-v0")
  history = training.fit(task, "sofo", 10, key=jax.random.key(0), progress=False)
  assert np.all(np.isfinite(history.losses))
  assert np.mean(history.losses[-3:]) < 0.8 * history.losses[0]


@needs_neurogym
@pytest.mark.parametrize(
  "change,match",
  [
    (dict(tau=50.0), "leak"),
    (dict(num_batches=0), "num_batches"),
    (dict(seq_len=2.5), "seq_len"),
  ],
)
def test_invalid_settings_raise(change, match):
  from sofo_jax.tasks import neurogym  # pylint: disable=g-import-not-at-top

  config = dataclasses.replace(neurogym.Config.quick(), **change)
  with pytest.raises(ValueError, match=match):
    neurogym.make(config)


@pytest.mark.parametrize("missing", ["neurogym", "torch"])
def test_missing_neurogym_says_how_to_install_it(missing, monkeypatch, tmp_path):
  monkeypatch.delitem(sys.modules, "sofo_jax.tasks.neurogym", raising=False)
  if missing == "neurogym":
    monkeypatch.setitem(sys.modules, "neurogym", None)  # import fails
  else:  # a neurogym that imports torch, as 2.3 does, without torch
    package = tmp_path / "neurogym"
    package.mkdir()
    (package / "__init__.py").write_text("import torch\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "neurogym", raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match=r'pip install "sofo_jax\[neurogym\]"') as info:
    importlib.import_module("sofo_jax.tasks.neurogym")
  assert ("torch" in str(info.value)) == (missing == "torch")


def test_importing_sofo_jax_does_not_import_neurogym():
  code = (
    "import sys, sofo_jax, sofo_jax.tasks, sofo_jax.training; "
    "print(sorted({'neurogym', 'gymnasium'} & set(sys.modules)))"
  )
  result = run_ok([sys.executable, "-c", code], timeout=300)
  assert result.stdout.strip() == "[]"
