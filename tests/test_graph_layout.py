"""Drawing positions: Graphviz `dot` and the built-in fallback put every edge downwards on
acyclic drawings and never stack two boxes on each other."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tileflow.graph_layout import LayoutInput, layered_layout, layout_all, layout_engine


@st.composite
def dags(draw) -> LayoutInput:
    """An acyclic drawing whose items are in no particular order: a group's child boxes come in
    the order of their first node (often a weight read late), not topologically."""
    n = draw(st.integers(1, 14))
    pairs = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=3 * n))
    label = draw(st.permutations(range(n)))
    return LayoutInput(n, sorted({(label[min(a, b)], label[max(a, b)]) for a, b in pairs if a != b}))


def _check(drawing: LayoutInput, xy: list[tuple[float, float]]) -> None:
    assert len(xy) == drawing.count
    for a, b in drawing.edges:
        assert xy[a][1] < xy[b][1], (a, b, xy)
    for i in range(drawing.count):
        for j in range(i + 1, drawing.count):
            (xi, yi), (xj, yj) = xy[i], xy[j]
            # Boxes are one unit wide and under one unit tall in grid units: they must not overlap.
            assert abs(xi - xj) >= 0.99 or abs(yi - yj) >= 0.5, (i, j, xy)


@settings(max_examples=150, deadline=None)
@given(dags())
def test_fallback_layout(drawing: LayoutInput) -> None:
    _check(drawing, layered_layout(drawing))


def test_fallback_layout_follows_edges_against_item_order() -> None:
    """Edges from a later item to an earlier one were left out of the layering: on a two-layer
    Llama, 52 of 1303 edges were drawn upwards without Graphviz."""
    xy = layered_layout(LayoutInput(4, [(3, 1), (1, 0), (2, 0)]))
    assert xy[3][1] < xy[1][1] < xy[0][1] and xy[2][1] < xy[0][1]


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=3 * n))))
def test_fallback_layout_of_cyclic_drawings(case: tuple[int, list[tuple[int, int]]]) -> None:
    """Cycles (and self-loops) still give every item a place, the same one each time, no two
    boxes stacked; an edge outside every cycle still points downwards."""
    n, edges = case
    drawing = LayoutInput(n, edges)
    xy = layered_layout(drawing)
    assert xy == layered_layout(LayoutInput(n, list(reversed(edges))))
    _check(LayoutInput(n, []), xy)  # no overlaps
    reach = {i: {i} for i in range(n)}
    for _ in range(n):
        for a, b in edges:
            reach[a] |= reach[b]
    for a, b in edges:
        if a not in reach[b]:  # b cannot get back to a: not on a cycle
            assert xy[a][1] < xy[b][1], (a, b, xy)


def test_fallback_layout_starts_at_the_origin_and_orders_layers_by_inputs() -> None:
    """Layers count from 0 (as `dot`'s drawings start at 0), a cycle's closing edge adds no layer,
    and a layer's items go by the mean slot of their inputs, not by item order."""
    assert layered_layout(LayoutInput(2, [(0, 1), (1, 0)])) == [(0.0, 0.0), (0.0, 1.0)]
    # Item 4's inputs sit at slots 0 and 2 (mean 1), item 3's at slot 2: item 4 comes first.
    assert layered_layout(LayoutInput(5, [(2, 3), (0, 4), (2, 4)])) == [
        (0.0, 0.0), (1.0, 0.0), (2.0, 0.0), (1.0, 1.0), (0.0, 1.0)]


def test_dot_output_missing_a_drawing_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """`dot` laying out fewer drawings than it was given is an error, not a short list."""
    plain = "graph 1 2.0833 0.4167\nnode n0 1.0417 0.2083 2.0833 0.4167 \"\" solid box black lightgrey\nstop\n"
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/dot")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: subprocess.CompletedProcess(args, 0, plain, ""))
    with pytest.raises(RuntimeError, match="laid out 1 of 2 drawings"):
        layout_all([LayoutInput(1, []), LayoutInput(1, [])])


needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz dot is not installed (apt-get install graphviz)")


@needs_dot
@settings(max_examples=40, deadline=None)
@given(st.lists(dags(), min_size=1, max_size=4))
def test_dot_layout_of_several_drawings_in_one_call(drawings: list[LayoutInput]) -> None:
    positions = layout_all(drawings)
    assert len(positions) == len(drawings)
    for drawing, xy in zip(drawings, positions):
        _check(drawing, xy)
        assert min(x for x, _ in xy) == 0 and min(y for _, y in xy) == 0


@needs_dot
def test_engine_names_graphviz() -> None:
    assert layout_engine().startswith("graphviz dot ")


def test_engine_without_dot_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert layout_engine() == "built-in layered (Graphviz dot not found)"
    drawing = LayoutInput(3, [(0, 1), (1, 2)])
    assert layout_all([drawing]) == [layered_layout(drawing)]


@needs_dot
def test_dot_layout_is_in_grid_units() -> None:
    """Neighbours in a rank sit one grid unit apart (a box width plus the gap), ranks one grid
    unit apart (a box height plus the gap); a self-loop moves nothing."""
    assert layout_all([LayoutInput(2, []), LayoutInput(2, [(0, 1)]), LayoutInput(2, [(0, 1), (1, 1)])]) == [
        [(0.0, 0.0), (1.0, 0.0)], [(0.0, 0.0), (0.0, 1.0)], [(0.0, 0.0), (0.0, 1.0)]]


@needs_dot
def test_engine_names_graphvizs_version() -> None:
    """The engine line names dot with the version it reports (read from `dot -V`)."""
    assert re.fullmatch(r"graphviz dot \d+(\.\d+)+", layout_engine()), layout_engine()
