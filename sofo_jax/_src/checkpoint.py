"""Saving and restoring a training run (params, optimizer state, step).

Built on orbax-checkpoint, imported lazily: the rest of sofo_jax does not
need it (``pip install sofo_jax[checkpoint]``). What orbax does, and what
this module adds on top.

orbax does:

- the writing: the arrays go through ``StandardSave`` (sharding-aware; in a
  multi-process run every process writes its own shards, one process the
  metadata, with barriers between), a small JSON manifest through
  ``JsonSave``, both in one ``Composite`` checkpoint;
- the atomic commit: a checkpoint is written into a temporary directory
  that is renamed into place when complete, so an interrupted write never
  looks like a checkpoint;
- for :class:`Manager`, everything ``CheckpointManager`` does: one
  directory per step, ``max_to_keep``, optional asynchronous saving.

This module adds what orbax does not do:

- **one atomic decision per path.** orbax's temporary directory is named
  after the destination and its ``force=True`` deletes before writing, so
  two saves to one path can clobber each other. :func:`save` lets orbax
  commit into a directory of its own, with a fresh name, and then publishes
  it with one ``rename``, which fails if the path exists: of two racing
  saves exactly one wins. An overwrite retires the old checkpoint with a
  second rename; if the process dies between the two, :func:`restore`
  finds the checkpoint under its hidden name.
- **checksums.** orbax checksums neither the array data (tensorstore's
  zarr3 format checksums only its shard index; zarr2 nothing) nor its JSON.
  So the manifest records a SHA-256 of every leaf's bytes, and is itself
  sealed by a SHA-256 of its canonical JSON: a flipped bit anywhere is a
  ``ValueError``, never a silently different state.
- **checks against** ``like`` **before any data is read**, with errors that
  name the leaves: leaf paths, a restart-stable description of the tree
  structure (node types and dict keys, never ``str(treedef)``, which holds
  the addresses of static functions), shapes and dtypes.

Typed PRNG keys are stored as ``jax.random.key_data`` and rebuilt with
``jax.random.wrap_key_data``. SOFO's state holds its key as raw ``uint32``
data anyway, so a restored run draws exactly the tangents the uninterrupted
run would have drawn: resuming is bitwise identical.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pathlib
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sofo_jax._src import legacy_layout

_FORMAT = "sofo_jax.checkpoint"
_VERSION = 2
_ARRAYS = "arrays"  # orbax item names inside one checkpoint directory
_MANIFEST = "metadata"
_MAX_LISTED = 8
_MAX_MESSAGE = 2000  # bytes of an error message shared between processes

PathLike = str | os.PathLike


class Checkpoint(NamedTuple):
  """What :func:`restore` and :meth:`Manager.restore` return.

  Attributes:
    params: the parameters, with the structure and leaf types of ``like``.
    opt_state: the optimizer state, likewise.
    step: the step number given to :func:`save`.
  """

  params: Any
  opt_state: Any
  step: int


class _Corrupted(ValueError):
  """A checkpoint that cannot be read (as opposed to one that does not fit)."""


def _orbax():
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
      "sofo_jax.checkpoint needs orbax-checkpoint: pip install "
      "'sofo_jax[checkpoint]' (or pip install orbax-checkpoint)."
    ) from error
  return ocp


# Small helpers ----------------------------------------------------------------


def _short(error: BaseException, limit: int = 300) -> str:
  text = f"{type(error).__name__}: {error}"
  return text if len(text) <= limit else text[:limit] + " ..."


def _where_different(a: str, b: str, context: int = 60) -> tuple[str, str]:
  """The two strings around the first character where they differ."""
  start = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
  start = max(start - context, 0)
  cut = lambda s: (
    ("..." if start else "")
    + s[start : start + 2 * context]
    + ("..." if len(s) > start + 2 * context else "")
  )
  return cut(a), cut(b)


def _listed(items: list) -> str:
  shown = ", ".join(items[:_MAX_LISTED])
  more = len(items) - _MAX_LISTED
  return shown + (f", ... ({more} more)" if more > 0 else "")


def _check_step(step: Any) -> int:
  """The step as a Python int; a bool or non-integer value is refused, not truncated."""
  array = np.asarray(step)
  if (
    array.shape != ()
    or array.dtype == np.bool_
    or not np.issubdtype(array.dtype, np.integer)
  ):
    raise TypeError(
      "checkpoint.save: step must be an integer (a Python int or an integer "
      f"scalar such as opt_state's count); got {step!r} of dtype {array.dtype}."
    )
  return int(array)


def _digest(array: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _json_digest(body: Any) -> str:
  canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
  return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _is_key(dtype: Any) -> bool:
  return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _dtype_name(dtype: Any) -> str:
  """``float32``, ``bfloat16``, ``key<fry>``, ..."""
  return str(dtype) if _is_key(dtype) else np.dtype(dtype).name


# The tree: leaf paths and a structure that survives a restart -----------------


def _flatten(params: Any, opt_state: Any) -> tuple[list, list, Any]:
  """Leaves, their path strings, and the treedef of ``{params, opt_state}``."""
  tree = {"params": params, "opt_state": opt_state}
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [jax.tree_util.keystr(path) for path, _ in with_paths]
  return [leaf for _, leaf in with_paths], paths, treedef


def _structure(treedef) -> str:
  """The node types and dict keys of a tree, e.g. ``dict['a'](tuple(*,None()))``.

  Unlike ``str(treedef)`` this leaves out other auxiliary data (an equinox
  module's static fields, a ``defaultdict``'s factory), which can hold
  function addresses that change from one process to the next.
  """
  node = treedef.node_data()
  if node is None:
    return "*"
  kind, aux = node
  name = kind.__qualname__
  if kind in (dict, collections.OrderedDict):
    name += repr(list(aux))
  elif kind is collections.defaultdict:
    name += repr(list(aux[1]))
  return name + "(" + ",".join(_structure(child) for child in treedef.children()) + ")"


# Save: every leaf checked before anything is written --------------------------


def _stored(leaf: Any, path: str) -> tuple[Any, dict]:
  """The value handed to orbax for one leaf, and its manifest entry.

  Raises TypeError (or ValueError for a deleted array) naming the leaf, so a
  save that cannot succeed fails before it writes anything.
  """
  entry: dict[str, Any] = {"path": path, "key_impl": None}
  if isinstance(leaf, jax.core.Tracer):
    raise TypeError(
      f"Leaf {path} is a traced value: checkpoint.save runs outside jax.jit "
      "(call it on the arrays the jitted step returns)."
    )
  value: jax.Array | np.ndarray
  if isinstance(leaf, jax.Array):
    if leaf.is_deleted():
      raise ValueError(
        f"Leaf {path} is a deleted array (donated to a jitted call?); "
        "nothing was saved."
      )
    entry.update(shape=list(leaf.shape), dtype=_dtype_name(leaf.dtype))
    if _is_key(leaf.dtype):
      entry["key_impl"] = str(jax.random.key_impl(leaf))
      leaf = jax.random.key_data(leaf)
    value = leaf
  elif isinstance(leaf, (np.ndarray, np.generic, bool, int, float, complex)):
    value = np.asarray(leaf)
    if value.dtype.kind in "OSUMm" or value.dtype.names is not None:
      raise TypeError(
        f"Leaf {path} is a NumPy array of dtype {value.dtype}, which cannot "
        "be saved; checkpoints hold numeric arrays only."
      )
    entry.update(shape=list(value.shape), dtype=_dtype_name(value.dtype))
  else:
    raise TypeError(
      f"Leaf {path} is a {type(leaf).__name__}, which cannot be saved: "
      "checkpoints hold arrays and Python numbers only. Mark such fields "
      "static (eqx.field(static=True)) or save only the arrays "
      "(eqx.filter(model, eqx.is_array)). Nothing was saved."
    )
  if value.size == 0:
    # orbax cannot store size-0 arrays; the shape and dtype say it all.
    entry.update(stored=False, sha256=None)
    return None, entry
  # orbax checksums no array data, so every leaf keeps a SHA-256 of its own.
  entry.update(stored=True, sha256=_visible_digest(value))
  return value, entry


def _visible_digest(value: Any) -> str | None:
  """SHA-256 of a value's bytes, or None where this process cannot see it all.

  A leaf split across processes has no single place where all its bytes
  are; its integrity is then left to orbax.
  """
  if isinstance(value, jax.Array):
    if value.is_fully_replicated:
      return _digest(np.asarray(value.addressable_data(0)))
    if not value.is_fully_addressable:
      return None
  return _digest(np.asarray(value))


def _prepare(params: Any, opt_state: Any, step: int) -> tuple[dict, dict]:
  """The arrays for orbax, keyed by leaf path, and the sealed manifest."""
  leaves, paths, treedef = _flatten(params, opt_state)
  arrays, entries = {}, []
  for leaf, path in zip(leaves, paths):
    value, entry = _stored(leaf, path)
    if value is not None:
      arrays[path] = value
    entries.append(entry)
  body = {
    "format": _FORMAT,
    "version": _VERSION,
    "step": step,
    "structure": _structure(treedef),
    "leaves": entries,
    "jax_version": jax.__version__,
  }
  # The seal: a checksum over the manifest itself, which orbax does not have.
  manifest = {"format": _FORMAT, "body": body, "sha256": _json_digest(body)}
  return arrays, manifest


def _composite_save(ocp, arrays: dict, manifest: dict):
  items = {_MANIFEST: ocp.args.JsonSave(manifest)}
  if arrays:
    items[_ARRAYS] = ocp.args.StandardSave(arrays)
  return ocp.args.Composite(**items)


# Restore: checks first, then data ---------------------------------------------


def _unseal(raw: Any, where: str) -> dict:
  """The manifest's body, once its checksum, format and version check out."""
  if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
    raise _Corrupted(
      f"{where} is not a sofo_jax checkpoint (or its metadata is corrupted)."
    )
  body = raw.get("body")
  if not isinstance(body, dict) or raw.get("sha256") != _json_digest(body):
    raise _Corrupted(
      f"The checkpoint at {where} is corrupted: its metadata does not match "
      "the checksum recorded when it was saved."
    )
  if body.get("version") != _VERSION:
    raise ValueError(
      f"The checkpoint at {where} has format version {body.get('version')}; "
      f"this sofo_jax reads version {_VERSION}."
    )
  return body


def _expected(leaf: Any) -> tuple[tuple, str]:
  """Shape and dtype name of a ``like`` leaf (array, template or number)."""
  dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
  shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
  return tuple(shape), _dtype_name(dtype)


def _check_matches(
  where: str, body: dict, paths: list, structure: str, expected: list
) -> None:
  """Raises ValueError naming every difference between checkpoint and ``like``."""
  saved = body["leaves"]
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
      f"The checkpoint at {where} does not match the structure of `like` "
      f"({detail}). Restore into a tree built by the same code (same model, "
      "same optimizer chain)."
    )
  if body["structure"] != structure:
    saved_def, like_def = _where_different(body["structure"], structure)
    raise ValueError(
      f"The checkpoint at {where} has the same leaves as `like` but a "
      "different tree structure (container types differ). First "
      f"difference:\n  checkpoint: {saved_def}\n  like:       {like_def}"
    )
  mismatched = [
    f"{leaf['path']}: checkpoint {tuple(leaf['shape'])} {leaf['dtype']}, "
    f"like {shape} {dtype}"
    for leaf, (shape, dtype) in zip(saved, expected)
    if tuple(leaf["shape"]) != shape or leaf["dtype"] != dtype
  ]
  if mismatched:
    raise ValueError(
      f"The checkpoint at {where} does not match `like` in the shape or dtype "
      f"of {len(mismatched)} leaves: {_listed(mismatched)}. (The optimizer "
      "state's shapes depend on its settings: num_tangents is the length "
      "of the diagnostics' eigenvalues.)"
    )


def _stored_shape(like: Any, entry: dict) -> tuple[tuple, Any]:
  """Shape and dtype of the array stored for a leaf (a key's raw data for keys)."""
  if entry["key_impl"] is not None:
    data = jax.eval_shape(jax.random.key_data, like)
    return data.shape, data.dtype
  return tuple(entry["shape"]), jnp.dtype(entry["dtype"])


def _target(like: Any, entry: dict) -> Any:
  """What orbax should restore one stored leaf as.

  A ``like`` with a sharding (an array, or a template that has one) gets a
  ``jax.Array`` on that sharding, which orbax reads shard by shard, in every
  process only the shards it holds. Anything else is read into NumPy.
  """
  shape, dtype = _stored_shape(like, entry)
  sharding = getattr(like, "sharding", None)
  if (
    sharding is not None
    and entry["key_impl"] is not None
    and isinstance(like, jax.Array)
  ):
    sharding = jax.random.key_data(like).sharding
  if sharding is not None:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  # A NumPy template tells orbax to read into NumPy; a broadcast scalar
  # has the right shape without allocating it.
  return np.broadcast_to(np.zeros((), dtype), shape)


def _like_leaf(value: Any, like: Any) -> Any:
  """``value`` as the kind of leaf ``like`` is (array, NumPy, Python scalar)."""
  if isinstance(like, (bool, int, float, complex)):
    return type(like)(np.asarray(value).item())
  if isinstance(like, (np.ndarray, np.generic)):
    return np.asarray(value)
  if isinstance(value, jax.Array):
    return value
  sharding = getattr(like, "sharding", None)  # size-0 leaves come from NumPy
  return jnp.asarray(value) if sharding is None else jax.device_put(value, sharding)


def _read_arrays(read: Callable[[Any], dict], where: str, args: Any) -> dict:
  """The arrays item of a checkpoint, read with orbax ``args``."""
  try:
    return dict(read(_orbax().args.Composite(**{_ARRAYS: args}))[_ARRAYS])
  except Exception as error:  # orbax / tensorstore raise many kinds
    raise _Corrupted(
      f"The checkpoint at {where} is corrupted or incomplete: its arrays "
      f"could not be read ({_short(error)})."
    ) from error


def _fits(raw: Any, like: Any) -> bool:
  """Whether a manifest, unchecked, lists ``like``'s leaf paths and structure."""
  body = raw.get("body", raw) if isinstance(raw, dict) else None
  if not isinstance(body, dict) or not isinstance(body.get("leaves"), list):
    return False
  _, paths, treedef = _flatten(*like)
  saved = [
    leaf.get("path") if isinstance(leaf, dict) else None for leaf in body["leaves"]
  ]
  if saved != paths:
    return False
  # Version 1 stored str(treedef), which cannot be compared: paths only.
  return raw.get("version") == 1 or body.get("structure") == _structure(treedef)


def _restore_from(read: Callable[[Any], dict], where: str, like: Any) -> Checkpoint:
  """Restores one checkpoint directory, ``read(args)`` being orbax's restore.

  A SOFO state saved in the earlier layout, with flat tuples for its
  buffers (see ``legacy_layout``), is read in that layout and then reshaped
  into ``like``'s.
  """
  ocp = _orbax()
  try:
    raw = read(ocp.args.Composite(**{_MANIFEST: ocp.args.JsonRestore()}))[_MANIFEST]
  except Exception as error:  # orbax raises many kinds; all mean the same
    raise _Corrupted(
      f"The checkpoint at {where} is corrupted or incomplete: its metadata "
      f"could not be read ({_short(error)})."
    ) from error
  params, opt_state = like
  if legacy_layout.has_buffers(opt_state) and not _fits(raw, like):
    old_like = (params, legacy_layout.to_tuple_layout(opt_state))
    if _fits(raw, old_like):
      restored = _restore_layout(read, where, raw, old_like)
      return restored._replace(
        opt_state=legacy_layout.from_tuple_layout(restored.opt_state, opt_state)
      )
  return _restore_layout(read, where, raw, like)


def _restore_layout(
  read: Callable[[Any], dict], where: str, raw: Any, like: Any
) -> Checkpoint:
  """Restores the checkpoint whose manifest is ``raw`` into ``like``'s layout."""
  ocp = _orbax()
  leaves, paths, treedef = _flatten(*like)
  expected = [_expected(leaf) for leaf in leaves]
  if isinstance(raw, dict) and raw.get("format") == _FORMAT and raw.get("version") == 1:
    return _restore_version_1(read, where, raw, leaves, paths, treedef, expected)
  body = _unseal(raw, where)
  _check_matches(where, body, paths, _structure(treedef), expected)

  entries = body["leaves"]
  targets = {
    entry["path"]: _target(like_leaf, entry)
    for entry, like_leaf in zip(entries, leaves)
    if entry["stored"]
  }
  arrays = (
    _read_arrays(read, where, ocp.args.StandardRestore(targets)) if targets else {}
  )

  values = []
  for entry, like_leaf in zip(entries, leaves):
    if not entry["stored"]:
      value: Any = np.zeros(*_stored_shape(like_leaf, entry))
      if entry["key_impl"]:
        value = jax.random.wrap_key_data(value, impl=entry["key_impl"])
    else:
      value = arrays.get(entry["path"])
      if value is None:
        raise _Corrupted(
          f"The checkpoint at {where} is corrupted: the data of "
          f"{entry['path']} is missing."
        )
      digest = _visible_digest(value) if entry["sha256"] else None
      if digest is not None and digest != entry["sha256"]:
        raise _Corrupted(
          f"The checkpoint at {where} is corrupted: the data of "
          f"{entry['path']} does not match the checksum recorded when it "
          "was saved."
        )
      if entry["key_impl"]:
        value = jax.random.wrap_key_data(value, impl=entry["key_impl"])
    values.append(_like_leaf(value, like_leaf))
  tree = jax.tree.unflatten(treedef, values)
  return Checkpoint(tree["params"], tree["opt_state"], int(body["step"]))


def _restore_version_1(
  read, where: str, raw: dict, leaves: list, paths: list, treedef, expected: list
) -> Checkpoint:
  """Reads a checkpoint of the first format, so that no saved run is lost.

  Version 1 stored the arrays as ``leaf_00000``, ... and the structure as
  ``str(treedef)``, which holds function addresses and so cannot be
  compared across processes: the leaf paths, shapes, dtypes and SHA-256
  digests it also stored are checked instead. Its manifest had no checksum
  of its own.
  """
  ocp = _orbax()
  manifest = raw.get("leaves")
  if not isinstance(manifest, list) or not isinstance(raw.get("step"), int):
    raise _Corrupted(
      f"The checkpoint at {where} is corrupted: its metadata is incomplete."
    )
  # The structure string is not comparable (see above): compare leaves only.
  _check_matches(where, {"leaves": manifest, "structure": ""}, paths, "", expected)
  names = [entry["name"] for entry in manifest if entry["name"]]
  arrays = {}
  if names:
    restore_args = {name: ocp.RestoreArgs(restore_type=np.ndarray) for name in names}
    arrays = _read_arrays(
      read, where, ocp.args.PyTreeRestore(restore_args=restore_args)
    )
  values = []
  for entry, (shape, dtype), like_leaf in zip(manifest, expected, leaves):
    value = (
      np.zeros(shape, dtype)
      if entry["name"] is None
      else np.asarray(arrays.get(entry["name"], np.zeros(0)))
    )
    if (
      value.shape != shape
      or _dtype_name(value.dtype) != dtype
      or (_digest(value) != entry["sha256"])
    ):
      raise _Corrupted(
        f"The checkpoint at {where} is corrupted: the data of {entry['path']} "
        "does not match the checksum recorded when it was saved."
      )
    values.append(_like_leaf(value, like_leaf))
  tree = jax.tree.unflatten(treedef, values)
  return Checkpoint(tree["params"], tree["opt_state"], raw["step"])


def _check_like(like: Any, caller: str) -> None:
  if not (isinstance(like, tuple) and len(like) == 2):
    raise TypeError(
      f"{caller}(..., like=(params, opt_state)): `like` must be a pair; got "
      f"{type(like).__name__}."
    )


# Several processes: process 0 decides, every process learns the outcome -------


_SHARED_ERRORS = (FileExistsError, FileNotFoundError, ValueError, TypeError, OSError)


def _from_process_zero(fn: Callable[[], Any]) -> Any:
  """``fn()`` run on process 0 only; its bytes result or its error, on all.

  ``fn`` returns a few ``bytes`` or None. In a single-process run
  this is just ``fn()``. Otherwise the result, or the type and message of
  the error, are broadcast, so every process returns or raises together
  instead of some of them waiting forever in the next barrier.
  """
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  code, payload, error = 0, b"", None
  if jax.process_index() == 0:
    try:
      payload = fn() or b""
    except Exception as caught:  # shared with the other processes below
      error = caught
      code = 1 + next(
        i
        for i, kind in enumerate((*_SHARED_ERRORS, Exception))
        if isinstance(caught, kind)
      )
      payload = _short(caught, _MAX_MESSAGE).encode()[:_MAX_MESSAGE]
  buffer = np.zeros(_MAX_MESSAGE + 2, np.int32)
  buffer[0], buffer[1] = code, len(payload)
  buffer[2 : 2 + len(payload)] = np.frombuffer(payload, np.uint8)
  buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
  if error is not None:
    raise error
  code, size = int(buffer[0]), int(buffer[1])
  payload = bytes(buffer[2 : 2 + size].astype(np.uint8))
  if code:
    kind = ((*_SHARED_ERRORS, RuntimeError))[code - 1]
    raise kind(f"(on process 0) {payload.decode(errors='replace')}")
  return payload or None


# Publishing one path ----------------------------------------------------------


def _sibling(path: pathlib.Path, kind: str, token: str) -> pathlib.Path:
  return path.parent / f".{path.name}.{kind}-{token}"


def _looks_like_checkpoint(path: pathlib.Path) -> bool:
  names = set(os.listdir(path))
  return not names or "_CHECKPOINT_METADATA" in names or _MANIFEST in names


def _check_destination(path: pathlib.Path, overwrite: bool) -> None:
  """Raises FileExistsError, before anything is written, if ``path`` is taken."""
  if not os.path.lexists(path):
    return
  if not overwrite:
    raise FileExistsError(
      f"A checkpoint already exists at {path}; pass overwrite=True to replace it."
    )
  if path.is_symlink():
    raise FileExistsError(
      f"{path} is a symbolic link; overwrite=True would replace the link, "
      f"not the checkpoint it points to. Save to {os.path.realpath(path)} "
      "instead. Nothing was written."
    )
  if not path.is_dir():
    raise FileExistsError(
      f"{path} is a file, not a checkpoint; overwrite=True replaces only "
      "checkpoints. Nothing was written."
    )
  if not _looks_like_checkpoint(path):
    raise FileExistsError(
      f"{path} is a directory that is not a checkpoint; overwrite=True "
      "replaces only checkpoints (it would delete what is there). Nothing "
      "was written."
    )


def _rename_onto_new(source: pathlib.Path, path: pathlib.Path) -> None:
  """``rename(source, path)``, which fails if a checkpoint appeared at ``path``.

  A directory cannot be renamed onto a non-empty directory or a file (an
  empty directory is replaced, which loses nothing), so this one system
  call both checks and commits: of two saves racing for ``path``, exactly
  one succeeds.
  """
  try:
    os.rename(source, path)
  except OSError as error:
    if os.path.lexists(path):
      raise FileExistsError(
        f"Another save created a checkpoint at {path} while this one was "
        "writing; that one was kept and this one discarded."
      ) from error
    raise


def _publish(
  staging: pathlib.Path, path: pathlib.Path, overwrite: bool, token: str
) -> None:
  """Moves the complete checkpoint ``staging`` to ``path``."""
  if not (overwrite and os.path.lexists(path)):
    _rename_onto_new(staging, path)
    return
  retired = _sibling(path, "old", token)
  try:
    os.rename(path, retired)
  except FileNotFoundError:  # another overwrite moved it first: race it fairly
    _rename_onto_new(staging, path)
    return
  # Between these two renames ``path`` is missing: if the process dies
  # here, restore(path) reads the new checkpoint from ``staging`` (or the
  # old one from ``retired``).
  try:
    _rename_onto_new(staging, path)
  except BaseException:
    if os.path.lexists(path):  # another save's checkpoint: the old one is superseded
      shutil.rmtree(retired, ignore_errors=True)
    else:
      os.rename(retired, path)  # undo: the old checkpoint stays in place
    raise
  shutil.rmtree(retired)


def _remove_leftovers(path: pathlib.Path, token: str, failed: bool) -> None:
  """Deletes this save's staging directory and orbax's temporary one.

  When one item of a save fails, orbax does not wait for its other writer
  threads, which can recreate the temporary directory for a moment after
  the error; after a failure this keeps removing until it stays away.
  """
  prefix = _sibling(path, "partial", token).name
  quiet_since = start = time.monotonic()
  while path.parent.is_dir():
    found = [name for name in os.listdir(path.parent) if name.startswith(prefix)]
    for name in found:
      shutil.rmtree(path.parent / name, ignore_errors=True)
    now = time.monotonic()
    quiet_since = now if found else quiet_since
    if not failed or now - quiet_since > 0.5 or now - start > 30:
      return
    time.sleep(0.05)


def _recoverable(path: pathlib.Path) -> list:
  """Complete checkpoints an interrupted overwrite left beside ``path``.

  The new one (``.partial-``) first, then the old one (``.old-``), each
  newest first. orbax's unfinished temporary directories have longer names
  and never match.
  """
  if not path.parent.is_dir():
    return []
  pattern = re.compile(rf"^\.{re.escape(path.name)}\.(partial|old)-[0-9a-f]{{32}}$")
  found = []
  for name in os.listdir(path.parent):
    match = pattern.match(name)
    candidate = path.parent / name
    if match and candidate.is_dir() and not candidate.is_symlink():
      found.append((match.group(1) != "partial", -candidate.stat().st_mtime, name))
  return [path.parent / name for *_, name in sorted(found)]


# Public API: one checkpoint at one path ---------------------------------------


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
  parameter pytree of arrays (typed PRNG keys included) and Python numbers:
  dicts, tuples, equinox modules, ... In a multi-process run
  (``jax.distributed``) call it on every process with the same arguments:
  each process writes the shards it holds, process 0 the rest.

  Every leaf is checked before anything is written. The checkpoint is
  written by orbax into a hidden directory and then published with one
  ``rename`` that fails if ``path`` exists, so of two saves racing for the
  same path exactly one succeeds and the other raises.

  Args:
    path: the checkpoint directory to create.
    params: the parameter pytree.
    opt_state: the optimizer state.
    step: the training step to record (a Python int or integer scalar).
    overwrite: replace an existing checkpoint at ``path``. The old one is
      removed only after the new one is complete; if the process dies in
      between, :func:`restore` finds one of them. Only a checkpoint (or an
      empty directory) is replaced, never a file, a symbolic link or another
      directory.

  Returns:
    The absolute path of the checkpoint.

  Raises:
    FileExistsError: if ``path`` exists and ``overwrite`` is False (also
      when another save claimed it first), or if it is not a checkpoint.
    TypeError: if a leaf is not an array or a Python number (a string, a
      function, a traced value) or ``step`` is not an integer.
    ValueError: if a leaf is a deleted (donated) array.

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
  step = _check_step(step)
  arrays, manifest = _prepare(params, opt_state, step)

  def claim() -> bytes:
    _check_destination(path, overwrite)
    return uuid.uuid4().bytes

  token = _from_process_zero(claim).hex()
  staging = _sibling(path, "partial", token)
  failed = True
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      checkpointer.save(staging, args=_composite_save(ocp, arrays, manifest))
    _from_process_zero(lambda: _publish(staging, path, overwrite, token))
    failed = False
  finally:
    if jax.process_index() == 0:
      _remove_leftovers(path, token, failed)
  return path


def restore(path: PathLike, *, like: tuple[Any, Any]) -> Checkpoint:
  """Restores a checkpoint written by :func:`save` into the shape of ``like``.

  ``like = (params, opt_state)`` gives the expected structure, shapes and
  dtypes: fresh ones (``params0, opt.init(params0)``), or abstract ones from
  ``jax.eval_shape``. Every leaf is checked against the checkpoint before any
  data is read, and every restored array against its saved SHA-256. Leaves
  of ``like`` that have a sharding are restored onto it (in a multi-process
  run, each process reads only its shards; call it on every process).

  If ``path`` is missing because an overwrite was interrupted between its
  two renames, the checkpoint is read from where the overwrite left it (the
  new one if it is intact, else the old one), with a warning.

  Args:
    path: a directory written by :func:`save` (or a step directory of a
      :class:`Manager`).
    like: a pair ``(params, opt_state)`` shaped like the saved ones.

  Returns:
    A :class:`Checkpoint` ``(params, opt_state, step)``. Array leaves come
    back as ``jax.Array`` (on ``like``'s sharding when it has one), NumPy
    leaves as NumPy arrays, Python scalars as Python scalars, typed keys as
    typed keys.

  Raises:
    FileNotFoundError: if there is no checkpoint at ``path``.
    ValueError: if the checkpoint is corrupted or incomplete, or does not
      match ``like`` (the message names the leaves that differ and how).
  """
  ocp = _orbax()
  path = pathlib.Path(os.path.abspath(os.fspath(path)))
  _check_like(like, "restore")
  if path.is_dir():
    candidates = [path]
  elif os.path.lexists(path):
    raise FileNotFoundError(f"No checkpoint at {path} (it is a file).")
  else:
    candidates = _recoverable(path)
  if not candidates:
    raise FileNotFoundError(f"No checkpoint at {path}.")

  for index, directory in enumerate(candidates):

    def read(args, directory=directory):
      with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        return checkpointer.restore(directory, args=args)

    try:
      restored = _restore_from(read, str(directory), like)
    except _Corrupted:
      if index + 1 == len(candidates):
        raise
      continue
    if directory != path:
      warnings.warn(
        f"No checkpoint at {path}: an overwrite was interrupted. Restored "
        f"the one it left at {directory}; move it to {path} to keep it.",
        RuntimeWarning,
        stacklevel=2,
      )
    return restored
  raise AssertionError("unreachable")


# Public API: a directory of steps ---------------------------------------------


class Manager:
  """Checkpoints of one run, one per step, on orbax's ``CheckpointManager``.

  Each step is a directory ``directory/<step>`` in the format of
  :func:`save` (so :func:`restore` reads it too). orbax keeps the newest
  ``max_to_keep`` steps, commits each atomically and, with
  ``async_save=True``, writes in the background while training goes on.
  :meth:`restore` without a step restores the newest step that is intact:
  a corrupted one is skipped with a warning, never returned.

  Args:
    directory: the run's checkpoint directory (created if missing).
    max_to_keep: how many of the newest steps to keep (None: all).
    async_save: write in a background thread; call :meth:`wait_until_finished`
      (or :meth:`close`, or leave the ``with`` block) before reading them or
      exiting.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, sofo_jax
    >>> opt = sofo_jax.sofo(1.0, 4, key=jax.random.key(0))
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> with sofo_jax.checkpoint.Manager(tempfile.mkdtemp(), max_to_keep=2) as manager:
    ...   for step in (10, 20, 30):
    ...     manager.save(step, params, state)
    ...   restored = manager.restore(like=(params, state))
    >>> restored.step, manager.all_steps()
    (30, [20, 30])
  """

  def __init__(
    self,
    directory: PathLike,
    *,
    max_to_keep: int | None = None,
    async_save: bool = False,
  ):
    ocp = _orbax()
    self._ocp = ocp
    self.directory = pathlib.Path(os.path.abspath(os.fspath(directory)))
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
      ),
    )

  def save(self, step: int, params: Any, opt_state: Any) -> None:
    """Saves one step (asynchronously if the manager was made so).

    Raises:
      TypeError: as :func:`save`, before anything is written.
      ValueError: if ``step`` is not after the newest saved step (orbax
        would otherwise skip it silently).
    """
    step = _check_step(step)
    arrays, manifest = _prepare(params, opt_state, step)
    if not self._manager.save(step, args=_composite_save(self._ocp, arrays, manifest)):
      raise ValueError(
        f"Step {step} was not saved: the newest saved step is "
        f"{self._manager.latest_step()} and steps must increase. To go "
        "back, delete the later steps first (Manager.delete)."
      )

  def restore(self, *, like: tuple[Any, Any], step: int | None = None) -> Checkpoint:
    """Restores ``step``, or the newest intact step, into the shape of ``like``.

    Args:
      like: a pair ``(params, opt_state)`` as for :func:`restore`.
      step: the step to restore; None for the newest one that is intact.

    Returns:
      A :class:`Checkpoint` ``(params, opt_state, step)``.

    Raises:
      FileNotFoundError: if there is no such step (or no step at all).
      ValueError: if the step is corrupted (with ``step`` given, or when
        every step is) or does not match ``like``.
    """
    _check_like(like, "Manager.restore")
    self.wait_until_finished()
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f"No step {step} in {self.directory}; it has {steps}.")
      steps = [step]
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    for candidate in sorted(steps, reverse=True):
      read = lambda args, s=candidate: self._manager.restore(s, args=args)
      try:
        return _restore_from(read, f"{self.directory} (step {candidate})", like)
      except _Corrupted as error:
        if step is not None or candidate == min(steps):
          raise
        warnings.warn(
          f"Skipping step {candidate}: {error}", RuntimeWarning, stacklevel=2
        )
    raise AssertionError("unreachable")

  def latest_step(self) -> int | None:
    """The newest committed step (not checked for corruption), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list:
    """The committed steps, in increasing order."""
    return sorted(self._manager.all_steps())

  def delete(self, step: int) -> None:
    """Deletes one step."""
    self._manager.delete(step)

  def wait_until_finished(self) -> None:
    """Blocks until an asynchronous save is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's resources."""
    self._manager.close()

  def __enter__(self) -> Manager:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
