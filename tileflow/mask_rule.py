"""mask_rule: whether a mask a graph builds is the meta-kernel's own causal / sliding-window rule.

The meta-kernel applies its rule from the shapes alone: the query in row i of S sits at key
position S_kv - S + i and sees key j when j <= S_kv - S + i (`causal`) and j > S_kv - S + i - w
(`sliding_window=w`). transformers builds that rule as a tensor for every compiled model that
uses eager attention, or a sliding window, or passes SDPA a mask under `torch.compile` (its
shortcut to `is_causal` is off while tracing): a `[B, 1, S, S_kv]` bool mask of comparisons of
`arange` positions (`kv_idx <= q_idx`, `kv_idx > q_idx - w`, joined by `&` onto a fill of True),
and for eager attention a float `where(mask, 0, lowest)` of it. Every layer then reads an
`[S, S_kv]` bias the kernel does not need: 256 MiB of float32 at 8192 tokens.

`mask_rule` proves such a mask equal to the rule at every size. It reads the mask as a set of
key offsets j - i: each comparison of two positions (`arange` plus a number or a size, moved by
views, unsqueezes, expands and slices, read at positions by an index, continued backwards by a
`cat`) along the query and key dims bounds that offset, as does a `tril` / `triu` (SDPA's
decomposition of `is_causal`: `ones(S, S).tril()`), and `&` intersects their bounds. A
comparison of two values the same everywhere is a fill of True or False: called without a
cache, transformers joins a packed-sequence term, `packed[q] == packed[k]` with `packed =
(diff(positions) != 1).cumsum()`, which over `arange` positions is 0 == 0. The rule
holds when the bounds are exactly the kernel's for the traced sizes (sympy: `kv_idx <= q_idx`
with q at `arange(T) + past` and keys at `arange(past + T)` is the rule for S = T and S_kv =
past + T). A term `&`-ed in that is the same for every query (its query dim of size 1:
transformers' padding term, `attention_mask[batch_idx, kv_idx]`, `[B, 1, 1, S_kv]`) is kept as
the rule's `key_mask`, read by the kernel as its bias: S_kv values a batch row where the mask
held S x S_kv. Anything else (positions passed in, sequences really packed, a bitwise or, a value
broadcast along a dim it varies along, two key terms) is not proven, and the mask stays as it
is. A float mask hides a key with -inf or with its dtype's lowest value, as the
kernel's `bias_ranges` judges a mask it is given: such a key adds nothing to a row that sees a key
above it, and every row of the rule sees its own key (float16's -65504 held in a float32 mask is
an ordinary value, and hides nothing). `where(mask.bool(), lowest, 0)` of such a mask hides the
same keys (MPT fills the scores where the mask is not zero), and so does its clamp at the lowest
value (XGLM clamps the masked scores there: -inf becomes that value). Where a key term hides
every key the rule shows a row (a left-padding row), a mask that hides with -inf (SDPA's
conversion of a bool mask) leaves the row no key, as the kernel does; one that hides with the
dtype's lowest value (transformers' eager masks) gives every score of the row that value, so
eager's softmax weighs all S_kv keys evenly: the rule says so (`empty_rows_average`), and the
attention pass averages V there. Only a lowest value that absorbs the scores does that:
float32's, bfloat16's or float64's (a score short of 2^103 in size leaves it as it is), not
float16's -65504, whose sum with a score of 16 is another number; such a float16 mask stays as
it is. A float term the same for every query, left as it is where such a mask keeps a key and
set to a hiding value where it hides one (Falcon folds its ALiBi into its mask so:
`masked_fill(alibi, eager_mask < -1, lowest)`), is the rule's `key_bias` when it provably holds
no lowest value itself (`graph_utils.holds_no_lowest_value`): the kernel adds it to the keys the
rule and the key mask leave, as eager does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .graph_utils import attribute, bind_arguments, constant_number, holds_no_lowest_value, meta_val, written_in_place

aten = torch.ops.aten

__all__ = ["MaskRule", "mask_rule"]

_DEPTH = 64  # masks are a few dozen ops deep; deeper chains are not a mask built from positions


@dataclass(frozen=True)
class MaskRule:
    """The meta-kernel rule a mask equals: `causal` (keys at or before the query's position),
    with `sliding_window` w or not (only the last w positions, the query's own included); or not
    causal and no window: a mask of all True. With `key_mask` (a bool node whose query dim is 1
    or absent, its other dims 1 or the mask's), the keys it holds False are hidden as well: the
    mask is the rule `&` key_mask. With `empty_rows_average` (a float mask hiding with a finite
    lowest value), a row the rule and the key mask leave no key takes the even average of every
    key's value (eager's softmax over S_kv equal scores), where the kernel would see no key.
    With `key_bias` (a float node the same for every query row, that provably holds no lowest
    value: Falcon's ALiBi folded into its mask), the mask adds it on the keys it keeps: the mask
    is `where(rule & key_mask, key_bias, lowest)`."""

    causal: bool
    sliding_window: int | None
    key_mask: fx.Node | None = None
    empty_rows_average: bool = False
    key_bias: fx.Node | None = None


def mask_rule(mask: Any, q_len: Any, kv_len: Any) -> MaskRule | None:
    """The rule `mask` (an attention mask node: bool, True = attend, or additive; its last two
    dims `[q_len, kv_len]`) equals for every size, or None when that is not proven."""
    if not isinstance(mask, fx.Node):
        return None
    val = meta_val(mask)
    if not (isinstance(val, torch.Tensor) and val.dim() >= 2 and statically_known_true(val.shape[-2] == q_len)):
        return None
    if not statically_known_true(val.shape[-1] == kv_len):
        # (Dynamo gives each layer's cache a length of its own, and the mask is sized by the first
        # layer's: eager would raise on a mismatch that the rule, which reads no mask, could not.)
        return None
    reader = _Reader()
    biased = _key_biased(mask, reader)
    band, key_bias = biased if biased is not None else (reader.kept(mask), None)
    if band is None or len(band.keys) > 1:
        return None  # (two key terms would have to be joined: not a mask transformers builds)
    key_mask = band.keys[0] if band.keys else None
    if key_mask is not None and not _over_keys(mask, key_mask):
        return None
    diagonal = _size(kv_len) - _size(q_len)  # the last query's key offset
    if (band.lo, band.hi) == (-sympy.oo, sympy.oo):
        return MaskRule(False, None, key_mask, band.finite, key_bias)
    if band.hi == sympy.oo or not _zero(band.hi - diagonal):
        return None  # (a window bounded from below only is no mask transformers builds: not taken)
    if band.lo == -sympy.oo:
        return MaskRule(True, None, key_mask, band.finite, key_bias)
    window = sympy.simplify(diagonal - band.lo + 1)
    if not (window.is_Integer and int(window) >= 1):
        return None  # a window that is not a fixed count of keys, or hides the query's own key
    return MaskRule(True, int(window), key_mask, band.finite, key_bias)


def _key_biased(mask: fx.Node, reader: _Reader) -> tuple[_Band | None, fx.Node] | None:
    """`masked_fill(term, hidden, lowest)` or `where(hidden, lowest, term)` with `term` a float
    tensor of the mask's dtype the same for every query row that holds no lowest value (Falcon
    folds its ALiBi into its mask so, `hidden` being `eager_mask < -1`): the band `hidden` leaves
    and the term; None for any other mask. (Only as the mask itself: a term moved by views
    would have to be moved with its band.)"""
    val = meta_val(mask)
    if mask.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        term, hidden, fill = mask.args[:3]
    elif mask.target in _WHERES:
        hidden, fill, term = mask.args[:3]
    else:
        return None
    tv = meta_val(term)
    if not (isinstance(term, fx.Node) and isinstance(tv, torch.Tensor) and tv.dtype == val.dtype
            and _hides(fill, val.dtype) and _same_for_every_query(mask, term) and holds_no_lowest_value(term)):
        return None
    band = _spanning(mask, hidden, reader.shown(hidden))
    # (the hiding values are the fill's, whatever the band's own mask held)
    return _hidden_with(None if band is None else replace(band, finite=False), fill, val.dtype), term


@dataclass(frozen=True)
class _Linear:
    """An integer tensor whose element at an index is `const` plus, for each dim (counted from
    the end), its coefficient times the index along it: `arange(T) + c` is `{-1: 1}`, c."""

    terms: tuple[tuple[int, Any], ...]  # (dim from the end, coefficient), sorted, no zero coefficient
    const: Any


@dataclass(frozen=True)
class _Band:
    """A bool mask over `[..., S, S_kv]` that is True exactly where the key offset j - i of query
    row i and key j lies in [lo, hi] (sympy expressions or infinities) and each of `keys` (bool
    nodes the same for every query: `_over_keys`) is True. `finite`: a float mask with key terms
    that hides with a finite lowest value (`_hidden_with`)."""

    lo: Any
    hi: Any
    keys: tuple[fx.Node, ...] = ()
    finite: bool = False


_EVERYWHERE = _Band(-sympy.oo, sympy.oo)
_NOWHERE = _Band(sympy.oo, -sympy.oo)  # a fill of False (`diff != 1` over positions)
_COMPARISONS = {
    aten.le.Tensor: "le", aten.le.Scalar: "le", aten.lt.Tensor: "lt", aten.lt.Scalar: "lt",
    aten.ge.Tensor: "ge", aten.ge.Scalar: "ge", aten.gt.Tensor: "gt", aten.gt.Scalar: "gt",
    aten.eq.Tensor: "eq", aten.eq.Scalar: "eq", aten.ne.Tensor: "ne", aten.ne.Scalar: "ne",
}
_FLIPPED = {"le": "ge", "lt": "gt", "ge": "le", "gt": "lt", "eq": "eq", "ne": "ne"}
_HOLDS = {"le": lambda k: k <= 0, "lt": lambda k: k < 0, "ge": lambda k: k >= 0, "gt": lambda k: k > 0,
          "eq": lambda k: k == 0, "ne": lambda k: k != 0}
_ANDS = {aten.bitwise_and.Tensor, aten.logical_and.default, aten.mul.Tensor}
_WHERES = {aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar}
_NOTS = {aten.bitwise_not.default, aten.logical_not.default}
_COPIES = {aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default, aten.detach.default,
           aten.contiguous.default}
_CASTS = {aten._to_copy.default, torch.ops.prims.convert_element_type.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_FILLS = {aten.new_ones.default, aten.ones.default, aten.ones_like.default, aten.full.default,
          aten.new_full.default, aten.full_like.default, aten.scalar_tensor.default}
# Where each `_FILLS` op other than the ones-makers takes its fill value.
_FILL_ARGUMENT = {aten.full.default: 1, aten.new_full.default: 2, aten.full_like.default: 1, aten.scalar_tensor.default: 0}
# The largest constant an int32 / int64 position may carry (`_linear`): as much again is left
# for the sizes, below the dtype's wrap.
_OFFSET_BOUND = {torch.int32: 2**30, torch.int64: 2**62}
_ARANGES = {aten.arange.default, aten.arange.start, aten.arange.start_step}
_TRIANGLES = {aten.tril.default, aten.triu.default}
_HOLD_INFINITY = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
# Dtypes whose lowest value absorbs a score (lowest + s == lowest for |s| < 2^103).
_ABSORBING = {torch.bfloat16, torch.float32, torch.float64}
_MOVES = {aten.unsqueeze.default, aten.select.int, aten.squeeze.dim, aten.expand.default, aten.slice.Tensor, *_VIEWS}
_ONES = {aten.ones.default, aten.new_ones.default, aten.ones_like.default}
# The most elements of a constant attribute read as a triangle (`_constant_triangle`): a causal
# buffer of 8192 x 8192.
_CONSTANT_BOUND = 2**26


class _Reader:
    """Reads one mask's nodes as bands and linear positions (memoized per node)."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, fx.Node], Any] = {}

    def memo(self, kind: str, node: Any, read: Callable[[fx.Node, int], Any], depth: int) -> Any:
        if not isinstance(node, fx.Node) or depth > _DEPTH:
            return None
        key = (kind, node)
        if key not in self.seen:
            self.seen[key] = None  # (a cycle cannot happen in a graph; this only bounds re-entry)
            self.seen[key] = read(node, depth + 1)
        return self.seen[key]

    # -- masks: a bool band, or an additive float mask hiding what a band does not keep --------
    def kept(self, node: Any, depth: int = 0) -> _Band | None:
        """The band a mask keeps: a bool mask's True elements, an additive one's zero elements
        (the others hiding: `_hides`), or None."""
        val = meta_val(node)
        if not isinstance(val, torch.Tensor):
            return None
        if val.dtype == torch.bool:
            return self.band(node, depth)
        return self.memo("hiding", node, self._hiding, depth) if val.dtype.is_floating_point else None

    def _hiding(self, node: fx.Node, depth: int) -> _Band | None:
        dtype = meta_val(node).dtype
        if node.target in _WHERES:
            cond, yes, no = node.args[:3]
            if constant_number(yes) == 0 and _hides(no, dtype):
                return _hidden_with(_spanning(node, cond, self.band(cond, depth)), no, dtype)
            if _hides(yes, dtype) and constant_number(no) == 0 and isinstance(cond, fx.Node) and cond.target in _NOTS:
                # where(~keep, -inf, 0): SDPA's own conversion
                band = _spanning(node, cond, _spanning(cond, cond.args[0], self.band(cond.args[0], depth)))
                return _hidden_with(band, yes, dtype)
            if _hides(yes, dtype) and constant_number(no) == 0 and _floats_as_bool(cond):
                # where(bool(mask), lowest, 0): a float mask is nonzero exactly where it hides (0
                # where it keeps: `kept`), as MPT's `masked_fill(mask.bool(), lowest)` reads it
                band = _spanning(node, cond, _spanning(cond, cond.args[0], self.kept(cond.args[0], depth)))
                return _hidden_with(band, yes, dtype)
            return None
        if (node.target is aten.clamp_min.default and _hides(node.args[1], dtype)
                and meta_val(node.args[0]).dtype == dtype):
            # max(mask, c) with c hiding: kept keys stay at 0, hidden ones end at c (XGLM's scores
            # clamped at the lowest value, -inf becoming it), or as they were for a c of -inf. (Of
            # a float mask: a bool one clamped is its 0s and 1s as numbers, hiding nothing.)
            band = self.kept(node.args[0], depth)
            return band if _minus_infinity(node.args[1], dtype) else _hidden_with(band, node.args[1], dtype)
        if node.target is aten.add.Tensor and all(
                isinstance(a, fx.Node) and meta_val(a).dtype == dtype for a in node.args[:2]) and node.kwargs.get("alpha", 1) == 1:
            a, b = (_spanning(node, x, self.kept(x, depth)) for x in node.args[:2])
            if a is None or b is None or a.keys or b.keys:
                # (beside another mask's lowest value, a key term's -inf rows are no longer
                # rows that see nothing: eager averages that mask's keys there)
                return None
            return _intersect(a, b)  # hidden by either: hidden
        if node.target in _FILLS:
            # A fill hides every key or none: `full((S, S), -inf)` before its `triu(1)`.
            fill = 1 if node.target in _ONES else node.args[_FILL_ARGUMENT[node.target]]
            return _NOWHERE if _hides(fill, dtype) else _EVERYWHERE if constant_number(fill) == 0 else None
        if node.target in _TRIANGLES:
            # triu(m, d) sets m to 0 (keeps the key) where j - i < d and leaves m where j - i >= d
            # (tril: where j - i > d, and j - i <= d): `full((S, S), -inf).triu(1)` keeps j - i <= 0.
            # Only of an m that hides every key or none; of any other, the keys kept are a union.
            inner = self.kept(node.args[0], depth)
            d = _diagonal(node)
            if d is None or inner not in (_EVERYWHERE, _NOWHERE):
                return None
            if inner == _EVERYWHERE:
                return _EVERYWHERE
            return _Band(-sympy.oo, d - 1) if node.target is aten.triu.default else _Band(d + 1, sympy.oo)
        if node.target in _CASTS:
            # Into a dtype whose lowest is no lower, a hiding value still hides (float32's lowest
            # becomes float16's -inf); float16's lowest in float32 is an ordinary value, and a
            # bool cast to float (0 or 1) hides nothing. Only dtypes that hold -inf: float8's
            # e4m3fn saturates it to -448, its fnuz kinds make it NaN.
            source = meta_val(node.args[0]).dtype
            keeps = (dtype in _HOLD_INFINITY and source in _HOLD_INFINITY
                     and torch.finfo(dtype).min >= torch.finfo(source).min)
            band = self.kept(node.args[0], depth) if keeps else None
            if band is not None and band.finite and torch.finfo(dtype).min > torch.finfo(source).min:
                return replace(band, finite=False)  # a lowest value past the new dtype's: -inf
            return band
        return self.moved(node, self.kept, depth)

    def shown(self, hidden: Any, depth: int = 0) -> _Band | None:
        """The band a bool mask node is False on: that of `~keep`'s `keep`, or of a float mask
        `m` that `m < c` (or `<=`) marks where it hides, c between its dtype's lowest value and 0
        (Falcon's `eager_mask < -1`); else None."""
        if not isinstance(hidden, fx.Node):
            return None
        if hidden.target in _NOTS:
            return _spanning(hidden, hidden.args[0], self.band(hidden.args[0], depth))
        if hidden.target in (aten.lt.Scalar, aten.le.Scalar) and isinstance(hidden.args[0], fx.Node):
            mv, c = meta_val(hidden.args[0]), constant_number(hidden.args[1])
            if not (isinstance(mv, torch.Tensor) and mv.dtype.is_floating_point and c is not None):
                return None
            # kept keys hold 0, hidden ones -inf or the lowest value: only the hidden are below c
            # (torch compares in the mask's dtype, where c rounds: -1e-50 to -0.0, a number just
            # above float32's lowest to that lowest)
            c = torch.tensor(c, dtype=mv.dtype).item()
            below = torch.finfo(mv.dtype).min < c and (c <= 0 if hidden.target is aten.lt.Scalar else c < 0)
            return _spanning(hidden, hidden.args[0], self.kept(hidden.args[0], depth)) if below else None
        return None

    def band(self, node: Any, depth: int = 0) -> _Band | None:
        """The band a bool mask node is True on, or None."""
        return self.memo("band", node, self._band, depth)

    def _band(self, node: fx.Node, depth: int) -> _Band | None:
        val = meta_val(node)
        if not (isinstance(val, torch.Tensor) and val.dtype == torch.bool):
            return None
        other = constant_number(node.args[1]) if node.target in (aten.eq.Scalar, aten.ne.Scalar) else None
        if other in (0, 1):
            # A tensor of 0s and 1s compared with 0 or 1 (nanoGPT's `bias[:, :, :T, :T] == 0`,
            # True where its causal buffer hides a key): its 1s, or where they are not.
            ones = self.ones(node.args[0], depth)
            if ones is not None:
                return ones if (other == 1) == (node.target is aten.eq.Scalar) else _complement(ones)
        if node.target in _COMPARISONS:
            return self.compared(node, _COMPARISONS[node.target], depth)
        if node.target in _NOTS:
            # ~tril(ones(S, S)): the keys above the diagonal (the mask says which keys to hide)
            return _complement(self.band(node.args[0], depth))
        if node.op == "get_attr":
            return _constant_triangle(node)
        if node.target in _ANDS:
            a, b = (self.conjunct(node, x, depth) for x in node.args[:2])
            return None if a is None or b is None else _intersect(a, b)
        if node.target in _FILLS:
            return _EVERYWHERE if _filled_with_true(node) else None
        if node.target in _TRIANGLES:
            # (SDPA's decomposition of is_causal: `ones(S, S).tril()`)
            return _triangle(node, self.band(node.args[0], depth))
        if node.target in _CASTS:
            return self.ones(node.args[0], depth)  # to bool: True where it is 1 (`tril(ones(T, T)).bool()`)
        return self.moved(node, self.band, depth)

    def ones(self, node: Any, depth: int = 0) -> _Band | None:
        """The band a tensor holding only 0s and 1s (or a bool one) holds its 1s on, or None."""
        return self.memo("ones", node, self._ones, depth)

    def _ones(self, node: fx.Node, depth: int) -> _Band | None:
        val = meta_val(node)
        if not isinstance(val, torch.Tensor) or val.dtype.is_complex:
            return None
        if val.dtype == torch.bool:
            return self.band(node, depth)
        if node.op == "get_attr":
            return _constant_triangle(node)
        if node.target in _ONES:
            return _EVERYWHERE
        if node.target in _TRIANGLES:
            return _triangle(node, self.ones(node.args[0], depth))  # (the 0s it writes are 0s)
        if node.target in _CASTS:
            return self.ones(node.args[0], depth)  # every dtype holds 0 and 1 exactly
        return self.moved(node, self.ones, depth)

    def conjunct(self, node: fx.Node, operand: Any, depth: int) -> _Band | None:
        """An operand of the `&` `node`: its band, or, when it is not one but is the same for
        every query, itself as a key term (True everywhere the term is)."""
        if not isinstance(operand, fx.Node):
            return _truth(operand)
        band = _spanning(node, operand, self.band(operand, depth))
        if band is None and _over_keys(node, operand):
            return _Band(-sympy.oo, sympy.oo, (operand,))
        return band

    def compared(self, node: fx.Node, op: str, depth: int) -> _Band | None:
        """A comparison of two positions, one along the query dim and one along the key dim:
        `j - i + k op 0` bounds the key offset j - i."""
        lhs, rhs = (_spanning(node, x, self.linear(x, depth)) for x in node.args[:2])
        if lhs is None or rhs is None:
            return None
        terms = dict(lhs.terms)
        for dim, coefficient in rhs.terms:
            terms[dim] = terms.get(dim, 0) - coefficient
        terms = {d: c for d, c in terms.items() if c != 0}
        k = sympy.sympify(lhs.const) - sympy.sympify(rhs.const)
        if not terms:  # of two values the same everywhere: a fill of True or False, when k is known
            return (_EVERYWHERE if _HOLDS[op](int(k)) else _NOWHERE) if k.is_Integer else None
        if op == "ne":
            return None  # all but one offset: no band
        if terms == {-1: -1, -2: 1}:
            k, op = -k, _FLIPPED[op]  # i - j + k op 0  <=>  j - i - k op' 0
        elif terms != {-1: 1, -2: -1}:
            return None
        bound = sympy.simplify(-k)  # j - i op bound
        return {
            "le": _Band(-sympy.oo, bound), "lt": _Band(-sympy.oo, bound - 1), "ge": _Band(bound, sympy.oo),
            "gt": _Band(bound + 1, sympy.oo), "eq": _Band(bound, bound),
        }[op]

    # -- integer positions --------------------------------------------------------------------
    def linear(self, value: Any, depth: int) -> _Linear | None:
        """`value` (a number, a size or an integer tensor node) as a `_Linear`, or None."""
        size = _size(value)
        if size is not None:
            return _Linear((), size)
        return self.memo("linear", value, self._linear, depth)

    def _linear(self, node: fx.Node, depth: int) -> _Linear | None:
        found = self._linear_unbounded(node, depth)
        dtype = meta_val(node).dtype
        if found is not None and dtype in _OFFSET_BOUND:
            # sympy's integers do not wrap; int32 positions offset near 2**31 do (int64 ones near
            # 2**63), within the step's own tokens (a key after the wrap is earlier than every
            # query before it). A constant term within 2**30 (2**62) leaves as much for the
            # sizes; in int32, each size (or Max / Min of sizes) at most once with each sign, as
            # `arange(T) + (S - T)` carries them: a multiple of a size (`s * 2147483`) or a
            # product of two is near 2**31 at some size. Each index is counted once, up or down,
            # as positions count it: a multiple of one (`add(k, q, alpha=2**31 - 3)`, or `q + q`
            # added up) wraps at its second or third value.
            number, sizes = sympy.sympify(found.const).as_coeff_Add()
            if (abs(number) > _OFFSET_BOUND[dtype] or (dtype == torch.int32 and not _one_of_each_sign(sizes))
                    or any(abs(c) != 1 for _, c in found.terms)):
                return None
        return found

    def _linear_unbounded(self, node: fx.Node, depth: int) -> _Linear | None:
        val = meta_val(node)
        if isinstance(val, torch.Tensor) and val.dtype == torch.bool:
            band = self.band(node, depth)  # a fill of True or False counts as 1 or 0
            return _Linear((), sympy.Integer(1 if band == _EVERYWHERE else 0)) if band in (_EVERYWHERE, _NOWHERE) else None
        # Positions in int32 or int64 (sizes fit); a narrower dtype would wrap them.
        if not isinstance(val, torch.Tensor) or val.dtype not in (torch.int32, torch.int64):
            return None
        if val.dim() == 0:
            number = constant_number(node)  # a constant the graph holds (`lift_fresh_copy` of one)
            if number is not None and float(number).is_integer():
                return _Linear((), sympy.Integer(int(number)))
        target = node.target
        if target in _ARANGES:
            args = bind_arguments(node)
            if args.get("step", 1) != 1:
                return None
            start = _size(args.get("start", 0) if target is not aten.arange.default else 0)
            return None if start is None else _Linear(((-1, 1),), start)
        if target in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar):
            a, b = (_spanning(node, x, self.linear(x, depth)) for x in node.args[:2])
            alpha = node.kwargs.get("alpha", 1)
            if a is None or b is None or not isinstance(alpha, int):
                return None
            sign = alpha if target in (aten.add.Tensor, aten.add.Scalar) else -alpha
            return _combined(a, b, sign)
        if target is aten.neg.default:
            a = self.linear(node.args[0], depth)
            return None if a is None else _combined(_Linear((), 0), a, -1)
        if target in _CASTS:
            return self.linear(node.args[0], depth)  # to int32 or int64 (checked above)
        if target is aten.cumsum.default:
            zeros = self.linear(node.args[0], depth)  # a running count of no packed-sequence starts
            return zeros if zeros is not None and not zeros.terms and zeros.const == 0 else None
        if target is aten.index.Tensor:
            return self.indexed(node, depth)
        if target is aten.cat.default:
            return self.continued(node, depth)
        return self.moved(node, self.linear, depth)

    def indexed(self, node: fx.Node, depth: int) -> _Linear | None:
        """`src[i0, .., in-1]` with n index tensors on src's first n dims: src's value at the
        indices (positions read at positions: transformers' `position_ids[batch_idx, q_idx]`).
        Indices must be known not negative (a negative one counts from the end)."""
        src, indices = node.args[0], node.args[1]
        src_val, out_val = meta_val(src), meta_val(node)
        source = self.linear(src, depth)
        if source is None or not indices or any(
                not isinstance(i, fx.Node) or meta_val(i).dtype not in (torch.int32, torch.int64) for i in indices):
            return None  # (a bool index selects elements: not a position)
        n, r_src, r_out = len(indices), src_val.dim(), out_val.dim()
        r_b = r_out - (r_src - n)  # the indices' broadcast dims come first, then src's other dims
        const = sympy.sympify(source.const)
        terms: dict[int, Any] = {}
        for d, c in source.terms:
            at = r_src + d
            if at >= n:  # a dim not indexed: output dim r_b + (at - n)
                terms[r_b + at - n - r_out] = terms.get(r_b + at - n - r_out, 0) + c
                continue
            index = indices[at]
            value = self.linear(index, depth)
            iv = meta_val(index)
            if value is None or sympy.sympify(value.const).is_nonnegative is not True or any(k < 0 for _, k in value.terms):
                return None
            if any(not statically_known_true(iv.shape[e] == out_val.shape[r_b + e]) for e, _ in value.terms):
                return None  # broadcast along a dim it varies along
            const += c * sympy.sympify(value.const)
            for e, k in value.terms:
                terms[r_b + e - r_out] = terms.get(r_b + e - r_out, 0) + c * k
        return _Linear(tuple(sorted((d, c) for d, c in terms.items() if c != 0)), const)

    def continued(self, node: fx.Node, depth: int) -> _Linear | None:
        """`cat` of pieces along a dim that are one position together (`cat([pos[:1] - 1, pos])`,
        torch.diff's `prepend`): the last piece's values, extended back over the others."""
        pieces, out_val = node.args[0], meta_val(node)
        dim = node.args[1] if len(node.args) > 1 else 0
        dim = dim - out_val.dim() if dim >= 0 else dim
        values = [self.linear(p, depth) if meta_val(p).dim() == out_val.dim() else None for p in pieces]
        if not pieces or any(v is None for v in values):
            return None
        offsets, at = [], sympy.Integer(0)
        for p in pieces:
            offsets.append(at)
            at += sympy.sympify(_expr(meta_val(p).shape[dim]))
        last = values[-1]
        slope = dict(last.terms).get(dim, 0)
        whole = _Linear(last.terms, sympy.sympify(last.const) - slope * offsets[-1])
        for value, offset, p in zip(values[:-1], offsets, pieces):
            own = dict(value.terms)
            if not statically_known_true(meta_val(p).shape[dim] == 1) and own.get(dim, 0) != slope:
                return None
            own.pop(dim, None)
            if own != {d: c for d, c in whole.terms if d != dim} or not _zero(
                    sympy.sympify(value.const) - (whole.const + slope * offset)):
                return None
        return whole

    # -- ops that move dims -------------------------------------------------------------------
    def moved(self, node: fx.Node, read: Callable[[Any, int], Any], depth: int) -> Any:
        """What `read` gives for `node` when it is a copy, unsqueeze, view, expand or slice of
        another value: that value's, its dims renumbered (None when a dim it varies along is
        broadcast, merged or cut, or, for a band, no longer the last two)."""
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        src_val, out_val = meta_val(node.args[0]), meta_val(node)
        if not (isinstance(src_val, torch.Tensor) and isinstance(out_val, torch.Tensor)):
            return None
        if node.target in _COPIES or (node.target in _CASTS and src_val.dtype == out_val.dtype):
            return read(node.args[0], depth)
        source = read(node.args[0], depth)
        if source is None:
            return None
        if node.target not in _MOVES or (isinstance(source, _Band) and source.keys and node.target is not aten.expand.default):
            return None  # (only an expand keeps a key term's dims where the mask's are)
        dims = _varying_dims(source)
        if not dims:
            return source  # a fill, or a number: the same wherever it is moved
        mapping = _dim_map(node, src_val, out_val, dims)
        if mapping is None:
            return None
        shift = _slice_shift(node, src_val)
        if isinstance(source, _Band):  # still over the last two dims, each still from index 0
            return source if mapping == {-2: -2, -1: -1} and all(shift.get(d, 0) == 0 for d in (-2, -1)) else None
        const = sympy.sympify(source.const)
        for dim, coefficient in source.terms:
            const += coefficient * shift.get(dim, 0)
        return _Linear(tuple(sorted((mapping[d], c) for d, c in source.terms)), const)


def _diagonal(node: fx.Node) -> Any:
    """The diagonal `d` of a `tril`/`triu` node (0 when not given), or None when it is no size."""
    return _size(node.args[1] if len(node.args) > 1 else 0)


def _triangle(node: fx.Node, inner: _Band | None) -> _Band | None:
    """The band `tril(x, d)` or `triu(x, d)` (`node`) holds of a bool x (or one of 0s and 1s) that
    holds `inner`: tril keeps x where j - i <= d, triu where j - i >= d, and sets the rest False."""
    d = _diagonal(node)
    if inner is None or d is None:
        return None
    return _intersect(inner, _Band(-sympy.oo, d) if node.target is aten.tril.default else _Band(d, sympy.oo))


def _complement(band: _Band | None) -> _Band | None:
    """Where a bool mask holding `band` is False, or None when that is no band (a window's two
    sides, key terms). Offsets and bounds are integers (positions, sizes, triangles' diagonals):
    j - i <= hi fails exactly where j - i >= hi + 1."""
    if band is None or band.keys:
        return None
    if band in (_EVERYWHERE, _NOWHERE):
        return _NOWHERE if band == _EVERYWHERE else _EVERYWHERE
    if band.lo == -sympy.oo and band.hi != sympy.oo:
        return _Band(band.hi + 1, sympy.oo)
    if band.hi == sympy.oo and band.lo != -sympy.oo:
        return _Band(-sympy.oo, band.lo - 1)
    return None


def _constant_triangle(node: fx.Node) -> _Band | None:
    """The band of a constant attribute of 0s and 1s (or bools) whose every `[R, C]` plane is
    `tril(ones(R, C), d)` for one d, read from its values: nanoGPT's causal buffer
    `tril(ones(T, T)).view(1, 1, T, T)` as an exported program holds it (a get_attr); None for
    any other tensor, and for one an op of the graph writes. (Values are read as constants only
    here, as `constant_values` reads attributes; torch.compile passes a module's buffers as graph
    inputs, which may change between calls without a recompile, and are never read.) The band is
    exact over the attribute's own shape; moved, only slices from 0 keep it (`moved`)."""
    val = meta_val(node)
    if not (isinstance(val, torch.Tensor) and val.dim() >= 2) or node in written_in_place(node.graph):
        return None
    try:
        value = attribute(node.graph.owning_module, str(node.target))
    except AttributeError:
        return None
    with unset_fake_temporarily():  # a real attribute, even while a pass runs under fake tensors
        if not (isinstance(value, torch.Tensor) and value.dim() >= 2 and 0 < value.numel() <= _CONSTANT_BOUND
                and not value.dtype.is_complex and tuple(value.shape) == tuple(val.shape)):
            return None
        value = value.detach().cpu()
        rows, cols = value.shape[-2:]
        counts = (value.reshape(-1, rows, cols)[0] != 0).sum(-1).tolist()  # the 1s of each row
        first = next((r for r, c in enumerate(counts) if c), None)
        if first is None:
            return _NOWHERE if not value.any() else None
        d = counts[first] - 1 - first  # row r of tril(ones, d) holds min(max(r + d + 1, 0), C) ones
        pattern = torch.ones(rows, cols, dtype=torch.bool).tril(d).to(value.dtype)
        if not torch.equal(value, pattern.expand_as(value)):
            return None
    return _Band(-sympy.oo, sympy.Integer(d))


def _over_keys(out: fx.Node, operand: fx.Node) -> bool:
    """Whether `operand`, a bool tensor `out` broadcasts, is the same for every query (see
    `_same_for_every_query`)."""
    val = meta_val(operand)
    return isinstance(val, torch.Tensor) and val.dtype == torch.bool and _same_for_every_query(out, operand)


def _same_for_every_query(out: fx.Node, operand: fx.Node) -> bool:
    """Whether `operand`, a tensor `out` broadcasts, is the same for every query: its query dim
    (the second to last) of size 1 or absent, its other dims of size 1 or `out`'s."""
    src, dst = meta_val(operand), meta_val(out)
    if not (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and 1 <= src.dim() <= dst.dim()):
        return False
    if src.dim() >= 2 and not statically_known_true(src.shape[-2] == 1):
        return False
    return all(statically_known_true(src.shape[-i] == 1) or statically_known_true(src.shape[-i] == dst.shape[-i])
               for i in range(1, src.dim() + 1))


def _hidden_with(band: _Band | None, hiding: Any, dtype: torch.dtype) -> _Band | None:
    """`band` as a float mask of `dtype` hiding with `hiding` (a value `_hides`). With key terms
    and a finite value, marked `finite` where that value absorbs the scores, else None (see the
    module's docstring): a row the key terms hide whole averages every key in eager."""
    if band is None or not band.keys:
        return band
    if _minus_infinity(hiding, dtype):
        return replace(band, finite=False)
    return replace(band, finite=True) if dtype in _ABSORBING else None


def _minus_infinity(value: Any, dtype: torch.dtype) -> bool:
    """Whether the number `value` is -inf held in `dtype` (-1e39 is, in float32)."""
    return torch.tensor(constant_number(value), dtype=dtype).item() == float("-inf")


def _floats_as_bool(node: Any) -> bool:
    """Whether `node` casts a float tensor to bool (True where it is not zero)."""
    return (isinstance(node, fx.Node) and node.target in _CASTS and meta_val(node).dtype == torch.bool
            and isinstance(node.args[0], fx.Node) and meta_val(node.args[0]).dtype.is_floating_point)


def _varying_dims(value: _Linear | _Band) -> tuple[int, ...]:
    if isinstance(value, _Band):
        # (A band's key terms are checked against the whole mask at the end: `_over_keys`.)
        return () if (value.lo, value.hi) in ((-sympy.oo, sympy.oo), (sympy.oo, -sympy.oo)) else (-2, -1)
    return tuple(d for d, _ in value.terms)


def _spanning(out: fx.Node, operand: Any, value: Any) -> Any:
    """`value` (read from `operand`) as an operand of `out`, or None when `out` broadcasts a dim
    it varies along (`arange(1)` against T query rows: one position, not the row index)."""
    if value is None or not isinstance(operand, fx.Node):
        return value
    src, dst = meta_val(operand), meta_val(out)
    dims = _varying_dims(value)
    if dims and not (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.dim() >= -min(dims)
                     and all(statically_known_true(src.shape[d] == dst.shape[d]) for d in dims)):
        return None
    return value


def _dim_map(node: fx.Node, src: torch.Tensor, out: torch.Tensor, dims: tuple[int, ...]) -> dict[int, int] | None:
    """Where each of `dims` (counted from the end of `src`) lies in `out` after `node`, or None
    when the op is not one that keeps them (or broadcasts one of them)."""
    r_in, r_out = src.dim(), out.dim()
    if any(d < -r_in for d in dims):
        return None
    target = node.target
    if target is aten.unsqueeze.default:
        at = node.args[1] + r_out if node.args[1] < 0 else node.args[1]
        return {d: (d if at <= r_in + d else d - 1) for d in dims}
    if target in (aten.select.int, aten.squeeze.dim):
        at = node.args[1] + r_in if node.args[1] < 0 else node.args[1]
        if target is aten.squeeze.dim and not statically_known_true(src.shape[at] == 1):
            return None  # (squeezing a dim of another size is a no-op: not met here)
        if at in (r_in + d for d in dims):
            return None  # the dim it varies along is taken away
        return {d: (d if at < r_in + d else d + 1) for d in dims}
    if target is aten.expand.default:
        kept = all(statically_known_true(src.shape[d] == out.shape[d]) for d in dims)
        return {d: d for d in dims} if kept else None
    if target is aten.slice.Tensor:
        dim = node.args[1] if len(node.args) > 1 else 0
        dim = dim - r_in if dim >= 0 else dim
        step = node.args[4] if len(node.args) > 4 else 1
        if step != 1 or (dim in dims and _slice_shift(node, src).get(dim) is None):
            return None
        return {d: d for d in dims}
    if target in _VIEWS:
        # Only size-1 dims come or go: the k-th dim of another size maps to the k-th again.
        src_big = [i for i in range(r_in) if not statically_known_true(src.shape[i] == 1)]
        out_big = [i for i in range(r_out) if not statically_known_true(out.shape[i] == 1)]
        if len(src_big) != len(out_big) or not all(
                statically_known_true(src.shape[a] == out.shape[b]) for a, b in zip(src_big, out_big)):
            return None
        where = dict(zip(src_big, out_big))
        if any(r_in + d not in where for d in dims):
            return None
        return {d: where[r_in + d] - r_out for d in dims}
    return None


def _slice_shift(node: fx.Node, src: torch.Tensor) -> dict[int, Any]:
    """For a slice from a start of 0 or more: {its dim from the end: start}; {} for other ops."""
    if node.target is not aten.slice.Tensor:
        return {}
    dim = node.args[1] if len(node.args) > 1 else 0
    dim = dim - src.dim() if dim >= 0 else dim
    start = _size(node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0)
    if start is None or start.is_nonnegative is not True:
        return {dim: None}  # (a negative start counts from the end: an offset that depends on the size)
    return {dim: start}


def _one_of_each_sign(sizes: Any) -> bool:
    """Whether the sympy expression `sizes` adds at most one size (a symbol, or a Max / Min of
    them) and subtracts at most one: within one size of 0 (int32 positions, `_linear`)."""
    if sizes == 0:
        return True
    terms = sizes.as_coefficients_dict()
    if not all(isinstance(t, (sympy.Symbol, sympy.Max, sympy.Min)) and c in (1, -1) for t, c in terms.items()):
        return False
    return sum(1 for c in terms.values() if c == 1) <= 1 and sum(1 for c in terms.values() if c == -1) <= 1


def _combined(a: _Linear, b: _Linear, sign: int) -> _Linear:
    """a + sign * b."""
    terms = dict(a.terms)
    for dim, coefficient in b.terms:
        terms[dim] = terms.get(dim, 0) + sign * coefficient
    return _Linear(tuple(sorted((d, c) for d, c in terms.items() if c != 0)),
                   sympy.sympify(a.const) + sign * sympy.sympify(b.const))


def _intersect(a: _Band, b: _Band) -> _Band | None:
    """Where both bands hold; None when which bound is tighter is not known at every size."""
    lo, hi = _tighter(a.lo, b.lo, max), _tighter(a.hi, b.hi, min)
    return None if lo is None or hi is None else _Band(lo, hi, a.keys + tuple(k for k in b.keys if k not in a.keys))


def _tighter(x: Any, y: Any, pick: Callable[[Any, Any], Any]) -> Any:
    """The tighter of two bounds (`pick` is max for lower bounds, min for upper ones), or None
    when that depends on the sizes."""
    if not (x.is_finite and y.is_finite):
        return (sympy.Max if pick is max else sympy.Min)(x, y)  # an infinite bound never binds
    gap = sympy.simplify(x - y)
    if not gap.is_number:
        return None  # bounds that cross at some size
    return x if pick(gap, 0) == gap else y


def _zero(expr: Any) -> bool:
    return sympy.simplify(expr) == 0


def _expr(value: Any) -> Any:
    return value.node.expr if isinstance(value, torch.SymInt) else value


def _size(value: Any) -> Any:
    """An int, a SymInt or a node holding one, as a sympy expression (a SymInt's as its shape
    environment evaluates it from what it knows of its symbols' ranges: a cache layer's sliding
    window, a symbol of at least 2, makes its key offset `Max(0, 1 - w)` 0); None for anything else."""
    value = meta_val(value) if isinstance(value, fx.Node) else value
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        return None
    if isinstance(value, torch.SymInt):
        evaluate = getattr(value.node.shape_env, "_maybe_evaluate_static", None)
        known = evaluate(value.node.expr) if evaluate is not None else None
        if known is not None:
            return sympy.sympify(known)
    return sympy.sympify(_expr(value))


def _hides(value: Any, dtype: torch.dtype) -> bool:
    """Whether `value`, held in a mask of `dtype`, hides a key: -inf, or the dtype's lowest value
    (which `bias_ranges` hides in a row that sees a key above it, and every row of the rule sees
    its own key at 0)."""
    number = constant_number(value)
    return number is not None and torch.tensor(number, dtype=dtype).item() <= torch.finfo(dtype).min


def _truth(value: Any) -> _Band | None:
    return _EVERYWHERE if value is True else None


def _filled_with_true(node: fx.Node) -> bool:
    """`new_ones`/`ones`/`ones_like` of bool, or a bool `full`/`new_full`/`full_like`/`scalar_tensor` of True."""
    if node.target in (aten.new_ones.default, aten.ones.default, aten.ones_like.default):
        return True  # (bool: checked by the caller)
    fill = node.args[_FILL_ARGUMENT[node.target]]
    return fill is True or (isinstance(fill, (int, float)) and fill != 0)
