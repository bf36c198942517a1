"""tileflow's custom ops: `torch.library` ops (schemas inferred from their Python signatures, as
`torch.library.custom_op` infers them) plus fake (meta) implementations.

Because they are real library ops with fake implementations, Dynamo, `torch.export`, Inductor and
the `.pt2` format all carry them as opaque calls; the graph after tileflow's passes is still a
valid ATen graph. Each op's real implementation asks the runtime for the kernel of the current
target (`tileflow.use_config` picks it for eager calls).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .kernel_spec import ACTIVATIONS, CLAMPED_SWIGLU, is_gated
from .tasks import check_sliding_window

__all__ = [
    "padded_gemm", "grouped_gemm", "gemm_out_features", "check_group_offsets", "meta_attention",
    "meta_attention_varlen", "attention_mask_ranges",
]

_ACTIVATION_NAMES = ("none",) + ACTIVATIONS

# The ops' library. `torch.library.custom_op` runs each call through Python layers (an autograd
# kernel, a redispatch, a Dynamo guard): a padded GEMM called through `torch.ops` took 42 us of
# host time on a 2-core CPU, 25 us of it outside its implementation, and a serving step calls
# these ops once or more per layer. Declared directly, each op keeps one thin Python kernel at
# the Autograd key (`_autograd_kernel`; skipped under inference_mode): 32 us, 15 outside.
_LIB = torch.library.Library("tileflow", "DEF")


class _NoBackward(torch.autograd.Function):
    """An op's call on inputs that require grad: its output joins the autograd graph, and a
    backward through it raises (the ops have no autograd formula, as a custom op without one)."""

    @staticmethod
    def forward(ctx: Any, name: str, run: Callable[[], torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        ctx.name = name
        # Computed here, not passed in: an input returned as is comes back as a view, on which
        # autograd refuses in-place ops (`out += residual`), which custom_op's outputs allow.
        return run()

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError(f"Trying to backward through tileflow::{ctx.name}, which has no autograd formula: "
                           "tileflow's ops are for inference; call them under torch.no_grad() or "
                           "torch.inference_mode(), or on inputs that do not require grad")


def _autograd_kernel(op: torch._ops.OpOverload, name: str) -> Callable[..., torch.Tensor]:
    """`op`'s Autograd kernel: the op below autograd and, where grad mode is on and an input
    requires grad, its output joined to the graph by `_NoBackward`.

    Not a fallthrough: AOTAutograd (torch.compile's aot_eager and inductor backends) and
    torch.func trace the op on wrappers of its inputs, whose requires_grad only an Autograd
    kernel sees; past a fallthrough the op's output does not require grad there, and a compiled
    backward (or `torch.func.grad`) silently leaves the op's inputs without their gradients. The
    op also runs below autograd, as custom_op's do: its implementation records no graph (nor keeps
    tensors for a backward that never runs)."""
    after_autograd = torch._C._after_autograd_keyset

    def kernel(keyset: torch._C.DispatchKeySet, *args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.is_grad_enabled():
            # (Tensor[] arguments too: a GEMM's sibling weights.)
            flat = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else (a,))]
            needs = [a for a in flat if isinstance(a, torch.Tensor) and a.requires_grad]
            if needs:
                def run() -> torch.Tensor:
                    with torch._C._AutoDispatchBelowAutograd():
                        return op.redispatch(keyset & after_autograd, *args, **kwargs)

                return _NoBackward.apply(name, run, *needs)
        return op.redispatch(keyset & after_autograd, *args, **kwargs)

    return kernel


class _Op:
    """A tileflow op declared from its implementation's signature; `register_fake` adds its fake
    implementation. Callers use `torch.ops.tileflow.<name>` (the public wrappers below)."""

    def __init__(self, name: str, fn: Callable[..., torch.Tensor], schema: str | None = None) -> None:
        self.name = name
        # pt2_compliant as custom_op tags its ops: Dynamo's `only_allow_pt2_compliant_ops`
        # graph-breaks on an op without the tag.
        _LIB.define(name + (schema or torch.library.infer_schema(fn, mutates_args=())), tags=(torch.Tag.pt2_compliant_tag,))
        op = getattr(torch.ops.tileflow, name).default
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        _LIB.impl(name, _autograd_kernel(op, name), "Autograd", with_keyset=True)

    def register_fake(self, fake: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """Register `fake` (shapes and dtypes only) for tracing with fake tensors."""
        torch.library.register_fake(f"tileflow::{self.name}", fake, lib=_LIB)
        return fake


def _op(name: str, schema: str | None = None) -> Callable[[Callable[..., torch.Tensor]], _Op]:
    """Decorator: declare `tileflow::<name>` implemented by the decorated function, with the
    schema inferred from its signature unless given (`infer_schema` knows no `Tensor[]?`)."""
    return lambda fn: _Op(name, fn, schema)


def gemm_out_features(weight_rows: int, activation: str) -> int:
    """Output width N of a GEMM whose weight has `weight_rows` rows (a gated activation, whose
    weight stacks gate and up, halves it)."""
    return weight_rows // 2 if is_gated(activation) else weight_rows


def _check_activation(op: str, activation: str) -> None:
    """Reject an epilogue activation name the GEMM kernels do not know."""
    # clamped_swiglu (gpt-oss's) comes with its alpha and limit, which grouped_gemm alone takes.
    names = list(_ACTIVATION_NAMES) if op == "grouped_gemm" else [a for a in _ACTIVATION_NAMES if a != CLAMPED_SWIGLU]
    if activation not in names:
        raise ValueError(f"{op}: unknown activation {activation!r}; use one of {names}")


def _check_gemm_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    weight_up: torch.Tensor | None = None,
    bias_up: torch.Tensor | None = None,
    more_weights: Sequence[torch.Tensor] | None = None,
    more_biases: Sequence[torch.Tensor] | None = None,
) -> int:
    """Validate a padded_gemm call; return its output width N."""
    if activation == CLAMPED_SWIGLU:
        raise ValueError("padded_gemm: clamped_swiglu (gpt-oss's) is a grouped_gemm activation only")
    _check_activation("padded_gemm", activation)
    if more_weights or more_biases:
        n = _check_segment_args(x, weight, bias, activation, weight_up, more_weights or (), more_biases, bias_up)
        _check_residual(x, residual, n)
        return n
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"padded_gemm: x must be [M, K] and weight [N, K]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"padded_gemm: K mismatch, x is {tuple(x.shape)} and weight is {tuple(weight.shape)}")
    if (weight_up is not None or bias_up is not None) and not is_gated(activation):
        raise ValueError("padded_gemm: weight_up/bias_up are only used with a gated activation "
                         "('swiglu', 'geglu' or 'geglu_tanh')")
    if weight_up is not None:
        if weight_up.shape != weight.shape:
            raise ValueError(
                f"padded_gemm: weight_up must match weight's shape {tuple(weight.shape)}, got {tuple(weight_up.shape)}"
            )
        n = weight.shape[0]
    else:
        if is_gated(activation) and weight.shape[0] % 2:
            raise ValueError(
                f"padded_gemm: {activation} needs the gate and up weights stacked as [2N, K] (or passed "
                f"separately as weight and weight_up); got {tuple(weight.shape)}"
            )
        n = gemm_out_features(weight.shape[0], activation)
    if bias_up is not None and bias is None:
        raise ValueError("padded_gemm: bias_up (the up projection's bias) needs bias (the gate's) too")
    if weight_up is not None and bias is not None and bias_up is None:
        raise ValueError(
            "padded_gemm: with separate gate and up weights (weight_up), give both bias and bias_up or "
            "neither (the kernels add a bias to both projections or to none)"
        )
    bias_rows = n if (weight_up is not None or bias_up is not None) else weight.shape[0]
    for name, b in (("bias", bias), ("bias_up", bias_up)):
        if b is not None and (b.dim() != 1 or b.shape[0] != bias_rows):
            raise ValueError(f"padded_gemm: {name} must be [{bias_rows}], got {tuple(b.shape)}")
    _check_residual(x, residual, n)
    return n


def _check_residual(x: torch.Tensor, residual: torch.Tensor | None, n: int) -> None:
    """A GEMM's residual, when given, is [M, N]."""
    if residual is not None and (residual.dim() != 2 or residual.shape[1] != n or residual.shape[0] != x.shape[0]):
        raise ValueError(f"padded_gemm: residual must be [M, {n}], got {tuple(residual.shape)}")


def _check_segment_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    weight_up: torch.Tensor | None,
    more_weights: Sequence[torch.Tensor],
    more_biases: Sequence[torch.Tensor] | None,
    bias_up: torch.Tensor | None = None,
) -> int:
    """Validate the weights and biases of a padded_gemm call over sibling weights (N segments);
    return the total N."""
    # bias_up too: no segmented launch takes one, so it would be dropped without a word.
    if is_gated(activation) or weight_up is not None or bias_up is not None:
        raise ValueError("padded_gemm: more_weights (sibling GEMMs) cannot be combined with a gated activation "
                         "(nor its weight_up / bias_up); give the gate and up projections as weight and weight_up "
                         "instead")
    weights = [weight, *more_weights]
    if x.dim() != 2 or any(w.dim() != 2 for w in weights):
        raise ValueError(f"padded_gemm: x must be [M, K] and every weight [N_i, K]; got x {tuple(x.shape)}, "
                         f"weights {[tuple(w.shape) for w in weights]}")
    if any(w.shape[1] != x.shape[1] for w in weights):
        raise ValueError(f"padded_gemm: K mismatch, x is {tuple(x.shape)} and the weights are "
                         f"{[tuple(w.shape) for w in weights]}")
    if (bias is None) != (more_biases is None):
        raise ValueError("padded_gemm: with more_weights, give bias and more_biases (one per extra weight) or "
                         "neither (the kernels add a bias to every segment or to none)")
    if bias is not None:
        for i, (b, w) in enumerate(zip([bias, *more_biases], weights)):
            if b.dim() != 1 or b.shape[0] != w.shape[0]:
                raise ValueError(f"padded_gemm: the bias of weight {i} must be [{w.shape[0]}], got {tuple(b.shape)}")
        if len(more_biases) != len(more_weights):
            raise ValueError(f"padded_gemm: {len(more_weights)} more weight(s) but {len(more_biases)} more bias(es)")
    return sum(w.shape[0] for w in weights)


@_op("padded_gemm", "(Tensor x, Tensor weight, Tensor? bias=None, Tensor? residual=None, str activation=\"none\", "
                    "ScalarType? out_dtype=None, str plan=\"\", str target=\"\", Tensor? weight_up=None, "
                    "Tensor? bias_up=None, bool round_first=False, Tensor[]? more_weights=None, Tensor[]? more_biases=None) "
                    "-> Tensor")
def _padded_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: str = "none",
    out_dtype: torch.dtype | None = None,
    plan: str = "",
    target: str = "",
    weight_up: torch.Tensor | None = None,
    bias_up: torch.Tensor | None = None,
    round_first: bool = False,
    more_weights: Sequence[torch.Tensor] | None = None,
    more_biases: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """out[M, N] = residual + act(x @ weight.T + bias), computed by fixed-tile kernels (see runtime).

    `plan` is the encoded tile plan the compiler chose ("" = build one for the current config);
    `target` the kernel target ("" = the current config's). `round_first` rounds the result to
    x's dtype before the cast to `out_dtype` (see `padded_gemm`). `more_weights` and
    `more_biases` are sibling GEMMs' weights and biases, whose outputs follow weight's along N.
    """
    from .runtime import run_padded_gemm

    more_biases = more_biases or None  # an empty list: no biases, like None
    _check_gemm_args(x, weight, bias, residual, activation, weight_up, bias_up, more_weights, more_biases)
    return run_padded_gemm(x, weight, bias, residual, activation, out_dtype or x.dtype, plan, target, weight_up, bias_up,
                           round_first, more_weights or (), more_biases or ())


@_padded_gemm.register_fake
def _padded_gemm_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: str = "none",
    out_dtype: torch.dtype | None = None,
    plan: str = "",
    target: str = "",
    weight_up: torch.Tensor | None = None,
    bias_up: torch.Tensor | None = None,
    round_first: bool = False,
    more_weights: Sequence[torch.Tensor] | None = None,
    more_biases: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    n = _check_gemm_args(x, weight, bias, residual, activation, weight_up, bias_up, more_weights, more_biases or None)
    return x.new_empty((x.shape[0], n), dtype=out_dtype or x.dtype)


def padded_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    weight_up: torch.Tensor | None = None,
    bias_up: torch.Tensor | None = None,
    round_first: bool = False,
    more_weights: Sequence[torch.Tensor] | None = None,
    more_biases: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Dynamic-M GEMM like `F.linear`, run by a tile plan's fixed-tile kernels with virtual padding.

    `x` is [M, K]; `weight` is [N, K]. `activation` is one of `kernel_spec.ACTIVATIONS` (`silu`,
    `gelu`, `gelu_tanh`, `relu`, `relu2` = relu(a) ** 2, `swiglu`, `geglu`, `geglu_tanh`; not
    `clamped_swiglu`, a grouped GEMM's) or None.
    With `"swiglu"` the result is `silu(x @ Wg.T + bg) * (x @ Wu.T + bu)` (`geglu`: gelu of the
    gate, `geglu_tanh`: its tanh approximation, Gemma's), the gate and up weights given stacked
    as one [2N, K] `weight` (and [2N] `bias`), or separately as `weight`/`weight_up` (and
    `bias`/`bias_up`).
    `residual` [M, N] is added last; `out_dtype` casts the result: the float32 accumulator goes
    straight to it, unless `round_first`, which rounds the result to x's dtype first (then
    converts), as `F.linear(x, w).to(out_dtype)` does: a float16 result past 65504 is inf there.
    `more_weights` ([N_i, K] each) are sibling GEMMs on the same x, as a layer's K and V
    projections beside its Q: the result is `x @ cat([weight, *more_weights]).T` (plus
    `cat([bias, *more_biases])`), computed without concatenating the weights; the Triton
    kernels read each output tile's columns from its own weight in one launch.
    Callable eagerly: it builds or reuses the plan for the current target (`tileflow.use_config`).
    """
    return torch.ops.tileflow.padded_gemm(
        x, weight, bias, residual, activation or "none", out_dtype, "", "", weight_up, bias_up, round_first,
        more_weights, more_biases,
    )


def _check_grouped_gemm_args(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor | None, activation: str,
    bias: torch.Tensor | None = None, alpha: float | None = None, limit: float | None = None,
    out_dtype: torch.dtype | None = None,
) -> int:
    """Validate a grouped_gemm call's shapes and dtypes (no values: that would need a device->host
    copy on every call); return its output width N."""
    _check_activation("grouped_gemm", activation)
    for name, value in (("x", x), ("weight", weight), ("offsets", offsets), ("bias", bias)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise ValueError(f"grouped_gemm: {name} must be a torch.Tensor, got {type(value).__name__}")
    clamped = activation == CLAMPED_SWIGLU
    if (alpha is not None, limit is not None) != (clamped, clamped):
        raise ValueError(f"grouped_gemm: alpha and limit go with activation='clamped_swiglu' (both), got "
                         f"activation={activation!r}, alpha={alpha}, limit={limit}")
    if clamped and not (math.isfinite(alpha) and 0 < limit < math.inf):
        raise ValueError(f"grouped_gemm: clamped_swiglu needs a finite alpha and a finite positive limit, got {alpha} "
                         f"and {limit}")
    if offsets is None:
        # The batched form: expert e's rows are x[e], as many for every expert.
        if x.dim() != 3 or weight.dim() != 3 or x.shape[0] != weight.shape[0]:
            raise ValueError(
                "grouped_gemm without offsets is batched: x must be [E, T, K] with one row block per expert of "
                f"weight [E, N, K]; got x {tuple(x.shape)}, weight {tuple(weight.shape)} (pass offsets for rows "
                "grouped by expert in an [M, K] x)"
            )
    elif x.dim() != 2 or weight.dim() != 3:
        raise ValueError(
            f"grouped_gemm: x must be [M, K] and weight [E, N, K]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if x.shape[-1] != weight.shape[2]:
        raise ValueError(f"grouped_gemm: K mismatch, x is {tuple(x.shape)} and weight is {tuple(weight.shape)}")
    if offsets is not None and (offsets.dim() != 1 or offsets.shape[0] != weight.shape[0]):
        raise ValueError(
            f"grouped_gemm: offsets must be [E={weight.shape[0]}] (one end row per expert), got {tuple(offsets.shape)}"
        )
    if offsets is not None and offsets.dtype != torch.int32:
        raise ValueError(f"grouped_gemm: offsets must be int32, got {offsets.dtype}")
    if is_gated(activation) and weight.shape[1] % 2:
        raise ValueError(
            f"grouped_gemm: {activation} needs each expert's gate and up weights stacked as [E, 2N, K]; got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != tuple(weight.shape[:2]):
        raise ValueError(
            f"grouped_gemm: bias must be [E, {'2N' if is_gated(activation) else 'N'}] = {list(weight.shape[:2])} "
            f"(one row per expert, as the weight's rows), got {list(bias.shape)}"
        )
    if bias is not None and bias.dtype not in (x.dtype, out_dtype or x.dtype):
        raise ValueError(f"grouped_gemm: bias must be in x's dtype {x.dtype} or the output's, got {bias.dtype}")
    return gemm_out_features(weight.shape[1], activation)


def check_group_offsets(offsets: torch.Tensor, m: int) -> None:
    """Check a grouped GEMM's `offsets` values: non-negative, non-decreasing, the last equal to
    the row count `m`. Reads the offsets on the host (a device sync), so only eager calls do it."""
    ends = offsets.tolist()
    if ends and ends[0] < 0:
        raise ValueError(f"grouped_gemm: offsets must be non-negative, got {ends}")
    for e, (a, b) in enumerate(zip(ends, ends[1:]), start=1):
        if b < a:
            raise ValueError(f"grouped_gemm: offsets must be non-decreasing (cumulative end rows), but offsets[{e}]={b} < offsets[{e - 1}]={a}")
    if (ends[-1] if ends else 0) != m:
        got = ends[-1] if ends else "no offsets (no expert)"
        raise ValueError(f"grouped_gemm: the last offset must equal x's row count M={m} (every row in a group), got {got}")


@_op("grouped_gemm")
def _grouped_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor | None,
    activation: str = "none",
    out_dtype: torch.dtype | None = None,
    plan: str = "",
    target: str = "",
    bias: torch.Tensor | None = None,
    alpha: float | None = None,
    limit: float | None = None,
) -> torch.Tensor:
    """out[M, N]: rows offsets[e-1]:offsets[e] of x times expert e's weight (plus its bias row), by
    fixed-tile kernels (out[E, T, N]: x[e] times expert e's weight, when offsets is None).

    `plan` is the encoded tile plan the compiler chose ("" = build one for the current config);
    `target` the kernel target ("" = the current config's). See `grouped_gemm`.
    """
    from .runtime import run_grouped_gemm

    _check_grouped_gemm_args(x, weight, offsets, activation, bias, alpha, limit, out_dtype)
    return run_grouped_gemm(x, weight, offsets, activation, out_dtype or x.dtype, plan, target, bias,
                            clamp=None if alpha is None else (alpha, limit))


@_grouped_gemm.register_fake
def _grouped_gemm_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor | None,
    activation: str = "none",
    out_dtype: torch.dtype | None = None,
    plan: str = "",
    target: str = "",
    bias: torch.Tensor | None = None,
    alpha: float | None = None,
    limit: float | None = None,
) -> torch.Tensor:
    n = _check_grouped_gemm_args(x, weight, offsets, activation, bias, alpha, limit, out_dtype)
    return x.new_empty((*x.shape[:-1], n), dtype=out_dtype or x.dtype)


def grouped_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    out_dtype: torch.dtype | None = None,
    bias: torch.Tensor | None = None,
    alpha: float | None = None,
    limit: float | None = None,
) -> torch.Tensor:
    """Grouped (MoE expert) GEMM with dynamic group sizes, run by fixed-tile kernels (SmoothGEMM).

    `x` is [M, K] with its rows sorted by expert; `weight` is [E, N, K] (`F.linear` convention per
    expert, any strides: a transposed view of a [E, K, N] tensor works); `offsets` is int32 [E],
    the cumulative end row of each expert's group (rows of expert e are offsets[e-1]:offsets[e],
    offsets[-1] == M; empty groups are fine). Returns out[M, N] with
    `out[rows of e] = act(x[rows of e] @ weight[e].T + bias[e])`. With `activation="swiglu"` the
    weight is [E, 2N, K] (gate rows, then up rows) and the result `silu(x @ Wg.T + bg) * (x @ Wu.T
    + bu)`, [M, N] (`geglu`, `geglu_tanh`: gelu of the gate, exact or tanh). `bias`, optional, is
    one row per expert: [E, N], or [E, 2N] (gate, then up) with a gated activation; it replaces
    the gather `bias[expert_ids]` an MoE layer adds after `torch._grouped_mm`.
    `activation="clamped_swiglu"` is gpt-oss's, with its `alpha` and `limit`: `(clamp(u, -limit,
    limit) + 1) * g * sigmoid(alpha * g)`, g = min(gate, limit), over gpt-oss's layout: the gate
    and up rows of `weight` [E, 2N, K] (and columns of `bias` [E, 2N]) interleave, gate j at 2j
    and up j at 2j + 1.
    Each group's last tile is masked (virtual padding); the tile config is the plan's for the
    expected rows per expert, ceil(M / E). Eager calls check the offsets' values (ValueError);
    inside a compiled graph they are the caller's contract, and rows past offsets[-1] are not
    written (as with `torch._grouped_mm`).

    Without `offsets` the GEMM is batched: `x` is [E, T, K], expert e's rows are x[e], and the
    result is [E, T, N] (`torch.bmm(x, weight.transpose(1, 2))` with the activation; Llama-4
    runs every token through every expert that way).
    """
    if not torch.compiler.is_compiling():
        _check_grouped_gemm_args(x, weight, offsets, activation or "none", bias, alpha, limit, out_dtype)
        if offsets is not None:
            check_group_offsets(offsets, x.shape[0])
    return torch.ops.tileflow.grouped_gemm(x, weight, offsets, activation or "none", out_dtype, "", "", bias, alpha, limit)


@_op("meta_attention_varlen")
def _meta_attention_varlen(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seqlens_kv: torch.Tensor,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    tree_mask: torch.Tensor | None = None,
    target: str = "",
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Varlen paged-KV attention for a mixed batch (see `meta_attention_varlen`)."""
    from .runtime.attention import run_meta_attention_varlen

    return run_meta_attention_varlen(
        q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_kv,
        scale=scale, causal=causal, sliding_window=sliding_window, tree_mask=tree_mask, target=target,
        softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
    )


@_meta_attention_varlen.register_fake
def _meta_attention_varlen_fake(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_kv, scale=None,
                                causal=True, sliding_window=None, tree_mask=None, target="", softcap=None,
                                sinks=None, alibi_slopes=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def meta_attention_varlen(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seqlens_kv: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    tree_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention for a batch mixing prefill, chunked prefill, decode and speculative verify.

    `q` is [total_q, Hq, D]; `k_cache`/`v_cache` are paged, [num_blocks, block_size, Hkv, D],
    with the new tokens' K/V already written; `block_table` int32 [S, max_blocks];
    `cu_seqlens_q` int32 [S + 1] (sequence s owns q rows cu[s]:cu[s+1]); `seqlens_kv` int32 [S].
    Query row i of sequence s sits at position p = L_s - n_s + i; with `causal` it sees positions
    <= p, and with `sliding_window=w` as well only positions > p - w: (p - w, p], the last w.
    Without `causal` a window bounds only from below (positions > p - w, as `meta_attention`'s
    window). `tree_mask` bool [S, T, T] gives, for sequences with n_s <= T, exactly which of
    their new positions each row sees (speculative verify over a token tree). Head h reads KV head h // (Hq // Hkv); `scale`
    defaults to 1/sqrt(D); `softcap` caps the scaled scores at +-softcap, `softcap * tanh(scores
    / softcap)` (Gemma-2's logit soft-capping); `sinks` (float [Hq]) are attention-sink logits,
    each joining its head's softmax as a key that adds no value (gpt-oss); `alibi_slopes` (float
    [Hq]): ALiBi, head h's score of the key at position j gains `slope[h] * (j - p)` for the query
    at position p (BLOOM, MPT; `-slope * |p - j|` on the keys a causal row sees, as in
    flash-attention; not with `tree_mask`, whose drafts' positions are depths). Returns q's shape
    and dtype. Bad metadata raises ValueError.
    """
    # Before the op: its schema (Optional[int]) would turn True into a window of 1.
    check_sliding_window("meta_attention_varlen", sliding_window)
    return torch.ops.tileflow.meta_attention_varlen(
        q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_kv, scale, causal, sliding_window, tree_mask, "",
        softcap, sinks, alibi_slopes,
    )


@_op("meta_attention")
def _meta_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    target: str = "",
    mask_ranges: torch.Tensor | None = None,
    softcap: torch.Tensor | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: list[float] | None = None,
    attention_chunk: int | None = None,
    key_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense attention `[B, Hq, S, D]` through the meta-kernel (see `meta_attention`).

    `mask_ranges` is `attention_mask_ranges(attn_mask)` when the graph computed it once for
    every layer that shares the mask (the attention pass does); None: computed per call.
    `softcap` is a one-element tensor holding the logit soft-cap: a tensor, since under
    `dynamic=True` Dynamo makes a model's float attribute a 0-d (CPU) tensor input. The ALiBi
    slopes are numbers: the attention pass reads them from the graph's constants.
    """
    from .runtime.attention import run_meta_attention

    return run_meta_attention(q, k, v, attn_mask, causal, scale, target, mask_ranges=mask_ranges, softcap=softcap,
                              sliding_window=sliding_window, sinks=sinks, alibi_slopes=alibi_slopes,
                              attention_chunk=attention_chunk, key_starts=key_starts)


@_meta_attention.register_fake
def _meta_attention_fake(q, k, v, attn_mask=None, causal=False, scale=None, target="", mask_ranges=None, softcap=None,
                         sliding_window=None, sinks=None, alibi_slopes=None, attention_chunk=None, key_starts=None):
    b, hq, s, d = q.shape
    return q.new_empty((b, s, hq, d)).transpose(1, 2)


@_op("attention_mask_ranges")
def _attention_mask_ranges(mask: torch.Tensor) -> torch.Tensor:
    """Per row of an attention mask, where its keys matter (see `attention_mask_ranges`)."""
    from .attention_inputs import bias_ranges

    mask4 = _mask_as_4d(mask)
    return bias_ranges(mask4).expand(mask4.shape[0], mask4.shape[2], 4).contiguous()


@_attention_mask_ranges.register_fake
def _attention_mask_ranges_fake(mask):
    mask4 = _mask_as_4d(mask)
    return mask.new_empty((mask4.shape[0], mask4.shape[2], 4), dtype=torch.int32)


def _mask_as_4d(mask: torch.Tensor) -> torch.Tensor:
    """An SDPA mask (at most 4-D, broadcast from the right) as a 4-D view."""
    if mask.dim() > 4 or mask.dim() == 0:
        raise ValueError(f"an attention mask must have 1 to 4 dims, got shape {tuple(mask.shape)}")
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def attention_mask_ranges(mask: torch.Tensor) -> torch.Tensor:
    """For an SDPA attention mask (bool, True = attend, or additive; broadcastable to
    `[B, H, S, S_kv]` with its key dim whole), int32 `[B | 1, S | 1, 4]`: per sequence and query
    row the keys `(lo, full_lo, full_hi, hi)` such that every key the row sees (any head) lies in
    `[lo, hi)` and every key in `[full_lo, full_hi)` is seen by every head with nothing added
    (see `tileflow.attention_inputs.bias_ranges`). The meta-attention kernel skips the keys
    outside and reads the mask only outside the plain run: a causal mask costs what `causal=True`
    does. Computed once per mask, it serves every layer that shares it."""
    return torch.ops.tileflow.attention_mask_ranges(mask)


def meta_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    softcap: float | torch.Tensor | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: Sequence[float] | torch.Tensor | None = None,
    attention_chunk: int | None = None,
    key_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """`scaled_dot_product_attention` semantics for `q [B, Hq, S, D]`, `k`/`v [B, Hkv, S_kv, D]`
    (GQA when Hkv divides Hq), run by the meta-attention kernel. Query i sits at key position
    S_kv - S + i, which `causal`, `sliding_window`, `attention_chunk` and `alibi_slopes` read:
    with any of them S <= S_kv (ValueError otherwise); without them S > S_kv is plain SDPA
    (cross-attention over a shorter input; over no key at all, zeros as eager). `attn_mask` is bool
    (True = attend) or additive, broadcastable to [B, Hq, S, S_kv]; `causal`: query i sees the keys
    up to position S_kv - S + i (for S < S_kv the last query at the last key, as flash attention
    does, where SDPA's `is_causal` puts the first query at the first key). `softcap`
    (a number or a one-element tensor) caps the scaled scores before the mask: `softcap *
    tanh(scores / softcap)`, Gemma-2's logit soft-capping. `sliding_window=w`: query i (at key
    position S_kv - S + i) sees only the keys after position S_kv - S + i - w, as transformers'
    sliding-window layers. `sinks` (float [Hq]): gpt-oss's attention sinks, one logit per head
    that joins the head's softmax as a key adding no value. `alibi_slopes` (Hq numbers, or a
    float [Hq] tensor, read on the host): ALiBi, head h's score of key j for query i gains
    `slope[h] * (j - (S_kv - S + i))`, as BLOOM's and MPT's `slope * j` does up to a per-row
    constant the softmax ignores (with `sinks` too, the kernel's form is the one applied).
    `attention_chunk=c`: Llama 4's chunked attention, the positions cut into chunks of c and a
    query seeing only the keys of its own chunk (query at position p: keys in
    [c * (p // c), c * (p // c + 1)), the upper bound mattering without `causal`).
    `key_starts` (integer `[B | 1, S]`): query i of row b sees no key before position
    `key_starts[b, i]`: several sequences packed in one row, each query's sequence starting there
    (with `causal`, the row's sequences are kept apart without an `[S, S_kv]` mask)."""
    check_sliding_window("meta_attention", sliding_window)  # before the op's schema, as above
    check_sliding_window("meta_attention", attention_chunk, "attention_chunk")
    if softcap is not None and not isinstance(softcap, torch.Tensor):
        softcap = torch.tensor(float(softcap))
    if alibi_slopes is not None:
        slopes = alibi_slopes.tolist() if isinstance(alibi_slopes, torch.Tensor) else list(alibi_slopes)
        if len(slopes) != q.shape[1] or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in slopes):
            raise ValueError(f"meta_attention: alibi_slopes must be {q.shape[1]} finite numbers (one per query "
                             f"head), got {alibi_slopes!r}")
        alibi_slopes = [float(x) for x in slopes]
    return torch.ops.tileflow.meta_attention(q, k, v, attn_mask, causal, scale, "", None, softcap, sliding_window,
                                             sinks, alibi_slopes, attention_chunk, key_starts)
