"""Shared fixtures: float64 for the dense-reference tests."""

import jax
import pytest


@pytest.fixture
def x64():
  """Runs a test with float64 enabled (and restores the default after)."""
  with jax.enable_x64(True):
    yield
