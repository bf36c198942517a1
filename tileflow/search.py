"""Nano-batch split search: how many nano-batches, of what sizes, with which SM shares.

The search answers NanoFlow's (shared/seeds/002) parameter question for one step of a model on
one device from the device table alone, so plans are deterministic.

Cost model (per nano-op instance: op `o`, `n` tokens, SM share `s` of its stream)
---------------------------------------------------------------------------------
- compute and memory ops follow a roofline::

      t = max(F / (peak * s), B / (bw * min(1, s / BW_SATURATION_SHARE))) + LAUNCH_OVERHEAD_S
      F = flops_per_token * n,   B = fixed_bytes * reach(n) + bytes_per_token * n

  `reach(n)` is 1 for dense weights (every launch reads all of them). A mixture of experts'
  launch reads only the experts its rows reach: under uniform routing of k of E experts a token
  leaves each expert unread with chance m = 1 - k/E (`weights_missed`), so n tokens reach
  reach(n) = 1 - m^n of the weights on average (uniform routing reaches the most experts, so
  skewed routing reads less).

  `peak` is the device's dense peak for the op's dtype, `bw` its HBM bandwidth. FLOP/s scale
  linearly with the SM share, but bandwidth does not: a memory-bound kernel saturates HBM with a
  minority of the SMs (`BW_SATURATION_SHARE` = 0.4). Without that asymmetry overlap could never
  win (max(C/s, M/(1-s)) >= C + M), and it is exactly what NanoFlow exploits by giving decode
  attention a small SM partition. `fixed_bytes` (weights) is re-read by every nano-batch (a
  mixture of experts' only in part: each nano-batch reaches fewer experts), which together with
  the launch overhead is what makes splitting lose at small token counts.
- network ops (collectives) take `B / net_bw + LAUNCH_OVERHEAD_S`; their SM use is ignored.
- interference: two memory-bound instances (bytes term dominant) that run at the same time on
  different streams share one HBM. The overlapped part of each is stretched by
  `MEMORY_CONTENTION` (1.0: the two split the bandwidth evenly). It is applied once: schedule
  with the roofline times, measure each memory-bound instance's overlap fraction `f` with
  memory-bound instances on other streams, stretch it by `1 + MEMORY_CONTENTION * f`, and
  schedule again (one fixed-point step, deterministic).

Pipeline model (what `makespan` computes)
-----------------------------------------
`ops_profile` is the step's op sequence (one or more layers) as a chain: every nano-batch runs
all ops in order. Nano-batch j has `sizes[j]` tokens. Each resource class has one stream; a
stream runs one instance at a time, with a static SM share (a partition, like NanoFlow's green
contexts / capped grids). Instance (j, i) (op i of nano-batch j) can start when its stream is
free and (j, i-1) has finished. Greedy list scheduling: repeatedly start, among the next op of
each nano-batch, the one with the earliest possible start (ties: lower j). Ops of different
resource classes from different nano-batches thus overlap. An op marked `whole` (one the split
leaves whole: MoE's grouped GEMM, one sequence's attention) is a barrier: it runs once over all
`sum(sizes)` tokens on the whole device, once every nano-batch has reached it, and every
nano-batch's next op waits for it (so the split overlaps only the ops between two barriers, and
a barrier's own time is the same split or not). The makespan is the last finish. k = 1 is the
unsplit baseline: one stream, the whole device, no overlap.

Search
------
Sizes are compositions of `units` equal token units (default 8: sizes in eighths of the step)
into k parts; the compute stream's SM share comes from `sm_shares` (the memory stream gets the
rest). The makespan of a list schedule is not linear in these choices, so instead of a MILP the
search is an exact branch and bound over this small space: a lower bound valid for every
composition of a (k, share) group (each stream's total work, using sum-of-max >= max-of-sums)
prunes whole groups, and a per-candidate bound (stream loads and per-nano-batch chains without
interference) prunes single candidates. It returns the same plan as `brute_force_split`, which
evaluates every candidate; ties are broken by (makespan, k, sizes, share).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import operator
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, combinations
from typing import Any, NamedTuple

from tileflow.devices import DeviceInfo
from tileflow.schedule import DEFAULT_STREAM_OF_RESOURCE, RESOURCES

# Fixed cost of one kernel launch inside a captured graph (CUDA-graph launches are a few us).
LAUNCH_OVERHEAD_S: float = 4e-6
# Fraction of SMs a memory-bound kernel needs to reach full HBM bandwidth (assumption; decode
# attention reaches near-peak bandwidth on a minority of an H100's SMs).
BW_SATURATION_SHARE: float = 0.4
# Stretch of the overlapped part of a memory-bound op per overlapping memory-bound op (1.0:
# bandwidth is split evenly, so overlapping two memory-bound ops gains nothing).
MEMORY_CONTENTION: float = 1.0
# Interconnect bandwidth for network ops when the caller gives none (NVLink-class, GB/s).
DEFAULT_NET_BW_GBS: float = 450.0
# Compute-stream SM shares tried by default; the memory stream gets 1 - share.
DEFAULT_SM_SHARES: tuple[float, ...] = (0.5, 0.625, 0.75, 0.875, 0.9375)
# Token counts above this are not scanned when looking for the split threshold.
MAX_THRESHOLD_TOKENS: int = 1 << 16

_REL_EPS = 1e-9  # slack so floating-point rounding can never make a lower bound prune the optimum


@dataclass(frozen=True)
class OpProfile:
    """Per-op cost inputs for the split search (one entry per op of the step, in order).

    Attributes:
        name: op name (unique within the profile).
        resource: `"compute"`, `"memory"` or `"network"`: which stream runs it when split.
        flops_per_token: FLOPs per token row.
        bytes_per_token: HBM bytes per token row (activations, a decode sequence's KV cache), or
            interconnect bytes per token for a network op.
        fixed_bytes: bytes read once per launch regardless of tokens (weights).
        weights_missed: per token, the chance that a given part of `fixed_bytes` goes unread: 0
            for dense weights (all read every launch); a mixture of experts routing each token
            to k of its E experts leaves each expert's weights unread with chance 1 - k/E, so a
            launch over n tokens reads `fixed_bytes * (1 - weights_missed ** n)` (`weight_bytes`).
        dtype: dtype name selecting the device's peak rate.
        whole: the op runs once over the whole step even when it is split (a barrier: an op the
            split leaves whole, as a mixture of experts' grouped GEMM, whose rows are sorted by
            expert across the step): after every nano-batch's op before it, before any
            nano-batch's op after it, on the whole device (its kernel's grid is not capped).
    """

    name: str
    resource: str
    flops_per_token: float = 0.0
    bytes_per_token: float = 0.0
    fixed_bytes: float = 0.0
    dtype: str = "bfloat16"
    whole: bool = False
    weights_missed: float = 0.0

    def __post_init__(self) -> None:
        if self.resource not in RESOURCES:
            raise ValueError(f"op {self.name!r}: resource {self.resource!r} not in {RESOURCES}")
        costs = (self.flops_per_token, self.bytes_per_token, self.fixed_bytes)
        try:  # numpy scalars and 0-d tensors too: stored as floats (the cache key is JSON)
            if any(isinstance(c, (str, bytes, bool)) for c in costs):
                raise TypeError
            costs = tuple(float(c) for c in costs)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"op {self.name!r}: costs must be numbers, got {costs}") from None
        # `min(nan, ...) < 0` is False, so a NaN cost must be caught explicitly: it would make
        # every makespan NaN and the search return an arbitrary plan.
        if not all(math.isfinite(c) and c >= 0 for c in costs):
            raise ValueError(f"op {self.name!r}: costs must be finite and non-negative, got {costs}")
        if not isinstance(self.whole, bool):
            raise ValueError(f"op {self.name!r}: whole must be a bool, got {self.whole!r}")
        for field_name, cost in zip(("flops_per_token", "bytes_per_token", "fixed_bytes"), costs):
            object.__setattr__(self, field_name, cost)
        try:
            if isinstance(self.weights_missed, (str, bytes, bool)):
                raise TypeError
            missed = float(self.weights_missed)
        except (TypeError, ValueError, RuntimeError):
            missed = math.nan
        if not 0.0 <= missed < 1.0:  # (NaN fails it too)
            raise ValueError(f"op {self.name!r}: weights_missed is a chance per token in [0, 1), got {self.weights_missed!r}")
        object.__setattr__(self, "weights_missed", missed)

    def weight_bytes(self, tokens: float) -> float:
        """The part of `fixed_bytes` a launch over `tokens` tokens reads: all of it for dense
        weights; for a mixture of experts, the experts its tokens reach on average."""
        if tokens <= 0:
            return 0.0
        if self.weights_missed == 0.0:
            return self.fixed_bytes
        return -self.fixed_bytes * math.expm1(tokens * math.log(self.weights_missed))  # fixed * (1 - m^n)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "name": self.name,
            "resource": self.resource,
            "flops_per_token": self.flops_per_token,
            "bytes_per_token": self.bytes_per_token,
            "fixed_bytes": self.fixed_bytes,
            "dtype": self.dtype,
            "whole": self.whole,
            "weights_missed": self.weights_missed,
        }


@dataclass(frozen=True)
class SplitPlan:
    """The chosen nano-batch split of one step.

    Attributes:
        k: number of nano-batches (1 = not split).
        sizes: tokens per nano-batch, in order; they sum to the step's token count.
        stream_of_resource: resource class -> stream id (all 0 when k = 1).
        sm_share_per_stream: stream id -> fraction of the device's SMs (network: 0, not modeled).
        makespan: modeled step time in seconds.
        baseline_makespan: modeled time of the unsplit step (k = 1).
        threshold: smallest token count at which splitting beats not splitting for this model
            and device (None if not computed or never within the scanned range).
    """

    k: int
    sizes: tuple[int, ...]
    stream_of_resource: dict[str, int]
    sm_share_per_stream: dict[int, float]
    makespan: float
    baseline_makespan: float
    threshold: int | None = None

    @property
    def speedup(self) -> float:
        """Baseline makespan / plan makespan."""
        return self.baseline_makespan / self.makespan

    @property
    def compute_share(self) -> float:
        """The compute stream's SM share the plan was built with (1.0 when there was nothing to
        partition: no split, or no compute and memory streams side by side)."""
        stream = self.stream_of_resource.get("compute")
        if self.k == 1 or stream is None or "memory" not in self.stream_of_resource:
            return 1.0
        return self.sm_share_per_stream[stream]

    def ranges(self) -> list[tuple[int, int]]:
        """Token row ranges `[lo, hi)` of the nano-batches (input for `make_schedule`)."""
        out, lo = [], 0
        for size in self.sizes:
            out.append((lo, lo + size))
            lo += size
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "k": self.k,
            "sizes": list(self.sizes),
            "stream_of_resource": dict(self.stream_of_resource),
            "sm_share_per_stream": {str(s): v for s, v in self.sm_share_per_stream.items()},
            "makespan": self.makespan,
            "baseline_makespan": self.baseline_makespan,
            "threshold": self.threshold,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SplitPlan":
        """Inverse of `to_dict`."""
        return cls(
            k=int(data["k"]),
            sizes=tuple(int(s) for s in data["sizes"]),
            stream_of_resource={str(r): int(s) for r, s in data["stream_of_resource"].items()},
            sm_share_per_stream={int(s): float(v) for s, v in data["sm_share_per_stream"].items()},
            makespan=float(data["makespan"]),
            baseline_makespan=float(data["baseline_makespan"]),
            threshold=None if data.get("threshold") is None else int(data["threshold"]),
        )


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------


def op_time(
    op: OpProfile,
    tokens: int,
    share: float,
    device: DeviceInfo,
    *,
    net_bw_gbs: float = DEFAULT_NET_BW_GBS,
) -> tuple[float, bool]:
    """Modeled seconds for `op` on `tokens` rows with SM share `share`, and whether it is
    memory-bound (bytes term dominant; network ops never are). See the module docstring."""
    if tokens <= 0:
        return 0.0, False
    nbytes = op.weight_bytes(tokens) + op.bytes_per_token * tokens
    if op.resource == "network":
        return nbytes / (net_bw_gbs * 1e9) + LAUNCH_OVERHEAD_S, False
    t_flops = op.flops_per_token * tokens / (device.peak_flops(op.dtype) * share)
    t_bytes = nbytes / (device.mem_bw_bytes * min(1.0, share / BW_SATURATION_SHARE))
    return max(t_flops, t_bytes) + LAUNCH_OVERHEAD_S, t_bytes > t_flops


def _streams_and_shares(
    ops: Sequence[OpProfile], k: int, share: float
) -> tuple[dict[str, int], dict[int, float]]:
    """Stream per resource and SM share per stream for a k-way split with compute share (the
    SMs are partitioned between compute and memory ops that split: a whole op runs alone)."""
    present = [r for r in RESOURCES if any(o.resource == r for o in ops)]
    if k == 1:
        return {r: 0 for r in present}, {0: 1.0}
    streams = {r: DEFAULT_STREAM_OF_RESOURCE[r] for r in present}
    both = {"compute", "memory"} <= {o.resource for o in ops if not o.whole}
    shares: dict[int, float] = {}
    for r in present:
        if r == "network":
            shares[streams[r]] = 0.0
        elif both:
            shares[streams[r]] = share if r == "compute" else 1.0 - share
        else:
            shares[streams[r]] = 1.0  # nothing to partition against
    return streams, shares


def _durations(
    ops: Sequence[OpProfile],
    sizes: Sequence[int],
    streams: Mapping[str, int],
    shares: Mapping[int, float],
    device: DeviceInfo,
    net_bw_gbs: float,
) -> tuple[list[list[float]], list[list[bool]]]:
    """Roofline time and memory-boundness of every instance, indexed [op][nano-batch] (a whole
    op's once over the step, the same at every nano-batch's index)."""
    times, bound = [], []
    distinct = sorted(set(sizes))  # (nano-batches are mostly of one or two sizes: each timed once)
    total = sum(sizes)
    # A model's layers repeat the same costs under other op names: each cost is timed once.
    timed_by_cost: dict[tuple, dict[int, tuple[float, bool]]] = {}
    for op in ops:
        cost = (op.resource, op.flops_per_token, op.bytes_per_token, op.fixed_bytes, op.dtype, op.whole, op.weights_missed)
        timed = timed_by_cost.get(cost)
        if timed is None:
            if op.whole:  # (on the whole device: nothing else runs beside a barrier)
                timed = timed_by_cost[cost] = {total: op_time(op, total, 1.0, device, net_bw_gbs=net_bw_gbs)}
            else:
                share = shares[streams[op.resource]]
                timed = timed_by_cost[cost] = {n: op_time(op, n, share, device, net_bw_gbs=net_bw_gbs) for n in distinct}
        at = [total] * len(sizes) if op.whole else sizes
        times.append([timed[n][0] for n in at])
        bound.append([timed[n][1] for n in at])
    return times, bound


def _list_schedule(
    ops: Sequence[OpProfile], k: int, streams: Mapping[str, int], times: list[list[float]]
) -> tuple[list[list[float]], list[list[float]]]:
    """Start and finish of each instance under greedy list scheduling (module docstring).

    Repeatedly schedule, among the next op of every nano-batch, the instance that can start
    earliest (its stream free and its previous op done), ties to the earlier nano-batch. A whole
    op is no candidate: once every nano-batch waits at one (none can pass it before all reach
    it), it runs once, after the last of them, its start and finish shared by all. The frontier
    holds at most k instances, so this is O(k * len(ops) * k)."""
    m = len(ops)
    # (Plain lists and locals: the search runs this hundreds of times per step size, and dict and
    # attribute lookups in the inner loop were most of its time.)
    stream_of = [streams[op.resource] for op in ops]
    whole = [op.whole for op in ops]
    free = [0.0] * (max(stream_of, default=0) + 1)
    start = [[0.0] * k for _ in ops]
    finish = [[0.0] * k for _ in ops]
    nxt = [0] * k
    left = m * k
    while left:
        best_j, best_est = -1, 0.0
        for j in range(k):
            i = nxt[j]
            if i == m or whole[i]:
                continue
            est = free[stream_of[i]]
            if i and finish[i - 1][j] > est:
                est = finish[i - 1][j]
            if best_j < 0 or est < best_est:  # (ties: the earlier nano-batch, j ascending)
                best_j, best_est = j, est
        if best_j < 0:  # every nano-batch waits at the same whole op
            i = nxt[0]
            assert whole[i] and nxt == [i] * k
            # (Every op before it precedes some nano-batch's op i - 1: all streams are free by then.)
            begin = max(free[stream_of[i]], max(finish[i - 1]) if i else 0.0)
            end = free[stream_of[i]] = begin + times[i][0]
            start[i], finish[i], nxt = [begin] * k, [end] * k, [i + 1] * k
            left -= k
            continue
        i = nxt[best_j]
        start[i][best_j] = best_est
        finish[i][best_j] = free[stream_of[i]] = best_est + times[i][best_j]
        nxt[best_j] = i + 1
        left -= 1
    return start, finish


def _modeled_times(
    ops: Sequence[OpProfile], sizes: Sequence[int], share: float, device: DeviceInfo, net_bw_gbs: float,
) -> tuple[dict[str, int], list[list[float]], list[list[float]]]:
    """Stream per resource, and start and finish of every instance [op][nano-batch], including
    the memory-contention step (module docstring)."""
    k = len(sizes)
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in map(_as_int, sizes)):
        # op_time takes a count <= 0 as no work: a negative size made a step cheaper than its
        # whole ((32, -32) beat (64,)), and a fractional one timed rows the timeline cut off.
        raise ValueError(f"nano-batch sizes must be non-negative integers, got {list(sizes)}")
    streams, shares = _streams_and_shares(ops, k, share)
    if any(not shares[streams[o.resource]] > 0 for o in ops if o.resource != "network"):
        # A compute or memory stream without SMs: the roofline would divide by zero.
        raise ValueError(f"share must lie in (0, 1) when compute and memory streams split the SMs, got {share}")
    times, bound = _durations(ops, sizes, streams, shares, device, net_bw_gbs)
    start, finish = _list_schedule(ops, k, streams, times)
    if k > 1 and MEMORY_CONTENTION:
        # Memory-bound intervals per stream, from the contention-free schedule. A stream runs one
        # instance at a time, so its intervals are disjoint: sorted by start, they are sorted by
        # finish too, and the ones overlapping [a, b) are found by bisection.
        per_stream: dict[int, list[tuple[float, float, int]]] = {}
        order = 0
        for i, op in enumerate(ops):
            for j in range(k):
                # (A whole op runs alone: nothing overlaps it, and it overlaps nothing.)
                if bound[i][j] and not op.whole:
                    per_stream.setdefault(streams[op.resource], []).append((start[i][j], finish[i][j], order))
                    order += 1
        for found in per_stream.values():
            found.sort()
        finishes = {t: [q for _, q, _ in found] for t, found in per_stream.items()}
        stretched = [row[:] for row in times]
        for i, op in enumerate(ops):
            s = streams[op.resource]
            for j in range(k):
                if not bound[i][j] or times[i][j] <= 0 or op.whole:
                    continue
                a, b = start[i][j], finish[i][j]
                parts: list[tuple[int, float]] = []
                for t, found in per_stream.items():
                    if t == s:
                        continue
                    # (By index, not a slice: a slice copied the rest of the stream's list each time.)
                    for at in range(bisect_right(finishes[t], a), len(found)):
                        p, q, index = found[at]
                        if p >= b:
                            break
                        parts.append((index, min(b, q) - max(a, p)))
                if not parts:
                    continue
                # Summed in the schedule's order, as a plain sum over every interval would be.
                overlap = parts[0][1] if len(parts) == 1 else sum(v for _, v in sorted(parts))
                stretched[i][j] = times[i][j] * (1.0 + MEMORY_CONTENTION * overlap / (b - a))
        start, finish = _list_schedule(ops, k, streams, stretched)
    return streams, start, finish


def _as_int(value: Any) -> Any:
    """`value` as an int when it is an integer of any kind (numpy's too), else as it is."""
    try:
        return value if isinstance(value, bool) else operator.index(value)
    except TypeError:
        return value


def makespan(
    ops_profile: Sequence[OpProfile],
    sizes: Sequence[int],
    share: float,
    device: DeviceInfo,
    *,
    net_bw_gbs: float = DEFAULT_NET_BW_GBS,
) -> float:
    """Modeled step time for nano-batch `sizes` with compute-stream SM share `share`
    (ignored when k = 1), including the memory-contention step. See the module docstring."""
    _, _, finish = _modeled_times(list(ops_profile), sizes, share, device, net_bw_gbs)
    return max((f for row in finish for f in row), default=0.0)


def modeled_timeline(
    ops_profile: Sequence[OpProfile],
    sizes: Sequence[int],
    share: float,
    device: DeviceInfo,
    *,
    net_bw_gbs: float = DEFAULT_NET_BW_GBS,
) -> list[dict[str, Any]]:
    """Every nano-op of the modeled step as {op, resource, nano_batch, tokens, stream, start_us,
    finish_us}, in start order: the per-stream timeline the visualizer draws. A whole op is one
    entry, its nano_batch None and its tokens the step's."""
    ops = list(ops_profile)
    streams, start, finish = _modeled_times(ops, sizes, share, device, net_bw_gbs)
    entries = [
        {
            "op": op.name, "resource": op.resource, "nano_batch": None if op.whole else j,
            "tokens": int(sum(sizes) if op.whole else sizes[j]),
            "stream": streams[op.resource], "start_us": start[i][j] * 1e6, "finish_us": finish[i][j] * 1e6,
        }
        for i, op in enumerate(ops)
        for j in range(1 if op.whole else len(sizes))
    ]
    return sorted(entries, key=lambda e: (e["start_us"], e["stream"], -1 if e["nano_batch"] is None else e["nano_batch"]))


def _group_bound(
    ops: Sequence[OpProfile], k: int, share: float, n: int, device: DeviceInfo, net_bw: float
) -> float:
    """Lower bound on the makespan of every k-way composition of n tokens at this share.

    Per stream, the sum over nano-batches of max(flops term, bytes term) is at least the max of
    the summed terms; weights are read k times (a mixture of experts' at least as its reach over
    the most uneven sizes, n - k + 1 tokens and k - 1 single ones: reach is concave, so no
    composition reads less); contention only adds time. Nothing runs beside a whole op: their
    times, the same for every composition, add to every stream's load."""
    streams, shares = _streams_and_shares(ops, k, share)
    load: dict[int, float] = {}
    barriers = 0.0
    for op in ops:
        if op.whole:
            barriers += op_time(op, n, 1.0, device, net_bw_gbs=net_bw)[0]
            continue
        s = streams[op.resource]
        nbytes = op.weight_bytes(n - k + 1) + (k - 1) * op.weight_bytes(1) + op.bytes_per_token * n
        if op.resource == "network":
            t = nbytes / (net_bw * 1e9)
        else:
            sh = shares[s]
            t = max(
                op.flops_per_token * n / (device.peak_flops(op.dtype) * sh),
                nbytes / (device.mem_bw_bytes * min(1.0, sh / BW_SATURATION_SHARE)),
            )
        load[s] = load.get(s, 0.0) + t + k * LAUNCH_OVERHEAD_S
    return max(load.values(), default=0.0) + barriers


def _candidate_bound(
    ops: Sequence[OpProfile], sizes: Sequence[int], share: float, device: DeviceInfo, net_bw: float
) -> float:
    """Lower bound for one candidate: max stream load (with the whole ops, beside which nothing
    runs) and max nano-batch chain (through them), no contention."""
    k = len(sizes)
    streams, shares = _streams_and_shares(ops, k, share)
    times, _ = _durations(ops, sizes, streams, shares, device, net_bw)
    load: dict[int, float] = {}
    barriers = 0.0
    for i, op in enumerate(ops):
        if op.whole:
            barriers += times[i][0]
        else:
            load[streams[op.resource]] = load.get(streams[op.resource], 0.0) + sum(times[i])
    chains = [sum(times[i][j] for i in range(len(ops))) for j in range(k)]
    return max(max(load.values(), default=0.0) + barriers, max(chains, default=0.0))


# --------------------------------------------------------------------------------------------
# Candidates, brute force and search
# --------------------------------------------------------------------------------------------


def _unit_sizes(num_tokens: int, units: int) -> list[int]:
    """Split num_tokens into `units` near-equal units (the first ones one larger)."""
    base, extra = divmod(num_tokens, units)
    return [base + (1 if u < extra else 0) for u in range(units)]


def _compositions(num_tokens: int, k: int, units: int) -> list[tuple[int, ...]]:
    """All k-part token sizes whose boundaries fall on unit boundaries (equal split first)."""
    unit = _unit_sizes(num_tokens, units)
    prefix = [0]
    for u in unit:
        prefix.append(prefix[-1] + u)
    out = []
    for cuts in combinations(range(1, units), k - 1):
        bounds = (0, *cuts, units)
        out.append(tuple(prefix[bounds[a + 1]] - prefix[bounds[a]] for a in range(k)))
    equal = [c for c in out if max(c) - min(c) <= max(1, max(unit))]
    return sorted(set(out), key=lambda c: (c not in equal, c))


def _check_options(
    max_nano_batches: int, sm_shares: Sequence[float], units: int, net_bw_gbs: float
) -> tuple[float, ...]:
    """Validate the search options; returns `sm_shares` as a tuple (read once: an iterator
    would be empty by the time the threshold scan reads it again).

    Unchecked, no shares or units <= 0 silently turn splitting off, and net_bw_gbs <= 0 gives
    a division by zero or negative network times."""
    if operator.index(max_nano_batches) < 1:
        raise ValueError(f"max_nano_batches must be >= 1, got {max_nano_batches}")
    if operator.index(units) < 1:
        raise ValueError(f"units must be >= 1, got {units}")
    if not (math.isfinite(net_bw_gbs) and net_bw_gbs > 0):
        raise ValueError(f"net_bw_gbs must be finite and positive, got {net_bw_gbs}")
    shares = tuple(sm_shares)
    if not shares:
        raise ValueError("sm_shares is empty")
    for s in shares:
        if not 0.0 < s < 1.0:
            raise ValueError(f"sm_shares must lie in (0, 1), got {s}")
    return shares


def _check_tokens(num_tokens: int) -> int:
    """num_tokens as a positive int (a float count would give fractional nano-batch sizes)."""
    try:
        n = operator.index(num_tokens)
    except TypeError:
        raise ValueError(f"num_tokens must be an integer, got {num_tokens!r}") from None
    if n <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    return n


def _effective(num_tokens: int, max_nano_batches: int, units: int) -> tuple[int, int]:
    units = max(1, min(units, num_tokens))
    return units, max(1, min(max_nano_batches, units))


def _shares_for(ops: Sequence[OpProfile], k: int, sm_shares: Sequence[float]) -> list[float]:
    """Share candidates that actually differ: one when there is nothing to partition."""
    kinds = {o.resource for o in ops if not o.whole}
    if k == 1 or not {"compute", "memory"} <= kinds:
        return [1.0]
    return sorted(set(float(s) for s in sm_shares))


def _plan(
    ops: Sequence[OpProfile],
    sizes: tuple[int, ...],
    share: float,
    span: float,
    baseline: float,
    threshold: int | None = None,
) -> SplitPlan:
    streams, shares = _streams_and_shares(ops, len(sizes), share)
    return SplitPlan(
        k=len(sizes),
        sizes=sizes,
        stream_of_resource=streams,
        sm_share_per_stream=shares,
        makespan=span,
        baseline_makespan=baseline,
        threshold=threshold,
    )


def _key(span: float, sizes: tuple[int, ...], share: float) -> tuple:
    return (span, len(sizes), sizes, share)


def brute_force_split(
    ops_profile: Sequence[OpProfile],
    device: DeviceInfo,
    num_tokens: int,
    *,
    max_nano_batches: int = 4,
    sm_shares: Sequence[float] = DEFAULT_SM_SHARES,
    units: int = 8,
    net_bw_gbs: float = DEFAULT_NET_BW_GBS,
) -> SplitPlan:
    """Evaluate every candidate (k, sizes, share) and return the best (the test oracle).

    Same candidate space and tie-break as `search_split`, without pruning and without the
    threshold rule."""
    ops = list(ops_profile)
    if not ops:
        raise ValueError("ops_profile is empty")  # as search_split (its plan's speedup would be 0 / 0)
    num_tokens = _check_tokens(num_tokens)
    sm_shares = _check_options(max_nano_batches, sm_shares, units, net_bw_gbs)
    units, kmax = _effective(num_tokens, max_nano_batches, units)
    baseline = makespan(ops, (num_tokens,), 1.0, device, net_bw_gbs=net_bw_gbs)
    best: tuple | None = None
    for k in range(1, kmax + 1):
        for share in _shares_for(ops, k, sm_shares):
            for sizes in _compositions(num_tokens, k, units):
                span = makespan(ops, sizes, share, device, net_bw_gbs=net_bw_gbs)
                key = _key(span, sizes, share)
                if best is None or key < best:
                    best = key
    assert best is not None
    span, _, sizes, share = best
    return _plan(ops, sizes, share, span, baseline)


def _search(
    ops: Sequence[OpProfile],
    device: DeviceInfo,
    num_tokens: int,
    max_nano_batches: int,
    sm_shares: Sequence[float],
    units: int,
    net_bw_gbs: float,
) -> SplitPlan:
    """Exact branch and bound over (k, share, composition); see the module docstring."""
    units, kmax = _effective(num_tokens, max_nano_batches, units)
    baseline = makespan(ops, (num_tokens,), 1.0, device, net_bw_gbs=net_bw_gbs)
    best = _key(baseline, (num_tokens,), 1.0)  # k = 1 is the incumbent
    groups = [
        (_group_bound(ops, k, share, num_tokens, device, net_bw_gbs), k, share)
        for k in range(2, kmax + 1)
        for share in _shares_for(ops, k, sm_shares)
    ]
    for bound, k, share in sorted(groups):
        if bound * (1 - _REL_EPS) > best[0]:
            break  # groups are sorted by bound: none of the rest can win either
        for sizes in _compositions(num_tokens, k, units):
            if _candidate_bound(ops, sizes, share, device, net_bw_gbs) * (1 - _REL_EPS) > best[0]:
                continue
            key = _key(makespan(ops, sizes, share, device, net_bw_gbs=net_bw_gbs), sizes, share)
            if key < best:
                best = key
    span, _, sizes, share = best
    return _plan(ops, sizes, share, span, baseline)


def model_signature(ops_profile: Sequence[OpProfile]) -> str:
    """Stable short hash of a profile: the model part of the search cache key."""
    text = json.dumps([op.to_dict() for op in ops_profile], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_PLAN_CACHE: dict[tuple, SplitPlan] = {}
_THRESHOLD_CACHE: dict[tuple, int | None] = {}


def clear_cache() -> None:
    """Forget cached plans and thresholds (tests; after editing the cost constants)."""
    _PLAN_CACHE.clear()
    _THRESHOLD_CACHE.clear()


def _cached_search(
    ops: tuple[OpProfile, ...], device: DeviceInfo, n: int, opts: tuple
) -> SplitPlan:
    """Plan for exactly n tokens, cached per (model signature, device, n, options): the device
    itself, not its name, since two entries may share a name and differ in their numbers."""
    key = (model_signature(ops), device, n, opts)
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        plan = _PLAN_CACHE[key] = _search(ops, device, n, *opts)
    return plan


def split_threshold(
    ops_profile: Sequence[OpProfile],
    device: DeviceInfo,
    *,
    max_nano_batches: int = 4,
    sm_shares: Sequence[float] = DEFAULT_SM_SHARES,
    units: int = 8,
    net_bw_gbs: float = DEFAULT_NET_BW_GBS,
    max_tokens: int = MAX_THRESHOLD_TOKENS,
) -> int | None:
    """Smallest token count at which the best split beats not splitting, per the cost model.

    Scans powers of two up to `max_tokens` (and `max_tokens` itself) for the first count where a
    split wins, then bisects between it and the count probed before (assuming the win is monotone
    there, which the cost model makes so in practice: weight re-reads and launch overheads are
    amortized as tokens grow).
    None when no split wins up to `max_tokens`. Cached per (model signature, device, options).
    """
    ops = tuple(ops_profile)
    if not ops:
        raise ValueError("ops_profile is empty")
    # Unchecked, max_tokens <= 0 answered None (no split wins) without scanning, and a float one
    # failed deep in the search.
    try:
        count = -1 if isinstance(max_tokens, bool) else operator.index(max_tokens)
    except TypeError:
        count = -1
    if count < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    max_tokens = count
    opts = (max_nano_batches, _check_options(max_nano_batches, sm_shares, units, net_bw_gbs), units, net_bw_gbs)
    key = (model_signature(ops), device, max_tokens, opts)
    if key in _THRESHOLD_CACHE:
        return _THRESHOLD_CACHE[key]

    def wins(n: int) -> bool:
        plan = _cached_search(ops, device, n, opts)
        return plan.k > 1 and plan.makespan < plan.baseline_makespan

    result: int | None = None
    lo, n = 0, 1
    while lo < max_tokens:
        n = min(n, max_tokens)  # past the last power of two, probe max_tokens itself
        if wins(n):
            hi = n
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if wins(mid):
                    hi = mid
                else:
                    lo = mid
            result = hi
            break
        lo, n = n, n * 2
    _THRESHOLD_CACHE[key] = result
    return result


def search_split(
    ops_profile: Sequence[OpProfile],
    device: DeviceInfo,
    num_tokens: int,
    *,
    max_nano_batches: int = 4,
    sm_shares: Sequence[float] = DEFAULT_SM_SHARES,
    units: int = 8,
    net_bw_gbs: float = DEFAULT_NET_BW_GBS,
    apply_threshold: bool = True,
) -> SplitPlan:
    """Choose the nano-batch split of a `num_tokens` step of `ops_profile` on `device`.

    Minimizes the pipeline makespan of the module docstring over k <= `max_nano_batches`,
    sizes on multiples of `num_tokens / units`, and compute-stream SM shares `sm_shares` (the
    memory stream gets the rest). The result equals `brute_force_split`. With
    `apply_threshold`, a step below `split_threshold(...)` tokens is never split (k = 1), so an
    isolated small count where the model predicts a marginal win does not split either; when
    no split wins anywhere in the threshold's scanned range (threshold None), a step within
    that range is not split and a larger one follows its plan.

    `num_tokens` is expected to be a token bucket (the runtime captures one graph per bucket);
    results are cached per (model signature, device, bucket, options).
    """
    num_tokens = _check_tokens(num_tokens)
    sm_shares = _check_options(max_nano_batches, sm_shares, units, net_bw_gbs)
    ops = tuple(ops_profile)
    if not ops:
        raise ValueError("ops_profile is empty")
    opts = (max_nano_batches, sm_shares, units, net_bw_gbs)
    plan = _cached_search(ops, device, num_tokens, opts)
    if not apply_threshold:
        # A copy: the cached plan is shared, and a caller's edit of its dicts would change later answers.
        return dataclasses.replace(plan, stream_of_resource=dict(plan.stream_of_resource),
                                   sm_share_per_stream=dict(plan.sm_share_per_stream))
    threshold = split_threshold(
        ops,
        device,
        max_nano_batches=max_nano_batches,
        sm_shares=sm_shares,
        units=units,
        net_bw_gbs=net_bw_gbs,
    )
    # None says only that no split won up to MAX_THRESHOLD_TOKENS, the scanned range; above it
    # the step's own plan decides (treating None as "never" kept large steps whole even where
    # their plan wins).
    whole = num_tokens <= MAX_THRESHOLD_TOKENS if threshold is None else num_tokens < threshold
    if whole:
        base = plan.baseline_makespan
        return _plan(ops, (num_tokens,), 1.0, base, base, threshold)
    return _plan(
        ops, plan.sizes, plan.compute_share, plan.makespan, plan.baseline_makespan, threshold
    )


def power_of_two_bucket(count: int) -> int:
    """The power of two at or above `count` (1 for counts below 1): the counts "auto" searches
    at, and the sizes its costs are taken at."""
    return 1 << (max(count, 1) - 1).bit_length()


class CountSplit(NamedTuple):
    """The split `split_for_count` runs a count with: the nano-batch sizes (summing to the
    count), the SM share per stream, and the compute stream's share (`SplitPlan.compute_share`)."""

    sizes: list[int]
    sm_share_per_stream: dict[int, float]
    compute_share: float


def split_for_count(
    ops_profile: Sequence[OpProfile],
    device: DeviceInfo,
    count: int,
    *,
    net_bw_gbs: float = DEFAULT_NET_BW_GBS,
    snap: Callable[[list[int]], list[int]] | None = None,
    check_profile: Sequence[OpProfile] | None = None,
) -> CountSplit | None:
    """The split a step of `count` units (tokens, or sequences) runs under `nano_batches="auto"`,
    or None to run it whole.

    The search runs once per power-of-two bucket of the count (`search_split`, cached), not per
    count: it takes a fraction of a second for a deep model, on the step's critical path. A count
    runs its bucket's split, its cuts scaled to the count, where that beats running whole at the
    count (`split_wins`); else the split of the bucket below, scaled up (the bucket's best shape
    can lose just above a power of two: four equal parts of 1024 rows scaled to 513, where 512's
    two parts win); else it runs whole. So a count splits exactly where the model says the split
    it runs wins there, a count below the search's split threshold too, where the threshold's
    scan (which assumes the win grows with the count) put it above a count that wins. The
    buckets are searched unthresholded: a power of two whose split wins is at or above the
    threshold anyway, being one of the scan's probes, and placing the count itself against the
    threshold would cost the scan's bisection.

    Units that are not interchangeable (a serving step's entries, which stay whole) give `snap`:
    sizes -> the sizes the cuts can have (summing to the count; fewer of them where cuts merge).
    The split runs as snapped, and is checked again where snapping moved its cuts. A caller that
    searches at costs rounded so that its steps share searches gives the step's own costs as
    `check_profile`: every split is then checked on those. With either, a split checked and
    refused falls to the bucket below's at a power of two too (else the bucket's own search
    already weighed every split the bucket below's could give it), then to running whole."""
    if count < 2:
        return None  # nothing to split (and no bucket below 1 to search)
    bucket = power_of_two_bucket(count)
    found = _scaled_split(ops_profile, device, count, bucket, net_bw_gbs, snap, check_profile)
    if found is None and (count != bucket or snap is not None or check_profile is not None):
        found = _scaled_split(ops_profile, device, count, bucket // 2, net_bw_gbs, snap, check_profile)
    return found


def _scaled_split(ops_profile: Sequence[OpProfile], device: DeviceInfo, count: int, searched_at: int,
                  net_bw_gbs: float, snap: Callable[[list[int]], list[int]] | None,
                  check_profile: Sequence[OpProfile] | None) -> CountSplit | None:
    """The split searched at `searched_at` units, its cuts scaled to `count` (and snapped), with
    its SM shares: None where it does not split, or its split as run differs from the searched
    one (or is checked on other costs) and does not beat running whole at the count."""
    plan = search_split(ops_profile, device, searched_at, apply_threshold=False, net_bw_gbs=net_bw_gbs)
    if plan.k == 1:
        return None
    cuts = [round(c * count / searched_at) for c in accumulate(plan.sizes)]
    sizes = [b - a for a, b in zip([0] + cuts, cuts) if b > a]
    if snap is not None:
        sizes = list(snap(sizes))
    if len(sizes) < 2:
        return None
    moved = count != searched_at or sizes != list(plan.sizes) or check_profile is not None
    checked = ops_profile if check_profile is None else check_profile
    if moved and not split_wins(checked, device, sizes, plan.compute_share, net_bw_gbs=net_bw_gbs):
        return None
    return CountSplit(sizes, {s: v for s, v in plan.sm_share_per_stream.items() if v > 0}, plan.compute_share)


def split_wins(
    ops_profile: Sequence[OpProfile],
    device: DeviceInfo,
    sizes: Sequence[int],
    share: float,
    *,
    net_bw_gbs: float = DEFAULT_NET_BW_GBS,
) -> bool:
    """Whether running a step of `sum(sizes)` tokens as these nano-batches, the compute stream at
    SM share `share`, beats running it whole, per the cost model (`makespan`).

    `split_for_count` asks it of a count's power-of-two bucket's plan (or the bucket below's)
    scaled to the count: the split it would run there."""
    if len(sizes) < 2:
        return False
    whole = makespan(ops_profile, (sum(sizes),), 1.0, device, net_bw_gbs=net_bw_gbs)
    return makespan(ops_profile, sizes, share, device, net_bw_gbs=net_bw_gbs) < whole
