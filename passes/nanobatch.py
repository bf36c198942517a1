"""nanobatch: split a step's token dimension into nano-batches with a stream schedule (NanoFlow).

Inside one device, compute-bound GEMMs, memory-bound attention and network collectives overlap
when the batch is split into nano-batches whose operations run concurrently on streams. This pass
decides which ops split and how they depend on each other; `tileflow.runtime.nanobatch` runs the
schedule.

An op is *token-wise* when each row of its output (along the token dimension) reads only the same
row of its token-carrying inputs: elementwise ops, GEMMs (`padded_gemm`, `linear`, `mm` on the
rows), norms and softmaxes over other dims, embeddings, layout ops that keep the token
dimension whole, the ops routers and RoPE write per row (top-k, gathers and scatters off the
token dim, slice writes off it or of every row, fills shaped as a row, complex views), a batched
expert GEMM over `[E, T, K]` (along its T), and tensor parallelism's collectives: all-reduces
(element by element over the ranks), and gathers and reduce-scatters off the token dim.
Token-wise ops run once per
nano-batch over its rows; every other op (attention over one sequence, anything reading across
tokens) runs once over all rows, after the nano-ops it reads. Each nano-op depends only on the
producer nano-ops whose rows it reads, never on a global barrier
(`tileflow.schedule.build_dependencies`). A mixture of experts' routing (its sort, gathers,
grouped GEMMs and unsort) reads across tokens op by op, but as a whole computes each token's rows
from that token's alone: where `tileflow.routing` proves that, its every op runs per nano-batch
over the nano-batch's own tokens (its own sort and counts), and the report lists those experts
(`routed_experts`); else the report says which op stopped the proof, and it runs whole.
Resource classes: GEMMs compute, attention memory, collectives network; the light ops go with
the GEMMs on the compute stream.
The search's cost per token row: a GEMM's FLOPs and bytes, and its weights once per launch;
attention's share of its sequence's K/V and its FLOPs per key seen (`_attention_profile`); a
collective's bytes over the interconnect; a routed grouped GEMM's per routed row, k of them a
token, and of its experts' weights those a nano-batch's tokens reach (`_routed`; a batched one's
per row in each expert's block, every expert's weights). Over sequences (below) a unit is a
sequence: its rows' costs times its rows. A heavy op
that runs whole (MoE's grouped GEMM where its routing is not proven, one sequence's attention,
the head over the last token's row) is a barrier in the search's model (`OpProfile.whole`),
costed per unit by its rows over the count (its time is the same split or not: where it stands
decides), and the runtime launches it over the whole device. Costs are taken at each call's
sizes (a decode step's cache length changes every call), each size rounded up to its power of
two (`NanoBatchPlan.costs_at`).

A batch of several sequences (`[B, S]` ids, both sizes symbolic) has no token dim in its GEMMs,
whose rows are `B*S`: the step splits over whole sequences instead (`_batch_symbol`), each
nano-batch some of the B sequences. A value's split dim is then the one whose size is B times an
expression of the input sizes (its rows per sequence: 1, or S for the GEMMs' rows; the runtime
cuts it at multiples of that), and attention is token-wise too (each sequence attends to its own
keys). The token symbol stays what CUDA graphs bucket. A decode step over a cache (`[B, 1]` ids,
queries `[B, H, 1, D]`, the cache's length other symbols) has no token symbol; it splits over its
sequences alike, its cache and mask rows along B, and CUDA graphs capture it as unsplit: not at
all (no token symbol to bucket).

`Config.nano_batches`: 1 leaves the graph alone; an integer k >= 2 forces a k-way split of every
step (k is capped by the token or sequence count); `"auto"` lets `tileflow.search` choose k and
the sizes per token (or sequence) count from the device table: a count runs the split its
power-of-two bucket's search found (or the bucket below's), scaled to it, where that beats
running whole at the count. The pass annotates each node (`node.meta["tileflow"]["nano"]`),
puts the plan on the graph module and the schedule for the example token count in the report
(kind `nano_batch`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from tileflow.graph_utils import (
    ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER, SIZED_BY_ARGUMENT, WAIT_TENSOR, bind_arguments, graph_structure,
    is_view_op, meta_val, op_name, size_hint, token_dim, traced_contiguous, written_arguments,
)
from tileflow.pipeline import PassContext, PassResult, register_pass
from tileflow.routing import find_routed_regions
from tileflow.schedule import DEFAULT_STREAM_OF_RESOURCE, OpEdge, OpSpec, Schedule, check_schedule, make_schedule
from tileflow.search import OpProfile, modeled_timeline, power_of_two_bucket, split_for_count

aten = torch.ops.aten

# Everything else is compute-bound. grouped_gemm (MoE experts) is never token-wise by itself: its
# rows are sorted by expert and its offsets cover all of them (or, batched, each expert's block
# holds every token). The routing around it, as a whole, may be (`tileflow.routing`): then it runs
# per nano-batch; else once over every row (the split search costs it as a barrier, `whole`).
_MEMORY_OPS = {"meta_attention", "meta_attention_varlen", "scaled_dot_product_attention"}
_NETWORK_PREFIXES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
# Layout ops that keep rows intact (the token dim may move, never merge).
_LAYOUT = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.expand.default, aten.clone.default, aten._to_copy.default, aten.alias.default, aten.detach.default,
}
# Of _LAYOUT, those that may merge or split dims (the rest move or keep them).
_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
# Ops reading along one dim (args[1]); token-wise when that dim is not the token dim.
_ALONG_DIM = {
    aten.slice.Tensor, aten.select.int, aten._softmax.default, aten.softmax.int, aten._log_softmax.default,
    aten.cat.default,
}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
# Ops returning several tensors that all keep the input's rows at one token dim (LayerNorm's
# output, mean and rstd; a split along another dim, GPT-2's fused q/k/v; a router's top-k experts
# per token): their tuple's pieces are tuples, which the ops' getitems pick from per nano-batch.
_ROW_TUPLES = {aten.native_layer_norm.default, aten.split.Tensor, aten.split_with_sizes.default, aten.topk.default,
               aten.sort.default, aten.max.dim, aten.min.dim}
# The ones among them that select or order along one dim (default -1; max and min: a required dim).
_SELECT_ALONG = {aten.topk.default: (2, -1), aten.sort.default: (1, -1), aten.max.dim: (1, None),
                 aten.min.dim: (1, None)}
# New tensors shaped as their input (a router's `full_like(logits, -inf)`): row by row.
_FILLED_LIKE = {aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.empty_like.default}
# New tensors of a given size (`x.new_empty([1, H, T, D])`): the runtime sets the token dim's size
# per nano-batch, as a view's (`SIZED_BY_ARGUMENT`).
_NEW_OF_SIZE = {aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default}
# Elementwise ops without torch's pointwise tag (a functional copy broadcasts its source into its
# destination's shape; Llama-4's RoPE makes its factors with `polar`, its chunks with `//`).
_UNTAGGED_POINTWISE = {aten.copy.default, aten.floor_divide.default, aten.polar.default}
# Ops reading or writing along `dim` through an index of the same rank; per row when `dim` is not
# the token dim (a router's weights of its chosen experts, the -inf logits of the rest).
_INDEXED_ALONG = {aten.gather.default, aten.scatter.src, aten.scatter.value, aten.scatter_add.default,
                  aten.scatter_reduce.two}
# Tensor parallelism's collectives (`tileflow.graph_utils`). An all-reduce reduces each element
# over the ranks, so a row of its output reads only that row of every rank's input: it splits
# per nano-batch like an elementwise op, and nano-batch i's reduction can run beside nano-batch
# i + 1's GEMMs (NanoFlow's network stream); the wait returns the reduced tensor itself. A gather
# and a reduce-scatter act along dim 0: so too when the tokens lie along another dim (a
# `[1, T, N]` projection gathered over the ranks); along dim 0 their output holds p * T or T / p
# rows, no token dim, and they stay whole. Every rank must split a step alike, so that their
# collectives pair up: the split is a function of the token count and the device table, the
# same on every rank of a group of one device kind.
_TOKENWISE_COLLECTIVES = {op for op in (ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, WAIT_TENSOR) if op is not None}
# The ones that move data over the interconnect (the split search costs them).
_MOVING_COLLECTIVES = {op for op in (ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER) if op is not None}


def resource_of(node: fx.Node) -> str:
    """compute (GEMMs and the light ops beside them), memory (attention) or network."""
    name = op_name(node)
    if name in _MEMORY_OPS:
        return "memory"
    if name.startswith(_NETWORK_PREFIXES):
        return "network"
    return "compute"


@dataclass(frozen=True)
class AttentionCost:
    """Attention's cost inputs with its query and key counts kept as expressions of the input
    sizes: its cost per query row depends on how many keys it sees, and in a decode step that is
    the cache's length, known only per call (the length the graph was traced at, often the
    prompt's at the first decode step, says little about a server's long caches). `at` gives the
    `OpProfile` for given sizes (`_attention_profile` explains the costs)."""

    name: str
    heads: int
    kv_heads: int
    head_dim: int
    rows: Any  # query rows per sequence: an int, or a sympy expression of the input size symbols
    keys: Any  # keys per sequence, alike
    causal: bool
    window: int | None
    chunk: int | None
    element_size: int
    dtype: str
    whole: bool = False  # (as `OpProfile.whole`: it runs once over the step, a sequence's prefill)

    resource = "memory"  # (as `OpProfile.resource`: the stream attention runs on when split)

    @property
    def symbols(self) -> frozenset[Any]:
        """The size symbols its counts depend on."""
        return frozenset().union(*(getattr(e, "free_symbols", frozenset()) for e in (self.rows, self.keys)))

    def at(self, values: dict[Any, int]) -> OpProfile:
        """The cost per query row when the input size symbols take `values` (a count that is
        empty, or holds a symbol `values` lacks, counts as 1: the least a row can read)."""
        rows, keys = (_evaluated(e, values) or 1 for e in (self.rows, self.keys))
        seen, read = _keys_seen(rows, keys, self.causal, self.window, self.chunk)
        kv_bytes = self.element_size * 2 * self.kv_heads * self.head_dim * read / rows
        return OpProfile(self.name, "memory", 4.0 * self.heads * self.head_dim * seen,
                         kv_bytes + 2 * self.element_size * self.heads * self.head_dim, 0.0, self.dtype, self.whole)


def _evaluated(expr: Any, values: dict[Any, int]) -> int | float | None:
    """`expr` (an int or a sympy expression) at `values`, an int where it is one (a ratio of
    sizes may not be); None when a symbol has no value."""
    if isinstance(expr, int):
        return expr
    if not expr.free_symbols <= values.keys():
        return None
    value = sympy.sympify(expr.xreplace(values))
    return int(value) if value.is_integer else float(value)


@dataclass
class NanoBatchPlan:
    """What the runtime needs: per node its output token dim and whether it splits, the op graph
    for `make_schedule`, where to read the token count from the inputs, and the k setting."""

    setting: str | int
    # (placeholder index, dim) holding the token count; None: a decode step over a cache, split over
    # its sequences, whose token count is no input size symbol (CUDA graphs capture no such step).
    token_input: tuple[int, int] | None
    token_dims: dict[str, int | None]
    split: dict[str, bool]
    specs: list[OpSpec]
    edges: list[OpEdge]
    # The heavy ops' costs per row (`_profile`); attention's as an `AttentionCost`, evaluated at
    # each call's sizes (see `costs_at`).
    profile: list[OpProfile | AttentionCost] = field(default_factory=list)
    device: Any = None
    graph: str = ""  # `graph_structure` of the graph the plan splits (a later pass may change it)
    # Split over whole sequences (`_batch_symbol`): where to read the sequence count, which the
    # sizes and schedule rows count (None: the token count at `token_input`, which CUDA graphs
    # bucket either way). A split value's dim then holds `row_scales[name]` rows per sequence (an
    # expression in the input symbols at `symbol_inputs`; absent: 1), as a GEMM's `B*S` rows do.
    split_input: tuple[int, int] | None = None
    row_scales: dict[str, Any] = field(default_factory=dict)
    # A mixture of experts' routing run per nano-batch (`tileflow.routing`): each of these nodes
    # computes a nano-batch's value from that nano-batch's own values alone (the rows of its
    # tokens, `row_scales` of them a token; its own counts), so a reader takes exactly its piece.
    routed: frozenset[str] = frozenset()
    # A whole op's rows per unit of the split (its rows over the count's symbol, an expression in
    # the input symbols; 0 where its rows are no such expression: a barrier without costs per
    # unit). Absent: its costs are per unit already. A barrier's time is the same split or not,
    # so this sizes it in the report's timeline and the plans' makespans, not the split chosen.
    whole_rows: dict[str, Any] = field(default_factory=dict)
    # Each input size symbol: where to read it, and its value at the graph's example sizes.
    symbol_inputs: dict[Any, tuple[int, int]] = field(default_factory=dict)
    example_values: dict[Any, int] = field(default_factory=dict)
    # (count, the costs' size buckets) -> search result: the search is deterministic, run once per
    # count and buckets met.
    _searched: dict[tuple, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def count_input(self) -> tuple[int, int]:
        """(placeholder index, dim) of the count the split cuts: sequences or tokens."""
        return self.split_input if self.split_input is not None else self.token_input

    def symbol_values(self, args: Any) -> dict[Any, int]:
        """Each input size symbol's value in a call with these arguments."""
        return {sym: int(args[i].shape[d]) for sym, (i, d) in self.symbol_inputs.items()}

    def sizes(self, tokens: int, values: dict[Any, int] | None = None) -> list[int]:
        """Nano-batch sizes for a step of `tokens` tokens (one size: no split); "auto" costs the
        step at the input sizes `values` (`symbol_values`; None: the example sizes)."""
        if self.setting == "auto":
            if self.device is None or not self.profile:
                return [tokens]
            return self._search(tokens, values)[0]
        k = max(1, min(int(self.setting), tokens))
        return [tokens // k + (1 if i < tokens % k else 0) for i in range(k)]

    def shares(self, tokens: int, values: dict[Any, int] | None = None) -> dict[int, float] | None:
        """SM share per stream chosen by the search for `tokens` ("auto" only; None: whole device)."""
        if self.setting != "auto" or self.device is None or not self.profile:
            return None
        return self._search(tokens, values)[1]

    def costs_at(self, values: dict[Any, int] | None = None) -> list[OpProfile]:
        """The profile per unit the split counts (a token row, or a sequence: its rows' costs
        times its rows, 1 in a decode step, S in a batch of prompts) at the input sizes `values`
        (None: the example sizes), each size symbol those costs read rounded up to its power of
        two (`_buckets`)."""
        buckets = self._buckets(values)
        costs = []
        for cost in self.profile:
            per_row = cost.at(buckets) if isinstance(cost, AttentionCost) else cost
            n = _evaluated(self._rows_per_unit(cost), buckets)
            costs.append(per_row if n is None or n == 1 else _rows_of(per_row, n))
        return costs

    def _buckets(self, values: dict[Any, int] | None) -> dict[Any, int]:
        """The power of two at or above each size the costs read, at `values` (None: the example
        sizes): a cache growing by one token per decode step is searched once per doubling."""
        values = self.example_values if values is None else values
        return {sym: power_of_two_bucket(v) for sym, v in values.items() if sym in self._cost_symbols}

    @functools.cached_property
    def _cost_symbols(self) -> frozenset[Any]:
        """The size symbols the costs read: attention's counts, and the rows per sequence over
        sequences (read on the first search, once the pass has set `split_input` and `row_scales`)."""
        rows = (self._rows_per_unit(c) for c in self.profile)
        return frozenset().union(*(getattr(r, "free_symbols", frozenset()) for r in rows),
                                 *(c.symbols for c in self.profile if isinstance(c, AttentionCost)))

    def _rows_per_unit(self, cost: OpProfile | AttentionCost) -> Any:
        """A costed op's rows per unit of the split: a whole op's `whole_rows`; else 1 along the
        tokens, and over sequences its rows per sequence (attention's query rows, a GEMM's `S`
        of `B*S`)."""
        if cost.whole:
            return self.whole_rows.get(cost.name, 1)
        if isinstance(cost, AttentionCost):
            return 1 if self.split_input is None else cost.rows
        return self.row_scales.get(cost.name, 1)  # (along the tokens: a routed grouped GEMM's k rows a token)

    def _search(self, tokens: int, values: dict[Any, int] | None) -> tuple[list[int], dict[int, float] | None]:
        """(sizes, SM shares) for `tokens`: the split `search.split_for_count` runs at the costs
        of `values` (searched once per power-of-two bucket of the count and of the sizes the
        costs read, `_buckets`). A call met before looks its answer up without costing the step
        again (each step asks twice: its sizes, then its shares)."""
        buckets = self._buckets(values)
        key = (tokens, frozenset(buckets.items()))
        if key not in self._searched:
            found = split_for_count(self.costs_at(values), self.device, tokens)
            self._searched[key] = ([tokens], None) if found is None else (found.sizes, found.sm_share_per_stream)
        return self._searched[key]

    def timeline(self, tokens: int) -> list[dict[str, Any]] | None:
        """The modeled per-stream timeline of a `tokens` step at the example sizes, split as
        `sizes(tokens)` (None when it is not split or there is no cost model). With "auto" it is
        drawn at the SM share the search chose, so it shows the plan the runtime runs and ends at
        the plan's makespan."""
        sizes = self.sizes(tokens)
        if len(sizes) < 2 or not self.profile or self.device is None:
            return None
        # The searched share, not a fixed one the search may not even try (the report drew every
        # "auto" plan at 0.6). A fixed k runs without an SM partition, which the model cannot
        # express, so it keeps 0.6; so does a profile without both compute and memory (unused).
        share = (self.shares(tokens) or {}).get(DEFAULT_STREAM_OF_RESOURCE["compute"], 0.6)
        return modeled_timeline(self.costs_at(), sizes, share, self.device)

    def schedule(self, sizes: list[int]) -> Schedule:
        """The stream schedule for these nano-batch sizes."""
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        ranges = [(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
        splits = {s.name: ranges if self.split[s.name] else None for s in self.specs}
        return make_schedule(self.specs, splits, self.edges, bounds[-1])


def _dim_arg(node: fx.Node, default: int = 0) -> int:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", default)
    return dim


@dataclass(frozen=True)
class _SequenceRows:
    """A split over whole sequences (`_batch_symbol`): the values that hold the batch count outside
    one split dim (a tensor with it in two dims, or not as a factor; a SymInt computed from it),
    which no nano-batch may read whole."""

    tangled: frozenset[str]


def _is_token_wise(node: fx.Node, dims: dict[str, int | None], seqs: _SequenceRows | None = None) -> bool:
    """Each output row reads only the same row of the token-carrying inputs (with `seqs`: each
    sequence's rows only that sequence's rows)."""
    out_dim = dims.get(node.name)
    if out_dim is None or node.op != "call_function":
        return False
    target = node.target
    ins = [a for a in node.all_input_nodes if dims.get(a.name) is not None]
    if not ins:
        return False  # nothing to slice: computed whole
    name = op_name(node)
    if seqs is not None:
        # A nano-batch would read such a value whole beside its own sequences' rows; a view's
        # size at the split dim (`B*S`) is the one the runtime sets per nano-batch.
        shape = node.args[1] if target in SIZED_BY_ARGUMENT and len(node.args) > 1 else ()
        sized = shape[out_dim] if isinstance(shape, (list, tuple)) and out_dim < len(shape) else None
        if any(a.name in seqs.tangled and a is not sized for a in node.all_input_nodes):
            return False
        if name == "meta_attention":
            # Each sequence attends to its own keys: q, k, v (and a mask or its ranges, when they
            # are per sequence) split along the batch dim; the rest is shared.
            return out_dim == 0 and dims.get(node.args[0].name) == 0 and all(
                dims.get(a.name) in (0, None) for a in node.all_input_nodes)
    if name == "padded_gemm":
        # x's rows, and those of a residual fused in: a whole one as long as the tokens, its length
        # the token count written otherwise (Jamba's Mamba layers), would meet each nano-batch's rows
        # whole (its shape check refused it: a crash at k = 2).
        residual = bind_arguments(node)["residual"]
        return dims.get(node.args[0].name) == 0 and (residual is None or dims.get(residual.name) == 0)
    if target in (aten.linear.default, aten.mm.default):
        return dims.get(node.args[0].name) == 0 and dims.get(node.args[1].name) is None
    if target is aten.embedding.default:
        return dims.get(node.args[0].name) is None
    if target is operator.getitem:
        # One item of a split tuple (`_ROW_TUPLES`): its rows are the tuple piece's item. Only
        # when the tuple op itself splits: a whole one (a split along the token dim of a longer
        # tensor, whose items carry the tokens) is one tuple, which has no rows to narrow.
        src = node.args[0]
        return isinstance(src, fx.Node) and dims.get(src.name) == out_dim and _is_token_wise(src, dims, seqs)
    if target is aten.native_layer_norm.default:
        # Normalizes over the trailing len(normalized_shape) dims: each row alone when the token
        # dim lies before them.
        src = node.args[0]
        return dims.get(src.name) == out_dim and out_dim < meta_val(src).dim() - len(node.args[1])
    if target in _SELECT_ALONG:
        # Each row's values picked or ordered among that row's own (a router's top-k over its
        # experts) when the dim is not the token dim.
        src = node.args[0]
        position, default = _SELECT_ALONG[target]
        along = node.args[position] if len(node.args) > position else node.kwargs.get("dim", default)
        return along is not None and dims.get(src.name) == out_dim and along % meta_val(src).dim() != out_dim
    if target in (aten.split.Tensor, aten.split_with_sizes.default):
        src = node.args[0]
        along = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        return dims.get(src.name) == out_dim and along % meta_val(src).dim() != out_dim
    if target in _TOKENWISE_COLLECTIVES:
        if target in (ALL_GATHER, REDUCE_SCATTER) and out_dim == 0:
            # They stack (or cut) the ranks' tensors along dim 0: a split there would interleave
            # the ranks' pieces. Along the tokens their output's p·T (T/p) rows have no token dim,
            # but over sequences a gathered `[B, S, N]` has p rows per sequence (`p*B`).
            return False
        if target is WAIT_TENSOR:
            # The collective's own output, split only with it (not a whole one read in pieces).
            src = node.args[0]
            return dims.get(src.name) == out_dim and _is_token_wise(src, dims, seqs)
        return dims.get(node.args[0].name) == out_dim
    if target in _RESHAPES:
        # Rows stay whole only when the dims before the token dim hold as many elements before
        # and after (`[2, S, H] -> [S, 2, H]` mixes rows; `[B*S, N] -> [B, S, N]` is fine only
        # for B == 1) and the token dim keeps its length.
        src = node.args[0]
        src_dim = dims.get(src.name) if isinstance(src, fx.Node) else None
        if src_dim is None:
            return False
        # Over sequences the split dim may change its length (`[B*S, N] -> [B, S, N]`): with the
        # elements before it alike, each sequence's elements stay one block, as the same share of
        # the elements after (a dim holding the batch count only as a factor).
        sv, ov = meta_val(src), meta_val(node)
        return (statically_known_true(math.prod(sv.shape[:src_dim]) == math.prod(ov.shape[:out_dim]))
                and (seqs is not None or statically_known_true(sv.shape[src_dim] == ov.shape[out_dim])))
    if target in (aten.squeeze.dim, aten.squeeze.dims):
        # Squeezing the token dim is a no-op at T >= 2 but drops the dim of a 1-row nano-batch.
        src = node.args[0]
        rank = meta_val(src).dim()
        squeezed = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        squeezed = [squeezed] if isinstance(squeezed, int) else list(squeezed)
        return dims.get(src.name) is not None and all(d % max(rank, 1) != dims[src.name] for d in squeezed)
    if target in _LAYOUT:
        return True
    if target is aten.constant_pad_nd.default:
        # Padding other dims (latent attention's narrower head size) keeps each row whole.
        src = node.args[0]
        rank = meta_val(src).dim()
        padded = {rank - 1 - i // 2 for i, pad in enumerate(node.args[1]) if not (type(pad) is int and pad == 0)}
        return dims.get(src.name) == out_dim and out_dim not in padded
    if target is aten.stack.default:
        # Equal-shaped tensors joined along a new dim (interleaved RoPE's `stack((-x2, x1), -1)`
        # in GPT-J, CodeGen, Cohere): like a cat off the token dim, each output row reads only
        # that row of every input. The new dim shifts the inputs' token dim by one when it is
        # inserted at or before it; an output token dim anywhere else (the new dim itself) or
        # inputs with the tokens at different places read across rows: whole.
        src_dims = {dims.get(t.name) if isinstance(t, fx.Node) else None for t in node.args[0]}
        if len(src_dims) != 1 or None in src_dims:
            return False
        (src_dim,) = src_dims
        return out_dim == src_dim + (_dim_arg(node) % meta_val(node).dim() <= src_dim)
    if target in _ALONG_DIM:
        if target is aten.cat.default:
            tensors = node.args[0]
            along = node.args[1] if len(node.args) > 1 else 0
            return all(isinstance(t, fx.Node) and dims.get(t.name) == out_dim for t in tensors) and along % meta_val(node).dim() != out_dim
        src = node.args[0]
        rank = meta_val(src).dim()
        return dims.get(src.name) is not None and _dim_arg(node) % rank != dims[src.name]
    if target in _REDUCTIONS:
        src = node.args[0]
        rank = meta_val(src).dim()
        reduced = node.args[1] if len(node.args) > 1 else None
        if reduced is None:
            return False
        reduced = [reduced] if isinstance(reduced, int) else list(reduced)
        return dims.get(src.name) is not None and all(d % rank != dims[src.name] for d in reduced)
    if target in _FILLED_LIKE or target in (aten.view_as_complex.default, aten.view_as_real.default):
        # (The complex views reinterpret the last dim, pairs of reals: never the token dim.)
        return dims.get(node.args[0].name) == out_dim
    if target in _NEW_OF_SIZE:
        return True  # (its size at the token dim is the token count: that dim is the output's)
    if target is aten.repeat.default:
        # Tiles the input along each dim (new dims first when there are more counts than dims):
        # each row only its own when the token dim's count is 1 (GPT-J's positions repeated
        # across the rotary table's width, before transformers 5.24).
        src, counts = node.args[0], node.args[1]
        at = dims[src.name] + len(counts) - meta_val(src).dim() if dims.get(src.name) is not None else None
        return at == out_dim and type(counts[at]) is int and counts[at] == 1
    if target is aten.index.Tensor:
        # A lookup in a table without the token dim at one index tensor (GPT-J's rotary table at
        # the positions, `table[position_ids]`): each output row reads that row of the index and
        # any of the table, like an embedding. The index's dims replace the table's indexed one.
        table, indices = node.args[0], node.args[1]
        tensors = [(j, i) for j, i in enumerate(indices) if i is not None]
        if dims.get(table.name) is not None or len(tensors) != 1:
            return False
        ((at, index),) = tensors
        val = meta_val(index)
        return (val.dtype not in (torch.bool, torch.uint8) and dims.get(index.name) is not None
                and out_dim == at + dims[index.name])
    if target in _INDEXED_ALONG or target is aten.slice_scatter.default:
        # Every tensor argument holds the same rows at the output's token dim (a shorter index
        # would scatter into only some of the rows).
        bound = bind_arguments(node)
        along_rows = bound["dim"] % meta_val(node).dim() == out_dim
        if (target is aten.gather.default and along_rows and dims.get(bound["self"].name) is None
                and dims.get(bound["index"].name) == out_dim):
            # Along the tokens, from a table without them: each row of the index picks its own
            # rows of the table, a lookup (GPT-J's rotary table at its repeated positions,
            # before transformers 5.24). (Along another dim, output row t reads the table's row
            # t, which a nano-batch's narrowed index would not.)
            return True
        tensors = [bound[k] for k in ("self", "index", "src") if isinstance(bound.get(k), fx.Node)]
        rows = meta_val(node).shape[out_dim]
        # Along the tokens, a slice write whose source holds every row writes each row its own
        # (a slice assignment `y[:, :4] = x` writes all rows, then the slice of them).
        return ((not along_rows or target is aten.slice_scatter.default)
                and all(dims.get(t.name) == out_dim and statically_known_true(meta_val(t).shape[out_dim] == rows)
                        for t in tensors))
    if name == "grouped_gemm":
        # Batched (no offsets) over `[E, T, K]`, each expert's block of rows every token in order
        # (Llama-4's dense experts): row t of each block is token t's. (Grouped over offsets, its
        # rows are sorted by expert across the step: `tileflow.routing` may prove its routing.)
        bound = bind_arguments(node)
        return (bound["offsets"] is None and out_dim == 1 and dims.get(bound["x"].name) == 1
                and all(dims.get(v.name) is None for k, v in bound.items() if k != "x" and isinstance(v, fx.Node)))
    if (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags) or target in _UNTAGGED_POINTWISE:
        # Broadcasting aligns dims from the right: each input's token dim must be the output's,
        # and every other tensor input must broadcast along it (size 1 there, or no dim there).
        # A whole input as long as the tokens there, its length an expression the pass does not
        # take for the token count (Falcon-Mamba's scan: `(T - 1)//2 + (T//2 - 1)//2 + 4`, equal
        # to T under Dynamo's guards), would meet each nano-batch's rows whole.
        out_rank = meta_val(node).dim()
        if not all(dims[a.name] - meta_val(a).dim() == out_dim - out_rank for a in ins):
            return False
        for a in node.all_input_nodes:
            val = meta_val(a)
            if dims.get(a.name) is None and isinstance(val, torch.Tensor):
                at = val.dim() - (out_rank - out_dim)
                if at >= 0 and not statically_known_true(val.shape[at] == 1):
                    return False
        return True
    return False


def _profile(node: fx.Node, dims: dict[str, int | None]) -> OpProfile | AttentionCost | None:
    """Cost-model inputs of the heavy ops (GEMMs, attention, collectives), per row they compute
    (`_costed_rows`: a token's; a grouped GEMM's, a row routed to an expert). A grouped GEMM is
    `whole` from here; the pass marks every other op it keeps whole."""
    name = op_name(node)
    if name == "grouped_gemm":
        return _grouped_gemm_profile(node)
    if name == "padded_gemm":
        w = meta_val(node.args[1])
        # A gated GEMM's separate up weight and sibling GEMMs' weights (N segments) add their rows to N.
        args = bind_arguments(node)
        others = [*([args["weight_up"]] if args.get("weight_up") is not None else []), *(args["more_weights"] or ())]
        n, k = int(w.shape[0]) + sum(int(meta_val(s).shape[0]) for s in others), int(w.shape[1])
        e = w.element_size()
        return OpProfile(node.name, "compute", 2.0 * n * k, e * (n + k), float(e * n * k), str(w.dtype).removeprefix("torch."))
    if name == "meta_attention":
        return _attention_profile(node)
    if node.target in _MOVING_COLLECTIVES:
        return _collective_profile(node, dims)
    return None


def gemm_costs(gm: fx.GraphModule) -> list[OpProfile]:
    """The split search's cost inputs per token row of the graph's padded and grouped GEMMs, in
    graph order: FLOPs and bytes per row, and the weights once per launch (how the serving
    engine's `nano_batches="auto"` costs a stage program's dense stages). The engine runs each
    nano-batch's stages on its own rows, experts too, so a grouped GEMM is no barrier there: it
    costs its rows per token (top-k, or every expert's in the batched form), and per nano-batch
    the weights of the experts its tokens reach (`_routed`; in the batched form all of them).
    One whose rows per token are not a number is left out."""
    found = token_symbol(gm)
    symbols = _input_symbols(gm)
    costs = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and op_name(node) in ("padded_gemm", "grouped_gemm"):
            cost = _profile(node, {})
            if cost.whole:
                ratio = _rows_over_count(_costed_rows(node, {}), None if found is None else found[0], symbols)
                if ratio is None or not ratio.is_number:
                    continue
                cost = _rows_of(_routed(cost, node, float(ratio)), float(ratio))
            costs.append(cost)
    return costs


def _rows_of(cost: OpProfile, rows: float, **changes: Any) -> OpProfile:
    """`cost` (per row) for `rows` rows per unit: its per-token FLOPs and bytes times `rows`, its
    weights as they are (a unit misses an expert's weights only if each of its rows does)."""
    missed = cost.weights_missed ** rows if cost.weights_missed and rows > 0 else cost.weights_missed
    return dataclasses.replace(cost, flops_per_token=cost.flops_per_token * rows,
                               bytes_per_token=cost.bytes_per_token * rows, weights_missed=missed, **changes)


def _routed(cost: OpProfile, node: fx.Node, picks: float) -> OpProfile:
    """A grouped GEMM's per-row `cost` run per nano-batch over its tokens' routed rows, `picks`
    rows (experts) a token: a launch reads the weights of only the experts its rows reach. Under
    uniform routing a token leaves each of the E experts unread with chance 1 - picks/E, a routed
    row with that chance's picks-th root (`OpProfile.weights_missed`). A batched grouped GEMM
    (no offsets: every token meets every expert), or one of a symbolic expert count, reads all."""
    args = bind_arguments(node)
    experts = meta_val(args["weight"]).shape[0]
    if args["offsets"] is None or not isinstance(experts, int) or not 0 < picks < experts:
        return dataclasses.replace(cost, whole=False)
    return dataclasses.replace(cost, whole=False, weights_missed=(1.0 - picks / experts) ** (1.0 / picks))


def _grouped_gemm_profile(node: fx.Node) -> OpProfile:
    """A mixture of experts' grouped GEMM as a whole op (over offsets it never splits alone: its
    rows are sorted by expert across the step; the pass runs it per nano-batch where its routing
    is proven, and a batched one along its tokens), per row routed to an expert (top-k per
    token; in the batched form `[E, T, K]` every expert's): FLOPs and bytes, and every expert's
    weights once per launch (a barrier over the whole step; per nano-batch `_routed` costs only
    the experts its tokens reach). Weights of symbolic sizes leave it without costs of its own
    (the search then sees only the ops around it; a barrier's costs are the same split or not)."""
    w = meta_val(bind_arguments(node)["weight"])
    if any(isinstance(s, torch.SymInt) for s in w.shape):
        return OpProfile(node.name, "compute", dtype=str(w.dtype).removeprefix("torch."), whole=True)
    experts, n, k = (int(s) for s in w.shape)
    e = w.element_size()
    return OpProfile(node.name, "compute", 2.0 * n * k, e * (n + k), float(e * experts * n * k),
                     str(w.dtype).removeprefix("torch."), whole=True)


def _costed_rows(node: fx.Node, dims: dict[str, int | None]) -> Any:
    """The rows a heavy op's `_profile` costs one of, as an int or a SymInt: a GEMM's input rows
    (every dim but the last), attention's query rows (`B*S` of `[B, H, S, D]`), a collective's
    input along its token dim (None: no such dim)."""
    name = op_name(node)
    args = bind_arguments(node)
    if name in ("padded_gemm", "grouped_gemm"):
        return math.prod(meta_val(args["x"]).shape[:-1])
    if name == "meta_attention":
        q = meta_val(args["q"])
        return q.shape[0] * q.shape[2]
    src = args["input"]
    dim = dims.get(src.name)
    return None if dim is None else meta_val(src).shape[dim]


def _rows_over_count(rows: Any, unit: Any, symbols: Any) -> Any:
    """`rows` (an int or a SymInt) per unit of the split's count, `unit` its size symbol, as a
    sympy expression of the input tensors' size `symbols` (a number where the rows are a
    multiple of the count: a grouped GEMM's top-k rows per token); None without a unit or rows,
    or rows that are no expression of those sizes (a count the step computes, or an int
    argument: `logits_to_keep=4` under dynamic shapes)."""
    if unit is None or rows is None:
        return None
    ratio = (rows.node.expr if isinstance(rows, torch.SymInt) else sympy.Integer(rows)) / unit
    return ratio if ratio.free_symbols <= set(symbols) else None


def _attention_profile(node: fx.Node) -> AttentionCost:
    """Attention's cost per query row (`AttentionCost.at`, at sizes given per call): the K and V
    its S query rows read together, once for the S rows (a decode row reads its whole cache, or
    its window's or chunk's part of it; a prefill row 1/S of it), its own q and output, and 4·Hq·D
    FLOPs per key it sees (q·kᵀ and p·v; `_keys_seen`). A mask's values are not known here: its
    hidden keys count as seen. The heads and head size are taken at the example sizes."""
    args = bind_arguments(node)
    q, k = meta_val(args["q"]), meta_val(args["k"])
    # (A size without a hint, or an empty one, counts as 1: the least a row can read.)
    hq, hkv, d = (size_hint(size) or 1 for size in (q.shape[1], k.shape[1], q.shape[3]))
    rows, keys = (s.node.expr if isinstance(s, torch.SymInt) else int(s) for s in (q.shape[2], k.shape[2]))
    return AttentionCost(node.name, hq, hkv, d, rows, keys, bool(args.get("causal")),
                         size_hint(args.get("sliding_window")), size_hint(args.get("attention_chunk")),
                         q.element_size(), str(q.dtype).removeprefix("torch."))


def _keys_seen(rows: int, keys: int, causal: bool, window: int | None, chunk: int | None) -> tuple[float, int]:
    """The keys a query row sees on average under `meta_attention`'s rule, and the keys the rows
    see together: row i sits at key position p = keys - rows + i; causal, it sees none after p; a
    window w, none up to p - w; a chunk c, only those of its own chunk [c·(p // c), c·(p // c + 1)).
    Averaged over the rows, not bounded by the average: a window's first rows see fewer than w keys
    (and a chunk's first rows fewer than c). In Python numbers (the pass runs under fake tensors),
    exactly: a row's count is linear in p between the chunk starts and the points where a window
    fills (c·k + w), so each such run of rows is summed as an arithmetic series (a sample of rows
    evenly spaced aliased with the chunks: 1M rows in chunks of 8192 counted 3% low, 4M rows in
    chunks of 2048 half), in a few steps (whole chunks before the last see alike)."""

    def span(position: int) -> tuple[int, int]:
        low, high = 0, position if causal else keys - 1
        if window:
            low = max(low, position - window + 1)
        if chunk:
            start = position // chunk * chunk
            low, high = max(low, start), min(high, start + chunk - 1)
        return low, high

    def count(position: int) -> int:
        low, high = span(position)
        return max(high - low + 1, 0)

    def summed(begin: int, end: int) -> float:  # over the rows at positions [begin, end)
        # Where a row's count may change slope: the chunk starts, and a window's fill in each chunk.
        starts = {begin}
        for start in range(begin // chunk * chunk, end, chunk) if chunk else (0,):
            starts.update(x for x in (start, start + window if window else None) if x is not None and begin < x < end)
        bounds = sorted(starts) + [end]
        return sum((b - a) * (count(a) + count(b - 1)) for a, b in zip(bounds, bounds[1:])) / 2

    first = max(keys - rows, 0)
    if min(rows, keys) <= 0:
        return 1.0, 1
    total = None
    if chunk:
        # Whole chunks before the last see alike (the last one's keys may end at keys - 1): one
        # counts for them all.
        whole, last = -(-first // chunk) * chunk, (keys - 1) // chunk * chunk
        if last - whole >= 2 * chunk:
            total = (summed(first, whole) + (last - whole) // chunk * summed(whole, whole + chunk)
                     + summed(last, keys))
    if total is None:
        total = summed(first, keys)
    # Both ends of a row's span only grow with its position: the first row's low to the last's high.
    lowest, highest = span(first)[0], span(keys - 1)[1]
    if highest < lowest:
        return 1.0, 1
    return total / (keys - first), highest - lowest + 1


def _collective_profile(node: fx.Node, dims: dict[str, int | None]) -> OpProfile | None:
    """A collective's bytes over the interconnect per token row, per rank, as a ring moves them:
    an all-reduce sends and receives 2 (p - 1) / p of its tensor, a gather (p - 1) / p of its
    output, a reduce-scatter (p - 1) / p of its input (None: a row's size is not static)."""
    args = bind_arguments(node)
    src = args["input"]
    row = _row_bytes(meta_val(src), dims.get(src.name))
    if row is None:
        return None
    ranks = args.get("group_size") or _group_size(args["group_name"])
    share = (ranks - 1) / ranks if ranks else 1.0
    if node.target is ALL_REDUCE:
        share *= 2
    elif node.target is ALL_GATHER:
        row *= ranks or 1  # of the output: p rows of the input
    return OpProfile(node.name, "network", 0.0, share * row, 0.0, str(meta_val(node).dtype).removeprefix("torch."))


def _row_bytes(val: Any, dim: int | None) -> float | None:
    """Bytes of one row along the token dim `dim` (None: no token dim, or other dims symbolic)."""
    if dim is None or not isinstance(val, torch.Tensor):
        return None
    others = [s for d, s in enumerate(val.shape) if d != dim]
    if not all(isinstance(s, int) for s in others):
        return None
    return float(val.element_size() * math.prod(others))


def _group_size(group_name: Any) -> int | None:
    """How many ranks the process group named `group_name` holds (None: unknown here)."""
    try:  # (the name-to-group lookup the functional collectives themselves use; no public one)
        from torch.distributed.distributed_c10d import _resolve_process_group

        return int(_resolve_process_group(group_name).size())
    except (ImportError, RuntimeError, ValueError, KeyError):
        return None


def token_symbol(gm: fx.GraphModule) -> tuple[Any, tuple[int, int]] | None:
    """The token symbol of the graph's inputs and where to read it: (symbol, (input, dim)). With
    several symbols, the one attention's query length carries; None when that does not decide,
    or when the lone symbol sizes only a cache: attention's queries all of a static size, and no
    GEMM's rows hold it (a decode step's cache length when Dynamo kept the batch size static, as
    in a generate loop; taken for the token count, the split cut the cache's length with nothing
    heavy split, and CUDA graphs bucketed it). A fixed query over the tokens (a learned one
    pooling them) keeps it: the GEMMs' rows are the tokens."""
    found = _input_symbols(gm)
    if len(found) == 1:
        ((sym, where),) = found.items()
        queries = _queries(gm)
        if (queries and all(type(q[0]) is int and type(q[2]) is int for q in queries)
                and not _in_gemm_rows(gm, sym)):
            return None
        return sym, where
    # Several (batch and sequence, say): the sequence is what attention's queries run along.
    for q in _queries(gm):
        s = q[2]
        if isinstance(s, torch.SymInt) and s.node.expr in found:
            return s.node.expr, found[s.node.expr]
    return None


# GEMMs whose first input's leading dims are rows (`[..., M, K]`).
_GEMMS = {"padded_gemm", "grouped_gemm", "mm", "addmm", "bmm", "linear", "matmul", "baddbmm"}


def _in_gemm_rows(gm: fx.GraphModule, symbol: Any) -> bool:
    """Whether `symbol` sizes a row dim of some GEMM's input (any dim but its last)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and op_name(node) in _GEMMS:
            x = meta_val(node.args[1] if op_name(node) in ("addmm", "baddbmm") else node.args[0])
            if isinstance(x, torch.Tensor) and any(_mentions(s, symbol) for s in x.shape[:-1]):
                return True
    return False


def _queries(gm: fx.GraphModule) -> list[Any]:
    """The shape of each meta-attention's queries, `[B, H, S, D]`, in graph order."""
    return [meta_val(n.args[0]).shape for n in gm.graph.nodes
            if n.op == "call_function" and op_name(n) == "meta_attention"]


def _input_symbols(gm: fx.GraphModule) -> dict[Any, tuple[int, int]]:
    """Each size symbol of the graph's tensor inputs, with where it first occurs: (input, dim)."""
    found: dict[Any, tuple[int, int]] = {}
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        val = meta_val(node)
        if isinstance(val, torch.Tensor):
            for d, s in enumerate(val.shape):
                if isinstance(s, torch.SymInt) and s.node.expr.is_Symbol:
                    found.setdefault(s.node.expr, (i, d))
    return found


def _strided_over_joined(gm: fx.GraphModule, split: dict[str, bool]) -> fx.Node | None:
    """An `as_strided` of a split value whose eager layout is not contiguous (None if none): the
    runner joins a split value's pieces into a contiguous tensor, and as_strided's result depends
    on the layout it reads (any other view's values do not)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.as_strided.default:
            base = node.args[0]
            if split.get(base.name) and not traced_contiguous(base):
                return node
    return None


@register_pass
class NanoBatch:
    """Annotate token-wise ops and build the nano-batch plan and schedule (see module docstring)."""

    name = "nanobatch"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Record the plan on `gm.meta["tileflow_nanobatch"]` and the schedule in the report."""
        result = PassResult()
        setting = ctx.config.nano_batches
        if setting == 1:
            return result
        found = token_symbol(gm)
        symbols = _input_symbols(gm)
        # A decode step over a cache (`[B, 1]` ids) has no token symbol: it splits over its sequences,
        # NanoFlow's main case (a big decode batch); each is one token row, as "auto" costs them.
        decode = _batch_symbol(gm, None, symbols) if found is None else None
        if found is None and decode is None:
            names = sorted(map(str, symbols))
            queries = _queries(gm)
            # Which case: a static graph is split by no k, and the user can change that.
            if queries and all(type(q[0]) is int and type(q[2]) is int and q[0] * q[2] == 1 for q in queries):
                why = "its attention has one query (one sequence's decode step): one token, nothing to split"
            elif names and queries and all(type(q[0]) is int and type(q[2]) is int for q in queries):
                batches, lengths = sorted({q[0] for q in queries}), sorted({q[2] for q in queries})
                step = ("a decode step over a cache" if lengths == [1] else
                        f"{'/'.join(map(str, lengths))} queries per sequence over a cache")
                what = (f"attention's queries are all of a static size (a batch of {'/'.join(map(str, batches))}, "
                        f"{step}) and the inputs' size symbols ({', '.join(names)}) size other dims (the cache's length)")
                if batches == [1]:  # (Dynamo specializes a size of 1: no mark makes it a symbol)
                    how = ("one sequence's queries, counted static: mark the queries' dim dynamic "
                           "(torch._dynamo.mark_dynamic) to split along them")
                else:
                    how = ("a batch size traced static (Dynamo's automatic dynamic shapes mark only the dims that "
                           "changed, as a generate loop's cache length and not its batch size) is a plain number, "
                           "which the split cannot tell from other sizes; compile with dynamic=True or mark the "
                           "batch dim dynamic (torch._dynamo.mark_dynamic) to split over the sequences")
                why = f"{what}: {how}"
            elif names and queries and all(type(q[2]) is int for q in queries):
                # Splitting prompts of one static length over their sequences would also bucket CUDA
                # graphs over them, which the padding analysis does not cover (it reads the token dim
                # as a sequence's); a decode step split over them has no token symbol, not captured.
                lengths = sorted({q[2] for q in queries})
                if lengths == [1]:
                    what = "a decode step over a cache"
                    how = ("a decode step splits over its sequences only when their count is one input size symbol "
                           "shared by every attention's queries (not a size traced static, nor several symbols)")
                else:
                    what = "prompts of one static length, the batch sizes of several inputs traced as separate symbols"
                    how = ("steps are split along a sequence's tokens, or over the sequences when the batch size is "
                           "the graph's one size symbol")
                why = (f"the inputs have several size symbols ({', '.join(names)}) and attention's queries a fixed "
                       f"length {'/'.join(map(str, lengths))} ({what}): {how}")
            elif names:
                why = (f"the inputs have several size symbols ({', '.join(names)}) and no attention's queries tell "
                       "which holds the tokens")
            else:
                why = ("the graph was compiled for static shapes (Dynamo's first compile without dynamic=True, or "
                       "dynamic=False), so no step of it is split: compile with dynamic=True or mark the token dim "
                       "with torch._dynamo.mark_dynamic")
            result.fallback("graph", f"no symbolic token dimension to split: {why}")
            return result
        token, where = found if found is not None else (None, None)
        # A batch of several sequences (`[B, S]` ids, B symbolic) splits over whole sequences: its
        # GEMMs' rows are `B*S`, no token dim, and would all run whole.
        batch = decode if found is None else _batch_symbol(gm, token, symbols)
        seqs, scales = None, {}
        if batch is None:
            # (Over sequences the token count may size two dims: a `[B, 1, S, S]` mask splits along B.)
            shared = _symbol_in_two_dims(gm, token)
            if shared is not None:
                result.fallback("graph", f"input {shared} has the token count's size symbol in two dims (a square "
                                         "mask given as an input, or a batch as long as the sequence on the first "
                                         "call: Dynamo sized both alike), so rows cannot be told apart; mark the dims "
                                         "dynamic separately")
                return result
            dims: dict[str, int | None] = {n.name: _token_dim_of(n, token) for n in gm.graph.nodes}
        else:
            rows = {n.name: _sequence_rows_of(n, batch, symbols) for n in gm.graph.nodes}
            dims = {name: r[0] if r is not None else None for name, r in rows.items()}
            scales = {name: r[1] for name, r in rows.items() if r is not None and r[1] != 1}
            seqs = _SequenceRows(frozenset(n.name for n in gm.graph.nodes
                                           if rows[n.name] is None and _mentions(meta_val(n), batch)))
        split = {n.name: _is_token_wise(n, dims, seqs) for n in gm.graph.nodes if n.op == "call_function"}
        # A mixture of experts' routing (sort, grouped GEMMs, unsort) keeps each token's rows its
        # own as a whole: proven, it runs per nano-batch over its tokens' routed rows
        # (`tileflow.routing`), over sequences too (k rows a token, S tokens a sequence).
        routed = find_routed_regions(gm, dims, split, token if batch is None else batch)
        for name in routed.kinds:
            split[name] = True
            scale = routed.row_scale(name)
            dims[name] = None if scale is None else 0
            if scale is not None:
                scales[name] = scale
        for name, why in routed.refused.items():
            result.fallback(name, f"the experts run whole, a barrier between nano-batches: {why}")
        specs, edges, profile, whole_rows = [], [], [], {}
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            specs.append(OpSpec(node.name, op_name(node), resource_of(node)))
            for src in node.all_input_nodes:
                if src.op == "call_function":
                    edges.append(OpEdge(src.name, node.name, "token" if split[node.name] else "global"))
            # An op writing into a tensor (the copy_ back into a mutated input) waits for every
            # op before it that reads that tensor or a view of it, which may run on another stream.
            for written in written_arguments(node):
                for reader in _readers_of(written):
                    if reader is not node and reader.name in split:  # split holds the ops before this one
                        edges.append(OpEdge(reader.name, node.name, "global"))
            prof = _profile(node, dims)
            if prof is not None:
                if split[node.name] and node.name in routed.kinds:
                    prof = _routed(prof, node, routed.kinds[node.name].k)  # per nano-batch: its k rows a token
                elif split[node.name] and prof.whole:
                    # A batched grouped GEMM split along its tokens: a token's row in each expert's
                    # block. (Of a symbolic expert count it has no costs: taking the count's value
                    # would pin it, a recompile per count.)
                    experts = meta_val(bind_arguments(node)["x"]).shape[0]
                    prof = _rows_of(prof, experts if isinstance(experts, int) else 0, whole=False)
                elif not split[node.name]:
                    # It runs once over the step (MoE's grouped GEMM, one sequence's attention, the
                    # last token's logits): a barrier, costed per unit by its rows over the count.
                    ratio = _rows_over_count(_costed_rows(node, dims), token if batch is None else batch, symbols)
                    prof, whole_rows[node.name] = dataclasses.replace(prof, whole=True), 0 if ratio is None else ratio
                profile.append(prof)
        strided = _strided_over_joined(gm, split)
        if strided is not None:
            result.fallback(strided.name, "as_strided of a value the split computes in pieces, whose eager layout is not "
                                          "contiguous: the runner joins the pieces contiguously, and as_strided reads "
                                          "the layout: not split")
            return result
        device, why = _device(ctx)
        plan = NanoBatchPlan(setting, where, dims, split, specs, edges, profile, device, whole_rows=whole_rows,
                             symbol_inputs=symbols, example_values=_example_values(ctx, symbols),
                             row_scales=scales, routed=frozenset(routed.kinds))
        if batch is not None:
            plan.split_input = symbols[batch]
        if setting == "auto" and device is None:
            result.fallback("graph", f"nano_batches='auto' runs the split search, which needs a CUDA device's figures, "
                                     f"and {why}: not split (an integer nano_batches >= 2 forces a split)")
            return result
        # (A reason the caller can act on, as for the steps not split at all: the heavy ops run whole.)
        unsplit = _batch_left_whole(gm, token) if batch is None else None
        if unsplit is not None:
            result.fallback("graph", unsplit)
        for node in gm.graph.nodes:
            if node.name in split:
                node.meta.setdefault("tileflow", {})["nano"] = {"split": split[node.name], "token_dim": dims[node.name]}
        plan.graph = graph_structure(gm)
        gm.meta["tileflow_nanobatch"] = plan

        example = plan.example_values.get(token if batch is None else batch)
        info: dict[str, Any] = {"setting": setting, "token_symbol": None if token is None else str(token),
                                "split_ops": sum(split.values()),
                                "whole_ops": len(split) - sum(split.values()),
                                # (the heavy ops among them: where the split's overlap stops)
                                "barriers": list(whole_rows),
                                # (MoE experts run per nano-batch, `tileflow.routing`)
                                "routed_experts": [n.name for n in gm.graph.nodes
                                                   if n.name in routed.kinds and op_name(n) == "grouped_gemm"],
                                "split_over": "tokens" if batch is None else "sequences"}
        if batch is not None:
            info["batch_symbol"] = str(batch)
        if example is not None:
            sizes = plan.sizes(example)
            schedule = plan.schedule(sizes)
            check_schedule(schedule, {s.name: (0, example) for s in specs}, edges)
            # (Over sequences the sizes and the schedule's rows count sequences.)
            info.update({"example_tokens" if batch is None else "example_sequences": example}, sizes=sizes,
                        schedule=schedule.to_dict())
            timeline = plan.timeline(example)
            if timeline is not None:
                info["timeline"] = timeline
                info["timeline_device"] = device.name
        ctx.report.extra["nano_batch"] = info
        result.count("nano_batch", sum(split.values()))
        return result


def _token_dim_of(node: fx.Node, token: Any) -> int | None:
    """The token dim of `node`'s value; for a `_ROW_TUPLES` op, the one its items share (None
    when they do not all have it), so that the op and its getitems can split like a tensor's."""
    val = meta_val(node)
    if node.op == "call_function" and node.target in _ROW_TUPLES and isinstance(val, (tuple, list)) and val:
        item_dims = {token_dim(v, token) for v in val}
        return item_dims.pop() if len(item_dims) == 1 else None
    return token_dim(val, token)


def _batch_symbol(gm: fx.GraphModule, token: Any | None, symbols: dict[Any, tuple[int, int]]) -> Any | None:
    """The batch count's symbol when the step splits over whole sequences: every meta-attention's
    queries are `[B, H, S, D]` with B an input's size symbol other than the token count S (a
    batch of several prefills, `[B, S]` ids), or with S a number above 1 and B the token symbol
    itself (prompts of one static length, only the batch size symbolic), or, with no `token`
    symbol (`token_symbol` found none), with S = 1 and B an input's size symbol (a decode step
    over a cache, `[B, 1]` ids; the cache's length, another symbol, is never split). None else:
    one sequence (B is 1, Dynamo specialized it), batches of several symbols, or no attention to
    tell the batch dim. `symbols`: the inputs' size symbols (`_input_symbols`)."""
    batches = set()
    for q in _queries(gm):
        b, s = q[0], q[2]
        # (Sequences of a static length, B the one symbol: the token symbol is B itself, which
        # CUDA graphs bucket either way; the GEMMs' rows are `B*S`, S a number. A decode step
        # with B = 1 has one token to split; with a token symbol, one query per sequence is
        # left to the token split.)
        symbolic = isinstance(b, torch.SymInt) and b.node.expr in symbols
        if token is None:
            if not (symbolic and type(s) is int and s == 1):
                return None
        else:
            fixed = type(s) is int and s > 1 and isinstance(b, torch.SymInt) and b.node.expr == token
            if not fixed and not (symbolic and isinstance(s, torch.SymInt) and s.node.expr == token
                                  and b.node.expr != token):
                return None
        batches.add(b.node.expr)
    return batches.pop() if len(batches) == 1 else None


def _batch_left_whole(gm: fx.GraphModule, token: Any) -> str | None:
    """Why a step split along its tokens runs its GEMMs and attention whole (None: it does not):
    its attention's queries hold several sequences, `[B, H, S, D]` with B not 1, so the GEMMs' rows
    are `B*S` (no token dim) and attention's batch is no token dim either; only the ops between
    them split. Over whole sequences only with B symbolic: a batch size Dynamo kept static (its
    automatic dynamic shapes mark only the dims that changed, so a fixed batch with prompts of
    varying length stays static; `mark_dynamic` of the token dim alone) is a plain number, which
    the split cannot tell from other sizes."""
    q = next((q for q in _queries(gm) if not (type(q[0]) is int and q[0] == 1)), None)
    if q is None:
        return None
    if isinstance(q[0], torch.SymInt) and q[0].node.expr == token:
        return (f"a batch of {q[0]} sequences of a static length ({q[2]}): the batch size is the graph's one size "
                "symbol, split as if it counted tokens; the GEMMs over its rows and attention run whole")
    if type(q[0]) is not int:
        return (f"a batch of {q[0]} sequences whose size is not one input size symbol shared by every attention: split "
                "along the tokens, the GEMMs over its rows and attention run whole")
    return (f"a batch of {q[0]} sequences, a size traced static (Dynamo's automatic dynamic shapes keep a batch size "
            "that did not change; or only the token dim was marked dynamic): split along the tokens, the GEMMs over "
            "its rows and attention run whole; compile with dynamic=True or mark both the batch and the token dims "
            "dynamic (torch._dynamo.mark_dynamic) to split over the sequences")


def _sequence_rows_of(node: fx.Node, batch: Any, symbols: dict[Any, tuple[int, int]]) -> tuple[int, Any] | None:
    """(dim, rows per sequence) of `node`'s value split over sequences: its one dim whose size
    holds the batch symbol, that size the batch count times an expression of the input `symbols`
    (`B`: 1; a GEMM's `B*S` rows: S); for a `_ROW_TUPLES` op, the one its items share. None when
    there is no such dim."""
    val = meta_val(node)
    if node.op == "call_function" and node.target in _ROW_TUPLES and isinstance(val, (tuple, list)) and val:
        found = {_sequence_rows(v, batch, symbols) for v in val}
        return found.pop() if len(found) == 1 else None
    return _sequence_rows(val, batch, symbols)


def _sequence_rows(val: Any, batch: Any, symbols: dict[Any, tuple[int, int]]) -> tuple[int, Any] | None:
    """`_sequence_rows_of` for one value."""
    if not isinstance(val, torch.Tensor):
        return None
    hits = [(d, s.node.expr) for d, s in enumerate(val.shape)
            if isinstance(s, torch.SymInt) and batch in s.node.expr.free_symbols]
    if len(hits) != 1:
        return None
    dim, size = hits[0]
    scale = size / batch
    if batch in scale.free_symbols or not scale.free_symbols <= set(symbols) or scale.is_integer is not True:
        return None  # (B + 1, B in a floor division: rows that do not come in whole sequences)
    return dim, scale


def _mentions(val: Any, symbol: Any) -> bool:
    """Whether a tensor's sizes, a SymInt, or an item of a tuple of them hold `symbol`."""
    if isinstance(val, (tuple, list)):
        return any(_mentions(v, symbol) for v in val)
    if isinstance(val, torch.Tensor):
        return any(_mentions(s, symbol) for s in val.shape)
    return isinstance(val, torch.SymInt) and symbol in val.node.expr.free_symbols


def _symbol_in_two_dims(gm: fx.GraphModule, token: Any) -> int | None:
    """The index of an input whose shape holds the token symbol in more than one dim, if any."""
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        val = meta_val(node)
        if isinstance(val, torch.Tensor):
            if sum(1 for s in val.shape if isinstance(s, torch.SymInt) and s.node.expr == token) > 1:
                return i
    return None


def _readers_of(tensor: fx.Node) -> list[fx.Node]:
    """The ops that read `tensor` directly or through views of it (views of views too, and the
    items of a view op returning several views: `split`, `chunk`, `unbind`)."""
    aliases, readers, stack = {tensor}, [], [tensor]
    while stack:
        for user in stack.pop().users:
            if user.op != "call_function" or user in readers:
                continue
            readers.append(user)
            # A getitem reached from an alias picks one view out of a tuple of views.
            if (is_view_op(user.target) or user.target is operator.getitem) and user not in aliases:
                aliases.add(user)
                stack.append(user)
    return readers


def _device(ctx: PassContext) -> tuple[Any, str]:
    """The device table entry the cost model uses, or None with why there is none (an unlisted
    GPU gets an entry of its own: only a device type without one, or a failed query, has none)."""
    if ctx.device_type != "cuda":
        return None, f"this graph runs on {ctx.device_type}"
    from tileflow.devices import detect_device

    try:
        return detect_device("cuda"), ""
    except (RuntimeError, ValueError) as exc:
        return None, f"the CUDA device's figures could not be read ({exc})"


def _example_values(ctx: PassContext, symbols: Any) -> dict[Any, int]:
    """The example value of each of these size symbols that the shape environment knows."""
    env = ctx.shape_env
    if env is None:
        return {}
    # torch >= 2.13 names it backed_var_to_val; older versions var_to_val.
    table = getattr(env, "backed_var_to_val", None)
    if table is None:
        table = getattr(env, "var_to_val", {})
    return {sym: int(table[sym]) for sym in symbols if table.get(sym) is not None}
