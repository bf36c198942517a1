"""The FX helpers the passes share: node membership, local dead-code removal, ancestors, token dims,
constants, written arguments, split-off checks, range bounds and size-only evaluation."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.fx as fx

from tileflow.graph_utils import (any_ancestor, constant_number, constant_values, erase_unused, evaluate_at_example_sizes,
                                 finite_bound, in_graph, is_view_op, split_off_checks, token_dim, written_arguments)

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


def _node(graph: fx.Graph, target: Any, args: tuple[Any, ...], **kwargs: Any) -> fx.Node:
    """A call_function node of `target` in `graph`."""
    return graph.call_function(target, args, kwargs)


def test_any_ancestor_does_not_look_past_a_stop() -> None:
    """The walk stops at the nodes `stop` holds for: x -> relu -> neg, stopping at relu, never reaches x."""
    _, n = _graph()

    def is_x(node: fx.Node) -> bool:
        return node is n["x"]

    assert any_ancestor(n["b"], is_x)
    assert not any_ancestor(n["b"], is_x, stop=lambda node: node is n["a"])
    assert any_ancestor(n["a"], lambda node: node is n["a"], stop=lambda node: True)  # the node itself is tested


def test_token_dim_needs_exactly_one_dim_of_the_token() -> None:
    """A tensor whose two dims are both the token count ([T, T]) has no single token dim."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv())
    tokens = mode.shape_env.create_unbacked_symint()
    with mode:
        row, square = torch.empty(tokens, 8), torch.empty(tokens, tokens)
    assert token_dim(row, tokens.node.expr) == 0
    assert token_dim(square, tokens.node.expr) is None


def test_constant_values_of_one_element_attributes_and_fills() -> None:
    """A one-element attribute is one number (`constant_number`), a larger one only within
    `max_values`; `full` is read as one number only when it has one element."""
    root = torch.nn.Module()
    root.one = torch.tensor([0.5])
    root.three = torch.tensor([1.0, 2.0, 3.0])
    graph = fx.Graph()
    one, three = graph.get_attr("one"), graph.get_attr("three")
    fill_one = _node(graph, aten.full.default, ([1, 1], 2.0))
    fill_four = _node(graph, aten.full.default, ([4], 2.0))
    graph.output((one, three, fill_one, fill_four))
    fx.GraphModule(root, graph)
    assert constant_number(one) == 0.5
    assert constant_values(three) == (1.0, 2.0, 3.0) and constant_values(three, max_values=2) is None
    assert constant_number(three) is None
    assert constant_number(fill_one) == 2.0
    assert constant_values(fill_four) is None and constant_number(fill_four) is None


def test_written_arguments_are_the_writes_not_the_views() -> None:
    """`copy_` writes its self; a view aliases its input without writing it, and is no write."""
    graph, n = _graph()
    view = _node(graph, aten.view.default, (n["x"], [-1]))
    assert written_arguments(n["write"]) == [n["x"]]
    assert written_arguments(view) == [] and is_view_op(view.target)
    assert written_arguments(n["a"]) == [] and not is_view_op(aten.relu.default)


def test_split_off_checks_leaves_no_op_only_the_checks_read() -> None:
    """The ops only an assert read leave `gm` with it (and run in the checks' module); an op
    something else reads too stays."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    shared = graph.call_function(aten.relu.default, (x,))
    alone = graph.call_function(aten.sum.default, (shared,))
    positive = graph.call_function(aten.gt.Scalar, (alone, 0))
    check = graph.call_function(aten._assert_async.msg, (positive, "negative"))
    graph.output(graph.call_function(aten.neg.default, (shared,)))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    checks = split_off_checks(gm, [check])
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [aten.relu.default, aten.neg.default]
    assert aten._assert_async.msg in [n.target for n in checks.graph.nodes]
    torch.testing.assert_close(gm(torch.ones(3)), -torch.ones(3))
    checks(torch.ones(3))


def test_finite_bound_is_none_for_an_unbounded_side() -> None:
    """torch's `int_oo`, sympy's `oo`, and a bound at int64's edge (export's "no maximum") are
    unbounded; an ordinary size is itself."""
    import sympy
    from torch.utils._sympy.numbers import int_oo

    assert finite_bound(int_oo) is None and finite_bound(-int_oo) is None and finite_bound(sympy.oo) is None
    assert finite_bound(2**63 - 2) is None and finite_bound(2**62) is None
    assert finite_bound(sympy.Integer(4096)) == 4096 and finite_bound(2) == 2


def test_evaluate_at_example_sizes_computes_in_float64() -> None:
    """A float32 cast of an arange is evaluated in float64 (an ALiBi-style bias is then exact to
    compare), on the CPU; a node reading a tensor input has no value."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(5)
    positions = _node(graph, aten.arange.default, (5,), dtype=torch.int64, device=torch.device("cpu"))
    cast = _node(graph, torch.ops.prims.convert_element_type.default, (positions, torch.float32))
    scaled = _node(graph, aten.mul.Scalar, (cast, 0.1))
    assert evaluate_at_example_sizes(x) is None
    assert evaluate_at_example_sizes(_node(graph, aten.mul.Tensor, (x, scaled))) is None
    value = evaluate_at_example_sizes(scaled)
    assert value is not None and value.dtype == torch.float64
    torch.testing.assert_close(value, torch.arange(5, dtype=torch.float64) * 0.1)


def _proof_and_values(build: Callable[[torch.Tensor], torch.Tensor]) -> tuple[bool, torch.Tensor]:
    """`holds_no_lowest_value` of `build(keep)` traced with a symbolic length, and its value at
    another length."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from tileflow.graph_utils import holds_no_lowest_value

    gm = make_fx(build, tracing_mode="symbolic")(torch.ones(6, dtype=torch.bool))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return holds_no_lowest_value(out), gm(torch.ones(9, dtype=torch.bool))


def test_holds_no_lowest_value_proves_positions_times_slopes() -> None:
    """BLOOM's form, `slopes * positions` counted along a mask, scaled: proven, and finite."""
    proven, value = _proof_and_values(
        lambda keep: (torch.pow(torch.full((), 0.5), torch.arange(1, 5))[:, None] * keep.long().cumsum(-1)[None, :]) / 4.0)
    assert proven and torch.isfinite(value).all()


@pytest.mark.parametrize("build", [
    # -1e38 times positions 1..9 is past float32's range (-inf) before the * 1e-30 (a second
    # reader's find: folded into one factor, 1e38 * 1e-30 = 1e8, the proof held)
    lambda keep: (torch.full((4, 1), -1.0e38) * keep.long().cumsum(-1)[None, :]) * 1e-30,
    # numbers that are 3e39 in float64 and inf in float32, where the graph computes them
    lambda keep: (torch.full((4, 1), 3.0e38, dtype=torch.float32) * 10.0) * keep.long()[None, :] * 1e-30,
], ids=["overflow_before_a_scale", "numbers_overflow_in_their_dtype"])
def test_holds_no_lowest_value_bounds_every_value_the_graph_computes(build) -> None:
    """Values the graph computes as -inf or inf on the way are not proven bounded."""
    proven, value = _proof_and_values(build)
    assert not torch.isfinite(value).all() and not proven
