"""Shared fixtures: float64 for the dense-reference tests."""

import pytest
import reference


@pytest.fixture
def x64():
  """Runs a test with float64 enabled (and restores the default after)."""
  with reference.enable_x64(True):
    yield
