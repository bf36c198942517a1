"""Graph drawing positions from Graphviz's `dot`, with a built-in layered layout as the fallback.

`dot` (Sugiyama-style layered drawing: cycle removal, network-simplex ranking, crossing
minimisation, coordinate assignment) is the well-kept tool for exactly the drawings the
visualizer makes: small DAGs of boxes, top to bottom. It runs once per snapshot at report time,
all groups in one process, so the page never lays anything out. Where `dot` is not installed,
a longest-path layering with barycenter ordering keeps `tileflow viz` working, and the page says
which layout it got.

Positions come back in grid units of the page's drawing: x in box widths plus the horizontal
gap, y in box heights plus the vertical gap, each item's top-left corner.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Sequence

# The page draws boxes of this size (in px = pt at 72 dpi) with these gaps; see viz_template.html.
BOX_W, BOX_H, GAP_X, GAP_Y = 150, 30, 18, 26


@dataclass(frozen=True)
class LayoutInput:
    """One drawing: `count` items (0 … count − 1, in graph order) and directed edges between them."""

    count: int
    edges: Sequence[tuple[int, int]]


def layout_engine() -> str:
    """What `layout_all` will use: `"graphviz dot <version>"` or the built-in fallback."""
    dot = shutil.which("dot")
    if dot is None:
        return "built-in layered (Graphviz dot not found)"
    out = subprocess.run([dot, "-V"], capture_output=True, text=True, timeout=30)
    version = (out.stderr or out.stdout).strip().removeprefix("dot - graphviz version ").split(" ")[0]
    return f"graphviz dot {version}"


def layout_all(drawings: Sequence[LayoutInput]) -> list[list[tuple[float, float]]]:
    """The (x, y) grid position of every item of every drawing, by `dot` when installed;
    RuntimeError (saying what to do) when `dot` cannot run or fails."""
    dot = shutil.which("dot")
    if dot is None or not drawings:
        return [layered_layout(d) for d in drawings]
    source = "\n".join(_dot_source(i, d) for i, d in enumerate(drawings))
    fix = "fix the Graphviz install, or take `dot` off PATH to use the built-in layout"
    try:
        out = subprocess.run([dot, "-Tplain"], input=source, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"graphviz dot ({dot}) could not lay the graphs out: {exc}; {fix}") from None
    if out.returncode != 0:
        raise RuntimeError(f"graphviz dot ({dot}) failed with exit code {out.returncode}: "
                           f"{out.stderr.strip()[:500]}; {fix}")
    return _parse_plain(out.stdout, drawings)


def _dot_source(index: int, drawing: LayoutInput) -> str:
    w, h = BOX_W / 72, BOX_H / 72
    lines = [
        f"digraph g{index} {{",
        f"  graph [rankdir=TB, nodesep={GAP_X / 72:.4f}, ranksep={GAP_Y / 72:.4f}];",
        f"  node [shape=box, fixedsize=true, width={w:.4f}, height={h:.4f}, label=\"\"];",
    ]
    # Items in graph order keep sources in that order within their rank.
    lines += [f"  n{i};" for i in range(drawing.count)]
    lines += [f"  n{a} -> n{b};" for a, b in drawing.edges if a != b]
    lines.append("}")
    return "\n".join(lines)


def _parse_plain(text: str, drawings: Sequence[LayoutInput]) -> list[list[tuple[float, float]]]:
    """`-Tplain` gives, per graph, "graph scale W H" then "node name x y w h ..." (inches, centers,
    y up) and ends with "stop"."""
    results: list[list[tuple[float, float]]] = []
    centers: dict[int, tuple[float, float]] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "node":
            centers[int(parts[1][1:])] = (float(parts[2]) * 72, float(parts[3]) * 72)
        elif parts[0] == "stop":
            drawing = drawings[len(results)]
            results.append(_to_grid([centers[i] for i in range(drawing.count)]))
            centers = {}
    if len(results) != len(drawings):
        raise RuntimeError(f"graphviz dot laid out {len(results)} of {len(drawings)} drawings")
    return results


def _to_grid(centers: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if not centers:
        return []
    left = min(x for x, _ in centers) - BOX_W / 2
    top = max(y for _, y in centers) + BOX_H / 2
    return [
        (round((x - BOX_W / 2 - left) / (BOX_W + GAP_X), 3), round((top - (y + BOX_H / 2)) / (BOX_H + GAP_Y), 3))
        for x, y in centers
    ]


def layered_layout(drawing: LayoutInput) -> list[tuple[float, float]]:
    """The fallback: y = longest path from the sources, x = slot in the layer ordered by the mean
    slot of the item's inputs.

    Items need not come in topological order (a group's child boxes come in the order of their
    first node, often a weight read late): the layering follows the edges, not the item order. A
    cycle (two groups feeding each other) is broken deterministically: the edges that close one
    in a depth-first walk from the items in order are left out of the layering, and only they
    may point upwards.
    """
    n = drawing.count
    succs: list[list[int]] = [[] for _ in range(n)]
    for a, b in sorted(set(drawing.edges)):
        if a != b and 0 <= a < n and 0 <= b < n:
            succs[a].append(b)
    preds: list[list[int]] = [[] for _ in range(n)]
    order: list[int] = []  # postorder of the walk; reversed, a topological order of the kept edges
    state = [0] * n  # 0: not reached, 1: on the walk's stack, 2: done
    for start in range(n):
        if state[start]:
            continue
        state[start] = 1
        stack = [(start, iter(succs[start]))]
        while stack:
            v, rest = stack[-1]
            for w in rest:
                if state[w] == 1:
                    continue  # back to an item on the stack: this edge closes a cycle
                preds[w].append(v)
                if state[w] == 0:
                    state[w] = 1
                    stack.append((w, iter(succs[w])))
                    break
            else:
                state[v] = 2
                order.append(v)
                stack.pop()
    layer = [0] * n
    for i in reversed(order):
        layer[i] = 1 + max((layer[p] for p in preds[i]), default=-1)
    by_layer: dict[int, list[int]] = {}
    for i, y in enumerate(layer):
        by_layer.setdefault(y, []).append(i)
    slot = [0.0] * n
    for y in sorted(by_layer):
        members = by_layer[y]  # in item order
        key = {i: sum(slot[p] for p in preds[i]) / len(preds[i]) if preds[i] else float(r) for r, i in enumerate(members)}
        members.sort(key=lambda i: (key[i], i))
        for x, i in enumerate(members):
            slot[i] = float(x)
    return [(slot[i], float(layer[i])) for i in range(n)]
