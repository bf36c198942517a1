"""padding_hazard: whether a step run padded to a token bucket still gives the real rows exactly.

`Config.cuda_graphs` replays a step captured at a bucket of B tokens for every call of T <= B
tokens: the call's rows are copied into rows 0..T-1 of the static inputs, rows T..B-1 hold
padding, and the outputs are cut back to T rows. That is right only when no real output element
reads a padded row. Token-wise ops (GEMMs on the rows, elementwise ops, norms over features)
keep rows apart, and so does causal attention of the tokens (padding comes after every real key); a
bidirectional attention, a mean over the tokens or a read of the last row does not.

The analysis walks the graph once. A dim is a *token dim* when its size is `T + a` with `a` free
of T (`a` > 0: a prefix of rows that are not tokens, such as a cache, before them; padding is at
the end either way), or `c * T` (c sequences flattened, each padded at its end). A value is
*clean* when each element whose token-dim indices are all real equals the unpadded run's; every
op below keeps that or names why not. Facts let masks through: a *position* (an integer tensor
equal to its token index plus a constant, as `arange`), *causal* (a mask whose elements with key
index past the query index are masked, as `kv_pos <= q_pos`), a mask's *diagonal* (True where
query and key are one token, as `kv_pos > q_pos - w` or `seq[q] == seq[k]`), and a tensor's
*fill* (one value everywhere). A mask filled with -inf hides padded keys once causal; one filled
with the dtype's lowest value only when its diagonal holds too (a row seeing no key would
average every key). What the walk does not know is a hazard: the step is then never replayed
padded (`tileflow.compiler` captures it only at exact token counts). So is an assert
(`_assert_async`) on values computed from padded rows: it reaches no output, but a replay runs
it over the padded rows too, where it may fail though the call's rows pass. Unless it reads
only a few light ops (no GEMM or attention): then the compiler may take it out of the replayed
graph and run it on each call's own rows before the replay (`check_padding(...,
split_asserts=True)`, `PaddingCheck.unpadded_asserts`).

Positions and fills hold at every element, a replay's padded rows included (its `arange` runs
over the bucket's rows; an input's padded rows hold `PAD_VALUE` instead, so an input is neither);
a position is one only where its dtype holds every such value exactly (`_Walk.representable`).
The walk carries them through slices from a fixed row (`pos[1:]`, `pos[:, :1] - 1`; one row is a
fill), a cat that continues a position backwards (torch.diff's `prepend`), indexing at the same
or an earlier token (`x[arange(1, T) - 1]`), integer arithmetic on fills, and sums, differences
and comparisons of positions on one token dim (`_Walk.known`): `pos[1:] == pos[:-1] + 1` is a fill
of True, and `all` of True (or `any` of False) is known at any size. A position clamped from below
(`before = (arange(T) - 1).clamp(min=0)`: each token's previous one, token 0 its own; no tensor of
T - 1 elements, on whose size Dynamo would guard) indexes earlier rows too, and compares with
itself plus a number, or a position read at it, as positions do (`_Walk.floored`). An assert
whose condition is so known is no hazard: it passes in a replay exactly when it passes in the call.
tileflow_causal's check that no token sees the one after it (transformers' packed-sequence mask
at adjacent tokens) is one when the model computes its positions from `arange` (no position ids
passed); over position ids passed in it is not known (its causal rule compares them, unknown at
padded rows), so it runs on the call's rows before the replay. Its packed sequences' key starts,
a running max over earlier tokens (`cummax`, a scan), keep real rows' own.

A lookup of a fixed table (an embedding, `index_select`, an index) at positions reads row t + c
for token t: a replay at bucket B reads rows up to B - 1 + c, past the table when it has fewer
rows, an index error (on a GPU a device-side assert) where the call itself reads none. Such a
step is captured only at buckets of at most rows - c tokens (`PaddingCheck.max_bucket`).
Indices computed from the inputs must name a row at padded rows too (`ids - 1` would read row
-1): inputs are padded with `PAD_VALUE` (0), and the walk carries what each integer value holds
at padded rows (`_Facts.pad`) through copies, views and elementwise ops, which it evaluates at
their operands' padded values.

Mixture-of-experts routing moves rows out of token order and back (transformers' grouped-GEMM
experts): the router's top-k expert ids, flattened token-major ([T, k] -> [k*T]: row r belongs to
token r // k, padding at the end; a batch's [b*T, k] -> [b*T*k], each sequence's block padded at
its end), are sorted; the sort's permutation P gathers the rows, each
expert's rows go through one grouped GEMM whose group offsets count the sorted ids (ascending,
each once, the offsets splitting the rows), and the inverse of P puts the rows back. A value's
*order* records such a layout: token-major with k rows per token (in one block of tokens or
several), or gathered by P (row j computed from row P[j] alone). Where the padded rows sit does
not matter to the sort: each run's indices address its own layout, and a row's group is its id.
Gathered rows meet only row-wise ops and values gathered by the same P. Over several blocks P's
values number rows of a layout padded per block (b*T*k + t*k + s, a replay's b*B*k + ..): they
are used only to index rows, never as values.
Counts of the sorted ids and the inverse of P depend on where the padded rows sorted: they are
accepted only as a grouped GEMM's offsets, where row j's group is its own sorted id in either
run, and as the index that puts rows back (`inv[P] = arange`, or `argsort(P)`; `route`: how an
integer tensor relates to a sort).

Padded rows hold finite values computed from the (finite) pad value. The walk assumes their
arithmetic stays in range as real rows' does (it does not guard against overflow, as `exp` of a
large value; so a sigmoid, `1 / (1 + exp(-x))`, is positive in a dtype that holds 1 over float32's
largest value), and guards only against ops undefined at some finite values: `1/x`, `log` or
`rsqrt` at 0, `sqrt` of a negative, a fractional power, `acos` past 1 (`_DOMAINS`) may make
padded rows inf or NaN where real rows are finite (`nonfinite`, passed on to every value computed
from them), and so may an infinite fill that covers the padded rows (`masked_fill(~keep, -inf)`
of a mask padded with False: a softmax over the row is NaN; `puts_infinity`). Attention gives
padded keys weight 0, but the kernel still multiplies that 0 by their
values (0 * NaN = NaN), and under a finite (lowest-value) mask adds the mask to their scores
(NaN + lowest = NaN): such values may not be an attention's V, nor its K under a finite mask (a
bool or -inf mask and the causal flag skip the padded keys' scores). What the walk knows of
values' signs proves the usual forms defined: RMSNorm's `x * rsqrt(mean(x^2) + eps)`, `x /
norm.clamp_min(eps)`, a router's top-k weights over their sum (a softmax's top-k keep its
largest element, at least 1/n; `peak`). An eps that Dynamo passes as a 0-d input (a model's
float attribute under `dynamic=True`) is taken as positive, and the replay checks it at each call
(`PaddingCheck.positive_inputs`).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .graph_utils import (
    ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER, WAIT_TENSOR, any_ancestor, attribute, bind_arguments, meta_val, same_shape,
    viewed_by, written_arguments,
)

aten = torch.ops.aten

__all__ = ["PAD_VALUE", "PaddingCheck", "capped_buckets", "check_padding", "padding_hazard"]

# What a replay writes into the padded rows of its inputs (`CudaGraphBuckets`' default): 0 is a
# valid index of any table, and positive in no divisor.
PAD_VALUE = 0


@dataclass(frozen=True)
class _Facts:
    """What the walk knows of one value (see the module docstring)."""

    hazard: str | None = None
    position: Any = None  # int tensor with one token dim: value = token index + position
    causal: tuple[int, int] | None = None  # (query dim, key dim), masked past the diagonal
    fill: float | None = None  # the one value every element holds (a constant or a filled tensor)
    # Dims (q, k) whose diagonal (same token index) is True in a bool mask; "all": True everywhere.
    diagonal: tuple[int, int] | str | None = None
    visible: float | None = None  # of a causal additive mask: the value every visible key holds
    hidden: float | None = None  # of a causal additive mask: the most any hidden key holds (`_hides`)
    # One token dim: the value at token index t is the node's at t, its other dims read at the
    # index nodes of `selector` (None: not indexed): (node, selector).
    row_source: tuple[fx.Node, tuple[Any, ...]] | None = None
    # The layout of the one token dim when it is not the plain one: ("major", k) for k rows per
    # token in token order, ("gathered", sort) for rows permuted by a sort's indices.
    order: tuple[str, Any] | None = None
    route: _Route | None = None  # how an integer tensor relates to a sort (module docstring)
    key_range: int | None = None  # integer values in [0, key_range) (top-k indices of a fixed dim)
    parts: tuple[_Facts, ...] | None = None  # of an op returning several tensors, one per output
    # Value facts (`_Walk.valued`), for finite inputs: "positive" or "non-negative" when every
    # element is; a dim along which every slice holds a positive element (a softmax's); and the
    # op that may leave inf or NaN in the padded rows of a float value (module docstring).
    sign: str | None = None
    peak: int | None = None
    nonfinite: str | None = None
    # Of an integer or bool value with a token dim: the one value every padded element holds
    # (`_Walk.padded_value`); None when not known.
    pad: int | bool | None = None


_CLEAN = _Facts()


@dataclass(frozen=True)
class _Route:
    """An integer tensor's relation to `sort` (the node sorting a token-major vector of `count`
    rows per token): `perm` (its indices P), `token` (P // count: the token of each gathered row),
    `inverse` (P's inverse), `sorted` (its values), `histogram` and `offsets` (counts of the sorted
    values per key, and their running sum: they include the padded rows), or `iota` (0, 1, ... over
    a token-major dim; `sort` None)."""

    kind: str
    sort: fx.Node | None
    count: int


@dataclass(frozen=True)
class _Blocks:
    """A token dim of c * T rows: c sequences of T rows, flattened (a batch of c before a GEMM).
    Padding sits at the end of every block, so only row-wise ops keep it apart; anything that
    relies on padding at the end of the dim (slices, scans, attention over it) refuses it."""

    count: int


# Ops whose output dims are their input's, moved or kept (views and copies).
_SAME_DIMS = {
    aten.clone.default, aten._to_copy.default, aten.alias.default, aten.detach.default,
    aten.contiguous.default, aten.lift_fresh_copy.default, torch.ops.prims.convert_element_type.default,
} | ({WAIT_TENSOR} if WAIT_TENSOR is not None else set())  # a collective's wait returns its tensor
# A tensor-parallel all-reduce: each element reduced over the ranks, which all replay one call at
# one bucket, so real elements reduce real ones. Its values are other ranks' too: no value fact
# (fill, position, padded value) carries over.
_ACROSS_RANKS = {ALL_REDUCE} if ALL_REDUCE is not None else set()
# A gather (the ranks' tensors stacked along dim 0) and a reduce-scatter (dim 0 cut among them):
# so too when the tokens lie along another dim (`_Walk.along_ranks`).
_ALONG_RANKS = {op for op in (ALL_GATHER, REDUCE_SCATTER) if op is not None}
# Elementwise ops without the pointwise tag: `copy` (functionalized in-place copies), where
# with scalar branches, `polar` (Llama-4's complex RoPE factors) and `floor_divide` (its attention
# chunks, `pos // chunk`).
_ELEMENTWISE = {aten.copy.default, aten.where.Scalar, aten.where.ScalarOther, aten.where.ScalarSelf, aten.polar.default,
                aten.floor_divide.default}
_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
# Ops reading along their `dim` argument (every dim when it is None or empty): reductions,
# softmaxes and splits are fine along feature dims only; scans read only earlier rows, so a
# token dim is fine too.
_ALONG = {
    aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction,
    aten.std.correction, aten.max.dim, aten.min.dim, aten.argmax.default, aten.argmin.default,
    aten.topk.default, aten.sort.default, aten._softmax.default, aten.softmax.int, aten._log_softmax.default,
    aten.log_softmax.int, aten.prod.dim_int, aten.any.dim, aten.all.dim, aten.logsumexp.default,
    aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default,
    aten.linalg_vector_norm.default,
}
_SCANS = {aten.cumsum.default, aten.cumprod.default, aten.cummax.default, aten.cummin.default}
# Reductions of bools whose value a fill decides at any size (`all` of True, `any` of False).
_ALL = {aten.all.default, aten.all.dim, aten.all.dims}
_ANY = {aten.any.default, aten.any.dim, aten.any.dims}
# Elementwise ops whose values `_Walk.known` computes from positions: sums, differences, comparisons.
_AFFINE = {aten.add.Tensor, aten.sub.Tensor, aten.eq.Tensor, aten.ne.Tensor, aten.le.Tensor, aten.lt.Tensor,
           aten.ge.Tensor, aten.gt.Tensor}
# Values `_Walk.known` computes with stay within this bound, so that they (and a bucket's worth of
# positions beyond them) are exact in every integer dtype; integer divisions are not evaluated.
_KNOWN_BOUND = 2**20
_DIVISIONS = {aten.div.Tensor, aten.div.Tensor_mode, aten.div.Scalar, aten.div.Scalar_mode, aten.floor_divide.default,
              aten.remainder.Tensor, aten.remainder.Scalar, aten.fmod.Tensor, aten.fmod.Scalar}
# Run-time checks of a tensor's value: no output, but they run in a replay too.
_ASSERTS = {aten._assert_async.default, aten._assert_async.msg}
# An assert a replay would run over padded rows may instead run on the call's own rows before it
# (`PaddingCheck.unpadded_asserts`), uncaptured: when what it reads is a few light ops, so that
# running them again costs launches, not work (`_Walk.light_check`).
_MOST_CHECK_OPS = 64
_HEAVY_OPS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "mv", "addmv", "dot", "vdot", "linear", "_int_mm",
              "_scaled_mm", "convolution", "_convolution", "cdist", "_cdist_forward", "_euclidean_dist",
              "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward",
              "_grouped_mm"}
_HEAVY_PREFIXES = ("linalg_", "_linalg_", "fft_", "_fft_")  # decompositions, solves, transforms
_LIGHT_LINALG = {"linalg_vector_norm"}  # a reduction (`x.norm()`)
# Comparisons that build masks (True = attend): of two positions, `key <= query` and its mirror
# images (the first set takes the key first); `==` of one row's values read at query and key.
_KEY_FIRST = {aten.le.Tensor, aten.lt.Tensor}
_COMPARE = _KEY_FIRST | {aten.ge.Tensor, aten.gt.Tensor, aten.eq.Tensor}
_AND = {aten.bitwise_and.Tensor, aten.logical_and.default, aten.mul.Tensor}
# Ops whose value `_Walk.floored` may know: a clamp from below, numbers added, a read at the indices.
_FLOORED_OPS = {aten.clamp_min.default, aten.clamp.default, aten.add.Tensor, aten.sub.Tensor, aten.index.Tensor}
# Whether a comparison holds, from the difference of its operands (first minus second).
_COMPARISONS: dict[Any, Callable[[Any], bool]] = {
    aten.eq.Tensor: lambda d: bool(d == 0), aten.ne.Tensor: lambda d: bool(d != 0), aten.le.Tensor: lambda d: bool(d <= 0),
    aten.lt.Tensor: lambda d: bool(d < 0), aten.ge.Tensor: lambda d: bool(d >= 0), aten.gt.Tensor: lambda d: bool(d > 0)}
_ATTENTION = {"meta_attention"}
# Ops that pick indices along a dim (their output 1, or their output): below its size, whatever
# they were computed from.
_PICKS = {aten.topk.default, aten.sort.default, aten.sort.stable, aten.max.dim, aten.min.dim}
_ARG_PICKS = {aten.argmax.default, aten.argmin.default, aten.argsort.default, aten.argsort.stable}


def _picks_indices(node: fx.Node) -> bool:
    """Indices along a fixed dim: an arg-max's, or output 1 of a sort or top-k (their values, output
    0, are not)."""
    return node.op == "call_function" and (node.target in _ARG_PICKS or (
        node.target is operator.getitem and node.args[1] == 1 and getattr(node.args[0], "target", None) in _PICKS))
def _picked_size(node: fx.Node) -> Any:
    """The size of the dim a `_picks_indices` node picks along (None for an arg-max over every
    element)."""
    op = node if node.target in _ARG_PICKS else node.args[0]
    source = meta_val(op.args[0])
    dim = bind_arguments(op).get("dim", -1 if op.target not in _ARG_PICKS else None)
    return source.numel() if dim is None else source.shape[dim]
# Ops that fill a tensor with one value: the value, or the argument that holds it (None: none).
_FILLS: dict[Any, Any] = {
    aten.full.default: "fill_value", aten.new_full.default: "fill_value", aten.full_like.default: "fill_value",
    aten.scalar_tensor.default: "s", aten.zeros.default: 0, aten.new_zeros.default: 0, aten.zeros_like.default: 0,
    aten.ones.default: 1, aten.new_ones.default: 1, aten.ones_like.default: 1, aten.empty.memory_format: None,
    aten.new_empty.default: None, aten.empty_like.default: None, aten.empty_permuted.default: None,
}
# An additive mask's masked value may be the dtype's lowest instead of -inf: exp() of it is 0
# beside any visible key, but a row with no visible key would average all keys, padding too.
# float16's lowest (-65504) is the highest of the float dtypes' lowest values. Whether a mask's
# value hides a key depends on the scores it is added to: in float16 no score reaches past
# float16's range, in a wider dtype one can, so there only a far lower value counts
# (`_lowest_of`; `_Facts.hidden` carries the value to the attention).
_LOWEST = -65504.0


def _lowest_of(dtype: torch.dtype) -> float:
    """The highest value that hides a key beside a visible one in a mask of `dtype`."""
    return _LOWEST if dtype == torch.float16 else -1e30


# Dtypes that hold every position (an index plus a constant) exactly: narrower ones round
# (bfloat16, float16) or wrap (int8, int16, uint8) neighbouring positions together.
_POSITION_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64)
# Ops whose arguments may follow the token count because they are sizes (the output's shape is
# checked); fills, slices and selects check their other arguments themselves.
_SIZE_ARGS = _RESHAPES | {
    aten.expand.default, aten.slice.Tensor, aten.select.int, aten.arange.default, aten.arange.start,
    aten.arange.start_step, aten.full.default, aten.zeros.default, aten.ones.default, aten.empty.memory_format,
    aten.new_ones.default, aten.new_zeros.default, aten.new_empty.default, aten.new_full.default,
    aten.scalar_tensor.default, aten.empty_permuted.default,
}


# Routes whose values depend on where the padded rows sorted, not on one row: usable only as a
# grouped GEMM's offsets (counts) or to index rows back into token order (the inverse).
_RUN_WIDE = {"histogram", "offsets", "inverse"}
_SORTS = {aten.sort.default, aten.sort.stable}
_GROUPED_GEMMS = {"tileflow::grouped_gemm", "transformers::grouped_mm_fallback", "aten::_grouped_mm"}
# Ops that keep each row of their token dim apart (given `_axes` stays off that dim): they may
# take rows in expert order, or token-major ones, and give rows in the same order.
_ROW_WISE = (_SAME_DIMS | _ELEMENTWISE | _ACROSS_RANKS | set(_FILLS) | _ALONG | _SCANS | {
    operator.getitem, aten.transpose.int, aten.permute.default, aten.t.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.slice.Tensor,
    aten.select.int, aten.cat.default, aten.index.Tensor, aten.embedding.default, aten.mm.default,
    aten.bmm.default, aten.matmul.default, aten.linear.default, aten.addmm.default, aten.native_layer_norm.default,
    aten.layer_norm.default, aten.gather.default, aten.scatter.value, aten.scatter.src,
    aten.slice_scatter.default, aten.select_scatter.default, aten.constant_pad_nd.default,
})


# Ops undefined (inf or NaN) at some finite values of one argument, and the sign that keeps it in
# their domain: "positive" where 0 is a pole (1/0, log 0), "non-negative" where only negatives
# are outside (sqrt), None where no sign does (acos past 1). A divisor is checked only when it
# carries tokens: one the same for every row divides real rows by its zeros too. (`pow`:
# `_Walk.power_domain`.)
_DOMAINS: dict[Any, tuple[str, str | None]] = {
    aten.div.Tensor: ("other", "positive"), aten.div.Tensor_mode: ("other", "positive"),
    aten.remainder.Tensor: ("other", "positive"), aten.fmod.Tensor: ("other", "positive"),
    aten.floor_divide.default: ("other", "positive"),
    aten.xlogy.Tensor: ("other", "positive"), aten.reciprocal.default: ("self", "positive"),
    aten.rsqrt.default: ("self", "positive"), aten.log.default: ("self", "positive"),
    aten.log2.default: ("self", "positive"), aten.log10.default: ("self", "positive"),
    aten.sqrt.default: ("self", "non-negative"), aten.log1p.default: ("self", "non-negative"),
    # A number over or into a tensor (`3 % x`, `xlogy(2, x)`), and `addcdiv`'s divisor.
    aten.remainder.Scalar_Tensor: ("other", "positive"), aten.xlogy.Scalar_Self: ("other", "positive"),
    aten.special_xlog1py.default: ("other", "non-negative"), aten.special_xlog1py.self_scalar: ("other", "non-negative"),
    aten.addcdiv.default: ("tensor2", "positive"), aten.special_entr.default: ("self", "non-negative"),
    # Poles at 0 (Bessel functions of the second kind), NaN below it.
    **{op: (name, "positive") for op, name in (
        (aten.special_bessel_y0.default, "self"), (aten.special_bessel_y1.default, "self"),
        (aten.special_modified_bessel_k0.default, "self"), (aten.special_modified_bessel_k1.default, "self"),
        (aten.special_scaled_modified_bessel_k0.default, "x"), (aten.special_scaled_modified_bessel_k1.default, "x"))},
    **{op: ("self", None) for op in (
        aten.acos.default, aten.asin.default, aten.atanh.default, aten.acosh.default, aten.erfinv.default,
        aten.logit.default, aten.lgamma.default, aten.digamma.default, aten.polygamma.default,
        aten.mvlgamma.default, aten.special_ndtri.default, aten.igamma.default, aten.igammac.default,
        aten.special_zeta.default, aten.special_zeta.other_scalar)},
    aten.special_zeta.self_scalar: ("other", None),
}
# Ops whose finite values are never negative.
_NON_NEGATIVE = {
    aten.abs.default, aten.exp.default, aten.exp2.default, aten.sigmoid.default, aten.relu.default,
    aten.softplus.default, aten.sqrt.default, aten.rsqrt.default, aten.var.correction, aten.std.correction,
    aten.linalg_vector_norm.default, aten._softmax.default, aten.softmax.int, aten.hardsigmoid.default,
}
# Ops whose values are elements of their first argument's (moved, picked, cast or summed up).
_KEEPS_SIGN = (_SAME_DIMS | _RESHAPES | {
    operator.getitem, aten.transpose.int, aten.permute.default, aten.t.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.slice.Tensor,
    aten.select.int, aten.repeat.default, aten.index.Tensor, aten.gather.default, aten.amax.default,
    aten.amin.default, aten.max.dim, aten.min.dim, aten.topk.default, aten.sort.default, aten.sort.stable,
    aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default, aten.sum.dim_IntList,
    aten.cumsum.default,
})
_SIGNS = (None, "non-negative", "positive")  # weakest first
_WHERES = {aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar}
# Ops whose output elements are elements of their tensor inputs (copies, views, moves, slices).
_KEEPS_PADDING = _SAME_DIMS | _RESHAPES | {
    aten.transpose.int, aten.permute.default, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.slice.Tensor, aten.select.int,
    aten.repeat.default, aten.cat.default, aten.stack.default,
}

# Of those, the ops whose every output element is one input element at the same token indices
# (moved, kept or cut, never broadcast or joined): padded elements of the output are the input's
# along any number of token dims.
_MOVES_ELEMENTS = _SAME_DIMS | {
    aten.transpose.int, aten.permute.default, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default,
}


@dataclass(frozen=True)
class PaddingCheck:
    """`check_padding`'s answer: `hazard`, why a padded run could change a real output element
    (`node: reason`; None when padded rows provably never reach real ones), and `max_bucket`,
    the most tokens a replay may be padded to (None: no bound; see the module docstring), and
    `positive_inputs`, the graph's 0-d float inputs (by position) the proof takes as positive:
    a replay is right only at calls where each holds a positive value. `unpadded_replay`: whether
    a replay at the call's own token count (no padding) would be right despite the hazard (not
    for a step that writes a tensor in place, or returns a tensor with no one dim of T rows).
    `unpadded_asserts`: with `check_padding(..., split_asserts=True)`, the asserts (`_assert_async`)
    over values a replay computes from padded rows too, which are no hazard on condition that
    they leave the replayed graph and run on the call's own rows before each replay
    (`tileflow.graph_utils.split_off_checks`): each reads only a few light ops of the inputs."""

    hazard: str | None
    max_bucket: int | None = None
    positive_inputs: tuple[int, ...] = ()
    unpadded_replay: bool = True
    unpadded_asserts: tuple[fx.Node, ...] = ()


def check_padding(gm: fx.GraphModule, token: Any, *, split_asserts: bool = False) -> PaddingCheck:
    """Whether `gm` may run padded along the token symbol `token` (see `PaddingCheck`). A graph
    that writes any tensor in place is refused too: a replay writes the static copy of an input.
    With `split_asserts`, an assert over values padded rows would change is no hazard when the
    caller can run it apart, on the call's rows (`PaddingCheck.unpadded_asserts`)."""
    never = _output_viewing_an_input(gm) or _random_draw(gm)
    if never:
        return PaddingCheck(never, unpadded_replay=False)
    walk = _Walk(token, split_asserts=split_asserts)
    hazard = walk.run(gm)
    if not hazard:
        return PaddingCheck(None, walk.max_bucket, tuple(sorted(walk.positive_inputs)),
                            unpadded_asserts=tuple(walk.unpadded_asserts))
    # A replay returns each tensor output by its one dim of T rows, padded or not.
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    outputs = [meta_val(a) for a in _flat(output.args[0]) if isinstance(a, fx.Node)]
    unpadded = (not any(written_arguments(n) for n in gm.graph.nodes)
                and all(_one_token_dim(walk.dims(v)) for v in outputs if isinstance(v, torch.Tensor)))
    return PaddingCheck(hazard, unpadded_replay=unpadded)


# Views that reinterpret a contiguous tensor row-major: a copy of one has the view's own strides
# and no offset, from which the caller rebuilds it exactly (`_output_viewing_an_input`).
_ROW_MAJOR_VIEWS = _RESHAPES | {aten.alias.default, aten.detach.default, aten.unsqueeze.default, aten.squeeze.dim,
                                 aten.squeeze.dims, aten.squeeze.default}


def _random_draw(gm: fx.GraphModule) -> str | None:
    """Why no replay of `gm` is right when it draws random numbers (an op tagged
    `nondeterministic_seeded`: `randn`, `rand_like`, dropout, ...): a capture draws them too, and
    a replay from the generator's state then, padded to the bucket's rows, not the call's
    (Reformer seeds its hashing's `randn` at each call: replayed, it hashed with other
    rotations). None when it draws none."""
    for node in gm.graph.nodes:
        if isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags:
            return (f"{node.name}: {node.target.name()} draws random numbers, which a capture draws too and a replay "
                    "draws again, not as the call would")
    return None


def _output_viewing_an_input(gm: fx.GraphModule) -> str | None:
    """Why no replay could return `gm`'s outputs, when one views an input other than as a
    row-major reshape of all of it (`x[:, :1].expand(...)`, `x[:, 2:]`): a replay returns copies
    of the graph's static outputs, and the caller (AOT autograd) rebuilds an output that aliases
    an input from that input at the copy's strides and offset (0), which such a view's are not
    (an expand's stride 0 became the copy's 1: the caller got the input's other columns). None
    when every output that views an input is such a reshape of a contiguous one (`x.view(T, 2, 4)`)."""
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    for value in _flat(output.args[0]):
        if not isinstance(value, fx.Node) or value.op == "placeholder":
            continue
        chain = viewed_by([value])
        bases = [b for b in chain if b.op == "placeholder"]
        if bases and not (all(n.op == "placeholder" or n.target in _ROW_MAJOR_VIEWS for n in chain)
                          and all(isinstance(meta_val(b), torch.Tensor) and meta_val(b).is_contiguous() for b in bases)):
            return (f"{value.name}: an output that views input {bases[0].name} other than as a reshape of all of it, "
                    "which the caller would rebuild wrongly from a replay's copy")
    return None


def _one_token_dim(dims: dict[int, Any] | None) -> bool:
    """Whether a tensor's token dims (`_Walk.dims`) are one dim of exactly T rows."""
    return dims is not None and len(dims) == 1 and all(a == 0 for a in dims.values())


def padding_hazard(gm: fx.GraphModule, token: Any) -> str | None:
    """`check_padding(gm, token).hazard`."""
    return check_padding(gm, token).hazard


def capped_buckets(buckets: Sequence[int], upper: int | None) -> tuple[int, ...]:
    """The token buckets a step may be replayed at when its token count may not exceed `upper`
    (None: no bound): those up to it, and `upper` itself when it falls between two buckets, so
    the counts between the last kept bucket and it are captured too."""
    if upper is None:
        return tuple(buckets)
    kept = [b for b in buckets if b <= upper]
    if upper >= 1 and (not kept or kept[-1] < upper) and upper < max(buckets, default=0):
        kept.append(upper)
    return tuple(kept)


class _Walk:
    """One pass over the graph, node by node, computing each value's `_Facts`."""

    def __init__(self, token: Any, split_asserts: bool = False) -> None:
        self.token = token
        self.split_asserts = split_asserts
        self.unpadded_asserts: list[fx.Node] = []  # (`PaddingCheck.unpadded_asserts`)
        self.facts: dict[fx.Node, _Facts] = {}
        self.max_bucket: int | None = None  # lowest table bound of lookups at positions (module docstring)
        self.positive_inputs: set[int] = set()  # 0-d inputs taken as positive (`PaddingCheck`)
        self.infinities: set[str] = set()  # values that hold an infinite number put there (`puts_infinity`)
        self.placeholders: list[fx.Node] = []

    def run(self, gm: fx.GraphModule) -> str | None:
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node in gm.graph.nodes:
            if node.op == "output":
                for arg in _flat(node.args[0]):
                    if isinstance(arg, fx.Node) and self.facts[arg].hazard:
                        return self.facts[arg].hazard
                for arg in _flat(node.args[0]):
                    if isinstance(arg, fx.Node) and (why := self.uncuttable(meta_val(arg)) or self.unordered(arg)):
                        return f"{arg.name}: {why}"
                return None
            if written_arguments(node):
                # A replay runs on static copies of the inputs: an in-place write would miss the caller's.
                return f"{node.name}: {node.target.name()} writes a tensor in place, and a replayed step would write its copy"
            try:
                facts = self.visit(node)
            except Exception as exc:  # an op shape the walk did not expect: refuse, never guess
                facts = _Facts(hazard=f"{node.name}: not analysed ({type(exc).__name__}: {exc})")
            if facts.position is not None and not self.representable(node, facts.position):
                facts = replace(facts, position=None)
            self.facts[node] = facts
            if node.op == "call_function" and node.target in _ASSERTS and facts.hazard:
                # Reaches no output, but a replay runs it over the padded rows too, where it may
                # fail (a device-side assert on CUDA) though the call's rows pass.
                if self.split_asserts and self.light_check(node):
                    self.unpadded_asserts.append(node)
                    continue
                return f"{node.name}: an assert over values a replay computes from padded rows too ({facts.hazard})"
        return None

    def light_check(self, node: fx.Node) -> bool:
        """Whether the ops an assert reads are few and light enough to run again, uncaptured, on a
        call's own rows (`_MOST_CHECK_OPS`, `_HEAVY_OPS`): ATen's or prims' (and Python's
        arithmetic on sizes), none a GEMM, convolution, distance, decomposition, solve, FFT or
        attention. (None random: a step that draws random numbers is never replayed, `_random_draw`.)"""
        ops: set[fx.Node] = set()
        stack = list(node.all_input_nodes)
        while stack:
            cur = stack.pop()
            if cur in ops or cur.op in ("placeholder", "get_attr"):
                continue
            name = _short_name(cur.target)
            if (cur.op != "call_function" or len(ops) == _MOST_CHECK_OPS or name in _HEAVY_OPS
                    or name.startswith(_HEAVY_PREFIXES) and name not in _LIGHT_LINALG
                    or getattr(cur.target, "namespace", "aten") not in ("aten", "prims")):  # (operator's: none)
                return False
            ops.add(cur)
            stack.extend(cur.all_input_nodes)
        return True

    # -- helpers -------------------------------------------------------------------------------

    def dims(self, value: Any) -> dict[int, Any] | None:
        """Token dims of a tensor as {dim: prefix a} for a size T + a, or {dim: `_Blocks(c)`} for
        c * T (c sequences of T rows, flattened: each block's padding at its end), or None when
        a size depends on T otherwise."""
        out: dict[int, Any] = {}
        if not isinstance(value, torch.Tensor):
            return out
        for d, size in enumerate(value.shape):
            expr = _expr(size)
            if self.token not in getattr(expr, "free_symbols", ()):
                continue
            rest = sympy.expand(expr - self.token)
            if self.token not in rest.free_symbols:
                out[d] = rest
                continue
            c = sympy.simplify(expr / self.token)
            if not (c.is_Integer and c > 1):
                return None
            out[d] = _Blocks(int(c))
        return out

    def computed_from_token_count(self, index: fx.Node) -> bool:
        """Whether `index`'s values come from a tensor the graph sizes by the token count
        (`arange(T)`) or from indices picked along a token dim (a sort of the tokens: below B in
        a replay), other than through the indices a sort, top-k or arg-max picks along a fixed
        dim, which bounds them (experts' ids)."""
        def picked_along_tokens(node: fx.Node) -> bool:
            return _picks_indices(node) and self.depends_on_token(_picked_size(node))

        def picked_along_fixed_dim(node: fx.Node) -> bool:
            return _picks_indices(node) and not picked_along_tokens(node)

        return any_ancestor(index, lambda n: self.sized_by_tokens(n) or picked_along_tokens(n),
                            stop=picked_along_fixed_dim)

    def sized_by_tokens(self, node: fx.Node) -> bool:
        """A tensor the graph makes from sizes alone (`arange(T)`, `ones(B, T)`; not an input) whose
        size follows the token count."""
        value = meta_val(node)
        return (node.op == "call_function" and isinstance(value, torch.Tensor)
                and all(isinstance(meta_val(a), (int, torch.SymInt)) for a in node.all_input_nodes)
                and any(self.token in getattr(_expr(d), "free_symbols", ()) for d in value.shape))

    def depends_on_token(self, value: Any) -> bool:
        """A scalar argument whose value is the token count (or built from it), a comparison of
        it (`T > 4`, a SymBool) too: a replay would keep the bucket's value."""
        return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)) and self.token in _expr(value).free_symbols

    def uncuttable(self, value: Any) -> str | None:
        """Why an output would come back wrong from a replay even with clean values: a replay
        cuts each tensor output back to T rows along its one dim of exactly T rows, and returns
        a number output as captured, except one computed from T alone, which it computes at
        the call's T (`runtime.streams.TokenExpression`)."""
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            symbols = _expr(value).free_symbols
            if self.token in symbols and (symbols != {self.token} or not isinstance(value, torch.SymInt)):
                return ("a number output computed from the token count other than as an int of it alone: a replay "
                        "returns the bucket's")
            return None
        dims = self.dims(value)
        if dims is None or (dims and (len(dims) != 1 or any(a != 0 for a in dims.values()))):
            return (f"an output of shape {tuple(value.shape)}: a replay cuts back only one dim of exactly the "
                    "token count, so its other token-sized dims would keep the padding")
        return None

    def unordered(self, node: fx.Node) -> str | None:
        """Why an output's rows are not where a replay cuts them: permuted, or counts that
        include the padded rows."""
        facts = self.facts[node]
        if facts.order is not None:
            return "an output whose rows are out of token order (routed to experts)"
        if facts.route is not None and facts.route.kind in _RUN_WIDE:
            return "an output of per-expert counts or an inverse permutation, which include the padded rows"
        return None

    def inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a in self.facts]

    def carries_tokens(self, node: fx.Node) -> bool:
        dims = self.dims(meta_val(node))
        return dims is None or bool(dims)

    def hazard_of(self, node: fx.Node) -> str | None:
        return next((self.facts[a].hazard for a in self.inputs(node) if self.facts[a].hazard), None)

    def refuse(self, node: fx.Node, why: str) -> _Facts:
        return _Facts(hazard=f"{node.name}: {why}")

    # -- the walk ------------------------------------------------------------------------------

    def visit(self, node: fx.Node) -> _Facts:
        if node.op == "placeholder":
            # A replay pads an input along its one dim of exactly T rows and copies any other
            # input whole, at the call's size: one with T rows behind a prefix, in blocks or in two
            # dims would meet the bucket's sizes (`CudaGraphBuckets` pads what `token_dim` finds).
            dims = self.dims(meta_val(node))
            if dims is None or (dims and (len(dims) != 1 or any(isinstance(a, _Blocks) or not _equal(a, 0)
                                                                 for a in dims.values()))):
                return self.refuse(node, f"an input of shape {tuple(meta_val(node).shape)}: a replay pads only one "
                                         "dim of exactly the token count, and copies this one whole at the call's size")
            # Padded inputs: their real rows are the call's, their padded ones hold PAD_VALUE.
            return _Facts(pad=PAD_VALUE if dims and not meta_val(node).is_floating_point() else None)
        if node.op == "get_attr":
            value = attribute(node.graph.owning_module, str(node.target))
            with unset_fake_temporarily():  # a real constant, read while the graph's fake mode is active
                one = isinstance(value, torch.Tensor) and value.numel() == 1
                return _Facts(fill=float(value) if one else None)
        if node.op != "call_function":
            return self.refuse(node, f"{node.op} is not analysed")
        hazard = self.hazard_of(node)
        if hazard:
            return _Facts(hazard=hazard)
        routed = self.routed(node)
        facts = self.valued(node, routed if routed is not None else self.ordered(node, self.dispatch(node)))
        return facts if facts.hazard else replace(self.known(node, facts), pad=self.padded_value(node))

    def dispatch(self, node: fx.Node) -> _Facts:
        """The facts of an op's value by what the op is (every op but the routing ones)."""
        val = meta_val(node)
        out_dims = self.dims(val) if isinstance(val, torch.Tensor) else {}
        if out_dims is None and not isinstance(val, (tuple, list)):
            return self.refuse(node, f"its shape {tuple(val.shape)} depends on the token count other than as one "
                                     "dim of T (+ a prefix) rows, so padding would not sit at the end")
        target = node.target
        if target is operator.getitem:
            whole = self.facts[node.args[0]]
            return whole.parts[node.args[1]] if whole.parts is not None else whole
        if target in _ALL or target in _ANY:
            fill = self.facts[node.args[0]].fill
            if fill is not None and (fill != 0) == (target in _ALL):
                # All of True or any of False: so at any size (an empty tensor's too), padded rows included.
                return _Facts(fill=float(fill != 0))
        if not any(self.carries_tokens(a) for a in self.inputs(node)) and not self.uses_token_count(node):
            return self.constant(node)
        name = _short_name(target)
        if target in (aten.arange.default, aten.arange.start, aten.arange.start_step):
            return self.arange(node)
        if not isinstance(val, (torch.Tensor, tuple, list)):
            return _CLEAN  # a size computed from shapes: shapes are the bucket's by design
        if target not in _SIZE_ARGS and self.uses_token_count(node):
            # Only sizes may follow T (fills, slices and selects check their other arguments).
            return self.refuse(node, "uses the token count as a value, which padding changes")
        if target in _FILLS:
            return self.filled(node)
        if target in _SAME_DIMS:
            return self.converted(node)
        if target is aten.where.ScalarSelf:
            return self.lowered(node)
        if target is aten.where.Scalar and isinstance(node.args[0], fx.Node):
            return self.masked_where(node)  # `where(keep, 0., -inf)`: the attention pass's float32 bias
        if target in _ELEMENTWISE or target in _ACROSS_RANKS:
            return _CLEAN  # each element from the same element (broadcast) of clean inputs
        if target in _ALONG_RANKS:
            return self.along_ranks(node)
        if target in (aten.slice_scatter.default, aten.select_scatter.default):
            return self.scattered(node)
        if target is aten.constant_pad_nd.default:
            return self.padded(node)
        if target in _RESHAPES:
            return self.reshape(node)
        if target in (aten.transpose.int, aten.permute.default, aten.t.default, aten.unsqueeze.default,
                      aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default):
            return self.moved(node)
        if target in (aten.slice.Tensor, aten.select.int):
            return self.sliced(node)
        if target in (aten.view_as_complex.default, aten.view_as_real.default):
            return self.complex_view(node)
        if target is aten.repeat.default:
            return self.repeated(node)
        if target is aten.cat.default:
            return self.concatenated(node)
        if target is aten.stack.default:
            return self.stacked(node)
        if target in _ALONG or target in _SCANS:
            return self.along(node)
        if target in (aten.native_layer_norm.default, aten.layer_norm.default):
            return self.layer_norm(node)
        if target is aten.index.Tensor:
            return self.indexed(node)
        if target in (aten.gather.default, aten.scatter.value, aten.scatter.src):
            return self.gathered_along(node)
        if target is aten.embedding.default:
            return self.row_lookup(node, table=node.args[0])
        if target is aten.index_select.default:
            return self.selected(node)
        if target in (aten.mm.default, aten.bmm.default, aten.matmul.default, aten.linear.default,
                      aten.addmm.default):
            return self.matmul(node)
        if target is aten.convolution.default:
            return self.causal_convolution(node)
        if name == "padded_gemm":
            return self.padded_gemm(node)
        if name == "attention_mask_ranges":
            return self.mask_ranges(node)
        if name in _ATTENTION:
            return self.attention(node)
        if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
            return self.pointwise(node)
        return self.refuse(node, f"{name} is not known to keep padded rows apart from real ones")

    # -- values: signs, and inf or NaN in padded rows (module docstring) -----------------------

    def valued(self, node: fx.Node, facts: _Facts) -> _Facts:
        """`facts` with `node`'s value facts (`sign`, `peak`, `nonfinite`)."""
        if facts.hazard:
            return facts
        sign, peak = self.sign_of(node)
        return replace(facts, sign=sign, peak=peak, nonfinite=self.nonfinite_of(node))

    def nonfinite_of(self, node: fx.Node) -> str | None:
        """Where `node`'s padded rows may have got inf or NaN: at `node` itself when its argument
        may leave its domain (`out_of_domain`), else where its inputs' did. A value with no token
        dim has no padded rows, an integer one holds no inf or NaN, and `nan_to_num` clears them."""
        val = meta_val(node)
        floating = isinstance(val, torch.Tensor) and (val.is_floating_point() or val.is_complex())
        if not isinstance(val, (tuple, list)) and not (floating and self.carries_tokens(node)):
            return None
        if self.out_of_domain(node):
            return node.name
        if self.puts_infinity(node):
            # Finite elsewhere, but a padded row may hold nothing else (a mask input padded with
            # False): a softmax over it is NaN there, as `inf - inf` and `0 * inf` are.
            self.infinities.add(node.name)
            return node.name
        if node.target is aten.nan_to_num.default:
            return None
        inputs = self.inputs(node)
        if node.op == "call_function" and _short_name(node.target) in _ATTENTION:
            # A mask's -inf hides keys (a row it hides entirely outputs zeros in meta_attention, not
            # SDPA's NaN), so it never reaches the output: only a mask's other inf or NaN does.
            mask = bind_arguments(node).get("attn_mask")
            if isinstance(mask, fx.Node) and self.facts[mask].nonfinite in self.infinities:
                inputs = [a for a in inputs if a is not mask]
        return next((self.facts[a].nonfinite for a in inputs if self.facts[a].nonfinite), None)

    def puts_infinity(self, node: fx.Node) -> bool:
        """Whether `node` fills every padded element with an infinite (or NaN) number while real
        rows may keep finite ones: `masked_fill(~keep, -inf)` or `where(keep, x, -inf)` of a mask
        whose padded rows are known to select the fill (a bool input pads with False), or are not
        known (`ids.float() > 0.5`: False at padded ids 0). A softmax over such a row is NaN. Not
        counted: a fill whose mask spares each row's largest element, read only by softmaxes
        along that row (PhiMoE's router, `_keeps_each_largest`)."""
        target = node.target

        def padded(arg: Any) -> Any:
            if not isinstance(arg, fx.Node):
                return arg
            return self.facts[arg].pad if self.carries_tokens(arg) else self.facts[arg].fill

        def infinite(arg: Any) -> bool:
            value = self.facts[arg].fill if isinstance(arg, fx.Node) else arg
            return isinstance(value, (int, float)) and not math.isfinite(value)

        if target not in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) and target not in _WHERES:
            return False
        args = bind_arguments(node)
        if target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            mask = padded(args["mask"])
            if mask is None and self.carries_tokens(args["mask"]):
                # Not known at padded rows: it may cover one where it covers no real row.
                return infinite(args["value"]) and not _keeps_each_largest(node)
            return infinite(args["value"]) and mask is True
        if target in _WHERES:
            condition = padded(args["condition"])
            if condition is None:
                return self.carries_tokens(args["condition"]) and (infinite(args["self"]) or infinite(args["other"]))
            return not isinstance(condition, float) and infinite(args["self" if condition else "other"])
        return False

    def out_of_domain(self, node: fx.Node) -> bool:
        """Whether `node` is an op undefined at some finite values (`_DOMAINS`, `pow`'s `domain`)
        whose argument is not provably inside its domain."""
        target = node.target
        if target in (aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar):
            domain = self.power_domain(node)
        else:
            domain = _DOMAINS.get(target)
        if domain is None:
            return False
        name, needed = domain
        value = bind_arguments(node)[name]
        if not isinstance(value, fx.Node) or (target in _DIVISIONS and not self.carries_tokens(value)):
            return False
        return needed is None or _SIGNS.index(self.sign(value, meta_val(node).dtype)) < _SIGNS.index(needed)

    def power_domain(self, node: fx.Node) -> tuple[str, str | None] | None:
        """The argument `pow` needs in its domain and the sign that keeps it there (`_DOMAINS`),
        None when it is defined everywhere: a tensor to a non-negative integer power; else a
        non-negative base to a positive number, a positive one to anything; a number base above
        0 to any exponent, 0 to non-negative ones."""
        args = bind_arguments(node)
        base, exponent = args["self"], args["exponent"]
        if not isinstance(base, fx.Node):
            if not isinstance(base, (int, float)):
                return "exponent", None
            return None if base > 0 else ("exponent", "non-negative" if base == 0 else None)
        if not isinstance(exponent, (int, float)):
            return "self", "positive"
        if float(exponent).is_integer() and exponent >= 0:
            return None
        return "self", "non-negative" if exponent > 0 else "positive"

    def sign(self, value: Any, dtype: torch.dtype) -> str | None:
        """What is known of a number's or a tensor's sign (`_SIGNS`) as a value of `dtype`: a
        positive one below a dtype's smallest value (its own or `dtype`'s) rounds to 0."""
        src = meta_val(value).dtype if isinstance(value, fx.Node) and isinstance(meta_val(value), torch.Tensor) else None
        number = self.facts[value].fill if isinstance(value, fx.Node) else value
        sign = self.facts[value].sign if isinstance(value, fx.Node) else None
        if isinstance(number, (int, float)):
            sign = "positive" if number > 0 else "non-negative" if number == 0 else None
        position = self.facts[value].position if isinstance(value, fx.Node) else None
        if sign is None and position is not None and _provably_le(0, position):
            sign = "non-negative"  # token index + a non-negative offset (Ministral-3's position scaling)
        if sign != "positive":
            return sign
        low = number if isinstance(number, (int, float)) else _smallest(src)
        return "non-negative" if any(low < _smallest(d) for d in (src, dtype) if d is not None) else sign

    def scalar_input(self, value: Any) -> int | None:
        """The position of the 0-d float graph input on the CPU `value` is (maybe cast), or None.
        (Dynamo passes a Python float as such an input; one on a device would cost the replay's
        check a synchronization at every call.)"""
        while isinstance(value, fx.Node) and value.op == "call_function" and value.target in _SAME_DIMS:
            value = value.args[0]
        val = meta_val(value) if isinstance(value, fx.Node) else None
        if (isinstance(val, torch.Tensor) and val.dim() == 0 and val.is_floating_point()
                and val.device.type == "cpu" and value in self.placeholders):
            return self.placeholders.index(value)
        return None

    def sign_of(self, node: fx.Node) -> tuple[str | None, int | None]:
        """`node`'s sign and peak (`_Facts`) when it is a float tensor; a piece of an op's output
        (a top-k's values) has the op's."""
        val = meta_val(node)
        if not isinstance(val, torch.Tensor) or not val.is_floating_point():
            return None, None
        piece = node.target is operator.getitem and isinstance(meta_val(node.args[0]), (tuple, list))
        op = node.args[0] if piece else node
        return self.signed(op, val.dtype), self.peak_of(op)

    def signed(self, op: fx.Node, dtype: torch.dtype) -> str | None:
        """The sign of `op`'s finite values in `dtype`: non-negative ops (`_NON_NEGATIVE`), an
        even power or a square, elements of a tensor kept (`_KEEPS_SIGN`), and sums, products,
        maxima and branches of signed values. A sum or maximum along a `peak` is positive."""
        target = op.target
        if target is aten.sigmoid.default and _smallest(dtype) * torch.finfo(torch.float32).max < 1:
            return "positive"  # exp(-x) in range (module docstring): 1 / (1 + exp(-x)) holds at least 1 / max
        if target is aten.softplus.default and not (
                isinstance(beta := bind_arguments(op).get("beta", 1), (int, float)) and beta > 0):
            return None  # log(1 + exp(beta * x)) / beta: negative for a negative beta
        if target is aten.sqrt.default and self.sign(op.args[0], dtype) == "positive":
            # sqrt(x) >= x for x <= 1: a positive value's root does not round to 0 (Gemma-3n's
            # AltUp divides by `sqrt(mean(x ** 2).clamp(min=1e-5))`).
            return "positive"
        if target in _NON_NEGATIVE:
            return "non-negative"
        if not isinstance(target, torch._ops.OpOverload) and target is not operator.getitem:
            return None
        args = list(bind_arguments(op).values()) if target is not operator.getitem else list(op.args)
        signs = [self.sign(a, dtype) for a in (*args, None, None)[:2]]
        weakest, strongest = min(signs, key=_SIGNS.index), max(signs, key=_SIGNS.index)
        if (target in (aten.sum.dim_IntList, aten.amax.default, aten.max.dim) and self.facts[op.args[0]].peak in _axes(op)
                and (target is not aten.sum.dim_IntList or signs[0] is not None)):
            return "positive"
        if target in _KEEPS_SIGN:
            return signs[0]
        if target is aten.mean.dim:
            return min(signs[0], "non-negative", key=_SIGNS.index)
        if target in (aten.floor.default, aten.ceil.default, aten.trunc.default, aten.round.default):
            return min(signs[0], "non-negative", key=_SIGNS.index)  # a positive value may round to 0
        if target in (aten.add.Tensor, aten.add.Scalar) and _is_int(args[2], 1):
            # x + c: at least c. A 0-d float input c (a model's eps Dynamo passes as a number
            # under `dynamic=True`) is taken as positive, and the replay checks it at every call.
            for c in (0, 1):
                if signs[1 - c] is not None and signs[c] is None and (index := self.scalar_input(args[c])) is not None:
                    self.positive_inputs.add(index)
                    return "positive"
            return strongest if _SIGNS.index(weakest) else None
        if target in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            # (A product of positive values may round to 0.)
            return "non-negative" if _SIGNS.index(weakest) or args[0] is args[1] else None
        if target is aten.pow.Tensor_Scalar and isinstance(args[1], (int, float)) and float(args[1]).is_integer():
            return "positive" if args[1] == 0 else "non-negative" if args[1] % 2 == 0 or signs[0] else None
        if target in (aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor):
            return "non-negative" if signs[0] else None
        if target in (aten.clamp_min.default, aten.maximum.default, aten.clamp.default, aten.clamp.Tensor):
            # At least either, and at most a clamp's `max`.
            high = args[2] if target in (aten.clamp.default, aten.clamp.Tensor) else None
            return strongest if high is None else min(strongest, self.sign(high, dtype), key=_SIGNS.index)
        if target in (aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar,
                      aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            branches = args[::2] if target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) else args[1:3]
            return min((self.sign(a, dtype) for a in branches), key=_SIGNS.index)
        if target in (aten.cat.default, aten.stack.default):
            return min((self.sign(a, dtype) for a in args[0]), key=_SIGNS.index)
        return None

    def peak_of(self, op: fx.Node) -> int | None:
        """A dim along which every slice of `op`'s float value holds a positive element: a
        softmax's (its largest element is at least 1/n), kept by a float copy and by the values of
        a sort, or a top-k of the largest, along it."""
        target = op.target
        if target in (aten._softmax.default, aten.softmax.int):
            return bind_arguments(op)["dim"] % max(meta_val(op).dim(), 1)
        if not isinstance(target, torch._ops.OpOverload) or not op.args or not isinstance(op.args[0], fx.Node):
            return None
        peak = self.facts[op.args[0]].peak
        if target in _SAME_DIMS and meta_val(op.args[0]).is_floating_point():
            return peak
        args = bind_arguments(op)
        if target in (aten.topk.default, *_SORTS) and args.get("largest", True) and peak is not None and (
                peak == args["dim"] % max(meta_val(op.args[0]).dim(), 1)):
            return peak
        return None

    # -- values known at every element, padded rows included: positions and fills ------------

    def known(self, node: fx.Node, facts: _Facts) -> _Facts:
        """`facts` with what an elementwise op's value holds at every element, a replay's padded
        rows included, when its operands' values are known there (`affine`): a fill of integer or
        bool operands that are fills (evaluated at their values); a position plus or minus a fill
        or number (a position); the difference of two positions on one token dim (a fill), and
        their comparison (a fill of True or False: `pos[1:] == pos[:-1] + 1`)."""
        target, val = node.target, meta_val(node)
        if (facts.fill is not None or facts.position is not None or not isinstance(val, torch.Tensor)
                or not (target in _ELEMENTWISE or (isinstance(target, torch._ops.OpOverload)
                                                   and torch.Tag.pointwise in target.tags))):
            return facts
        args = bind_arguments(node)
        nodes = {name: a for name, a in args.items() if isinstance(a, fx.Node)}
        if not nodes or not all(isinstance(meta_val(a), torch.Tensor) for a in nodes.values()):
            return facts
        if (target in _DIVISIONS or not all(self.small(a) for a in nodes.values())
                or any(isinstance(v, (int, float)) and abs(v) > _KNOWN_BOUND for v in args.values())):
            # Large or float values may wrap or round inside a bucket; an integer division may
            # trap (min // -1) or fault (x // 0) where it is evaluated: left unknown.
            return facts
        if all(not _floating(meta_val(a).dtype) and self.facts[a].fill is not None for a in nodes.values()):
            # Integer arithmetic and comparisons of small values: exact, and the same on every
            # device (divisions were left out above).
            if _floating(val.dtype):
                return facts
            value = _evaluated(node, {name: self.facts[a].fill for name, a in nodes.items()})
            return facts if value is None or abs(value) > _KNOWN_BOUND else replace(facts, fill=float(value))
        if target not in _AFFINE or val.dtype not in _POSITION_DTYPES and val.dtype != torch.bool:
            return facts
        rank = val.dim()
        if target in _COMPARISONS:
            low, high = self.floored(args["self"], rank), self.floored(args["other"], rank)
            if low is not None and high is not None and low[2] == high[2] and _equal(low[0], high[0]):
                # max(t + g, 0) + c1 against max(t + g, 0) + c2: of c1 - c2 alone, as positions.
                difference = sympy.simplify(low[1] - high[1])
                return replace(facts, fill=float(_COMPARISONS[target](difference))) if difference.is_Integer else facts
        first, second = self.affine(args["self"], rank), self.affine(args["other"], rank)
        if first is None or second is None or first[0] + second[0] == 0:
            return facts
        if first[0] and second[0] and first[2] != second[2]:
            return facts  # positions along different dims (a mask: `compared`)
        dims = (first if first[0] else second)[2]
        if target in (aten.add.Tensor, aten.sub.Tensor):
            alpha = args.get("alpha", 1)
            if type(alpha) is not int or val.dtype == torch.bool:
                return facts
            sign = alpha if target is aten.add.Tensor else -alpha
            k, c = first[0] + sign * second[0], sympy.simplify(first[1] + sign * second[1])
            if k == 1 and (self.dims(val) or {}) == dims:
                return replace(facts, position=c)
            if k == 0 and c.is_Integer:
                return replace(facts, fill=float(c))
            return facts
        # A comparison of two positions on one token dim: of their offsets alone.
        difference = sympy.simplify(first[1] - second[1])
        if not (first[0] == second[0] == 1 and difference.is_number and difference.is_real):
            return facts
        return replace(facts, fill=float(_COMPARISONS[target](difference)))

    def small(self, node: fx.Node) -> bool:
        """Whether `node`'s known value is exact in its dtype at every row a replay runs (up to
        `_KNOWN_BOUND`): an integer fill, or a position of an integer dtype with a small offset.
        A float position rounds, and a large one wraps, inside a bucket (2**24 + 1 in float32):
        not used (no fact, so the value is unknown)."""
        facts, val = self.facts[node], meta_val(node)
        if not isinstance(val, torch.Tensor):
            return True
        if facts.fill is not None:
            return abs(facts.fill) <= _KNOWN_BOUND
        if facts.position is not None:
            c = sympy.sympify(facts.position)
            return not _floating(val.dtype) and c.is_Integer and abs(int(c)) <= _KNOWN_BOUND
        return True

    def representable(self, node: fx.Node, position: Any) -> bool:
        """Whether a position's values are exact in `node`'s dtype at every row a replay runs, so
        that it may be one at all (every rule that makes a position relies on this): any in
        int64; in int32 or a float dtype, only with a constant part within `_KNOWN_BOUND` (int32
        wraps past 2**31, float32 rounds past 2**24: `arange(T) + 2**24 - 2**24` holds 0, 0, 2,
        4, 4, ...). A symbolic part is a size (a cache's length), taken to stay in range as sizes do."""
        val = meta_val(node)
        if not isinstance(val, torch.Tensor) or val.dtype == torch.int64:
            return True
        constant, _ = sympy.sympify(position).as_coeff_Add()
        return bool(constant.is_number and abs(constant) <= _KNOWN_BOUND)

    def exact(self, node: fx.Node) -> bool:
        """Whether a position's values are exact whole numbers at every row a replay runs, where a
        comparison of them builds a mask: in int64 (no model offsets positions near 2**63), and in
        a narrower or float dtype with an integer offset (one within `_KNOWN_BOUND`, as every
        position there is: `representable`); not with a size in it, which may reach past 2**24."""
        c = sympy.sympify(self.facts[node].position)
        return meta_val(node).dtype == torch.int64 or bool(c.is_Integer)

    def affine(self, value: Any, rank: int) -> tuple[int, Any, dict[int, Any] | None] | None:
        """An operand of an elementwise op of `rank` dims as (k, c, dims) when each element holds
        k * its token index + c, in a replay too: (1, c, its token dim aligned to the output's) of a
        position, (0, c, None) of an integer fill or number. None otherwise."""
        if not isinstance(value, fx.Node):
            if type(value) is int or isinstance(value, torch.SymInt) and not self.depends_on_token(value):
                return 0, sympy.sympify(_expr(value)), None
            return None
        facts, val = self.facts[value], meta_val(value)
        if not isinstance(val, torch.Tensor):
            return None
        if facts.position is not None:
            dims = self.dims(val)
            if not dims or len(dims) != 1:
                return None
            shift = rank - val.dim()
            return 1, sympy.sympify(facts.position), {d + shift: a for d, a in dims.items()}
        if facts.fill is not None and float(facts.fill).is_integer() and not _floating(val.dtype):
            return 0, sympy.Integer(int(facts.fill)), None
        return None

    def floored(self, value: Any, rank: int) -> tuple[Any, Any, dict[int, Any]] | None:
        """An integer operand of an op of `rank` dims as (g, c, dims) when each element holds
        max(t + g, 0) + c at its token index t, in a replay too: a position clamped from below by
        a number (`(arange(T) - 1).clamp(min=0)`, the index of each token's previous one, token 0
        its own), plus or minus numbers. Read from the ops themselves (no fact carries it through
        views): None for anything else, and for a c past `_KNOWN_BOUND` (it may wrap in a bucket)."""
        if (not isinstance(value, fx.Node) or value.target not in _FLOORED_OPS
                or meta_val(value).dtype not in _POSITION_DTYPES):
            return None
        args = bind_arguments(value)
        if value.target in (aten.clamp_min.default, aten.clamp.default) and args.get("max") is None:
            low, source = args.get("min"), self.affine(args["self"], rank)
            if type(low) is not int or abs(low) > _KNOWN_BOUND or source is None or source[0] != 1 or not self.small(args["self"]):
                return None
            return sympy.simplify(source[1] - low), sympy.Integer(low), source[2]
        if value.target in (aten.add.Tensor, aten.sub.Tensor) and type(args.get("other")) is int and args.get("alpha", 1) == 1:
            inner = self.floored(args["self"], rank)
            shift = args["other"] if value.target is aten.add.Tensor else -args["other"]
            if inner is not None and abs(inner[1] + shift) <= _KNOWN_BOUND:
                return inner[0], inner[1] + shift, inner[2]
        if value.target is aten.index.Tensor and not self.facts[value].hazard:
            # A position read at floored indices along its token dim (a causal rule comparing
            # cache positions): source row r holds r - prefix + p.
            src, indices = args["self"], args["indices"]
            s_dims, p = self.dims(meta_val(src)) or {}, self.facts[src].position
            out_dims = self.dims(meta_val(value)) or {}
            along = [d for d, idx in enumerate(indices) if idx is not None and d in s_dims]
            if p is None or len(s_dims) != 1 or along != list(s_dims) or len(out_dims) != 1 or not self.small(src):
                return None
            inner = self.floored(indices[along[0]], meta_val(value).dim())
            if inner is None or inner[2] != out_dims:
                return None
            low = sympy.simplify(inner[1] - s_dims[along[0]] + p)
            if not (low.is_Integer and abs(int(low)) <= _KNOWN_BOUND):
                return None
            shift = rank - meta_val(value).dim()
            return inner[0], low, {d + shift: a for d, a in out_dims.items()}
        return None

    def fewest_tokens(self) -> int:
        """The fewest tokens the graph runs with (its token symbol's lower bound; 1 when unknown):
        Dynamo's dynamic graphs take at least 2, one token compiling a graph of its own."""
        for node in self.placeholders:
            for size in getattr(meta_val(node), "shape", ()):
                if isinstance(size, torch.SymInt) and size.node.expr == self.token:
                    lower = size.node.shape_env.bound_sympy(self.token).lower
                    return max(int(lower), 1) if lower.is_Integer else 1
        return 1

    def known_rows(self, node: fx.Node, facts: _Facts, dim: int, prefix: Any) -> _Facts | None:
        """A slice or select along the token dim of a value known at every row (`known`): a
        fill's rows all hold it, and a position's row r holds r - prefix + c, so rows read from
        any fixed start are the same rows, with the same values, in a replay (`pos[1:]`; a
        padded row of the output holds what it would hold unpadded). A position sliced to a token
        dim is one again; one row of it is a fill. None for other values and starts."""
        if facts.position is None and facts.fill is None:
            return None
        args = bind_arguments(node)
        if node.target is aten.select.int:
            start = args["index"]
        else:
            start = _scalar(args.get("start")) or 0
            if not _is_int(args.get("step", 1), 1):
                return None
        if type(start) is not int or start < 0:
            return None
        kept = replace(facts, causal=None, diagonal=None, position=None, row_source=None)
        if facts.position is None:
            return kept
        out = meta_val(node)
        o_dims = self.dims(out) or {}
        if node.target is aten.slice.Tensor and dim in o_dims:
            if isinstance(o_dims[dim], _Blocks):
                return None
            # Output row r is input row start + r: r - o_prefix + c' = start + r - prefix + c.
            return replace(kept, position=sympy.simplify(facts.position + start - prefix + o_dims[dim]))
        if o_dims or (node.target is aten.slice.Tensor and not _is_int(out.shape[dim], 1)):
            return kept
        value = sympy.simplify(start - prefix + facts.position)  # the one row read: a fill
        return replace(kept, fill=float(value)) if value.is_Integer else kept

    # -- integer values at padded rows: the indices of lookups ---------------------------------

    def padded_value(self, node: fx.Node) -> int | bool | None:
        """The one value every padded element of `node`'s integer or bool value holds (`_Facts.pad`),
        or None when not known: a copy, move or slice of values keeps theirs, and an elementwise
        op holds its value at its operands' (a product with 0 or an `and` with False holds 0 whatever
        the other operand holds). A division by a padded 0 is not known: on a GPU it holds garbage."""
        val = meta_val(node)
        if (not isinstance(val, torch.Tensor) or val.is_floating_point() or val.is_complex()
                or not self.carries_tokens(node)):
            return None
        target = node.target
        if target is operator.getitem:
            whole = node.args[0]
            kept = whole.target in (aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default)
            return self.facts[whole.args[0]].pad if kept else None
        sources = [a for a in self.inputs(node) if self.carries_tokens(a)]
        out_dims = self.dims(val) or {}
        if len(out_dims) > 1 and target not in _MOVES_ELEMENTS:
            # With two token dims, an element padded along one may be real along the other: a
            # broadcast or expand pairs a real row with a padded column (`ids[:, None] - ids[None]`
            # holds 0 - ids[k] at a padded query and a real key), so no one value is known there.
            # Only an elementwise op whose every token-carrying operand spans them all is evaluated.
            def spans(a: Any) -> bool:
                shift = val.dim() - meta_val(a).dim()
                return set(out_dims) <= {d + shift for d in (self.dims(meta_val(a)) or {})}

            if (target in _KEEPS_PADDING or target is aten.index.Tensor
                    or not all(spans(a) for a in sources if isinstance(meta_val(a), torch.Tensor))):
                return None
        if target is aten.slice.Tensor:
            # Output row r is source row start + r: a padded row of the output (token index r minus
            # its prefix) is a padded row of the source only when the slice keeps token indices.
            # `ids[:-1]` does not: its padded row T - 1 is the source's real row T - 1.
            args = bind_arguments(node)
            dim = args.get("dim", 0) % max(meta_val(node.args[0]).dim(), 1)
            s_dims = self.dims(meta_val(node.args[0])) or {}
            start = _scalar(args.get("start")) or 0
            if dim in s_dims and not (dim in out_dims and not self.depends_on_token(start)
                                      and not isinstance(s_dims[dim], _Blocks) and not isinstance(out_dims[dim], _Blocks)
                                      and _equal(_expr(start), s_dims[dim] - out_dims[dim])):
                return None
        if target is aten.index.Tensor and self.reads_own_rows(node):
            sources = [node.args[0]]  # padded elements read the source's padded rows, not the indices
        if target in _KEEPS_PADDING or (target is aten.index.Tensor and sources == [node.args[0]]):
            # Padded elements of the output are padded elements of the inputs with token dims.
            pads = {self.facts[a].pad for a in sources}
            return _as_dtype(pads.pop(), val.dtype) if len(pads) == 1 and None not in pads else None
        if not (target in _ELEMENTWISE or (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags)):
            return None

        def padded(value: Any) -> Any:
            """An operand's value at a padded row (None: not known)."""
            if not isinstance(value, fx.Node):
                return value
            if not isinstance(meta_val(value), torch.Tensor):
                return None
            return self.facts[value].pad if self.carries_tokens(value) else self.facts[value].fill

        args = bind_arguments(node)
        if target in (aten.mul.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default) and any(
                self.carries_tokens(a) and self.facts[a].pad is not None and not self.facts[a].pad for a in sources):
            return _as_dtype(0, val.dtype)
        if target in _WHERES and padded(args["condition"]) is not None:
            return _as_dtype(padded(args["self" if padded(args["condition"]) else "other"]), val.dtype)
        if target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) and padded(args["mask"]) is not None:
            # Filled at padded rows (HF's positions: cumsum(mask) - 1, filled with 1 where mask is 0).
            return _as_dtype(padded(args["value" if padded(args["mask"]) else "self"]), val.dtype)
        return _as_dtype(_evaluated(node, {name: padded(value) for name, value in args.items()}), val.dtype)

    def reads_own_rows(self, node: fx.Node) -> bool:
        """Whether `x[i0, i1, ...]` reads each token's own row of `x`: every index that carries the
        token dim is a position along a token dim of `x` naming the same token (`x[b, arange(T)]`,
        transformers' padding term `attention_mask[batch_idx, kv_idx]`), so its padded elements
        are `x`'s padded ones."""
        src, indices = node.args[0], node.args[1]
        s_dims = self.dims(meta_val(src)) or {}
        for d, idx in enumerate(indices):
            if not isinstance(idx, fx.Node) or not self.carries_tokens(idx):
                if d in s_dims and idx is not None:
                    return False  # a fixed index along the token dim: a real or a padded row
                continue
            i_dims, position = self.dims(meta_val(idx)) or {}, self.facts[idx].position
            if (d not in s_dims or isinstance(s_dims[d], _Blocks) or position is None or len(i_dims) != 1
                    or not _equal(position, s_dims[d])):
                return False
            # As long as x along it too: `arange(T - 1)` would call its element T - 1 padded, where it
            # reads x's real row T - 1.
            (own,) = i_dims.values()
            if isinstance(own, _Blocks) or not _equal(own, s_dims[d]):
                return False
        return True

    def in_table(self, index: fx.Node, rows: Any, wraps: bool) -> bool:
        """Whether every padded element of `index` (which carries the token dim) is a valid row of a
        table of `rows` rows (from -rows on when negative indices `wraps`): a top-k's indices below
        the table's size, or one known value inside it."""
        facts = self.facts[index]
        if facts.key_range is not None and _provably_le(facts.key_range, rows):
            return True
        pad = facts.pad
        return pad is not None and _provably_le(-rows if wraps else 0, int(pad)) and _provably_le(int(pad) + 1, rows)

    # -- mixture-of-experts routing -----------------------------------------------------------

    def routed(self, node: fx.Node) -> _Facts | None:
        """The facts of a routing op (module docstring), a refusal for any other use of values
        that depend on where padded rows sorted, or None for every other op."""
        target = node.target
        rows = [a for a in self.inputs(node) if self.numbers_batch_rows(a)]
        if rows:
            return self.row_number_use(node, rows) or self.refuse(
                node, "uses a permutation of a batch's rows as values: they number rows of sequences each padded "
                      "at its end, which a replay at the bucket numbers otherwise; only indexing rows keeps them out")
        wide = [a for a in self.inputs(node) if self.run_wide(a)]
        if wide:
            # Checked before the routing ops below: a sort, an index or a division of counts or of
            # an inverse would otherwise be read as a routing step (or, without a token dim, as a
            # constant) and the values would reach real rows.
            return self.wide_use(node, wide) or self.refuse(
                node, "uses per-expert counts or an inverse permutation, which include the padded rows, other "
                      "than as a grouped GEMM's offsets or to put rows back in order")
        if target in _SORTS:
            return self.sorted_rows(node)
        if target in (aten.floor_divide.default, aten.div.Tensor_mode):
            return self.token_of(node)
        if target is aten.index.Tensor:
            return self.routed_index(node)
        if target is aten.index_put.default:
            return self.inverted(node)
        if target is aten.histc.default:
            return self.histogram(node)
        if _is_grouped_gemm(target):
            return self.grouped_gemm(node)
        return None

    def numbers_batch_rows(self, node: fx.Node) -> bool:
        """Whether `node` holds a sort's permutation P (or the token P // k) over several blocks of
        tokens: row b*T*k + t*k + s of the flattened batch is P's value there, and a replay's is
        b*B*k + t*k + s. (Over one block of tokens the values are the same in both runs.)"""
        route = self.facts[node].route
        if route is None or route.kind not in ("perm", "token"):
            return False
        (prefix,) = self.dims(meta_val(route.sort.args[0])).values()
        return isinstance(prefix, _Blocks) and prefix.count > route.count

    def row_number_use(self, node: fx.Node, rows: list[fx.Node]) -> _Facts | None:
        """The facts of a use of a batch's row numbers (`rows`, `node`'s inputs) that reads no
        value of them: as the index of the rows (`x[P]`, `x[P // k]`, the inverse's `inv[P] = ..`),
        `P // k`, P's inverse by `argsort`, a tensor of P's shape (`empty_like`), or a view or exact
        cast that keeps them row numbers; None for any other."""
        target, (first, *rest) = node.target, rows
        if rest:
            return None
        if target is aten.index.Tensor:
            use = node.args[0] is not first and list(node.args[1]) == [first] and self.routed_index(node)
        elif target in (aten.floor_divide.default, aten.div.Tensor_mode):
            use = self.token_of(node)
        elif target is aten.index_put.default:
            use = list(bind_arguments(node)["indices"]) == [first] and self.inverted(node)
        elif target in _SORTS:  # `argsort(P)`: its inverse
            use = self.sorted_rows(node)
        elif target in _FILLS:  # `empty_like(P)`: only P's shape
            use = self.dispatch(node)
        elif target in _RESHAPES or target in _SAME_DIMS:
            use = self.dispatch(node)
            use = use if use.hazard or use.route == self.facts[first].route else None
        else:
            use = None
        return use or None

    def run_wide(self, node: fx.Node) -> bool:
        """Whether `node` holds counts or an inverse permutation (`_RUN_WIDE`)."""
        route = self.facts[node].route
        return route is not None and route.kind in _RUN_WIDE

    def wide_use(self, node: fx.Node, wide: list[fx.Node]) -> _Facts | None:
        """The facts of one of the three uses of run-wide values (`wide`, `node`'s inputs) that
        keep them out of real rows: the running sum of counts, a grouped GEMM's offsets (which
        `grouped_gemm` checks are its only run-wide input) and rows put back by the inverse
        (the index, not the rows indexed); None for any other."""
        target, (first, *rest) = node.target, wide
        if target is aten.cumsum.default and not rest and node.args[0] is first:
            return _Facts(route=replace(self.facts[first].route, kind="offsets")) \
                if self.facts[first].route.kind == "histogram" else None
        if _is_grouped_gemm(target):
            return self.grouped_gemm(node)
        if (target is aten.index.Tensor and not rest and node.args[0] is not first and list(node.args[1]) == [first]
                and self.facts[first].route.kind == "inverse"):
            return self.routed_index(node)
        return None

    def token_major(self, node: fx.Node) -> int | None:
        """k when `node`'s one token dim holds k rows per token in token order, in one block of
        tokens or several (a flattened batch); k = 1 for a token dim with no prefix. Else None."""
        dims = self.dims(meta_val(node))
        if not dims or len(dims) != 1:
            return None
        (prefix,) = dims.values()
        order = self.facts[node].order
        if order is None:  # one row per token, in one block or several (a flattened batch)
            return 1 if isinstance(prefix, _Blocks) or _equal(prefix, 0) else None
        return order[1] if order[0] == "major" else None

    def sorted_rows(self, node: fx.Node) -> _Facts | None:
        """`sort` of a token-major vector (flattened top-k expert ids): values and indices in the
        sort's order, row j from row P[j]; an ascending sort of P itself gives P's inverse. Other
        sorts are reductions (`along`)."""
        src = node.args[0]
        ascending = not bind_arguments(node).get("descending")
        route = self.facts[src].route
        if route is not None and route.kind == "perm" and ascending and meta_val(src).dim() == 1:
            # argsort(P): P's inverse, in token-major order like `inv[P] = arange` (P's values are
            # distinct, so every sort gives these indices); the values are 0, 1, ... again, which
            # over several blocks of tokens number rows as P did (`numbers_batch_rows`).
            order = ("major", route.count) if route.count > 1 else None
            values = (self.refuse(node, "the sorted values of a permutation of a batch's rows number rows of "
                                        "sequences each padded at its end")
                      if self.numbers_batch_rows(src) else _Facts(order=order, route=_Route("iota", None, route.count)))
            return _Facts(parts=(values, _Facts(order=order, route=replace(route, kind="inverse"))))
        count = self.token_major(src)
        if count is None or meta_val(src).dim() != 1:
            return None
        gathered = ("gathered", node)
        # Only ascending values end each id's group where the running counts do (`grouped_gemm`):
        # sorted descending, padded rows counted in a group would shift the real rows of others.
        values = _Facts(order=gathered, key_range=self.facts[src].key_range,
                        route=_Route("sorted", node, count) if ascending else None)
        return _Facts(parts=(values, _Facts(order=gathered, route=_Route("perm", node, count))))

    def token_of(self, node: fx.Node) -> _Facts | None:
        """`P // k`: the token of each gathered row, for indexing the token rows."""
        route = self.facts[node.args[0]].route if isinstance(node.args[0], fx.Node) else None
        floor = node.target is aten.floor_divide.default or bind_arguments(node).get("rounding_mode") == "floor"
        if route is None or route.kind != "perm" or not floor or node.args[1] != route.count:
            return None
        return _Facts(order=("gathered", route.sort), route=replace(route, kind="token"))

    def routed_index(self, node: fx.Node) -> _Facts | None:
        """`x[P]` of token-major rows or `x[P // k]` of token rows: rows in the sort's order;
        `y[inverse of P]` of rows in that order: token-major rows again."""
        x, indices = node.args[0], node.args[1]
        if len(indices) != 1 or not isinstance(indices[0], fx.Node) or list(self.dims(meta_val(x)) or {}) != [0]:
            return None
        route = self.facts[indices[0]].route
        if route is None:
            return None
        gathered = ("gathered", route.sort)
        if route.kind == "perm" and self.token_major(x) == route.count or route.kind == "token" and self.token_major(x) == 1:
            return _Facts(order=gathered)
        if route.kind == "inverse" and self.facts[x].order == gathered:
            return _Facts(order=("major", route.count) if route.count > 1 else None)
        return None

    def inverted(self, node: fx.Node) -> _Facts | None:
        """`inv[P] = arange(len(P))`: P's inverse (P is a permutation, so every element is written).
        Only of P itself, one dim: P broadcast to [n, n] writes `inv[P[j], c] = c`, no inverse."""
        args = bind_arguments(node)
        indices, values = args["indices"], args["values"]
        if args.get("accumulate") or len(indices) != 1 or not isinstance(indices[0], fx.Node) or not isinstance(values, fx.Node):
            return None
        route, iota = self.facts[indices[0]].route, self.facts[values].route
        if (route is None or route.kind != "perm" or iota is None or iota.kind != "iota"
                or not _same_sizes(meta_val(values).shape, meta_val(indices[0]).shape) or meta_val(indices[0]).dim() != 1
                or not _same_sizes(meta_val(args["self"]).shape, meta_val(indices[0]).shape)):
            return None
        return _Facts(order=("major", route.count) if route.count > 1 else None, route=replace(route, kind="inverse"))

    def histogram(self, node: fx.Node) -> _Facts | None:
        """`histc` of sorted expert ids in [0, n) into n bins over [0, n - 1]: bin e counts id e
        (padded rows' ids too, which are ids all the same), so the running sum ends each group."""
        args = bind_arguments(node)
        keys = args["self"]
        if not self.carries_tokens(keys):
            return None
        facts = self.facts[keys]
        n = facts.key_range
        # Each sorted id counted once: a view keeps the sort's values, but an expand repeats them
        # (then the counts end no group at its own ids).
        sort = facts.route.sort if facts.route is not None else None
        once = sort is not None and _equal(math.prod(_expr(d) for d in meta_val(keys).shape),
                                           math.prod(_expr(d) for d in meta_val(sort.args[0]).shape))
        if (facts.route is None or facts.route.kind != "sorted" or not once or n is None or n < 2 or args["bins"] != n
                or args["min"] != 0 or args["max"] != n - 1):
            return self.refuse(node, "a histogram over the token rows that is not of sorted expert ids over their "
                                     "whole range")
        return _Facts(route=replace(facts.route, kind="histogram"))

    def grouped_gemm(self, node: fx.Node) -> _Facts:
        """A grouped GEMM over rows sorted by expert id, its offsets the running counts of those
        ids: row j's group is its own id in either run, so rows stay apart. Only the form whose
        offsets split the rows (x [M, K], weight [E, K, N] or [E, N, K]): `_grouped_mm` of a 2-D
        weight splits K or N by them, and those groups would move with the padded rows' counts."""
        x, weight, offsets = list(bind_arguments(node).values())[:3]  # schema order; offsets by keyword too
        if offsets is None:
            return self.ordered(node, self.batched_gemm(node, x, weight))
        route = self.facts[offsets].route if isinstance(offsets, fx.Node) else None
        others = [a for a in node.all_input_nodes if a is not x and a is not offsets]
        if not (route is not None and route.kind == "offsets" and self.facts[x].order == ("gathered", route.sort)
                and not self.run_wide(x) and not any(self.carries_tokens(a) or self.run_wide(a) for a in others)):
            return self.refuse(node, "a grouped GEMM whose rows are not the ones sorted by the expert ids its offsets count")
        if meta_val(x).dim() != 2 or meta_val(weight).dim() != 3 or list(self.dims(meta_val(x)) or {}) != [0]:
            return self.refuse(node, "a grouped GEMM whose offsets split features, not rows: its groups would follow "
                                     "the counts of the padded rows")
        return _Facts(order=("gathered", route.sort))

    def batched_gemm(self, node: fx.Node, x: fx.Node, weight: fx.Node) -> _Facts:
        """A batched grouped GEMM (no offsets: x [E, T, K], expert e's rows x[e]) keeps rows apart
        as a bmm does, unless it sums over a token dim or its weights carry tokens."""
        if self.run_wide(x) or self.run_wide(weight):
            return self.refuse(node, "a batched GEMM over per-expert counts or an inverse permutation")
        if self.carries_tokens(weight):
            return self.refuse(node, "a batched GEMM whose weights carry the token dim")
        if meta_val(x).dim() - 1 in (self.dims(meta_val(x)) or {}):
            return self.refuse(node, "a batched GEMM that sums over the token dim")
        return _CLEAN

    def ordered(self, node: fx.Node, facts: _Facts) -> _Facts:
        """Rows out of token order (or token-major) through a row-wise op keep their order; other
        ops, and ops combining rows of different orders, are refused."""
        # The order-free case first, without reading every input's dims again.
        if facts.hazard or node.target in _RESHAPES or all(self.facts[a].order is None for a in self.inputs(node)):
            return facts  # (a view decides its order itself)
        carriers = [a for a in self.inputs(node) if self.carries_tokens(a)]
        orders = {self.facts[a].order for a in carriers}
        if orders <= {None}:
            return facts  # a tuple's piece (getitem) carries its tuple's order already
        if len(orders) > 1:
            return self.refuse(node, "combines rows in different orders (routed to experts and in token order)")
        if node.target not in _ROW_WISE and _short_name(node.target) != "padded_gemm" and not (
                isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags):
            return self.refuse(node, f"{node.target} on rows routed out of token order")
        first = carriers[0] if node.target is not aten.cat.default else node
        if set(_axes(node)) & set(self.dims(meta_val(first)) or {}):
            return self.refuse(node, "reads along rows routed out of token order")
        (order,) = orders
        if facts.parts is not None:
            return replace(facts, parts=tuple(replace(p, order=order) for p in facts.parts))
        val = meta_val(node)
        if isinstance(val, (tuple, list)):
            return replace(facts, order=order)  # a split's pieces, read through getitem
        return replace(facts, order=order if isinstance(val, torch.Tensor) and self.dims(val) else None)

    def padded(self, node: fx.Node) -> _Facts:
        """`constant_pad_nd` off the token dims (the attention pass gives latent attention's
        narrower head size zero columns): each row from its own row."""
        if set(_axes(node)) & set(self.dims(meta_val(node.args[0])) or {}):
            return self.refuse(node, "pads along the token dim")
        return _CLEAN

    def gathered_along(self, node: fx.Node) -> _Facts:
        """`gather` / `scatter` along a dim: each row reads and writes its own row when that dim is
        not a token dim and every tensor has its token dims in the same places."""
        args = bind_arguments(node)
        dim = args["dim"] % max(meta_val(args["self"]).dim(), 1)
        tensors = [args[k] for k in ("self", "index", "src") if isinstance(args.get(k), fx.Node)]
        dims = [self.dims(meta_val(t)) for t in tensors]
        index_dims = self.dims(meta_val(args["index"]))
        if node.target is aten.gather.default and dims[0] == {} and index_dims is not None and set(index_dims) == {dim}:
            # Along the index's one token dim, from a table without one: each element reads the
            # table at its own index, elsewhere at coordinates that hold no token (GPT-J's rotary
            # table at the positions repeated across its width, before transformers 5.24).
            return self.table_rows_at(node, meta_val(args["self"]).shape[dim], args["index"]) or _CLEAN
        if any(d is None or dim in d for d in dims):
            return self.refuse(node, "gathers or scatters along the token dim")
        if any(d != dims[0] for d in dims):
            return self.refuse(node, "gathers or scatters between tensors with token dims in different places")
        if self.carries_tokens(args["index"]) and not self.in_table(args["index"], meta_val(args["self"]).shape[dim], False):
            return self.refuse(node, f"gathers or scatters at indices whose padded rows may lie outside the dim's "
                                     f"{meta_val(args['self']).shape[dim]} (padded inputs hold {PAD_VALUE})")
        return _CLEAN

    def uses_token_count(self, node: fx.Node) -> bool:
        flat = _flat((node.args, node.kwargs))
        return any(self.depends_on_token(meta_val(a) if isinstance(a, fx.Node) else a) for a in flat)

    def constant(self, node: fx.Node) -> _Facts:
        """An op on values free of the token count: the same in both runs (noting -inf fills)."""
        if node.target in _SAME_DIMS:
            return self.converted(node)
        if node.target in _FILLS:
            return self.filled(node)
        return _CLEAN

    def converted(self, node: fx.Node) -> _Facts:
        """A copy or view of one value, maybe in another dtype: the facts that survive the cast.
        A bool mask (False = masked) cast to a number is an additive mask that masks nothing,
        and an additive one (-inf = masked) cast to bool masks the other elements; a position
        stays one only in a dtype that holds every index exactly."""
        facts = self.facts[node.args[0]]
        src, out = meta_val(node.args[0]), meta_val(node)
        if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor) or src.dtype == out.dtype:
            return facts
        both_float = src.dtype.is_floating_point and out.dtype.is_floating_point
        exact = src.dtype != torch.bool and out.dtype in _POSITION_DTYPES
        # A wider float dtype holds every value exactly: an additive mask's visible keys stay visible.
        wider = both_float and torch.finfo(out.dtype).max >= torch.finfo(src.dtype).max and (
            torch.finfo(out.dtype).eps <= torch.finfo(src.dtype).eps)
        return replace(facts, causal=facts.causal if both_float else None, fill=facts.fill if both_float else None,
                       diagonal=facts.diagonal if wider else None, visible=facts.visible if wider else None,
                       row_source=None, position=facts.position if exact else None,
                       route=facts.route if exact else None, key_range=facts.key_range if exact else None)

    def filled(self, node: fx.Node) -> _Facts:
        """A tensor filled with one value (or uninitialized): clean unless the value is T. A bool
        tensor of True is a mask whose every diagonal is True."""
        args = bind_arguments(node)
        for name, value in args.items():
            if name != "size" and self.depends_on_token(meta_val(value) if isinstance(value, fx.Node) else value):
                return self.refuse(node, "fills a tensor with the token count, which padding changes")
        fill = _FILLS[node.target]
        fill = args.get(fill) if isinstance(fill, str) else fill
        fill = float(fill) if isinstance(fill, (bool, int, float)) else None
        out = meta_val(node)
        everywhere = fill == 1.0 and isinstance(out, torch.Tensor) and out.dtype == torch.bool
        return _Facts(fill=fill, diagonal="all" if everywhere else None)

    def arange(self, node: fx.Node) -> _Facts:
        """`arange(start, start + T (+ a))`: a position (clean); any other use of T refuses."""
        args = bind_arguments(node)
        step = args.get("step", 1)
        start = args.get("start", 0) if node.target is not aten.arange.default else 0
        if step not in (1, None) or self.depends_on_token(_scalar(start)):
            return self.refuse(node, "arange whose start or step is the token count")
        dims = self.dims(meta_val(node))
        if not dims:
            return self.refuse(node, "arange whose length depends on the token count oddly")
        (prefix,) = dims.values()
        from_zero = _equal(_expr(_scalar(start)), 0)
        if isinstance(prefix, _Blocks):
            if not from_zero:
                return self.refuse(node, "arange over several sequences' tokens")
            # 0 .. k*T - 1: the same values at the real rows of a token-major dim of k rows per token.
            return _Facts(order=("major", prefix.count), route=_Route("iota", None, prefix.count))
        # Element r is start + r, and its token index r - prefix.
        iota = _Route("iota", None, 1) if from_zero and _equal(prefix, 0) else None
        if meta_val(node).dtype not in _POSITION_DTYPES:
            return _CLEAN  # rounded or wrapped: neighbouring positions may compare equal
        return _Facts(position=sympy.sympify(_expr(_scalar(start))) + prefix, route=iota)

    def reshape(self, node: fx.Node) -> _Facts:
        """A view that keeps every token row's elements together and in order."""
        src = node.args[0]
        sv, ov = meta_val(src), meta_val(node)
        s_dims, o_dims = self.dims(sv), self.dims(ov)
        facts = self.facts[src]
        if not s_dims and not o_dims:
            return facts
        if s_dims is None or o_dims is None or len(s_dims) != 1 or len(o_dims) != 1:
            if _same_sizes(sv.shape, ov.shape):
                return facts
            mapping = _token_dims_kept(sv.shape, ov.shape, s_dims, o_dims)
            if mapping is not None:  # a mask's [B, G, R, S, L] -> [B, G*R, S, L]: the facts follow the dims
                return replace(_with_dims_moved(facts, mapping), position=None, row_source=None)
            return self.refuse(node, "a view that merges or splits a token dim")
        ((sd, sa),), ((od, oa),) = s_dims.items(), o_dims.items()
        if isinstance(sa, _Blocks) or isinstance(oa, _Blocks):
            return self.blocks_reshape(node, (sd, sa), (od, oa), facts)
        # Each element keeps its token index when the dims before the token dim hold as many
        # elements before and after (then so do the dims after it).
        before_same = _equal(math.prod(_expr(s) for s in sv.shape[:sd]), math.prod(_expr(s) for s in ov.shape[:od]))
        if before_same and _equal(sa, oa):
            return replace(facts, causal=None, diagonal=None)
        return self.refuse(node, "a view that moves elements between token rows")

    def blocks_reshape(self, node: fx.Node, src: tuple[int, Any], out: tuple[int, Any], facts: _Facts) -> _Facts:
        """`[b, T, H] -> [b*T, H]`, `[b*T, k] -> [b*T*k]` (token-major: each token's k rows one
        after another) and back. In memory both sides are [blocks, T, rows per token x features]:
        the view keeps every token's elements together when the token blocks (the dims before the
        token dim times its blocks, over its rows per token) and the elements per token agree.
        Only T rows with no prefix flatten into blocks."""
        sv, ov = meta_val(node.args[0]), meta_val(node)
        (sd, sa), (od, oa) = src, out
        s_count = sa.count if isinstance(sa, _Blocks) else 1
        o_count = oa.count if isinstance(oa, _Blocks) else 1
        if not isinstance(sa, _Blocks) and not _equal(sa, 0) or not isinstance(oa, _Blocks) and not _equal(oa, 0):
            return self.refuse(node, "a view that flattens a token dim with a prefix into blocks")
        s_inner, o_inner = math.prod(_expr(x) for x in sv.shape[sd + 1:]), math.prod(_expr(x) for x in ov.shape[od + 1:])
        s_outer, o_outer = math.prod(_expr(x) for x in sv.shape[:sd]), math.prod(_expr(x) for x in ov.shape[:od])
        kept = replace(facts, causal=None, diagonal=None, position=None, row_source=None)
        if facts.order is not None and facts.order[0] == "gathered":
            if _equal(s_outer, o_outer) and s_count == o_count and _equal(s_inner, o_inner):
                return kept  # the same rows, in the same order
            return self.refuse(node, "a view that regroups rows routed out of token order")
        k_src = facts.order[1] if facts.order is not None else 1
        k_out = sympy.simplify(sympy.sympify(k_src * s_inner) / o_inner)  # the output's rows per token
        # Each side's blocks are whole blocks of tokens (count / k of them): [2T] of 2 rows per token
        # read as [2, T] would cut one block of T tokens in halves, which a replay cuts at B.
        if (k_out.is_Integer and k_out >= 1 and s_count % k_src == 0 and o_count % int(k_out) == 0
                and _equal(s_outer * s_count * int(k_out), o_outer * o_count * k_src)):
            k_out = int(k_out)
            return replace(kept, order=("major", k_out) if k_out > 1 else None,
                           route=kept.route if k_out == k_src else None)
        if facts.order is not None:
            return self.refuse(node, "a view that regroups rows routed out of token order")
        return self.refuse(node, "a view that moves elements between token rows")

    def moved(self, node: fx.Node) -> _Facts:
        """Transpose, permute, unsqueeze, squeeze, expand: the same elements, dims moved."""
        src = node.args[0]
        facts = self.facts[src]
        if node.target is aten.expand.default:
            s_dims, o_dims = self.dims(meta_val(src)), self.dims(meta_val(node))
            # Broadcasting a size-1 dim to T repeats one real value along it: still clean.
            shift = meta_val(node).dim() - meta_val(src).dim()
            facts = _with_dims_moved(facts, {d: d + shift for d in range(meta_val(src).dim())})
            same = len(o_dims) == len(s_dims)
            # Values broadcast along a new or size-1 dim repeat: 0, 1, .. (an iota), sorted ids or a
            # permutation repeated are none of them.
            once = _equal(math.prod(_expr(x) for x in meta_val(src).shape), math.prod(_expr(x) for x in meta_val(node).shape))
            return replace(facts, position=facts.position if same else None, row_source=facts.row_source if same else None,
                           route=facts.route if once else None)
        return _with_dims_moved(facts, _dim_mapping(node))

    def complex_view(self, node: fx.Node) -> _Facts:
        """`view_as_complex` / `view_as_real` (Llama-4's RoPE) pair or split the last dim: rows
        stay whole while that dim is not a token dim."""
        src = meta_val(node.args[0])
        last = src.dim() - 1 if node.target is aten.view_as_complex.default else src.dim()
        if any(d >= last for d in self.dims(src) or {}):
            return self.refuse(node, "a complex view across the token dim")
        return replace(self.facts[node.args[0]], causal=None, diagonal=None, position=None, row_source=None, fill=None)

    def repeated(self, node: fx.Node) -> _Facts:
        """`repeat` tiles the whole tensor: r copies of a token dim are r blocks of its rows,
        each padded at its end (Llama-4's experts each see every token); `dims` reads that from
        the size r * T, so only a token dim with a prefix (whose copies would put padding
        between rows) is refused."""
        src = meta_val(node.args[0])
        shift = len(node.args[1]) - src.dim()
        s_dims = self.dims(src) or {}
        for d, prefix in s_dims.items():
            if node.args[1][d + shift] != 1 and not isinstance(prefix, _Blocks) and not _equal(prefix, 0):
                return self.refuse(node, "repeats a token dim that has rows before its tokens")
        # A permutation or counts repeated are neither: only the values' facts stay. Positions
        # tiled along other dims only (GPT-J's, across its rotary table's width before
        # transformers 5.24) hold token t's position at token t still.
        facts = self.facts[node.args[0]]
        along_others = len(s_dims) == 1 and all(node.args[1][d + shift] == 1 for d in s_dims)
        return replace(facts, causal=None, diagonal=None, position=facts.position if along_others else None,
                       row_source=None, route=None)

    def sliced(self, node: fx.Node) -> _Facts:
        """`slice`/`select` along a token dim read rows that exist in both runs only when they sit
        inside the real rows: from a constant start no later than the prefix, not from the end."""
        src = node.args[0]
        sv = meta_val(src)
        dim = node.args[1] % sv.dim() if len(node.args) > 1 else 0
        s_dims = self.dims(sv) or {}
        facts = self.facts[src]
        if dim not in s_dims:
            # Along a dim of the same size in both runs: from a place that must not follow T.
            at = node.args[2] if node.target is aten.select.int else bind_arguments(node).get("start")
            if self.depends_on_token(_scalar(at)):
                return self.refuse(node, "slices or selects a dim at an index computed from the token count")
            if node.target is aten.slice.Tensor and isinstance((self.dims(meta_val(node)) or {}).get(dim), _Blocks):
                # The first c*T rows of a fixed dim are one run of rows, not c blocks of T: the
                # bucket's run would start the second block at row B, not at row T.
                return self.refuse(node, "slices c * T rows of a dim that is not a token dim: they are one run of "
                                         "rows, not c sequences' blocks each padded at its end")
            return _with_dims_moved(facts, _dim_mapping(node))
        prefix = s_dims[dim]
        if isinstance(prefix, _Blocks):
            return self.refuse(node, "slices a dim of several sequences' tokens, each padded at its end")
        known = self.known_rows(node, facts, dim, prefix)
        if known is not None:
            return known
        if node.target is aten.select.int:
            index = node.args[2]
            if isinstance(index, int) and 0 <= index and _provably_le(index, prefix):
                return replace(facts, causal=None, diagonal=None, position=None, row_source=None)
            return self.refuse(node, f"selects row {index} of a token dim, which may be a padded row")
        args = bind_arguments(node)
        start, end = _scalar(args.get("start") or 0), _scalar(args.get("end"))
        if self.depends_on_token(start) or not _provably_le(0, _expr(start)) or not _provably_le(_expr(start), prefix):
            return self.refuse(node, "slices a token dim from a row that may be padding (or from the end)")
        o_dims = self.dims(meta_val(node)) or {}
        if dim in o_dims:
            # Output row r is input row start + r: real while the input's is (prefix - start >= new prefix).
            if _provably_le(o_dims[dim], prefix - _expr(start)):
                return replace(facts, causal=None, diagonal=None, position=None, row_source=None)
        elif end is not None and not self.depends_on_token(end) and _provably_le(_expr(end), prefix + 1):
            return replace(facts, causal=None, diagonal=None, position=None, row_source=None)  # rows before the first token row's end
        return self.refuse(node, "slices a token dim past its real rows")

    def scattered(self, node: fx.Node) -> _Facts:
        """A functionalized write into part of a tensor: along a feature dim each row receives its
        own row; along the token dim rows would move."""
        base = node.args[0]
        dim = bind_arguments(node)["dim"] % meta_val(base).dim()
        if dim in (self.dims(meta_val(base)) or {}):
            return self.refuse(node, "writes into a slice of the token dim")
        return _CLEAN

    def concatenated(self, node: fx.Node) -> _Facts:
        """`cat` along a token dim keeps padding at the end only when the token-carrying tensor is
        the last one; along other dims every piece must carry the same token dims."""
        tensors = [t for t in node.args[0] if isinstance(t, fx.Node)]
        out = meta_val(node)
        dim = (node.args[1] if len(node.args) > 1 else 0) % out.dim()
        o_dims = self.dims(out) or {}
        if dim in o_dims:
            carriers = [i for i, t in enumerate(tensors) if dim in (self.dims(meta_val(t)) or {})]
            if carriers == [len(tensors) - 1]:
                return self.continued(node, tensors, dim, o_dims[dim])
            return self.refuse(node, "concatenates along the token dim with rows after the tokens: padding would sit "
                                     "between real rows")
        for t in tensors:
            if (self.dims(meta_val(t)) or {}).keys() - {dim} != o_dims.keys():
                return self.refuse(node, "concatenates pieces with different token dims")
        # Indices side by side (PhiMoE's two expert choices): within the widest piece's range.
        ranges = [self.facts[t].key_range for t in tensors]
        return _Facts(key_range=max(ranges)) if None not in ranges else _CLEAN

    def continued(self, node: fx.Node, tensors: list[fx.Node], dim: int, prefix: Any) -> _Facts:
        """`cat` of rows before a position along its token dim (the output's has `prefix` rows
        before its tokens): a position again when each row holds the value the position would
        there (torch.diff's `prepend`: `pos[:, :1] - 1` before `pos`), else clean."""
        position = self.facts[tensors[-1]].position
        if (position is None or isinstance(prefix, _Blocks) or len(tensors) != len(node.args[0])
                or meta_val(node).dtype not in _POSITION_DTYPES):
            return _CLEAN
        for row, piece in enumerate(tensors[:-1]):
            # Output row `row` holds token index row - prefix.
            fill = self.facts[piece].fill
            if not _is_int(meta_val(piece).shape[dim], 1) or fill is None or not _equal(fill, row - prefix + position):
                return _CLEAN
        return _Facts(position=position)

    def stacked(self, node: fx.Node) -> _Facts:
        """`stack` puts pieces of one shape side by side along a new dim (GPT-J's and GLM's
        interleaved RoPE: `stack([-x2, x1], -1)`): each output element is one piece's element at
        the same token indices, so rows stay apart along any dim. The pieces' token dims are
        equal (one shape); only their value facts would need each piece's, so they are dropped."""
        tensors = [t for t in node.args[0] if isinstance(t, fx.Node)]
        dims = [self.dims(meta_val(t)) for t in tensors]
        if len(tensors) != len(node.args[0]) or any(d is None or d != dims[0] for d in dims):
            return self.refuse(node, "stacks pieces with different token dims")
        return _CLEAN

    def along_ranks(self, node: fx.Node) -> _Facts:
        """A gather or reduce-scatter over the ranks, along dim 0: row-wise when no token dim
        lies there (each rank's padded rows then sit at the end of that token dim in the
        result too); over the tokens, the ranks' rows would interleave with their padding."""
        dims = self.dims(meta_val(node.args[0]))
        if dims is None or 0 in dims:
            return self.refuse(node, "gathers or scatters the ranks' tensors along the token dim, so each rank's "
                                     "padded rows would sit between real ones")
        return _CLEAN

    def along(self, node: fx.Node) -> _Facts:
        """Reductions, softmaxes and splits: fine along feature dims; along a token dim only a scan."""
        src = node.args[0]
        rank = max(meta_val(src).dim(), 1)
        dims = bind_arguments(node).get("dim")
        dims = list(range(rank)) if dims is None or dims == [] else [dims] if isinstance(dims, int) else list(dims)
        s_dims = self.dims(meta_val(src)) or {}
        along_tokens = [s_dims[d % rank] for d in dims if d % rank in s_dims]
        if node.target is aten.cumsum.default and self.facts[src].fill == 0:
            return _Facts(fill=0.0)  # a running sum of zeros, along any dim: zeros, padded rows too
        # A scan reads only earlier rows: fine along T + a rows, not across blocks (a block's
        # padding comes before the next block's rows).
        if along_tokens and (node.target not in _SCANS or any(isinstance(a, _Blocks) for a in along_tokens)):
            return self.refuse(node, "reads across the token dim, so padded rows enter real rows' results")
        if (node.target is aten.cumsum.default and len(along_tokens) == 1 and self.facts[src].fill == 1.0
                and meta_val(node).dtype in _POSITION_DTYPES):
            # A running count of ones (OPT's positions without a padding mask): row r holds r + 1.
            return _Facts(position=sympy.sympify(along_tokens[0]) + 1)
        size = meta_val(src).shape[dims[0] % rank] if meta_val(src).dim() else 1
        if isinstance(size, int) and len(dims) == 1:  # indices into one dim of `size`, whatever the values
            if node.target in (aten.topk.default, aten.max.dim, aten.min.dim, aten.sort.default, aten.sort.stable):
                return _Facts(parts=(_CLEAN, _Facts(key_range=size)))
            if node.target in (aten.argmax.default, aten.argmin.default):
                return _Facts(key_range=size)
        return _CLEAN

    def indexed(self, node: fx.Node) -> _Facts:
        """`x[i0, i1, ...]` with index tensors: along a token dim of `x`, positions that read the
        row of the same token (the identity) or of an earlier one (`x[arange(1, T) - 1]`, the
        previous token's) keep real rows apart from padded ones; along other dims any index does."""
        src, indices = node.args[0], node.args[1]
        s_dims = self.dims(meta_val(src)) or {}
        result = self.facts[src]
        shifts, floored_read = [], False
        for d, idx in enumerate(indices):
            if idx is None:
                continue
            if d not in s_dims and (refused := self.table_rows_at(node, meta_val(src).shape[d], idx, wraps=True)):
                return refused
            if d in s_dims and (floor := self.floored(idx, meta_val(idx).dim())) is not None:
                # Element at token index t reads row max(t + g, 0) + c: never a negative one (no
                # wrap) when c >= 0, the same or an earlier token's when g + c is at most the
                # source's prefix, and a real row at t = 0 when c is below prefix + the fewest tokens.
                gap, low, i_dims = floor
                if not (len(i_dims) == 1 and _provably_le(0, low) and _provably_le(gap + low, s_dims[d])
                        and _provably_le(low + 1, s_dims[d] + self.fewest_tokens())):
                    return self.refuse(node, "indexes a token dim with values that may point at padded rows")
                floored_read = True
                continue
            if d in s_dims:
                pos, i_dims = self.facts[idx].position, self.dims(meta_val(idx)) or {}
                # Index element r, token index t = r - its prefix, reads source row t + pos (token
                # index t + pos - prefix): row 0 on when pos is at least the index's prefix (a
                # negative row would wrap to the padded end), and the same or an earlier token's
                # row when pos is at most the source's prefix, so real rows read real ones and a
                # replay's padded ones stay inside its B + prefix rows.
                if pos is None or len(i_dims) != 1 or not (_provably_le(next(iter(i_dims.values())), pos)
                                                           and _provably_le(pos, s_dims[d])):
                    return self.refuse(node, "indexes a token dim with values that may point at padded rows")
                shifts.append(sympy.simplify(pos - s_dims[d]))
        if floored_read:
            return _Facts(fill=result.fill)  # each token's row, or an earlier one, with no position
        if len([i for i in indices if i is not None]) and s_dims:
            if any(shift != 0 for shift in shifts):
                # Token t reads the source's token t + shift: a position's value shifts with it.
                one = len(shifts) == 1 and len(self.dims(meta_val(node)) or {}) == 1
                position = result.position + shifts[0] if result.position is not None and one else None
                return _Facts(position=position, fill=result.fill)
            # The identity index onto the source's token dim: values keep the source's position,
            # and the value at token index t is the source's at t.
            selector = tuple(None if idx is None or d in s_dims else idx for d, idx in enumerate(indices))
            return _Facts(position=result.position, row_source=result.row_source or (src, selector), fill=result.fill)
        return _Facts(fill=result.fill)

    def selected(self, node: fx.Node) -> _Facts:
        """`index_select(x, dim, i)`: output row r along `dim` is x's row i[r]. Rows of a table
        with no token dim by token-wise indices (XGLM's sinusoidal positions at `arange(T) + 2`)
        are a lookup, as `embedding`; fixed indices along a feature dim keep each token's
        elements in its row. Any other use of a token dim refuses."""
        args = bind_arguments(node)
        x, index = args["self"], args["index"]
        x_dims = self.dims(meta_val(x))
        if not self.carries_tokens(x):
            return self.table_rows_at(node, meta_val(x).shape[args["dim"]] if meta_val(x).dim() else 1, index) or _CLEAN
        if x_dims is not None and not self.carries_tokens(index) and args["dim"] % max(meta_val(x).dim(), 1) not in x_dims:
            return _CLEAN
        return self.refuse(node, "index_select along a token dim, or of a tensor with a token dim by indices that carry one")

    def layer_norm(self, node: fx.Node) -> _Facts:
        """A norm over the last dims (`normalized_shape`) reads only its own row when those dims
        are features and its weight and bias carry no tokens."""
        args = bind_arguments(node)
        x, normalized = args["input"], args["normalized_shape"]
        rank = meta_val(x).dim()
        if any(d >= rank - len(normalized) for d in self.dims(meta_val(x)) or {}):
            return self.refuse(node, "a norm over the token dim")
        if any(isinstance(args.get(k), fx.Node) and self.carries_tokens(args[k]) for k in ("weight", "bias")):
            return self.refuse(node, "a norm whose weight or bias carries the token dim")
        return _CLEAN

    def row_lookup(self, node: fx.Node, table: fx.Node) -> _Facts:
        if self.carries_tokens(table):
            return self.refuse(node, "looks rows up in a table that carries the token dim")
        return self.table_rows_at(node, meta_val(table).shape[0], node.args[1]) or _CLEAN

    def table_rows_at(self, node: fx.Node, rows: Any, index: Any, wraps: bool = False) -> _Facts | None:
        """A lookup of one of a fixed table's `rows` rows at `index` (negative indices count from
        the end when it `wraps`): at positions (row t + c for token t) a replay at bucket B reads
        up to row B - 1 + c, so the buckets stop at rows - c (`max_bucket`). A refusal when c or
        the rows are not numbers, when the index is computed from the token count otherwise (no
        bound is known), or when its padded rows may hold no row (`in_table`); else None."""
        position = self.facts[index].position if isinstance(index, fx.Node) else None
        if position is None:
            # Indices computed from the token count (`arange(T) * 2`) may run past the table at a
            # larger bucket; others must hold a row of it at padded rows (an out-of-range index
            # is a device-side assert on a GPU, which no later call recovers from).
            if isinstance(index, fx.Node) and self.computed_from_token_count(index):
                return self.refuse(node, "looks a table's rows up at indices computed from the token count: a "
                                         "replay at a larger bucket could read past the table")
            if isinstance(index, fx.Node) and self.carries_tokens(index) and not self.in_table(index, rows, wraps):
                return self.refuse(node, f"looks a table's rows up at indices whose padded rows may hold no row of "
                                         f"its {rows} (padded inputs hold {PAD_VALUE})")
            return None
        offset = sympy.sympify(position)
        if not (offset.is_Integer and isinstance(rows, int)):
            return self.refuse(node, "looks a table's rows up at token positions plus an offset that is not a "
                                     "number: a replay at a larger bucket could read past the table")
        bound = max(rows - int(offset), 0)
        self.max_bucket = bound if self.max_bucket is None else min(self.max_bucket, bound)
        return None

    def matmul(self, node: fx.Node) -> _Facts:
        """A matmul keeps rows apart unless it contracts over a token dim."""
        args = list(node.args)
        if node.target is aten.addmm.default:
            args = args[1:]
        a, b = args[0], args[1]
        av, bv = meta_val(a), meta_val(b)
        a_dims, b_dims = self.dims(av) or {}, self.dims(bv) or {}
        a_k = av.dim() - 1
        if node.target is aten.linear.default:
            b_k = bv.dim() - 1
        else:
            b_k = bv.dim() - 2 if bv.dim() >= 2 else 0
        if a_k in a_dims or b_k in b_dims:
            return self.refuse(node, "a matmul that sums over the token dim")
        return _CLEAN

    def causal_convolution(self, node: fx.Node) -> _Facts:
        """A 1-D convolution along the token dim (Mamba's, LFM2's and gated-DeltaNet's short conv:
        `conv1d(x, w, padding=K - 1, groups=C)[..., :T]`), stride 1. Output row r reads input rows
        r - p + d*j (j < K; zeros outside): with padding p >= d*(K - 1) none after row r, so the
        first T + a rows (a: the input's prefix) read only real rows. Its T + a + 2p - d*(K - 1)
        rows end in rows that read the padding (in the unpadded run, zeros): every use must cut
        the output back to its first T + a rows or fewer."""
        args = bind_arguments(node)
        x, weight, bias = args["input"], args["weight"], args.get("bias")
        xv, wv = meta_val(x), meta_val(weight)
        x_dims = self.dims(xv) or {}
        stride, padding, dilation = list(args["stride"]), list(args["padding"]), list(args["dilation"])
        if (wv.dim() != 3 or xv.dim() != 3 or list(x_dims) != [2] or isinstance(x_dims[2], _Blocks)
                or args.get("transposed") or stride != [1] or len(padding) != 1 or len(dilation) != 1
                or self.carries_tokens(weight) or isinstance(bias, fx.Node) and self.carries_tokens(bias)
                or not all(type(v) is int for v in (*padding, *dilation))):
            return self.refuse(node, "a convolution over the token dim that is not a 1-D one of stride 1 along it")
        prefix = x_dims[2]
        if not padding[0] >= dilation[0] * (wv.shape[2] - 1):
            return self.refuse(node, "a convolution along the token dim whose rows read later rows (padding under "
                                     "dilation * (kernel - 1))")
        for user in node.users:
            out = self.dims(meta_val(user)) if user.target is aten.slice.Tensor else None
            cut = bind_arguments(user) if out is not None else {}
            first_rows = (out is not None and user.args[0] is node and cut.get("dim", 0) % 3 == 2
                          and (cut.get("start") is None or _is_int(cut["start"], 0)) and _is_int(cut.get("step", 1), 1)
                          and 2 in out and not isinstance(out[2], _Blocks) and _provably_le(out[2], prefix))
            if not first_rows:
                return self.refuse(node, "a convolution along the token dim whose output is used beyond its first "
                                         "T rows, which read the padded rows")
        return _CLEAN

    def padded_gemm(self, node: fx.Node) -> _Facts:
        args = bind_arguments(node)
        for name in ("weight", "bias", "weight_up", "bias_up", "more_weights", "more_biases"):
            value = args.get(name)
            for operand in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(operand, fx.Node) and self.carries_tokens(operand):
                    return self.refuse(node, f"a GEMM whose {name} carries the token dim")
        x = args.get("x")
        if isinstance(x, fx.Node) and 1 in (self.dims(meta_val(x)) or {}):
            return self.refuse(node, "a GEMM that sums over the token dim")
        return _CLEAN

    def mask_ranges(self, node: fx.Node) -> _Facts:
        """Per-query-row key ranges of a mask read the whole row, padded keys too: fine when the
        padded keys are masked (causal) or the keys are not tokens. A causal mask holds its hidden
        fill (`where`) at the padded keys, whatever inf or NaN its other values came from."""
        mask = node.args[0]
        mv = meta_val(mask)
        key_dim = mv.dim() - 1
        if key_dim not in (self.dims(mv) or {}) or (self.facts[mask].causal == (mv.dim() - 2, key_dim)
                                                   and self.hides(mask)):
            return _CLEAN
        if mv.dtype == torch.bool and self.facts[mask].pad is not None and not self.facts[mask].pad:
            # Padded keys hold False (an attention mask padded with 0, as transformers' padding
            # term `attention_mask[batch_idx, kv_idx]`): a real row's ranges span its real keys.
            return _CLEAN
        if node.users and all(_short_name(u.target) in _ATTENTION and self.causal_over_tokens(u)
                              and [name for name, a in bind_arguments(u).items() if a is node] == ["mask_ranges"]
                              for u in node.users):
            # Padded keys the mask shows (BioGPT's `ones(B, T)` padding mask, built at the bucket's
            # size in a replay) widen a real row's ranges only over them, and each attention
            # reading the ranges hides them by its causal flag.
            return _CLEAN
        return self.refuse(node, "key ranges of a mask that does not hide the padded keys")

    def causal_over_tokens(self, attention: fx.Node) -> bool:
        """Whether an attention hides padded keys by its causal flag: its queries are the tokens
        (the flag aligns the last query with the last key: fixed query rows, a learned query or a
        pooled row, would see up to the bucket's last, padded, key)."""
        args = bind_arguments(attention)
        q_dims = self.dims(meta_val(args["q"])) or {}
        return bool(args.get("causal")) and 2 in q_dims and not isinstance(q_dims[2], _Blocks)

    def attention(self, node: fx.Node) -> _Facts:
        """Attention over token keys: real queries must not see padded keys. They come after every
        real key, so a causal attention (flag or mask) never does; a bidirectional one would.
        Hidden padded keys still meet the kernel: their values times weight 0, and under a finite
        mask their scores plus it, so those may not hold inf or NaN (module docstring)."""
        args = bind_arguments(node)
        k, v = args["k"], args["v"]
        k_dims = self.dims(meta_val(k)) or {}
        if 2 not in k_dims:
            return _CLEAN  # keys are not tokens (a cache, an encoder's output)
        if isinstance(k_dims[2], _Blocks):
            return self.refuse(node, "attention over keys from several sequences, each padded at its end")
        if self.facts[v].nonfinite:
            return self.refuse(node, f"values (V) whose padded rows may be inf or NaN (from {self.facts[v].nonfinite}): "
                                     "the kernel's zero weights would turn them into NaN in real rows")
        if args.get("causal"):
            # (Query i sees keys up to S_kv - S + i: a causal boundary at the tokens only when the
            # queries are the tokens too.)
            if not self.causal_over_tokens(node):
                return self.refuse(node, "causal attention whose queries are not the tokens: the flag aligns the "
                                         "last query with the last key, a padded one in a replay")
            return _CLEAN
        mask = args.get("attn_mask")
        if isinstance(mask, fx.Node):
            mv = meta_val(mask)
            if self.facts[mask].causal == (mv.dim() - 2, mv.dim() - 1) and self.hides(mask):
                if self.facts[k].nonfinite and not (mv.dtype == torch.bool or self.facts[mask].hidden == float("-inf")):
                    return self.refuse(node, f"keys (K) whose padded rows may be inf or NaN (from "
                                             f"{self.facts[k].nonfinite}) under a mask that hides them with a finite "
                                             "value: their scores plus it would be NaN in real rows")
                return _CLEAN
        return self.refuse(node, "attention over the token dim that is not provably causal (no causal flag, and no "
                                 "mask built from positions): real queries could see the padded keys")

    def compared(self, node: fx.Node, tensors: list[fx.Node], aligned: Callable[[fx.Node], dict[int, Any]]) -> _Facts:
        """A comparison of two values along two token dims of the output. Of positions: causal
        when `key <= query` (equal offsets; `<` too), and True on the diagonal when the offsets
        compare so (`key > query - w`, a sliding window). Of one row's values read at both
        (`seq[q] == seq[k]`, transformers' packed sequences): True on the diagonal."""
        first, second = tensors
        d1, d2 = aligned(first), aligned(second)
        if len(d1) != 1 or len(d2) != 1:
            return _CLEAN
        ((dim1, _),), ((dim2, _),) = d1.items(), d2.items()
        if dim1 == dim2:
            return _CLEAN
        f1, f2 = self.facts[first], self.facts[second]
        target = node.target
        pair = (min(dim1, dim2), max(dim1, dim2))
        if target is aten.eq.Tensor:
            if any(meta_val(t).dtype.is_floating_point for t in tensors):
                return _CLEAN  # NaN != NaN: a value need not equal itself
            # The same row's value only where the row is one value: of a row of several (features,
            # a batch), two views may read different elements of it (`s[:, 0]` and `s[:, 1]`).
            same_row = (f1.row_source is not None and f1.row_source == f2.row_source
                        and self.one_per_token(*f1.row_source))
            same_position = f1.position is not None and f2.position is not None and _equal(f1.position, f2.position)
            return _Facts(diagonal=pair) if same_row or same_position else _CLEAN
        p1, p2 = f1.position, f2.position
        if p1 is None or p2 is None or target not in _COMPARE or not all(self.exact(t) for t in tensors):
            return _CLEAN
        key, query = (dim1, dim2) if target in _KEY_FIRST else (dim2, dim1)
        causal = (query, key) if _equal(p1, p2) else None
        # At the diagonal both sides sit at one token index: the values are p1 and p2.
        strict = target in (aten.lt.Tensor, aten.gt.Tensor)
        small, large = (p1, p2) if target in _KEY_FIRST else (p2, p1)
        on_diagonal = _provably_le(small + 1, large) if strict else _provably_le(small, large)
        return _Facts(causal=causal, diagonal=pair if on_diagonal else None)

    def one_per_token(self, node: fx.Node, selector: tuple[Any, ...]) -> bool:
        """Whether `node` read through `selector` gives one element per token: every dim but its
        one token dim has size 1 or is indexed by a selector's node (the same batch row in both
        of a comparison's operands: transformers' packed sequences, `seq[b, q] == seq[b, k]`)."""
        value = meta_val(node)
        dims = self.dims(value)
        return (isinstance(value, torch.Tensor) and dims is not None and len(dims) == 1
                and all(_equal(_expr(size), 1) or (d < len(selector) and selector[d] is not None)
                        for d, size in enumerate(value.shape) if d not in dims))

    def hides(self, mask: fx.Node) -> bool:
        """Whether a causal mask's masked keys stay hidden in its dtype: a bool one's False, -inf,
        or a value at most the dtype's `_lowest_of` (a float16 mask's -65504 widened to float32
        meets float32 scores, which may reach past it)."""
        dtype = meta_val(mask).dtype
        facts = self.facts[mask]
        hidden, visible = facts.hidden, facts.visible
        if dtype == torch.bool or hidden == float("-inf"):
            return True
        # A finite value hides a key only beside a visible key far above it: a mask whose visible
        # keys hold the lowest value too scores every key alike, and a row averages them all.
        return (hidden is not None and hidden <= _lowest_of(dtype) and visible is not None
                and hidden <= visible + _lowest_of(dtype))

    def lowered(self, node: fx.Node) -> _Facts:
        """`where(x <= c, low, x)` (or `<`; `low` a number or a filled tensor) of a causal additive
        mask x whose visible keys hold more than c (the attention pass sends a float16 mask's
        hidden keys to float32's lowest value this way): the visible keys, the diagonal among
        them, stay as they were, and the hidden ones hold either their value or `low`, both
        hiding them beside a visible key. Any other `where` with a scalar branch: each element
        from the same element of clean inputs."""
        cond, low, x = node.args[:3]
        facts = self.facts[x] if isinstance(x, fx.Node) else _CLEAN
        low = self.facts[low].fill if isinstance(low, fx.Node) else low
        if not (isinstance(cond, fx.Node) and cond.target in (aten.le.Scalar, aten.lt.Scalar) and cond.args[0] is x
                and isinstance(low, (int, float)) and low <= _LOWEST and meta_val(x).is_floating_point()
                and facts.causal is not None and facts.diagonal == tuple(sorted(facts.causal))
                and facts.visible is not None and isinstance(cond.args[1], (int, float))):
            return _CLEAN
        bound = cond.args[1]
        below = (lambda v: v <= bound) if cond.target is aten.le.Scalar else (lambda v: v < bound)
        kept = not below(facts.visible)
        # Hidden keys at most `hidden`: all sent to `low` when `hidden` is below c, else some keep theirs.
        hidden = None if facts.hidden is None else low if below(facts.hidden) else max(facts.hidden, low)
        return (replace(facts, fill=None, hidden=hidden) if kept and same_shape(meta_val(node).shape, meta_val(x).shape)
                else _CLEAN)

    def masked_where(self, node: fx.Node) -> _Facts:
        """`where(cond, attend, masked)` with `attend` and `masked` filled tensors or numbers (a
        bool mask as an additive one): causal when `cond` is and `masked` hides its keys."""
        cond, attend, masked = node.args[:3]
        out = meta_val(node)

        def fill(arg: Any) -> float | None:
            if isinstance(arg, (int, float)) and not isinstance(arg, bool):
                return float(arg)
            return self.facts[arg].fill if isinstance(arg, fx.Node) else None

        c, low, shown = self.facts[cond], fill(masked), fill(attend)
        if c.causal is not None and low is not None and low <= _LOWEST:
            # -inf hides the keys whatever else the row sees; the dtype's lowest only beside a
            # visible key (the diagonal) and an attend value that is a finite constant.
            visible = c.diagonal == tuple(sorted(c.causal)) and shown is not None and math.isfinite(shown)
            if low == float("-inf") or visible:
                shift = out.dim() - meta_val(cond).dim()
                causal = (c.causal[0] + shift, c.causal[1] + shift)
                # A diagonal of visible keys: the fill may become the lowest value (a clamp).
                return _Facts(causal=causal, diagonal=tuple(sorted(causal)) if visible else None,
                              visible=shown if out.is_floating_point() else None,
                              hidden=low if out.is_floating_point() else None)
        return _CLEAN

    def pointwise(self, node: fx.Node) -> _Facts:
        """Elementwise ops broadcast clean values to clean values; comparisons of positions build
        causal masks, and masks combined with them stay causal."""
        if self.uses_token_count(node):
            return self.refuse(node, "uses the token count as a value, which padding changes")
        out = meta_val(node)
        rank = out.dim()
        tensors = [a for a in node.args if isinstance(a, fx.Node) and isinstance(meta_val(a), torch.Tensor)]

        def aligned(a: fx.Node) -> dict[int, Any]:
            shift = rank - meta_val(a).dim()
            return {d + shift: p for d, p in (self.dims(meta_val(a)) or {}).items()}

        target = node.target
        if target in _COMPARE and len(tensors) == 2:
            return self.compared(node, tensors, aligned)
        if target in _AND and out.dtype == torch.bool:
            if any(meta_val(a).dtype != torch.bool for a in tensors):
                # A float mask's truth is "not zero": its hidden (-inf, lowest) keys read True.
                return _CLEAN
            causal, diagonals = None, set()
            for a in tensors:
                facts, shift = self.facts[a], rank - meta_val(a).dim()
                if facts.causal is not None and causal is None:
                    causal = (facts.causal[0] + shift, facts.causal[1] + shift)
                if facts.diagonal == "all" or facts.fill == 1.0:
                    continue
                diagonals.add(None if facts.diagonal is None else tuple(d + shift for d in facts.diagonal))
            # True on a diagonal only when every operand is (or is True everywhere).
            diagonal = "all" if not diagonals else (diagonals.pop() if len(diagonals) == 1 else None)
            return _Facts(causal=causal, diagonal=diagonal)
        if target is aten.where.self and len(tensors) == 3:
            cond, attend, masked = node.args[:3]
            if cond.target in (aten.le.Scalar, aten.lt.Scalar) and cond.args[0] is masked:
                return self.lowered(node)
            return self.masked_where(node)
        if target in (aten.clamp_min.default, aten.maximum.default) and tensors:
            # `max(mask, lowest)` (XGLM's clamp of masked scores): hidden keys hold the lowest
            # value, which hides them only beside a visible key, so the diagonal must hold.
            x = node.args[0] if node.args[0] in tensors else node.args[1]
            bound = node.args[1] if x is node.args[0] else node.args[0]
            low = self.facts[bound].fill if isinstance(bound, fx.Node) else bound
            facts = self.facts[x]
            # An additive (float) mask: a bool one's facts say where it is True, not what it hides.
            if (meta_val(x).is_floating_point() and isinstance(low, (int, float)) and low <= _LOWEST
                    and facts.causal is not None and facts.diagonal == tuple(sorted(facts.causal))):
                return _Facts(causal=facts.causal, diagonal=facts.diagonal,
                              visible=None if facts.visible is None else max(facts.visible, low),
                              hidden=None if facts.hidden is None else max(facts.hidden, low))
            return _CLEAN
        if target is aten.mul.Tensor and len(tensors) == 2:
            ones = [a for a in tensors if self.facts[a].fill == 1.0]
            other = tensors[0] if ones and ones[0] is tensors[1] else tensors[1]
            if (ones and same_shape(meta_val(node).shape, meta_val(other).shape)
                    and meta_val(node).dtype == meta_val(other).dtype):
                # Times ones (OPT's positions times the padding mask it made of ones): unchanged
                # (in its own dtype: promoted, a position or mask would need `converted`'s checks).
                return self.facts[other]
        if target in (aten.clamp.default, aten.clamp_max.default) and self.facts[node.args[0]].key_range is not None:
            # Indices in [0, n) clamped (transformers 5.17 clamps top-k expert ids to E - 1 before
            # a bias lookup): still in [0, n), and below max + 1, unless the floor passes n - 1.
            bounds = bind_arguments(node)
            low, high = bounds.get("min"), bounds.get("max")
            n = self.facts[node.args[0]].key_range
            if all(b is None or isinstance(b, int) and not isinstance(b, bool) for b in (low, high)):
                n = n if high is None else min(n, high + 1)
                if n >= 1 and (low is None or low <= n - 1):
                    return _Facts(key_range=n)
        if (target is aten.masked_fill.Scalar and not out.is_floating_point()
                and self.facts[node.args[0]].key_range is not None):
            # Indices in [0, n) with some set to a number v >= 0 (Zaya sends its "no expert" picks
            # to expert 0): in [0, max(n, v + 1)).
            value = node.args[2]
            if type(value) is int and value >= 0:
                return _Facts(key_range=max(self.facts[node.args[0]].key_range, value + 1))
        if target is aten.remainder.Scalar and not out.is_floating_point():
            # Integers modulo a positive number (positions wrapped into a table, `p % rows`): in
            # [0, divisor), as Python's remainder is, whatever a padded row's dividend holds.
            divisor = node.args[1]
            if type(divisor) is int and divisor >= 1:
                return _Facts(key_range=divisor)
        if target in (aten.add.Tensor, aten.sub.Tensor) and len(tensors) == 1:
            facts = self.facts[tensors[0]]
            other = next((a for a in node.args[1:] if not isinstance(a, fx.Node)), 0)
            if (facts.position is not None and isinstance(other, (int, torch.SymInt))
                    and meta_val(node).dtype in _POSITION_DTYPES):
                sign = 1 if target is aten.add.Tensor else -1
                alpha = node.kwargs.get("alpha", 1)
                return _Facts(position=facts.position + sign * alpha * _expr(other))
        return _CLEAN


def _evaluated(node: fx.Node, operands: dict[str, Any]) -> Any:
    """The one value of elementwise `node` when each tensor argument holds one value everywhere
    (`operands`, by argument name; None: not known), or None."""
    args = bind_arguments(node)
    if any(operands.get(name) is None for name, value in args.items() if isinstance(value, fx.Node)):
        return None
    if node.target in _DIVISIONS and any(isinstance(v, (int, float)) and abs(v) > _KNOWN_BOUND
                                         for v in list(operands.values()) + list(args.values())):
        return None  # the dtype's minimum over -1 traps (SIGFPE) on the CPU, which no except catches
    with unset_fake_temporarily():
        # Each operand with its own rank and dtype, so type promotion is the real op's (a uint8
        # tensor minus an int64 number stays uint8 and wraps: 0 - 1 is 255, not -1).
        try:
            concrete = {name: torch.full((1,) * meta_val(value).dim(), operands[name], dtype=meta_val(value).dtype)
                        if isinstance(value, fx.Node) else value for name, value in args.items()}
            out = node.target(**concrete)
        except (RuntimeError, TypeError, ValueError, ZeroDivisionError, OverflowError):  # 0 // 0: an error on a CPU
            return None
        return out.item() if isinstance(out, torch.Tensor) and out.numel() == 1 else None


def _floating(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _smallest(dtype: torch.dtype) -> float:
    """The smallest positive value of a float dtype (its smallest subnormal); 1 for the others."""
    if not dtype.is_floating_point:
        return 1.0
    info = torch.finfo(dtype)
    return info.tiny * info.eps


def _as_dtype(value: Any, dtype: torch.dtype) -> int | bool | None:
    """A Python number as an element of `dtype` holds it (None stays None)."""
    if value is None:
        return None
    with unset_fake_temporarily():
        return torch.tensor(value).to(dtype).item()


def _keeps_each_largest(fill: fx.Node) -> bool:
    """Whether `fill` (`z.masked_fill(mask, -inf)`) keeps the largest element of z along a dim d,
    and only softmaxes along d read it (so it adds no all -inf row to them): the mask is `(max(z,
    d) - y) / f > c` (or without `/ f`) for a number c >= 0, and z is y, or y with elements set to
    -inf (PhiMoE's router: `scores`, then `scatter(scores, d, i, -inf)`). At z's largest element
    the difference is 0 (0 / f is 0 or NaN), never above c; a row of z that is all -inf has no
    largest element to keep, and the fill's row is all -inf where z's already was."""
    z, mask = fill.args[0], fill.args[1]
    if not (isinstance(mask, fx.Node) and mask.target is aten.gt.Scalar and isinstance(mask.args[1], (int, float))
            and mask.args[1] >= 0 and isinstance(mask.args[0], fx.Node)):
        return False
    difference = mask.args[0]
    if difference.target is aten.div.Tensor and isinstance(difference.args[0], fx.Node):
        difference = difference.args[0]
    if difference.target is not aten.sub.Tensor or difference.kwargs.get("alpha", 1) != 1:
        return False
    largest, y = difference.args[:2]
    if not (isinstance(largest, fx.Node) and largest.target is operator.getitem and largest.args[1] == 0
            and largest.args[0].target is aten.max.dim and largest.args[0].args[0] is z):
        return False
    rank = meta_val(z).dim()
    dim = largest.args[0].args[1] % rank
    keepdim = bind_arguments(largest.args[0])["keepdim"]
    hidden_from_y = z is y or (z.target in (aten.scatter.value, aten.masked_fill.Scalar) and z.args[0] is y
                               and z.args[-1] == float("-inf"))
    read_along_dim = all(u.target in (aten._softmax.default, aten.softmax.int) and u.args[1] % rank == dim
                         for u in fill.users)
    return bool(keepdim and hidden_from_y and read_along_dim and fill.users)


def _short_name(target: Any) -> str:
    """An op's name without its overload (`padded_gemm`, `meta_attention`)."""
    return getattr(target, "__name__", str(target)).split(".")[0]


def _is_grouped_gemm(target: Any) -> bool:
    """A grouped (MoE expert) GEMM: tileflow's, transformers' fallback or aten's."""
    return getattr(getattr(target, "_schema", None), "name", None) in _GROUPED_GEMMS


def _axes(node: fx.Node) -> list[int]:
    """The dims an op reads along (reductions, scans, slices, cats, gathers), normalized; every dim
    for a reduction over all of them."""
    target = node.target
    if target is aten.constant_pad_nd.default:  # pads: (last dim's low, high, the one before's, ...)
        rank = meta_val(node.args[0]).dim()
        return sorted({rank - 1 - i // 2 for i, pad in enumerate(node.args[1]) if not _is_int(pad, 0)})
    if target not in _ALONG and target not in _SCANS and target not in (
            aten.slice.Tensor, aten.select.int, aten.cat.default, aten.gather.default, aten.scatter.value,
            aten.scatter.src, aten.slice_scatter.default, aten.select_scatter.default):
        return []
    value = meta_val(node) if target is aten.cat.default else meta_val(node.args[0])
    rank = max(value.dim(), 1)
    dims = bind_arguments(node).get("dim", 0)
    if dims is None or dims == []:
        return list(range(rank))
    return [d % rank for d in ([dims] if isinstance(dims, int) else dims)]


def _with_dims_moved(facts: _Facts, mapping: dict[int, int] | None) -> _Facts:
    """A mask's facts after its dims moved (`mapping`: input dim -> output dim; None: untracked,
    so the mask facts are dropped). Value facts (positions, row sources) do not depend on dims."""
    def moved(dims: Any) -> Any:
        if dims is None or dims == "all":
            return dims
        if mapping is None or not all(d in mapping for d in dims):
            return None
        return tuple(mapping[d] for d in dims)

    diagonal = moved(facts.diagonal)
    return replace(facts, causal=moved(facts.causal),
                   diagonal=tuple(sorted(diagonal)) if isinstance(diagonal, tuple) else diagonal)


def _flat(value: Any) -> list[Any]:
    out: list[Any] = []
    fx.node.map_aggregate(value, lambda a: out.append(a))
    return out


def _expr(value: Any) -> Any:
    """A size or scalar (a SymBool too) as a sympy expression (ints stay ints)."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return value.node.expr
    return value


def _is_int(value: Any, expected: int) -> bool:
    """`value` is the plain int `expected` (a symbolic one is not compared: that would guard)."""
    return type(value) is int and value == expected


def _scalar(value: Any) -> Any:
    return meta_val(value) if isinstance(value, fx.Node) else value


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, _Blocks) or isinstance(b, _Blocks):
        return False  # a count of blocks is no size: never provably equal to one
    try:
        return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0
    except (TypeError, sympy.SympifyError):
        return False


def _provably_le(a: Any, b: Any) -> bool:
    """a <= b for every value of the symbols (sizes are non-negative)."""
    if isinstance(a, _Blocks) or isinstance(b, _Blocks):
        return False
    diff = sympy.expand(sympy.sympify(_expr(b)) - sympy.sympify(_expr(a)))
    if diff.is_number:
        return bool(diff >= 0)
    return bool(all(s.is_nonnegative for s in diff.free_symbols)) and diff.is_polynomial() and all(
        c >= 0 for c in sympy.Poly(diff, *diff.free_symbols).coeffs())


def _same_sizes(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(_equal(_expr(x), _expr(y)) for x, y in zip(a, b))


def _token_dims_kept(src: Sequence[Any], out: Sequence[Any], s_dims: dict[int, Any] | None,
                     o_dims: dict[int, Any] | None) -> dict[int, int] | None:
    """Source token dim -> output token dim of a view that only merges or splits the dims between
    token dims (or None when it does more). An element's flat index is a mixed-radix number whose
    digits are the dims; split at the token dims into segments, equal segment sizes on both sides
    and the same token dims in the same order keep every element's token digits."""
    if s_dims is None or o_dims is None or len(s_dims) != len(o_dims) or any(
            isinstance(a, _Blocks) for a in (*s_dims.values(), *o_dims.values())):
        return None
    s_at, o_at = sorted(s_dims), sorted(o_dims)

    def segments(shape: Sequence[Any], at: list[int]) -> list[Any]:
        cuts = [-1, *at, len(shape)]
        return [math.prod(_expr(x) for x in shape[a + 1:b]) for a, b in zip(cuts, cuts[1:])]

    if not all(_equal(_expr(src[s]), _expr(out[o])) and _equal(s_dims[s], o_dims[o]) for s, o in zip(s_at, o_at)):
        return None
    if not all(_equal(a, b) for a, b in zip(segments(src, s_at), segments(out, o_at))):
        return None
    return dict(zip(s_at, o_at))


def _dim_mapping(node: fx.Node) -> dict[int, int] | None:
    """Input dim -> output dim of a transpose, permute, unsqueeze, squeeze or slice/select."""
    src = meta_val(node.args[0])
    rank = src.dim()
    target = node.target
    if target in (aten.slice.Tensor,):
        return {d: d for d in range(rank)}
    if target is aten.select.int:
        dim = node.args[1] % rank
        return {d: d - (d > dim) for d in range(rank) if d != dim}
    if target is aten.t.default:
        return {0: 1, 1: 0} if rank == 2 else {0: 0}
    if target is aten.transpose.int:
        a, b = node.args[1] % rank, node.args[2] % rank
        mapping = {d: d for d in range(rank)}
        mapping[a], mapping[b] = b, a
        return mapping
    if target is aten.permute.default:
        order = [d % rank for d in node.args[1]]
        return {src_dim: out_dim for out_dim, src_dim in enumerate(order)}
    if target is aten.unsqueeze.default:
        dim = node.args[1] % (rank + 1)
        return {d: d + (d >= dim) for d in range(rank)}
    out_rank = meta_val(node).dim()
    if out_rank == rank:
        return {d: d for d in range(rank)}
    return None  # a squeeze: dims shift in ways not worth tracking for masks
