"""canonicalize: one shape for every matmul, and no no-op views or copies.

Later passes match one form only. After this pass:
- every matrix product with a 2-D right operand is `aten.linear(x2d, w[N, K], bias?)` on a 2-D
  input: `mm`, `addmm` (unit alpha/beta, 1-D bias), `linear` on N-D inputs (flattened with a view
  before, a reshape when the leading dims cannot be viewed as one, and restored after) and 2-D-weight `matmul` all become it; a transposed weight
  (`t`, `transpose(0, 1)`, `permute([1, 0])`) is folded into the [N, K] operand, and a [K, N]
  operand (GPT-2's Conv1D) becomes `t(w)`;
- batched products with equal batch dims are `aten.bmm` on 3-D operands;
- a chain of views, unsqueezes, squeezes and permutes that only moves size-1 dims around the
  real ones (einsum's way of lining operands up for a bmm: `einsum("bhsd,bhld->bhsl", q, k)` is
  unsqueezes, permutes and a view around `bmm(q, kᵀ)`) is one `view`, of a `permute` of the
  source when the real dims change order: the form a hand-written product has;
- view-like ops whose result has the input's shape, strides and offset (`view`, `reshape`,
  `expand`, full `slice`, identity `permute`, `alias`, `detach`), double transposes, clones that
  keep the layout and dtype conversions to the same dtype are removed, and so are the
  `_assert_tensor_metadata` checks torch.export writes where the traced values prove them;
- the tanh GELU written out by hand (transformers' `gelu_new`, GPT-2's, Phi-2's, GPT-J's:
  `0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))`) is `aten.gelu(x, approximate="tanh")`,
  and the erf one (`gelu_python`: `x * 0.5 * (1 + erf(x / sqrt(2)))`) `aten.gelu(x)`, which the
  GEMM pass fuses as epilogues;
- a masked fill written as an assignment through a bool mask, `x[mask] = v` with one value
  (`index_put(x, [mask], v)`, the mask over x's leading dims: DTensor's vocabulary-parallel
  embedding zeroes the ids and rows other ranks own so), is `where(mask, v, x)`: an elementwise
  op, which nano-batching splits by rows and the padding analysis of `cuda_graphs` follows;
- repeats of a cast or a view over the same operands are one node (kind `repeat_merged`): under
  `torch.autocast` each projection casts the layer's input anew, and the GEMM pass fuses only
  linears that read one node;
- a narrowing dtype cast (autocast's) of a transpose, or of a repeat (`repeat_kv`'s unsqueeze,
  expand, clone and reshape, with the views and transposes above it), is a cast of the source
  under the same ops (kind `cast_before_views`), where the strides agree: autocast casts a
  `matmul`'s operands after Gemma-2's `key.transpose(2, 3)` and after `repeat_kv`, which the
  attention pass reads through to the real K/V heads (and the cast then converts the
  un-repeated heads, not R copies). A widening cast stays where it is (GPT-Neo's q and k cast up
  for the product: the attention pass reads through it there).
- tokens repeated once per expert and viewed `[E, T, H]` through an elementwise op (Llama-4's
  batched experts' input, `(x.repeat(E, 1) * scores.t().reshape(-1, 1)).view(E, T, H)`) are
  `x` broadcast to `[E, T, H]` (an `expand`) in that op (kind `repeat_as_broadcast`): the same
  values and layout, with the tokens at a dim of their own (nano-batching splits along it) and
  no E copies of them made.
Nodes the graph returns directly are kept, and so is every copy an output views (`x.clone()
.view(-1)` returned), so no output starts aliasing an input.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int, statically_known_true

from tileflow.graph_utils import (
    copy_source_meta,
    in_graph,
    infer_meta,
    is_view_op,
    reads_written,
    same_shape,
    size_value,
    transposed_dims,
    viewed_by,
    written_in_place,
)
from tileflow.pipeline import PassContext, PassResult, register_pass

aten = torch.ops.aten
prims = torch.ops.prims

_VIEW_LIKE = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.expand.default,
    aten.slice.Tensor,
    aten.alias.default,
    aten.detach.default,
    aten.permute.default,
    aten.squeeze.dim,
    aten.unsqueeze.default,
}
_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_UNIT_DIM_MOVES = {aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims}
_LAYOUT_OPS = _RESHAPES | _UNIT_DIM_MOVES | {aten.permute.default, aten.transpose.int, aten.clone.default}
_SAME_DTYPE_COPIES = {prims.convert_element_type.default, aten._to_copy.default, aten.clone.default}
# Ops whose repeats over the same operands are merged (`_merge_repeats`): casts, and the views
# laid over them. All are functional and deterministic.
_MERGEABLE = {
    aten._to_copy.default, prims.convert_element_type.default, aten.view.default, aten._unsafe_view.default,
    aten.reshape.default, aten.t.default, aten.transpose.int, aten.permute.default, aten.unsqueeze.default,
    aten.expand.default, aten.slice.Tensor,
}


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_2d_transpose(node: Any) -> bool:
    """True when `node` swaps the two dims of a 2-D tensor."""
    return transposed_dims(node) == (0, 1) and _val(node.args[0]).dim() == 2


# Ops a dtype cast is moved below (`_cast_before_views`, with transposes): each only rearranges
# or copies elements, so casting before or after gives the same values.
_CAST_COMMUTES = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default,
    aten.expand.default, aten.clone.default,
}


def _moved_over(chain: list[fx.Node]) -> list[fx.Node]:
    """The part of `chain` (the ops under a cast, from the cast down) the cast moves below: down
    to a repeat's `expand` and the unsqueezes under it (`repeat_kv`, which the attention pass
    reads through to the real heads), else the transposes right under the cast (Gemma-2's k):
    not below the views that split a projection into heads, where nothing reads the cast."""
    expands = [i for i, node in enumerate(chain) if node.target is aten.expand.default]
    if expands:
        end = expands[-1] + 1
        while end < len(chain) and chain[end].target is aten.unsqueeze.default:
            end += 1
        return chain[:end]
    end = 0
    while end < len(chain) and transposed_dims(chain[end]) is not None:
        end += 1
    return chain[:end]


def _merge_repeats(graph: fx.Graph, outputs: set[fx.Node]) -> int:
    """Merge repeats of a cast or view of the same operands into the first; return how many.

    Under `torch.autocast` every linear casts its input anew (`_to_copy(x, bfloat16)` once per
    projection), so Q, K and V, or gate and up, read different nodes and the GEMM pass could
    not fuse them into one kernel (nor skip the repeated casts). Values written in place, and
    the graph's outputs and what they view (two outputs must not come to share memory), are
    left alone.
    """
    written = written_in_place(graph)
    returned = viewed_by(outputs)
    first: dict[tuple, fx.Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _MERGEABLE or node in returned:
            continue
        if node in written or reads_written(node, written):
            continue  # (written itself, or through a view of it: a merge would carry the write to the other's readers)
        try:
            earlier = first.setdefault((node.target, _hashable(node.args), _hashable(node.kwargs)), node)
        except TypeError:  # an argument no dict can key (a tensor constant): left as it is
            continue
        if earlier is node:
            continue
        node.replace_all_uses_with(earlier)
        graph.erase_node(node)
        merged += 1
    return merged


def _hashable(value: Any) -> Any:
    """`value` (a node's args or kwargs) as a dict key: lists as tuples, dicts as sorted items."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_hashable(v) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def _leading_dims_merge(x: Any) -> bool:
    """True when every dim of `x` but the last merges into one by a view (each leading dim's
    stride is the next one's stride times its size, provably for all sizes)."""
    if not isinstance(x, torch.Tensor):
        return False
    size, stride = x.shape, x.stride()
    return all(statically_known_true(stride[i] == stride[i + 1] * size[i + 1]) or statically_known_true(size[i] == 1)
               for i in range(x.dim() - 2))


def _laid_out_by_the_caller(x: Any) -> bool:
    """True when `x` is a graph input or a view of one: its strides when the graph runs are
    whatever the caller passes, not the example's (an exported program takes any layout, where
    torch.compile would guard on it and recompile)."""
    # Any view op (per its schema), and an item of a view-returning op's list: `x.chunk(2, -1)`
    # and `x.unbind(0)` are a split's or unbind's getitems, laid out as the caller's `x` is.
    while isinstance(x, fx.Node) and x.op == "call_function" and (
            x.target in _VIEW_LIKE or is_view_op(x.target) or x.target is operator.getitem):
        x = x.args[0]
    return isinstance(x, fx.Node) and x.op == "placeholder"


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, strides, storage offset and dtype: the op produced a pure alias or copy."""
    if a.dtype != b.dtype or not same_shape(a.shape, b.shape):
        return False
    if not same_shape(a.stride(), b.stride()):
        # Strides of size-1 dims do not matter for layout; compare the rest only.
        keep = [i for i, s in enumerate(a.shape) if not statically_known_true(s == 1)]
        if not same_shape([a.stride()[i] for i in keep], [b.stride()[i] for i in keep]):
            return False
    return statically_known_true(a.storage_offset() == b.storage_offset())


def _static(size: Any) -> int | None:
    """A size's value where it is a number (an int, or a SymInt of a constant), else None."""
    return int(size) if is_concrete_int(size) else None


def _is_unit(size: Any) -> bool:
    return statically_known_true(size == 1)


def _leading_units(shape: Any) -> int:
    return next((i for i, size in enumerate(shape) if not _is_unit(size)), len(shape))


def _real_sizes(shape: Any) -> list[Any]:
    return [d for d in shape if not _is_unit(d)]


def _fold_unit_dim_moves(graph: fx.Graph, end: fx.Node) -> bool:
    """Replace the chain of layout ops ending at the view `end` by `view(permute(x), shape)` when
    the chain only moves size-1 dims around the real dims of its source x (and reorders those),
    apart from a view at either end that may merge or split them (module docstring). Only chains
    with a size-1 dim added or dropped and a permute are folded: the others are already in the
    form the matchers read. True when folded."""
    if end.target not in _RESHAPES or not isinstance(_val(end), torch.Tensor):
        return False
    chain = [end]
    while (chain[-1].args and isinstance(chain[-1].args[0], fx.Node) and chain[-1].args[0].op == "call_function"
           and chain[-1].args[0].target in _LAYOUT_OPS):
        chain.append(chain[-1].args[0])
    chain.reverse()
    # (A view first that adds a size-1 dim, a batch of 1, is no sign of einsum by itself.)
    if len(chain) < 3 or not any(n.target in (aten.permute.default, aten.transpose.int) for n in chain) or not any(
            map(_moves_unit_dims, chain[1:] if chain[0].target in _RESHAPES else chain)):
        return False
    source = chain[0].args[0]
    first = None
    if chain[0].target in _RESHAPES:
        # A view first may split the source's dims (a bmm's [B*H, S, D] into [B, H, S, 1, D]): it
        # stays, without its size-1 dims, and the chain starts after it.
        first, chain = chain[0], chain[1:]
    start = _val(first) if first is not None else _val(source)
    if not isinstance(start, torch.Tensor) or any(
            n.target is aten.clone.default and set(n.kwargs) - {"memory_format"} for n in chain):
        return False
    if any(n.target is aten.reshape.default for n in (first, *chain) if n is not None):
        return False  # a reshape may copy (one this fold made, over a strided source): no view for it
    # The first view's sizes without the size-1 dims it puts after a real one (einsum's; a
    # leading one, a batch of 1, stays: matchers read [B, H, S, D] there).
    kept: list[Any] = []
    if first is not None:
        if not isinstance(first.args[1], (list, tuple)) or len(first.args[1]) != start.dim():
            return False
        after_real = False
        for size, given in zip(start.shape, first.args[1]):
            if not (_is_unit(size) and after_real):
                kept.append(given)
            after_real = after_real or not _is_unit(size)
        # As many leading size-1 dims as the chain ends with (a batch of 1 einsum moved to the
        # back of a bmm's output, `[H, S, 1, 1, D]`, comes out `[1, H, S, D]`); the kept sizes
        # lead with as many as the first view's.
        kept = [1] * max(_leading_units(_val(end).shape) - _leading_units(start.shape), 0) + kept
    slots: list[int | None] = []
    for size in start.shape:
        slots.append(None if _is_unit(size) else sum(s is not None for s in slots))
    for node in chain[:-1]:
        slots = _moved_slots(node, slots)
        if slots is None:
            return False
    order = [s for s in slots if s is not None]
    if sorted(order) != list(range(len(_real_sizes(start.shape)))):
        return False
    with graph.inserting_before(end):
        base = source
        if first is not None:
            base = graph.call_function(first.target, (source, kept))  # a view, or a reshape as first was
            infer_meta(base)
        # The right operand of a bmm as `transpose(·, -2, -1)` of the rest when its last two dims
        # come swapped (einsum's kᵀ): the form `q @ k.transpose(-2, -1)` takes.
        rhs = len(order) >= 2 and order[-1] < order[-2] and any(
            u.target is aten.bmm.default and u.args[1] is end for u in end.users)
        inner = [*order[:-2], order[-1], order[-2]] if rhs else order
        # Over the base's dims, its size-1 ones (a source's own) staying where they are.
        real = [d for d, size in enumerate(_val(base).shape) if not _is_unit(size)]
        if inner != sorted(inner):
            perm = list(range(_val(base).dim()))
            for j, d in enumerate(real):
                perm[d] = real[inner[j]]
            base = graph.call_function(aten.permute.default, (base, perm))
            infer_meta(base)
        if rhs:
            base = graph.call_function(aten.transpose.int, (base, real[-2], real[-1]))
            infer_meta(base)
        # A clone in the chain made the moved dims contiguous for the view after it (a `reshape`
        # traced as clone + `_unsafe_view`). It stays a copy, and a contiguous one: a reshape would
        # be a view where it can (an output aliasing an input, strides a later view of the copy
        # cannot merge).
        if any(n.target is aten.clone.default for n in chain):
            base = graph.call_function(aten.clone.default, (base,), {"memory_format": torch.contiguous_format})
            infer_meta(base)
        folded = graph.call_function(aten.view.default, (base, end.args[1]))
        infer_meta(folded)
    if not same_shape(_val(folded).shape, _val(end).shape):
        return False
    copy_source_meta(end, folded)
    end.replace_all_uses_with(folded)
    graph.erase_node(end)
    return True


def _moved_slots(node: fx.Node, slots: list[int | None]) -> list[int | None] | None:
    """Which real dim of the chain's start each dim of `node`'s output is (None: size 1), after
    `node` moved `slots`; None when `node` does more than move dims and add or drop size-1 ones."""
    out = _val(node)
    if not isinstance(out, torch.Tensor):
        return None
    if node.target is aten.unsqueeze.default:
        dim = node.args[1] % out.dim()
        return [*slots[:dim], None, *slots[dim:]]
    if node.target in (aten.squeeze.dim, aten.squeeze.dims):
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        gone = {d % len(slots) for d in dims}
        if any(slots[d] is not None for d in gone):
            return None  # squeezing a real dim (a no-op, or a size known only at run time)
        return [s for d, s in enumerate(slots) if d not in gone]
    if node.target is aten.clone.default:
        return slots  # the same values, in a new buffer
    if node.target is aten.permute.default:
        return [slots[d % len(slots)] for d in node.args[1]]
    if node.target is aten.transpose.int:
        a, b = node.args[1] % len(slots), node.args[2] % len(slots)
        moved = list(slots)
        moved[a], moved[b] = moved[b], moved[a]
        return moved
    if not same_shape(_real_sizes(out.shape), _real_sizes(_val(node.args[0]).shape)):
        return None  # a view that merges or splits real dims, inside the chain
    it = iter([s for s in slots if s is not None])
    return [None if _is_unit(size) else next(it) for size in out.shape]


def _moves_unit_dims(node: fx.Node) -> bool:
    """An unsqueeze or squeeze, or a view that adds or drops size-1 dims (and nothing else)."""
    if node.target in _UNIT_DIM_MOVES:
        return True
    src, out = _val(node.args[0]), _val(node)
    return (node.target in _RESHAPES and isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor)
            and src.dim() != out.dim() and same_shape(_real_sizes(src.shape), _real_sizes(out.shape)))


# sqrt(2 / pi), and how far a model's spelled-out constant may be from it (GPT-2 writes
# `math.sqrt(2.0 / math.pi)`, others 0.7978845608): the difference is below fp32's rounding.
_SQRT_2_OVER_PI = 0.7978845608028654
_SQRT_2 = 1.4142135623730951
_CONSTANT_SLACK = 1e-9


def _scalar_operand(node: Any, target: Any, value: float) -> fx.Node | None:
    """The tensor operand of `node` = `target`(t, value), a Python number within
    `_CONSTANT_SLACK` of `value` (ATen's schemas put the tensor first: `0.5 * x` traces to
    `mul(x, 0.5)`), else None."""
    if (not isinstance(node, fx.Node) or node.op != "call_function" or node.target is not target or node.kwargs
            or len(node.args) != 2):
        return None
    tensor, scalar = node.args
    if (isinstance(tensor, fx.Node) and isinstance(scalar, (int, float)) and not isinstance(scalar, bool)
            and abs(scalar - value) <= _CONSTANT_SLACK):
        return tensor
    return None


def _sole(node: Any, user: fx.Node) -> bool:
    """Whether `node` is a graph node read by `user` alone."""
    return isinstance(node, fx.Node) and list(node.users) == [user]


def _hand_gelu_input(root: fx.Node) -> tuple[fx.Node, str] | None:
    """(x, GELU's `approximate`) when `root` is a GELU of `x` written out, every node but `x` read
    only inside the pattern, as AOTAutograd traces transformers' forms (either operand order
    of the outer product and sum):
    - `(x * 0.5) * (tanh((x + (x ** 3) * 0.044715) * sqrt(2/pi)) + 1)`, "tanh": `NewGELUActivation`
      (`gelu_new`: GPT-2, Phi-2, GPT-J);
    - `(x * 0.5) * (erf(x / sqrt(2)) + 1)`, "none": `GELUActivation(use_gelu_python=True)`.
    Else None."""
    if len(root.args) != 2 or root.kwargs:
        return None
    for half, plus_one in (root.args, root.args[::-1]):
        x = _scalar_operand(half, aten.mul.Tensor, 0.5)
        inner = _scalar_operand(plus_one, aten.add.Tensor, 1.0)
        if x is None or inner is None or not (_sole(half, root) and _sole(plus_one, root) and _sole(inner, plus_one)):
            continue
        if inner.target is aten.tanh.default and len(inner.args) == 1 and _tanh_gelu_argument(inner.args[0], x, inner):
            return x, "tanh"
        if inner.target is aten.erf.default and len(inner.args) == 1 and _erf_gelu_argument(inner.args[0], x, inner):
            return x, "none"
    return None


def _tanh_gelu_argument(scaled: Any, x: fx.Node, tanh: fx.Node) -> bool:
    """Whether `scaled`, read by `tanh` alone, is `(x + (x ** 3) * 0.044715) * sqrt(2/pi)`."""
    inner = _scalar_operand(scaled, aten.mul.Tensor, _SQRT_2_OVER_PI)
    if inner is None or not _sole(scaled, tanh) or not _sole(inner, scaled):
        return False
    if inner.target is not aten.add.Tensor or len(inner.args) != 2 or inner.kwargs:
        return False
    for linear_term, cubic_term in (inner.args, inner.args[::-1]):
        cube = _scalar_operand(cubic_term, aten.mul.Tensor, 0.044715)
        if linear_term is not x or cube is None or not _sole(cubic_term, inner) or not _sole(cube, cubic_term):
            continue
        if cube.target is aten.pow.Tensor_Scalar and cube.args[0] is x and cube.args[1] == 3 and not cube.kwargs:
            return True
    return False


def _erf_gelu_argument(scaled: Any, x: fx.Node, erf: fx.Node) -> bool:
    """Whether `scaled`, read by `erf` alone, is `x / sqrt(2)` or `x * (1 / sqrt(2))`."""
    if not _sole(scaled, erf):
        return False
    return x in (_scalar_operand(scaled, aten.div.Tensor, _SQRT_2), _scalar_operand(scaled, aten.mul.Tensor, 1 / _SQRT_2))


@register_pass
class Canonicalize:
    """Normalize matmul forms into `linear`/`bmm` and drop no-op views, transposes and copies."""

    name = "canonicalize"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Rewrite `gm` in place (see the module docstring for the canonical forms)."""
        result = PassResult()
        graph = gm.graph
        for node in list(graph.nodes):
            # (An output folded stays a view of the same source: no new aliasing.)
            if node.op == "call_function" and in_graph(node, graph) and _fold_unit_dim_moves(graph, node):
                result.count("layout_folded")
        outputs = set(next(n for n in reversed(graph.nodes) if n.op == "output").all_input_nodes)
        merged = _merge_repeats(graph, outputs)
        if merged:
            result.count("repeat_merged", merged)
        self._viewed_by_outputs = viewed_by(outputs)
        self._written: set[fx.Node] | None = None  # `written_in_place`, computed when first needed
        for node in list(graph.nodes):
            if node.op != "call_function" or not in_graph(node, graph):
                continue
            kind = self._rewrite(graph, node, outputs)
            if kind:
                result.count(kind)
        removed = self._remove_dead(graph)
        if removed:
            result.changed = True
        gm.recompile()
        return result

    # -- matmuls ---------------------------------------------------------------------------
    def _rewrite(self, graph: fx.Graph, node: fx.Node, outputs: set[fx.Node]) -> str | None:
        target = node.target
        if target is aten.mm.default:
            return self._mm_to_linear(graph, node, node.args[0], node.args[1], None)
        if target is aten.addmm.default:
            beta = node.kwargs.get("beta", 1)
            alpha = node.kwargs.get("alpha", 1)
            bias = _val(node.args[0])
            out = _val(node)
            if beta == 1 and alpha == 1 and isinstance(bias, torch.Tensor) and bias.dim() == 1 and isinstance(out, torch.Tensor) and same_shape(bias.shape, out.shape[1:]):
                return self._mm_to_linear(graph, node, node.args[1], node.args[2], node.args[0])
            return None
        if target is aten.linear.default:
            return self._flatten_linear(graph, node)
        if target is aten.matmul.default:
            return self._matmul(graph, node)
        if target is aten.bmm.default:
            return self._single_batch_bmm(graph, node) or self._bmm_over_one_weight(graph, node)
        if target is aten._assert_tensor_metadata.default:
            return self._drop_proven_assert(node)
        if target is aten.mul.Tensor:
            kind = self._gelu_by_hand(graph, node)
            if kind:
                return kind
        if target is aten.index_put.default:
            return self._masked_assignment(graph, node)
        if node in outputs:
            return None
        if target in _RESHAPES:
            kind = self._repeat_as_broadcast(graph, node)
            if kind:
                return kind
        if target in (aten._to_copy.default, prims.convert_element_type.default):
            kind = self._cast_before_views(graph, node)
            if kind:
                return kind
        return self._drop_noop(node)

    def _written_values(self, graph: fx.Graph) -> set[fx.Node]:
        """`written_in_place(graph)`, computed once per run when first needed (most graphs a
        compile gives are functional: nothing is written)."""
        if self._written is None:
            self._written = written_in_place(graph)
        return self._written

    def _cast_before_views(self, graph: fx.Graph, cast: fx.Node) -> str | None:
        """`cast(chain(x))` as `chain(cast(x))`, for a narrowing cast (autocast's) and a chain of
        `_CAST_COMMUTES` ops and transposes cut as `_moved_over` says: the same values (a cast
        is elementwise), checked to have the same strides. A clone joins the chain only while
        it and what reads it up to the cast have no other reader (else the copy would be made
        twice); a value written in place stops it (a clone read before the write would be cast
        after it)."""
        before, after = _val(cast.args[0]), _val(cast)
        if set(cast.kwargs) - {"dtype"} or not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)):
            return None
        if before.dtype == after.dtype:
            return None  # a cast that changes nothing: `_drop_noop` removes it
        if after.dtype.itemsize >= before.dtype.itemsize:
            # A widening cast stays on the operand it widens: the attention pass reads through it
            # there (GPT-Neo casts q and k up to float32 for the product, v not).
            return None
        written = self._written_values(graph)
        chain: list[fx.Node] = []
        sole_reader = True
        src = cast.args[0]
        while (isinstance(src, fx.Node) and src.op == "call_function" and src.args and isinstance(src.args[0], fx.Node)
               and src not in written
               and (transposed_dims(src) is not None or src.target in _CAST_COMMUTES)):
            sole_reader = sole_reader and len(src.users) == 1
            if src.target is aten.clone.default and not (sole_reader and set(src.kwargs) <= {"memory_format"}):
                break
            chain.append(src)
            src = src.args[0]
        chain = _moved_over(chain)
        if not chain or reads_written(chain[-1], written):
            # (`src` or what it views is written: a clone of it read before the write would be
            # cast after it; `reads_written` follows views other than the chain's, say a slice.)
            return None
        made: list[fx.Node] = []
        with graph.inserting_before(cast):
            top = graph.call_function(cast.target, (chain[-1].args[0], *cast.args[1:]), dict(cast.kwargs))
            made.append(top)
            infer_meta(top)
            for op in reversed(chain):
                top = graph.call_function(op.target, (top, *op.args[1:]), dict(op.kwargs))
                made.append(top)
                infer_meta(top)
        if not all(statically_known_true(a == b) for a, b in zip(_val(top).stride(), _val(cast).stride())):
            for node in reversed(made):
                graph.erase_node(node)
            return None
        for node in made:
            copy_source_meta(cast, node)
        if cast in written:
            # Its writes now land on the new chain: a copy of it `_drop_noop` meets later must
            # still see it written.
            written.update(made)
        cast.replace_all_uses_with(top)
        graph.erase_node(cast)
        return "cast_before_views"

    def _weight_nk(self, graph: fx.Graph, node: fx.Node, b: fx.Node) -> fx.Node:
        """The [N, K] operand for `x @ b`: the source of a transpose, else `t(b)`."""
        if _is_2d_transpose(b):
            return b.args[0]
        with graph.inserting_before(node):
            w = graph.call_function(aten.t.default, (b,))
        infer_meta(w)
        copy_source_meta(node, w)
        return w

    def _mm_to_linear(self, graph: fx.Graph, node: fx.Node, a: Any, b: Any, bias: Any,
                      unsqueeze: bool = False) -> str | None:
        av, bv = _val(a), _val(b)
        if not (isinstance(av, torch.Tensor) and isinstance(bv, torch.Tensor) and av.dim() == 2 and bv.dim() == 2):
            return None
        w = self._weight_nk(graph, node, b)
        with graph.inserting_before(node):
            lin = graph.call_function(aten.linear.default, (a, w) if bias is None else (a, w, bias))
            out = graph.call_function(aten.unsqueeze.default, (lin, 0)) if unsqueeze else lin
        for n in {lin, out}:
            infer_meta(n)
            copy_source_meta(node, n)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        return "canonical_linear"

    def _flatten(self, graph: fx.Graph, node: fx.Node, x: fx.Node, k: Any) -> fx.Node:
        # A view where the leading dims merge into one (a contiguous activation); a transposed
        # input (`x.transpose(0, 1)`) has none, and a view of it fails when the graph runs. A
        # graph input's layout is the caller's (a loaded archive is called with a permuted
        # tensor as eager is): reshape, which is the same view where the dims do merge.
        merge = _leading_dims_merge(_val(x)) and not _laid_out_by_the_caller(x)
        op = aten.view.default if merge else aten.reshape.default
        with graph.inserting_before(node):
            flat = graph.call_function(op, (x, [-1, k]))
        infer_meta(flat)
        copy_source_meta(node, flat)
        return flat

    def _unflatten(self, graph: fx.Graph, node: fx.Node, out2d: fx.Node, x: fx.Node, lead_dims: int, n: Any) -> fx.Node:
        """View `out2d` back to x's leading dims plus `n`, reading symbolic dims with sym_size."""
        with graph.inserting_before(node):
            sizes = [size_value(graph, x, i) for i in range(lead_dims)]
            view = graph.call_function(aten.view.default, (out2d, [*sizes, n]))
        infer_meta(view)
        copy_source_meta(node, view)
        return view

    def _flatten_linear(self, graph: fx.Graph, node: fx.Node) -> str | None:
        x = node.args[0]
        xv = _val(x)
        if not isinstance(xv, torch.Tensor) or xv.dim() <= 2 or xv.dim() > 2 + 4:
            return None
        w = node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        flat = self._flatten(graph, node, x, xv.shape[-1])
        with graph.inserting_before(node):
            lin = graph.call_function(aten.linear.default, (flat, w) if bias is None else (flat, w, bias))
        infer_meta(lin)
        copy_source_meta(node, lin)
        out = self._unflatten(graph, node, lin, x, xv.dim() - 1, _val(w).shape[0])
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        return "canonical_linear"

    def _matmul(self, graph: fx.Graph, node: fx.Node, operands: tuple[Any, Any] | None = None) -> str | None:
        """`a @ b` (`operands`, default the node's own) in place of `node`: a linear for a 2-D `b`,
        else a bmm over flattened batch dims where both operands have the same ones."""
        a, b = operands if operands is not None else (node.args[0], node.args[1])
        av, bv = _val(a), _val(b)
        if not (isinstance(av, torch.Tensor) and isinstance(bv, torch.Tensor)) or av.dim() < 2:
            return None
        if bv.dim() == 2:
            w = self._weight_nk(graph, node, b)
            x2d = a if av.dim() == 2 else self._flatten(graph, node, a, av.shape[-1])
            with graph.inserting_before(node):
                lin = graph.call_function(aten.linear.default, (x2d, w))
            infer_meta(lin)
            copy_source_meta(node, lin)
            out = lin if av.dim() == 2 else self._unflatten(graph, node, lin, a, av.dim() - 1, bv.shape[1])
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            return "canonical_linear"
        if av.dim() == bv.dim() and av.dim() >= 3 and same_shape(av.shape[:-2], bv.shape[:-2]):
            with graph.inserting_before(node):
                a3 = graph.call_function(aten.reshape.default, (a, [-1, av.shape[-2], av.shape[-1]]))
                b3 = graph.call_function(aten.reshape.default, (b, [-1, bv.shape[-2], bv.shape[-1]]))
            for n in (a3, b3):
                infer_meta(n)
                copy_source_meta(node, n)
            with graph.inserting_before(node):
                bmm = graph.call_function(aten.bmm.default, (a3, b3))
            infer_meta(bmm)
            copy_source_meta(node, bmm)
            out = self._unflatten(graph, node, bmm, a, av.dim() - 1, bv.shape[-1])
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            return "canonical_bmm"
        return None

    def _single_batch_bmm(self, graph: fx.Graph, node: fx.Node) -> str | None:
        """`bmm` over one batch whose right operand is a 2-D tensor viewed as [1, K, N] (einsum's
        `"bsk,nk->bsn"` with a weight): `linear` on the rows, viewed back to [1, M, N]."""
        a, b = node.args[0], node.args[1]
        av, bv = _val(a), _val(b)
        if not (isinstance(av, torch.Tensor) and isinstance(bv, torch.Tensor) and _is_unit(av.shape[0])
                and b.op == "call_function" and b.target in _RESHAPES and isinstance(_val(b.args[0]), torch.Tensor)
                and _val(b.args[0]).dim() == 2 and same_shape(_val(b.args[0]).shape, bv.shape[1:])):
            return None
        with graph.inserting_before(node):
            rows = graph.call_function(aten.select.int, (a, 0, 0))
            infer_meta(rows)
        return self._mm_to_linear(graph, node, rows, b.args[0], None, unsqueeze=True)

    def _bmm_over_one_weight(self, graph: fx.Graph, node: fx.Node) -> str | None:
        """`bmm` whose right operand is one [K, N] matrix (or [1, K, N]) expanded along the batch
        (`torch.bmm(x, w.expand(B, K, N))`): every batch meets the same weight, so it is `x @ w`,
        a linear on the rows. Left a bmm, gemm_padding would take it for stacked expert weights,
        as many as the input has batches (symbolic under dynamic=True, so it stayed as it was):
        rewritten where gemm_padding would read it so, rows of a symbolic size times a weight of
        static sizes. (Static bmms stay for the attention pass, whose reasons name K and V
        broadcast over the batch.)"""
        a, b = node.args[0], node.args[1]
        av = _val(a)
        if not (isinstance(av, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in av.shape)):
            return None
        if not (isinstance(b, fx.Node) and b.op == "call_function" and b.target is aten.expand.default
                and isinstance(b.args[0], fx.Node)):
            return None
        src = b.args[0]
        sv = _val(src)
        bv = _val(b)
        # Only the batch is broadcast: a [1, N] expanded to [B, K, N] is no [K, N] weight.
        if not (isinstance(sv, torch.Tensor) and isinstance(bv, torch.Tensor) and same_shape(sv.shape[-2:], bv.shape[1:])
                and (sv.dim() == 2 or (sv.dim() == 3 and _is_unit(sv.shape[0])))
                and not any(isinstance(d, torch.SymInt) for d in sv.shape)):
            return None
        if sv.dim() == 3:
            with graph.inserting_before(node):
                src = graph.call_function(aten.select.int, (src, 0, 0))
            infer_meta(src)
            copy_source_meta(node, src)
        return self._matmul(graph, node, (a, src))

    def _repeat_as_broadcast(self, graph: fx.Graph, view: fx.Node) -> str | None:
        """`view(op(x.repeat(E, 1), c.reshape(E*T, 1)), [E, T, H])` as `op(x` broadcast to `[E, T,
        H], c.reshape(E, T, 1))`, `op` elementwise: the same values, laid out alike. Llama-4 runs
        every token through every expert so (`hidden.repeat(E, 1)` scaled by each expert's score,
        viewed `[E, T, H]` for the batched expert GEMMs); the repeat's `E*T` rows hide the tokens,
        which the broadcast keeps at dim 1 (nano-batching splits the experts along them), and no
        E copies of the tokens are made. Every tensor operand of `op` is such a repeat, a reshape
        merging `[E, T, ...]` into rows, or a value without rows (broadcast along them)."""
        op = view.args[0]
        vv, ov = _val(view), _val(op)
        if not (isinstance(op, fx.Node) and op.op == "call_function" and isinstance(op.target, torch._ops.OpOverload)
                and torch.Tag.pointwise in op.target.tags and len(op.users) == 1
                and isinstance(vv, torch.Tensor) and isinstance(ov, torch.Tensor) and ov.dim() >= 1
                and vv.dim() == ov.dim() + 1 and (_static(vv.shape[0]) or 0) > 1
                and same_shape(vv.shape[2:], ov.shape[1:]) and statically_known_true(vv.shape[0] * vv.shape[1] == ov.shape[0])):
            return None
        blocks, rows = _static(vv.shape[0]), vv.shape[1]
        replaced: dict[fx.Node, tuple[Any, ...]] = {}  # operand -> (target, args) of its `[E, T, ...]` form
        for a in op.all_input_nodes:
            av = _val(a)
            if not isinstance(av, torch.Tensor) or av.dim() < ov.dim() or _is_unit(av.shape[0]):
                continue  # a number, or broadcast along the rows
            src = a.args[0] if a.op == "call_function" and a.args and isinstance(a.args[0], fx.Node) else None
            sv = _val(src)
            written = self._written_values(graph)
            if not isinstance(sv, torch.Tensor) or a in written or reads_written(a, written):
                return None
            if (a.target is aten.repeat.default and list(a.args[1]) == [blocks] + [1] * (av.dim() - 1)
                    and sv.dim() == av.dim() and statically_known_true(sv.shape[0] == rows)):
                replaced[a] = (aten.expand.default, [blocks, *([-1] * sv.dim())], aten.unsqueeze.default)
            elif (a.target in _RESHAPES and sv.dim() >= 2 and _static(sv.shape[0]) == blocks
                  and statically_known_true(sv.shape[1] == rows) and all(_static(d) is not None for d in av.shape[1:])
                  and statically_known_true(math.prod(sv.shape[2:]) == math.prod(av.shape[1:]))):
                replaced[a] = (aten.reshape.default, [blocks, -1, *(_static(d) for d in av.shape[1:])], None)
            else:
                return None
        if not any(a.target is aten.repeat.default for a in replaced):
            return None  # (rows merged and split again only: nothing hidden to bring back)
        made: dict[fx.Node, fx.Node] = {}
        created: list[fx.Node] = []
        new_val = None
        try:
            with graph.inserting_before(op):
                for a, (target, shape, first) in replaced.items():
                    src = a.args[0]
                    if first is not None:
                        src = graph.call_function(first, (src, 0))
                        created.append(src)
                        infer_meta(src)
                    made[a] = graph.call_function(target, (src, shape))
                    created.append(made[a])
                    infer_meta(made[a])
                args, kwargs = fx.node.map_arg((op.args, op.kwargs), lambda a: made.get(a, a))
                new = graph.call_function(op.target, args, kwargs)
                created.append(new)
            new_val = infer_meta(new)
        except RuntimeError:
            pass  # (fake values it cannot compute: left as it was)
        if not (isinstance(new_val, torch.Tensor) and same_shape(new_val.shape, vv.shape)
                and same_shape(new_val.stride(), vv.stride()) and new_val.dtype == vv.dtype):
            for node in reversed(created):
                graph.erase_node(node)  # (a layout other than the view's: left as it was)
            return None
        for node in created:
            copy_source_meta(op, node)
        view.replace_all_uses_with(new)
        graph.erase_node(view)
        return "repeat_as_broadcast"

    # -- no-ops ----------------------------------------------------------------------------
    def _drop_noop(self, node: fx.Node) -> str | None:
        target = node.target
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        src = node.args[0]
        sv, ov = _val(src), _val(node)
        if not (isinstance(sv, torch.Tensor) and isinstance(ov, torch.Tensor)):
            return None
        if target in _VIEW_LIKE or target in _SAME_DTYPE_COPIES:
            if target in _SAME_DTYPE_COPIES and node in self._viewed_by_outputs:
                return None  # an output views this copy: without it, the output views the input
            written = self._written_values(node.graph) if target in _SAME_DTYPE_COPIES else set()
            if node in written or reads_written(node, written):
                # A copy written in place (without it the write lands on its source), or of a
                # value written later (the copy holds the value before the write).
                return None
            if target is aten._to_copy.default and set(node.kwargs) - {"dtype"}:
                return None  # device/layout/memory-format changes are real work
            if target is aten.clone.default and node.kwargs.get("memory_format") not in (None, torch.preserve_format) and not _same_layout(sv, ov):
                return None
            if _same_layout(sv, ov):
                node.replace_all_uses_with(src)
                node.graph.erase_node(node)
                return "noop_removed"
            base = src.args[0] if src.target in _RESHAPES and src.args and isinstance(src.args[0], fx.Node) else None
            if target in _RESHAPES and base is not None and isinstance(_val(base), torch.Tensor) \
                    and _same_layout(_val(base), ov):
                # A round trip through another shape (Falcon's scores, [B, H, S, L] flattened to
                # [B*H, S, L] by an in-place divide and back): the base itself.
                node.replace_all_uses_with(base)
                node.graph.erase_node(node)
                return "noop_removed"
            return None
        if _is_2d_transpose(node) and _is_2d_transpose(src):
            node.replace_all_uses_with(src.args[0])
            node.graph.erase_node(node)
            return "noop_removed"
        return None

    def _drop_proven_assert(self, node: fx.Node) -> str | None:
        """Erase an `_assert_tensor_metadata` (torch.export writes one per `.to()` that changes
        nothing) whose dtype, device, layout, size and stride the traced value already has: it
        can never fire, and as a second user it would hide the tensor's only real one."""
        checked = _val(node.args[0])
        if not isinstance(checked, torch.Tensor):
            return None
        args = dict(zip(("size", "stride", "dtype"), node.args[1:]), **node.kwargs)
        facts = {"size": lambda v: same_shape(v, checked.shape), "stride": lambda v: same_shape(v, checked.stride()),
                 "dtype": lambda v: v == checked.dtype, "device": lambda v: torch.device(v) == checked.device,
                 "layout": lambda v: v == checked.layout}
        given = {name: value for name, value in args.items() if value is not None}
        if any(name not in facts or isinstance(value, fx.Node) or not facts[name](value) for name, value in given.items()):
            return None
        node.graph.erase_node(node)
        return "noop_removed"

    # -- activations written out ---------------------------------------------------------
    def _gelu_by_hand(self, graph: fx.Graph, root: fx.Node) -> str | None:
        """Replace `root` by `aten.gelu(x, approximate=...)` when it is the last op of a GELU
        written out (`_hand_gelu_input`) over a floating-point `x`, and return the rewrite's kind
        (`canonical_gelu_tanh` or `canonical_gelu`); the pattern's other nodes, read by nothing
        else, die with it."""
        found = _hand_gelu_input(root)
        if found is None:
            return None
        x, approximate = found
        xv = _val(x)
        if not isinstance(xv, torch.Tensor) or not xv.is_floating_point():
            return None
        with graph.inserting_before(root):
            gelu = graph.call_function(aten.gelu.default, (x,), {"approximate": approximate} if approximate != "none" else {})
        copy_source_meta(root, gelu)
        infer_meta(gelu)
        root.replace_all_uses_with(gelu)
        graph.erase_node(root)
        return "canonical_gelu_tanh" if approximate == "tanh" else "canonical_gelu"

    # -- masked assignments ----------------------------------------------------------------
    def _masked_assignment(self, graph: fx.Graph, node: fx.Node) -> str | None:
        """`index_put(x, [mask], v)` -> `where(mask, v, x)` when the mask is bool over x's leading
        dims, `v` one element of x's dtype and nothing accumulates: each element selected is then
        set to v, the others kept (a mask over fewer dims, with trailing unit dims, selects whole
        rows as the index does). Returns the rewrite's kind, or None."""
        x, indices, values = node.args[:3]
        accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
        if accumulate or not isinstance(indices, (list, tuple)) or len(indices) != 1:
            return None
        (mask,) = indices
        xv, mv, vv = _val(x), _val(mask), _val(values)
        if not (isinstance(xv, torch.Tensor) and isinstance(mv, torch.Tensor) and isinstance(vv, torch.Tensor)):
            return None
        if (mv.dtype != torch.bool or vv.dtype != xv.dtype or not isinstance(vv.numel(), int) or vv.numel() != 1
                or not 1 <= mv.dim() <= xv.dim() or not same_shape(mv.shape, xv.shape[:mv.dim()])):
            return None
        made: list[fx.Node] = []

        def call(target: Any, args: tuple) -> fx.Node:
            with graph.inserting_before(node):
                made.append(graph.call_function(target, args))
            copy_source_meta(node, made[-1])
            infer_meta(made[-1])
            return made[-1]

        keep = mask
        for _ in range(xv.dim() - mv.dim()):
            keep = call(aten.unsqueeze.default, (keep, -1))
        # A [1] value broadcast from the right would line up with x's last dim only.
        one = call(aten.view.default, (values, [])) if vv.dim() else values
        where = call(aten.where.self, (keep, one, x))
        # index_put's result is a copy of x in x's layout; where's takes its operands' (the
        # mask's first), and later views and as_strided were traced against the former.
        if not all(statically_known_true(a == b) for a, b in zip(_val(node).stride(), _val(where).stride())):
            for n in reversed(made):
                graph.erase_node(n)
            return None
        node.replace_all_uses_with(where)
        graph.erase_node(node)
        return "masked_assignment"

    def _remove_dead(self, graph: fx.Graph) -> int:
        """Erase pure nodes nobody uses any more (e.g. a transpose folded into a linear)."""
        removed = 0
        for node in reversed(list(graph.nodes)):
            if node.op == "call_function" and not node.users and not node.is_impure():
                if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
                    continue
                graph.erase_node(node)
                removed += 1
        return removed
