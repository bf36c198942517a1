"""Nano-batch schedules on streams (NanoFlow's overlap), and CUDA-graph capture per token bucket.

`run_schedule_on_streams` launches every nano-op of a `Schedule` on its own stream through a
`StreamExecutor`, in a topological order of the schedule; a nano-op whose producer ran on another
stream first waits on the event recorded right after that producer (the schedule's `events`), so
operations of different nano-batches overlap while every dependency holds. Executors:

- `CudaStreams`: one `torch.cuda.Stream` per schedule stream (kept across steps, so a CUDA graph
  can capture them), forked from and joined back to the caller's stream, with an optional SM
  share per stream: persistent kernels launched on a stream (the meta-attention kernel, GEMMs a
  plan runs persistent) cap their grid to its share (`programs_for`, `shared_programs`),
  NanoFlow's way of partitioning the SMs;
- `SimulatedStreams`: a CPU stand-in that queues each stream's work and then runs it in a *random*
  interleaving that respects only stream order and events — what a GPU may do. A missing event
  shows up as a consumer running before its producer (a wrong result or a failed lookup). It
  models ordering only: not the caching allocator's memory reuse across streams.

`CudaGraphBuckets` captures a whole step once per token bucket and input signature and replays
it: inputs are copied into static buffers (the rows past the real token count padded), and outputs
are cut back to the real count. Padded tail rows must not reach the real rows (true of causal
models; `tileflow.padding_safety` checks a compiled graph); a step with an output that has no token dim (a KV cache), or that writes into an input, is
not captured.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import random
import threading
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.utils._pytree as pytree

from ..log import get_logger
from ..padding_safety import PAD_VALUE

__all__ = [
    "NO_TOKEN_DIM_TO_BUCKET",
    "TOKEN_COUNT",
    "TokenExpression",
    "keep_alive_while_captured",
    "CudaGraphBuckets",
    "CudaStreams",
    "SimulatedStreams",
    "StreamExecutor",
    "grid_share",
    "programs_for",
    "shared_programs",
    "run_schedule_on_streams",
]

log = get_logger("runtime.streams")

# `CudaGraphBuckets` input marker: this argument is the token count itself (an int).
TOKEN_COUNT = "token_count"
# The report's `cuda_graphs` note for a step with no token dim to bucket (a decode step over a
# cache, split or not; a graph of several size symbols).
NO_TOKEN_DIM_TO_BUCKET = "not captured: no single symbolic token dimension to bucket"


@dataclass(frozen=True)
class TokenExpression:
    """`CudaGraphBuckets` marker of an int argument or output computed from the token count
    alone (`2 * T` for the flattened top-2 expert ids a MoE stage hands the next one): a graph
    is captured with its value at the bucket's count, and a call returns its value at the
    call's."""

    expr: Any  # a sympy expression in `symbol` only
    symbol: Any

    def at(self, tokens: int) -> int:
        """The value for `tokens` tokens."""
        return _evaluate_at(self.expr, self.symbol, tokens)


@functools.lru_cache(maxsize=4096)
def _evaluate_at(expr: Any, symbol: Any, tokens: int) -> int:
    # Cached: sympy's substitution costs about 150 us on this CPU, on every step's host path.
    return int(expr.subs(symbol, tokens))


# The SM share of the stream whose work is being launched (None: the whole device).
_GRID_SHARE: contextvars.ContextVar[float | None] = contextvars.ContextVar("tileflow_grid_share", default=None)


@contextlib.contextmanager
def grid_share(share: float | None) -> Iterator[None]:
    """Launch persistent kernels inside the block with `share` (0, 1] of the device's cores."""
    if share is not None and not 0.0 < share <= 1.0:
        raise ValueError(f"a grid share is a fraction of the device in (0, 1], got {share}")
    token = _GRID_SHARE.set(share)
    try:
        yield
    finally:
        _GRID_SHARE.reset(token)


def programs_for(full_grid: int) -> int:
    """The program count a persistent kernel should launch: `full_grid` (one per SM/core) scaled
    by the current stream's share, at least 1."""
    share = _GRID_SHARE.get()
    return full_grid if share is None else max(1, int(full_grid * share))


def device_cores(device: torch.device) -> int:
    """SMs of a CUDA device (asked once per device: the query costs microseconds, and the
    attention path asks on every call), else the CPU cores (the Triton interpreter's default
    grid on the CPU)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return os.cpu_count() or 1


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def shared_programs(device: torch.device) -> int | None:
    """The program count of a persistent kernel on `device` under the current stream's SM share,
    or None when no share applies (the kernel's own default: the whole device)."""
    if _GRID_SHARE.get() is None:
        return None
    return programs_for(device_cores(device))


class StreamExecutor(Protocol):
    """Where a schedule's nano-ops run. Calls come in a topological order of the schedule."""

    def begin(self) -> None:
        """Start a step: every stream must see the work already queued by the caller."""

    def launch(self, stream: int, fn: Callable[[], Any]) -> None:
        """Run (or enqueue) `fn` on `stream`."""

    def record(self, stream: int) -> Any:
        """An event that completes when everything launched on `stream` so far has."""

    def wait(self, stream: int, event: Any) -> None:
        """Make later work on `stream` wait for `event`."""

    def end(self) -> None:
        """Finish a step: the caller's later work must see everything every stream did."""


def run_schedule_on_streams(
    state: Any,
    schedule: Any,
    executor: StreamExecutor,
    order: Sequence[str],
    shares: dict[int, float] | None = None,
    whole: Collection[str] = (),
) -> Any:
    """Run `schedule` on `executor`'s streams and return the graph's outputs.

    `state` is a `ScheduleState` (it computes one nano-op from its producers' values); `order` a
    topological order of the schedule (issue order: an event is always recorded before anything
    waits on it); `shares` optionally maps a stream to its SM share (see `grid_share`), which
    the ops of the unsplit graph named in `whole` (those that run once over the step, between
    every nano-batch's ops before them and after them) do not take: they launch over the whole
    device, as the split search's model has them (`OpProfile.whole`).
    """
    waits: dict[str, list[str]] = defaultdict(list)
    for producer, consumer in schedule.events:
        waits[consumer].append(producer)
    recorded_after = {producer for producer, _ in schedule.events}
    events: dict[str, Any] = {}
    executor.begin()
    for name in order:
        op = schedule.ops[name]
        for producer in waits.get(name, ()):
            executor.wait(op.stream, events[producer])
        share = shares.get(op.stream) if shares and op.original not in whole else None

        def step(op: Any = op, share: float | None = share) -> None:
            with grid_share(share):
                state.run_op(op)

        executor.launch(op.stream, step)
        if name in recorded_after:
            events[name] = executor.record(op.stream)
    executor.end()
    return state.outputs()


class CudaStreams:
    """A schedule's streams as CUDA streams on `device` (created once, reused every step)."""

    def __init__(self, device: torch.device | str | int | None = None) -> None:
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._used: list[int] = []
        self._fork: torch.cuda.Event | None = None

    def _stream(self, stream: int) -> torch.cuda.Stream:
        if stream not in self._streams:
            self._streams[stream] = torch.cuda.Stream(self.device)
        s = self._streams[stream]
        if stream not in self._used:
            # First use in this step: fork from the caller's stream (also what capture requires).
            s.wait_event(self._fork)
            self._used.append(stream)
        return s

    def begin(self) -> None:
        """Record the fork point on the caller's stream."""
        self._used = []
        self._fork = torch.cuda.Event()
        self._fork.record(torch.cuda.current_stream(self.device))

    def launch(self, stream: int, fn: Callable[[], Any]) -> None:
        """Enqueue `fn`'s kernels on `stream`."""
        with torch.cuda.stream(self._stream(stream)):
            fn()

    def record(self, stream: int) -> torch.cuda.Event:
        """An event after the work enqueued on `stream` so far."""
        event = torch.cuda.Event()
        event.record(self._stream(stream))
        return event

    def wait(self, stream: int, event: torch.cuda.Event) -> None:
        """Later work on `stream` waits for `event`."""
        self._stream(stream).wait_event(event)

    def end(self) -> None:
        """Join every stream used in this step back into the caller's stream."""
        current = torch.cuda.current_stream(self.device)
        for stream in self._used:
            current.wait_stream(self._streams[stream])


@dataclass
class _SimEvent:
    done: bool = False


@dataclass
class SimulatedStreams:
    """Streams simulated on the CPU: work is queued per stream and, at `end`, run in a random
    interleaving (seeded) that respects only each stream's order and the events.

    `trace` lists (stream, label) in the order things ran, for tests; `interleaved` is True when a
    step ran work of one stream between two pieces of work of another.
    """

    seed: int = 0
    trace: list[tuple[int, str]] = field(default_factory=list)
    _queues: dict[int, list[tuple[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def begin(self) -> None:
        """Start a step with empty queues."""
        self._queues = {}
        self.trace = []

    def launch(self, stream: int, fn: Callable[[], Any]) -> None:
        """Queue `fn` on `stream`."""
        self._queues.setdefault(stream, []).append(("run", fn))

    def record(self, stream: int) -> _SimEvent:
        """Queue an event on `stream`."""
        event = _SimEvent()
        self._queues.setdefault(stream, []).append(("record", event))
        return event

    def wait(self, stream: int, event: _SimEvent) -> None:
        """Queue a wait for `event` on `stream`."""
        self._queues.setdefault(stream, []).append(("wait", event))

    def end(self) -> None:
        """Run everything queued, in a random order allowed by stream order and events."""
        queues = {s: list(q) for s, q in self._queues.items()}
        while any(queues.values()):
            ready = [s for s, q in queues.items() if q and (q[0][0] != "wait" or q[0][1].done)]
            if not ready:
                stuck = {s: q[0][0] for s, q in queues.items() if q}
                raise RuntimeError(f"simulated streams deadlocked: every stream waits on an unrecorded event ({stuck})")
            stream = self._rng.choice(sorted(ready))
            kind, item = queues[stream].pop(0)
            if kind == "run":
                self.trace.append((stream, getattr(item, "__name__", "op")))
                item()
            elif kind == "record":
                item.done = True

    @property
    def interleaved(self) -> bool:
        """Whether the last step switched back to a stream it had left (real overlap)."""
        seen, last = set(), None
        for stream, _ in self.trace:
            if stream != last and stream in seen:
                return True
            seen.add(stream)
            last = stream
        return False


# Tensors a step in capture reads but does not own (e.g. cached task tables): the capture keeps
# them alive for as long as its graph, whose replays read their memory.
_CAPTURE_KEEPALIVE: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "tileflow_capture_keepalive", default=None
)


def keep_alive_while_captured(obj: Any) -> Any:
    """Return `obj`; when a step is being captured as a graph, also keep `obj` alive with it.

    Whoever hands a captured step device memory from a cache (which may evict it later) calls
    this, so the graph never replays over freed memory.
    """
    held = _CAPTURE_KEEPALIVE.get()
    if held is not None:
        held.append(obj)
    return obj


@dataclass
class _Captured:
    graph: Any
    static_inputs: list[Any]
    static_outputs: Any
    kept_alive: list[Any]


# How many values of the 0-d CPU numbers a step takes (`CudaGraphBuckets.signature`) get graphs of
# their own at one bucket and shapes: past that, a number that changes from call to call (a
# timestep, a scale) runs the step uncaptured instead of capturing, and keeping, a graph per call.
NUMBER_VALUES_CAPTURED = 8

# What captures steps' graphs: None is CUDA graphs, for CUDA tensors only. Tests set a CPU
# stand-in (an object with `capture(fn)` and `replay()`), which lets graphs apply anywhere.
GRAPH_FACTORY: Callable[[], Any] | None = None


def graphs_apply(enabled: bool, device_type: str) -> bool:
    """Whether `Config.cuda_graphs` (`enabled`) captures steps on `device_type` tensors: on CUDA,
    or on any device under a stand-in `GRAPH_FACTORY`."""
    return enabled and (device_type == "cuda" or GRAPH_FACTORY is not None)


def graph_token_dims(gm: Any, token: Any) -> tuple[list[Any], Any]:
    """What `CudaGraphBuckets` needs to know of a graph run as a step: per input (placeholder)
    and per output (a pytree like the graph's outputs), its token dim, `TOKEN_COUNT` when it is
    the token count `token` itself (a symbolic size), or None."""
    import torch.fx as fx

    from ..graph_utils import token_dim

    def dim_of(value: Any) -> Any:
        if isinstance(value, torch.SymInt) and value.node.expr == token:
            return TOKEN_COUNT
        if isinstance(value, torch.SymInt) and value.node.expr.free_symbols == {token}:
            return TokenExpression(value.node.expr, token)
        return token_dim(value, token)

    inputs = [dim_of(n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder"]
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    outputs = fx.node.map_aggregate(output.args[0], lambda a: dim_of(a.meta.get("val")) if isinstance(a, fx.Node) else None)
    return inputs, outputs


class CudaGraphBuckets:
    """Run `step` through captured graphs, one per token bucket and input signature.

    `input_token_dims[i]` is the token dim of argument i (None: no token dim; `TOKEN_COUNT`: the
    argument *is* the token count, an int, as Dynamo passes a symbolic size); the first tensor
    with a token dim gives the call's token count T, and `output_token_dims(outputs)` the token
    dim of each output (a pytree like the outputs; None: none; `TOKEN_COUNT`: the output is the
    token count, an int, which a call returns as T; a `TokenExpression`: an int computed from T,
    which a call returns at T, and as an input is captured at B). A call uses the smallest bucket
    B >= T. A graph is keyed by the bucket *and* everything else that shapes the step: every
    input's shape with its token dim replaced by B, dtypes, every other int input, the value of
    each 0-d CPU tensor (a number a device kernel takes as an argument, fixed at capture) and which
    parameters it gets, so a new batch size or cache length captures anew instead of replaying a
    wrong graph, and so does each layer that runs one graph with its own weights (Dynamo reuses
    a layer's graph, its parameters as inputs, for every layer when a graph break splits it). The graph's
    static inputs receive the call's inputs (rows T..B of each token dim filled with `pad_value`),
    it replays, and every output is cut to T rows along its token dim and cloned (the static
    outputs are overwritten by the next replay).

    Padded rows must not reach real ones (`tileflow.padding_safety` proves it for a compiled
    graph before one is wrapped; true of causal models), and every output must carry the
    token dim: a step with any other output — e.g. a KV cache of past + T rows, where the padding
    would stay — is never captured (logged once) and runs directly, as do a step that writes into
    one of its inputs in place (a replay would update the graph's static copy of it, not the
    caller's tensor), calls above the largest bucket and steps whose capture fails. Parameters
    are referenced, never copied.

    A graph's static inputs and outputs are shared by every call, so calls (from several threads)
    take turns from filling the inputs to copying the outputs. A 0-d CPU number that takes more
    than `NUMBER_VALUES_CAPTURED` values at one bucket and shapes runs its later values uncaptured.

    With `exact`, there is no padding: a call of T tokens, up to the largest bucket, is captured
    at T itself, one graph per token count (for a step whose padded rows could reach real ones).

    `graph_factory()` (default: the module's `GRAPH_FACTORY` when set) returns an object with
    `capture(fn) -> outputs` and `replay()`; without either, the default
    captures a `torch.cuda.CUDAGraph` (CUDA only), every graph in one memory pool. Tests pass a
    CPU stand-in.
    """

    def __init__(
        self,
        step: Callable[..., Any],
        input_token_dims: Sequence[int | str | None],
        buckets: Sequence[int],
        output_token_dims: Callable[[Any], Any],
        *,
        pad_value: int | float = PAD_VALUE,
        graph_factory: Callable[[], Any] | None = None,
        exact: bool = False,
    ) -> None:
        if not buckets or any(b < 1 for b in buckets):
            raise ValueError(f"token buckets must be positive ints, got {list(buckets)}")
        if not any(isinstance(d, int) for d in input_token_dims):
            raise ValueError("CUDA-graph buckets need an input with a token dim")
        self.step = step
        self.input_token_dims = list(input_token_dims)
        self.buckets = sorted(set(int(b) for b in buckets))
        self.output_token_dims = output_token_dims
        self.pad_value = pad_value
        self.exact = exact
        self._pool = None
        self.graph_factory = graph_factory or GRAPH_FACTORY or self._cuda_graph
        self._graphs: dict[tuple, _Captured] = {}
        self._failed: set[tuple] = set()
        # The signatures captured per signature with its numbers' values left out.
        self._number_keys: dict[tuple, set[tuple]] = defaultdict(set)
        self._numbers_logged = False
        # One call at a time fills the static inputs, replays and copies the outputs: another
        # thread's fill between them would hand this call that thread's rows.
        self._lock = threading.Lock()
        self.captures = 0

    def _cuda_graph(self) -> "_CudaGraph":
        # One memory pool for every graph: steps run one at a time.
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return _CudaGraph(self._pool)

    def bucket_for(self, tokens: int) -> int | None:
        """The smallest bucket holding `tokens` (`tokens` itself when `exact`), or None above the
        largest."""
        if self.exact:
            return tokens if 0 < tokens <= self.buckets[-1] else None
        return next((b for b in self.buckets if b >= tokens), None)

    def tokens_of(self, args: Sequence[Any]) -> int:
        """The call's token count."""
        index = next(i for i, d in enumerate(self.input_token_dims) if isinstance(d, int))
        return int(args[index].shape[self.input_token_dims[index]])

    def signature(self, args: Sequence[Any], bucket: int) -> tuple:
        """What a graph for these inputs is keyed by (see the class docstring)."""
        key: list[Any] = [bucket]
        for value, dim in zip(args, self.input_token_dims):
            if dim == TOKEN_COUNT or isinstance(dim, TokenExpression):
                continue  # follows the bucket
            if isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dim() == 0:
                # A number Dynamo passes as a 0-d CPU tensor (a float argument, an eps): a device
                # kernel reads it as an argument when it is launched, so the graph holds the
                # value it was captured with. Keyed by that value.
                key.append(("cpu number", value.dtype, value.item()))
            elif isinstance(value, torch.Tensor):
                shape = list(value.shape)
                if isinstance(dim, int):
                    shape[dim] = bucket
                # A parameter is referenced by the graph, not copied: its identity keys the graph
                # (the graph holds it, so its id is not reused while the key is).
                parameter = id(value) if isinstance(value, torch.nn.Parameter) else None
                key.append((tuple(shape), value.dtype, value.device, parameter))
            elif isinstance(value, (int, float, bool, str)) or value is None:
                key.append(value)
            else:
                key.append(type(value).__name__)
        return tuple(key)

    def __call__(self, *args: Any) -> Any:
        tokens = self.tokens_of(args)
        bucket = self.bucket_for(tokens)
        if bucket is None:
            return self.step(*args)
        key = self.signature(args, bucket)
        if key in self._failed:
            return self.step(*args)
        with self._lock:
            return self._replay(key, bucket, args, tokens)

    def _too_many_numbers(self, key: tuple) -> bool:
        """Whether `key` would be one value too many of its step's 0-d CPU numbers (and is not
        captured); else counts it as captured."""
        numbers = [i for i, part in enumerate(key) if isinstance(part, tuple) and part[:1] == ("cpu number",)]
        if not numbers:
            return False
        without = tuple(part[:2] if i in numbers else part for i, part in enumerate(key))
        seen = self._number_keys[without]
        if len(seen) >= NUMBER_VALUES_CAPTURED:
            if not self._numbers_logged:
                self._numbers_logged = True
                log.warning("a 0-d number input took more than %d values at one token bucket: its new values run "
                            "uncaptured (a graph holds the value it was captured with)", NUMBER_VALUES_CAPTURED)
            return True
        seen.add(key)
        return False

    def _replay(self, key: tuple, bucket: int, args: Sequence[Any], tokens: int) -> Any:
        captured = self._graphs.get(key)
        if captured is None:
            if self._too_many_numbers(key):
                return self.step(*args)
            try:
                captured = self._capture(key, bucket, args, tokens)
            except Exception as exc:  # e.g. a host sync inside the step: it cannot be replayed
                # The step itself may fail on this call's data (an id past a table): then it is
                # no reason the bucket cannot be captured, and the next call tries again.
                result = self.step(*args)
                self._failed.add(key)
                # With the traceback: on CUDA, ending a failed capture can raise again, and the
                # first error (chained under it) is the one that says why.
                log.warning("step not captured for the %d-token bucket (%s: %s); running it uncaptured",
                            bucket, type(exc).__name__, exc, exc_info=exc)
                return result
        for static, value, dim in zip(captured.static_inputs, args, self.input_token_dims):
            if isinstance(static, torch.Tensor) and static is not value and dim != TOKEN_COUNT:
                if isinstance(static, torch.nn.Parameter):
                    raise RuntimeError("a captured step was called with other parameters than at capture; recompile the model")
                self._fill(static, value, dim, tokens)
        captured.graph.replay()
        return self._cut(captured.static_outputs, tokens)

    def _fill(self, static: torch.Tensor, value: torch.Tensor, dim: int | None, tokens: int) -> None:
        if dim is None:
            static.copy_(value)
            return
        static.narrow(dim, 0, tokens).copy_(value)
        static.narrow(dim, tokens, static.shape[dim] - tokens).fill_(self.pad_value)

    def _capture(self, key: tuple, bucket: int, args: Sequence[Any], tokens: int) -> _Captured:
        static_inputs: list[Any] = []
        for value, dim in zip(args, self.input_token_dims):
            if dim == TOKEN_COUNT:
                static_inputs.append(bucket)  # the graph is captured at the bucket's size
                continue
            if isinstance(dim, TokenExpression):
                static_inputs.append(dim.at(bucket))
                continue
            if isinstance(value, torch.nn.Parameter) or not isinstance(value, torch.Tensor):
                static_inputs.append(value)  # weights and Python values: referenced as they are
                continue
            shape = list(value.shape)
            if isinstance(dim, int):
                shape[dim] = bucket
            # Not an inference tensor (even under inference_mode): its version counter tells
            # whether the step writes into it.
            with torch.inference_mode(False):
                static = _empty_in_layout(value, shape)
            self._fill(static, value, dim, tokens)
            static_inputs.append(static)
        versions = [s._version if isinstance(s, torch.Tensor) and not isinstance(s, torch.nn.Parameter) else None
                    for s in static_inputs]
        graph = self.graph_factory()
        kept: list[Any] = []
        token = _CAPTURE_KEEPALIVE.set(kept)
        try:
            static_outputs = graph.capture(lambda: self.step(*static_inputs))
        finally:
            _CAPTURE_KEEPALIVE.reset(token)
        written = [i for i, (s, v) in enumerate(zip(static_inputs, versions)) if v is not None and s._version != v]
        if written:
            raise RuntimeError(
                f"the step writes into inputs {written} in place: a replay would write into the graph's "
                "static copies, never into the caller's tensors, so this step is not captured"
            )
        outputs, dims = self._flat_outputs(static_outputs)
        without = [i for i, (o, d) in enumerate(zip(outputs, dims)) if isinstance(o, torch.Tensor) and d is None]
        if without:
            raise RuntimeError(
                f"outputs {without} have no token dim (e.g. a KV cache of past + new rows): padding "
                "would stay in them, so this step is not captured"
            )
        captured = _Captured(graph, static_inputs, static_outputs, kept)
        self._graphs[key] = captured
        self.captures += 1
        return captured

    def _flat_outputs(self, outputs: Any) -> tuple[list[Any], list[Any]]:
        flat = pytree.tree_leaves(outputs, is_leaf=lambda x: x is None)
        dims = pytree.tree_leaves(self.output_token_dims(outputs), is_leaf=lambda x: x is None)
        if len(dims) != len(flat):
            raise RuntimeError(f"output_token_dims gave {len(dims)} dims for {len(flat)} outputs")
        return flat, dims

    def _cut(self, outputs: Any, tokens: int) -> Any:
        flat, spec = pytree.tree_flatten(outputs, is_leaf=lambda x: x is None)
        _, dims = self._flat_outputs(outputs)
        cut = [tokens if d == TOKEN_COUNT else d.at(tokens) if isinstance(d, TokenExpression)
               else o.narrow(d, 0, tokens) if isinstance(o, torch.Tensor) else o for o, d in zip(flat, dims)]
        # Copied: the static outputs belong to the graph, and the next replay overwrites them.
        return pytree.tree_unflatten(copies_sharing_memory(cut), spec)


def copies_sharing_memory(values: Sequence[Any]) -> list[Any]:
    """A copy of each tensor in `values` (anything else as it is), where tensors over one
    storage, one of which is contiguous and spans what all of them reach (an output and views of
    it, cut to the call's rows), are copied as that span: the copies share memory as the
    originals do (an in-place write to one shows in the other, as in eager), with the same
    strides. Others are cloned one by one (a span whose layout follows the graph's bucket, not
    the call's rows, would keep the bucket's strides and bytes)."""
    groups: dict[tuple[Any, int], list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            groups.setdefault((v.device, v.untyped_storage().data_ptr()), []).append(i)
    out = list(values)
    for members in groups.values():
        tensors = [values[i] for i in members]
        copies = _copy_span(tensors) if len(members) > 1 else None
        for i, copy in zip(members, copies or [t.clone() for t in tensors]):
            out[i] = copy
    return out


def _copy_span(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """Tensors over one storage copied as one span of its bytes (None when none of them is a
    contiguous tensor over the whole span, or an element offset does not fall on its dtype's
    size from the span's start)."""
    starts = [t.storage_offset() * t.element_size() for t in tensors]
    ends = [s + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size() if t.numel() else s
            for s, t in zip(starts, tensors)]
    lo, hi = min(starts), max(ends)
    if any((s - lo) % t.element_size() for s, t in zip(starts, tensors)):
        return None
    if not any(s == lo and e == hi and t.is_contiguous() for s, e, t in zip(starts, ends, tensors)):
        return None
    device = tensors[0].device
    span = torch.empty(0, dtype=torch.uint8, device=device).set_(tensors[0].untyped_storage(), lo, (hi - lo,), (1,))
    storage = span.clone().untyped_storage()
    return [torch.empty(0, dtype=t.dtype, device=device).set_(storage, (s - lo) // t.element_size(), t.shape, t.stride())
            for s, t in zip(starts, tensors)]


def _empty_in_layout(like: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """An uninitialized tensor of `shape` whose dims are laid out in memory in the order of
    `like`'s (a transposed view stays transposed): a step may view its inputs in ways that only
    their layout allows."""
    # Outermost first: larger strides first; equal strides (size-1 dims) keep their order.
    order = sorted(range(like.dim()), key=lambda d: -like.stride(d))
    inverse = [order.index(d) for d in range(like.dim())]
    return torch.empty([shape[d] for d in order], dtype=like.dtype, device=like.device).permute(inverse)


class _CudaGraph:
    """`torch.cuda.CUDAGraph` behind the `capture(fn) / replay()` interface."""

    def __init__(self, pool: Any = None) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn: Callable[[], Any]) -> Any:
        # Warm up on a side stream first (lazy inits and autotuning must not land in the graph).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph, pool=self.pool):
            outputs = fn()
        return outputs

    def replay(self) -> None:
        self.graph.replay()
