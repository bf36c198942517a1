"""Lowering: tileflow ops in a graph -> KernelSpecs, built ahead of the first call.

A `padded_gemm` or `grouped_gemm` node carries its tile plan; every config of that plan is one
KernelSpec (a grouped plan is keyed by the expected rows per expert, see
`tileflow.runtime.expected_group_rows`). Lowering
builds each distinct spec once through the runtime's kernel cache (so a new M at run time never
compiles anything) and records the kernels in the graph's report.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from .graph_utils import bind_arguments
from .kernel_spec import ROUNDED_DTYPES, KernelSpec, TileConfig, dtype_name, is_gated, make_params
from .pipeline import PassContext
from .tiles import TilePlan


def gemm_epilogue(
    *, has_bias: bool, activation: str, has_residual: bool, cast: bool, round_first: bool = False
) -> tuple[str, ...]:
    """The epilogue tuple of a GEMM, in the order kernels apply it (`round_first`: a `round`
    before the cast; the caller gives it only where it changes the result, see `_rounds`)."""
    epilogue: list[str] = []
    if has_bias:
        epilogue.append("bias")
    if activation != "none":
        epilogue.append(activation)
    if has_residual:
        epilogue.append("residual")
    if cast and round_first:
        epilogue.append("round")
    if cast:
        epilogue.append("cast")
    return tuple(epilogue)


def _rounds(round_first: bool, dtype: str, out_dtype: str) -> bool:
    """Whether a GEMM asked to round its result to the input dtype before the cast needs a
    `round`: only a cast from float16 / bfloat16 (a float32 / float64 accumulator already has
    the input's dtype, so those kernels stay the plain cast's)."""
    return round_first and dtype != out_dtype and dtype in ROUNDED_DTYPES


@functools.lru_cache(maxsize=4096)
def gemm_spec(
    *,
    dtype: Any,
    out_dtype: Any,
    n: int,
    k: int,
    tile: TileConfig,
    activation: str = "none",
    has_bias: bool = False,
    has_residual: bool = False,
    persistent: bool = False,
    split_k: bool = False,
    stream_k: bool = False,
    tma: bool = False,
    round_first: bool = False,
    segments: tuple[int, ...] | None = None,
) -> KernelSpec:
    """The KernelSpec of one fixed-tile padded GEMM (N is the output width, K the reduction);
    `segments`, when given, are the widths of N's segments, each from its own weight (sibling
    GEMMs on one input run as one: `kernel_spec.gemm_segments`);
    `split_k` asks for the split-K kernel pair (the split factor is a launch argument),
    `stream_k` for the stream-K pair (its grid is a launch argument), `tma` for operand tiles
    fetched by the Hopper copy engine; `round_first` rounds the result to `dtype` before the
    cast to `out_dtype` (eager's `linear(x, w).to(out_dtype)`; a `round` epilogue entry where
    that changes anything)."""
    dtype, out_dtype = dtype_name(dtype), dtype_name(out_dtype)
    # These flags join the params only when set, so other specs keep their digests.
    extra: dict[str, Any] = {name: True for name, on in (("split_k", split_k), ("stream_k", stream_k), ("tma", tma)) if on}
    if segments is not None:
        extra["segments"] = "x".join(str(w) for w in segments)
    return KernelSpec(
        op="padded_gemm",
        dtype=dtype,
        out_dtype=out_dtype,
        tile=tile,
        epilogue=gemm_epilogue(has_bias=has_bias, activation=activation, has_residual=has_residual, cast=dtype != out_dtype,
                               round_first=_rounds(round_first, dtype, out_dtype)),
        params=make_params(n=n, k=k, persistent=persistent, **extra),
    )


@functools.lru_cache(maxsize=4096)
def grouped_gemm_spec(
    *,
    dtype: Any,
    out_dtype: Any,
    n: int,
    k: int,
    experts: int,
    tile: TileConfig,
    activation: str = "none",
    has_bias: bool = False,
    clamp: tuple[float, float] | None = None,
) -> KernelSpec:
    """The KernelSpec of one fixed-tile grouped GEMM over `experts` weights [E, N, K] (N is the
    output width: for swiglu each expert's weight has 2N rows), with a per-expert bias [E, N]
    when `has_bias`; `clamp` is `clamped_swiglu`'s (alpha, limit), kept as text params."""
    dtype, out_dtype = dtype_name(dtype), dtype_name(out_dtype)
    extra = {} if clamp is None else {"alpha": repr(float(clamp[0])), "limit": repr(float(clamp[1]))}
    return KernelSpec(
        op="grouped_gemm",
        dtype=dtype,
        out_dtype=out_dtype,
        tile=tile,
        epilogue=gemm_epilogue(has_bias=has_bias, activation=activation, has_residual=False, cast=dtype != out_dtype),
        params=make_params(n=n, k=k, experts=experts, **extra),
    )


# Where a GEMM op's `plan` sits among its positional arguments (ops.py's schemas).
_PLAN_ARG = {"padded_gemm": 6, "grouped_gemm": 5}


def gemm_plan_text(node: fx.Node) -> str:
    """The encoded tile plan of a `tileflow::padded_gemm` or `tileflow::grouped_gemm` node, or ""
    for a call the user wrote (its plan is chosen at run time)."""
    at = _PLAN_ARG[node.target._opname]
    return node.kwargs.get("plan") or (node.args[at] if len(node.args) > at else "") or ""


def grouped_gemm_specs_for_node(node: fx.Node, plan: TilePlan) -> list[KernelSpec]:
    """One spec per config of `plan`, for a `tileflow::grouped_gemm` node."""
    names = ("activation", "out_dtype", "plan", "target", "bias", "alpha", "limit")
    kwargs = dict(zip(names, node.args[3:]))
    kwargs.update(node.kwargs)
    activation = kwargs.get("activation") or "none"
    xv, wv = node.args[0].meta["val"], node.args[1].meta["val"]
    e, rows, k = (int(d) for d in wv.shape)
    clamp = None if kwargs.get("alpha") is None else (kwargs["alpha"], kwargs["limit"])
    return [
        grouped_gemm_spec(
            dtype=xv.dtype, out_dtype=kwargs.get("out_dtype") or xv.dtype, n=rows // 2 if is_gated(activation) else rows,
            k=k, experts=e, tile=tile, activation=activation, has_bias=kwargs.get("bias") is not None, clamp=clamp,
        )
        for tile in plan.configs
    ]


def gemm_specs_for_node(node: fx.Node, plan: TilePlan) -> list[KernelSpec]:
    """One spec per kernel of `plan` (config, and its persistent, split-K, stream-K or TMA
    variant where the plan runs it), for a `tileflow::padded_gemm` node. Over sibling weights
    (N segments): the segmented kernel of each piece that can read them in one launch, and
    where one cannot, the kernels of each segment's own plan over that piece's M range."""
    from .runtime import segment_piece, segments_in_one_kernel

    x, weight = node.args[0], node.args[1]
    names = ("bias", "residual", "activation", "out_dtype", "plan", "target", "weight_up", "bias_up", "round_first",
             "more_weights")
    kwargs = dict(zip(names, node.args[2:]))
    kwargs.update(node.kwargs)
    activation = kwargs.get("activation") or "none"
    xv, wv = x.meta["val"], weight.meta["val"]
    out_dtype = kwargs.get("out_dtype") or xv.dtype
    n = wv.shape[0] // 2 if is_gated(activation) and kwargs.get("weight_up") is None else wv.shape[0]
    siblings = [w.meta["val"] for w in kwargs.get("more_weights") or ()]
    widths = (int(n), *(int(w.shape[0]) for w in siblings))
    target = kwargs.get("target") or ""
    # The segmented kernel reads every weight with the first one's strides (as the runtime checks).
    same_strides = all(w.stride() == wv.stride() for w in siblings)

    def spec_of(piece: Any, width: int, segments: tuple[int, ...] | None = None) -> KernelSpec:
        tile, persistent, split, stream_k, tma = piece.kernel_variant
        return gemm_spec(
            dtype=xv.dtype, out_dtype=out_dtype, n=width, k=int(wv.shape[1]), tile=tile,
            activation=activation, has_bias=kwargs.get("bias") is not None,
            has_residual=kwargs.get("residual") is not None, persistent=persistent, split_k=split,
            stream_k=stream_k, tma=tma, round_first=bool(kwargs.get("round_first")), segments=segments,
        )

    specs: list[KernelSpec] = []
    for piece in plan.pieces:
        if len(widths) == 1:
            specs.append(spec_of(piece, widths[0]))
        elif same_strides and segments_in_one_kernel(target, piece.config, widths):
            specs.append(spec_of(piece, sum(widths), widths))
        else:
            # Sibling GEMMs run apart here, each by its own plan's pieces over this piece's M (as
            # the runtime runs them).
            for width, own in zip(widths, plan.segment_plans or [None] * len(widths)):
                mine = own.pieces if own else [segment_piece(piece, width, int(wv.shape[1]), xv.dtype)]
                specs += [spec_of(p, width) for p in mine if width and p.lo <= piece.hi and p.hi >= piece.lo]
    return list(dict.fromkeys(specs))


def attention_specs_for_node(node: fx.Node, target: str) -> list[KernelSpec]:
    """The meta-attention kernels a dense `tileflow::meta_attention` node can use on `target`: the
    tile height depends on the query length of each call, so both the decode-sized and the
    prefill-sized variants are built ahead."""
    from .runtime.attention import attention_block_q, attention_spec

    args = bind_arguments(node)
    q, k = args["q"].meta["val"], args["k"].meta["val"]
    hq, hkv, d = int(q.shape[1]), int(k.shape[1]), int(q.shape[3])
    gqa = hq // hkv
    block_qs = sorted({attention_block_q(1, gqa, target), attention_block_q(1 << 20, gqa, target)})
    return [attention_spec(dtype=q.dtype, head_dim=d, gqa=gqa, block_q=bq, tree=False, target=target,
                           **attention_features(args))
            for bq in block_qs]


def attention_features(args: dict[str, Any]) -> dict[str, bool]:
    """The kernel features a dense `tileflow::meta_attention` call's arguments (by name; absent
    ones as None) select: what `attention_specs_for_node` builds its kernels with."""
    bias = args.get("attn_mask") is not None or args.get("attention_chunk") is not None  # a chunk rule runs as a mask
    return {"causal": bool(args.get("causal")), "sliding_window": args.get("sliding_window") is not None,
            "bias": bias, "softcap": args.get("softcap") is not None, "sinks": args.get("sinks") is not None,
            "alibi": args.get("alibi_slopes") is not None,
            # Key starts join a mask the call has (`run_meta_attention`).
            "key_starts": args.get("key_starts") is not None and not bias}


def lower_graph(gm: fx.GraphModule, ctx: PassContext, target: str, *, emit_only: bool = False) -> list[KernelSpec]:
    """Build every kernel the graph's tileflow ops need, and record them in the report.

    With `emit_only` (ahead-of-time export for a target that cannot build here, e.g. Ascend C on a
    machine without CANN) the kernels' sources are emitted into the artifact folder but nothing is
    compiled; the target's backend must offer `emit(spec) -> {relative path: text}`.
    """
    from .runtime import decode_plan, get_kernel, save_kernel_source

    specs: dict[KernelSpec, None] = {}
    for node in gm.graph.nodes:
        node_specs: list[KernelSpec] = []
        if node.op == "call_function" and node.target is torch.ops.tileflow.padded_gemm.default:
            plan_text = gemm_plan_text(node)
            if not plan_text:
                continue  # a call the user wrote: its plan and target are chosen at run time
            node_specs = gemm_specs_for_node(node, decode_plan(plan_text))
        elif node.op == "call_function" and node.target is torch.ops.tileflow.grouped_gemm.default:
            plan_text = gemm_plan_text(node)
            if not plan_text:
                continue  # as above: a call the user wrote
            node_specs = grouped_gemm_specs_for_node(node, decode_plan(plan_text))
        elif node.op == "call_function" and node.target is torch.ops.tileflow.meta_attention.default:
            node_specs = attention_specs_for_node(node, target)
        if node_specs:
            # Which kernels serve this node: the visualizer links nodes to kernel sources by it.
            node.meta.setdefault("tileflow", {})["kernels"] = [spec.name for spec in node_specs]
        for spec in node_specs:
            specs.setdefault(spec, None)
    kernels_dir = ctx.artifact_dir / "kernels" if ctx.artifact_dir is not None else None
    for spec in specs:
        if emit_only:
            path = _emit_sources(target, spec, kernels_dir)
        else:
            kernel = get_kernel(target, spec, kernels_dir)
            path = save_kernel_source(kernel, kernels_dir) if kernels_dir is not None else kernel.source_path
        ctx.add_kernel(spec.name, target, str(path) if path else None, spec.to_dict())
    return list(specs)


def _emit_sources(target: str, spec: KernelSpec, kernels_dir: Path | None) -> Path | None:
    """Write `spec`'s emitted files under `kernels_dir`; returns the main (kernel) file."""
    from .targets import get_backend

    backend = get_backend(target)
    if not hasattr(backend, "emit"):
        raise ValueError(f"target {target!r} cannot emit sources without building them")
    files = backend.emit(spec)
    if kernels_dir is None:
        return None
    main = None
    for rel, text in files.items():
        path = kernels_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if rel.startswith("op_kernel/"):
            main = path
    return main
