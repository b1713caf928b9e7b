"""Curvature-aware losses for SOFO (see :mod:`sofo_jax._src.losses`).

Reduction convention: the last axis holds features and is summed, every
leading axis is a batch axis and is averaged; no factor 1/2 unless stated.
Every built-in loss takes ``weights=``, per-example weights (a boolean mask
works) that scale the value and the Gauss–Newton matrix alike; the divisor
stays the batch size B.
"""

from sofo_jax._src.losses import (
  Loss,
  custom,
  gaussian_nll,
  mse,
  poisson,
  sigmoid_binary_cross_entropy,
  softmax_cross_entropy,
  zero,
)

__all__ = (
  "Loss",
  "custom",
  "gaussian_nll",
  "mse",
  "poisson",
  "sigmoid_binary_cross_entropy",
  "softmax_cross_entropy",
  "zero",
)
