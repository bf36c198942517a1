"""The FX helpers the passes share: node membership and local dead-code removal."""

from __future__ import annotations

import torch
import torch.fx as fx

from tileflow.graph_utils import erase_unused, in_graph

aten = torch.ops.aten


def _graph() -> tuple[fx.Graph, dict[str, fx.Node]]:
    """x -> a = relu(x) -> b = neg(a) (nothing reads b); x -> c = sin(x) -> output; and a
    copy_ into x (impure) that nothing reads."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(aten.relu.default, (x,))
    b = graph.call_function(aten.neg.default, (a,))
    c = graph.call_function(aten.sin.default, (x,))
    write = graph.call_function(aten.copy_.default, (x, c))
    graph.output(c)
    return graph, {"x": x, "a": a, "b": b, "c": c, "write": write}


def test_in_graph_follows_erasure_and_ownership() -> None:
    graph, n = _graph()
    other, _ = _graph()
    assert all(in_graph(node, graph) == (node in graph.nodes) for node in n.values())
    assert not in_graph(n["b"], other)
    graph.erase_node(n["b"])
    assert not in_graph(n["b"], graph) and n["b"] not in graph.nodes
    assert in_graph(n["a"], graph)


def test_erase_unused_removes_what_became_dead_and_keeps_the_rest() -> None:
    graph, n = _graph()
    # b is dead and a with it once b is gone; c is read by the output; the copy_ writes x.
    assert erase_unused(graph, [n["b"], n["c"], n["write"], n["x"]]) == 2
    assert [node.target for node in graph.nodes if node.op == "call_function"] == [aten.sin.default, aten.copy_.default]
    graph.lint()
    # Nodes already erased, and ones still read, are left alone.
    assert erase_unused(graph, [n["b"], n["c"]]) == 0


def test_erase_unused_matches_dead_code_elimination_on_what_it_is_given() -> None:
    graph, n = _graph()
    reference, _ = _graph()
    reference.eliminate_dead_code()
    erase_unused(graph, list(graph.nodes))
    assert [node.name for node in graph.nodes] == [node.name for node in reference.nodes]
