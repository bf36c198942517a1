"""Nano-batch schedules: make_schedule output always passes the checker; each kind of mutation is
rejected with the right message; dependencies follow row intersections; JSON round trips."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tileflow.schedule import (
    RESOURCES,
    NanoOp,
    OpEdge,
    OpSpec,
    Schedule,
    ScheduleError,
    build_dependencies,
    check_schedule,
    dependency_rows_intersect,
    make_schedule,
    nano_name,
)

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def graphs(draw):
    """A random DAG of 1-6 ops (edges only from lower to higher index), a random split of each
    op's rows (or none), and random sequence boundaries for global edges."""
    n_tokens = draw(st.integers(1, 48))
    n_ops = draw(st.integers(1, 6))
    specs = [
        OpSpec(f"op{i}", f"aten.k{i}", draw(st.sampled_from(RESOURCES))) for i in range(n_ops)
    ]
    edges = [
        OpEdge(f"op{a}", f"op{b}", draw(st.sampled_from(["token", "global"])))
        for b in range(n_ops)
        for a in range(b)
        if draw(st.booleans())
    ]
    splits: dict[str, list[tuple[int, int]] | None] = {}
    for spec in specs:
        if draw(st.booleans()):
            splits[spec.name] = None
            continue
        cuts = sorted(draw(st.sets(st.integers(1, max(1, n_tokens - 1)), max_size=4)))
        cuts = [c for c in cuts if 0 < c < n_tokens]
        bounds = [0, *cuts, n_tokens]
        splits[spec.name] = list(zip(bounds, bounds[1:]))
    seq_cuts = sorted(draw(st.sets(st.integers(1, max(1, n_tokens - 1)), max_size=4)))
    seq_bounds = [0, *[c for c in seq_cuts if 0 < c < n_tokens], n_tokens]
    return specs, splits, edges, n_tokens, seq_bounds


def originals_of(specs, splits, n_tokens):
    """The checker's `originals`: token extent of split ops, None for unsplit ones."""
    return {s.name: (n_tokens if splits.get(s.name) else None) for s in specs}


def build(g):
    specs, splits, edges, n, seq = g
    return make_schedule(specs, splits, edges, n, seq_bounds=seq), originals_of(specs, splits, n)


def replace_op(schedule: Schedule, name: str, **changes) -> Schedule:
    ops = dict(schedule.ops)
    ops[name] = dataclasses.replace(ops[name], **changes)
    return dataclasses.replace(schedule, ops=ops)


# ------------------------------------------------------------------ properties of make_schedule


@SETTINGS
@given(graphs())
def test_generated_schedules_pass(g):
    schedule, originals = build(g)
    check_schedule(schedule, originals)
    # Also with every extent given explicitly (an unsplit op covers [0, n) too).
    check_schedule(schedule, {name: g[3] for name in originals})
    # And with the dependencies derived from the graph rather than read from the nano-ops.
    check_schedule(schedule, originals, g[2], seq_bounds=g[4])


@SETTINGS
@given(graphs())
def test_deps_are_exactly_the_intersecting_producers(g):
    specs, splits, edges, n, seq = g
    schedule, _ = build(g)
    for edge in edges:
        for cons in (o for o in schedule.ops.values() if o.original == edge.consumer):
            got = {d for d in cons.deps if schedule.ops[d].original == edge.producer}
            lo, hi = cons.rows
            if edge.kind == "global":  # widen to the sequences the rows touch
                lo = max(b for b in seq if b <= lo)
                hi = min(b for b in seq if b >= hi)
            want = {
                p.name
                for p in schedule.ops.values()
                if p.original == edge.producer and dependency_rows_intersect((lo, hi), p.rows)
            }
            assert got == want


@SETTINGS
@given(graphs())
def test_json_round_trip(g):
    schedule, _ = build(g)
    data = json.loads(json.dumps(schedule.to_dict()))
    assert Schedule.from_dict(data) == schedule
    assert schedule.describe().startswith(f"schedule: {g[3]} tokens")


# ------------------------------------------------------------------ mutations are rejected


@SETTINGS
@given(graphs(), st.data())
def test_dropped_event_rejected(g, data):
    schedule, originals = build(g)
    assume(schedule.events)
    idx = data.draw(st.integers(0, len(schedule.events) - 1))
    producer, consumer = schedule.events[idx]
    events = [e for e in schedule.events if e != (producer, consumer)]
    bad = dataclasses.replace(schedule, events=events)
    with pytest.raises(ScheduleError, match=r"not satisfied.*no event"):
        check_schedule(bad, originals)


@SETTINGS
@given(graphs(), st.data())
def test_consumer_before_producer_on_stream_rejected(g, data):
    schedule, originals = build(g)
    pairs = [
        (dep, op.name)
        for op in schedule.ops.values()
        for dep in op.deps
        if schedule.ops[dep].stream == op.stream
    ]
    assume(pairs)
    producer, consumer = data.draw(st.sampled_from(pairs))
    stream = schedule.ops[consumer].stream
    order = list(schedule.streams[stream])
    a, b = order.index(producer), order.index(consumer)
    order[a], order[b] = order[b], order[a]
    bad = dataclasses.replace(schedule, streams={**schedule.streams, stream: order})
    with pytest.raises(ScheduleError, match=r"not satisfied: both on stream .* after the consumer"):
        check_schedule(bad, originals)


@SETTINGS
@given(graphs(), st.data())
def test_overlapping_rows_rejected(g, data):
    schedule, originals = build(g)
    # A nano-op that has a successor slice of the same original op: grow it into the successor.
    growable = [
        op.name
        for op in schedule.ops.values()
        if originals[op.original] is not None and op.rows[1] < g[3]
    ]
    assume(growable)
    name = data.draw(st.sampled_from(growable))
    lo, hi = schedule.ops[name].rows
    bad = replace_op(schedule, name, rows=(lo, hi + 1))
    with pytest.raises(ScheduleError, match=r"overlap between nano-ops"):
        check_schedule(bad, originals)


@SETTINGS
@given(graphs(), st.data())
def test_missing_rows_rejected(g, data):
    schedule, originals = build(g)
    shrinkable = [
        op.name
        for op in schedule.ops.values()
        if originals[op.original] is not None and op.rows[1] - op.rows[0] >= 2
    ]
    assume(shrinkable)
    name = data.draw(st.sampled_from(shrinkable))
    lo, hi = schedule.ops[name].rows
    from_top = data.draw(st.booleans())
    rows = (lo, hi - 1) if from_top else (lo + 1, hi)
    bad = replace_op(schedule, name, rows=rows)
    missing = hi - 1 if from_top else lo
    with pytest.raises(ScheduleError, match=rf"gap, rows \[{missing}, {missing + 1}\)"):
        check_schedule(bad, originals)


@SETTINGS
@given(graphs(), st.data())
def test_cycle_rejected(g, data):
    schedule, originals = build(g)
    assume(schedule.events)
    producer, consumer = data.draw(st.sampled_from(schedule.events))
    # The reverse event keeps every dependency satisfied but makes the streams wait on each other.
    bad = dataclasses.replace(schedule, events=[*schedule.events, (consumer, producer)])
    with pytest.raises(ScheduleError, match=r"cycle in stream order \+ events") as info:
        check_schedule(bad, originals)
    assert producer in str(info.value) and consumer in str(info.value)


def runs_before(schedule: Schedule, producer: str, consumer: str) -> bool:
    """Whether stream order and events make `producer` finish before `consumer` starts (a
    search over the run-time order, independent of the checker's bitsets)."""
    preds: dict[str, set[str]] = {name: set() for name in schedule.ops}
    for names in schedule.streams.values():
        for a, b in zip(names, names[1:]):
            preds[b].add(a)
    for a, b in schedule.events:
        preds[b].add(a)
    seen, stack = set(), [consumer]
    while stack:
        for pred in preds[stack.pop()] - seen:
            seen.add(pred)
            stack.append(pred)
    return producer in seen


@SETTINGS
@given(graphs(), st.data())
def test_dependency_left_out_rejected_by_the_graph_check(g, data):
    """A cross-stream dependency dropped from a nano-op's deps together with its event passes
    the declared-dependency checks; the graph's edges show it missing, unless stream order and
    other events still put the producer first."""
    specs, splits, edges, n, seq = g
    schedule, originals = build(g)
    assume(schedule.events)
    producer, consumer = data.draw(st.sampled_from(schedule.events))
    deps = tuple(d for d in schedule.ops[consumer].deps if d != producer)
    bad = replace_op(schedule, consumer, deps=deps)
    bad.events = [e for e in schedule.events if e != (producer, consumer)]
    check_schedule(bad, originals)  # what the nano-ops declare is consistent
    if runs_before(bad, producer, consumer):
        check_schedule(bad, originals, edges, seq_bounds=seq)
    else:
        with pytest.raises(ScheduleError, match=rf"{re.escape(repr(producer))} \(rows .* is not ordered before it"):
            check_schedule(bad, originals, edges, seq_bounds=seq)


def test_consumer_waiting_on_part_of_its_producer_rejected():
    """o reads all 8 rows of qkv but waits only for qkv[0]: the declared checks pass; the graph
    check names qkv[1]."""
    ops = {
        "qkv[0]": NanoOp("qkv[0]", "mm", "compute", (0, 4), (), 0, "qkv"),
        "qkv[1]": NanoOp("qkv[1]", "mm", "compute", (4, 8), (), 0, "qkv"),
        "o[0]": NanoOp("o[0]", "mm", "memory", (0, 8), ("qkv[0]",), 1, "o"),
    }
    s = Schedule(streams={0: ["qkv[0]", "qkv[1]"], 1: ["o[0]"]}, ops=ops,
                 events=[("qkv[0]", "o[0]")], num_tokens=8)
    check_schedule(s, {"qkv": 8, "o": None})
    with pytest.raises(ScheduleError, match=r"'o\[0\]' reads rows \[0, 8\) of 'qkv' \(token edge\), "
                                            r"but 'qkv\[1\]' \(rows \[4, 8\)\) is not ordered before it"):
        check_schedule(s, {"qkv": 8, "o": None}, [("qkv", "o")])
    # Waiting on the last slice is enough: stream 0 runs qkv[0] before it.
    fixed = replace_op(s, "o[0]", deps=("qkv[1]",))
    fixed.events = [("qkv[1]", "o[0]")]
    check_schedule(fixed, {"qkv": 8, "o": None}, [("qkv", "o")])


def test_event_without_dependency_rejected():
    s = layer()
    bad = dataclasses.replace(s, events=[*s.events, ("qkv[0]", "attn[1]")])
    with pytest.raises(ScheduleError, match=r"event \('qkv\[0\]', 'attn\[1\]'\) orders no dependency"):
        check_schedule(bad, {"qkv": 8, "attn": 8, "o": 8})


def test_graph_check_names_an_edge_to_an_op_outside_the_schedule():
    with pytest.raises(ScheduleError, match=r"edge 'qkv' -> 'ghost': unknown op 'ghost'"):
        check_schedule(layer(), {"qkv": 8, "attn": 8, "o": 8}, [("qkv", "ghost")])


# ------------------------------------------------------------------ hand-written cases


def layer():
    """qkv (compute) -> attention (memory, whole sequences) -> o_proj (compute), 8 tokens in two
    sequences [0, 4) and [4, 8), every op split in two nano-batches."""
    specs = [
        OpSpec("qkv", "mm", "compute"),
        OpSpec("attn", "meta_attention", "memory"),
        OpSpec("o", "mm", "compute"),
    ]
    halves = [(0, 4), (4, 8)]
    splits = {"qkv": halves, "attn": halves, "o": halves}
    edges = [("qkv", "attn", "global"), ("attn", "o")]
    return make_schedule(specs, splits, edges, 8, seq_bounds=[0, 4, 8])


def test_layer_schedule_shape():
    s = layer()
    assert s.streams == {0: ["qkv[0]", "qkv[1]", "o[0]", "o[1]"], 1: ["attn[0]", "attn[1]"]}
    assert s.ops["attn[1]"].deps == ("qkv[1]",)  # no barrier on nano-batch 0
    assert s.events == [("qkv[0]", "attn[0]"), ("qkv[1]", "attn[1]"), ("attn[0]", "o[0]"),
                        ("attn[1]", "o[1]")]
    check_schedule(s, {"qkv": 8, "attn": 8, "o": 8})
    text = s.describe()
    assert "stream 1 (memory):" in text and "waits on qkv[1]" in text


def test_global_edge_spans_sequences():
    # A sequence [2, 6) straddles the split at 4: both attention slices need both qkv slices.
    deps = build_dependencies(
        {"qkv": [(0, 4), (4, 8)], "attn": [(0, 4), (4, 8)]},
        [OpEdge("qkv", "attn", "global")],
        seq_bounds=[0, 2, 6, 8],
    )
    assert deps[nano_name("attn", 0)] == ("qkv[0]", "qkv[1]")
    assert deps[nano_name("attn", 1)] == ("qkv[0]", "qkv[1]")
    token = build_dependencies({"a": [(0, 3), (3, 8)], "b": [(0, 5), (5, 8)]}, [("a", "b")])
    assert token == {"a[0]": (), "a[1]": (), "b[0]": ("a[0]", "a[1]"), "b[1]": ("a[1]",)}


def test_rows_intersect():
    assert dependency_rows_intersect((0, 4), (3, 5))
    assert not dependency_rows_intersect((0, 4), (4, 8))  # half-open
    assert not dependency_rows_intersect((5, 6), (0, 5))


def test_priority_reorders_streams():
    specs = [OpSpec("a", "mm", "compute"), OpSpec("b", "mm", "compute")]
    splits = {"a": [(0, 2), (2, 4)], "b": [(0, 2), (2, 4)]}
    s = make_schedule(specs, splits, [("a", "b")], 4,
                      priority={"a[0]": 0, "b[0]": 1, "a[1]": 2, "b[1]": 3})
    assert s.streams[0] == ["a[0]", "b[0]", "a[1]", "b[1]"]
    check_schedule(s, {"a": 4, "b": 4})


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: replace_op(s, "attn[0]", stream=7), "references unknown stream 7"),
        (lambda s: replace_op(s, "o[0]", deps=("nope",)), "depends on unknown op 'nope'"),
        (lambda s: replace_op(s, "o[0]", original="ghost"), "unknown original op 'ghost'"),
        (lambda s: dataclasses.replace(s, streams={0: s.streams[0], 1: ["attn[1]"]}),
         r"'attn\[0\]' appears in 0 stream slots"),
        (lambda s: dataclasses.replace(s, streams={0: s.streams[0] + ["attn[0]"],
                                                   1: s.streams[1]}),
         r"'attn\[0\]' appears in 2 stream slots"),
        (lambda s: dataclasses.replace(s, streams={**s.streams, 1: [*s.streams[1], "zz"]}),
         "stream 1 lists unknown op 'zz'"),
        (lambda s: dataclasses.replace(s, events=[*s.events, ("qkv[0]", "zz")]),
         "names unknown op 'zz'"),
        (lambda s: replace_op(s, "attn[1]", rows=(4, 9)), "outside original op 'attn'"),
    ],
)
def test_structural_errors(mutate, message):
    with pytest.raises(ScheduleError, match=message):
        check_schedule(mutate(layer()), {"qkv": 8, "attn": 8, "o": 8})


def test_unsplit_op_with_two_nano_ops_rejected():
    with pytest.raises(ScheduleError, match=r"'attn' is not split but has 2 nano-ops"):
        check_schedule(layer(), {"qkv": 8, "attn": None, "o": 8})


def test_original_without_nano_ops_rejected():
    with pytest.raises(ScheduleError, match="'extra' is not covered: it has no nano-ops"):
        check_schedule(layer(), {"qkv": 8, "attn": 8, "o": 8, "extra": 8})


def test_cyclic_op_graph_rejected():
    specs = [OpSpec("a", "mm", "compute"), OpSpec("b", "mm", "memory")]
    with pytest.raises(ScheduleError, match="cycle in the original op graph"):
        make_schedule(specs, {}, [("a", "b"), ("b", "a")], 4)


def test_cycle_message_names_the_cycle():
    s = layer()
    bad = dataclasses.replace(s, events=[*s.events, ("o[1]", "attn[0]")])
    with pytest.raises(ScheduleError) as info:
        check_schedule(bad, {"qkv": 8, "attn": 8, "o": 8})
    cycle = re.search(r"deadlock\): (.*)$", str(info.value)).group(1).split(" -> ")
    assert cycle[0] == cycle[-1] and {"o[1]", "attn[0]"} <= set(cycle)


def test_nano_op_json_round_trip():
    op = NanoOp("x[0]", "mm", "compute", (0, 3), ("y[0]",), 0, "x")
    assert NanoOp.from_dict(json.loads(json.dumps(op.to_dict()))) == op
    # A hand-written schedule's fractional rows were cut (1.5 to 1) and then passed the checker.
    for rows, stream in (([0, 1.5], 0), ([0, True], 0), ([0, 3], "1")):
        with pytest.raises(ValueError, match=r"x\[0\]'s (rows|stream) must be whole numbers"):
            NanoOp.from_dict({**op.to_dict(), "rows": rows, "stream": stream})
    assert NanoOp.from_dict({**op.to_dict(), "rows": [0.0, 3.0]}) == op


def test_extents_and_rows_of_any_int_kind() -> None:
    """A numpy int extent is an int (accepted as a plain one); a fractional row bound or extent
    is refused with a clear error, never taken for a cover."""
    import numpy as np

    schedule = make_schedule([OpSpec("a", "mm", "compute")], {"a": [(0, 4), (4, 8)]}, [], 8)
    check_schedule(schedule, {"a": np.int64(8)})
    check_schedule(schedule, {"a": (np.int32(0), np.int32(8))})
    with pytest.raises(ScheduleError, match="token extent must be an int"):
        check_schedule(schedule, {"a": 8.0})
    with pytest.raises(ScheduleError, match="split rows must be"):
        make_schedule([OpSpec("a", "mm", "compute")], {"a": [(0, 4.5), (4.5, 8)]}, [], 8)
    ops = dict(schedule.ops)
    ops["a[0]"] = dataclasses.replace(ops["a[0]"], rows=(0, 4.5))
    ops["a[1]"] = dataclasses.replace(ops["a[1]"], rows=(4.5, 8))
    with pytest.raises(ScheduleError, match="row bounds are ints"):
        check_schedule(dataclasses.replace(schedule, ops=ops), {"a": 8})


# The ops `layer()` splits, by their row counts (for `check_schedule`).
_ORIGINALS = {"qkv": 8, "attn": 8, "o": 8}


def test_an_empty_nano_op_at_the_end_of_its_extent_is_rejected() -> None:
    """rows (8, 8) are empty even though they tile nothing twice: the checker refuses them."""
    s = layer()
    check_schedule(s, _ORIGINALS)
    extra = NanoOp("o[2]", "mm", "compute", (8, 8), (), 0, "o")
    bad = dataclasses.replace(s, ops={**s.ops, "o[2]": extra}, streams={**s.streams, 0: [*s.streams[0], "o[2]"]})
    with pytest.raises(ScheduleError, match="empty row range"):
        check_schedule(bad, _ORIGINALS)


def test_a_nano_op_depending_on_itself_is_rejected() -> None:
    """a self-dependency is a cycle, though stream order and events never show it."""
    s = layer()
    ops = dict(s.ops)
    ops["o[0]"] = dataclasses.replace(ops["o[0]"], deps=(*ops["o[0]"].deps, "o[0]"))
    with pytest.raises(ScheduleError, match="depends on itself"):
        check_schedule(dataclasses.replace(s, ops=ops), _ORIGINALS)


def test_a_nano_op_listed_on_another_stream_than_its_own_is_rejected() -> None:
    """o[0] says stream 1 (a known stream) but stream 0 lists it."""
    s = layer()
    ops = dict(s.ops)
    ops["o[0]"] = dataclasses.replace(ops["o[0]"], stream=1)
    with pytest.raises(ScheduleError, match=r"says stream 1 but is listed on stream 0"):
        check_schedule(dataclasses.replace(s, ops=ops), _ORIGINALS)


# ------------------------------------------------------------------ builder edge cases


def test_a_global_edge_without_seq_bounds_needs_every_producer_row() -> None:
    """No `seq_bounds` (as the nanobatch pass calls `make_schedule`): one sequence spans the
    step, so each consumer slice of a global edge waits on every producer slice."""
    deps = build_dependencies({"qkv": [(0, 4), (4, 8)], "attn": [(0, 4), (4, 8)]},
                              [OpEdge("qkv", "attn", "global")])
    assert deps["attn[0]"] == ("qkv[0]", "qkv[1]")
    assert deps["attn[1]"] == ("qkv[0]", "qkv[1]")


def test_seq_bounds_without_the_step_ends_still_reach_them() -> None:
    """`seq_bounds=[4]` names only the inner boundary: the first sequence still starts at row 0
    and the last still ends at the producer's last row, so a slice inside either sequence
    waits on all of that sequence's producer slices."""
    quarters = [(0, 1), (1, 4), (4, 7), (7, 8)]
    deps = build_dependencies({"qkv": quarters, "attn": quarters},
                              [OpEdge("qkv", "attn", "global")], seq_bounds=[4])
    assert deps["attn[1]"] == ("qkv[0]", "qkv[1]")  # rows [1, 4) read the sequence [0, 4)
    assert deps["attn[2]"] == ("qkv[2]", "qkv[3]")  # rows [4, 7) read the sequence [4, 8)


def test_splits_given_out_of_order_keep_their_names() -> None:
    """`nano_name(op, i)` is `splits[op][i]` even when the ranges are not sorted, and a global
    edge still reads the producer's whole extent (its lowest to its highest row)."""
    specs = [OpSpec("a", "mm", "compute"), OpSpec("b", "meta_attention", "memory")]
    splits = {"a": [(4, 8), (0, 4)], "b": [(4, 8), (0, 4)]}
    s = make_schedule(specs, splits, [("a", "b", "global")], 8)
    assert s.ops["a[0]"].rows == (4, 8) and s.ops["a[1]"].rows == (0, 4)
    assert s.ops["b[0]"].deps == ("a[0]", "a[1]") and s.ops["b[1]"].deps == ("a[0]", "a[1]")
    check_schedule(s, {"a": 8, "b": 8}, [("a", "b", "global")])


def test_a_producer_read_over_two_edges_is_one_dependency() -> None:
    """Two edges between the same ops (an op reading a value twice, or a token and a global
    edge) give each producer nano-op once in `deps`, and one event for it."""
    edges = [("a", "b"), ("a", "b"), ("a", "b", "global")]
    deps = build_dependencies({"a": [(0, 4), (4, 8)], "b": [(0, 4), (4, 8)]}, edges)
    assert {name: sorted(ds) for name, ds in deps.items()} == {
        "a[0]": [], "a[1]": [], "b[0]": ["a[0]", "a[1]"], "b[1]": ["a[0]", "a[1]"]}
    specs = [OpSpec("a", "mm", "compute"), OpSpec("b", "meta_attention", "memory")]
    s = make_schedule(specs, {"a": [(0, 4), (4, 8)], "b": [(0, 4), (4, 8)]}, edges, 8)
    assert len(s.events) == len(set(s.events)) == 4


def test_stream_of_resource_places_the_nano_ops() -> None:
    """A custom `stream_of_resource` decides the streams (all on one: no events); a resource it
    leaves out is refused with a ScheduleError naming the op."""
    specs = [OpSpec("a", "mm", "compute"), OpSpec("b", "meta_attention", "memory")]
    halves = {"a": [(0, 4), (4, 8)], "b": [(0, 4), (4, 8)]}
    s = make_schedule(specs, halves, [("a", "b")], 8, stream_of_resource={"compute": 3, "memory": 3})
    assert s.streams == {3: ["a[0]", "a[1]", "b[0]", "b[1]"]} and s.events == []
    check_schedule(s, {"a": 8, "b": 8}, [("a", "b")])
    with pytest.raises(ScheduleError, match=r"no stream for resource 'memory' of op 'b'"):
        make_schedule(specs, halves, [("a", "b")], 8, stream_of_resource={"compute": 0})


def test_unsplit_consumer_waits_for_every_slice_of_its_producer():
    """An op that is not split (extent None) runs on whole tensors: whatever rows its one nano-op
    declares, it reads every row of its producer. The graph check used the declared rows [0, 8)
    and accepted c running before p[1] (rows [8, 16))."""
    ops = {
        "p[0]": NanoOp("p[0]", "mm", "compute", (0, 8), (), 0, "p"),
        "p[1]": NanoOp("p[1]", "mm", "compute", (8, 16), (), 0, "p"),
        "c[0]": NanoOp("c[0]", "norm", "memory", (0, 8), ("p[0]",), 1, "c"),
    }
    s = Schedule(streams={0: ["p[0]", "p[1]"], 1: ["c[0]"]}, ops=ops, events=[("p[0]", "c[0]")], num_tokens=16)
    with pytest.raises(ScheduleError, match=r"'c\[0\]' reads rows \[0, 16\) of 'p' .* 'p\[1\]' .* is not ordered"):
        check_schedule(s, {"p": 16, "c": None}, [("p", "c")])


def test_every_slice_waits_for_an_unsplit_producer():
    """An unsplit producer writes every row, whatever rows its nano-op declares: c[1] (rows
    [8, 16)) must wait for p even though p's nano-op says rows [0, 3)."""
    ops = {
        "p[0]": NanoOp("p[0]", "mm", "compute", (0, 3), (), 1, "p"),
        "c[0]": NanoOp("c[0]", "norm", "compute", (0, 8), ("p[0]",), 0, "c"),
        "c[1]": NanoOp("c[1]", "norm", "compute", (8, 16), (), 0, "c"),
    }
    s = Schedule(streams={0: ["c[1]", "c[0]"], 1: ["p[0]"]}, ops=ops, events=[("p[0]", "c[0]")], num_tokens=16)
    with pytest.raises(ScheduleError, match=r"'c\[1\]' reads rows \[8, 16\) of 'p' .* 'p\[0\]' .* is not ordered"):
        check_schedule(s, {"p": None, "c": 16}, [("p", "c")])


def test_make_schedule_refuses_two_specs_of_one_name():
    """Two ops named alike became one nano-op: the compute op 'a' vanished from the schedule
    without a word (the later spec overwrote it)."""
    specs = [OpSpec("a", "mm", "compute"), OpSpec("a", "attn", "memory")]
    with pytest.raises(ScheduleError, match="'a'.*more than once"):
        make_schedule(specs, {}, [], 8)


def test_make_schedule_refuses_splits_of_unknown_ops():
    """A split entry for an op that is not in `specs` (a typo) was ignored: the op ran unsplit."""
    specs = [OpSpec("a", "mm", "compute")]
    with pytest.raises(ScheduleError, match="'A'"):
        make_schedule(specs, {"A": [(0, 4), (4, 8)]}, [], 8)


@pytest.mark.parametrize("rows, message", [
    ([(0, 4), (6, 10)], r"gap, rows \[4, 6\)"),
    ([(0, 6), (4, 10)], r"rows \[4, 6\) overlap"),
    ([(0, 4), (4, 20)], r"outside"),
    ([(0, 0), (0, 10)], r"empty row range"),
    ([(5, 0)], r"empty row range"),
])
def test_make_schedule_refuses_splits_that_do_not_tile_the_step(rows, message):
    """`make_schedule` promises a valid schedule, but built one from row splits with gaps,
    overlaps, rows past the step or empty ranges, which its own checker then refuses (or, unchecked,
    computed rows twice or never)."""
    specs = [OpSpec("a", "mm", "compute"), OpSpec("b", "attn", "memory")]
    with pytest.raises(ScheduleError, match=message):
        make_schedule(specs, {"a": rows}, [("a", "b")], 10)


class _CountedName(str):
    """An op name that counts its equality tests (all instances together)."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        _CountedName.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_make_schedule_checks_its_names_in_linear_time():
    """The unique-name and known-split checks scanned the list of names once per name
    (`names.count`, `name in names`): quadratic in the ops, 1.07 s instead of 0.15 s for a chain
    of 8000 ops, and the runtime builds a schedule per token count of a step."""
    n = 400
    specs = [OpSpec(_CountedName(f"op{i}"), "mm", "compute") for i in range(n)]
    edges = [(specs[i].name, specs[i + 1].name) for i in range(n - 1)]
    splits = {_CountedName(f"op{i}"): [(0, 4), (4, 8)] for i in range(n)}
    _CountedName.compared = 0
    make_schedule(specs, splits, edges, 8)
    assert _CountedName.compared < 20 * n, _CountedName.compared
