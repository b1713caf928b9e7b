"""sofo_jax: second-order forward-mode optimisation (SOFO) for JAX and Optax.

SOFO takes a damped Gauss–Newton step inside a random K-dimensional subspace
of parameter space, computed with one batched forward-mode pass: no
backpropagation, and memory constant in the sequence length of recurrent
models (Yu et al., NeurIPS 2024).
"""

from sofo_jax import checkpoint, losses
from sofo_jax._src.forward_gradient import (
  ForwardGradientDiagnostics,
  ScaleByForwardGradientState,
  forward_gradient,
  scale_by_forward_gradient,
)
from sofo_jax._src.sketch import Sketch, sketch
from sofo_jax._src.solve import SubspaceStep, solve_damped
from sofo_jax._src.state_utils import get_diagnostics, get_state
from sofo_jax._src.step_control import StepControl
from sofo_jax._src.tangents import sample_tangents
from sofo_jax._src.transform import (
  ScaleBySofoState,
  SofoDiagnostics,
  scale_by_sofo,
  sofo,
)

# The one source of the version: pyproject.toml reads it statically, so it
# stays a plain string literal.
__version__ = "0.1.0"

__all__ = (
  "ForwardGradientDiagnostics",
  "ScaleByForwardGradientState",
  "ScaleBySofoState",
  "Sketch",
  "SofoDiagnostics",
  "StepControl",
  "SubspaceStep",
  "checkpoint",
  "forward_gradient",
  "get_diagnostics",
  "get_state",
  "losses",
  "sample_tangents",
  "scale_by_forward_gradient",
  "scale_by_sofo",
  "sketch",
  "sofo",
  "solve_damped",
)
