"""attention: scaled-dot-product attention becomes `tileflow::meta_attention`.

XY-Serve's Meta-Attention as a pass: every attention a traced model contains runs on the one
meta-kernel (the same tiles and task table that serve prefill, chunked prefill, decode and verify
through `meta_attention_varlen`). Matched forms:
- `scaled_dot_product_attention` and its backend-specific ATen forms (`_scaled_dot_product_flash_
  attention[_for_cpu]`, `_efficient_attention`, `_cudnn_attention`), with a boolean or additive
  mask (the model's causal / sliding-window / padding mask, applied as an additive bias whose
  per-row ranges let the kernel skip the keys it hides and read it only where it is not zero,
  so a materialized causal mask costs about what `is_causal` does), or `is_causal` when query
  and key lengths are equal;
- the manual form models write by hand, `softmax(q @ k^T * scale + mask) @ v` as ATen leaves it
  (`bmm` over flattened heads, its scores viewed as [B, H, S, S_kv] or kept flattened as
  [B * H, S, S_kv] up to the softmax, where q's view names B and H (a flattened mask or bias
  unflattened to match), the scale as a multiply or divide by a number or a 0-d tensor,
  additive masks and bool ones applied by `masked_fill(scores, ~keep, fill)` or
  `where(keep, scores, fill)` with a fill of -inf or the dtype's lowest value, joined into one
  mask, a float cast before the softmax and back after it (transformers' eager attention in
  bf16/fp16: `softmax(scores, dtype=float32)`, or `_softmax(half_to_float=True)` on CUDA), q
  and k cast up to float32 for the product (GPT-Neo)), with or without logit soft-capping,
  `cap * tanh(scores / cap)` before the mask (Gemma-2), with or without attention sinks, a
  per-head logit joined to the scores before the softmax and its column dropped after
  (`softmax(cat([scores, sinks]) - max)[..., :-1]`, gpt-oss), and with or without ALiBi, a
  slope per head times the key position, added to the scores (MPT) or inside the product as
  `baddbmm(bias, q, k^T)` (BLOOM); any other bias inside the product is the kernel's additive
  bias (BLOOM's ALiBi counted along a padding mask, `[B, H, 1, S_kv]`, the same for every query);
- GQA/MQA: K/V widened by `repeat_kv` (unsqueeze/expand/reshape) are read at their real head
  count instead (the kernel packs the query heads of a KV head into one tile);
A mask `tileflow.mask_rule` proves to be the kernel's causal / sliding-window rule is not read:
the call takes the rule's flags, and a padding term joined to it (the same for every query) as
its bias, with any term the mask adds on the keys it keeps (Falcon's ALiBi, `[B, H, 1, S_kv]`);
under an eager mask (`finfo.min`), the query rows the padding term leaves no key get V's mean
after the call, as eager's softmax of equal scores gives them.
Variants the kernel does not implement (dropout, a used log-sum-exp output, `is_causal` with
different query and key lengths, head dims that differ between Q and K) are left as they are
(K and V of different head dims run at one size, the narrower zero-padded: `head_size_padded`),
with the reason in the report; so is a manual attention with anything else between the two
matmuls (a soft cap over a bias inside the product, for one), and soft-capping, sinks or ALiBi
on a target whose kernel lacks them.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch._prims_common
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import statically_known_true

from tileflow.graph_utils import (
    bind_arguments,
    constant_number,
    copy_source_meta,
    depends_on_sizes,
    eliminate_dead_code,
    evaluate_at_example_sizes,
    free_symbols,
    holds_no_lowest_value,
    in_graph,
    infer_meta,
    same_shape,
    size_hint,
    size_value,
    transposed_dims,
)
from tileflow.mask_rule import MaskRule, mask_rule
from tileflow.pipeline import PassContext, PassResult, register_pass

aten = torch.ops.aten

# SDPA forms -> (name of the mask argument, whether the op returns a tuple whose [0] is the output)
_SDPA_FORMS: dict[Any, tuple[str | None, bool]] = {
    aten.scaled_dot_product_attention.default: ("attn_mask", False),
    aten._scaled_dot_product_flash_attention_for_cpu.default: ("attn_mask", True),
    aten._scaled_dot_product_flash_attention.default: (None, True),
    aten._scaled_dot_product_efficient_attention.default: ("attn_bias", True),
    aten._scaled_dot_product_cudnn_attention.default: ("attn_bias", True),
}
# PyTorch's fused inference fast paths (eval under no_grad) -> the module that calls them: one op
# holds the attention and its projections, which no pass can take apart, so the report says so.
_FUSED_FAST_PATHS: dict[Any, str] = {
    aten._transformer_encoder_layer_fwd.default: "nn.TransformerEncoderLayer",
    aten._native_multi_head_attention.default: "nn.MultiheadAttention",
}
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_DTYPES = {
    "triton": (torch.float16, torch.bfloat16, torch.float32),
    "reference": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "ascend": (torch.float16, torch.bfloat16, torch.float32),
}


def _more_queries_than_keys(s_q: Any, s_kv: Any, rule: str) -> str:
    """Why an attention whose `s_q` queries are not known to be at most its `s_kv` keys stays as
    it was, under `rule` (what reads the queries' positions: a causal or sliding-window rule its
    mask was proven to be, or ALiBi). meta_attention places a sequence's n queries at the last n
    of its key positions (decode and chunked prefill over a cache), which such a rule reads, so
    it needs n <= keys. Without one no position is read, and the attention is rewritten whatever
    the sizes: cross-attention with a longer decoder input than encoder output (no mask, or a
    padding mask over the keys), a StaticCache prefill over every slot of the cache with the
    explicit mask that hides the unwritten slots (Falcon's; a sliding layer's window-sized
    cache), whose `max_cache_len` Dynamo makes a symbol of its own under `dynamic=True`. The
    sizes are named, and so is the rule."""
    if isinstance(s_q, int) and isinstance(s_kv, int):  # static sizes: the queries do outnumber the keys
        return (f"the queries may outnumber the keys ({s_q} and {s_kv}) under {rule}: meta_attention puts each "
                "query at a key position, which that rule reads")
    return (f"the queries may outnumber the keys ({s_q} and {s_kv}, not known to be ordered) under {rule}: "
            "meta_attention puts each query at a key position, which that rule reads")


def _positional(rule: MaskRule | None, alibi: bool = False) -> str | None:
    """What of a rewrite reads the queries' positions (`_more_queries_than_keys`): the mask's
    causal or sliding-window rule, or ALiBi; None when nothing does."""
    if rule is not None and rule.sliding_window is not None:
        return "a sliding-window mask"
    if rule is not None and rule.causal:
        return "a causal mask"
    return "ALiBi" if alibi else None


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def strip_repeat_kv(node: Any) -> Any:
    """The un-repeated K/V behind `repeat_kv` ([B, Hkv, S, D] -> [B, Hkv * R, S, D] by
    unsqueeze + expand + reshape) or behind a broadcast of one head ([B, 1, S, D] expanded to
    [B, H, S, D]), or `node` itself when it is not such a widening."""
    cur = node
    while isinstance(cur, fx.Node) and cur.target in (_VIEWS | {aten.clone.default}):
        cur = cur.args[0]
    if not (isinstance(cur, fx.Node) and cur.target is aten.expand.default):
        return node
    if _head_broadcast_source(cur) is not cur and same_shape(_val(cur).shape, _val(node).shape):
        return cur.args[0]  # one K/V head broadcast to every query head
    src = cur.args[0]
    if isinstance(src, fx.Node) and src.target is aten.unsqueeze.default and src.args[1] in (2, -3):
        base = src.args[0]
    elif isinstance(src, fx.Node) and src.target is aten.slice.Tensor:
        return node
    else:
        return node
    bv, nv, ev = _val(base), _val(node), _val(cur)
    if not (isinstance(bv, torch.Tensor) and isinstance(nv, torch.Tensor)) or bv.dim() != 4 or ev.dim() != 5:
        return node
    # expand to [B, Hkv, R, S, D] then reshape to [B, Hkv*R, S, D]: head h reads KV head h // R,
    # exactly the kernel's GQA rule.
    if not (same_shape(ev.shape[:2], bv.shape[:2]) and same_shape(ev.shape[3:], bv.shape[2:])):
        return node
    if not (same_shape(nv.shape[2:], bv.shape[2:]) and same_shape(nv.shape[:1], bv.shape[:1])):
        return node
    return base


def _kv_heads(q_heads: int, k: fx.Node, v: fx.Node) -> tuple[Any, Any, int] | str:
    """K and V as the kernel reads them, at their real head count (`strip_repeat_kv` undone on
    both, or on neither when only one side was widened), with that count; or why the kernel
    cannot read them (K and V at two head counts, query heads not a multiple of it)."""
    k_real, v_real = strip_repeat_kv(k), strip_repeat_kv(v)
    if _val(k_real).shape[1] != _val(v_real).shape[1]:
        k_real, v_real = k, v  # only one side was widened: keep both as they are
    hkv = int(_val(k_real).shape[1])
    if int(_val(v_real).shape[1]) != hkv:
        return f"K has {hkv} heads and V {int(_val(v_real).shape[1])}; the kernel reads both at one head count"
    if q_heads % hkv:
        return f"{q_heads} query heads are not a multiple of {hkv} KV heads"
    return k_real, v_real, hkv


def _one_head_size(graph: fx.Graph, q: fx.Node, k: fx.Node, v: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    """q, k and v at one head size, the narrower side padded with zero columns (made at the
    graph's insertion point). The kernel takes one head size; multi-head latent attention
    (DeepSeek-V3, Kimi-K2: q and k 192 wide, v 128) has two. Zero columns change neither q.k
    nor the first columns of P @ v, so the output cut back to v's width (`_as_replaced`) is
    the attention's; the caller passes the scale explicitly, the queries' own."""
    d_qk, d_v = int(_val(q).shape[3]), int(_val(v).shape[3])

    def padded(node: fx.Node, width: int) -> fx.Node:
        pad = graph.call_function(aten.constant_pad_nd.default, (node, [0, width - int(_val(node).shape[3])], 0.0))
        infer_meta(pad)
        return pad

    if d_v < d_qk:
        return q, k, padded(v, d_qk)
    if d_v > d_qk:
        return padded(q, d_v), padded(k, d_v), v
    return q, k, v


def _as_replaced(graph: fx.Graph, out: fx.Node, width: int, replaced: list[fx.Node]) -> fx.Node:
    """`out` (`meta_attention`'s [B, H, S, D], laid out as [B, S, H, D]) as the attention output
    it replaces, made at the graph's insertion point: cut back to v's `width`, and copied where
    its layout matters, once. Where the replaced output had another layout (a bmm's view and the
    CPU's SDPA are contiguous for contiguous queries; the CPU's SDPA follows the queries' layout,
    [S, B, H, D] under `nn.MultiheadAttention`) and a view or the graph's output reads it, directly
    or through transposes, a copy in that layout: views traced against it (`out.view(B, H * S, D)`,
    MHA's `out.permute(2, 0, 1, 3).view(S * B, E)`) raised on the kernel's. Else a cut is copied
    into the kernel's own layout, which the GPU's SDPA gives too (`transpose(1, 2)` then a view
    merging heads: a slice's rows, strided by the padded width, cannot be viewed so). Readers that
    compute elementwise take the output as it is."""
    node = out
    if int(_val(out).shape[-1]) != width:
        node = graph.call_function(aten.slice.Tensor, (out, -1, 0, width))
        infer_meta(node)
    steps: tuple[tuple[Any, tuple[Any, ...], dict[str, Any]], ...] = ()
    order = next((o for o in (_layout_read(old, _val(node)) for old in replaced) if o is not None), None)
    if order is not None:
        # Permuted so that the old layout's outermost dim comes first, copied contiguous and
        # permuted back: the old strides exactly (a plain contiguous copy when it was contiguous).
        inverse = [order.index(i) for i in range(len(order))]
        permute = order != list(range(len(order)))
        steps = (*(((aten.permute.default, (order,), {}),) if permute else ()),
                 (aten.clone.default, (), {"memory_format": torch.contiguous_format}),
                 *(((aten.permute.default, (inverse,), {}),) if permute else ()))
    elif node is not out:
        steps = ((aten.transpose.int, (1, 2), {}), (aten.clone.default, (), {"memory_format": torch.contiguous_format}),
                 (aten.transpose.int, (1, 2), {}))
    for target, args, kwargs in steps:
        node = graph.call_function(target, (node, *args), kwargs)
        infer_meta(node)
    return node


_REORDERS = {aten.permute.default, aten.transpose.int, aten.t.default}


def _layout_read(old: fx.Node, new: Any) -> list[int] | None:
    """The dims of the replaced output `old`, outermost in memory first, when its layout is dense,
    differs from `new`'s, and a view or the graph's output reads it, directly or through
    transposes and permutes (`_as_replaced`); else None."""
    ov = _val(old)
    if not (isinstance(ov, torch.Tensor) and isinstance(new, torch.Tensor)):
        return None
    # A dim of size one moves no element, whatever its stride says: a decode step's [B, H, 1, D]
    # is laid out alike contiguous and as the kernel's [B, 1, H, D] (no copy for its views).
    moved = [i for i, n in enumerate(ov.shape) if not statically_known_true(n == 1)]
    if same_shape([ov.stride()[i] for i in moved], [new.stride()[i] for i in moved]):
        return None
    hints = [size_hint(x) for x in (*ov.shape, *ov.stride())]
    if None in hints or not torch._prims_common.is_non_overlapping_and_dense_or_false(torch.empty_strided(
            hints[:ov.dim()], hints[ov.dim():], device="meta")):
        return None
    readers, seen = list(old.users), set()
    while readers:
        user = readers.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.op == "output" or user.target in _VIEWS or user.target is aten.as_strided.default:
            return _dim_order(hints[:ov.dim()], hints[ov.dim():])
        if user.target in _REORDERS:
            readers.extend(user.users)
    return None


def _dim_order(sizes: list[int], strides: list[int]) -> list[int]:
    """The dims of a dense tensor of `sizes` and `strides`, outermost in memory first (dims of
    size one, whose strides say nothing, where the contiguous layout puts them)."""
    order = list(range(len(sizes)))
    moving = [i for i in order if sizes[i] != 1]
    placed = iter(sorted(moving, key=lambda i: (-strides[i], i)))
    return [next(placed) if sizes[i] != 1 else i for i in order]


def _token_symbols(graph: fx.Graph) -> set[Any]:
    """The symbols of the graph's token counts: those in the rows of every `aten.linear` over a
    weight of static shape (canonicalize's form of a model's projections)."""
    rows = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten.linear.default:
            x, w = _val(node.args[0]), _val(node.args[1])
            if isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and x.dim() == 2 and not free_symbols([w]):
                rows.append(x.shape[0])
    return free_symbols(rows)


def _pin_head_dims(ctx: PassContext, dims: tuple[Any, ...], tensors: tuple[torch.Tensor, ...],
                   token_symbols: set[Any]) -> str | None:
    """Make the head counts and head dims `dims` static, or say why they cannot be. The kernel
    needs them static; they are symbolic when a graph break hands q, k and v to this graph as
    inputs under `dynamic=True`. Where the graph's shape guards are checked at each call
    (`ctx.shape_guards`: under Dynamo), each is pinned to its example value with a guard, so a
    call with other heads recompiles: a model's heads never change. A symbol that is also one
    of the tensors' batch or sequence sizes (Dynamo gives equal sizes one symbol) is not pinned,
    which would recompile at every new length; nor is one of `token_symbols` (`_token_symbols`:
    an attention across a token's own rows, whose "heads" are the sequence, as Inkling-2's
    attends over its loop states); nor one the caller marked dynamic (`ctx.declared_dynamic`),
    which Dynamo would refuse."""
    lengths = free_symbols(s for t in tensors for i, s in enumerate(t.shape) if i in (0, 2))
    return ctx.pin_static(dims, "head count or head dim", "the kernel needs them static", [
        (lengths, "has the symbol of a batch or sequence size (equal sizes at this trace)"),
        (token_symbols, "counts tokens (its symbol is in the rows of the graph's linears)")])


def _pin_target(node: fx.Node, target: str) -> None:
    """A `meta_attention` the model calls itself (tileflow's transformers attention functions)
    names no target, so at run time it would take the ambient config's: it runs on the target
    the graph is compiled for, as the pass's own rewrites do (and the kernels lowering builds)."""
    if len(node.args) > 6:
        if not node.args[6]:
            node.args = (*node.args[:6], target, *node.args[7:])
    elif not node.kwargs.get("target"):
        node.kwargs = {**node.kwargs, "target": target}


@register_pass
class Attention:
    """Rewrite SDPA nodes into `tileflow::meta_attention`."""

    name = "attention"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Rewrite every supported attention node; record why the others were left alone."""
        result = PassResult()
        graph = gm.graph
        self._ranges: dict[fx.Node, fx.Node] = {}
        self._made: dict[tuple[Any, ...], fx.Node] = {}  # masks made from the graph's, shared by its layers
        self._slopes: dict[tuple[Any, ...], list[float] | None] = {}
        self._rules: dict[tuple[Any, ...], MaskRule | None] = {}
        self._token_symbols = _token_symbols(graph)
        for node in list(graph.nodes):
            if node.op != "call_function" or not in_graph(node, graph):
                continue
            if node.target is torch.ops.tileflow.meta_attention.default:
                _pin_target(node, ctx.target)
                self._apply_rule(node, result)
                continue
            if node.target in _SDPA_FORMS:
                reason = self._rewrite(graph, node, ctx, result)
            elif node.target in _SOFTMAX:
                reason = self._rewrite_manual(graph, node, ctx, result)
            elif node.target in _FUSED_FAST_PATHS:
                reason = (f"{_FUSED_FAST_PATHS[node.target]}'s fused fast path ({node.target.name()}) runs the "
                          f"attention and its projections as one PyTorch op, which stays as it is: "
                          f"torch.backends.mha.set_fastpath_enabled(False) before compiling traces them as "
                          f"separate ops")
            else:
                continue
            if reason:
                result.fallback(node, reason)
        eliminate_dead_code(graph)
        live = set(graph.nodes)
        for ranges in self._ranges.values():
            if ranges in live:  # a mask whose ranges serve at least one rewritten attention
                result.count("mask_ranges")
        for key, bias in self._made.items():
            if key[0] == "float32 bias" and bias in live:
                result.count("mask_as_float32_bias")
        gm.recompile()
        return result

    def _rewrite(self, graph: fx.Graph, node: fx.Node, ctx: PassContext, result: PassResult) -> str | None:
        mask_name, returns_tuple = _SDPA_FORMS[node.target]
        args = bind_arguments(node)
        q, k, v = args["query"], args["key"], args["value"]
        qv, kv, vv = _val(q), _val(k), _val(v)
        if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (qv, kv, vv)):
            return "attention inputs are not 4-D [B, H, S, D] tensors"
        if float(args.get("dropout_p") or 0.0) != 0.0:
            return _DROPOUT_REASON
        allowed = _DTYPES.get(ctx.target, _DTYPES["reference"])
        if qv.dtype not in allowed or kv.dtype != qv.dtype or vv.dtype != qv.dtype:
            return f"dtypes q={qv.dtype}, k={kv.dtype}, v={vv.dtype} are not supported by the {ctx.target} meta-attention kernel"
        if not statically_known_true(kv.shape[-1] == qv.shape[-1]):
            return "q and k head dims differ"
        causal = bool(args.get("is_causal") or False)
        if causal and not statically_known_true(qv.shape[2] == kv.shape[2]):
            if statically_known_true(qv.shape[2] != kv.shape[2]):
                return "is_causal with different query and key lengths (top-left alignment) is not supported"
            # Equal in every call, perhaps, but traced apart: Dynamo's automatic dynamic sizes q,
            # k and v passed as separate inputs with a symbol each. Saying they differ would be wrong.
            return (f"is_causal with query and key lengths not known to be equal ({qv.shape[2]} and {kv.shape[2]}: "
                    "q, k and v passed in separately get a size each after a recompile; dynamic=True gives "
                    "equal sizes one symbol): top-left alignment, where they differ, is not supported")
        mask = args.get(mask_name) if mask_name else None
        if mask is not None and not (isinstance(_val(mask), torch.Tensor) and _val(mask).dim() <= 4):
            return "attention mask is not a tensor of at most 4 dims"
        if not statically_known_true(qv.shape[2] <= kv.shape[2]):
            # (is_causal has equal lengths here.) Only a rule the mask is proven to be reads the
            # queries' positions: an explicit mask or none is right whatever the sizes' order,
            # so no guard orders them.
            positional = _positional(self._mask_rule(mask, qv.shape[2], kv.shape[2]))
            if positional:
                return _more_queries_than_keys(qv.shape[2], kv.shape[2], positional)
        out_users: list[fx.Node] = []
        if returns_tuple:
            for user in node.users:
                if user.target is not operator.getitem:
                    return f"unexpected user {user.name} of the attention tuple"
                if user.args[1] == 0:
                    out_users.append(user)
                elif user.users:
                    return "the log-sum-exp / debug outputs of SDPA are used; meta_attention does not produce them"
        # Pinned only now that no check above refuses the attention (a pin is a guard).
        reason = _pin_head_dims(ctx, (qv.shape[1], qv.shape[3], kv.shape[1], vv.shape[1], vv.shape[3]), (qv, kv, vv),
                                self._token_symbols)
        if reason:
            return reason
        hq = int(qv.shape[1])
        heads = _kv_heads(hq, k, v)
        if isinstance(heads, str):
            return heads
        k_real, v_real, hkv = heads
        # Without enable_gqa SDPA needs K/V at the query's head count (as given, before any
        # repeat_kv was undone here), or one K/V head that its products broadcast (Falcon's MQA).
        if not args.get("enable_gqa", True) and int(kv.shape[1]) not in (hq, 1):
            return "K/V head count differs from Q without enable_gqa"
        rule = self._mask_rule(mask, qv.shape[2], kv.shape[2])
        window = None
        if rule is not None:  # the kernel applies the rule itself: a bias and ranges only for a key mask
            bias, ranges = self._key_mask_inputs(graph, rule, kv.shape[2], result, node)
            mask = bias
            causal, window = rule.causal, rule.sliding_window
        else:
            ranges = self._mask_ranges(graph, mask, kv.shape[2], result)
            bias = self._float32_bias(graph, mask)
        scale = args.get("scale")
        with graph.inserting_before(node):
            if int(vv.shape[3]) != int(qv.shape[3]):
                scale = float(qv.shape[3]) ** -0.5 if scale is None else scale  # SDPA's default: the queries'
            unrepeated = k_real is not k  # before the padding makes k_real another node
            q, k_real, v_real = _one_head_size(graph, q, k_real, v_real)
            new = graph.call_function(
                torch.ops.tileflow.meta_attention.default,
                (q, k_real, v_real, bias, causal, scale, ctx.target, ranges, *(() if window is None else (None, window))),
            )
            infer_meta(new)
            filled = self._empty_rows_averaged(graph, new, rule, q, k_real, v_real)
            out = _as_replaced(graph, filled, int(vv.shape[3]), out_users if returns_tuple else [node])
        copy_source_meta(node, new)
        new.meta["tileflow"] = {
            "kind": "meta_attention",
            "gqa": hq // hkv,
            "causal": causal,
            "mask": None if mask is None else str(_val(mask).dtype),
            "target": ctx.target,
        }
        _record_rule(new, result, rule, averaged=filled is not new)
        if returns_tuple:
            for user in out_users:
                user.replace_all_uses_with(out)
        else:
            node.replace_all_uses_with(out)
        result.count("meta_attention")
        if int(vv.shape[3]) != int(qv.shape[3]):
            result.count("head_size_padded")
        if unrepeated:
            result.count("gqa_unrepeated")
        return None

    def _apply_rule(self, node: fx.Node, result: PassResult) -> None:
        """A `meta_attention` the model calls itself with a mask (attn_implementation="tileflow"
        hands it transformers' mask) gets the kernel's rule instead, where the mask is proven one."""
        args = bind_arguments(node)
        if args.get("causal") or any(args.get(name) is not None for name in (
                "sliding_window", "attention_chunk", "key_starts", "mask_ranges")):
            return  # a rule of its own already: the mask's would have to be joined to it
        q, k = _val(args["q"]), _val(args["k"])
        rule = self._mask_rule(args.get("attn_mask"), q.shape[2], k.shape[2])
        if rule is None or rule.empty_rows_average:
            return  # (no mask transformers hands this op averages empty rows: not rewritten here)
        if _positional(rule) and not statically_known_true(q.shape[2] <= k.shape[2]):
            # The op runs more queries than keys under an explicit mask, but refuses them under a
            # causal or window rule (`_more_queries_than_keys`): the mask stays, no guard orders them.
            return
        key_mask, ranges = self._key_mask_inputs(node.graph, rule, k.shape[2], result, node)
        args.update(attn_mask=key_mask, mask_ranges=ranges, causal=rule.causal, sliding_window=rule.sliding_window)
        names = [a.name for a in torch.ops.tileflow.meta_attention.default._schema.arguments]
        node.args, node.kwargs = tuple(args.get(name) for name in names), {}
        _record_rule(node, result, rule, averaged=False)

    def _mask_rule(self, mask: Any, q_len: Any, kv_len: Any) -> MaskRule | None:
        """`mask_rule(mask, ...)`, proven once per mask and shape (the layers of a model share both).
        Not a rule whose empty rows average V (`_empty_rows_averaged`) for one query row (a decode
        step): its mask, `[B, 1, 1, S_kv]`, is no larger than the key mask, and the average would
        read V a second time."""
        key = (mask, str(q_len), str(kv_len))  # (a SymInt does not hash: its expression does)
        if key not in self._rules:
            self._rules[key] = mask_rule(mask, q_len, kv_len)
        rule = self._rules[key]
        if rule is not None and rule.empty_rows_average and statically_known_true(q_len == 1):
            return None
        return rule

    def _empty_rows_averaged(self, graph: fx.Graph, out: fx.Node, rule: MaskRule | None, q: fx.Node, k: fx.Node,
                             v: fx.Node) -> fx.Node:
        """`out` (the kernel's `[B, Hq, S, D]`), where `rule` says so (`empty_rows_average`), with each
        query row that the rule and its key mask leave no key replaced by the even average of every
        key's value (V, `[B, Hkv, S_kv, D]`, read again): eager's softmax of a row whose scores are
        all the mask's lowest value. Made at the graph's insertion point."""
        if rule is None or not rule.empty_rows_average:
            return out
        average = graph.call_function(aten.mean.dim, (v, [2], True))
        infer_meta(average)
        hq, hkv = int(_val(q).shape[1]), int(_val(v).shape[1])
        if hkv not in (1, hq):  # query head h reads KV head h // (hq // hkv)
            average = graph.call_function(aten.repeat_interleave.self_int, (average, hq // hkv, 1))
            infer_meta(average)
        averaged = graph.call_function(aten.where.self, (self._empty_rows(graph, rule, q, k), average, out))
        infer_meta(averaged)
        return averaged

    def _empty_rows(self, graph: fx.Graph, rule: MaskRule, q: fx.Node, k: fx.Node) -> fx.Node:
        """bool `[..., S, 1]`, broadcast against the attention's `[B, Hq, S, D]`: the query rows that
        `rule` and its key mask leave no key. Made once per key mask, rule and sizes at the graph's
        insertion point (the first layer's attention; the later layers read it)."""
        s, s_kv = _val(q).shape[2], _val(k).shape[2]
        key = ("empty rows", rule.key_mask, rule.causal, rule.sliding_window, str(s), str(s_kv))
        if key in self._made:
            return self._made[key]

        def call(target: Any, *args: Any, **kwargs: Any) -> fx.Node:
            node = graph.call_function(target, args, kwargs)
            infer_meta(node)
            return node

        keys, kv_size = rule.key_mask, size_value(graph, k, 2)
        if _val(keys).dim() == 1:
            keys = call(aten.unsqueeze.default, keys, 0)  # its query dim, of size 1
        if not statically_known_true(_val(keys).shape[-1] == s_kv):  # one flag for every key ([B, 1, 1, 1])
            keys = call(aten.expand.default, keys, [-1] * (_val(keys).dim() - 1) + [kv_size])
        if not rule.causal:
            empty = call(aten.logical_not.default, call(aten.any.dim, keys, -1, True))  # [..., 1, 1]
        else:
            # Row i's last key is S_kv - S + i: it sees a key when one of the keys up to there (in
            # the window's last w) is kept, a running count of kept keys that grows past there.
            counts = call(aten.cumsum.default, keys, -1, dtype=torch.int32)
            first: Any = s_kv - s  # row 0's last key
            if isinstance(first, torch.SymInt) and first.node.maybe_as_int() is not None:
                first = first.node.maybe_as_int()  # (S_kv - S with S_kv = S: no node)
            if not isinstance(first, int):
                first = graph.call_function(operator.sub, (kv_size, size_value(graph, q, 2)))
                first.meta["val"] = s_kv - s
            seen = call(aten.slice.Tensor, counts, -1, first)  # [..., 1, S]: kept keys up to each row's last
            if rule.sliding_window is not None:  # less those before its window: the count w keys back
                before = call(aten.constant_pad_nd.default, counts, [rule.sliding_window, 0], 0)
                seen = call(aten.sub.Tensor, seen, call(aten.slice.Tensor, before, -1, first, kv_size))
            empty = call(aten.transpose.int, call(aten.eq.Scalar, seen, 0), -1, -2)
        copy_source_meta(rule.key_mask, empty)
        self._made[key] = empty
        return empty

    def _rule_bias(self, graph: fx.Graph, rule: MaskRule, at: fx.Node) -> Any:
        """The bias a call under `rule` reads: its key mask, as the bool it is (each call converts
        its S_kv values a batch row; under the rule a float32 bias would make the runtime judge its
        hidden keys over [S, S_kv]), or no mask; with the rule's `key_bias`, that bias with the key
        mask's hidden keys at -inf (made before `at`)."""
        if rule.key_bias is not None:
            return self._joined_mask(graph, rule.key_mask, rule.key_bias, at)
        return rule.key_mask

    def _key_mask_inputs(self, graph: fx.Graph, rule: MaskRule, kv_len: Any, result: PassResult,
                         at: fx.Node) -> tuple[Any, Any]:
        """The bias (`_rule_bias`) and ranges a call under `rule` reads: the ranges of its bool
        key mask; none for a key bias, whose ranges each call judges from it (`[B, H, 1, S_kv]`:
        no copy over the rows)."""
        bias = self._rule_bias(graph, rule, at)
        if bias is None or rule.key_bias is not None:
            return bias, None
        return bias, self._mask_ranges(graph, bias, kv_len, result)

    def _mask_ranges(self, graph: fx.Graph, mask: Any, kv_len: Any, result: PassResult) -> fx.Node | None:
        """The `attention_mask_ranges` node of `mask`, made once per mask right after it, so
        every layer sharing the mask shares its ranges; None when there is no mask node or its
        key dim is not the whole key length (a mask broadcast over keys: ranges per call)."""
        if not isinstance(mask, fx.Node):
            return None
        mask = _bool_source(mask)
        mv = _val(mask)
        if not (isinstance(mv, torch.Tensor) and 1 <= mv.dim() <= 4 and statically_known_true(mv.shape[-1] == kv_len)):
            return None
        if mask not in self._ranges:
            with graph.inserting_after(mask):
                node = graph.call_function(torch.ops.tileflow.attention_mask_ranges.default, (mask,))
            infer_meta(node)
            copy_source_meta(mask, node)
            self._ranges[mask] = node
        return self._ranges[mask]

    def _float32_bias(self, graph: fx.Graph, mask: Any) -> Any:
        """What the attention reads of `mask`: for a bool mask, or a `where(keep, 0, -inf)` of
        one in any float dtype (SDPA's CUDA decomposition makes one per layer), the float32
        additive bias the kernels take, `where(keep, 0., -inf)`, made once per bool mask right
        after it: every layer sharing the mask reads it, where each layer's call converted the
        mask again (a pass writing 4 x S x S_kv bytes). Other masks as they are: a float32 one
        is read as it is, and a half-precision one holding its dtype's lowest value keeps that
        dtype, which the padding analysis of `cuda_graphs` judges its hidden keys by (cast once
        per call, as before)."""
        if not isinstance(mask, fx.Node):
            return mask
        source = _bool_source(mask)
        sv = _val(source)
        if not (isinstance(sv, torch.Tensor) and sv.dtype == torch.bool):
            return mask
        key = ("float32 bias", source)
        if key not in self._made:
            # A mask expanded over dims (transformers' `sdpa_mask` ends in an expand to the batch
            # size; models expand masks over heads) is converted on the values it expands and
            # expanded as it was: a `where` of the expanded view would copy them once per batch
            # row and head, 4 bytes an element, kept alive across every layer.
            base, sizes = (source.args[0], source.args[1]) if source.target is aten.expand.default else (source, None)
            if _broadcast_in_place(_val(base)):
                # Stride 0 that no node of the graph makes (a graph input passed expanded): the
                # bool mask itself, whose distinct values each call converts (`additive_bias`),
                # where a `where` of it would copy the repeated ones.
                return source
            with graph.inserting_after(source):
                bias = graph.call_function(aten.where.Scalar, (base, 0.0, float("-inf")))
            infer_meta(bias)
            copy_source_meta(source, bias)
            if sizes is not None:
                with graph.inserting_after(bias):
                    bias = graph.call_function(aten.expand.default, (bias, sizes))
                infer_meta(bias)
                copy_source_meta(source, bias)
            self._made[key] = bias
        return self._made[key]

    # -- the manual form ------------------------------------------------------------------------
    def _rewrite_manual(self, graph: fx.Graph, softmax: fx.Node, ctx: PassContext, result: PassResult) -> str | None:
        """`view(bmm(view(softmax(scale * view(bmm(q, k^T)) + mask)), v))` -> meta_attention: the
        scores walked back from the softmax to q @ k^T (`_manual_scores`), the operands read
        around the two products (`_manual_operands`), then the replacement, if the kernel takes
        them (`_replace_manual`)."""
        # A softmax that is not the P of a P @ V product (a MoE router's, say) is not attention;
        # one that is, but whose scores are not matched below, is reported with what they are.
        attention = _feeds_pv_product(softmax)
        if attention and _drops_out(softmax):
            # Training-mode dropout on P (hand-written, or SDPA with dropout_p > 0, which CPU
            # dispatch decomposes into this form): named here, before the scores' form is judged.
            return _DROPOUT_REASON
        rank = max(_val(softmax).dim(), 1)  # (a 0-d softmax's dim is 0 or -1)
        if softmax.args[1] % rank != rank - 1:  # (dim 2 is the keys of flattened [B * H, S, S_kv] scores)
            return "the softmax is not over the keys (the last dimension)" if attention else None
        scores = self._manual_scores(graph, softmax, attention)
        if not isinstance(scores, _ManualScores):
            return scores
        operands = _manual_operands(softmax, scores)
        if isinstance(operands, str):
            return operands
        return self._replace_manual(graph, softmax, scores, operands, ctx, result)

    def _manual_scores(self, graph: fx.Graph, softmax: fx.Node, attention: bool) -> _ManualScores | str | None:
        """What lies between a manual attention's softmax and its q @ k^T product, or why it is
        not matched (None: the softmax is no attention's, nothing to report)."""
        def unmatched() -> str | None:  # (walks the graph: only when a match fails)
            return _unmatched_scores(softmax) if attention else None

        # Walk back from the softmax input: [a float cast] <- [masks and an ALiBi bias, added or
        # filled in, any order] <- [cap * tanh(. / cap)] <- [mul/div scale] <- view <- bmm(q, k^T)
        # (or baddbmm, an ALiBi bias inside the product). The cast is transformers' eager
        # `softmax(scores, dtype=float32)` of bf16/fp16 scores (on CUDA, fp16 ones become
        # `_softmax(scores, half_to_float=True)` instead): the kernel's softmax is float32 anyway,
        # over scores it keeps in float32 rather than rounding them to the input dtype first.
        scores_in = softmax.args[0]
        uncast = _float_cast_source(scores_in)
        # Only a cast up (exact): a softmax the model runs in a narrower dtype than its scores
        # (`softmax(scores, dtype=bfloat16)` of float32 scores) rounds them, which the kernel's
        # float32 softmax would not (off by about 5e-3 in bfloat16).
        if uncast is not None and len(scores_in.users) == 1 and (
                _val(uncast).dtype == _val(scores_in).dtype or _val(uncast).dtype.itemsize < _val(scores_in).dtype.itemsize):
            scores_in = uncast
        cur, mask, scale_mul, scale_div, alibi, product_scale = scores_in, None, None, None, None, 1.0
        product_bias, bounded = None, False
        sinks, cur = _sink_join(cur)
        # Without a sink the row-max subtraction `_sink_join` looked through reads the scores
        # twice (MiMo-V2-Flash's layers without sinks): the row max is no other use of them.
        skip = set() if sinks is not None or cur is scores_in else set(scores_in.all_input_nodes[1:])
        skip |= {n.args[0] for n in skip if _is_op(n, operator.getitem)}
        gate = _sink_gate(cur) if sinks is None and cur is scores_in else None
        if gate is not None:  # the gate's logsumexp is its other reader
            sinks = gate.sinks
            skip.add(gate.lse)

        def single_use(n: fx.Node) -> bool:
            return len([u for u in n.users if u not in skip]) == 1

        # XGLM masks its scores as [B, H, S, S_kv] between two views of the product's [B*H, S,
        # S_kv]: the masks below the second view are in the kernel's layout.
        if isinstance(cur, fx.Node) and single_use(cur) and _merges_heads(cur) and _scores_product(cur.args[0]) is None:
            cur = cur.args[0]
        # Scores that stay flattened as the product's [B * H, S, S_kv] up to the softmax (OPT's,
        # BART's and Whisper's older eager code, hand-written models): no view of them names the
        # heads; q's view does (`_manual_operands`), checked against the scores' shape in
        # `_replace_manual`. ALiBi is not looked for: its slopes are read per head of a 4-D view.
        flat = isinstance(_val(cur), torch.Tensor) and _val(cur).dim() == 3
        clamped: float | None = None  # the value a clamp of the masked scores holds them at
        replaced = False  # whether a fill or clamp sets scores (that a bias inside the product is in)
        # The keys a fill with a finite lowest value outside the walk so far sets (bool, True =
        # set): eager's fill overwrites what a mask inside it put there (-inf, or another lowest
        # value), where the kernel's joined mask adds the two (to -inf): in a row that sees no
        # key, eager averages every key and the kernel only some. Inner masks are cut there.
        overwritten: fx.Node | None = None
        # ALiBi's bias is `slope * (j - p)` in the kernel and `slope * j` (or another shift) in the
        # models: the same softmax, unless a sink joins it without the shift. With a sink the bias
        # is an additive mask (exact).
        find_alibi = sinks is None and not flat
        while single_use(cur):
            if _is_op(cur, aten.add.Tensor) and cur.kwargs.get("alpha", 1) == 1:
                scores_side = [a for a in cur.args if _path_to_product(a, depth=7) is not None]
                if len(scores_side) != 1:
                    return unmatched()
                term = cur.args[1] if cur.args[0] is scores_side[0] else cur.args[0]
                sv = _val(scores_side[0])
                if not (isinstance(sv, torch.Tensor) and same_shape(_val(cur).shape, sv.shape)):
                    # The term widens the scores (a mask with an extra leading dim): the kernel
                    # takes an SDPA mask that broadcasts to the scores' [B, H, S, S_kv].
                    return (f"a tensor of shape {list(_val(term).shape) if isinstance(_val(term), torch.Tensor) else term} "
                            f"added to the scores widens them to {list(_val(cur).shape)}")
                slopes = self._alibi_slopes(term, cur) if alibi is None and find_alibi else None
                if slopes is not None:
                    alibi = slopes
                else:
                    tv = _val(term)
                    if not isinstance(tv, torch.Tensor):
                        # A number (or a size) added to every score: no mask for the kernel to
                        # read (taken for one, it crashed the pass and undid every rewrite in it).
                        return (f"a number ({term if not isinstance(term, fx.Node) else term.name}) is added to the "
                                "scores; meta_attention adds tensor biases")
                    if not tv.dtype.is_floating_point:
                        # Added, a bool counts 1.0 where True (it is no mask) and an integer
                        # bias promotes the scores: the kernel reads float biases only.
                        return (f"a tensor of {str(tv.dtype).replace('torch.', '')} is added to the scores; meta_attention "
                                "adds float biases (a bool mask hides keys through masked_fill or where)")
                    mask = self._joined_mask(graph, mask, self._not_where(graph, term, overwritten, softmax), softmax)
                cur = scores_side[0]
            elif (filled := _filled_with_low_value(cur)) is not None:
                cur, hide_mask = filled[0], self._fill_mask(graph, *filled[1:])
                mask = self._joined_mask(graph, mask, self._not_where(graph, hide_mask, overwritten, softmax), softmax)
                replaced = True
                if filled[3] != float("-inf"):
                    overwritten = self._filled_keys(graph, overwritten, *filled[1:3], softmax)
            elif mask is None and clamped is None and (below := _clamped_at_lowest(cur)) is not None:
                # `max(scores + mask, finfo.min)` (XGLM): the masks below it hide keys with the
                # lowest value, not -inf (a row that sees nothing averages its keys).
                cur, clamped = below
                replaced = True
            else:
                break
        if clamped is not None and mask is not None:
            mask = self._lowest_for_hidden(graph, mask, clamped)
        softcap, cur = _soft_cap(cur, skip)
        if (_is_op(cur, aten.mul.Tensor) or _is_op(cur, aten.div.Tensor)) and single_use(cur):
            factor = cur.args[1]
            if isinstance(factor, fx.Node) and not (isinstance(_val(factor), torch.Tensor) and _val(factor).dim() == 0):
                return "the score scale is not a number or a 0-d tensor"
            scale_mul, scale_div = (factor, None) if cur.target is aten.mul.Tensor else (None, factor)
            cur = cur.args[0]
        if flat:
            product = _scores_product(cur)
        else:
            product = _scores_product(cur.args[0]) if isinstance(cur, fx.Node) and cur.target in _VIEWS else None
        if product is None:
            return unmatched()
        qk = product["node"]
        beta = product.get("beta", 1)
        if "self" in product and isinstance(product["alpha"], (int, float)) and (
                _zero_fill(product["self"]) or (isinstance(beta, (int, float)) and beta == 0)):
            # `baddbmm(zeros, q, k^T, alpha=scale)` (GPT-NeoX-Japanese): no bias, a scale; so is
            # `baddbmm(empty, q, k^T, beta=0, alpha=scale)` (GPT-2's reorder_and_upcast_attn,
            # ImageGPT, Decision Transformer): beta=0 ignores the bias, NaN and inf included.
            product_scale = float(product.pop("alpha"))
            del product["self"]
        if "self" in product:  # beta * bias + alpha * q @ k^T
            slopes = self._alibi_slopes(product["self"], qk, view=cur) if alibi is None and find_alibi else None
            # The bias is inside what a cap or a scale after the product acts on: a numeric
            # scale scales the slopes (or the bias) too; a cap (not linear) or a tensor scale is
            # not matched.
            outer = 1.0
            for factor, op in ((scale_mul, "mul"), (scale_div, "div")):
                value = _constant(factor) if factor is not None else 1.0
                outer = None if value is None or outer is None else outer * (value if op == "mul" else 1.0 / value)
            if softcap is not None or outer is None or not all(
                    isinstance(product[c], (int, float)) for c in ("alpha", "beta")):
                return unmatched()
            if slopes is not None:
                alibi = [float(product["beta"]) * outer * x for x in slopes]
            else:
                # Any other bias (BLOOM's ALiBi counted along a padding mask, the same for every
                # query row): the kernel adds it, as the [B, H, 1, S_kv] bias it is.
                factor = float(product["beta"]) * outer
                bounded = holds_no_lowest_value(product["self"], factor)
                if replaced and not bounded:
                    # A fill sets a hidden key's score to the lowest value whatever the bias
                    # held; added to the mask, a bias at -inf or the lowest value there would
                    # make it -inf (another row average in eager's padding rows): not taken.
                    return unmatched()
                heads_of = _unflatten_heads(product["batch1"]) if flat else cur  # a [B, H, ...] view
                if heads_of is None:
                    return unmatched()
                product_bias = self._product_bias(graph, product["self"], qk, _val(heads_of).shape[1], factor, softmax)
                if product_bias is None:
                    return unmatched()
            product_scale = float(product["alpha"])
        return _ManualScores(cur, product, mask, scale_mul, scale_div, product_scale, softcap, sinks, gate, alibi,
                             product_bias, bounded, flat)

    def _replace_manual(self, graph: fx.Graph, softmax: fx.Node, scores: _ManualScores, operands: _ManualOperands,
                        ctx: PassContext, result: PassResult) -> str | None:
        """Replace a matched manual attention by `meta_attention`, or say what the kernel does not
        take (dtypes, shapes, heads)."""
        q, k, v, out4 = operands.q, operands.k, operands.v, operands.out
        sinks, gate, softcap = scores.sinks, scores.gate, scores.softcap
        qv, kv, vv = _val(q), _val(k), _val(v)
        if not (qv.dtype == kv.dtype == vv.dtype) or qv.dtype not in _DTYPES.get(ctx.target, _DTYPES["reference"]):
            return f"dtypes q={qv.dtype}, k={kv.dtype}, v={vv.dtype} are not supported by the {ctx.target} meta-attention kernel"
        if not statically_known_true(vv.shape[2] == kv.shape[2]):
            # V flattened from another layout (say [B, S, H, D]) that lines up with K's only at
            # some lengths: the kernel raised at run time on its other head count.
            return f"V is viewed as {list(vv.shape)}, not [B, H, S_kv, D] with K's {kv.shape[2]} keys"
        if not statically_known_true(kv.shape[3] == qv.shape[3]):
            return "q and k head dims differ"
        if not (statically_known_true(kv.shape[0] == qv.shape[0]) and statically_known_true(vv.shape[0] == qv.shape[0])):
            # The bmm pairs q, k and v by their flattened batch * heads index; the kernel pairs
            # them by batch (and query head h with KV head h // R). Only with one batch size
            # are those the same pairs (k broadcast over the batch by a 3-D expand, or K/V with
            # another batch/head split: it raised on a missing block, or read other heads).
            return (f"q, k and v are flattened from batches of {qv.shape[0]}, {kv.shape[0]} and {vv.shape[0]}; "
                    "meta_attention pairs them by batch")
        reason = _pin_head_dims(ctx, (qv.shape[1], qv.shape[3], kv.shape[1], vv.shape[1], vv.shape[3]), (qv, kv, vv),
                                self._token_symbols)
        if reason:
            return reason
        hq = int(qv.shape[1])
        heads = _kv_heads(hq, k, v)
        if isinstance(heads, str):
            return heads
        k_real, v_real, hkv = heads
        if sinks is not None and _val(sinks).numel() != hq:  # (any shape: reshaped to [hq] below)
            return f"the attention sinks hold {_val(sinks).numel()} logits for {hq} query heads"
        if scores.flat:
            # q's view names B and H; scores of q's B * H rows, S queries and K's keys are the
            # products of q's flat index b * H + h (another grouping gives another shape).
            want_scores = (qv.shape[0] * hq, qv.shape[2], kv.shape[2])
            if not same_shape(_val(scores.scores).shape, want_scores):
                return (f"the flattened scores are {list(_val(scores.scores).shape)}, not [B * H, S_q, S_kv] = "
                        f"{list(want_scores)} of q's [B, H, S, D] view")
        else:
            want_scores = (qv.shape[0], hq, qv.shape[2], kv.shape[2])
            if not same_shape(_val(scores.scores).shape, want_scores):
                return f"the scores are viewed as {list(_val(scores.scores).shape)}, not [B, H, S_q, S_kv] = {list(want_scores)}"
        want_out = (qv.shape[0], hq, qv.shape[2], vv.shape[3])
        if not same_shape(_val(out4).shape, want_out):
            return f"P @ V is restored to {list(_val(out4).shape)}, not [B, H, S, D] = {list(want_out)}"
        if gate is not None and (gate.out is not out4 or _val(gate.mul).dtype != _val(out4).dtype
                                 or not same_shape(_val(gate.mul).shape, want_out)):
            return "the sink gate sigmoid(logsumexp(scores) - sinks) scales another tensor than the P @ V output"
        mask = scores.mask
        if scores.flat:
            mask = self._heads_unflattened(graph, mask, hq, _val(scores.scores).shape[0])
            if isinstance(mask, str):
                return mask
        scale: float | None = operands.q_factor * operands.k_factor * scores.product_scale
        rule = self._mask_rule(mask, qv.shape[2], kv.shape[2])
        if scores.product_bias is not None and not scores.product_bias_bounded:
            # Under the rule, a row whose every visible key the bias hid with a lowest value would
            # average those keys, where eager's mask gives every key that value and averages them
            # all: only a bias that provably holds no such value takes the rule.
            rule = None
        positional = _positional(rule, scores.alibi is not None)
        if positional and not statically_known_true(qv.shape[2] <= kv.shape[2]):
            return _more_queries_than_keys(qv.shape[2], kv.shape[2], positional)
        if rule is not None and scores.product_bias is None:
            # the kernel applies the rule itself: a bias and ranges only for a key mask
            bias, ranges = self._key_mask_inputs(graph, rule, kv.shape[2], result, softmax)
        elif rule is not None:
            # The key mask's hidden keys at -inf in the product's bias, whose ranges the call
            # judges itself (BLOOM's, [B, H, 1, S_kv], with no copy over the rows).
            bias = self._joined_mask(graph, self._rule_bias(graph, rule, softmax), scores.product_bias, softmax)
            ranges = None
        else:
            bias = self._joined_mask(graph, self._float32_bias(graph, mask), scores.product_bias, softmax)
            ranges = self._mask_ranges(graph, mask if scores.product_bias is None else bias, kv.shape[2], result)
        causal, window = (rule.causal, rule.sliding_window) if rule is not None else (False, None)
        with graph.inserting_before(out4):
            q_in = q
            # A scale that is a 0-d tensor (e.g. a buffer) is applied to q instead: same product.
            for factor, op in ((scores.scale_mul, aten.mul.Tensor), (scores.scale_div, aten.div.Tensor)):
                if isinstance(factor, fx.Node):
                    q_in = graph.call_function(op, (q_in, factor))
                    infer_meta(q_in)
                elif factor is not None:
                    scale *= float(factor) if op is aten.mul.Tensor else 1.0 / float(factor)
            if softcap is not None and not isinstance(softcap, fx.Node):
                softcap = graph.call_function(aten.scalar_tensor.default, (float(softcap),), {"dtype": torch.float32})
                infer_meta(softcap)
            elif isinstance(softcap, fx.Node):
                # A cap held in a 0-d tensor is known only at run time, where the kernel takes a
                # cap > 0: cap * tanh(x / cap) is even in cap, so its magnitude is the same cap.
                softcap = graph.call_function(aten.abs.default, (softcap,))
                infer_meta(softcap)
            if sinks is not None and _val(sinks).dim() != 1:  # the [1, H, 1, 1] logits models broadcast, as [H]
                sinks = graph.call_function(aten.reshape.default, (sinks, [hq]))
                infer_meta(sinks)
            # (softcap, sliding_window, sinks, alibi_slopes), the trailing unset ones left out.
            extra = [softcap, window, sinks, scores.alibi]
            while extra and extra[-1] is None:
                extra.pop()
            unrepeated = k_real is not k  # before the padding makes k_real another node
            q_in, k_real, v_real = _one_head_size(graph, q_in, k_real, v_real)
            new = graph.call_function(
                torch.ops.tileflow.meta_attention.default,
                (q_in, k_real, v_real, bias, causal, scale, ctx.target, ranges, *extra),
            )
            infer_meta(new)
            # (With sinks, eager's row of equal lowest scores gives its weight to the sink: 0, as
            # the kernel's row that sees no key.)
            filled = new if sinks is not None else self._empty_rows_averaged(graph, new, rule, q_in, k_real, v_real)
            out = _as_replaced(graph, filled, int(vv.shape[3]), [gate.mul if gate is not None else out4])
        if _val(new).dtype != _val(out4).dtype:
            return "the manual attention changes dtype between its inputs and output"
        copy_source_meta(softmax, new)
        new.meta["tileflow"] = {"kind": "meta_attention", "form": "manual", "gqa": hq // hkv, "target": ctx.target,
                                "softcap": softcap is not None, "sinks": sinks is not None,
                                "alibi": scores.alibi is not None, "product_bias": scores.product_bias is not None}
        _record_rule(new, result, rule, averaged=filled is not new)
        (gate.mul if gate is not None else out4).replace_all_uses_with(out)
        result.count("meta_attention")
        result.count("manual_attention")
        if int(vv.shape[3]) != int(qv.shape[3]):
            result.count("head_size_padded")
        if unrepeated:
            result.count("gqa_unrepeated")
        if softcap is not None:
            result.count("logit_softcap")
        if sinks is not None:
            result.count("attention_sinks")
        if scores.alibi is not None:
            result.count("alibi")
        if scores.product_bias is not None:
            result.count("product_bias")
        return None

    def _product_bias(self, graph: fx.Graph, bias: Any, product: fx.Node, heads: Any, factor: float,
                      at: fx.Node) -> fx.Node | None:
        """`factor * bias`, the bias inside a `baddbmm` product of [B * H, S, S_kv] scores over
        `heads` heads (H, as a view of the scores or of q names it), as the float32 bias the
        kernel adds, [B | 1, H | 1, S | 1, S_kv] (BLOOM's ALiBi along a padding mask:
        [B, H, 1, S_kv]); None when it is not a float
        tensor that covers the keys and broadcasts to the product as the baddbmm broadcasts it.
        Made before `at`, once per bias and factor (the layers of a model share one)."""
        bv, pv = _val(bias), _val(product)
        if not (isinstance(bias, fx.Node) and isinstance(bv, torch.Tensor) and bv.is_floating_point()
                and 1 <= bv.dim() <= 3 and statically_known_true(bv.shape[-1] == pv.shape[2])):
            return None
        rows = bv.shape[-2] if bv.dim() >= 2 else 1
        batch = bv.shape[0] if bv.dim() == 3 else 1
        if not ((statically_known_true(rows == 1) or statically_known_true(rows == pv.shape[1]))
                and (statically_known_true(batch == 1) or statically_known_true(batch == pv.shape[0]))):
            return None
        key = ("product bias", bias, factor)
        if key not in self._made:
            # The product's batch is b * H + h: a bias over it unflattens to [B, H, ...].
            heads = int(heads) if not statically_known_true(batch == 1) else 1
            with graph.inserting_before(at):
                term = bias
                for _ in range(3 - bv.dim()):
                    term = graph.call_function(aten.unsqueeze.default, (term, 0))
                    infer_meta(term)
                term = graph.call_function(aten.unflatten.int, (term, 0, [-1, heads]))
                infer_meta(term)
                term = graph.call_function(aten._to_copy.default, (term,), {"dtype": torch.float32})
                infer_meta(term)
                if factor != 1.0:
                    term = graph.call_function(aten.mul.Tensor, (term, factor))
                    infer_meta(term)
            copy_source_meta(bias, term)
            self._made[key] = term
        return self._made[key]

    def _heads_unflattened(self, graph: fx.Graph, mask: Any, heads: int, rows: Any) -> Any:
        """`mask`, which broadcasts to flattened [B * H, S, S_kv] scores of `rows` = B * H rows, as
        the mask that broadcasts to the kernel's [B, H, S, S_kv] the same way: as it is when it
        has no row dim or one of 1 (a causal [S, S] or [1, S, S]: right-aligned, it broadcasts
        alike), else [B * H, ...] unflattened to [B, H, ...] (row b * H + h is batch b, head h, as
        q's flattening made it; read as it is, its rows would be taken for heads). Made right
        after the mask, once (the layers of a model share it). A reason when its rows are not
        known to be 1 or B * H."""
        mv = _val(mask)
        if not isinstance(mv, torch.Tensor) or mv.dim() < 3 or statically_known_true(mv.shape[0] == 1):
            return mask
        if not statically_known_true(mv.shape[0] == rows):
            return f"a mask of shape {list(mv.shape)} over the flattened scores' {rows} rows is not known to be per row or shared"
        key = ("heads", mask, heads)
        if key not in self._made:
            with graph.inserting_after(mask):
                self._made[key] = graph.call_function(aten.unflatten.int, (mask, 0, [-1, heads]))
            infer_meta(self._made[key])
            copy_source_meta(mask, self._made[key])
        return self._made[key]

    def _alibi_slopes(self, term: Any, over: fx.Node, view: fx.Node | None = None) -> list[float] | None:
        """`_alibi_slopes`, once per bias and score shape (the layers of a model share both)."""
        key = (term, *(tuple(size_hint(d) for d in _val(n).shape) for n in (over, view) if n is not None))
        if key not in self._slopes:
            self._slopes[key] = _alibi_slopes(term, over, view)
        return self._slopes[key]

    def _joined_mask(self, graph: fx.Graph, mask: Any, more: Any, at: fx.Node) -> Any:
        """The mask that hides what `mask` and `more` hide and adds what they add (either may be
        None), made before `at`: one node per pair, shared by the later layers that apply the
        same two masks (GPT-Neo's causal fill and padding mask, say)."""
        if mask is None or more is None:
            return more if mask is None else mask
        key = ("joined", mask, more)
        if key not in self._made:
            with graph.inserting_before(at):
                if _val(mask).dtype == _val(more).dtype == torch.bool:
                    joined = graph.call_function(aten.logical_and.default, (mask, more))
                else:
                    parts = []
                    for m in (mask, more):
                        if _val(m).dtype == torch.bool:  # True = seen: 0, else -inf
                            m = graph.call_function(aten.where.Scalar, (m, 0.0, float("-inf")))
                            infer_meta(m)
                        parts.append(m)
                    joined = graph.call_function(aten.add.Tensor, tuple(parts))
            infer_meta(joined)
            self._made[key] = joined
        return self._made[key]

    def _filled_keys(self, graph: fx.Graph, outer: fx.Node | None, mask: fx.Node, hides: bool, at: fx.Node) -> fx.Node:
        """bool: True where a fill by `mask` (`hides`: True where it fills) or the fills `outer`
        (None: none) set the scores, made before `at`."""
        filled = mask
        with graph.inserting_before(at):
            if not hides:
                filled = graph.call_function(aten.logical_not.default, (mask,))
                infer_meta(filled)
            if outer is not None:
                filled = graph.call_function(aten.logical_or.default, (outer, filled))
                infer_meta(filled)
        return filled

    def _not_where(self, graph: fx.Graph, term: Any, overwritten: fx.Node | None, at: fx.Node) -> Any:
        """`term`, a mask applied inside fills that set the scores where `overwritten` holds
        (None: no such fill), with no effect there: a bool keep-mask keeps those keys, an
        additive mask adds 0 (the fill outside sets them to its lowest value whatever they held)."""
        if overwritten is None:
            return term
        with graph.inserting_before(at):
            if _val(term).dtype == torch.bool:
                cut = graph.call_function(aten.logical_or.default, (term, overwritten))
            else:
                cut = graph.call_function(aten.where.ScalarSelf, (overwritten, 0.0, term))
        infer_meta(cut)
        return cut

    def _lowest_for_hidden(self, graph: fx.Graph, mask: fx.Node, clamp: float) -> fx.Node:
        """The additive float32 mask that is `mask` with the keys it hides (at or below `clamp`,
        the scores dtype's lowest value: -inf, or that value) at float32's lowest: what
        `max(scores + mask, clamp)` applies (keys a row sees are far above it). One node per mask."""
        key = ("lowest", mask, clamp)
        if key not in self._made:
            low = torch.finfo(torch.float32).min
            if _val(mask).dtype == torch.bool:
                with graph.inserting_after(mask):
                    made = graph.call_function(aten.where.Scalar, (mask, 0.0, low))
            else:
                with graph.inserting_after(mask):
                    as_float = graph.call_function(torch.ops.prims.convert_element_type.default, (mask, torch.float32))
                infer_meta(as_float)
                if clamp == low:  # float32 scores: a clamp of the mask is the same (and padding safety reads it)
                    with graph.inserting_after(as_float):
                        made = graph.call_function(aten.clamp_min.default, (as_float, low))
                else:  # each insert goes right after its anchor: one anchor per node keeps their order
                    with graph.inserting_after(as_float):
                        hidden = graph.call_function(aten.le.Scalar, (as_float, clamp))
                    infer_meta(hidden)
                    with graph.inserting_after(hidden):
                        made = graph.call_function(aten.where.ScalarSelf, (hidden, low, as_float))
            infer_meta(made)
            self._made[key] = made
        return self._made[key]

    def _fill_mask(self, graph: fx.Graph, mask: fx.Node, hides: bool, fill: float) -> fx.Node:
        """The mask that a fill of the scores with `fill` where `mask` is True (`hides`) or False
        applies: a bool keep-mask for -inf (the kernel hides those keys), else the additive
        `fill`-or-0 mask (a fill of finfo.min: eager attention averages the keys of a row that
        sees nothing above it, and so does the kernel with it as a bias; a mask inside the fill
        that hides such a key too is cut there by the caller, `_not_where`: added, the two made
        -inf where eager's fill leaves finfo.min). One node per form."""
        if fill == float("-inf"):
            if not hides:
                return mask
            keep = _negation_source(mask)
            if keep is not None:
                return keep
        key = ("fill", mask, hides, fill)
        if key not in self._made:
            with graph.inserting_after(mask):
                if fill == float("-inf"):
                    self._made[key] = graph.call_function(aten.logical_not.default, (mask,))
                else:  # the fill is a dtype's lowest value: float32's hides as well, and the
                    # mask ranges of a float32 mask skip it (fp16's -65504 would count as seen)
                    low = torch.finfo(torch.float32).min
                    hidden, shown = (low, 0.0) if hides else (0.0, low)
                    self._made[key] = graph.call_function(aten.where.Scalar, (mask, hidden, shown))
            infer_meta(self._made[key])
        return self._made[key]


_SOFTMAX = {aten._softmax.default, aten._safe_softmax.default}


def _rule_text(rule: MaskRule) -> str:
    """How the report names the rule a mask was proven to be."""
    window = f"sliding window {rule.sliding_window}" if rule.sliding_window is not None else ""
    keys = "key mask" if rule.key_mask is not None else ""
    bias = "key bias" if rule.key_bias is not None else ""
    return " + ".join(part for part in ("causal" if rule.causal else "", window, keys, bias) if part) or "no mask (all True)"


def _record_rule(call: fx.Node, result: PassResult, rule: MaskRule | None, averaged: bool) -> None:
    """What a `meta_attention` call whose mask was proven `rule` (None: not proven) notes in its
    meta and the report counts: `mask_as_rule`, `key_mask` when the call still reads a mask over
    the keys (transformers' padding term), and `empty_rows_average` when its rows that see no key
    were `averaged` after it."""
    if rule is None:
        return
    notes = call.meta.setdefault("tileflow", {})
    notes["mask_rule"] = _rule_text(rule)
    result.count("mask_as_rule")
    if rule.key_mask is not None:
        result.count("key_mask")
    if rule.key_bias is not None:
        result.count("key_bias")
    if averaged:
        notes["empty_rows"] = "average V"
        result.count("empty_rows_average")


def _constant(arg: Any) -> float | None:
    """The value of a number, or of a one-element tensor the graph holds as a constant (say a
    `scalar_tensor`, or the attribute `torch.tensor(finfo.min)` becomes); None for anything else."""
    return constant_number(arg)


def _broadcast_in_place(value: Any) -> bool:
    """Whether a traced tensor repeats its elements along a dim of size > 1 (stride 0)."""
    return isinstance(value, torch.Tensor) and any(
        statically_known_true(stride == 0) and not statically_known_true(size <= 1)
        for size, stride in zip(value.shape, value.stride()))


def _bool_source(mask: fx.Node) -> fx.Node:
    """The bool mask an additive mask was made from by `where(keep, 0, -inf)`, or by
    `where(~keep, -inf, 0)` as SDPA converts a bool mask (its ranges are the same), so layers
    that each convert one shared bool mask share one ranges node and one bias."""
    if mask.target in (aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar):
        keep, yes, no = mask.args[:3]
        if (_constant(yes), _constant(no)) == (float("-inf"), 0.0) and isinstance(keep, fx.Node) and (
                _negation_source(keep) is not None):
            keep, yes, no = _negation_source(keep), no, yes
        kv = _val(keep)
        if (isinstance(keep, fx.Node) and isinstance(kv, torch.Tensor) and kv.dtype == torch.bool
                and same_shape(kv.shape, _val(mask).shape) and _constant(yes) == 0.0 and _constant(no) == float("-inf")):
            return keep
    return mask


_PRODUCTS = (aten.bmm.default, aten.baddbmm.default)
# What may sit between a softmax and the P @ V product it feeds: casts, views, copies, dropout.
_PASS_THROUGH = {
    *_VIEWS, torch.ops.prims.convert_element_type.default, aten._to_copy.default, aten.clone.default,
    aten.expand.default, aten.native_dropout.default, aten.dropout.default, operator.getitem,
    aten.slice.Tensor,  # an attention sink's column dropped
}


# Layout moves an einsum's product puts around P (unsqueezes and permutes of size-1 dims): they
# make a softmax attention too, reported rather than left alone without a word.
_LAYOUT_MOVES = {aten.permute.default, aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims}


_DROPOUT_REASON = "dropout is not supported by meta_attention (inference only)"
_DROPOUTS = (aten.native_dropout.default, aten.dropout.default)


def _drops_out(softmax: fx.Node, depth: int = 8) -> bool:
    """True when a dropout that drops (p > 0, in training) sits on the way from the softmax to
    its P @ V product (through the ops `_feeds_pv_product` passes)."""
    frontier = [softmax]
    for _ in range(depth):
        users = [u for n in frontier for u in n.users]
        for u in users:
            if u.target in _DROPOUTS:
                args = bind_arguments(u)
                if args.get("train") is not False and constant_number(args.get("p")) != 0:
                    return True
        frontier = [u for u in users if u.target in _PASS_THROUGH or u.target in _LAYOUT_MOVES]
    return False


def _feeds_pv_product(softmax: fx.Node, depth: int = 8) -> bool:
    """True when the softmax's output reaches a bmm through casts, views, layout moves, copies or
    dropout: it is the P of an attention's P @ V (matched further only as the left operand)."""
    frontier = [softmax]
    for _ in range(depth):
        users = [u for n in frontier for u in n.users]
        if any(u.target is aten.bmm.default and (u.args[0] in frontier or u.args[1] in frontier) for u in users):
            return True
        frontier = [u for u in users if u.target in _PASS_THROUGH or u.target in _LAYOUT_MOVES]
    return False


def _unmatched_scores(softmax: fx.Node) -> str:
    """Why the scores of an attention's softmax are not `scale * (q @ k^T) + mask`: the ops
    between the softmax and the score product, named (and what models use them for)."""
    path = _path_to_product(softmax.args[0], depth=10)
    if path is None:
        return "the softmax feeds a P @ V product, but no q @ k^T product was found within 10 ops before it"
    names = [getattr(n.target, "_opname", str(n.target)) for n in path]
    uses = []
    if any(n.target is aten.tanh.default for n in path) and all(_soft_cap(n)[0] is None for n in path):
        uses.append("tanh on the scores, but not as the logit soft-capping cap * tanh(scores / cap)")
    if any((p := _scores_product(n)) is not None and "self" in p for n in path):
        # (`bias + bmm * alpha` is also how torch.export spells a baddbmm, and how flattened scores
        # are masked by hand: the hint names both.)
        uses.append("a bias added inside the q @ k^T product (a baddbmm, or bias + bmm * alpha) that the kernel adds only as a float "
                    "[B * H | 1, S | 1, S_kv] tensor, scaled by numbers and not soft-capped after it, and under a "
                    "fill or clamp of the scores only when it provably holds no lowest value (an integer tensor "
                    "times numbers)")
    for n in path:
        # A key hidden with a finite fill other than a dtype's lowest value (-1e9, -1e4: common in
        # hand-written attention) is still a score to the softmax; naming the fill says why the
        # masked_fill, which the kernel takes with -inf or the lowest value, is not matched.
        fill = _fill_value(n)
        if fill is not None and fill != float("-inf") and fill not in _LOWEST_VALUES:
            uses.append(f"{getattr(n.target, '_opname', str(n.target))} fills {fill:g}: the kernel hides a key "
                        "only with -inf or a dtype's lowest value (torch.finfo(dtype).min)")
            break
    # The manual match follows single-user scores only: a score tensor read by more than the
    # chain to the softmax (GraniteSWA's sinks scale the output by sigmoid(logsumexp(scores) -
    # sink)) is left for that reason, not for its ops, which the kernel may well implement.
    for consumer, n in zip([softmax, *path], path):
        others = sorted(getattr(u.target, "_opname", str(u.target)) for u in n.users if u is not consumer)
        if others:
            uses.append(f"the scores after {names[path.index(n)]} are also read by {', '.join(others)}, "
                        "and the kernel returns only the attention output")
            break
    hint = f" ({'; '.join(uses)})" if uses else ""
    return f"the meta-kernel does not implement the scores {' <- '.join(reversed(names))} before the softmax{hint}"


def _scores_product(node: Any) -> dict[str, Any] | None:
    """The q @ k^T product behind the scores: ``{"node", "batch1", "batch2"}`` for a bmm, with
    ``"self"`` (the bias), ``"beta"`` and ``"alpha"`` for a baddbmm or torch.export's
    decomposition of one, ``bias + bmm * alpha`` (BLOOM exported). Else None."""
    if _is_op(node, aten.bmm.default):
        return {"node": node, "batch1": node.args[0], "batch2": node.args[1]}
    if _is_op(node, aten.baddbmm.default):
        return {"node": node, **bind_arguments(node)}
    if not (_is_op(node, aten.add.Tensor) and node.kwargs.get("alpha", 1) == 1):
        return None
    for bias, scaled in (node.args[:2], node.args[1::-1]):
        alpha, bmm = 1.0, scaled
        if _is_op(scaled, aten.mul.Tensor) and len(scaled.users) == 1 and _constant(scaled.args[1]) is not None:
            alpha, bmm = _constant(scaled.args[1]), scaled.args[0]
        if _is_op(bmm, aten.bmm.default) and len(bmm.users) == 1:
            return {"node": node, "self": bias, "batch1": bmm.args[0], "batch2": bmm.args[1], "beta": 1.0,
                    "alpha": alpha}
    return None


def _path_to_product(node: Any, depth: int) -> list[fx.Node] | None:
    """The shortest chain of ops from `node` back to a bmm or baddbmm (both ends included)."""
    if not isinstance(node, fx.Node):
        return None
    came_from: dict[fx.Node, fx.Node | None] = {node: None}  # breadth first, each node once
    frontier = [node]
    for _ in range(depth):
        for n in frontier:
            if n.op == "call_function" and n.target in _PRODUCTS:
                path = [n]
                while came_from[path[-1]] is not None:
                    path.append(came_from[path[-1]])
                return path[::-1]
        grown = []
        for n in frontier:
            for a in n.all_input_nodes:
                if a.op == "call_function" and a not in came_from:
                    came_from[a] = n
                    grown.append(a)
        frontier = grown
    return None


# Casts (models force a sink gate to float32 and back).
_CASTS = {torch.ops.prims.convert_element_type.default, aten._to_copy.default}
# Ops that broadcast a tensor without moving its elements between dims.
_BROADCASTS = {aten.expand.default, aten.clone.default, *_CASTS}
# What a per-head sink logit goes through on its way to the scores' shape.
_SINK_BROADCASTS = {*_VIEWS, aten.unsqueeze.default, *_BROADCASTS}


def _sink_join(node: Any) -> tuple[fx.Node | None, Any]:
    """(sinks, scores) when `node` joins one logit per head to the scores as a last column,
    `cat([scores, sinks broadcast to [B, H, S, 1]], -1)`, optionally minus the row max (which a
    softmax ignores); sinks is the smallest tensor behind the broadcast with one value per head.
    Else (None, node)."""
    if _is_op(node, aten.sub.Tensor) and len(node.users) == 1:
        joined, row_max = node.args[:2]
        # Kept dims: a [B, H, S] max would broadcast along the wrong dims, no per-row constant.
        kept = _val(row_max) if isinstance(row_max, fx.Node) else None
        kept = (isinstance(kept, torch.Tensor) and isinstance(_val(joined), torch.Tensor)
                and kept.dim() == _val(joined).dim() and statically_known_true(kept.shape[-1] == 1))
        if _is_op(row_max, operator.getitem) and row_max.args[1] == 0:
            row_max = row_max.args[0]
        over_keys = kept and isinstance(row_max, fx.Node) and (
            (row_max.target is aten.max.dim and row_max.args[1] in (-1, 3))
            or (row_max.target is aten.amax.default and list(row_max.args[1]) in ([-1], [3])))
        if over_keys and row_max.args[0] is joined:  # each row's own max: the softmax ignores it
            node = joined
    if not (_is_op(node, aten.cat.default) and len(node.args[0]) == 2 and node.args[1] in (-1, 3)):
        return None, node
    scores, sink = node.args[0]
    sv = _val(sink)
    if not (isinstance(sv, torch.Tensor) and sv.dim() == 4 and statically_known_true(sv.shape[3] == 1)
            and not isinstance(sv.shape[1], torch.SymInt)):
        return None, node
    heads = int(sv.shape[1])
    source = _per_head_source(sink, heads) if _head_aligned(sink, heads, 4) else None
    return (source, scores) if source is not None else (None, node)


def _head_aligned(sink: fx.Node, heads: int, rank: int) -> bool:
    """Whether `sink`, broadcast to `rank` dims with the heads at dim 1, holds one value per head
    along dim 1: behind its expands (and copies, casts), a tensor whose shape right-aligned to
    `rank` dims is `heads` at dim 1 and 1 elsewhere. (A [H, 1, 1, 1] view expanded to [B, H, S,
    1] would vary along the batch: the same shapes when B = H.)"""
    node = sink
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _BROADCASTS:
        node = node.args[0]
    val = _val(node)
    if not isinstance(val, torch.Tensor) or val.dim() > rank:
        return False
    shape = [1] * (rank - val.dim()) + list(val.shape)
    return all(statically_known_true(d == (heads if i == 1 else 1)) for i, d in enumerate(shape))


def _per_head_source(sink: fx.Node, heads: int) -> fx.Node | None:
    """The smallest floating tensor behind `sink`'s broadcast (`_SINK_BROADCASTS`) that holds one
    value per head, or None."""
    source = sink
    while (source.op == "call_function" and source.target in _SINK_BROADCASTS
           and isinstance(source.args[0], fx.Node) and isinstance(_val(source.args[0]), torch.Tensor)
           and _val(source.args[0]).numel() == heads):
        source = source.args[0]
    if not (isinstance(_val(source), torch.Tensor) and _val(source).numel() == heads and _val(source).is_floating_point()):
        return None
    return source


@dataclass(frozen=True)
class _SinkGate:
    """GraniteSWA's sinks: `out * sigmoid(logsumexp(scores, -1) - sinks)[..., None]`, which equals
    a sink logit joining each row's softmax (out * L / (L + e^sink) for L = sum of e^scores)."""

    sinks: fx.Node  # one logit per head
    lse: fx.Node  # the scores' second reader
    mul: fx.Node  # the gated output, which the meta-attention (with sinks) replaces
    out: Any  # the P @ V output the gate multiplies


@dataclass(frozen=True)
class _ManualScores:
    """A manual attention's scores as `Attention._manual_scores` walked them back from the
    softmax: `scores` is the [B, H, S, S_kv] view of the `product` (`_scores_product`'s match,
    or the product itself where the scores stay flattened over heads, `flat`),
    scaled by `scale_mul` / `scale_div` (numbers or 0-d tensors) and `product_scale` (the
    product's own alpha), capped by `softcap` (a number or 0-d tensor), masked by `mask` (the
    masks met, joined into one), biased by ALiBi's `alibi` slopes or by `product_bias` (a bias
    inside the product that is not ALiBi's, as the float32 [B | 1, H | 1, S | 1, S_kv] the
    kernel adds; `product_bias_bounded`: it provably holds no value near a dtype's lowest, see
    `holds_no_lowest_value`), joined by `sinks` (one logit per head; `gate`: GraniteSWA's form of them)."""

    scores: fx.Node
    product: dict[str, Any]
    mask: fx.Node | None
    scale_mul: Any
    scale_div: Any
    product_scale: float
    softcap: Any
    sinks: fx.Node | None
    gate: _SinkGate | None
    alibi: list[float] | None
    product_bias: fx.Node | None = None
    product_bias_bounded: bool = False
    flat: bool = False  # `scores` is the [B * H, S, S_kv] product itself, no 4-D view of it


@dataclass(frozen=True)
class _ManualOperands:
    """q, k and v of a manual attention ([B, H, S, D] each, before any flattening of heads; q and
    k without the constant factors `q_factor` and `k_factor` models put on them), and `out`, the
    P @ V product restored to [B, H, S, D], which the meta-attention replaces."""

    q: fx.Node
    k: fx.Node
    v: fx.Node
    out: fx.Node
    q_factor: float
    k_factor: float


def _manual_operands(softmax: fx.Node, scores: _ManualScores) -> _ManualOperands | str:
    """q and k read behind a manual attention's q @ k^T, v and the output around its P @ V
    product, or why they are not [B, H, S, D] tensors used only there."""
    product = scores.product
    q_flat, kt_flat = product["batch1"], product["batch2"]
    q = _unflatten_heads(q_flat)
    if transposed_dims(kt_flat) == (1, 2):
        kt = None  # transposed after the heads were flattened (BLOOM): k itself is behind it
        k = _unflatten_heads(kt_flat.args[0])
    else:
        kt = _unflatten_heads(kt_flat)
        k = kt
    if q is None or k is None:
        if scores.flat:  # nothing else names H: B * H rows could be any split (not guessed)
            return ("q @ k^T operands are not [B, H, S, D] tensors flattened over heads, and the scores stay "
                    "flattened as [B * H, S, S_kv]: no view shows the batch and head counts")
        return "q @ k^T operands are not [B, H, S, D] tensors flattened over heads"
    # Scale factors models put on q and k instead of the scores (Falcon: each by
    # head_dim ** -0.25), and k^T broadcast over the query heads by the product (MQA).
    q, q_factor = _constant_factor(q)
    if kt is None:
        k, k_factor = _constant_factor(_head_broadcast_source(k))
    else:
        kt = _head_broadcast_source(kt)
        kt, k_factor = _constant_factor(kt)
        if _symbolic_factor(q) or _symbolic_factor(kt):
            # SDPA's math form under dynamic=True, q, k and v handed in as graph inputs: D ** -0.25.
            return ("the scores are scaled by a number of a symbolic size (a head dim traced as a symbol under "
                    "dynamic=True): mark the head dim static (torch._dynamo.mark_static(t, -1) on q, k and v) "
                    "or pass a numeric scale=")
        if not _is_transpose_last2(kt):
            return "the k operand of q @ k^T is not a [B, H, S, D] tensor transposed in its last two dimensions"
        k, k_inner = _constant_factor(kt.args[0])
        k_factor *= k_inner
    # Forward from the softmax: [cast] -> [drop the sinks' column] -> view -> bmm(p, v) -> view [B, H, S, D].
    nxt = _only_user(softmax)
    if nxt is not None and _float_cast_source(nxt) is softmax:
        nxt = _only_user(nxt)
    if scores.sinks is not None and scores.gate is None:
        if not (_is_op(nxt, aten.slice.Tensor) and nxt.args[1] in (-1, 3) and nxt.args[2] in (0, None)
                and nxt.args[3] == -1):
            return "the sinks' column is not dropped from the softmax output before P @ V"
        nxt = _only_user(nxt)
        while nxt is not None and nxt.target is aten.clone.default:
            nxt = _only_user(nxt)
    if nxt is not None and nxt.target is aten.bmm.default and _val(nxt.args[0]).dim() == 3:
        # The product reads the [B*H, S, S_kv] softmax as it is (XGLM's views of it cancel).
        nxt, pv = nxt.args[0], nxt
    elif nxt is None or nxt.target not in _VIEWS:
        return "the softmax output is used for more than the P @ V product"
    else:
        pv = _only_user(nxt)
    if pv is None or pv.target is not aten.bmm.default or pv.args[0] is not nxt:
        return "the softmax output does not feed a P @ V product"
    v = _unflatten_heads(pv.args[1])
    out4 = _only_user(pv)
    if v is None or out4 is None or out4.target not in _VIEWS or _val(out4).dim() != 4:
        return "P @ V is not over [B, H, S_kv, D] values restored to [B, H, S, D]"
    # GPT-Neo takes q @ k^T in float32, q and k cast up from v's dtype: the kernel's product
    # accumulates in float32 from q and k as they were.
    q_source, k_source = _float_cast_source(q), _float_cast_source(k)
    if q_source is not None and k_source is not None and len(q.users) == len(k.users) == 1 and all(
            _val(n).dtype == _val(v).dtype and _val(n).dtype.itemsize < _val(q).dtype.itemsize  # exact casts
            for n in (q_source, k_source)):
        q, k = q_source, k_source
    return _ManualOperands(q, k, v, out4, q_factor, k_factor)


def _sink_gate(scores: fx.Node) -> _SinkGate | None:
    """The sink gate read from `scores` (4-D [B, H, S, L]) besides the softmax, or None."""
    readers = [u for u in scores.users if _is_op(u, aten.logsumexp.default)]
    sv = _val(scores)
    if len(readers) != 1 or len(scores.users) != 2 or not (isinstance(sv, torch.Tensor) and sv.dim() == 4):
        return None
    lse = readers[0]
    if list(lse.args[1]) not in ([-1], [3]) or (len(lse.args) > 2 and lse.args[2]) or lse.kwargs.get("keepdim"):
        return None

    def after_casts(node: fx.Node) -> fx.Node | None:
        nxt = _only_user(node)
        while nxt is not None and nxt.target in _CASTS:
            nxt = _only_user(nxt)
        return nxt

    sub = after_casts(lse)
    if not (_is_op(sub, aten.sub.Tensor) and _reaches(sub.args[0], lse) and isinstance(sub.args[1], fx.Node)
            and sub.kwargs.get("alpha", 1) == 1):
        return None
    heads = sv.shape[1]
    sinks = (_per_head_source(sub.args[1], int(heads))
             if not isinstance(heads, torch.SymInt) and _head_aligned(sub.args[1], int(heads), 3) else None)
    sigmoid = after_casts(sub)
    if sinks is None or not _is_op(sigmoid, aten.sigmoid.default):
        return None
    # [B, H, S] -> [B, H, S, 1]: an unsqueeze of the last dim (casts around it).
    widened = after_casts(sigmoid)
    if not (_is_op(widened, aten.unsqueeze.default) and widened.args[1] in (-1, 3)):
        return None
    mul = after_casts(widened)
    if not (_is_op(mul, aten.mul.Tensor) and len(mul.args) == 2):
        return None
    gate_side = [a for a in mul.args if _reaches(a, widened)]
    if len(gate_side) != 1:
        return None
    out = mul.args[1] if mul.args[0] is gate_side[0] else mul.args[0]
    return _SinkGate(sinks, lse, mul, out)


def _reaches(node: Any, target: fx.Node) -> bool:
    """Whether `node` is `target`, or `target` behind casts only."""
    while node is not target and isinstance(node, fx.Node) and node.target in _CASTS:
        node = node.args[0]
    return node is target


# Ops an ALiBi bias may go through between its slopes x positions product and the scores.
_LAYOUTS = {*_VIEWS, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
            aten.slice.Tensor, aten.expand.default, aten.repeat.default, aten.clone.default, aten.alias.default,
            aten._to_copy.default, torch.ops.prims.convert_element_type.default}
_SHIFTS = {aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar}


def _alibi_slopes(term: Any, over: fx.Node, view: fx.Node | None = None) -> list[float] | None:
    """One slope per head when `term`, added to the scores `over` (4-D [B, H, S, L], or a
    baddbmm's [B * H, S, L] that `view` makes 4-D), is an ALiBi bias: `slope[h] * (j + c)` for
    key j, c constant along the keys (the softmax ignores it, so BLOOM's `slope * j` and MPT's
    `slope * (j - L + 1)` are both `slope * (j - p)` for the query at p, the kernel's form; not
    with attention sinks, which the caller checks). Else None.

    The bias must be a product of constants (the slopes, made from numbers only) and a unit-step
    `arange` (the positions, shifted by constants) behind layout ops, so that it has this form at
    every size; its value at the example sizes, in float64, says which head has which slope. The
    kernel then computes it in float32 from integer distances, where a bf16 model rounds its own
    bias to bf16 (BLOOM does): closer to the formula than the model, within its precision."""
    if not isinstance(term, fx.Node):
        return None
    product = term
    while product.op == "call_function" and product.target in _LAYOUTS and isinstance(product.args[0], fx.Node):
        product = product.args[0]
    if not _is_op(product, aten.mul.Tensor) or not all(isinstance(a, fx.Node) for a in product.args[:2]):
        return None
    a, b = product.args[:2]
    if not ((_is_positions(a) and not depends_on_sizes(b)) or (_is_positions(b) and not depends_on_sizes(a))):
        return None
    value = evaluate_at_example_sizes(term)
    over_shape = [size_hint(d) for d in _val(over).shape]
    view_shape = None if view is None else [size_hint(d) for d in _val(view).shape]
    if value is None or None in over_shape or (view_shape is not None and (
            None in view_shape or view_shape[-2:] != over_shape[-2:])):
        return None
    with unset_fake_temporarily():  # real numbers, while the pass runs under fake tensors
        if value.dim() == 0 or value.dim() > len(over_shape) or value.shape[-1] not in (1, over_shape[-1]):
            return None
        if over_shape[-1] < 2:  # one key: any bias is a row constant, which the softmax ignores
            return [0.0] * (view_shape or over_shape)[1]
        if value.shape[-1] == 1:
            return None  # constant along the keys at the example but not a product of positions
        # The slope of every row of the bias as it is (small: no query dim), checked along the
        # keys, then spread over the scores' rows with the key dim cut to one.
        steps = value.diff(dim=-1)
        slope = steps[..., :1]
        if (steps - slope).abs().max().item() > 1e-9 * max(1.0, value.abs().max().item()):
            return None  # not linear in the key
        try:
            rows = slope.expand([*over_shape[:-1], 1])
            if view_shape is not None:
                rows = rows.reshape([*view_shape[:-1], 1])
        except RuntimeError:
            return None
        if rows.dim() != 4 or (rows - rows[:1, :, :1]).abs().max().item() > 1e-9 * max(1.0, rows.abs().max().item()):
            return None  # a slope that depends on the sequence or the query row
        return rows[0, :, 0, 0].tolist()


# Dtypes that hold every position of a step exactly (bf16 rounds past 256, int8 wraps past 127).
_POSITION_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64)


def _is_positions(node: fx.Node) -> bool:
    """Whether `node` is a unit-step `arange` behind layout ops and shifts by constants, each in
    a dtype that holds every position exactly (the bias is checked linear at the example sizes
    only: a narrower one is linear there and not at longer sequences)."""
    while node.op == "call_function" and (node.target in _LAYOUTS or (
            node.target in _SHIFTS and _constant(node.args[1]) is not None)):
        if getattr(_val(node), "dtype", None) not in _POSITION_DTYPES:
            return False
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return False
    if getattr(_val(node), "dtype", None) not in _POSITION_DTYPES:
        return False
    if node.target in (aten.arange.default, aten.arange.start):
        return True
    return node.target is aten.arange.start_step and bind_arguments(node)["step"] == 1


def _fill_value(node: fx.Node) -> float | None:
    """The constant a `masked_fill`, or a `where` with one constant branch, writes; else None."""
    parts = _fill_parts(node)
    return None if parts is None else _constant(parts[2])


def _fill_parts(node: fx.Node) -> tuple[Any, Any, Any, bool] | None:
    """(scores, mask, fill, whether the mask says what is hidden) of `masked_fill(scores, hide,
    fill)`, `where(keep, scores, fill)` or `where(hide, fill, scores)` (torch.export's form of
    masked_fill: the constant branch is the fill); else None."""
    if node.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        return (*node.args[:3], True)
    if node.target in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
        mask, scores, fill = node.args[:3]
        if _constant(scores) is not None and _constant(fill) is None:
            return fill, mask, scores, True
        return scores, mask, fill, False
    return None


def _filled_with_low_value(node: fx.Node) -> tuple[fx.Node, fx.Node, bool, float] | None:
    """(scores, bool mask, whether the mask says what is hidden, the fill) when `node` hides
    scores by filling them with -inf or the scores dtype's lowest value (transformers' eager
    masks: MPT, GPT-Neo): `masked_fill(scores, hide, fill)`, `where(keep, scores, fill)` or
    `where(hide, fill, scores)` (torch.export's form of masked_fill: `_fill_parts`)."""
    parts = _fill_parts(node)
    if parts is None:
        return None
    scores, mask, fill, hides = parts
    mv, sv, value = _val(mask), _val(scores), _constant(fill)
    if not (isinstance(scores, fx.Node) and isinstance(mask, fx.Node) and isinstance(mv, torch.Tensor)
            and mv.dtype == torch.bool and mv.dim() <= 4 and isinstance(sv, torch.Tensor) and sv.is_floating_point()):
        return None
    # Any float dtype's lowest value hides a key as the kernel's float32 lowest does (MPT fills
    # float32 scores with bf16's), unless it overflows the scores' dtype: it would fill -inf,
    # and a row that sees nothing would be NaN, not the average of its keys.
    lowest = value in _LOWEST_VALUES and value >= torch.finfo(sv.dtype).min
    if not (value == float("-inf") or lowest):
        return None
    return scores, mask, hides, value


_LOWEST_VALUES = {torch.finfo(d).min for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def _clamped_at_lowest(node: fx.Node) -> tuple[fx.Node, float] | None:
    """(x, the clamp) when `node` is `maximum(x, lowest)` or `clamp_min(x, lowest)` for x's
    dtype's lowest value (XGLM's clamp of its masked scores), else None."""
    if node.target is aten.maximum.default:
        pair = [(a, b) for a, b in (node.args[:2], node.args[1::-1]) if isinstance(a, fx.Node) and _constant(b) is not None]
    elif node.target is aten.clamp_min.default:
        pair = [tuple(node.args[:2])]
    else:
        return None
    if len(pair) != 1:
        return None
    x, low = pair[0][0], _constant(pair[0][1])
    xv = _val(x)
    if not (isinstance(xv, torch.Tensor) and xv.is_floating_point() and low == torch.finfo(xv.dtype).min
            and same_shape(xv.shape, _val(node).shape)):
        return None
    return x, low


_ZERO_FILLS = {aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default}
_FILLS = {aten.full.default: 1, aten.new_full.default: 2, aten.full_like.default: 1}


def _zero_fill(node: Any) -> bool:
    """Whether `node` is a tensor of zeros made in the graph (`zeros`, or `full` of 0)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target in _ZERO_FILLS:
        return True
    return node.target in _FILLS and _constant(node.args[_FILLS[node.target]]) == 0.0


def _merges_heads(node: fx.Node) -> bool:
    """Whether `node` views a [B, H, S, L] tensor as [B*H, S, L]."""
    if node.target not in _VIEWS or not isinstance(node.args[0], fx.Node):
        return False
    src, out = _val(node.args[0]), _val(node)
    return (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dim() == 4 and out.dim() == 3
            and same_shape(out.shape, (src.shape[0] * src.shape[1], *src.shape[2:])))


def _negation_source(mask: fx.Node) -> fx.Node | None:
    """x when the bool `mask` is `~x` (bitwise or logical not), else None."""
    if mask.target in (aten.bitwise_not.default, aten.logical_not.default) and isinstance(mask.args[0], fx.Node):
        return mask.args[0]
    return None


def _soft_cap(node: Any, skip: frozenset[fx.Node] | set[fx.Node] = frozenset()) -> tuple[Any, Any]:
    """(cap, x) when `node` is logit soft-capping `cap * tanh(x / cap)` (or `x * (1 / cap)` inside,
    for a number), the two caps the same number or 0-d tensor; else (None, node). The cap is
    returned as the graph has it (a number, or the node of a 0-d tensor). Users of `node` in
    `skip` (a row-max subtraction the softmax ignores) do not count."""
    if not (isinstance(node, fx.Node) and node.target in (aten.mul.Tensor, aten.mul.Scalar)
            and len([u for u in node.users if u not in skip]) == 1):
        return None, node
    first, second = node.args[:2]
    tanh, cap = (first, second) if _is_op(first, aten.tanh.default) else (second, first)
    if not _is_op(tanh, aten.tanh.default) or len(tanh.users) != 1:
        return None, node
    inner = tanh.args[0]
    if not (isinstance(inner, fx.Node) and inner.target in _SCALINGS and len(inner.users) == 1
            and isinstance(inner.args[0], fx.Node)):
        return None, node
    x, divisor = inner.args[:2]
    if inner.target in (aten.div.Tensor, aten.div.Scalar):
        same = _same_number(divisor, cap)
    else:
        c, r = _constant(cap), _constant(divisor)
        same = c is not None and r is not None and math.isclose(c * r, 1.0, rel_tol=1e-6)
    if not same:
        return None, node
    value = _constant(cap)
    if value is None:
        return cap, x  # a 0-d tensor (Dynamo's form of a model's float attribute)
    return (value, x) if value > 0 else (None, node)


def _same_number(a: Any, b: Any) -> bool:
    """Whether `a` and `b` are the same number: equal constants, or 0-d tensors made by casts of
    the same node."""
    ca, cb = _constant(a), _constant(b)
    if ca is not None or cb is not None:
        return ca == cb
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return False
    if not all(isinstance(_val(n), torch.Tensor) and _val(n).dim() == 0 and _val(n).is_floating_point() for n in (a, b)):
        return False
    return _uncast(a) is _uncast(b)


def _float_cast_source(node: Any) -> fx.Node | None:
    """The tensor a cast between floating dtypes reads (`prims.convert_element_type`, or a
    `_to_copy` that changes nothing but the dtype); None for any other node."""
    if not (isinstance(node, fx.Node) and node.target in _CASTS and node.args and isinstance(node.args[0], fx.Node)):
        return None
    src = _val(node.args[0])
    if not (isinstance(src, torch.Tensor) and src.dtype.is_floating_point):
        return None
    if node.target is torch.ops.prims.convert_element_type.default:
        dtype = node.args[1]
    elif node.target is aten._to_copy.default and len(node.args) == 1 and set(node.kwargs) <= {
            "dtype", "layout", "device", "memory_format"}:
        kw = node.kwargs
        same_place = (kw.get("layout") in (None, torch.strided) and kw.get("device") in (None, src.device)
                      and kw.get("memory_format") in (None, torch.preserve_format))
        dtype = kw.get("dtype") if same_place else None
    else:
        return None
    return node.args[0] if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _uncast(node: fx.Node) -> fx.Node:
    """`node` with the dtype casts over it removed."""
    while node.target in _CASTS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _is_op(node: Any, target: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _unflatten_heads(node: Any) -> fx.Node | None:
    """The 4-D [B, H, X, Y] tensor a 3-D bmm operand was flattened from (through views, clones
    and no-op expands), or None."""
    cur = node
    while isinstance(cur, fx.Node) and cur.op == "call_function" and (
        cur.target in _VIEWS or cur.target in (aten.clone.default, aten.expand.default)
    ):
        val = _val(cur.args[0])
        if isinstance(val, torch.Tensor) and val.dim() == 4 and cur.target is not aten.expand.default:
            cur = cur.args[0]
            break
        cur = cur.args[0]
    while _is_op(cur, aten.clone.default):  # contiguous copies made only for the flattening view
        cur = cur.args[0]
    val = _val(cur)
    if not (isinstance(val, torch.Tensor) and val.dim() == 4):
        return None
    if _heads_after_unit_length(val, _val(node)):
        # One query a sequence (decode): canonicalize folded `view(x, [B, 1, H, D]).transpose(1, 2)`
        # and the flattening view into views alone, the transpose moving only the unit length.
        # The same elements read as [B, H, 1, D] (made next to the source; unused, it is dropped).
        with cur.graph.inserting_after(cur):
            heads_first = cur.graph.call_function(aten.transpose.int, (cur, 1, 2))
        infer_meta(heads_first)
        return heads_first
    return cur


def _heads_after_unit_length(source: torch.Tensor, flat: Any) -> bool:
    """Whether the 3-D `flat` ([B * H, 1, D]) flattens `source` laid out as [B, 1, H, D] with H > 1
    (heads after a unit length), rather than as [B, H, 1, D]."""
    if not (isinstance(flat, torch.Tensor) and flat.dim() == 3):
        return False
    b, one, h, d = source.shape
    return (statically_known_true(one == 1) and statically_known_true(flat.shape[1] == 1)
            and not statically_known_true(h == 1) and statically_known_true(flat.shape[0] == b * h)
            and statically_known_true(flat.shape[2] == d))


_SCALINGS = (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)


def _constant_factor(node: Any) -> tuple[Any, float]:
    """(x, c) when `node` is x * c or x / c (1 / c returned) with c a number; else (node, 1.0)."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target in _SCALINGS:
        c = _constant(node.args[1])
        if c is not None and c != 0.0 and isinstance(node.args[0], fx.Node):
            return node.args[0], c if node.target in (aten.mul.Tensor, aten.mul.Scalar) else 1.0 / c
    return node, 1.0


def _symbolic_factor(node: Any) -> bool:
    """Whether `node` is x * c or x / c with c a number of symbolic sizes (a SymFloat or SymInt)."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _SCALINGS
            and isinstance(node.args[1], fx.Node) and isinstance(_val(node.args[1]), (torch.SymFloat, torch.SymInt)))


def _head_broadcast_source(node: Any) -> Any:
    """The one-head tensor a 4-D `expand` widens over the head dimension only ([B, 1, X, Y] ->
    [B, H, X, Y]: every query head reads the same K/V, MQA's rule), or `node` itself."""
    if not _is_op(node, aten.expand.default):
        return node
    src, wide = _val(node.args[0]), _val(node)
    if isinstance(src, torch.Tensor) and src.dim() == wide.dim() == 4 and src.shape[1] == 1 and (
        same_shape((src.shape[0], *src.shape[2:]), (wide.shape[0], *wide.shape[2:]))
    ):
        return node.args[0]
    return node


def _is_transpose_last2(node: fx.Node) -> bool:
    return _val(node) is not None and _val(node).dim() == 4 and transposed_dims(node) == (2, 3)
