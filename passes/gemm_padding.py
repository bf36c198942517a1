"""gemm_padding: every canonical `linear` becomes `tileflow::padded_gemm` with a tile plan.

XY-Serve's SmoothGEMM as a pass. The token count M of a linear layer changes every step; instead
of recompiling or tuning for the first M seen, each GEMM gets a plan computed once over M's whole
symbolic range (from the shape environment, capped by `Config.max_tokens`): a few fixed-tile
kernels, each serving a piece of the range, with the tail tile masked (virtual padding). A static
M gets a degenerate one-piece plan.

Epilogues are fused where the graph has them, looking through the views between the 2-D GEMM
and the model's 3-D activations (elementwise epilogues commute with those views):
- bias (from `linear`, or added by hand: `x @ W.T + b`), SiLU / GELU (erf or tanh) / ReLU and
  squared ReLU (`relu(a) ** 2`, the `relu2` of Nemotron-style MLPs), a residual `add`, and a
  cast of the result to another float dtype (from a half-precision result, e.g.
  `lm_head(h).float()`, the kernel rounds to that dtype before converting, as eager does:
  `round_first`);
- a gated pair `act(x @ Wg.T) * (x @ Wu.T)` (SwiGLU, `act` SiLU; GeGLU, `act` GELU, Gemma's with
  its tanh form): two GEMMs on the same input become one kernel over the gate and up weights
  (logically [2N, K], never copied into a stacked tensor); so does one stacked gate-and-up
  weight whose output is chunked in halves (Phi-3's `gate_up_proj`, kind `stacked_gate_up`;
  the gate in either half, the bias the linear's or added by hand).
Sibling linears on one input with no epilogue but their bias (a layer's Q, K and V projections;
a cast after one, as Qwen3's Q and K norms upcast them, stays apart after its columns) become one
`padded_gemm` over their weights as N segments (`more_weights`; the weights are not
concatenated), each linear's output a column slice of its result (kind `fused_siblings`, counted
per linear merged into another's kernel): one launch instead of three, and the K and V GEMMs'
few output tiles join Q's on the device. Under `torch.autocast` a later sibling's weight is cast
after the first sibling's linear: that cast (and any layout op over it) moves up to it.
MoE expert GEMMs (`transformers::grouped_mm_fallback` or `aten._grouped_mm`: x [M, K] with rows
sorted by expert, weights [E, K, N], int32 cumulative `offs`) become `tileflow::grouped_gemm`,
whose plan is keyed by the expected rows per expert ceil(M / E); Mixtral's
`chunk(2, -1) -> silu(gate) * up` after the gate/up experts is fused into it (kind `grouped_gemm`,
`fused_grouped_swiglu`; a GELU gate likewise, `fused_grouped_geglu` or `fused_grouped_geglu_tanh`).
The batched form without offsets (x [E, T, K], one row block per expert: Llama 4's) is taken too,
and a per-expert bias added after the product (`bias[expert_ids]`) is fused. Matmuls it cannot
take (dtypes the target lacks, mixed dtypes, a grouped matmul's own `bias` argument, a 3-D input
with offsets, weights of symbolic sizes: a graph input under `dynamic=True`, which
`torch._dynamo.mark_static` makes static) stay as they are, with the reason in the report.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

from tileflow.graph_utils import (
    bind_arguments,
    copy_source_meta,
    eliminate_dead_code,
    erase_unused,
    in_graph,
    infer_meta,
    is_view_op,
    reads_written,
    same_shape,
    traced_contiguous,
    transposed_dims,
    written_in_place,
)
from tileflow.kernel_spec import CLAMPED_SWIGLU, GATED_ACTIVATIONS, is_gated
from tileflow.pipeline import PassContext, PassResult, register_pass
from tileflow.runtime import encode_plan, gemm_plan, grouped_gemm_plan, plan_tile_times, segments_in_one_kernel
from tileflow.tiles import TilePlan, token_range

aten = torch.ops.aten
prims = torch.ops.prims

_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
# The gated activation whose gate a unary activation is: silu -> swiglu, gelu -> geglu, ...
_GATED_BY_GATE = {gate: gated for gated, gate in GATED_ACTIVATIONS.items()}
# Targets whose sibling GEMMs run as one node: Triton reads the segments in one kernel, the
# reference computes them one by one into the node's columns. Ascend's kernels write contiguous
# rows only, so there a node's segments would cost copies: its siblings stay apart.
_SIBLING_TARGETS = ("triton", "reference")
# Why a GEMM whose weight has symbolic sizes stays as it is, and what makes them static.
_SYMBOLIC_WEIGHT = ("the weight's sizes are symbolic (a graph input under dynamic=True); plans need them static. "
                    "If it is a parameter, torch._dynamo.mark_static(weight) before the first call makes them so (in "
                    "an export, give the weight no Dim); if it is an activation (the tokens, a cache), the product "
                    "has no fixed weight to plan for and runs as it is")
_TARGET_DTYPES = {
    "triton": (torch.float16, torch.bfloat16, torch.float32),
    "ascend": (torch.float16, torch.bfloat16, torch.float32),
    "reference": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _left_product_reason(node: fx.Node) -> str | None:
    """Why a matrix product that canonicalize did not make a `linear` stays as it is (None for
    any other node): an `addmm` other than `bias + x @ w` with a bias [N], or a product with a
    1-D operand. Neither reaches the matching above, so without this the report had no word
    on them."""
    if node.op != "call_function":
        return None
    if node.target is aten.addmm.default:
        bias = _val(node.args[0])
        shape = list(bias.shape) if isinstance(bias, torch.Tensor) else bias
        return (f"addmm with beta={node.kwargs.get('beta', 1)}, alpha={node.kwargs.get('alpha', 1)} and a bias of "
                f"shape {shape}: canonicalize makes a linear only of unit alpha and beta and a 1-D bias [N], and "
                f"the product runs as it is")
    if node.target in (aten.mv.default, aten.addmv.default):
        return ("a matrix-vector product (a 1-D operand): padded_gemm takes a 2-D input and a 2-D weight [N, K], "
                "and the product runs as it is")
    return None


def _linear_bias(linear: fx.Node) -> Any:
    """The bias of an `aten.linear` node, passed by position or by keyword (None when absent)."""
    return linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")


# What a sibling group moves up to its first linear: a later weight's cast (autocast writes
# `_to_copy(w, bfloat16)` before each linear) and layout ops over it.
_HOISTABLE = {aten._to_copy.default, prims.convert_element_type.default, aten.t.default, aten.permute.default,
              aten.transpose.int, aten.view.default}


def _can_hoist(node: fx.Node, anchor: fx.Node, order: dict[fx.Node, float], written: set[fx.Node]) -> bool:
    """Whether `node`, which comes after `anchor`, may move before it: a chain of casts and
    layout ops over values that come before `anchor`, reading nothing written in place."""
    if order[node] < order[anchor]:
        return True
    return (node.op == "call_function" and node.target in _HOISTABLE and not reads_written(node, written)
            and all(_can_hoist(i, anchor, order, written) for i in node.all_input_nodes))


def _hoist(node: fx.Node, anchor: fx.Node, order: dict[fx.Node, float]) -> None:
    """Move `node` and the inputs it needs moved (`_can_hoist` said it may) just before `anchor`."""
    if order[node] < order[anchor]:
        return
    for i in node.all_input_nodes:
        _hoist(i, anchor, order)
    anchor.prepend(node)
    order[node] = order[anchor] - 0.5  # (before anchor now; later than everything it reads)


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _activation_of(node: fx.Node, arg: fx.Node) -> str | None:
    """The epilogue name when `node` applies a supported activation to `arg`, else None."""
    if node.op != "call_function" or not node.args or node.args[0] is not arg:
        return None
    if node.target is aten.silu.default:
        return "silu"
    if node.target is aten.gelu.default:
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    if node.target is aten.relu.default:
        return "relu"
    return None


def _squares(node: fx.Node | None, arg: fx.Node) -> bool:
    """True when `node` squares `arg` (`torch.square` and `x ** 2` trace to a pow, `x * x` to a mul)."""
    if node is None or node.op != "call_function":
        return False
    if node.target is aten.pow.Tensor_Scalar:
        return node.args[0] is arg and node.args[1] == 2
    return node.target is aten.mul.Tensor and len(node.args) == 2 and node.args[0] is arg and node.args[1] is arg


def _cast_dtype(node: fx.Node, arg: fx.Node) -> torch.dtype | None:
    """The target dtype when `node` only converts `arg`'s dtype, else None."""
    if node.op != "call_function" or not node.args or node.args[0] is not arg:
        return None
    if node.target is prims.convert_element_type.default:
        return node.args[1]
    if node.target is aten._to_copy.default and set(node.kwargs) == {"dtype"}:
        return node.kwargs["dtype"]
    return None


def _second_half_first(graph: fx.Graph, stacked: fx.Node, n: int) -> tuple[fx.Node, fx.Node]:
    """Views of a stacked [2n, ...] weight's (or [2n] bias's) halves along dim 0, the second first."""
    halves = []
    for start in (n, 0):
        half = graph.call_function(aten.slice.Tensor, (stacked, 0, start, start + n))
        infer_meta(half)
        halves.append(half)
    return halves[0], halves[1]


@dataclass
class _Chain:
    """A linear and the epilogue nodes fused into it, ending at `tip`."""

    linear: fx.Node
    tip: fx.Node
    last_view: fx.Node | None = None
    added_bias: fx.Node | None = None  # `x @ W.T + b`: the bias of a linear that has none
    activation: str = "none"
    residual: fx.Node | None = None
    out_dtype: torch.dtype | None = None
    round_first: bool = False  # the cast converts a half-precision result: round to it first
    up_linear: fx.Node | None = None
    gate_second: bool = False  # a stacked gate-and-up weight whose second half is the gate
    absorbed: list[fx.Node] = field(default_factory=list)
    out_shape: list[Any] | None = None  # the view of the GEMM's output where no view node gives it

    @property
    def bias(self) -> Any:
        """The GEMM's bias (of the gate, when gated): the linear's, or one added right after it."""
        bias = _linear_bias(self.linear)
        return self.added_bias if bias is None else bias


def _output_width(chain: _Chain) -> int:
    """The GEMM's N: the weight's rows, half of them for a gated activation over one stacked weight."""
    rows = int(_val(chain.linear.args[1]).shape[0])
    return rows // 2 if is_gated(chain.activation) and chain.up_linear is None else rows


def _walk_views(chain: _Chain) -> None:
    """Extend the chain through single-user reshapes."""
    while True:
        user = _only_user(chain.tip)
        if user is None or user.op != "call_function" or user.target not in _VIEWS or user.args[0] is not chain.tip:
            return
        chain.tip = chain.last_view = user
        chain.absorbed.append(user)


def _source(node: fx.Node) -> tuple[Any, ...]:
    """A key equal for two nodes that compute the same value by the same view of one tensor."""
    if node.op == "call_function" and node.target in _VIEWS:
        return ("view", node.args[0], tuple(str(a) for a in node.args[1]))
    return ("node", node)


def _up_partner(gate: fx.Node, other: Any) -> fx.Node | None:
    """The up-projection linear behind `other` (through single-user views), if it pairs with `gate`."""
    while isinstance(other, fx.Node) and other.op == "call_function" and other.target in _VIEWS and len(other.users) == 1:
        other = other.args[0]
    if not (isinstance(other, fx.Node) and other.target is aten.linear.default and len(other.users) == 1):
        return None
    if _source(other.args[0]) != _source(gate.args[0]):
        return None
    gv, uv = _val(gate.args[1]), _val(other.args[1])
    if not same_shape(gv.shape, uv.shape) or gv.dtype != uv.dtype:
        return None
    if (_linear_bias(gate) is not None) != (_linear_bias(other) is not None):
        return None
    return other


# Grouped (MoE expert) matmuls, by schema name: (x [M, K], w [E, K, N], offs int32 [E]).
_GROUPED_MM = ("transformers::grouped_mm_fallback", "aten::_grouped_mm")


def _grouped_mm_args(node: fx.Node, parameters: frozenset[str] = frozenset()) -> dict[str, Any] | None:
    """x, w, offs, bias, out_dtype of a grouped matmul node (None when `node` is not one): a
    `_grouped_mm`, or a `bmm` over stacked weights (the batched form: no offsets; `parameters`
    as in `_stacked_weights_bmm`)."""
    if node.op == "call_function" and node.target is aten.bmm.default and _stacked_weights_bmm(node, parameters):
        return {"x": node.args[0], "w": node.args[1], "offs": None, "bias": None, "out_dtype": None}
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or schema.name not in _GROUPED_MM:
        return None
    names = [a.name for a in schema.arguments]  # input/self, weight/mat2, offs[, bias, out_dtype]
    values = dict(zip(names, node.args))
    values.update(node.kwargs)
    x, w = values.get(names[0]), values.get(names[1])
    return {"x": x, "w": w, "offs": values.get("offs"), "bias": values.get("bias"), "out_dtype": values.get("out_dtype")}


# The dtypes a histogram of expert ids may be taken in, with the most experts each bins exactly.
_EXACT_HISTC = {torch.float32: 4096, torch.float64: 1 << 30, torch.int32: 1 << 30, torch.int64: 1 << 30}


def _sorted_expert_ids(offs: Any, experts: int) -> fx.Node | None:
    """The expert ids, sorted, that made the group offsets `offs` (None unless provably so):
    offs = cumsum(histc(ids, bins=E, min=0, max=E - 1), dtype=int32), ids the values of an
    ascending `sort` of top-k indices (through views; a cast before histc is fine). Then each
    row r of expert e's group has ids[r] == e: top-k indices are never negative, so every id
    below E lands in its own bin (floor(v * E / (E - 1)) = v for v < E - 1; the last bin holds
    E - 1) and sorts before any id past E - 1, which histc leaves out with its rows."""
    # (A cumsum of histc's 1-D counts runs along dim 0; the offsets' int32 is checked before.)
    histc = offs.args[0] if isinstance(offs, fx.Node) and offs.target is aten.cumsum.default else None
    if not (isinstance(histc, fx.Node) and histc.target is aten.histc.default):
        return None
    if tuple(bind_arguments(histc)[a] for a in ("bins", "min", "max")) != (experts, 0, experts - 1):
        return None
    ids = histc.args[0]
    if isinstance(ids, fx.Node) and ids.target is aten._to_copy.default and set(ids.kwargs) <= {"dtype"}:
        # histc bins in its input's dtype: every id in its own bin only where that is exact
        # (bfloat16 puts id 30 of 32 in bin 31; float32 holds up to 4096 experts, measured).
        if ids.kwargs.get("dtype") not in _EXACT_HISTC or experts > _EXACT_HISTC[ids.kwargs.get("dtype")]:
            return None
        ids = ids.args[0]
    sort = ids.args[0] if isinstance(ids, fx.Node) and ids.target is operator.getitem and ids.args[1] == 0 else None
    if not (isinstance(sort, fx.Node) and sort.target in (aten.sort.default, aten.sort.stable)):
        return None
    sort_args = bind_arguments(sort)
    source, dim, descending = sort_args["self"], sort_args["dim"], sort_args["descending"]
    if descending or not isinstance(source, fx.Node) or getattr(_val(source), "ndim", None) != 1 or dim not in (0, -1):
        return None
    while source.op == "call_function" and (is_view_op(source.target) or source.target in _VIEWS):
        source = source.args[0]
    topk = source.args[0] if source.target is operator.getitem and source.args[1] == 1 else None
    return ids if isinstance(topk, fx.Node) and topk.target is aten.topk.default else None


def _expert_bias(gemm: fx.Node, args: dict[str, Any], experts: int, rows: int) -> tuple[fx.Node, fx.Node] | None:
    """(the add, the [E, rows] bias) when the grouped GEMM's output only feeds
    `add(out, bias[ids])`, ids the sorted expert ids behind its offsets (`_sorted_expert_ids`),
    the bias and the sum in the output's dtype: transformers' MoE layers with biases (gpt-oss) add
    them so; else None."""
    add = _only_user(gemm)
    if add is None or add.target is not aten.add.Tensor or len(add.args) != 2 or add.kwargs or gemm not in add.args:
        return None
    gather = add.args[1] if add.args[0] is gemm else add.args[0]
    if not (isinstance(gather, fx.Node) and gather.target is aten.index.Tensor and len(gather.args[1]) == 1):
        return None
    bias, ids = gather.args[0], gather.args[1][0]
    if isinstance(ids, fx.Node) and ids.target is aten.clamp.default and tuple(ids.args[1:]) in ((None, experts - 1),
                                                                                                (0, experts - 1)):
        # transformers 5.17 gathers by the ids clamped below E (its expert-parallel sentinels):
        # the same id on every row of a group.
        ids = ids.args[0]
    bv, addv = _val(bias), _val(add)
    if not (isinstance(bv, torch.Tensor) and isinstance(addv, torch.Tensor) and tuple(bv.shape) == (experts, rows)
            and addv.dtype == bv.dtype == _val(gemm).dtype and same_shape(addv.shape, _val(gemm).shape)):
        return None
    return (add, bias) if ids is not None and ids is _sorted_expert_ids(args["offs"], experts) else None


def _stacked_weights_bmm(node: fx.Node, parameters: frozenset[str] = frozenset()) -> bool:
    """Whether a `bmm` multiplies token rows by a stack of weights: its second operand a graph
    input or attribute of static shape (behind views), and its first one of a symbolic size or
    the second the model's own (an attribute, or an input named in `parameters`: the model's
    parameters and buffers, `PassContext.parameter_inputs`). In a static graph no size is
    symbolic: there only the model's own weights are taken, and a stack the caller hands in (the
    tokens, a cache) stays a bmm, unless it was given `mark_static_address` (AOTAutograd counts it
    among the static inputs: the same product either way); the rows' static T gets a one-piece
    plan, as a linear's static M does.
    The attention pass has taken its own bmms before this pass (or left them with a reason)."""
    x, w = node.args[0], node.args[1]
    while isinstance(w, fx.Node) and w.op == "call_function" and is_view_op(w.target):
        w = w.args[0]
    xv, wv = _val(x), _val(w)
    return (isinstance(w, fx.Node) and w.op in ("placeholder", "get_attr") and isinstance(wv, torch.Tensor)
            and isinstance(xv, torch.Tensor) and not any(isinstance(d, torch.SymInt) for d in wv.shape)
            and (any(isinstance(d, torch.SymInt) for d in xv.shape) or w.op == "get_attr" or w.name in parameters))


def _rows_and_multiple(m: Any) -> tuple[Any, int]:
    """A row count as (rows, k) with M = k * rows for a constant k: `2*s0` (top-2 routing over
    s0 tokens) is (s0, 2); anything else is (m, 1)."""
    if isinstance(m, torch.SymInt):
        coeff, rest = m.node.expr.as_coeff_Mul()
        if coeff.is_Integer and int(coeff) > 1 and rest.free_symbols:
            return rest, int(coeff)
    return m, 1


def _describe_grouped(plan: TilePlan, experts: int) -> str:
    """A grouped GEMM's plan in words: its pieces are ranges of ceil(M / E), not of M."""
    pieces = "; ".join(f"{p.lo}..{p.hi} -> {p.config.name}" for p in plan.pieces)
    return f"rows per expert ceil(M / {experts}): {pieces}"


def _is_last_dim(dim: Any, rank: int) -> bool:
    return isinstance(dim, int) and dim % rank == rank - 1


def _expert_weight(w: fx.Node) -> tuple[fx.Node | None, bool]:
    """The [E, N, K] tensor behind a [E, K, N] grouped-matmul operand: (its source, True) when `w`
    is `transpose(-2, -1)` (Dynamo) or `permute([0, 2, 1])` (export) of it, i.e. the model's
    parameter, used as is; else (None, False)."""
    if transposed_dims(w) == (1, 2) and _val(w.args[0]).dim() == 3:
        return w.args[0], True
    return None, False


def _gated_tail(gemm: fx.Node, n: int, rank: int) -> tuple[fx.Node, fx.Node | None, str, int] | None:
    """(the `mul` of `act(gate) * up`, the mask of a `masked_fill(out, mask, 0)` zeroing whole
    rows in between or None, the gated activation, the gate's half: 0 or 1) when the (grouped)
    GEMM's [..., 2n] output (of `rank` dims) only feeds `split(n, -1)` (Mixtral's `chunk(2,
    dim=-1)`) whose halves are the gate and the up projection, `act` a gate's activation
    (`GATED_ACTIVATIONS`: silu, gelu, gelu_tanh); else None. Most models gate the first half;
    diffusers-style GeGLU and Moonshine's MLP (`h, gate = proj(x).chunk(2); h * act(gate)`) the
    second. (transformers 5.17's expert-parallel sentinel rows are such a fill.)"""
    split = _only_user(gemm)
    row_mask = _zeroed_rows(split, rank) if split is not None else None
    if row_mask is not None:
        split = _only_user(split)
    if split is None or split.target not in (aten.split.Tensor, aten.split_with_sizes.default):
        return None
    sizes = split.args[1]
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    # (A split by a symbolic size, a node here, splits the token dim: DTensor's sequence parallel.)
    halved = sizes == n if isinstance(sizes, int) else isinstance(sizes, (list, tuple)) and list(sizes) == [n, n]
    if not (halved and _is_last_dim(dim, rank)):
        return None
    halves: dict[int, fx.Node] = {}
    for user in split.users:
        if user.target is not operator.getitem or user.args[1] in halves or len(user.users) != 1:
            return None
        halves[user.args[1]] = user
    if set(halves) != {0, 1}:
        return None
    for gate_half in (0, 1):
        gate, up = halves[gate_half], halves[1 - gate_half]
        act = _only_user(gate)
        gated = _GATED_BY_GATE.get(_activation_of(act, gate)) if act is not None else None
        if gated is None:
            continue
        mul = _only_user(act)
        if mul is None or mul.target is not aten.mul.Tensor or len(mul.args) != 2 or set(mul.args) != {act, up}:
            return None
        return mul, row_mask, gated, gate_half
    return None


def _scalar_operand(node: fx.Node, target: Any, other: fx.Node) -> Any:
    """The number `node` combines `other` with when it is `target(other, c)` or `target(c, other)`
    (an aten mul or add of a tensor and a Python number, no alpha), else None."""
    if node.target is not target or len(node.args) != 2 or node.kwargs or other not in node.args:
        return None
    c = node.args[1] if node.args[0] is other else node.args[0]
    return c if isinstance(c, (int, float)) and not isinstance(c, bool) else None


def _clamped_swiglu_tail(gemm: fx.Node, n: int, rank: int) -> tuple[fx.Node, fx.Node | None, float, float] | None:
    """(the last `mul`, the mask of a `masked_fill` zeroing whole rows in between or None, alpha,
    limit) when the (grouped) GEMM's [..., 2n] output of `rank` dims only feeds gpt-oss's gated
    activation over interleaved columns: gate = out[..., 0::2] clamped to at most `limit`, up =
    out[..., 1::2] clamped to [-limit, limit], and `(up + 1) * (gate * sigmoid(gate * alpha))`
    (each product in either order); else None. (The activation of a zero row is zero, so the
    fill moves after the fused kernel, as `_gated_tail`'s does.)"""
    fill = _only_user(gemm)
    row_mask = _zeroed_rows(fill, rank) if fill is not None else None
    halves: dict[int, fx.Node] = {}
    for user in (fill if row_mask is not None else gemm).users:
        start = user.args[2] if user.target is aten.slice.Tensor and len(user.args) == 5 else None
        if start not in (0, 1) or start in halves or not _is_last_dim(user.args[1], rank) or user.args[4] != 2 \
                or not (isinstance(user.args[3], int) and user.args[3] >= 2 * n) or len(user.users) != 1:
            return None
        halves[start] = user
    if set(halves) != {0, 1}:
        return None
    gate, up = (next(iter(halves[i].users)) for i in (0, 1))
    if gate.target is not aten.clamp.default or up.target is not aten.clamp.default or gate.kwargs or up.kwargs:
        return None
    limit = gate.args[2] if len(gate.args) == 3 and gate.args[1] is None else None
    if not isinstance(limit, (int, float)) or not 0 < limit < math.inf or tuple(up.args[1:]) != (-limit, limit):
        return None
    if len(gate.users) != 2 or len(up.users) != 1:
        return None
    scaled = next((u for u in gate.users if _scalar_operand(u, aten.mul.Tensor, gate) is not None), None)
    sigmoid = _only_user(scaled) if scaled is not None else None
    if sigmoid is None or sigmoid.target is not aten.sigmoid.default:
        return None
    glu = _only_user(sigmoid)
    if glu not in gate.users or glu.target is not aten.mul.Tensor or set(glu.args) != {gate, sigmoid}:
        return None
    shifted = next(iter(up.users))
    tip = _only_user(shifted)
    if _scalar_operand(shifted, aten.add.Tensor, up) != 1 or _only_user(glu) is not tip or tip is None:
        return None
    if tip.target is not aten.mul.Tensor or len(tip.args) != 2 or set(tip.args) != {shifted, glu}:
        return None
    alpha = float(_scalar_operand(scaled, aten.mul.Tensor, gate))
    return (tip, row_mask, alpha, float(limit)) if math.isfinite(alpha) else None


def _zeroed_rows(node: fx.Node, rank: int) -> fx.Node | None:
    """The mask of `masked_fill(x, mask, 0)` when it zeroes whole rows of the rank-`rank` x (a
    bool mask whose last dim is 1), else None. Such a fill commutes with a gated activation,
    act(0) * 0 being 0, so it can move after the fused kernel."""
    if node.target is not aten.masked_fill.Scalar or len(node.args) != 3 or node.args[2] != 0:
        return None
    mask = _val(node.args[1])
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or not 1 <= mask.dim() <= rank:
        return None
    return node.args[1] if mask.shape[-1] == 1 else None


def _aliases(node: fx.Node) -> list[fx.Node]:
    """The users of `node` that alias it: view ops, and the items of one returning Tensor[]
    (`split`, `unbind`)."""
    return [user for user in node.users
            if user.op == "call_function" and (is_view_op(user.target) or user.target is operator.getitem)]


def _reaches_output(node: fx.Node) -> bool:
    """Whether `node`, or a view of it, is one of the graph's outputs."""
    pending = [node]
    while pending:
        alias = pending.pop()
        if any(user.op == "output" for user in alias.users):
            return True
        pending += _aliases(alias)
    return False


def _strided_views_reshape(node: fx.Node) -> bool:
    """Re-derive the views downstream of `node`, now over a column slice of a wider output: a
    `view` the slice's row stride makes impossible (one merging a row dim with a column dim)
    becomes a `reshape`, which copies where it must. The views the models write split rows and
    columns apart and stay views. False when another view op cannot take the slice (say
    `view_as_complex` of an odd row stride), or when an `as_strided` reads it: its strides are
    the storage's, traced on a contiguous output, and over a slice they would read other
    columns (no error, wrong values): the caller makes the slice contiguous."""
    pending = [node]
    while pending:
        view = pending.pop()
        if view.target is aten.as_strided.default:
            return False
        try:
            if view.target is operator.getitem:  # (infer_meta reads tensors, not a list of them)
                view.meta["val"] = view.args[0].meta["val"][view.args[1]]
            else:
                infer_meta(view)
        except (RuntimeError, ValueError):  # (fake tensors raise either)
            if view.target not in (aten.view.default, aten._unsafe_view.default):
                return False
            view.target = aten.reshape.default
            infer_meta(view)
        pending += _aliases(view)
    return True


@register_pass
class GemmPadding:
    """Rewrite canonical linears into `tileflow::padded_gemm` nodes carrying tile plans."""

    name = "gemm_padding"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Rewrite every `aten.linear` (as left by canonicalize) with its fusable epilogue."""
        result = PassResult()
        graph = gm.graph
        plans: dict[tuple, TilePlan] = {}
        grouped_plans: dict[tuple, tuple[int, TilePlan]] = {}
        chains = [self._match(node) for node in graph.nodes
                  if node.op == "call_function" and node.target is aten.linear.default and not self._unsupported(node, ctx)]
        # Up projections that gated chains read (`act(gate) * up` over two linears); sibling
        # fusion leaves them (and their gates) alone, so the set holds after it.
        ups = {chain.up_linear for chain in chains if chain.up_linear is not None}
        if ctx.target in _SIBLING_TARGETS:
            self._fuse_siblings(graph, ctx, plans, result, chains, ups)
        # An up projection goes with its gate's kernel, even where the model computes it first
        # (`up(x) * act(gate(x))`): it waits for the gate, and runs alone only if the gate did not take it.
        deferred: list[fx.Node] = []
        for node in list(graph.nodes):
            grouped = _grouped_mm_args(node, ctx.parameter_inputs) if in_graph(node, graph) else None
            if grouped is not None:
                reason = self._unsupported_grouped(grouped, ctx)
                if not reason:
                    try:
                        self._grouped_m_range(grouped, ctx)
                    except ValueError as exc:
                        reason = f"no tile plan: {exc}"
                if reason:
                    result.fallback(node, f"grouped (MoE expert) GEMM: {reason}")
                else:
                    for kind in self._rewrite_grouped(graph, node, grouped, ctx, grouped_plans):
                        result.count(kind)
                continue
            if not in_graph(node, graph) or node.target is not aten.linear.default:
                continue
            if node in ups:
                deferred.append(node)
                continue
            self._rewrite_linear(graph, node, ctx, plans, result)
        for node in deferred:
            if in_graph(node, graph):
                self._rewrite_linear(graph, node, ctx, plans, result)
        for node in graph.nodes:
            # Matrix products canonicalize left as they are run so too: say why, as for a linear.
            reason = _left_product_reason(node)
            if reason:
                result.fallback(node, reason)
        # A gated GEMM's plan is its own (stages sized for two weight tiles), so it is marked.
        entries = [{"op": "padded_gemm", **plan.to_dict(), "describe": plan.describe(),
                    "tile_times": self._tile_times(plan, ctx, weight_tiles=key[-1]),
                    **({"gated": True} if key[-1] == 2 else {})} for key, plan in plans.items()]
        entries += [
            {"op": "grouped_gemm", "experts": e, **plan.to_dict(), "describe": _describe_grouped(plan, e),
             "tile_times": self._tile_times(plan, ctx, weight_tiles=key[-1], grouped=True),
             **({"gated": True} if key[-1] == 2 else {})}
            for key, (e, plan) in grouped_plans.items()
        ]
        for entry in entries:
            if entry not in ctx.report.plans:
                ctx.report.plans.append(entry)
        eliminate_dead_code(graph)
        gm.recompile()
        return result

    def _rewrite_linear(self, graph: fx.Graph, node: fx.Node, ctx: PassContext, plans: dict[tuple, TilePlan],
                        result: PassResult) -> None:
        """One linear (and the epilogue `_match` finds) into a `padded_gemm`, or its fallback."""
        reason = self._unsupported(node, ctx)
        if reason:
            result.fallback(node, reason)
            return
        chain = self._match(node)
        try:
            plan = self._plan(node.args[0], _output_width(chain), ctx, plans,
                              weight_tiles=2 if is_gated(chain.activation) else 1)
        except ValueError as exc:  # e.g. M's smallest value above max_tokens: this GEMM only
            result.fallback(node, f"no tile plan: {exc}")
            return
        kinds = self._fused_kinds(chain)
        self._replace(graph, chain, plan, ctx, kinds)
        result.count("padded_gemm")
        for kind in kinds:
            result.count(kind)

    # -- checks and matching -------------------------------------------------------------------
    def _unsupported(self, node: fx.Node, ctx: PassContext) -> str | None:
        x, w = node.args[0], node.args[1]
        xv, wv = _val(x), _val(w)
        if not (isinstance(xv, torch.Tensor) and isinstance(wv, torch.Tensor)):
            return "operands have no shape metadata"
        if xv.dim() != 2 or wv.dim() != 2:
            return f"expects a 2-D input and weight (canonicalize output), got {xv.dim()}-D and {wv.dim()}-D"
        allowed = _TARGET_DTYPES.get(ctx.target, _TARGET_DTYPES["reference"])
        if xv.dtype not in allowed:
            return f"dtype {xv.dtype} is not supported by the {ctx.target} GEMM kernels (supported: {[str(d) for d in allowed]})"
        if wv.dtype != xv.dtype:
            return f"mixed dtypes (input {xv.dtype}, weight {wv.dtype})"
        bias = _linear_bias(node)
        if bias is not None and _val(bias).dtype != xv.dtype:
            return f"bias dtype {_val(bias).dtype} differs from the input's {xv.dtype}"
        if any(isinstance(d, torch.SymInt) and d.node.maybe_as_int() is None for d in wv.shape):
            # A weight the graph takes as an input has symbolic sizes under dynamic=True. Not pinned
            # with a guard: such a "weight" is as often the tokens themselves (`softmax(q @ x.T) @ x`,
            # a decode step's cache), whose every new length would recompile.
            return _SYMBOLIC_WEIGHT
        return None

    def _match(self, linear: fx.Node) -> _Chain:
        chain = _Chain(linear=linear, tip=linear)
        _walk_views(chain)
        self._match_added_bias(chain)
        if self._match_stacked_gate_up(chain):
            self._match_residual(chain)
            self._match_cast(chain)
            return chain
        user = _only_user(chain.tip)
        if user is not None:
            activation = _activation_of(user, chain.tip)
            if activation in _GATED_BY_GATE and chain.added_bias is None:  # (gated kernels add both biases or none)
                gated = self._match_gated(chain, user, _GATED_BY_GATE[activation])
                if gated is not None:
                    return gated
            if activation is not None:
                chain.activation = activation
                chain.tip = user
                chain.absorbed.append(user)
                _walk_views(chain)
                square = _only_user(chain.tip)
                if activation == "relu" and _squares(square, chain.tip):  # squared ReLU ("relu2")
                    chain.activation = "relu2"
                    chain.tip = square
                    chain.absorbed.append(square)
                    _walk_views(chain)
        self._match_residual(chain)
        self._match_cast(chain)
        return chain

    def _match_stacked_gate_up(self, chain: _Chain) -> bool:
        """A gated activation over one stacked gate-and-up weight [2I, K] (Phi-3's
        `gate_up_proj`): the linear's output (through views) split in halves along its last dim,
        the gate's activation of the first times the second. The kernel reads the stacked weight
        (and bias) as they are; the chain ends at the product, viewed as the linear's output
        was, with I columns."""
        rows = int(_val(chain.linear.args[1]).shape[0])
        tip_val = _val(chain.tip)
        if rows % 2 or not isinstance(tip_val, torch.Tensor):
            return False
        tail = _gated_tail(chain.tip, rows // 2, tip_val.dim())
        if tail is None or tail[1] is not None:
            return False
        mul, _, gated, gate_half = tail
        split = _only_user(chain.tip)
        act = next(a for a in mul.args if a not in split.users)  # (the other is the up half)
        chain.absorbed += [split, *split.users, act, mul]
        chain.activation = gated
        chain.gate_second = gate_half == 1
        chain.tip = mul
        if chain.last_view is not None:
            # The product has the halves' shape: the linear's view, with I columns.
            chain.out_shape = [*chain.last_view.args[1][:-1], rows // 2]
            chain.last_view = None
        _walk_views(chain)
        return True

    def _match_added_bias(self, chain: _Chain) -> None:
        """`x @ W.T + b` written by hand (canonicalize makes the product a linear without a bias):
        an add of b [N], the GEMM's dtype, right after it (through views that keep its rows of N)
        is the linear's bias, fused as one (in half precision the sum is rounded once, as
        `F.linear`'s; eager rounds the product first)."""
        add = _only_user(chain.tip)
        if (_linear_bias(chain.linear) is not None or add is None or add.target is not aten.add.Tensor
                or add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2):
            return
        other = add.args[1] if add.args[0] is chain.tip else add.args[0]
        ov, tv = _val(other), _val(chain.tip)
        n = _val(chain.linear.args[1]).shape[0]
        if (other is chain.tip or not isinstance(other, fx.Node) or not isinstance(ov, torch.Tensor)
                or ov.dtype != tv.dtype or ov.device != tv.device or not same_shape(ov.shape, [n])
                or not same_shape(tv.shape[-1:], [n]) or not same_shape(_val(add).shape, tv.shape)):
            return
        chain.added_bias = other
        chain.tip = add
        chain.absorbed.append(add)
        _walk_views(chain)

    def _match_gated(self, chain: _Chain, act: fx.Node, gated: str) -> _Chain | None:
        """The chain through `act(gate) * up` (`gated` of `GATED_ACTIVATIONS`, `act` the gate's
        activation node) when `up` is a partner linear of the same input and shape, else None."""
        after = _Chain(linear=chain.linear, tip=act, last_view=chain.last_view, absorbed=[*chain.absorbed, act])
        _walk_views(after)
        mul = _only_user(after.tip)
        if mul is None or mul.target is not aten.mul.Tensor or len(mul.args) != 2:
            return None
        other = mul.args[1] if mul.args[0] is after.tip else mul.args[0]
        if other is after.tip:
            return None
        up = _up_partner(chain.linear, other)
        if up is None or not same_shape(_val(other).shape, _val(after.tip).shape):
            return None
        after.activation = gated
        after.up_linear = up
        after.tip = mul
        after.absorbed.append(mul)
        return after

    def _match_residual(self, chain: _Chain) -> None:
        add = _only_user(chain.tip)
        if add is None or add.target is not aten.add.Tensor or add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
            return
        other = add.args[1] if add.args[0] is chain.tip else add.args[0]
        ov, tv = _val(other), _val(chain.tip)
        if other is chain.tip or not isinstance(ov, torch.Tensor) or ov.dtype != tv.dtype:
            return
        if not same_shape(ov.shape, tv.shape) or not same_shape(_val(add).shape, tv.shape):
            return  # broadcasting adds are not a residual
        if not traced_contiguous(add):
            # Eager laid the sum out as the residual is (`r.t() + linear(x)`: the first operand's
            # strides); the kernel writes rows, so the result's strides, and what an as_strided
            # of it reads, would change.
            return
        chain.residual = other
        chain.tip = add
        chain.absorbed.append(add)
        _walk_views(chain)

    def _match_cast(self, chain: _Chain) -> None:
        cast = _only_user(chain.tip)
        if cast is None:
            return
        dtype = _cast_dtype(cast, chain.tip)
        # Eager rounds the result to the tip's dtype, then converts it. From a float32 / float64
        # result the kernel's cast of its accumulator (fp32, fp64 for fp64 inputs) is that; from a
        # half-precision one (fp16/bf16 -> fp32, bf16 <-> fp16: `lm_head(h).float()`) the kernel
        # rounds to the input dtype first (`round_first`, the spec's `round`), so fp16's overflow
        # to inf and the rounded values are eager's.
        src = _val(chain.tip).dtype
        if src in (torch.float16, torch.bfloat16, torch.float32, torch.float64) and dtype in (
                torch.float16, torch.bfloat16, torch.float32) and dtype != src:
            chain.out_dtype = dtype
            chain.round_first = src in (torch.float16, torch.bfloat16)
            chain.tip = cast
            chain.absorbed.append(cast)
            _walk_views(chain)

    # -- planning and rewriting ----------------------------------------------------------------
    def _plan(self, x: fx.Node, n: int, ctx: PassContext, plans: dict[tuple, TilePlan], *, weight_tiles: int) -> TilePlan:
        """The tile plan of a GEMM of input `x` and output width `n` (shared by equal GEMMs)."""
        xv = _val(x)
        lo, hi = self._m_range(xv.shape[0], ctx)
        k = int(xv.shape[1])
        # (weight_tiles stays last: the report marks gated plans by it.)
        key = (n, k, xv.dtype, lo, hi, weight_tiles)
        if key not in plans:
            plans[key] = gemm_plan(
                n, k, xv.dtype, ctx.target, ctx.device_type, m_min=lo, m_max=hi, tile_timings=ctx.config.tile_timings,
                weight_tiles=weight_tiles,
            )
        return plans[key]

    # -- sibling GEMMs (Q, K and V) --------------------------------------------------------------
    def _fuse_siblings(self, graph: fx.Graph, ctx: PassContext, plans: dict[tuple, TilePlan], result: PassResult,
                       chains: list[_Chain], ups: set[fx.Node]) -> None:
        """Rewrite each group of two or more sibling linears (same input, K, dtype and bias
        presence, no epilogue but their bias and a cast, which stays apart; not half of a gated
        pair, not returned by the graph) into one `padded_gemm`; `chains` are the graph's
        supported linears as `_match` finds them, `ups` the up projections of their gated pairs."""
        order = {node: i for i, node in enumerate(graph.nodes)}
        written = written_in_place(graph)
        groups: dict[tuple, list[_Chain]] = {}
        for chain in chains:
            if (chain.out_dtype is not None and chain.activation == "none" and chain.residual is None
                    and chain.added_bias is None and chain.up_linear is None):
                # A cast its only epilogue (Qwen3's Q and K norms upcast the projection): one GEMM with its siblings beats a kernel of its own with the cast
                # folded in, and the cast stays as it was. (Alone, it is matched again with it.)
                chain = _Chain(linear=chain.linear, tip=chain.linear)
                _walk_views(chain)
            linear = chain.linear
            # (A projection the graph returns keeps eager's contiguous strides: it stays apart.)
            if (linear in ups or chain.activation != "none" or chain.residual is not None or chain.out_dtype is not None
                    or chain.added_bias is not None or not int(_val(linear.args[1]).shape[0])
                    or _reaches_output(chain.tip)):
                continue
            key = (_source(linear.args[0]), int(_val(linear.args[1]).shape[1]), _val(linear.args[0]).dtype,
                   _linear_bias(linear) is not None)
            groups.setdefault(key, []).append(chain)
        for group in groups.values():
            first = group[0].linear  # chains are in graph order
            operands = [a for chain in group for a in (chain.linear.args[1], _linear_bias(chain.linear))]
            # One node reads every weight and bias where the first linear ran: each must exist by
            # then, or be a cast of one that can (autocast casts each weight before its linear).
            late = [a for a in operands if isinstance(a, fx.Node) and order[a] > order[first]]
            if len(group) < 2 or not all(_can_hoist(a, first, order, written) for a in late):
                continue
            for a in late:
                _hoist(a, first, order)
            widths = [int(_val(chain.linear.args[1]).shape[0]) for chain in group]
            try:
                plan = self._plan(first.args[0], sum(widths), ctx, plans, weight_tiles=1)
                if not all(segments_in_one_kernel(ctx.target, p.config, tuple(widths)) for p in plan.pieces):
                    # Where the plan's kernel cannot read the segments (a BLOCK_N that does not
                    # divide their starts), each runs by its own plan, as it would alone.
                    plan = dataclasses.replace(plan, segment_plans=tuple(
                        self._plan(first.args[0], width, ctx, plans, weight_tiles=1) for width in widths))
            except ValueError:
                continue  # no plan for this M range: each linear falls back on its own, with the reason
            result.count("padded_gemm")
            result.count("fused_siblings", len(group) - 1)
            if _linear_bias(first) is not None:
                result.count("fused_bias")
            self._replace_siblings(graph, group, plan, ctx)

    def _replace_siblings(self, graph: fx.Graph, group: list[_Chain], plan: TilePlan, ctx: PassContext) -> None:
        """One `padded_gemm` over the group's weights (N segments, in graph order) running `plan`,
        and each linear's output (through its views) a column slice of it."""
        first = group[0].linear
        weights = [chain.linear.args[1] for chain in group]
        biases = [_linear_bias(chain.linear) for chain in group]
        widths = [int(_val(w).shape[0]) for w in weights]
        with graph.inserting_before(first):
            gemm = graph.call_function(
                torch.ops.tileflow.padded_gemm.default,
                (first.args[0], weights[0], biases[0], None, "none", None, encode_plan(plan), ctx.target, None, None,
                 False, weights[1:], biases[1:] if biases[0] is not None else None),
            )
            infer_meta(gemm)
            copy_source_meta(first, gemm)
        gemm.meta["tileflow"] = {
            "kind": "padded_gemm",
            "plan": plan.describe(),
            "epilogue": (["fused_bias"] if biases[0] is not None else []) + ["fused_siblings"],
            "segments": widths,
            "target": ctx.target,
        }
        start = 0
        for chain, width in zip(group, widths):
            with graph.inserting_before(chain.tip):
                out = columns = graph.call_function(aten.slice.Tensor, (gemm, 1, start, start + width))
                infer_meta(out)
                copy_source_meta(chain.linear, out)
                if chain.last_view is not None:
                    out = graph.call_function(aten.view.default, (out, chain.last_view.args[1]))
                    copy_source_meta(chain.tip, out)
            start += width
            chain.tip.replace_all_uses_with(out)
            inputs = [i for node in (chain.linear, *chain.absorbed) for i in node.all_input_nodes]
            for dead in reversed([chain.linear, *chain.absorbed]):
                if not dead.users:
                    graph.erase_node(dead)
            erase_unused(graph, [i for i in inputs if i is not gemm])
            if not _strided_views_reshape(out):
                with graph.inserting_after(columns):
                    dense = graph.call_function(aten.clone.default, (columns,), {"memory_format": torch.contiguous_format})
                columns.replace_all_uses_with(dense, delete_user_cb=lambda user: user is not dense)
                infer_meta(dense)
                _strided_views_reshape(dense)

    @staticmethod
    def _tile_times(plan: TilePlan, ctx: PassContext, *, weight_tiles: int, grouped: bool = False) -> str:
        """Where a plan's times came from, for the report: the measured file, or the cost model
        (a grouped GEMM's kernel has neither persistent, TMA nor split variants)."""
        source = plan_tile_times(plan.n, plan.k, plan.dtype, ctx.target, ctx.device_type,
                                 tile_timings=ctx.config.tile_timings, weight_tiles=weight_tiles,
                                 persistent_variants=not grouped, split_variants=not grouped)
        return f"measured: {source}" if source else "cost model"

    @staticmethod
    def _m_range(m: Any, ctx: PassContext) -> tuple[int, int]:
        """Integer bounds of a GEMM's row count M (an int, a SymInt or its sympy expression): its
        symbols' range, capped by max_tokens."""
        if isinstance(m, torch.SymInt) or isinstance(m, sympy.Expr) and m.free_symbols:
            expr = m.node.expr if isinstance(m, torch.SymInt) else m
            ranges = {}
            if ctx.shape_env is not None:
                for sym in expr.free_symbols:
                    vr = ctx.shape_env.var_to_range.get(sym)
                    if vr is not None:
                        ranges[sym] = (vr.lower, vr.upper)
            lo, hi = token_range(expr, ranges, ctx.config.max_tokens)
        else:
            lo = hi = max(int(m), 1)
        return lo, hi

    # -- grouped (MoE expert) GEMMs ------------------------------------------------------------
    def _grouped_m_range(self, args: dict[str, Any], ctx: PassContext) -> tuple[int, int]:
        """Bounds of a grouped GEMM's row count M, which its plan reads as ceil(M / E) rows per
        expert: E times the T rows of each expert's block in the batched [E, T, K], and for rows
        [M, K] routed top-k (M = k * T) k times T's bounds: max_tokens caps T, not k * T."""
        xv = _val(args["x"])
        if args["offs"] is None:
            rows, per_token = xv.shape[1], int(xv.shape[0])
        else:
            rows, per_token = _rows_and_multiple(xv.shape[0])
        lo, hi = self._m_range(rows, ctx)
        return lo * per_token, hi * per_token

    def _unsupported_grouped(self, args: dict[str, Any], ctx: PassContext) -> str | None:
        """Why a grouped matmul cannot become `tileflow::grouped_gemm` (None when it can)."""
        xv, wv, ov = _val(args["x"]), _val(args["w"]), _val(args["offs"])
        if not (isinstance(xv, torch.Tensor) and isinstance(wv, torch.Tensor)):
            return "operands have no shape metadata"
        if args["offs"] is None:
            # The batched form: expert e's rows are x[e].
            if xv.dim() != 3 or wv.dim() != 3:
                return (f"a batched matmul (no offsets) needs a 3-D input [E, T, K] and 3-D weights [E, K, N], got "
                        f"{xv.dim()}-D and {wv.dim()}-D")
            if not same_shape(xv.shape[:1], wv.shape[:1]):
                return f"a batched matmul over {xv.shape[0]} row blocks and {wv.shape[0]} experts' weights"
        elif xv.dim() != 2 or wv.dim() != 3:
            return f"expects a 2-D input [M, K] and 3-D weights [E, K, N], got {xv.dim()}-D and {wv.dim()}-D"
        elif not isinstance(ov, torch.Tensor) or ov.dim() != 1 or ov.dtype != torch.int32:
            got = f"{ov.dtype} {ov.dim()}-D" if isinstance(ov, torch.Tensor) else "no metadata"
            return f"offsets must be a 1-D int32 tensor, got {got}"
        if args["bias"] is not None:
            return ("the grouped matmul's own bias argument is not supported (a per-expert bias added after it, "
                    "as bias[expert_ids], is fused)")
        allowed = _TARGET_DTYPES.get(ctx.target, _TARGET_DTYPES["reference"])
        if xv.dtype not in allowed:
            return f"dtype {xv.dtype} is not supported by the {ctx.target} GEMM kernels (supported: {[str(d) for d in allowed]})"
        if wv.dtype != xv.dtype:
            return f"mixed dtypes (input {xv.dtype}, weight {wv.dtype})"
        if args["out_dtype"] not in (None, xv.dtype):
            return f"out_dtype {args['out_dtype']} differs from the input's {xv.dtype}"
        if args["offs"] is not None and not same_shape(ov.shape, wv.shape[:1]):
            return f"offsets {list(ov.shape)} do not match the {wv.shape[0]} experts"
        if any(isinstance(d, torch.SymInt) and d.node.maybe_as_int() is None for d in wv.shape):
            return _SYMBOLIC_WEIGHT
        return None

    def _rewrite_grouped(
        self, graph: fx.Graph, node: fx.Node, args: dict[str, Any], ctx: PassContext,
        plans: dict[tuple, tuple[int, TilePlan]],
    ) -> list[str]:
        """Replace one grouped matmul (and the per-expert bias and gated activation after it) by
        `tileflow::grouped_gemm`; returns the rewrite kinds to count."""
        x, w, offs = args["x"], args["w"], args["offs"]
        xv, wv = _val(x), _val(w)
        e, k, rows = (int(d) for d in wv.shape)
        expert_bias = _expert_bias(node, args, e, rows) if offs is not None else None
        head, bias = expert_bias if expert_bias is not None else (node, None)
        gated = _gated_tail(head, rows // 2, xv.dim()) if rows % 2 == 0 else None
        if gated is not None and gated[3] != 0:
            gated = None  # the grouped kernels read the gate from the first half of each expert's weight
        tail, row_mask, activation = gated[:3] if gated is not None else (None, None, "none")
        clamped = _clamped_swiglu_tail(head, rows // 2, xv.dim()) if tail is None and rows % 2 == 0 else None
        if clamped is not None:
            (tail, row_mask), activation = clamped[:2], CLAMPED_SWIGLU
        n = rows // 2 if tail is not None else rows
        lo, hi = self._grouped_m_range(args, ctx)
        weight_tiles = 2 if is_gated(activation) else 1
        key = (n, k, e, xv.dtype, lo, hi, weight_tiles)
        if key not in plans:
            plans[key] = (e, grouped_gemm_plan(
                n, k, e, xv.dtype, ctx.target, ctx.device_type, m_min=lo, m_max=hi, tile_timings=ctx.config.tile_timings,
                weight_tiles=weight_tiles,
            ))
        plan = plans[key][1]
        tip = tail if tail is not None else head
        with graph.inserting_before(tip):
            weight, is_param = _expert_weight(w)
            if not is_param:
                # A [E, K, N] tensor: its transposed view is [E, N, K] with any strides (no copy).
                weight = graph.call_function(aten.transpose.int, (w, -2, -1))
                infer_meta(weight)
            # (gpt-oss's interleaved gate and up rows are clamped_swiglu's layout: read as they are)
            gemm = graph.call_function(
                torch.ops.tileflow.grouped_gemm.default,
                (x, weight, offs, activation, None, encode_plan(plan), ctx.target, bias,
                 *(clamped[2:] if clamped is not None else ())),
            )
            infer_meta(gemm)
            copy_source_meta(node, gemm)
        kinds = (["fused_grouped_bias"] if bias is not None else []) + ([f"fused_grouped_{activation}"] if tail is not None else [])
        gemm.meta["tileflow"] = {
            "kind": "grouped_gemm",
            "plan": _describe_grouped(plan, e),
            "experts": e,
            "epilogue": kinds,
            "target": ctx.target,
        }
        out = gemm
        if row_mask is not None:
            with graph.inserting_before(tip):
                out = graph.call_function(aten.masked_fill.Scalar, (gemm, row_mask, 0.0))
                infer_meta(out)
        tip.replace_all_uses_with(out)
        # The grouped node, its split/activation/mul and a transpose nothing else reads are dead now;
        # run()'s dead-code elimination removes them.
        return ["grouped_gemm", *kinds]

    def _replace(self, graph: fx.Graph, chain: _Chain, plan: TilePlan, ctx: PassContext, kinds: list[str]) -> None:
        linear = chain.linear
        x, w = linear.args[0], linear.args[1]
        bias = chain.bias
        up = chain.up_linear
        weight_up = up.args[1] if up is not None else None
        bias_up = _linear_bias(up) if up is not None else None
        n = _output_width(chain)
        tip = chain.tip
        with graph.inserting_before(tip):
            if chain.gate_second:
                # The kernels read a stacked weight's gate from its first half: hand them the
                # halves as separate gate and up weights instead (views, no copy).
                w, weight_up = _second_half_first(graph, w, n)
                if bias is not None:
                    bias, bias_up = _second_half_first(graph, bias, n)
            residual = None
            if chain.residual is not None:
                residual = graph.call_function(aten.reshape.default, (chain.residual, [-1, n]))
                infer_meta(residual)
            gemm = graph.call_function(
                torch.ops.tileflow.padded_gemm.default,
                (x, w, bias, residual, chain.activation, chain.out_dtype, encode_plan(plan), ctx.target, weight_up, bias_up,
                 *((True,) if chain.round_first else ())),
            )
            infer_meta(gemm)
            copy_source_meta(linear, gemm)
            gemm.meta["tileflow"] = {
                "kind": "padded_gemm",
                "plan": plan.describe(),
                "epilogue": kinds,
                "target": ctx.target,
            }
            out = gemm
            shape = chain.last_view.args[1] if chain.last_view is not None else chain.out_shape
            if shape is not None:
                out = graph.call_function(aten.view.default, (gemm, shape))
                infer_meta(out)
                copy_source_meta(tip, out)
        tip.replace_all_uses_with(out)
        chain_nodes = [linear, *chain.absorbed]
        inputs = [i for node in chain_nodes for i in node.all_input_nodes]
        # The chain's nodes each feed only the next one: erase from the tip backwards.
        for dead in reversed(chain_nodes):
            if not dead.users:
                graph.erase_node(dead)
        if up is not None:
            # The up projection's views fed the mul, which is gone now: erase them and what only
            # they read (here, not by a whole-graph dead-code pass per rewrite: that made the
            # pass quadratic in the model's depth).
            erase_unused(graph, inputs)

    @staticmethod
    def _fused_kinds(chain: _Chain) -> list[str]:
        kinds = []
        if chain.bias is not None:
            kinds.append("fused_bias")
        if chain.activation != "none":
            kinds.append(f"fused_{chain.activation}")
        if is_gated(chain.activation) and chain.up_linear is None:
            kinds.append("stacked_gate_up")  # one weight [2I, K]: no up projection merged into the gate's GEMM
        if chain.residual is not None:
            kinds.append("fused_residual")
        if chain.out_dtype is not None:
            kinds.append("fused_cast")
        return kinds
