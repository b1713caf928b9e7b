"""Un-jitted updates run as one compiled program.

Optax transformations are usually called inside the user's ``jax.jit``. A
SOFO update called outside one (as in a notebook, or the docstring
examples) would otherwise run op by op, and the control flow inside it
(``lax.map`` over tangent batches, the step-control ladder) is a fresh
closure every call, so JAX compiled it again every call: about a second and
a few megabytes that were never freed, per step. Here an update called with
concrete arrays is jitted once per loss closure and the compiled program is
reused; a small LRU bounds what is kept. ``jax.jit`` alone cannot do this:
the closure is a keyword argument, and the state may hold non-array leaves,
hence ``equinox.filter_jit`` keyed on the closure.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

# How many loss closures keep a compiled update (each holds one executable).
CACHE_SIZE = 4


def _is_traced(tree: Any) -> bool:
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def jit_when_eager(update_fn: Callable, check_updates: Callable) -> Callable:
  """Wraps ``update_fn(updates, state, params, *, loss_fn, **extra)``.

  Args:
    update_fn: the transformation's update; ignores ``updates`` once
      ``check_updates`` has passed them.
    check_updates: ``updates -> None``, raising on updates that must not be
      passed (run eagerly, so its error comes at once).

  Returns:
    An update with the same signature. Inside a trace (the user's ``jit``,
    ``scan``, ``vmap``, ``shard_map``) it is ``update_fn`` itself.

  Example:
    >>> import jax.numpy as jnp
    >>> calls = []
    >>> def update_fn(updates, state, params, *, loss_fn, **extra):
    ...   calls.append(1)          # runs only while tracing
    ...   return loss_fn(params), state
    >>> update = jit_when_eager(update_fn, lambda updates: None)
    >>> loss_fn = lambda p: p * 2
    >>> for _ in range(3):
    ...   out, _ = update(None, jnp.zeros(()), jnp.ones(()), loss_fn=loss_fn)
    >>> len(calls), float(out)
    (1, 2.0)
  """
  compiled: collections.OrderedDict[Callable, Callable] = collections.OrderedDict()

  @functools.wraps(update_fn)
  def update(updates, state, params=None, *, loss_fn=None, **extra_args):
    if loss_fn is None or params is None or _is_traced((updates, state, params)):
      return update_fn(updates, state, params, loss_fn=loss_fn, **extra_args)
    check_updates(updates)
    try:
      step = compiled.pop(loss_fn)
    except KeyError:
      step = eqx.filter_jit(functools.partial(_call, update_fn, loss_fn))
    except TypeError:  # an unhashable closure (e.g. a module with arrays)
      return update_fn(None, state, params, loss_fn=loss_fn)
    compiled[loss_fn] = step
    while len(compiled) > CACHE_SIZE:
      compiled.popitem(last=False)
    return step(state, params)

  return update


def _call(update_fn, loss_fn, state, params):
  return update_fn(None, state, params, loss_fn=loss_fn)
