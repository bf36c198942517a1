"""How the serving engine cuts a step into nano-batches: a fixed count, or `"auto"`.

A serving step is a list of entries (a request's decode token, its verify tokens, or a prompt
chunk) that stay whole: a sequence's queries attend together. `split_entries` cuts them into k
groups of about equal token counts; `split_entries_at` cuts them as near given token sizes as
entry boundaries allow.

`"auto"` (`AutoSplit`) asks the split search's cost model (`tileflow.search`) whether and where
to cut each step: the step's ops as the search's profile, per token row, in stage order (each
dense stage's padded and grouped GEMMs, `StageProgram.dense_costs`; each attention stage's cost averaged
over the step's rows), and `search.split_for_count` on the step's token count, with the cuts
moved to entry boundaries before the model checks that the split still wins. The model has a
stream per resource class (GEMMs on one, attention on another, at the SM shares it chose), and
the engine runs a split step on those streams, each stage at its stream's share, in turn by
nano-batch (the model orders single GEMMs by when each can start, so the two orders may differ
where the nano-batches are uneven). A fixed k instead runs each nano-batch on its own stream
at its token share (`sm_shares`). Both overlap one nano-batch's attention with another's
GEMMs; the model is the estimate of when that pays. A
mixture of experts' grouped GEMMs run per nano-batch here, each reading the weights of the
experts its tokens reach (`OpProfile.weights_missed`). A program whose dense stages hold no
padded GEMM (built without the GEMM pass) has nothing to cost: its steps run whole.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from bisect import bisect_left
from itertools import accumulate
from typing import Any, Sequence

from tileflow.passes.disaggregate import StageProgram
from tileflow.passes.nanobatch import AttentionCost
from tileflow.search import CountSplit, OpProfile, split_for_count

from .scheduler import Entry


def split_entries(entries: Sequence[Entry], parts: int) -> list[list[Entry]]:
    """Cut a step's entries (in order) into at most `parts` contiguous, non-empty nano-batches of
    about equal token counts. Entries stay whole, so a sequence's tokens stay together; the
    scheduler puts decode/verify entries first and prompt chunks last, so the cut tends to put
    memory-bound decodes and compute-bound prefills in different nano-batches."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if not entries:
        return []  # no entries, no nano-batch (not one empty one)
    total = sum(len(e.tokens) for e in entries)
    groups: list[list[Entry]] = [[]]
    done = 0  # tokens in the groups so far
    for i, entry in enumerate(entries):
        still_to_open = min(parts, len(entries)) - len(groups)
        # Open the next group once this one holds its share, or when each entry left must
        # start a group of its own for every group to get one.
        if groups[-1] and still_to_open > 0 and (done >= total * len(groups) / parts or len(entries) - i <= still_to_open):
            groups.append([])
        groups[-1].append(entry)
        done += len(entry.tokens)
    return groups


def split_entries_at(entries: Sequence[Entry], sizes: Sequence[int]) -> list[list[Entry]]:
    """Cut a step's entries (in order) into contiguous, non-empty nano-batches whose token counts
    come as near `sizes` as whole entries allow: each cut the sizes make moves to the nearest
    entry boundary or end of the step (the earlier of two as near). A cut that moves to an end
    is dropped, and cuts that move to one boundary are one: a step of one long prompt chunk
    stays whole. Cut at the token counts of its own result, a step gives that result again."""
    if any(s < 0 for s in sizes) or sum(sizes) != sum(len(e.tokens) for e in entries):
        raise ValueError(f"sizes {list(sizes)} must be non-negative and sum to the entries' "
                         f"{sum(len(e.tokens) for e in entries)} tokens")
    if not entries:
        return []
    bounds = [0, *accumulate(len(e.tokens) for e in entries)]  # token offset before entry i (and the end)
    cuts: set[int] = set()  # indices into `entries` where a new nano-batch starts
    for target in list(accumulate(sizes))[:-1]:
        at = bisect_left(bounds, target)
        # The nearer of the offsets either side of the target (ties: the earlier).
        best = min((i for i in (at - 1, at) if 0 <= i < len(bounds)), key=lambda i: (abs(bounds[i] - target), i))
        if 0 < best < len(entries):
            cuts.add(best)
    starts = [0] + sorted(cuts)
    return [list(entries[a:b]) for a, b in zip(starts, starts[1:] + [len(entries)])]


def sm_shares(groups: Sequence[Sequence[Entry]]) -> list[float]:
    """Each nano-batch's share of the device's SMs, summing to 1: its share of the step's tokens,
    raised to at least half an equal share (a nano-batch of a few decodes still reads its whole
    KV), then all scaled back to a whole device."""
    tokens = [sum(len(e.tokens) for e in g) for g in groups]
    total = sum(tokens)
    raised = [max(t / total, 0.5 / len(groups)) for t in tokens]
    return [r / sum(raised) for r in raised]


def _power_of_two_at_least(value: float) -> float:
    """The power of two at or above `value` (0 stays 0)."""
    if value <= 0:
        return 0.0
    mantissa, exponent = math.frexp(value)  # value = mantissa * 2**exponent, 0.5 <= mantissa < 1
    return math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent)


def _sixteenth_at_least(value: float) -> float:
    """`value` rounded up to a sixteenth of the power of two below it (at most 1/16 above it; 0
    stays 0)."""
    if value <= 0:
        return 0.0
    step = math.ldexp(1.0, math.frexp(value)[1] - 5)
    return math.ceil(value / step) * step if step > 0 else value  # (a subnormal's step underflows)


def _keys_at_least(keys: int) -> int:
    """`keys` rounded up to a sixteenth of the power of two below it (exact below 32)."""
    shift = max(keys.bit_length() - 5, 0)
    return -(-keys >> shift) << shift


class AutoSplit:
    """`nano_batches="auto"` for a stage program on a device: `split(entries)` gives the step's
    nano-batches, one group where the cost model says a split does not win (see the module
    docstring).

    A step's attention costs come from its entries: an entry of q_len n with kv_len L (its n new
    tokens' keys counted) costs its n rows as `AttentionCost` says for n queries over L keys; a
    decode's L rounded up by at most 1/16 (its cache grows by one each step: it is costed again
    only when it crosses a sixteenth), and under chunked attention the position within its
    chunk, exactly (what a row sees). The average per row over the step, rounded up by at
    most 1/16 too, is the profile's attention op: the profile is the step's, its attention
    overstated by at most about 1/8.

    The search runs on that profile with the attention costs rounded up to powers of two (few
    distinct profiles, so the search's cache serves most steps), and every split it offers must
    win on the step's own profile (`split_for_count`'s `check_profile`, its attention at most
    1/8 above the step's exact cost): one that wins only at the rounded costs falls to the
    bucket below's, then to running whole (though another split, searched at the step's own
    costs, might win: the price of searching once per power of two). The answer is kept per
    (the entries' token counts, the step's attention costs)."""

    # Answers kept (the oldest dropped past this many): the steps of a serving run repeat a few
    # shapes, and each kept answer is a few small tuples.
    MAX_KEPT = 4096

    def __init__(self, program: StageProgram, device: Any) -> None:
        self.program = program
        self.device = device
        # Per stage: its GEMMs' costs, named by stage (a dense stage), or its cut's cost key.
        self._stages: list[tuple[Any, ...]] = []
        self._dense: list[bool] = []
        dense = iter(getattr(program, "dense_costs", None) or [[] for _ in program.dense])
        for i, stage in enumerate(program.stages):
            if stage.kind == "dense":
                self._stages.append(tuple(dataclasses.replace(c, name=f"stage{i}.{c.name}") for c in next(dense, [])))
            else:
                cut = stage.cut
                self._stages.append((cut.num_q_heads, cut.num_kv_heads, cut.head_dim, cut.sliding_window,
                                     cut.attention_chunk, cut.dtype.itemsize, str(cut.dtype).removeprefix("torch.")))
            self._dense.append(stage.kind == "dense")
        self._kinds = list(dict.fromkeys(s for d, s in zip(self._dense, self._stages) if not d))
        # Whether the dense stages hold any GEMM to cost (a program built without the GEMM pass has none).
        self.costed = any(d and s for d, s in zip(self._dense, self._stages))
        # Why every step runs whole from now on: the cost model failed (a device entry without
        # the program's dtype's peak); None while it works.
        self.refused: str | None = None
        self._kept: dict[tuple, CountSplit | None] = {}

    def split(self, entries: Sequence[Entry]) -> tuple[list[list[Entry]], dict[int, float] | None]:
        """The step's nano-batches (one: run it whole) and the SM share per stream the search
        costed them with (None when whole)."""
        if len(entries) < 2 or not self.costed or self.refused is not None:
            return [list(entries)], None
        attention = self._attention_costs(entries)
        sizes = tuple(len(e.tokens) for e in entries)
        key = (sizes, tuple(attention.items()))
        if key not in self._kept:
            rounded = {kind: tuple(map(_power_of_two_at_least, cost)) for kind, cost in attention.items()}
            profile, check = self._profile(rounded), self._profile(attention)
            try:
                found = split_for_count(profile, self.device, sum(sizes), check_profile=check, snap=lambda cuts: [
                    sum(len(e.tokens) for e in group) for group in split_entries_at(entries, cuts)])
            except ValueError as exc:  # raised by the device table, e.g. no peak for the program's dtype
                self.refused = f"the cost model failed: {exc}"
                return [list(entries)], None
            if len(self._kept) >= self.MAX_KEPT:
                self._kept.pop(next(iter(self._kept)))  # (the oldest)
            self._kept[key] = found
        found = self._kept[key]
        if found is None:
            return [list(entries)], None
        return split_entries_at(entries, found.sizes), found.sm_share_per_stream

    def step_costs(self, entries: Sequence[Entry]) -> list[OpProfile]:
        """The split search's profile of a step of these entries, per token row, in stage order
        (its attention as `split` costs it, before the rounding to powers of two)."""
        return self._profile(self._attention_costs(entries))

    def _attention_costs(self, entries: Sequence[Entry]) -> dict[tuple, tuple[float, float]]:
        """Per kind of attention stage (its cost key), the step's (FLOPs, bytes) per row, each
        rounded up by at most 1/16."""
        total = sum(len(e.tokens) for e in entries)
        found: dict[tuple, tuple[float, float]] = {}
        for kind in self._kinds:
            chunk = kind[4]
            rows: dict[tuple[int, int], int] = {}  # (q_len, keys) -> entries
            for e in entries:
                n = len(e.tokens)
                # Under chunks a row sees its chunk's keys: the position within the chunk is what
                # costs (shifting every position by whole chunks changes nothing). A decode's keys
                # are rounded up (each row of a longer entry would see the added keys too, a
                # larger share of what its first rows see).
                keys = e.start % chunk + n if chunk else _keys_at_least(e.start + n) if n == 1 else e.start + n
                rows[n, keys] = rows.get((n, keys), 0) + 1
            flops = nbytes = 0.0
            for (n, keys), count in rows.items():
                row = _attention_row_cost(kind, n, keys)
                flops += row.flops_per_token * n * count
                nbytes += row.bytes_per_token * n * count
            found[kind] = (_sixteenth_at_least(flops / total), _sixteenth_at_least(nbytes / total))
        return found

    def _profile(self, attention: dict[tuple, tuple[float, float]]) -> list[OpProfile]:
        """The step's profile from its attention costs per kind of stage."""
        costs: list[OpProfile] = []
        for i, (is_dense, stage) in enumerate(zip(self._dense, self._stages)):
            if is_dense:
                costs.extend(stage)
            else:
                flops, nbytes = attention[stage]
                costs.append(OpProfile(f"stage{i}.attention", "memory", flops, nbytes, 0.0, stage[-1]))
        return costs


@functools.lru_cache(maxsize=16384)
def _attention_row_cost(kind: tuple[Any, ...], rows: int, keys: int) -> OpProfile:
    """Per query row: the attention cost of `rows` queries over `keys` keys (the newest `rows`
    of them the queries' own) for an attention stage's cost key (`AutoSplit`: heads, KV heads,
    head size, window, chunk, element size, dtype)."""
    heads, kv_heads, head_dim, window, chunk, element_size, dtype = kind
    return AttentionCost("attention", heads, kv_heads, head_dim, rows, keys, True, window, chunk, element_size,
                         dtype).at({})
