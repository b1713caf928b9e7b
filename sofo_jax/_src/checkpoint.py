"""Saving and restoring a training run (params, optimizer state, step).

Built on orbax-checkpoint, imported lazily: the rest of sofo_jax does not
need it (``pip install sofo_jax[checkpoint]``). On top of orbax this adds the
checks that turn a wrong restore into a clear error instead of a silently
wrong state:

- a manifest records every leaf's path, shape, dtype and a SHA-256 of its
  bytes; ``restore`` compares the structure, shapes and dtypes with the tree
  it is asked to fill *before* reading any data, and the checksums after;
- orbax writes into a temporary directory that is renamed into place only
  when complete, so an interrupted save never looks like a checkpoint; with
  ``overwrite=True`` the previous checkpoint is replaced only after the new
  one is complete.

SOFO's state holds its PRNG key as raw ``uint32`` data, so a restored run
draws exactly the tangents the uninterrupted run would have drawn: resuming is
bitwise identical.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import uuid
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

_FORMAT = "sofo_jax.checkpoint"
_VERSION = 1
_MAX_LISTED = 8

PathLike = Union[str, os.PathLike]


class Checkpoint(NamedTuple):
  """What :func:`restore` returns.

  Attributes:
    params: the parameters, with the structure and leaf types of ``like``.
    opt_state: the optimizer state, likewise.
    step: the step number given to :func:`save`.
  """

  params: Any
  opt_state: Any
  step: int


def _orbax():
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
        "sofo_jax.checkpoint needs orbax-checkpoint: pip install "
        "'sofo_jax[checkpoint]' (or pip install orbax-checkpoint)."
    ) from error
  return ocp


def _flatten(params: Any, opt_state: Any) -> tuple[list, list, Any]:
  """Leaves, their path strings, and the treedef of ``{params, opt_state}``."""
  tree = {"params": params, "opt_state": opt_state}
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [jax.tree_util.keystr(path) for path, _ in with_paths]
  return [leaf for _, leaf in with_paths], paths, treedef


def _shape_dtype(leaf: Any, path: str) -> tuple[tuple, np.dtype]:
  dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    raise TypeError(
        f"Leaf {path} is a typed PRNG key, which cannot be saved directly; "
        "store jax.random.key_data(key) instead (sofo_jax's own states already "
        "hold raw key data)."
    )
  shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
  return tuple(shape), np.dtype(dtype)


def _digest(array: np.ndarray) -> str:
  array = np.ascontiguousarray(array)
  return hashlib.sha256(array.tobytes()).hexdigest()


def _short(error: Exception, limit: int = 300) -> str:
  text = f"{type(error).__name__}: {error}"
  return text if len(text) <= limit else text[:limit] + " ..."


def _where_different(a: str, b: str, context: int = 60) -> tuple[str, str]:
  """The two strings around the first character where they differ."""
  start = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
  start = max(start - context, 0)
  cut = lambda s: ("..." if start else "") + s[start:start + 2 * context] + (
      "..." if len(s) > start + 2 * context else "")
  return cut(a), cut(b)


def _listed(items: list) -> str:
  shown = ", ".join(items[:_MAX_LISTED])
  more = len(items) - _MAX_LISTED
  return shown + (f", ... ({more} more)" if more > 0 else "")


def save(
    path: PathLike,
    params: Any,
    opt_state: Any,
    step: int = 0,
    *,
    overwrite: bool = False,
) -> pathlib.Path:
  """Saves params, optimizer state and step number to a directory.

  Synchronous: when it returns, the checkpoint is complete on disk. Works
  with any optimizer state (SOFO, forward gradient, any optax chain) and any
  parameter pytree of arrays and Python scalars (dicts, tuples, equinox
  modules, ...) held by a single process.

  Args:
    path: the checkpoint directory to create.
    params: the parameter pytree.
    opt_state: the optimizer state.
    step: the training step to record (a Python int or integer scalar).
    overwrite: replace an existing checkpoint at ``path`` (the old one is
      removed only after the new one is complete).

  Returns:
    The absolute path of the checkpoint.

  Raises:
    FileExistsError: if ``path`` exists and ``overwrite`` is False.
    TypeError: if a leaf is a typed PRNG key or not array-like.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, sofo_jax
    >>> opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(0))
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> path = tempfile.mkdtemp() + "/step_10"
    >>> _ = sofo_jax.checkpoint.save(path, params, state, step=10)
    >>> restored = sofo_jax.checkpoint.restore(path, like=(params, state))
    >>> restored.step
    10
  """
  ocp = _orbax()
  path = pathlib.Path(os.path.abspath(os.fspath(path)))
  if path.exists() and not overwrite:
    raise FileExistsError(
        f"A checkpoint already exists at {path}; pass overwrite=True to "
        "replace it."
    )
  step = int(np.asarray(step))
  leaves, paths, treedef = _flatten(params, opt_state)
  arrays = {}
  manifest = []
  for index, (leaf, leaf_path) in enumerate(zip(leaves, paths)):
    shape, dtype = _shape_dtype(leaf, leaf_path)
    value = np.asarray(jax.device_get(leaf), dtype)
    # orbax cannot store size-0 arrays; their shape and dtype say it all.
    name = f"leaf_{index:05d}" if value.size else None
    if name is not None:
      arrays[name] = value
    manifest.append({
        "path": leaf_path,
        "shape": list(shape),
        "dtype": dtype.name,
        "name": name,
        "sha256": _digest(value),
    })
  metadata = {
      "format": _FORMAT,
      "version": _VERSION,
      "step": step,
      "treedef": str(treedef),
      "leaves": manifest,
      "jax_version": jax.__version__,
  }
  staging = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
  path.parent.mkdir(parents=True, exist_ok=True)
  items = {"metadata": ocp.args.JsonSave(metadata)}
  if arrays:
    items["arrays"] = ocp.args.PyTreeSave(arrays)
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      checkpointer.save(staging, args=ocp.args.Composite(**items))
    if path.exists():
      retired = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
      path.rename(retired)
      staging.rename(path)
      shutil.rmtree(retired)
    else:
      staging.rename(path)
  finally:
    if staging.exists():
      shutil.rmtree(staging)
  return path


def _read_metadata(ocp, path: pathlib.Path) -> dict:
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      restored = checkpointer.restore(
          path, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())
      )
    metadata = restored["metadata"]
  except Exception as error:  # orbax raises many kinds; all mean the same
    raise ValueError(
        f"The checkpoint at {path} is corrupted or incomplete: its metadata "
        f"could not be read ({_short(error)})."
    ) from error
  if not isinstance(metadata, dict) or metadata.get("format") != _FORMAT:
    raise ValueError(
        f"{path} is not a sofo_jax checkpoint (or its metadata is corrupted)."
    )
  if metadata.get("version") != _VERSION:
    raise ValueError(
        f"The checkpoint at {path} has format version "
        f"{metadata.get('version')}; this sofo_jax reads version {_VERSION}."
    )
  return metadata


def _check_matches(path, metadata: dict, paths: list, treedef, expected: list) -> None:
  """Raises ValueError naming every difference between checkpoint and ``like``."""
  saved = metadata["leaves"]
  saved_paths = [leaf["path"] for leaf in saved]
  if saved_paths != paths:
    only_saved = [p for p in saved_paths if p not in set(paths)]
    only_like = [p for p in paths if p not in set(saved_paths)]
    detail = f"it has {len(saved_paths)} leaves, `like` has {len(paths)}"
    if only_saved:
      detail += f"; only in the checkpoint: {_listed(only_saved)}"
    if only_like:
      detail += f"; only in `like`: {_listed(only_like)}"
    if not only_saved and not only_like:
      detail += "; the same leaves in a different order"
    raise ValueError(
        f"The checkpoint at {path} does not match the structure of `like` "
        f"({detail}). Restore into a tree built by the same code (same model, "
        "same optimizer chain)."
    )
  if metadata["treedef"] != str(treedef):
    saved_def, like_def = _where_different(metadata["treedef"], str(treedef))
    raise ValueError(
        f"The checkpoint at {path} has the same leaves as `like` but a "
        "different tree structure (container types or static fields "
        f"differ). First difference:\n  checkpoint: {saved_def}\n  like:       "
        f"{like_def}"
    )
  mismatched = []
  for leaf, (shape, dtype) in zip(saved, expected):
    if tuple(leaf["shape"]) != shape or leaf["dtype"] != dtype.name:
      mismatched.append(
          f"{leaf['path']}: checkpoint {tuple(leaf['shape'])} {leaf['dtype']}, "
          f"like {shape} {dtype.name}"
      )
  if mismatched:
    raise ValueError(
        f"The checkpoint at {path} does not match `like` in the shape or dtype "
        f"of {len(mismatched)} leaves: {_listed(mismatched)}. (The optimizer "
        "state's shapes depend on its settings: num_tangents is the length "
        "of the diagnostics' eigenvalues.)"
    )


def _like_leaf(value: np.ndarray, like: Any) -> Any:
  """``value`` as the kind of leaf ``like`` is (array, NumPy, Python scalar)."""
  if isinstance(like, (bool, int, float, complex)):
    return type(like)(value.item())
  if isinstance(like, np.ndarray) or np.isscalar(like):
    return value
  sharding = getattr(like, "sharding", None)
  if sharding is not None:
    return jax.device_put(value, sharding)
  return jnp.asarray(value)


def restore(path: PathLike, *, like: tuple[Any, Any]) -> Checkpoint:
  """Restores a checkpoint written by :func:`save` into the shape of ``like``.

  ``like = (params, opt_state)`` gives the expected structure, shapes and
  dtypes: fresh ones (``params0, opt.init(params0)``), or abstract ones from
  ``jax.eval_shape``. Every leaf is checked against the checkpoint before any
  data is read, and every restored array against its saved SHA-256.

  Args:
    path: a directory written by :func:`save`.
    like: a pair ``(params, opt_state)`` shaped like the saved ones.

  Returns:
    A :class:`Checkpoint` ``(params, opt_state, step)``. Array leaves come
    back as ``jax.Array`` (on ``like``'s sharding when it has one), NumPy
    leaves as NumPy arrays, Python scalars as Python scalars.

  Raises:
    FileNotFoundError: if there is no checkpoint at ``path``.
    ValueError: if the checkpoint is corrupted or incomplete, or does not
      match ``like`` (the message names the leaves that differ and how).
  """
  ocp = _orbax()
  path = pathlib.Path(os.path.abspath(os.fspath(path)))
  if not path.is_dir():
    raise FileNotFoundError(f"No checkpoint at {path}.")
  if not (isinstance(like, tuple) and len(like) == 2):
    raise TypeError(
        "restore(path, like=(params, opt_state)): `like` must be a pair; got "
        f"{type(like).__name__}."
    )
  leaves, paths, treedef = _flatten(*like)
  expected = [_shape_dtype(leaf, p) for leaf, p in zip(leaves, paths)]
  metadata = _read_metadata(ocp, path)
  _check_matches(path, metadata, paths, treedef, expected)

  names = [leaf["name"] for leaf in metadata["leaves"] if leaf["name"]]
  arrays = {}
  if names:
    restore_args = {name: ocp.RestoreArgs(restore_type=np.ndarray) for name in names}
    try:
      with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            path,
            args=ocp.args.Composite(
                arrays=ocp.args.PyTreeRestore(restore_args=restore_args)
            ),
        )
      arrays = dict(restored["arrays"])
    except Exception as error:  # orbax / tensorstore raise many kinds
      raise ValueError(
          f"The checkpoint at {path} is corrupted or incomplete: its arrays "
          f"could not be read ({_short(error)})."
      ) from error

  values = []
  for leaf, (shape, dtype), like_leaf in zip(metadata["leaves"], expected, leaves):
    if leaf["name"] is None:
      value = np.zeros(shape, dtype)
    else:
      value = arrays.get(leaf["name"])
      if value is None:
        raise ValueError(
            f"The checkpoint at {path} is corrupted: the data of {leaf['path']} "
            "is missing."
        )
      value = np.asarray(value)
    if value.shape != shape or value.dtype != dtype or _digest(value) != leaf["sha256"]:
      raise ValueError(
          f"The checkpoint at {path} is corrupted: the data of {leaf['path']} "
          "does not match the checksum recorded when it was saved."
      )
    values.append(_like_leaf(value, like_leaf))
  tree = jax.tree.unflatten(treedef, values)
  return Checkpoint(tree["params"], tree["opt_state"], int(metadata["step"]))
