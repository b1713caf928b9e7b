"""Griffe extension: the reST markup of sofo_jax's docstrings, as Markdown.

sofo_jax's docstrings are written like optax's: Google-style sections with reST
roles (``:func:`sofo```, ``:math:`\\lambda```) and ``.. math::`` blocks, so that
they read well in the source and in ``help()``. mkdocstrings renders Markdown, so
this extension rewrites each docstring of the package once it is loaded, before
it is parsed:

- ``:math:`x``` becomes ``$x$`` and a ``.. math::`` block becomes a ``$$`` block
  (both typeset by ``pymdownx.arithmatex``);
- ``:func:``, ``:class:``, ``:meth:``, ``:mod:``, ``:data:``, ``:attr:``,
  ``:exc:`` and ``:obj:`` become a cross-reference when the name resolves to an
  object that the API pages document, and inline code when it resolves to a
  private helper or to another library (no inventories are fetched: the build
  needs no network);
- ```text <url>`_`` becomes ``[text](url)``;
- a doctest block (``>>>`` lines and their output, up to a blank line) is
  fenced as ``pycon`` code, wherever it stands (``Example:`` sections are
  admonitions whose content is Markdown).

A name that looks like one of sofo_jax's own (unqualified, starting with
``sofo_jax``, or qualified by a name that resolves into sofo_jax) but resolves
to nothing is reported as a warning, which fails ``mkdocs build --strict``: a
stale reference cannot slip into the docs.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import griffe

# Under "mkdocs.", so that a warning fails `mkdocs build --strict`.
_logger = logging.getLogger("mkdocs.plugins.sofo_jax_docstrings")

_PACKAGE = "sofo_jax"
_ROLE = re.compile(r":(func|class|meth|mod|data|attr|exc|obj|const):`([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_LINK = re.compile(r"`([^`<]+?)\s*<(https?://[^>]+)>`__?")
_MATH_DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*(.*)$")
_SECTION_TITLE = re.compile(r"^\s*[A-Z][A-Za-z ]*:\s*$")


def _public_paths(package: griffe.Module) -> dict[str, str]:
  """Canonical path of every public object -> the public path it is shown at.

  Walks the public modules (no ``_``-prefixed name on the path), their public
  members (``__all__`` where a module defines it) and the public members of
  their classes that have a docstring, as the API pages render them.
  """
  found: dict[str, str] = {}

  def visit(obj: griffe.Object | griffe.Alias, public: str) -> None:
    try:
      target = obj.final_target if obj.is_alias else obj
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
      return  # another library's object, re-exported
    if not target.path.startswith(_PACKAGE):
      return
    if not target.is_module and not target.has_docstrings:
      return  # not rendered (show_if_no_docstring: false)
    found.setdefault(target.path, public)
    if target.is_module and obj.is_alias:
      return  # a module re-exported by a parent is walked under its own path
    if target.is_module or target.is_class:
      for name, member in target.members.items():
        if name.startswith("_"):
          continue
        if target.is_module and not member.is_public:
          continue
        visit(member, f"{public}.{name}")

  visit(package, package.path)
  return found


def _resolve(obj: griffe.Object, name: str) -> str | None:
  """The path ``name`` refers to from ``obj``'s scope, or None."""
  if name.startswith(_PACKAGE + ".") or name == _PACKAGE:
    return name
  first, _, rest = name.partition(".")
  try:
    path = obj.resolve(first)
  except griffe.NameResolutionError:
    return None
  return f"{path}.{rest}" if rest else path


def _canonical(package: griffe.Module, path: str) -> str | None:
  """The canonical path of the object at ``path`` in the package, or None."""
  parts = path.split(".")
  if parts[0] != _PACKAGE:
    return None
  obj: Any = package
  try:
    for part in parts[1:]:
      target = obj.final_target if obj.is_alias else obj
      obj = target.members[part]
    return (obj.final_target if obj.is_alias else obj).path
  except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
    return None


class SphinxMarkup(griffe.Extension):
  """Rewrites the reST markup of sofo_jax's docstrings as Markdown."""

  def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
    if pkg.name != _PACKAGE:
      return
    public = _public_paths(pkg)
    for obj in _walk(pkg):
      if obj.docstring is not None:
        obj.docstring.value = self._rewrite(pkg, public, obj, obj.docstring.value)

  def _rewrite(
    self,
    package: griffe.Module,
    public: dict[str, str],
    obj: griffe.Object,
    text: str,
  ) -> str:
    def role(match: re.Match) -> str:
      written = match.group(2).strip()
      short = written.startswith("~")
      name = written.lstrip("~").removesuffix("()")
      shown = name.rsplit(".", 1)[-1] if short else name
      path = _resolve(obj, name)
      canonical = _canonical(package, path) if path else None
      if canonical in public:
        return f"[`{shown}`][{public[canonical]}]"
      ours = "." not in name or (path or name).startswith(_PACKAGE)
      if canonical is None and ours:
        _logger.warning(
          f"{obj.path}: the reference {match.group(0)} resolves to nothing"
        )
      return f"`{shown}`"

    text = _doctest_blocks(_math_blocks(text))
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1).strip()}$", text)
    text = _LINK.sub(lambda m: f"[{m.group(1)}]({m.group(2)})", text)
    return _ROLE.sub(role, text)


def _walk(obj: griffe.Object):
  """The package's own objects (not aliases), depth first."""
  yield obj
  for member in obj.members.values():
    if not member.is_alias:
      yield from _walk(member)


def _math_blocks(text: str) -> str:
  """``.. math::`` directives as ``$$`` blocks at the directive's indentation."""
  lines = text.splitlines()
  out: list[str] = []
  i = 0
  while i < len(lines):
    match = _MATH_DIRECTIVE.match(lines[i])
    if not match:
      out.append(lines[i])
      i += 1
      continue
    indent, inline = match.group(1), match.group(2)
    body = [inline] if inline else []
    i += 1
    while i < len(lines) and (
      not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
    ):
      body.append(lines[i])
      i += 1
    while body and not body[-1].strip():
      body.pop()
    trailing = len(lines) - i
    content = [line.strip() for line in body if line.strip()]
    if out and out[-1].strip():
      out.append("")
    out.extend([f"{indent}$$", *(indent + line for line in content), f"{indent}$$"])
    if trailing:
      out.append("")
  return "\n".join(out)


def _doctest_blocks(text: str) -> str:
  """Fences each doctest block as ``pycon`` code at its own indentation."""
  out: list[str] = []
  lines = text.splitlines()
  i = 0
  while i < len(lines):
    stripped = lines[i].lstrip()
    if not (stripped == ">>>" or stripped.startswith(">>> ")):
      out.append(lines[i])
      i += 1
      continue
    indent = lines[i][: len(lines[i]) - len(stripped)]
    if out and out[-1].strip() and not _SECTION_TITLE.match(out[-1]):
      out.append("")  # a fence opens a block; a section's body follows its title
    out.append(f"{indent}```pycon")
    while i < len(lines) and lines[i].strip():
      out.append(lines[i])
      i += 1
    out.append(f"{indent}```")
  return "\n".join(out)
