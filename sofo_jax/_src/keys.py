"""PRNG keys kept in optimizer state as plain uint32 arrays.

Typed keys (``jax.random.key``) and raw keys (``jax.random.PRNGKey``) are both
accepted. State holds the raw key data, so it is an ordinary array that
checkpoints, ``lax.scan`` carries and ``optax.inject_hyperparams`` handle
without special cases; the implementation of a typed key is remembered
statically and used to rewrap it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class KeyCodec(NamedTuple):
  """Turns a key into state data and back. ``impl`` is None for raw keys."""

  impl: Any | None

  def wrap(self, data: jax.Array) -> jax.Array:
    if self.impl is None:
      return data
    return jax.random.wrap_key_data(data, impl=self.impl)

  def unwrap(self, key: jax.Array) -> jax.Array:
    return key if self.impl is None else jax.random.key_data(key)

  def split(self, data: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns ``(next state data, key for this step)``."""
    carry, step = jax.random.split(self.wrap(data))
    return self.unwrap(carry), step


def _is_typed(key) -> bool:
  return jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def _default_key_shape() -> tuple[int, ...]:
  # The raw key shape of the default implementation (threefry: (2,); rbg: (4,)).
  return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape


def _host_copy(data: jax.Array) -> Any:
  """A host copy of concrete key data; a traced key is returned as it is.

  The optimizer must not hold the caller's buffer: a state donated to a
  jitted step (``donate_argnums``) would delete it, and with it the user's
  key and every later ``init``. ``init`` makes a fresh device array from
  this copy each time.
  """
  try:
    return np.array(data, copy=True)
  except jax.errors.TracerArrayConversionError:
    return data


def check_key(key: Any, owner: str) -> tuple[Any, KeyCodec]:
  """Validates a single PRNG key and returns its state data and codec.

  The data is a host copy (see :func:`_host_copy`); pass it through
  ``jnp.array(data, copy=True)`` in ``init``, so that no two states share a buffer.
  """
  if not isinstance(key, jax.Array) and not hasattr(key, "dtype"):
    raise TypeError(
      f"{owner} needs a PRNG key, e.g. key=jax.random.key(0); got {type(key).__name__}."
    )
  if _is_typed(key):
    if key.shape != ():
      raise ValueError(f"{owner}: expected a single key; got shape {key.shape}.")
    return _host_copy(jax.random.key_data(key)), KeyCodec(jax.random.key_impl(key))
  key = jnp.asarray(key)
  expected = _default_key_shape()
  if key.dtype != jnp.uint32 or key.shape != expected:
    raise TypeError(
      f"{owner} needs a PRNG key (jax.random.key(seed), or a raw "
      f"jax.random.PRNGKey(seed): uint32 of shape {expected}); got an array "
      f"of dtype {key.dtype} and shape {key.shape}. For a batch of keys, "
      "build one optimizer per key (e.g. inside jax.vmap)."
    )
  return _host_copy(key), KeyCodec(None)
