"""Independent dense references, built without any sofo_jax code.

Everything here uses ``ravel_pytree`` + ``jax.jacfwd`` + ``jax.hessian`` on
plainly written loss formulas, meant for float64 and tiny problems.
"""

import jax
import jax.experimental
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

# A context manager that enables float64 inside it. jax.enable_x64 is new in
# JAX 0.8; the oldest supported JAX (CI's run against .ci/oldest-deps.txt) has
# only the experimental spelling.
if hasattr(jax, "enable_x64"):
  enable_x64 = jax.enable_x64
else:
  enable_x64 = jax.experimental.enable_x64


def dense_gauss_newton(params, outputs_fn, loss_of_outputs):
  """Returns ``(g, G)``: the gradient and the Gauss–Newton matrix, flat.

  ``G = J^T H J`` with ``J`` the Jacobian of the flattened outputs and ``H``
  the Hessian of ``loss_of_outputs`` with respect to them.
  """
  flat, unravel = ravel_pytree(params)
  outputs = outputs_fn(params)
  flat_outputs, unravel_outputs = ravel_pytree(outputs)
  jacobian = jax.jacfwd(lambda f: ravel_pytree(outputs_fn(unravel(f)))[0])(flat)
  hessian = jax.hessian(lambda o: loss_of_outputs(unravel_outputs(o)))(flat_outputs)
  gradient = jax.grad(lambda f: loss_of_outputs(outputs_fn(unravel(f))))(flat)
  return gradient, jacobian.T @ hessian @ jacobian


def damped_gauss_newton_step(gradient, gauss_newton, damping, relative=True):
  """``(G + lambda_eff I)^{-1} g`` with lambda_eff = damping * max eig(G)."""
  if relative:
    damping = damping * jnp.linalg.eigvalsh(gauss_newton)[-1]
  return jnp.linalg.solve(
    gauss_newton + damping * jnp.eye(gauss_newton.shape[0]), gradient
  )


def orthonormal_tangents(key, params):
  """A random orthogonal P x P basis as a tangent pytree (leading axis P)."""
  flat, unravel = ravel_pytree(params)
  q, _ = jnp.linalg.qr(jax.random.normal(key, (flat.size, flat.size), flat.dtype))
  return jax.vmap(unravel)(q.T), q
