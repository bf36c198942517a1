"""Nano-batched step schedules: the data model, a builder, and a checker.

NanoFlow (shared/seeds/002) splits a step's tokens into *nano-batches* and runs the operations of
different nano-batches concurrently on streams, one stream per resource class (compute-bound
GEMMs, memory-bound decode attention, network-bound collectives). This module describes such a
step independently of any graph or runtime:

- `NanoOp`: one slice `[lo, hi)` of the token rows of one op of the unsplit graph (`original`),
  placed on a stream, with the names of the producer nano-ops it waits for.
- `Schedule`: per stream, the ordered nano-op names; the cross-stream *events* (a consumer's
  stream waits on an event recorded after its producer); the step's token count.
- `check_schedule`: rejects a schedule that could read a value before it is written, deadlock, or
  compute some rows of an op twice or never, with a message naming the culprits.
- `build_dependencies` / `make_schedule`: from per-op row splits and the original op graph, the
  fine-grained dependencies (a nano-op waits only for producer nano-ops whose rows intersect the
  rows it needs, never for a whole layer) and a valid stream assignment.

Row ranges are half-open `[lo, hi)` over the step's flattened token dimension.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

RESOURCES: tuple[str, ...] = ("compute", "memory", "network")

# Default stream per resource class (NanoFlow's C++ version runs gemm / gemv / net streams).
DEFAULT_STREAM_OF_RESOURCE: dict[str, int] = {"compute": 0, "memory": 1, "network": 2}

EDGE_KINDS: tuple[str, ...] = ("token", "global")

Rows = tuple[int, int]


class ScheduleError(ValueError):
    """A schedule (or the op graph it is built from) is invalid; the message says exactly why."""


@dataclass(frozen=True)
class NanoOp:
    """One nano-op: the rows `[rows[0], rows[1])` of original op `original`, run on `stream`.

    Attributes:
        name: unique name within the schedule.
        op: what it computes (e.g. the ATen / tileflow op name); informational.
        resource: the bottleneck resource class, one of `RESOURCES`.
        rows: half-open token range it covers.
        deps: names of the producer nano-ops whose output it reads.
        stream: the stream it is enqueued on.
        original: the op of the unsplit graph of which it computes a slice.
    """

    name: str
    op: str
    resource: str
    rows: Rows
    deps: tuple[str, ...]
    stream: int
    original: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "name": self.name,
            "op": self.op,
            "resource": self.resource,
            "rows": list(self.rows),
            "deps": list(self.deps),
            "stream": self.stream,
            "original": self.original,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "NanoOp":
        """Inverse of `to_dict`."""
        lo, hi = data["rows"]
        name = str(data["name"])
        return cls(
            name=name,
            op=str(data["op"]),
            resource=str(data["resource"]),
            rows=(_whole(lo, f"{name}'s rows"), _whole(hi, f"{name}'s rows")),
            deps=tuple(str(d) for d in data["deps"]),
            stream=_whole(data["stream"], f"{name}'s stream"),
            original=str(data["original"]),
        )


def _whole(value: Any, what: str) -> int:
    """`value` as an int, refusing a fraction or a bool (int() would cut 1.5 to 1, and the
    schedule checker would then pass rows the JSON did not say)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        if not isinstance(value, bool):
            return operator.index(value)  # ints, numpy's included
    except TypeError:
        pass
    raise ValueError(f"{what} must be whole numbers, got {value!r}")


@dataclass
class Schedule:
    """A nano-batched step: streams of ordered nano-ops plus cross-stream events.

    Attributes:
        streams: stream id -> nano-op names in launch order.
        ops: nano-op name -> `NanoOp`.
        events: `(producer, consumer)` pairs on different streams; the consumer's stream waits
            on an event recorded right after the producer.
        num_tokens: token count of the whole step.
    """

    streams: dict[int, list[str]]
    ops: dict[str, NanoOp]
    events: list[tuple[str, str]] = field(default_factory=list)
    num_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (stream ids become strings, as JSON object keys must be)."""
        return {
            "num_tokens": self.num_tokens,
            "streams": {str(s): list(names) for s, names in self.streams.items()},
            "ops": [op.to_dict() for op in self.ops.values()],
            "events": [[p, c] for p, c in self.events],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Schedule":
        """Inverse of `to_dict`."""
        ops = [NanoOp.from_dict(d) for d in data["ops"]]
        return cls(
            streams={int(s): [str(n) for n in names] for s, names in data["streams"].items()},
            ops={op.name: op for op in ops},
            events=[(str(p), str(c)) for p, c in data["events"]],
            num_tokens=int(data["num_tokens"]),
        )

    def describe(self) -> str:
        """Readable multi-line listing: one block per stream, each nano-op with rows and waits."""
        waits: dict[str, list[str]] = {}
        for producer, consumer in self.events:
            waits.setdefault(consumer, []).append(producer)
        lines = [
            f"schedule: {self.num_tokens} tokens, {len(self.ops)} nano-ops, "
            f"{len(self.streams)} streams, {len(self.events)} events"
        ]
        for stream in sorted(self.streams):
            names = self.streams[stream]
            kinds = sorted({self.ops[n].resource for n in names if n in self.ops})
            lines.append(f"stream {stream} ({', '.join(kinds) or 'empty'}):")
            for name in names:
                op = self.ops.get(name)
                if op is None:
                    lines.append(f"  {name}  <unknown op>")
                    continue
                text = f"  {name:<24} {op.op:<20} rows {op.rows[0]}:{op.rows[1]}"
                if name in waits:
                    text += f"  waits on {', '.join(waits[name])}"
                lines.append(text)
        return "\n".join(lines)


def dependency_rows_intersect(a: Rows, b: Rows) -> bool:
    """True when the half-open row ranges `a` and `b` share at least one row."""
    return a[0] < b[1] and b[0] < a[1]


# --------------------------------------------------------------------------------------------
# Checker
# --------------------------------------------------------------------------------------------


def _is_index(value: Any) -> bool:
    """An int of any kind (numpy's too), never a float or a bool."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return not isinstance(value, bool)


def _extent(value: int | Rows | None) -> Rows | None:
    """Normalize an original op's token extent: `n` means `[0, n)`; None means "not split"."""
    if value is None:
        return None
    if _is_index(value):
        return (0, operator.index(value))
    try:
        pair = tuple(value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(_is_index(v) for v in pair):
        raise ScheduleError(f"a token extent must be an int n (rows [0, n)) or a (start, end) pair of ints, "
                            f"got {value!r}")
    return (operator.index(pair[0]), operator.index(pair[1]))


def _check_structure(
    schedule: Schedule, originals: Mapping[str, Any]
) -> dict[str, tuple[int, int]]:
    """Unknown references and stream membership; returns name -> (stream, position)."""
    for key, op in schedule.ops.items():
        if key != op.name:
            raise ScheduleError(f"nano-op stored under key {key!r} is named {op.name!r}")
        if op.resource not in RESOURCES:
            raise ScheduleError(
                f"nano-op {op.name!r} has unknown resource {op.resource!r}; use one of {RESOURCES}"
            )
        if op.stream not in schedule.streams:
            raise ScheduleError(
                f"nano-op {op.name!r} references unknown stream {op.stream}; "
                f"streams are {sorted(schedule.streams)}"
            )
        if op.original not in originals:
            raise ScheduleError(
                f"nano-op {op.name!r} covers unknown original op {op.original!r}"
            )
        if not all(_is_index(r) for r in op.rows):
            raise ScheduleError(f"nano-op {op.name!r} has rows {op.rows}: row bounds are ints")
        if op.rows[0] >= op.rows[1]:
            raise ScheduleError(f"nano-op {op.name!r} has an empty row range {op.rows}")
        for dep in op.deps:
            if dep not in schedule.ops:
                raise ScheduleError(f"nano-op {op.name!r} depends on unknown op {dep!r}")
            if dep == op.name:
                raise ScheduleError(f"nano-op {op.name!r} depends on itself (cycle)")

    where: dict[str, list[tuple[int, int]]] = {}
    for stream, names in schedule.streams.items():
        for pos, name in enumerate(names):
            if name not in schedule.ops:
                raise ScheduleError(f"stream {stream} lists unknown op {name!r}")
            where.setdefault(name, []).append((stream, pos))
    for name, op in schedule.ops.items():
        places = where.get(name, [])
        if len(places) != 1:
            detail = ", ".join(f"stream {s} position {p}" for s, p in places)
            raise ScheduleError(
                f"nano-op {name!r} appears in {len(places)} stream slots"
                + (f" ({detail})" if detail else "")
                + "; each nano-op must appear exactly once"
            )
        if places[0][0] != op.stream:
            raise ScheduleError(
                f"nano-op {name!r} says stream {op.stream} but is listed on stream {places[0][0]}"
            )

    for producer, consumer in schedule.events:
        for end in (producer, consumer):
            if end not in schedule.ops:
                raise ScheduleError(f"event ({producer!r}, {consumer!r}) names unknown op {end!r}")
    return {name: places[0] for name, places in where.items()}


def _check_coverage(schedule: Schedule, originals: Mapping[str, Any]) -> None:
    """Each original op is covered exactly once (no gaps, no overlaps) by its nano-ops' rows."""
    by_original: dict[str, list[NanoOp]] = {name: [] for name in originals}
    for op in schedule.ops.values():
        by_original[op.original].append(op)
    for original, raw in originals.items():
        parts = sorted(by_original[original], key=lambda o: (o.rows, o.name))
        extent = _extent(raw)
        if not parts:
            raise ScheduleError(f"original op {original!r} is not covered: it has no nano-ops")
        if extent is None:
            if len(parts) != 1:
                raise ScheduleError(
                    f"original op {original!r} is not split but has {len(parts)} nano-ops: "
                    f"{[p.name for p in parts]}"
                )
            continue
        lo, hi = extent
        cursor, last = lo, None
        for part in parts:
            a, b = part.rows
            if a < lo or b > hi:
                raise ScheduleError(
                    f"nano-op {part.name!r} rows [{a}, {b}) lie outside original op "
                    f"{original!r} extent [{lo}, {hi})"
                )
            if a < cursor:
                raise ScheduleError(
                    f"original op {original!r}: rows [{a}, {min(b, cursor)}) overlap between "
                    f"nano-ops {last!r} and {part.name!r}"
                )
            if a > cursor:
                raise ScheduleError(
                    f"original op {original!r}: gap, rows [{cursor}, {a}) are covered by no "
                    f"nano-op"
                )
            cursor, last = b, part.name
        if cursor < hi:
            raise ScheduleError(
                f"original op {original!r}: gap, rows [{cursor}, {hi}) are covered by no nano-op"
            )


def _check_dependencies(schedule: Schedule, where: Mapping[str, tuple[int, int]]) -> None:
    """Every dependency is ordered by its stream (same stream) or by a listed event."""
    events = set(schedule.events)
    for op in schedule.ops.values():
        c_stream, c_pos = where[op.name]
        for dep in op.deps:
            p_stream, p_pos = where[dep]
            if p_stream == c_stream:
                if p_pos > c_pos:
                    raise ScheduleError(
                        f"dependency {dep!r} -> {op.name!r} not satisfied: both on stream "
                        f"{c_stream}, but the producer is at position {p_pos}, after the "
                        f"consumer at position {c_pos}"
                    )
            elif (dep, op.name) not in events:
                raise ScheduleError(
                    f"dependency {dep!r} -> {op.name!r} not satisfied: producer on stream "
                    f"{p_stream}, consumer on stream {c_stream}, and no event "
                    f"({dep!r}, {op.name!r}) is listed"
                )


def _find_cycle(nodes: Iterable[str], preds: Mapping[str, list[str]]) -> list[str]:
    """A cycle among `nodes`, each of which has a predecessor among them (Kahn's leftovers)."""
    remaining = set(nodes)
    start = min(remaining)
    seen: dict[str, int] = {}
    path: list[str] = []
    node = start
    # Walk predecessors; every leftover node has one inside the leftover set, so this repeats.
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = min(p for p in preds[node] if p in remaining)
    cycle = path[seen[node]:]
    cycle.reverse()  # predecessor walk -> execution order
    return cycle


def _check_acyclic(schedule: Schedule) -> list[str]:
    """Stream order plus events must form a DAG, or the streams would deadlock; returns the
    nano-ops in one topological order of it."""
    succ: dict[str, list[str]] = {name: [] for name in schedule.ops}
    preds: dict[str, list[str]] = {name: [] for name in schedule.ops}
    for a, b in _order_edges(schedule):
        succ[a].append(b)
        preds[b].append(a)
    indeg = {name: len(preds[name]) for name in schedule.ops}
    ready = [name for name, d in indeg.items() if d == 0]
    order: list[str] = []
    while ready:
        node = ready.pop()
        order.append(node)
        for nxt in succ[node]:
            indeg[nxt] -= 1
            if indeg[nxt] == 0:
                ready.append(nxt)
    if len(order) != len(schedule.ops):
        left = [name for name, d in indeg.items() if d > 0]
        cycle = _find_cycle(left, preds)
        raise ScheduleError(
            "cycle in stream order + events (the streams would deadlock): "
            + " -> ".join(cycle + [cycle[0]])
        )
    return order


def _order_edges(schedule: Schedule) -> list[tuple[str, str]]:
    """What orders nano-ops at run time: each stream's consecutive pairs, then the events."""
    edges: list[tuple[str, str]] = []
    for names in schedule.streams.values():
        edges.extend(zip(names, names[1:]))
    edges.extend(schedule.events)
    return edges


def _check_events_have_dependencies(schedule: Schedule) -> None:
    """An event that orders no dependency only costs overlap, but it means whoever built the
    schedule had another dependency in mind than the one it declared: refuse it."""
    for producer, consumer in schedule.events:
        if producer not in schedule.ops[consumer].deps:
            raise ScheduleError(
                f"event ({producer!r}, {consumer!r}) orders no dependency: {consumer!r} does not "
                f"list {producer!r} among its deps; drop the event or declare the dependency"
            )


def _check_graph_dependencies(
    schedule: Schedule,
    originals: Mapping[str, Any],
    edges: Iterable[EdgeLike],
    seq_bounds: Sequence[int] | None,
    order: Sequence[str],
) -> None:
    """Every producer nano-op whose rows a consumer nano-op reads (by the unsplit graph's
    `edges`) runs before it: through stream order and events, directly or transitively. A
    nano-op of an op that is not split (extent None) covers every row of the step, whatever
    rows it declares (the coverage check cannot check them against an unknown extent)."""
    index = {name: i for i, name in enumerate(order)}
    preds: dict[str, list[str]] = {name: [] for name in order}
    for a, b in _order_edges(schedule):
        preds[b].append(a)
    # ancestors[n]: bit i set when order[i] finishes before n starts (a bitset per nano-op).
    ancestors: dict[str, int] = {}
    for name in order:
        bits = 0
        for pred in preds[name]:
            bits |= ancestors[pred] | (1 << index[pred])
        ancestors[name] = bits
    parts: dict[str, list[NanoOp]] = {}
    for op in schedule.ops.values():
        parts.setdefault(op.original, []).append(op)
    rows = [op.rows for op in schedule.ops.values()]
    step = (min(r[0] for r in rows), max(r[1] for r in rows)) if rows else (0, 0)
    # An unsplit op runs on whole tensors: it reads, and writes, every row, so its declared rows
    # must not narrow what it waits for or what waits for it.
    splits = {original: [op.rows if _extent(originals[original]) is not None else step for op in ops]
              for original, ops in parts.items()}
    for edge, i, j, need in _row_dependencies(splits, edges, seq_bounds):
        consumer, producer = parts[edge.consumer][i], parts[edge.producer][j]
        if not ancestors[consumer.name] >> index[producer.name] & 1:
            raise ScheduleError(
                f"{consumer.name!r} reads rows [{need[0]}, {need[1]}) of {edge.producer!r} ({edge.kind} "
                f"edge), but {producer.name!r} (rows [{producer.rows[0]}, {producer.rows[1]})) is not "
                f"ordered before it by stream order or events"
            )


def check_schedule(
    schedule: Schedule,
    originals: Mapping[str, int | Rows | None],
    edges: Iterable[EdgeLike] | None = None,
    *,
    seq_bounds: Sequence[int] | None = None,
) -> None:
    """Validate `schedule`; raise `ScheduleError` with a precise message on the first problem.

    `originals` maps every op of the unsplit graph to its token extent: an int `n` (rows
    `[0, n)`), a `(lo, hi)` pair, or None for an op that is not split (exactly one nano-op).
    `edges` (and `seq_bounds`), the unsplit graph's edges as given to `make_schedule`, let the
    checker derive the dependencies from the graph instead of trusting the ones the nano-ops
    declare.

    Checked, in this order:
      1. structure: nano-ops name known streams, originals and dependency ops; stream lists
         name known ops; each nano-op appears in exactly one stream slot, on its own stream;
         events name known ops;
      2. coverage: each original op's nano-op row ranges tile its extent exactly (no gap, no
         overlap, nothing outside);
      3. dependencies: a producer on the consumer's stream comes earlier in it; a producer on
         another stream has a listed `(producer, consumer)` event (transitive orderings through
         other events are deliberately not accepted: the pass emits direct events);
      4. no cycle in the combined order (stream order + events), via a topological sort;
      5. every event orders a declared dependency;
      6. with `edges`: every producer nano-op whose rows a consumer nano-op reads (its own rows
         over a token edge, its sequences' rows over a global one) finishes before it starts,
         by stream order and events (transitively: the run-time order is what matters here).
         This catches dependencies left out of `deps`, such as a consumer waiting on only part
         of the producer rows it reads.
    """
    where = _check_structure(schedule, originals)
    _check_coverage(schedule, originals)
    _check_dependencies(schedule, where)
    order = _check_acyclic(schedule)
    _check_events_have_dependencies(schedule)
    if edges is not None:
        _check_graph_dependencies(schedule, originals, edges, seq_bounds, order)


# --------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpSpec:
    """An op of the unsplit graph: its name, what it computes, and its resource class."""

    name: str
    op: str
    resource: str

    def __post_init__(self) -> None:
        if self.resource not in RESOURCES:
            raise ScheduleError(
                f"op {self.name!r} has unknown resource {self.resource!r}; use one of {RESOURCES}"
            )


@dataclass(frozen=True)
class OpEdge:
    """Edge `producer -> consumer` of the unsplit graph.

    `kind="token"`: consumer row r reads producer row r only (GEMMs, norms, elementwise).
    `kind="global"`: consumer row r reads every row of r's sequence (attention reads the whole
    sequence's K/V); sequences are given to `build_dependencies` by `seq_bounds`.
    """

    producer: str
    consumer: str
    kind: str = "token"

    def __post_init__(self) -> None:
        if self.kind not in EDGE_KINDS:
            raise ScheduleError(f"edge kind {self.kind!r} is not valid; use one of {EDGE_KINDS}")


EdgeLike = OpEdge | tuple[str, str] | tuple[str, str, str]


def nano_name(original: str, index: int) -> str:
    """Name of the `index`-th nano-op of `original` (as used by `build_dependencies`)."""
    return f"{original}[{index}]"


def _as_edge(edge: EdgeLike) -> OpEdge:
    return edge if isinstance(edge, OpEdge) else OpEdge(*edge)


def _needed_rows(rows: Rows, kind: str, seq_bounds: Sequence[int] | None, whole: Rows) -> Rows:
    """Producer rows a consumer slice reads: itself (token-wise) or its whole sequences."""
    if kind == "token":
        return rows
    if seq_bounds is None:
        return whole  # one sequence spanning the step: a global edge needs everything
    lo, hi = rows
    start = max((b for b in seq_bounds if b <= lo), default=whole[0])
    end = min((b for b in seq_bounds if b >= hi), default=whole[1])
    return (start, end)


def build_dependencies(
    splits: Mapping[str, Sequence[Rows]],
    edges: Iterable[EdgeLike],
    *,
    seq_bounds: Sequence[int] | None = None,
) -> dict[str, tuple[str, ...]]:
    """Fine-grained dependencies of the nano-ops named `nano_name(op, i)` for `splits[op][i]`.

    For each original edge `P -> C`, nano-op `C[i]` depends on exactly the nano-ops `P[j]` whose
    rows intersect the rows `C[i]` needs: its own rows for a token-wise edge, or the union of the
    sequences its rows touch for a global edge (`seq_bounds` are cumulative sequence starts such
    as `[0, 5, 9, 16]`; without them a global edge needs every row of the producer). No global
    barrier is ever added, so nano-batch 1 of a layer can start while nano-batch 0 of the
    previous op is still running.

    Returns nano-op name -> producer nano-op names, in the order of `edges`, then producer index.
    """
    deps: dict[str, list[str]] = {
        nano_name(op, i): [] for op, ranges in splits.items() for i in range(len(ranges))
    }
    for edge, i, j, _ in _row_dependencies(splits, edges, seq_bounds):
        name = nano_name(edge.producer, j)
        if name not in deps[nano_name(edge.consumer, i)]:
            deps[nano_name(edge.consumer, i)].append(name)
    return {name: tuple(ds) for name, ds in deps.items()}


def _row_dependencies(
    splits: Mapping[str, Sequence[Rows]],
    edges: Iterable[EdgeLike],
    seq_bounds: Sequence[int] | None,
) -> Iterator[tuple[OpEdge, int, int, Rows]]:
    """(edge, consumer slice i, producer slice j, the rows slice i needs) for every pair of
    slices of an edge's ops whose rows meet (see `build_dependencies`); the builder and the
    checker both read dependencies from here."""
    for raw in edges:
        edge = _as_edge(raw)
        for end in (edge.producer, edge.consumer):
            if end not in splits:
                raise ScheduleError(
                    f"edge {edge.producer!r} -> {edge.consumer!r}: unknown op {end!r}"
                )
        producer_ranges = splits[edge.producer]
        whole = (min(r[0] for r in producer_ranges), max(r[1] for r in producer_ranges))
        for i, rows in enumerate(splits[edge.consumer]):
            need = _needed_rows(tuple(rows), edge.kind, seq_bounds, whole)
            for j, prow in enumerate(producer_ranges):
                if dependency_rows_intersect(need, tuple(prow)):
                    yield edge, i, j, need


def make_schedule(
    specs: Sequence[OpSpec],
    splits: Mapping[str, Sequence[Rows] | None],
    edges: Iterable[EdgeLike],
    num_tokens: int,
    *,
    seq_bounds: Sequence[int] | None = None,
    stream_of_resource: Mapping[str, int] | None = None,
    priority: Mapping[str, float] | None = None,
) -> Schedule:
    """Build a valid `Schedule` for the op graph `specs` + `edges` split as in `splits`.

    `splits[op]` lists the row ranges of `op`'s nano-ops; a missing or None entry means the op is
    not split (one nano-op over `[0, num_tokens)`). Each nano-op goes on the stream of its
    resource class (`stream_of_resource`, default compute 0 / memory 1 / network 2). Streams are
    ordered by one topological order of the nano-op graph, preferring earlier ops of `specs` and
    then earlier nano-batches (op-major), so every per-stream order is consistent with the
    others and the result is acyclic. `priority` (nano-op name -> number, lower first, e.g. the
    start times of a simulated pipeline) takes precedence over the op-major preference among
    ready nano-ops. A cross-stream dependency gets an event. Raises `ScheduleError` if the
    original graph has a cycle.
    """
    streams_of = dict(stream_of_resource or DEFAULT_STREAM_OF_RESOURCE)
    edge_list = [_as_edge(e) for e in edges]
    # Ops are keyed by name: a second spec of one name would silently replace the first, and a
    # split of a name no spec has (a typo) would leave its op unsplit.
    # (A set, not list scans: a graph has thousands of ops, and a schedule is built per token count.)
    names: set[str] = set()
    for spec in specs:
        if spec.name in names:
            raise ScheduleError(f"op {spec.name!r} appears more than once in specs: op names must be unique")
        names.add(spec.name)
    for name in splits:
        if name not in names:
            raise ScheduleError(f"splits name op {name!r}, which is not among the specs")
    full: dict[str, list[Rows]] = {}
    for spec in specs:
        ranges = splits.get(spec.name)
        full[spec.name] = [(0, num_tokens)] if not ranges else [tuple(r) for r in ranges]
        if not all(len(r) == 2 and all(_is_index(b) for b in r) for r in full[spec.name]):
            raise ScheduleError(f"op {spec.name!r}: split rows must be (start, end) pairs of ints, got {ranges}")
    deps = build_dependencies(full, edge_list, seq_bounds=seq_bounds)

    ops: dict[str, NanoOp] = {}
    rank: dict[str, tuple[float, int, int]] = {}
    for k, spec in enumerate(specs):
        if spec.resource not in streams_of:
            raise ScheduleError(f"no stream for resource {spec.resource!r} of op {spec.name!r}")
        for i, rows in enumerate(full[spec.name]):
            name = nano_name(spec.name, i)
            ops[name] = NanoOp(
                name=name,
                op=spec.op,
                resource=spec.resource,
                rows=(int(rows[0]), int(rows[1])),
                deps=deps[name],
                stream=streams_of[spec.resource],
                original=spec.name,
            )
            # Why a priority: in-order streams follow this order, so it decides the overlap.
            pri = float(priority[name]) if priority and name in priority else float("inf")
            rank[name] = (pri, k, i)

    # Kahn's algorithm with a priority queue: deterministic op-major topological order.
    users: dict[str, list[str]] = {name: [] for name in ops}
    indeg = {name: len(op.deps) for name, op in ops.items()}
    for name, op in ops.items():
        for dep in op.deps:
            users[dep].append(name)
    heap = [(rank[n], n) for n, d in indeg.items() if d == 0]
    heapq.heapify(heap)
    order: list[str] = []
    while heap:
        _, name = heapq.heappop(heap)
        order.append(name)
        for user in users[name]:
            indeg[user] -= 1
            if indeg[user] == 0:
                heapq.heappush(heap, (rank[user], user))
    if len(order) != len(ops):
        stuck = sorted({ops[n].original for n, d in indeg.items() if d > 0})
        raise ScheduleError(f"cycle in the original op graph among {stuck}")

    # The promised valid schedule: every op's nano-ops tile [0, num_tokens) (no gap, overlap or
    # empty range), checked as `check_schedule` checks them.
    for op in ops.values():
        if op.rows[0] >= op.rows[1]:
            raise ScheduleError(f"nano-op {op.name!r} has an empty row range {op.rows}")
    _check_coverage(Schedule(streams={}, ops=ops, num_tokens=num_tokens), {spec.name: num_tokens for spec in specs})

    streams: dict[int, list[str]] = {s: [] for s in sorted(set(streams_of.values()))}
    for name in order:
        streams[ops[name].stream].append(name)
    streams = {s: names for s, names in streams.items() if names}
    events = [
        (dep, name)
        for name in order
        for dep in ops[name].deps
        if ops[dep].stream != ops[name].stream
    ]
    return Schedule(streams=streams, ops=ops, events=events, num_tokens=num_tokens)
