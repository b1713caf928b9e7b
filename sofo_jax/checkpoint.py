"""Checkpoints of a training run (see :mod:`sofo_jax._src.checkpoint`).

``save(path, params, opt_state, step)`` and ``restore(path, like=(params,
opt_state))`` for one checkpoint at one path; ``Manager(directory,
max_to_keep=...)`` for a run's checkpoints, one per step. Built on
orbax-checkpoint (``pip install 'sofo_jax[checkpoint]'``; imported only when
called). A resumed run is bitwise identical to an uninterrupted one, and a
corrupted or mismatched checkpoint raises a ``ValueError`` that says what is
wrong.
"""

from sofo_jax._src.checkpoint import Checkpoint, Manager, restore, save

__all__ = ("Checkpoint", "Manager", "restore", "save")
