"""Mixture-of-experts routing that computes each token's rows from that token's inputs alone.

A MoE layer as transformers writes it for grouped GEMMs (`grouped_mm_experts_forward`) flattens
each token's top-k expert ids and weights (`[T, k] -> [k*T]`), sorts the ids (a permutation P of
the routed rows), gathers each sorted row's token (`hidden[P // k]`) and weight (`w[P]`), runs the
experts' grouped GEMMs over the sorted rows with offsets counted from the sorted ids
(`cumsum(histc(ids))`), scales the rows by their weights, puts them back in token order (`y[inv]`,
`inv` the inverse of P made by `index_put`) and views them `[T, k, H]`. No op of it but the first
and last views is token-wise (the sort reads every row), yet the whole computes token t's rows from
token t's inputs only: run over any range of the tokens, it gives those tokens' rows. So the
nano-batch split can run it once per nano-batch, as it runs a GEMM, rather than once over the step.
Over the sequences of a batch (`[B*S, H]` rows, B split) it is the same: a range of sequences is a
range of tokens, T = B*S; the router's flattened `[k*B*S]` ids then split already, each
sequence's block of them whole, and they enter the routing as `rows(k)`.

`find_routed_regions` proves that of a region op by op, following what each value is to the
tokens (its kind, below); a region holding any op, or any use of an op, that this does not know
stays whole, and the reason says which. Kinds (k rows per token; P a sort node):

- `rows(k)`: `[k*T, ...]` in token order, row r token r // k's (a token-wise input `[T, ...]` is
  `rows(1)`); marked `ids` where its values are expert indices (a router's top-k indices, or its
  max picks', so never negative, and casts that keep their order);
- `perm(k, P)`: P's indices; `token_of(k, P)`: P // k, each sorted row's token;
- `sorted_ids(k, P)`: P's sorted values where P sorts `ids` (and casts and clamps that keep
  them in order and not negative: what the offsets are counted from, a histogram from 0);
- `sorted(k, P)`: rows in P's order, row i computed from routed row P[i] alone (rows gathered by P
  or by P // k; expert biases gathered by the sorted ids; whatever is computed row by row from
  such rows and values that do not depend on the tokens);
- `histogram(P)`, `offsets(P)`: the sorted ids' histogram over fixed bins from 0, and its
  cumulative sum (each range of tokens counts its own rows, as the grouped GEMM over them needs);
- `empty(k, P)`, `arange(k)`, `inverse(k, P)`: the parts of P's inverse permutation (made by
  `index_put`), and `perm_order(k, P)`: the sort of P itself, whose indices are that inverse too
  (`argsort(P)`);
- `tuple(k, P)`: the sort's (values, indices);
- `pieces(k, P)`: `sorted` or `rows` values split along a dim after the rows (an expert GEMM's
  output cut into its gate and up halves), each item of the kind split.

A grouped GEMM keeps `sorted(k, P)` only over rows `sorted(k, P)` with offsets `offsets(P)` of
the same P: each row then meets the expert of its own id, whichever rows run beside it. Everything
else that mixes two sorts, or rows with the counts, is refused.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

from tileflow.graph_utils import SIZED_BY_FIRST_ARGUMENT, bind_arguments, meta_val, op_name

__all__ = ["RoutedKind", "RoutedRegions", "find_routed_regions"]

aten = torch.ops.aten

_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# Ops that keep a value's kind: a cast (of indices: only one that keeps them in order), a copy.
_SAME_ROWS = {aten._to_copy.default, aten.clone.default, aten.alias.default}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
_ALONG_DIM = {aten.slice.Tensor, aten.select.int, aten._softmax.default, aten.softmax.int}
# Monotone in the ids: sorted ids stay sorted, so counting them still gives each row its group.
_MONOTONE = {aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default}
_ROW_KINDS = {"rows", "sorted", "sorted_ids"}
_NO_ROWS = {"histogram", "offsets", "tuple", "pieces", "perm_order"}  # (counts, and tuples of values)
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}
# Tensors of one value, of a given size (the `new_` ones read only their input's dtype and device).
_FILLED = {aten.new_ones.default, aten.new_zeros.default, aten.new_full.default} | SIZED_BY_FIRST_ARGUMENT
# Casts that keep indices in order (an int8 would wrap past 127).
_ORDERED_DTYPES = {torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64}


@dataclass(frozen=True)
class RoutedKind:
    """What a value of a routed region is to the tokens (module docstring): `name`, its rows per
    token `k` (0 for the histogram and offsets) and the sort node it follows (None for `rows` and `arange`)."""

    name: str
    k: int
    sort: str | None = None
    ids: bool = False  # `rows` (and a sort's `tuple`) of expert indices
    of: str | None = None  # `pieces`: the kind of each item


@dataclass
class RoutedRegions:
    """The proven regions' nodes by name, with their kinds (each runs per nano-batch over its
    tokens' routed rows) and their tokens per unit of the split (1 along the tokens; over
    sequences, a sequence's), and why each region left whole was refused (by its grouped GEMM)."""

    kinds: dict[str, RoutedKind] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    tokens_per_unit: dict[str, Any] = field(default_factory=dict)

    def row_scale(self, name: str) -> Any:
        """Rows per unit of the split of a proven node's value along dim 0: k per token (None: a
        value without rows: the counts, the sort's tuple)."""
        kind = self.kinds[name]
        if kind.name in _NO_ROWS:
            return None
        return sympy.Integer(kind.k) * self.tokens_per_unit.get(name, sympy.Integer(1))


def find_routed_regions(gm: fx.GraphModule, dims: dict[str, int | None], split: dict[str, bool],
                        unit: Any) -> RoutedRegions:
    """The regions around each grouped GEMM left whole (`split` False) whose every op is known to
    keep each token's rows its own (module docstring). `dims` holds each node's split dim, `unit`
    the size symbol the split counts: the tokens, or the sequences of a batch (`B` of `[B*S, H]`
    rows). A region's inputs are values split with their rows at dim 0, k rows a token for its
    token count T (`unit`, or `B*S`; `_tokens_of`), values that do not depend on the tokens, and
    that count itself (an `arange`'s length); its outputs, read outside it, must be `[T, ...]` in
    token order."""
    found = RoutedRegions()
    if not any(n.op == "call_function" and op_name(n) == "grouped_gemm" and not split.get(n.name) for n in gm.graph.nodes):
        return found  # (no experts: nothing to walk)
    depends = _token_dependent(gm, dims, unit)
    split = dict(split)  # (a proven region's ops run per nano-batch: the next region reads them so)
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or op_name(node) != "grouped_gemm" or split.get(node.name) or node.name in seen:
            continue
        region, kinds, why, tokens = _grow_and_prove(node, dims, split, depends)
        seen |= {n.name for n in region}
        if why is None:
            found.kinds.update(kinds)
            found.tokens_per_unit.update({name: sympy.simplify(tokens / unit) for name in kinds})
            split.update({name: True for name in kinds})
        else:
            found.refused[node.name] = why
    return found


def _grow_and_prove(start: fx.Node, dims: dict[str, int | None], split: dict[str, bool],
                    depends: set[str]) -> tuple[list[fx.Node], dict[str, RoutedKind], str | None, Any]:
    """The region around grouped GEMM `start`, grown by the ops that must join it, with its
    nodes' kinds and its token count, or why it cannot run per nano-batch."""
    region = _region_of([start], split, depends)
    while True:
        joining = _readers_of_sorted(region, split, depends)
        if not joining:
            tokens = _tokens_of(region, dims, split)
            if tokens is None:
                return region, {}, "its token-wise inputs hold rows of different counts, or none", None
            kinds, why, joining = _prove(region, dims, split, depends, tokens)
            if not joining:
                return region, kinds, why, tokens
        region = _region_of([*region, *joining], split, depends)


def _tokens_of(region: list[fx.Node], dims: dict[str, int | None], split: dict[str, bool]) -> Any:
    """The region's token count T, as an expression: of the rows of the split values its ops read
    (with their rows at dim 0), the count every other is a whole multiple of (`B*S` beside the
    router's flattened `[k*B*S]` ids). None: no such values, or no such count."""
    inside = {n.name for n in region}
    counts = {_expr(meta_val(a).shape[0]) for n in region for a in n.all_input_nodes
              if a.name not in inside and split.get(a.name, a.op == "placeholder") and dims.get(a.name) == 0
              and isinstance(meta_val(a), torch.Tensor) and meta_val(a).dim() >= 1}
    for count in counts:
        if all(sympy.simplify(other / count).is_Integer for other in counts):
            return count
    return None


def _token_dependent(gm: fx.GraphModule, dims: dict[str, int | None], unit: Any) -> set[str]:
    """Tensors whose value depends on a token-carrying value or is sized by the split's count (an
    `arange` over the routed rows). SymInts are not among them: the runtime gives per nano-batch
    the lengths they set."""
    depends: set[str] = set()
    for node in gm.graph.nodes:
        if not isinstance(meta_val(node), (torch.Tensor, tuple, list)):
            continue
        sized = any(isinstance(meta_val(a), torch.SymInt) and unit in meta_val(a).node.expr.free_symbols
                    for a in node.all_input_nodes)
        if dims.get(node.name) is not None or sized or any(a.name in depends for a in node.all_input_nodes):
            depends.add(node.name)
    return depends


def _region_of(starts: list[fx.Node], split: dict[str, bool], depends: set[str]) -> list[fx.Node]:
    """`starts` and the ops left whole that depend on the tokens and connect to them through such
    ops, in graph order."""
    inside = set(starts)
    stack = list(starts)
    while stack:
        node = stack.pop()
        for other in (*node.all_input_nodes, *node.users):
            if (other not in inside and other.op == "call_function" and not split.get(other.name, False)
                    and other.name in depends):
                inside.add(other)
                stack.append(other)
    order = {n: i for i, n in enumerate(starts[0].graph.nodes)}
    return sorted(inside, key=order.__getitem__)


def _readers_of_sorted(region: list[fx.Node], split: dict[str, bool], depends: set[str]) -> set[fx.Node]:
    """The split ops the region's ops read that read a region value or an item of a sort left
    whole: they must join the region. With one expert a token (`[k*T] = [T]`), and over
    sequences (`[k*B*S]` rows hold `B`), a sort's permutation and sorted ids have a split dim, so
    the ops after them (`perm // k`, `empty_like(perm)`, a cast of the ids) split as token-wise,
    reading rows of a whole value that, run per nano-batch, no longer exists (the region grows
    from them to the sort). Other values left whole (a mean over the tokens) they may read in
    pieces: those stay outside."""
    inside = {n.name for n in region}
    # Split ops reading a region value or a whole sort's item, directly or through other ops
    # outside the region: split ones (transformers 5.17 zeroes the gathered rows whose sorted id
    # is past the experts: `masked_fill(hidden[P // k], (sorted_ids >= E).unsqueeze(-1), 0)`), and
    # whole ones, cut off from the region by split ones (top 1's `x[P // 1]`, whole, read by a
    # slice and a clamp, split as row-wise, before the grouped GEMM). In graph order.
    reads: set[str] = set()
    for n in region[0].graph.nodes:
        if n.op == "call_function" and n.name not in inside and any(
                b.name in inside or (_is_sort_item(b) and b.name in depends and split.get(b.name) is False)
                or b.name in reads for b in n.all_input_nodes):
            reads.add(n.name)
    return {a for node in region for a in node.all_input_nodes if a.name in reads}


def _is_sort_item(node: fx.Node) -> bool:
    return (node.target is operator.getitem and isinstance(node.args[0], fx.Node)
            and node.args[0].target in (aten.sort.default, aten.sort.stable))


def _prove(region: list[fx.Node], dims: dict[str, int | None], split: dict[str, bool], depends: set[str],
           tokens: Any) -> tuple[dict[str, RoutedKind], str | None, set[fx.Node]]:
    """Each node's kind (the region's tokens `tokens` rows, an expression), or why the region
    cannot run per nano-batch; or else the ops reading it that must join it first (its values
    read outside that are not the tokens' rows in their order)."""
    kinds: dict[str, RoutedKind] = {}
    inside = {n.name for n in region}
    for node in region:
        kind = _kind_of(node, kinds, dims, split, depends, tokens)
        if kind is None:
            return {}, (f"{node.name} ({op_name(node)}) in its routing is not an op the split can run "
                        "per nano-batch"), set()
        kinds[node.name] = kind
    for node in region:
        outside = [u for u in node.users if u.name not in inside]
        if outside:
            kind, val = kinds[node.name], meta_val(node)
            in_token_order = (kind.name == "rows" and kind.k == 1 and dims.get(node.name) == 0
                              and isinstance(val, torch.Tensor) and _is_count(val.shape[0], tokens))
            if not in_token_order:
                if all(u.op == "call_function" for u in outside):
                    return {}, None, set(outside)
                return {}, (f"{node.name}, read outside the routing by {outside[0].name}, is not the tokens' rows in "
                            "their order"), set()
    return kinds, None, set()


def _rows_per_token(a: Any, dims: dict[str, int | None], split: dict[str, bool], tokens: Any) -> int | None:
    """k, for a split value with its rows at dim 0, k of them a token (`T` rows: 1; over
    sequences, the router's flattened `[k*B*S]` ids split too, each sequence's block of them
    whole); None for any other value."""
    if not isinstance(a, fx.Node) or not split.get(a.name, a.op == "placeholder") or dims.get(a.name) != 0:
        return None
    val = meta_val(a)
    if not isinstance(val, torch.Tensor) or val.dim() < 1:
        return None
    return _per_token(val.shape[0], tokens)


def _per_token(size: Any, tokens: Any) -> int | None:
    """k when `size` is k >= 1 times the token count (compared as expressions), else None."""
    ratio = sympy.simplify(_expr(size) / tokens)
    return int(ratio) if ratio.is_Integer and ratio >= 1 else None


def _same_numel(a: Any, b: Any) -> bool:
    """Whether two lists of sizes hold as many elements (compared as expressions)."""
    return sympy.simplify(sympy.Mul(*(_expr(x) for x in a)) - sympy.Mul(*(_expr(y) for y in b))) == 0


def _expr(size: Any) -> Any:
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)


def _is_count(size: Any, tokens: Any, times: int = 1) -> bool:
    """Whether a size is `times` tokens (sizes compared as expressions: comparing SymInts would
    guard on them)."""
    return sympy.simplify(_expr(size) - times * tokens) == 0


def _same_sizes(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(sympy.simplify(_expr(x) - _expr(y)) == 0 for x, y in zip(a, b))


def _kind_of(node: fx.Node, kinds: dict[str, RoutedKind], dims: dict[str, int | None], split: dict[str, bool],
             depends: set[str], tokens: Any) -> RoutedKind | None:
    """The kind of a region node's value from its inputs' kinds (None: not known to keep rows)."""

    def kind(a: Any) -> RoutedKind | None:
        if isinstance(a, fx.Node):
            if a.name in kinds:
                return kinds[a.name]
            k = _rows_per_token(a, dims, split, tokens)
            if k is not None:
                return RoutedKind("rows", k, ids=_router_ids(a))
        return None

    def token_free(a: Any) -> bool:
        return not isinstance(a, fx.Node) or (a.name not in depends and a.name not in kinds)

    target, args = node.target, node.args
    val = meta_val(node)
    if target in _RESHAPES:
        src, shape = kind(args[0]), meta_val(node).shape
        src_val = meta_val(args[0])
        if src is None or src.name not in _ROW_KINDS:
            return None
        if len(shape) >= 1 and _same_sizes(shape[:1], src_val.shape[:1]) and _same_numel(shape[1:], src_val.shape[1:]):
            return src  # each row's elements regrouped (`[k*T] -> [k*T, 1]`), rows where they were
        if (src.name == "rows" and src_val.dim() >= 2 and len(shape) >= 1 and type(src_val.shape[1]) is int
                and _is_count(src_val.shape[0], tokens, src.k) and _is_count(shape[0], tokens, src.k * src_val.shape[1])
                and _same_numel(shape[1:], src_val.shape[2:])):
            # [T, k, ...] -> [k*T, ...]: token order kept (top-k ids flattened, or each token's
            # rows repeated k times, ERGO's)
            return RoutedKind("rows", src.k * src_val.shape[1], ids=src.ids)
        if (src.name == "rows" and src_val.dim() >= 1 and len(shape) == src_val.dim() + 1 and type(shape[1]) is int
                and src.k == shape[1] and _is_count(shape[0], tokens) and _same_sizes(shape[2:], src_val.shape[1:])):
            return RoutedKind("rows", 1)  # [k*T, ...] -> [T, k, ...]
        return None
    if target in (aten.sort.default, aten.sort.stable):
        bound = bind_arguments(node)
        src = kind(args[0])
        if (src is None or src.name not in ("rows", "perm") or meta_val(args[0]).dim() != 1
                or bound.get("dim") not in (0, -1) or bound.get("descending")):  # (groups count in ascending order)
            return None
        if src.name == "perm":  # argsort(P): P's inverse, in its item 1
            return RoutedKind("perm_order", src.k, src.sort)
        return RoutedKind("tuple", src.k, node.name, ids=src.ids)
    if target in _SPLITS:
        # Cut along a dim after the rows (an expert GEMM's gate and up halves): each piece keeps
        # every row where it was.
        src = kind(args[0])
        if src is None or src.name not in ("rows", "sorted") or bind_arguments(node)["dim"] % meta_val(args[0]).dim() == 0:
            return None
        return RoutedKind("pieces", src.k, src.sort, of=src.name)
    if target is operator.getitem:
        src = kind(args[0])
        if src is not None and src.name == "pieces":
            return RoutedKind(src.of, src.k, src.sort)
        if src is not None and src.name == "perm_order":
            return RoutedKind("inverse", src.k, src.sort) if args[1] == 1 else None
        if src is None or src.name != "tuple":
            return None
        if args[1] == 1:
            return RoutedKind("perm", src.k, src.sort)
        if args[1] != 0:
            return None  # (-1 is the permutation too: the items as Dynamo writes them, 0 and 1)
        # Sorted values: ids to count where the sort sorted ids, else values of the sorted rows.
        return RoutedKind("sorted_ids" if src.ids else "sorted", src.k, src.sort)
    if target in (aten.floor_divide.default, aten.div.Tensor_mode):
        src = kind(args[0])
        mode_ok = target is aten.floor_divide.default or node.kwargs.get("rounding_mode") == "floor"
        divisor = bind_arguments(node)["other"]
        if src is not None and src.name == "perm" and mode_ok and type(divisor) is int and divisor == src.k:
            return RoutedKind("token_of", src.k, src.sort)
        if src is not None and src.name == "perm" and mode_ok and type(divisor) is int and divisor == 1:
            return src  # P // 1 (ERGO's, over rows already repeated k times a token)
        return None
    if target is aten.index.Tensor:
        src, indices = args[0], args[1]
        if len(indices) != 1 or not isinstance(indices[0], fx.Node):
            return None
        index = kind(indices[0])
        rows = kind(src)
        if index is None:
            return None
        if index.name == "token_of" and rows is not None and rows.name == "rows" and rows.k == 1:
            return RoutedKind("sorted", index.k, index.sort)  # hidden[P // k]
        if index.name == "perm" and rows is not None and rows.name == "rows" and rows.k == index.k:
            return RoutedKind("sorted", index.k, index.sort)  # w[P]
        if index.name == "sorted_ids" and token_free(src):
            return RoutedKind("sorted", index.k, index.sort)  # an expert bias per sorted row
        if index.name == "rows" and token_free(src):
            return RoutedKind("rows", index.k)  # a table's row per routed row (ERGO's expert norm scales)
        if index.name == "inverse" and rows is not None and rows.name == "sorted" and rows.sort == index.sort:
            return RoutedKind("rows", index.k)  # y[inv]: back in token order
        return None
    if target is aten.histc.default:
        # Fixed bins from 0 up: every sorted row up to `max` is counted, in its own id's group (the
        # ids are never negative, so none drops at the front and shifts the groups after it); rows
        # past `max` come last and are left out, as each nano-batch's are. (min == max would bin
        # over each call's own smallest and largest id: a nano-batch's groups would differ.)
        src, bound = kind(args[0]), bind_arguments(node)
        low, high = bound["min"], bound["max"]
        if (src is None or src.name != "sorted_ids" or not all(type(v) in (int, float) for v in (low, high))
                or low != 0 or not high > 0):
            return None
        return RoutedKind("histogram", 0, src.sort)
    if target is aten.cumsum.default:
        src = kind(args[0])
        if src is not None and src.name == "histogram" and bind_arguments(node)["dim"] in (0, -1):
            return RoutedKind("offsets", 0, src.sort)  # each group's end: a grouped GEMM's offsets
        return None
    if target is aten.empty_like.default:
        src = kind(args[0])
        if src is None or src.name != "perm" or node.kwargs.get("dtype") not in (None, torch.int32, torch.int64):
            return None  # (positions in a narrower type may not fit)
        return RoutedKind("empty", src.k, src.sort)
    if target in _FILLED:
        # A constant per row (`new_ones(rows, [k*T, 1])`: ERGO's unit weights), sized by the rows;
        # its only tensor input, a `new_` op's, gives just the dtype and device.
        k = _per_token(val.shape[0], tokens) if isinstance(val, torch.Tensor) and val.dim() >= 1 else None
        return None if k is None else RoutedKind("rows", k)
    if target is aten.arange.default:
        end = args[0]
        end_val = meta_val(end) if isinstance(end, fx.Node) else end
        if node.kwargs.get("dtype") not in (None, torch.int32, torch.int64):
            return None  # (positions in a narrower type may not fit)
        k = _per_token(end_val, tokens) if isinstance(end_val, torch.SymInt) else None
        return None if k is None else RoutedKind("arange", k)
    if target is aten.index_put.default:
        base, indices, values = kind(args[0]), args[1], kind(args[2])
        accumulate = args[3] if len(args) > 3 else node.kwargs.get("accumulate", False)
        if (base is not None and base.name == "empty" and len(indices) == 1 and not accumulate
                and kind(indices[0]) == RoutedKind("perm", base.k, base.sort)
                and values == RoutedKind("arange", base.k)):
            return RoutedKind("inverse", base.k, base.sort)
        return None
    if op_name(node) == "grouped_gemm":
        bound = bind_arguments(node)
        x, offsets = kind(bound["x"]), kind(bound["offsets"])
        others = [v for name, v in bound.items() if name not in ("x", "offsets")]
        if (x is not None and x.name == "sorted" and offsets == RoutedKind("offsets", 0, x.sort)
                and all(token_free(v) for v in others)):
            return x
        return None
    if target is aten.unsqueeze.default:
        # A new dim after the rows (`w.unsqueeze(-1)`, to scale each row by its weight).
        src = kind(args[0])
        if src is None or src.name not in _ROW_KINDS or bind_arguments(node)["dim"] % meta_val(node).dim() == 0:
            return None
        return RoutedKind("sorted", src.k, src.sort) if src.name == "sorted_ids" else src
    if target in _SAME_ROWS or target in _MONOTONE:
        src = kind(args[0])
        if src is None or src.name in _NO_ROWS or not all(token_free(a) for a in args[1:]):
            return None
        if target in _MONOTONE and src.name not in _ROW_KINDS:
            return None
        if (src.name not in _ROW_KINDS and target is aten._to_copy.default
                and val.dtype not in (torch.int32, torch.int64)):
            return None  # positions cast where they may not fit
        keeps_ids = (val.dtype in _ORDERED_DTYPES if target is aten._to_copy.default else
                     _clamped_not_negative(node) if target in _MONOTONE else True)
        if src.name == "sorted_ids" and not keeps_ids:
            return RoutedKind("sorted", src.k, src.sort)
        return RoutedKind(src.name, src.k, src.sort, ids=src.ids and keeps_ids)
    # Row by row: pointwise ops, and ops acting off dim 0, over values of one kind and one sort
    # (rows in the same order) and values that do not depend on the tokens.
    tensors = [a for a in node.all_input_nodes if isinstance(meta_val(a), torch.Tensor)]
    routed = [kind(a) for a in tensors if not token_free(a)]
    if not routed or any(r is None for r in routed):
        return None
    routed = {RoutedKind(r.name, r.k, r.sort) for r in routed}  # (values computed from ids are no ids)
    if len(routed) != 1:
        return None
    (src,) = routed
    if src.name == "sorted_ids":
        src = RoutedKind("sorted", src.k, src.sort)  # values of the sorted rows, no longer ids to count
    if src.name not in ("sorted", "rows") or not isinstance(val, torch.Tensor) or val.dim() < 1:
        return None
    first = next(a for a in tensors if not token_free(a))
    if not _same_sizes(val.shape[:1], meta_val(first).shape[:1]) or (
            val.dim() != meta_val(first).dim() and target not in _REDUCTIONS):  # (a reduction may drop its dims)
        return None
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        # Broadcasting aligns dims from the right: a routed operand of lower rank would meet
        # another row's dim 0.
        if all(meta_val(a).dim() == val.dim() for a in tensors if not token_free(a)):
            return src
        return None
    if target in _REDUCTIONS:
        reduced = bind_arguments(node).get("dim")
        reduced = [reduced] if isinstance(reduced, int) else list(reduced or [])
        rank = meta_val(args[0]).dim()
        return src if reduced and all(d % rank != 0 for d in reduced) else None
    if target in _ALONG_DIM:
        along = bind_arguments(node)["dim"]
        return src if along % meta_val(args[0]).dim() != 0 else None
    return None


def _clamped_not_negative(node: fx.Node) -> bool:
    """Whether a clamp of values that are not negative leaves them not negative: its upper bound,
    if any, is a number >= 0."""
    bound = bind_arguments(node)
    upper = bound.get("max")
    return upper is None or (isinstance(upper, (int, float)) and upper >= 0)


# Token-wise ops a router's indices may pass through before the routing and stay indices: views
# (top-1's `[T, 1] -> [T]`), copies, and casts that keep their order.
_KEEPS_IDS = {*_RESHAPES, aten.squeeze.dim, aten.squeeze.dims, aten.clone.default, aten.alias.default}
# Ops whose item 1 is the indices of what they picked along a dim: never negative.
_PICKS = {aten.topk.default, aten.max.dim, aten.min.dim}


def _router_ids(node: fx.Node) -> bool:
    """Whether a value is a router's expert indices (never negative): the indices of a top-k (or
    of a max or min, PhiMoE's sparse mixer picking one expert at a time), through `_KEEPS_IDS`
    ops, order-keeping casts and concatenations of such indices, and such indices with some
    replaced by a number not negative (Zaya's "no expert" picks sent to expert 0); or any
    integers modulo a positive number."""
    while True:
        if node.target is operator.getitem:
            src = node.args[0]
            return node.args[1] == 1 and isinstance(src, fx.Node) and src.target in _PICKS
        if node.target is aten.cat.default:
            return all(isinstance(part, fx.Node) and _router_ids(part) for part in node.args[0])
        if node.target is aten.masked_fill.Scalar:
            value = node.args[2]
            if not (type(value) in (int, float) and value >= 0):
                return False
            node = node.args[0]
            if not isinstance(node, fx.Node):
                return False
            continue
        if node.target is aten.remainder.Scalar:
            # Integers modulo a positive number lie in [0, number) whatever they were (floor mod).
            divisor = node.args[1]
            return type(divisor) is int and divisor > 0 and not meta_val(node).dtype.is_floating_point
        if node.target in _KEEPS_IDS or (node.target is aten._to_copy.default
                                         and meta_val(node).dtype in _ORDERED_DTYPES):
            node = node.args[0]
            if not isinstance(node, fx.Node):
                return False
            continue
        return False
