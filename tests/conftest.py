"""Shared fixtures: float64 for the dense-reference tests."""

import jax
import jax.experimental
import pytest

# jax.enable_x64 is new in JAX 0.8; the oldest supported JAX (CI's run against
# .ci/oldest-deps.txt) has only the experimental spelling.
if hasattr(jax, "enable_x64"):
  _enable_x64 = jax.enable_x64
else:
  _enable_x64 = jax.experimental.enable_x64


@pytest.fixture
def x64():
  """Runs a test with float64 enabled (and restores the default after)."""
  with _enable_x64(True):
    yield
