"""MkDocs hook: every public name of sofo_jax has a place in the API reference.

The API pages list their objects one by one (to group them), so a name added
to a module's ``__all__`` could silently miss the reference. This hook reads
the ``::: identifier`` blocks of every page and warns (an error under
``mkdocs build --strict``) when a name in the ``__all__`` of a documented
module is neither rendered with that module's members nor given a block of
its own.
"""

from __future__ import annotations

import ast
import logging
import re
import textwrap
from pathlib import Path

import yaml

_log = logging.getLogger("mkdocs.hooks.api_coverage")
_BLOCK = re.compile(r"^::: *(\S+)[ \t]*\n((?:(?:[ \t]+.*)?\n)*)", re.MULTILINE)
_ROOT = Path(__file__).resolve().parents[2]

# identifier -> the mkdocstrings options of its block
_blocks: dict[str, dict] = {}


def on_pre_build(**kwargs) -> None:
  _blocks.clear()


def on_page_markdown(markdown: str, **kwargs) -> str:
  for match in _BLOCK.finditer(markdown):
    config = yaml.safe_load(textwrap.dedent(match.group(2))) or {}
    _blocks[match.group(1)] = config.get("options") or {}
  return markdown


def _source(module: str) -> Path | None:
  """The file that defines ``module`` (a package's ``__init__.py``)."""
  base = _ROOT.joinpath(*module.split("."))
  for path in (base / "__init__.py", base.with_suffix(".py")):
    if path.is_file():
      return path
  return None


def _exports(path: Path) -> list[str] | None:
  """The names in the module's literal ``__all__``, or None without one."""
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Assign) and any(
      isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets
    ):
      return list(ast.literal_eval(node.value))
  return None


def on_env(env, **kwargs):
  for identifier, options in sorted(_blocks.items()):
    path = _source(identifier)
    if path is None:
      continue  # not a module
    names = _exports(path)
    if names is None:
      continue  # rendered with its public members by mkdocstrings' filters
    for name in names:
      full = f"{identifier}.{name}"
      if full in _blocks:
        continue
      if _source(full) is not None:
        rendered = options.get("show_submodules", False)
      else:
        members = options.get("members", True)
        rendered = (
          name in members if isinstance(members, list) else members is not False
        )
      if not rendered:
        _log.warning(
          f"API reference: {full} (in {identifier}.__all__) is documented "
          f"nowhere; add '::: {full}' to a page under docs/api/."
        )
  return env
