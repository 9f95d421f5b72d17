"""Per-layer grouping for `rdnac inspect` text: what every layer repeats is shown once.

A row (a decision, a node's kernel choice, a diff entry) that differs between
layers only in layer numbers is one group: its text with `layers.N.` for the
row's own layer (`layers.N-1.`, `layers.N+1.` for its neighbours) and the
layers it stands for. `expand` turns a group back into its rows exactly, so
the grouped form names every row. A 36-layer plan then reads as short as a
2-layer one; `inspect --layers` lists every layer instead.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field

_LAYER = re.compile(r"\blayers\.(\d+)\.")
_OFFSETS = {0: "N", -1: "N-1", 1: "N+1"}


@dataclass
class Group:
    texts: tuple[str, ...]  # templated when `layers` holds numbers; the row itself otherwise
    layers: list[int | None] = field(default_factory=list)  # one entry per row (None: a row of no layer)

    @property
    def is_templated(self) -> bool:
        return self.layers[0] is not None and len(self.layers) > 1

    def rows(self) -> list[tuple[str, ...]]:
        return [expand(self.texts, layer) if layer is not None else self.texts for layer in self.layers]


def layer_of(text: str) -> int | None:
    m = _LAYER.search(text)
    return int(m.group(1)) if m else None


def template(texts: tuple[str, ...], layer: int) -> tuple[str, ...]:
    def sub(m: re.Match) -> str:
        name = _OFFSETS.get(int(m.group(1)) - layer)
        return f"layers.{name}." if name else m.group(0)
    return tuple(_LAYER.sub(sub, t) for t in texts)


def expand(texts: tuple[str, ...], layer: int) -> tuple[str, ...]:
    out = []
    for t in texts:
        t = t.replace("layers.N-1.", f"layers.{layer - 1}.").replace("layers.N+1.", f"layers.{layer + 1}.")
        out.append(t.replace("layers.N.", f"layers.{layer}."))
    return tuple(out)


def group_rows(rows: list[tuple[str, ...]], group: bool = True) -> list[Group]:
    """Rows in groups, in order of first appearance; the layer of a row is the first in its first text.
    With `group=False`, one group per row (what `--layers` shows)."""
    if not group:
        return [Group(tuple(r), [None]) for r in rows]
    groups: dict[tuple, Group] = {}
    for row in rows:
        row = tuple(row)
        layer = layer_of(row[0])
        key = (template(row, layer), True) if layer is not None else (row, False)
        groups.setdefault(key, Group(key[0])).layers.append(layer)
    out = []
    for g in groups.values():
        if g.layers[0] is not None and len(set(g.layers)) == 1:  # one layer (maybe repeated): its own text
            out.append(Group(expand(g.texts, g.layers[0]), [None] * len(g.layers)))
        else:
            out.append(g)
    return out


def ranges(values) -> str:
    """"0-3, 5" for [0, 1, 2, 3, 5]; repeats count once."""
    values = sorted(set(values))
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)


def braced(name: str, g: Group) -> str:
    """`layers.N.qkv_proj` of a group as `layers.{0-35}.qkv_proj` (a single row: the name itself)."""
    return name.replace("layers.N.", f"layers.{{{ranges(g.layers)}}}.") if g.is_templated else name


def count_note(g: Group) -> str:
    """" (x2)" for a row that appears more than once; "" otherwise."""
    return f" (x{len(g.layers)})" if not g.is_templated and len(g.layers) > 1 else ""


def wrap(text: str, width: int, indent: str = "  ", hanging: str = "      ") -> list[str]:
    return textwrap.wrap(text, width=width, initial_indent=indent, subsequent_indent=hanging,
                         break_on_hyphens=False) or [indent]
