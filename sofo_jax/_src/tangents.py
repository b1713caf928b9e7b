"""Random tangent directions in parameter space.

A tangent set :math:`\\Theta = [v_1, \\dots, v_K]` is stored as a pytree like
the parameters with a leading axis of size K on each trainable leaf (``None``
on the others). Two distributions:

- ``"normalized_gaussian"`` (default, as in Yu et al., 2024): each
  :math:`v_k` is standard Gaussian, then scaled to unit L2 norm over the whole
  pytree.
- ``"orthonormal"``: Gaussian tangents whitened,
  :math:`\\Theta \\leftarrow \\Theta (\\Theta^\\top\\Theta)^{-1/2}`, so
  :math:`\\Theta^\\top\\Theta = I` when :math:`K \\le P`. For :math:`K > P` the
  pseudo-inverse square root is used and the K tangents form a Parseval frame
  (:math:`\\Theta\\Theta^\\top = I_P`).

With entry masks (see :mod:`sofo_jax._src.tree`) the Gaussian draws are
zeroed on frozen entries *before* normalising or whitening, so both
distributions are the same ones over the trainable entries alone (P is then
their number) and every tangent is exactly zero on the frozen entries.

Inside the optimizer the K tangents are one ``(K, P)`` matrix over all
trainable leaves (:func:`sample_flat`, :func:`flatten`, :func:`unflatten`),
cut into leaves only for the loss closure. Combining, normalising and
checking them then compiles to a few XLA kernels instead of a few per leaf;
on a CPU, compile time grows with the number of kernels
(``benchmarks/compile_time.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from sofo_jax._src import sharding as sharding_lib
from sofo_jax._src import tree as tree_lib

DISTRIBUTIONS = ("normalized_gaussian", "orthonormal")


def check_num_tangents(num_tangents) -> int:
  """Validates K eagerly: it fixes shapes, so it must be a Python int >= 1."""
  if isinstance(num_tangents, bool) or not isinstance(num_tangents, int):
    raise TypeError(
      "num_tangents must be a Python int (it fixes array shapes); got "
      f"{type(num_tangents).__name__}. With optax.inject_hyperparams, pass "
      "static_args=('num_tangents', 'key')."
    )
  if num_tangents < 1:
    raise ValueError(f"num_tangents must be >= 1; got {num_tangents}.")
  return num_tangents


def check_distribution(distribution: str) -> str:
  if distribution not in DISTRIBUTIONS:
    raise ValueError(
      f"tangent_distribution must be one of {DISTRIBUTIONS}; got {distribution!r}."
    )
  return distribution


def _compute_dtype(dtype) -> jnp.dtype:
  # Sample and normalise in at least float32 so bf16 leaves get good tangents.
  return jnp.promote_types(dtype, jnp.float32)


def _inverse_sqrt_psd(matrix: Float[Array, "k k"]) -> Float[Array, "k k"]:
  """Pseudo-inverse square root of a symmetric PSD matrix."""
  eigenvalues, eigenvectors = jnp.linalg.eigh(matrix)
  cutoff = eigenvalues[-1] * matrix.shape[0] * jnp.finfo(matrix.dtype).eps
  keep = eigenvalues > cutoff
  safe = jnp.where(keep, eigenvalues, 1.0)
  scale = jnp.where(keep, 1.0 / jnp.sqrt(safe), 0.0)
  return (eigenvectors * scale) @ eigenvectors.T


# On a CPU the tangents are drawn a few at a time, about this many numbers per
# batch. JAX's CPU Threefry makes one pass over memory per round, so draws
# that fit in cache are much cheaper than one draw of all K·P numbers: in a
# SOFO step of a 128-unit RNN at K = 128 the single draw added about 10% to
# the step, the batched one about 4%. Accelerators draw all K at once.
_CPU_DRAW_BATCH = 1 << 17


def _safe_rsqrt(squared: Array) -> Array:
  # A zero draw has probability 0; the guard only keeps the maths total.
  positive = squared > 0
  return jnp.where(positive, jax.lax.rsqrt(jnp.where(positive, squared, 1.0)), 0.0)


def _flat_mask(trainable: list, entry_masks) -> Any:
  """The entry masks as one flat boolean vector, or None if there are none."""
  if entry_masks is None or all(m is None for m in entry_masks):
    return None
  # Concrete masks (NumPy) make one NumPy constant; a traced one, a traced vector.
  xp = np if all(m is None or isinstance(m, np.ndarray) for m in entry_masks) else jnp
  return xp.concatenate(
    [
      xp.ones(int(jnp.size(leaf)), bool) if m is None else xp.ravel(m)
      for leaf, m in zip(trainable, entry_masks)
    ]
  )


def _offsets(trainable: list) -> list[int]:
  """Where each leaf's block starts in the flat ``(..., P)`` layout, and P last."""
  offsets = [0]
  for leaf in trainable:
    offsets.append(offsets[-1] + int(jnp.size(leaf)))
  return offsets


def _gaussian_flat(
  key, trainable: list, num_tangents: int, dtype, unit_norm: bool, entry_masks=None
) -> Float[Array, "k p"]:
  """Standard normal tangents as one ``(K, P)`` matrix over all leaves.

  Tangent ``k`` is drawn from its own key as one vector over all leaves (one
  RNG call to compile), zeroed outside the entry masks and optionally scaled
  to unit norm. The CPU path maps over batches of tangents, other platforms
  ``vmap`` over all of them; both give the same numbers.
  """
  size = _offsets(trainable)[-1]
  if not size:  # nothing to draw (lax.map cannot batch empty outputs)
    return jnp.zeros((num_tangents, 0), dtype)
  flat_mask = _flat_mask(trainable, entry_masks)

  def one_tangent(tangent_key):
    flat = jax.random.normal(tangent_key, (size,), dtype)
    if flat_mask is not None:
      flat = jnp.where(flat_mask, flat, jnp.zeros((), dtype))
    if unit_norm:
      flat = flat * _safe_rsqrt(jnp.sum(flat * flat))
    return flat

  keys = jax.random.split(key, num_tangents)
  cpu_batch = max(1, min(num_tangents, _CPU_DRAW_BATCH // size))
  return jax.lax.platform_dependent(
    keys,
    cpu=lambda k: jax.lax.map(one_tangent, k, batch_size=cpu_batch),
    default=jax.vmap(one_tangent),
  )


def unflatten(flat: Array, trainable: list, dtype=None) -> list:
  """Cuts the last axis of ``flat`` (size P) into the trainable leaves' shapes.

  ``(..., P)`` becomes leaves ``(..., *leaf.shape)``, in ``dtype`` or by
  default in each leaf's own dtype.
  """
  offsets = _offsets(trainable)
  batch = flat.shape[:-1]
  return [
    sharding_lib.like(
      flat[..., start:stop]
      .reshape(batch + jnp.shape(leaf))
      .astype(dtype or jnp.result_type(leaf)),
      leaf,
    )
    for start, stop, leaf in zip(offsets[:-1], offsets[1:], trainable)
  ]


def flatten(leaves: list, dtype, batch_ndim: int = 1) -> Array:
  """The inverse of :func:`unflatten`: leaves ``(..., *shape)`` as ``(..., P)``."""
  return jnp.concatenate(
    [
      sharding_lib.replicate(leaf).reshape((*leaf.shape[:batch_ndim], -1)).astype(dtype)
      for leaf in leaves
    ],
    axis=-1,
  )


def round_to_leaves(flat: Array, trainable: list) -> Array:
  """Rounds each leaf's block of ``flat`` (last axis) to that leaf's dtype.

  A no-op when every leaf has ``flat``'s dtype.
  """
  if all(jnp.result_type(leaf) == flat.dtype for leaf in trainable):
    return flat
  return flatten(unflatten(flat, trainable), flat.dtype, flat.ndim - 1)


def flat_dtype(trainable: list) -> jnp.dtype:
  """The dtype tangents are drawn in: the leaves' dtypes promoted, at least float32."""
  return functools.reduce(
    jnp.promote_types,
    [_compute_dtype(jnp.result_type(leaf)) for leaf in trainable],
  )


def sample_flat(
  key: jax.Array,
  trainable: list,
  num_tangents: int,
  distribution: str = "normalized_gaussian",
  entry_masks=None,
) -> Float[Array, "k p"]:
  """Draws K tangents for a list of trainable leaves, as one ``(K, P)`` matrix.

  Args:
    key: a PRNG key.
    trainable: the trainable parameter leaves.
    num_tangents: K.
    distribution: one of :data:`DISTRIBUTIONS`.
    entry_masks: ``None``, or one entry per leaf: ``None`` (all entries
      trainable) or a boolean array of the leaf's shape (``Partition.entry_masks``).

  Returns:
    A ``(K, P)`` array in :func:`flat_dtype`, exactly zero outside the entry
    masks. Each leaf's block holds values of that leaf's dtype, so
    ``unflatten(sample_flat(...), trainable)`` gives leaf ``i`` of shape
    ``(K, *trainable[i].shape)`` and dtype ``trainable[i].dtype`` exactly.
  """
  dtype = flat_dtype(trainable)
  if distribution == "normalized_gaussian":
    flat = _gaussian_flat(key, trainable, num_tangents, dtype, True, entry_masks)
  else:
    # Whitening mixes tangents only, so the zeros of the masked draws stay.
    draws = _gaussian_flat(key, trainable, num_tangents, dtype, False, entry_masks)
    flat = _inverse_sqrt_psd(draws @ draws.T) @ draws
  return round_to_leaves(flat, trainable)


def sample_tangents(
  key: jax.Array,
  params: Any,
  num_tangents: int,
  distribution: str = "normalized_gaussian",
  mask: Any = None,
) -> Any:
  """Draws K random tangent directions shaped like ``params``.

  Args:
    key: a PRNG key (typed or raw).
    params: the parameter pytree.
    num_tangents: K, a Python int.
    distribution: ``"normalized_gaussian"`` or ``"orthonormal"``.
    mask: optional pytree of bools (or callable) selecting trainable leaves;
      a leaf may be a boolean array of its parameter's shape selecting
      trainable entries (the tangents are exactly zero on the others).

  Returns:
    A pytree like ``params``: each trainable leaf has a leading axis of size
    K; other leaves are ``None``.

  Example:
    >>> import jax, jax.numpy as jnp, sofo_jax
    >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    >>> tangents = sofo_jax.sample_tangents(jax.random.key(0), params, 4)
    >>> tangents["w"].shape
    (4, 3, 2)
  """
  check_num_tangents(num_tangents)
  check_distribution(distribution)
  part = tree_lib.partition(params, mask)
  leaves = unflatten(
    sample_flat(key, part.trainable, num_tangents, distribution, part.entry_masks),
    part.trainable,
  )
  return part.fill(leaves, lambda leaf: None)


def zero_if_nonfinite(leaves: list, usable=True) -> tuple[list, Bool[Array, ""]]:
  """Zeros every leaf unless all are finite and ``usable``; returns whether they were.

  The last guard before a step leaves the optimizer: a finite solve can still
  overflow when cast to a narrow leaf dtype (float16), and a traced learning
  rate may be unusable (``usable`` False).
  """
  finite = jnp.asarray(usable)
  for leaf in leaves:
    finite = finite & jnp.all(jnp.isfinite(leaf))
  return [jnp.where(finite, leaf, jnp.zeros((), leaf.dtype)) for leaf in leaves], finite


def normalize_rows(flat: Float[Array, "k p"]) -> Float[Array, "k p"]:
  """Scales each row of a ``(K, P)`` matrix to unit norm.

  A zero row stays zero, so it contributes nothing to a sketch.
  """
  squared = jnp.sum(jnp.square(flat), axis=1, keepdims=True)
  return flat * _safe_rsqrt(squared)


def combine_flat(
  coefficients: Array, tangents: Float[Array, "k p"], trainable: list
) -> Array:
  """:math:`\\Theta w` with the ``(K, P)`` tangent matrix, flat.

  ``coefficients`` of shape ``(K,)`` or ``(M, K)``; the result, ``(P,)`` or
  ``(M, P)``, is rounded to each leaf's dtype (as a leaf update would be).
  """
  product = jnp.tensordot(coefficients.astype(tangents.dtype), tangents, axes=1)
  return round_to_leaves(product, trainable)
