"""What a compiled program communicates: collectives read from its HLO text.

A diagnostic for the distributed benchmark and tests (not part of sofo_jax;
``tests/distributed_checks.py`` imports it from here): it lists
every all-reduce, all-gather, reduce-scatter, all-to-all and
collective-permute in ``jax.jit(f).lower(...).compile().as_text()``, with the
number of elements in its result and how many times it runs per call
(collectives inside ``while`` loops, e.g. a ``lax.scan`` over time, run once
per iteration; XLA records the trip count when it knows it).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

_COLLECTIVES = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "all-to-all",
  "collective-permute",
)
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(
  r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+("
  + "|".join(_COLLECTIVES)
  + r")(-start)?\("
)
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_CALLEES = re.compile(
  r"\b(?:body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_BITS = {
  "pred": 8,
  "bf16": 16,
  "f16": 16,
  "f32": 32,
  "f64": 64,
  "s32": 32,
  "u32": 32,
  "s64": 64,
  "u64": 64,
  "s8": 8,
  "u8": 8,
  "c64": 64,
  "c128": 128,
  "s16": 16,
  "u16": 16,
}


class Collective(NamedTuple):
  """One collective instruction of a compiled program.

  Attributes:
    kind: ``"all-reduce"``, ``"all-gather"``, ...
    elements: number of elements in its result (all tuple parts together).
    bytes: the same in bytes.
    count: how many times it runs per call of the program (product of the
      known trip counts of the loops around it); ``None`` if a loop around it
      has an unknown trip count.
    computation: the HLO computation that holds it.
  """

  kind: str
  elements: int
  bytes: int
  count: int | None
  computation: str


def _result_arrays(shape_text: str, kind: str, is_async: bool) -> list:
  arrays = [
    (dtype, math.prod(int(d) for d in dims.split(",") if d))
    for dtype, dims in _ARRAY.findall(shape_text)
  ]
  if is_async and kind == "all-gather" and len(arrays) == 2:
    arrays = arrays[1:]  # (operand, result) of an async all-gather
  return arrays


def collectives(hlo_text: str) -> list[Collective]:
  """Lists the collectives of compiled HLO text, with their run counts.

  Args:
    hlo_text: ``compiled.as_text()`` of a ``jax.jit(...).lower(...).compile()``.

  Returns:
    A list of :class:`Collective`, in program order.
  """
  found = []  # (computation, kind, elements, bytes)
  calls = {}  # computation -> list of (callee, multiplier or None)
  entry = None
  current = None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and "=" not in line.split("(")[0]:
      current = header.group(2)
      calls.setdefault(current, [])
      if header.group(1):
        entry = current
      continue
    if current is None:
      continue
    match = _INSTRUCTION.match(line)
    if match:
      shape_text, kind, is_async = match.group(1), match.group(2), bool(match.group(3))
      arrays = _result_arrays(shape_text, kind, is_async)
      elements = sum(n for _, n in arrays)
      nbytes = sum(n * _BITS.get(dtype, 32) // 8 for dtype, n in arrays)
      found.append((current, kind, elements, nbytes))
    trip = _TRIP_COUNT.search(line)
    is_while = " while(" in line
    for callee in _CALLEES.findall(line):
      multiplier = 1
      if is_while and (f"body=%{callee}" in line or f"body={callee}" in line):
        multiplier = int(trip.group(1)) if trip else None
      calls[current].append((callee, multiplier))
    for group in _BRANCHES.findall(line):
      for callee in group.split(","):
        calls[current].append((callee.strip().lstrip("%"), 1))

  counts: dict = {}

  def visit(name: str, count: int | None) -> None:
    previous = counts.get(name, 0)
    if previous is None or count is None:
      counts[name] = None
    else:
      counts[name] = previous + count
    for callee, multiplier in calls.get(name, []):
      visit(callee, None if count is None or multiplier is None else count * multiplier)

  if entry is not None:
    visit(entry, 1)
  return [
    Collective(kind, elements, nbytes, counts.get(comp, 0), comp)
    for comp, kind, elements, nbytes in found
  ]


def total_elements(found: list[Collective]) -> int | None:
  """Elements moved per call, summed over collectives and loop iterations."""
  if any(c.count is None for c in found):
    return None
  return sum(c.elements * c.count for c in found)
