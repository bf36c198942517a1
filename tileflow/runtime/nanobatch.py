"""Run a nano-batched step: the schedule the `nanobatch` pass planned, for the actual token count.

On the CPU (and wherever streams are not used) the nano-ops run one after another in a
topological order of the schedule: token-wise ops on their rows, the others on everything; the
result equals the unsplit graph's up to summation order inside the GEMMs. Schedules are built
once per token count and cached.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ..graph_utils import SIZED_BY_ARGUMENT, SIZED_BY_FIRST_ARGUMENT, is_view_op, traced_contiguous
from .streams import CudaGraphBuckets, CudaStreams, graph_token_dims, run_schedule_on_streams

aten = torch.ops.aten
# Of the ops whose size argument (args[1]) holds the token dim's size (`SIZED_BY_ARGUMENT`, rewritten
# per nano-batch), the views: a piece need not be viewable with the whole's strides.
_VIEWS = {aten.view.default, aten._unsafe_view.default}


class NanoBatchRunner:
    """Callable like the graph: splits each call into the plan's nano-batches, or runs `whole`
    (the graph's usual runner) when the plan keeps the step in one piece.

    Where the nano-ops run: `executor` when given (e.g. `SimulatedStreams` in tests); on CUDA
    inputs, `CudaStreams` (each schedule stream on its own CUDA stream, with events); elsewhere in
    one topological order. With `graph_buckets` (CUDA only; `Config.cuda_graphs`) each step is
    captured once per token bucket (per token count with `exact_graphs`) and input signature as
    a CUDA graph and replayed (see `tileflow.runtime.streams.CudaGraphBuckets`). Calls from several
    threads are safe: their steps take turns on the executor.
    """

    def __init__(self, gm: fx.GraphModule, plan: Any, whole: Callable[..., Any], *, check: bool = False,
                 executor: Any = None, graph_buckets: Sequence[int] = (), graph_factory: Any = None,
                 exact_graphs: bool = False) -> None:
        self.gm, self.plan, self.whole, self.check = gm, plan, whole, check
        self._unsplit = frozenset(name for name, split in plan.split.items() if not split)  # (on the whole device)
        self.executor = executor
        self._schedule = lru_cache(maxsize=64)(self._build)
        self.last_schedule = None
        self._cuda_streams: Any = None
        # One executor serves every call, and its step state is not per call (CudaStreams keeps
        # the step's fork event and used streams): steps from different threads take turns.
        self._executor_lock = threading.Lock()
        self._graphs = None
        self._graphs_anywhere = graph_factory is not None  # a CPU stand-in for CUDA graphs (tests)
        if graph_buckets:
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            index, dim = plan.token_input
            token = placeholders[index].meta["val"].shape[dim].node.expr
            # TOKEN_COUNT / TokenExpression for int inputs and outputs computed from T (as the
            # whole-step path does): plan.token_dims is None for them, and the captured value
            # (at the bucket's count) would come back.
            inputs, outputs = graph_token_dims(gm, token)
            self._graphs = CudaGraphBuckets(self._run, inputs, graph_buckets, lambda _: outputs,
                                            graph_factory=graph_factory, exact=exact_graphs)

    def _build(self, sizes: tuple[int, ...]) -> Any:
        schedule = self.plan.schedule(list(sizes))
        if self.check:
            from tileflow.schedule import check_schedule

            check_schedule(schedule, {s.name: (0, sum(sizes)) for s in self.plan.specs}, self.plan.edges)
        return schedule, topological_order(schedule)

    def _executor_for(self, device: torch.device) -> Any:
        if self.executor is not None:
            return self.executor
        if device.type == "cuda":
            if self._cuda_streams is None:
                self._cuda_streams = CudaStreams(device)
            return self._cuda_streams
        return None

    def __call__(self, *args: Any) -> Any:
        if self._graphs is not None:  # (a plan without a token input, a decode step, has none)
            index, _ = self.plan.token_input
            if args[index].device.type == "cuda" or self._graphs_anywhere:
                return self._graphs(*args)
        return self._run(*args)

    def _run(self, *args: Any) -> Any:
        index, dim = self.plan.count_input  # tokens, or sequences for a split over them
        tokens = int(args[index].shape[dim])
        # ("auto" costs the step at its sizes: a decode step's attention reads its cache's length.)
        values = self.plan.symbol_values(args) if self.plan.setting == "auto" else None
        sizes = tuple(self.plan.sizes(tokens, values))
        if len(sizes) < 2:
            return self.whole(*args)
        schedule, order = self._schedule(sizes)  # built once per split
        self.last_schedule = schedule
        with self._executor_lock:  # (also made once: CudaStreams on first use)
            executor = self._executor_for(args[index].device)
            if executor is not None:
                return run_schedule_on_streams(ScheduleState(self.gm, self.plan, args), schedule, executor, order,
                                               self.plan.shares(tokens, values), self._unsplit)
        return run_schedule(self.gm, self.plan, schedule, args, order)


def run_schedule(
    gm: fx.GraphModule, plan: Any, schedule: Any, args: Sequence[Any], order: Sequence[str] | None = None,
) -> Any:
    """Execute every nano-op of `schedule` in `order` (default: `topological_order(schedule)`);
    return the graph's outputs."""
    state = ScheduleState(gm, plan, args)
    for name in order if order is not None else topological_order(schedule):
        state.run_op(schedule.ops[name])
    return state.outputs()


class ScheduleState:
    """The values of one nano-batched call: whole tensors and per-nano-batch row pieces.

    `run_op(op)` computes one nano-op from what its producers left here (a token-wise op on its
    rows, any other op on whole tensors, which are concatenated from their pieces on first use);
    `outputs()` assembles the graph's outputs. Whoever calls `run_op` — in order on the CPU, or on
    streams (`tileflow.runtime.streams`) — must respect the schedule's dependencies.
    """

    def __init__(self, gm: fx.GraphModule, plan: Any, args: Sequence[Any]) -> None:
        self.gm, self.plan = gm, plan
        self.dims: dict[str, int | None] = plan.token_dims
        self.whole: dict[str, Any] = {}
        self.pieces: dict[str, dict[tuple[int, int], Any]] = {}
        self._joined: dict[tuple[str, int | None], Any] = {}  # (split node, stream) -> whole
        self._any_joined: dict[str, Any] = {}  # split node -> its first whole, on any stream
        self.stream: int | None = None  # the stream of the op being computed (None: the caller's)
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.routed: frozenset[str] = plan.routed
        index, dim = plan.count_input
        self.tokens = int(args[index].shape[dim])  # the rows (or sequences) a split value's pieces tile
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, args):
            self.whole[node.name] = value
        # Split over sequences: node -> rows per sequence along its split dim at this call (`B*S`
        # rows: S); absent, 1. A piece (lo, hi) holds that many rows per sequence lo..hi.
        self.scales: dict[str, int] = {}
        if plan.row_scales:
            values = plan.symbol_values(args)
            evaluated: dict[Any, int] = {}
            for name, expr in plan.row_scales.items():
                if expr not in evaluated:
                    evaluated[expr] = int(expr.xreplace(values))
                self.scales[name] = evaluated[expr]

    def full(self, node: fx.Node) -> Any:
        """The whole value of `node` (for a split node, its pieces concatenated on first use)."""
        if node.name in self.whole:
            return self.whole[node.name]
        if node.op == "get_attr":
            value = self.gm
            for part in str(node.target).split("."):
                value = getattr(value, part)
            self.whole[node.name] = value
            return value
        # The concatenation runs on the stream of the op that needs it, so it is reused only on that
        # stream: a consumer on another stream waited for the pieces' producers, not for this cat.
        key = (node.name, self.stream)
        if key not in self._joined:
            if self.stream is None and node.name in self._any_joined:
                # After the step every stream has joined the caller's: any stream's copy serves
                # (and an output viewing it shares its memory, as eager's would).
                return self._any_joined[node.name]
            parts = self.pieces[node.name]
            ranges = sorted(parts)
            # Only once every piece exists: a join of some of them, cached, would hand later
            # readers rows shifted into the place of the missing ones.
            _check_tiled(node.name, ranges, 0, self.tokens)
            self._joined[key] = torch.cat([parts[r] for r in ranges], dim=self.dims[node.name])
            self._any_joined.setdefault(node.name, self._joined[key])
        return self._joined[key]

    def rows(self, node: fx.Node, lo: int, hi: int) -> Any:
        """Rows [lo, hi) of `node`'s value along its token dim (a routed node's: its nano-batch's
        own value)."""
        parts = self.pieces.get(node.name)
        if parts is not None and (lo, hi) in parts:
            return parts[(lo, hi)]
        if node.name in self.routed:
            # Its rows are in the order of its nano-batch's own sort (or it has none: counts): no
            # other piece holds them.
            raise RuntimeError(f"{node.name!r} of a mixture of experts' routing is read for tokens [{lo}, {hi}), "
                               f"which no nano-op computed it for (computed: {sorted(parts or ())}): the routing "
                               "runs per nano-batch, and its readers must be cut as it is")
        if parts is not None:
            # The producer was cut elsewhere (a schedule may split each op its own way): these
            # rows from the pieces holding them, which are all the consumer waited for.
            held = sorted(r for r in parts if r[0] < hi and lo < r[1])
            _check_tiled(node.name, held, lo, hi, within=True)
            dim, scale = self.dims[node.name], self.scales.get(node.name, 1)
            joined = torch.cat([parts[r] for r in held], dim=dim) if len(held) > 1 else parts[held[0]]
            return joined.narrow(dim, (lo - held[0][0]) * scale, (hi - lo) * scale)
        scale = self.scales.get(node.name, 1)
        return self.full(node).narrow(self.dims[node.name], lo * scale, (hi - lo) * scale)

    def run_op(self, op: Any) -> Any:
        """Compute nano-op `op` and store its result; returns it."""
        self.stream = op.stream
        try:
            return self._compute(op)
        finally:
            self.stream = None

    def _compute(self, op: Any) -> Any:
        node = self.nodes[op.original]
        lo, hi = op.rows
        dims = self.dims
        if not self.plan.split[node.name]:
            value = node.target(*fx.node.map_aggregate(node.args, _resolver(self.full)),
                                **fx.node.map_aggregate(node.kwargs, _resolver(self.full)))
            self.whole[node.name] = value
            return value

        def arg(a: Any) -> Any:
            if isinstance(a, fx.Node):
                return self.rows(a, lo, hi) if dims.get(a.name) is not None or a.name in self.routed else self.full(a)
            return a

        call_args = fx.node.map_aggregate(node.args, arg)
        call_kwargs = fx.node.map_aggregate(node.kwargs, arg)
        target = node.target
        if target in SIZED_BY_ARGUMENT:
            shape = list(call_args[1])
            shape[dims[node.name]] = (hi - lo) * self.scales.get(node.name, 1)
            # A slice need not be viewable with the whole's strides: reshape copies when needed.
            target = aten.reshape.default if target in _VIEWS else target
            call_args = (call_args[0], shape, *call_args[2:])
        elif target in SIZED_BY_FIRST_ARGUMENT and node.name in self.routed:
            # A constant per routed row (`ones(k * T, 1)`): its nano-batch's own rows.
            shape = list(call_args[0])
            shape[dims[node.name]] = (hi - lo) * self.scales[node.name]
            call_args = (shape, *call_args[1:])
        elif target is aten.arange.default and node.name in self.routed:
            # The routed rows' positions 0 .. k*n - 1 (the graph's length is the whole step's).
            call_args = ((hi - lo) * self.scales[node.name], *call_args[1:])
        value = target(*call_args, **call_kwargs)
        self.pieces.setdefault(node.name, {})[(lo, hi)] = value
        return value

    def outputs(self) -> Any:
        """The graph's outputs, from the values computed so far. An output that eager returns as
        a view (of another output, or of a value two outputs view) is its view chain applied
        again to the whole of its base, so outputs share memory as eager's do: computed piece by
        piece, or on another stream's copy of the base, it would hold the same values in memory
        of its own."""
        (output,) = [n for n in self.gm.graph.nodes if n.op == "output"]
        return fx.node.map_aggregate(output.args[0], lambda a: self._output(a) if isinstance(a, fx.Node) else a)

    def _output(self, node: fx.Node) -> Any:
        chain = []
        base = node
        while _is_view(base):
            chain.append(base)
            base = base.args[0]
        if not chain or (self.plan.split.get(base.name) and not traced_contiguous(base)):
            # A split base is joined contiguously: a view of it has eager's strides only when
            # eager's base is contiguous too (else the output keeps its own, contiguous, memory).
            return self.full(node)
        value = self.full(base)
        resolve = _resolver(self.full)
        try:
            for view in reversed(chain):
                value = view.target(value, *fx.node.map_aggregate(view.args[1:], resolve),
                                    **fx.node.map_aggregate(view.kwargs, resolve))
        except RuntimeError:
            # A view eager could take of its base's layout but not of the concatenated base's:
            # the output keeps its own memory (same values).
            return self.full(node)
        return value


def _is_view(node: Any) -> bool:
    """Whether `node` is an op whose one tensor result views its first argument."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and is_view_op(node.target)
            and len(node.target._schema.returns) == 1 and bool(node.args) and isinstance(node.args[0], fx.Node)
            and isinstance(node.meta.get("val"), torch.Tensor))


def _check_tiled(name: str, ranges: Sequence[tuple[int, int]], lo: int, hi: int, within: bool = False) -> None:
    """Raise unless the sorted row `ranges` of `name`'s pieces tile `[lo, hi)` without a gap
    (`within`: cover it, the first and last piece may reach past it)."""
    contiguous = all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    if ranges and contiguous:
        first, last = ranges[0][0], ranges[-1][1]
        if (first <= lo and last >= hi) if within else (first, last) == (lo, hi):
            return
    raise RuntimeError(f"rows [{lo}, {hi}) of {name!r} are read before its nano-ops computed them all "
                       f"(computed: {list(ranges)}): the schedule does not order them before the reader")


def _resolver(full: Callable[[fx.Node], Any]) -> Callable[[Any], Any]:
    return lambda a: full(a) if isinstance(a, fx.Node) else a


def topological_order(schedule: Any) -> list[str]:
    """Nano-op names in an order that respects every dependency, every event and each stream's
    own order (streams merged): the issue order, in which each stream launches its nano-ops as the
    schedule lists them and every event is recorded before anything waits on it."""
    before: dict[str, set[str]] = {name: set(op.deps) for name, op in schedule.ops.items()}
    for names in schedule.streams.values():
        for earlier, later in zip(names, names[1:]):
            before[later].add(earlier)
    for producer, consumer in schedule.events:
        before[consumer].add(producer)
    order, done = [], set()
    position = {name: i for i, name in enumerate(schedule.ops)}
    pending = sorted(schedule.ops, key=position.get)
    while pending:
        rest = []
        for name in pending:
            if before[name] <= done:
                order.append(name)
                done.add(name)
            else:
                rest.append(name)
        if len(rest) == len(pending):
            raise RuntimeError(f"schedule has a cycle among {rest[:5]}")
        pending = rest
    return order
