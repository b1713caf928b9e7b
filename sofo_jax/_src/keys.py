"""PRNG keys kept in optimizer state as plain uint32 arrays.

Typed keys (``jax.random.key``) and raw keys (``jax.random.PRNGKey``) are both
accepted. State holds the raw key data, so it is an ordinary array that
checkpoints, ``lax.scan`` carries and ``optax.inject_hyperparams`` handle
without special cases; the implementation of a typed key is remembered
statically and used to rewrap it.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp


class KeyCodec(NamedTuple):
  """Turns a key into state data and back. ``impl`` is None for raw keys."""

  impl: Optional[Any]

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


def check_key(key: Any, owner: str) -> tuple[jax.Array, KeyCodec]:
  """Validates a single PRNG key and returns its state data and codec."""
  if not isinstance(key, jax.Array) and not hasattr(key, "dtype"):
    raise TypeError(
        f"{owner} needs a PRNG key, e.g. key=jax.random.key(0); got "
        f"{type(key).__name__}."
    )
  if _is_typed(key):
    if key.shape != ():
      raise ValueError(f"{owner}: expected a single key; got shape {key.shape}.")
    return jax.random.key_data(key), KeyCodec(jax.random.key_impl(key))
  key = jnp.asarray(key)
  if key.dtype != jnp.uint32 or key.ndim != 1:
    raise TypeError(
        f"{owner} needs a PRNG key (jax.random.key(seed) or "
        f"jax.random.PRNGKey(seed)); got an array of dtype {key.dtype} and "
        f"shape {key.shape}."
    )
  return key, KeyCodec(None)
