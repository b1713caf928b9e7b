"""Every example in a sofo_jax docstring runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import sofo_jax

MODULES = sorted(m.name for m in pkgutil.walk_packages(sofo_jax.__path__, "sofo_jax."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  try:
    module = importlib.import_module(name)
  except ImportError as error:  # an optional extra (e.g. neurogym) not installed
    pytest.skip(str(error))
  result = doctest.testmod(
    module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  )
  assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
