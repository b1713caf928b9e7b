"""Shared test set-up: fast XLA compilation, and float64 for dense references."""

import os

# The test problems are tiny, so compiling dominates their time. XLA reads
# these flags when its backend starts, which no test module's import does;
# child processes (the scripts, notebooks and multi-device checks the tests
# launch) inherit them. They change how XLA optimises (so results may differ
# in the last bits), not what it computes.
_FAST_COMPILE = (
  "--xla_backend_optimization_level=0",
  "--xla_llvm_disable_expensive_passes=true",
)
os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), *_FAST_COMPILE]
).strip()

# pylint: disable=wrong-import-position
import pytest
import reference


@pytest.fixture
def x64():
  """Runs a test with float64 enabled (and restores the default after)."""
  with reference.enable_x64(True):
    yield
