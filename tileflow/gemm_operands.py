"""The operands of a `padded_gemm` or `grouped_gemm` launch, validated once for every backend.

A GEMM launcher (Triton, Ascend C, reference) takes `x`, `weight` and the epilogue's tensors in
the `F.linear` convention; `gemm_operands` / `grouped_gemm_operands` check them against the
KernelSpec (shapes, dtypes, devices), split a stacked SwiGLU weight/bias into its gate and up
halves, and allocate the output, so that each backend only moves pointers and strides.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from .kernel_spec import (
    CLAMPED_SWIGLU,
    DTYPES,
    GATED_ACTIVATIONS,
    KernelSpec,
    dtype_name,
    gated_activation,
    gemm_dims,
    gemm_segments,
    grouped_gemm_dims,
    is_gated,
)

__all__ = ["GemmOperands", "GroupedGemmOperands", "apply_activation", "apply_gated_activation", "gate_and_up", "gemm_operands",
           "grouped_gemm_operands"]


def apply_activation(acc: torch.Tensor, activation: str) -> torch.Tensor:
    """A GEMM epilogue's activation of one accumulator (`none` or one of `UNARY_ACTIVATIONS`) in
    torch ops: the definition the reference backend and the runtime's empty-dimension GEMM run."""
    f = torch.nn.functional
    if activation == "none":
        return acc
    if activation == "silu":
        return f.silu(acc)
    if activation == "gelu":
        return f.gelu(acc)
    if activation == "gelu_tanh":
        return f.gelu(acc, approximate="tanh")
    if activation == "relu":
        return f.relu(acc)
    if activation == "relu2":
        return f.relu(acc).square()
    raise ValueError(f"unknown activation {activation!r}")


def gate_and_up(stacked: Any, activation: str) -> tuple[Any, Any]:
    """The gate and up halves of a gated GEMM's stacked operand along its dim 1 (a weight
    [E, 2N, K] or [2N, K], a bias [E, 2N], a product [M, 2N]), as views: gate rows first, then
    up rows; `clamped_swiglu`'s interleave (gpt-oss's layout: gate j at 2j, up j at 2j + 1)."""
    if activation == CLAMPED_SWIGLU:
        return stacked[:, 0::2], stacked[:, 1::2]
    n = stacked.shape[1] // 2
    return stacked[:, :n], stacked[:, n:]


def apply_gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str,
                           clamp: tuple[float, float] | None = None) -> torch.Tensor:
    """A gated GEMM's epilogue (`activation` one of `GATED_ACTIVATIONS`, or `CLAMPED_SWIGLU` with
    `clamp` = (alpha, limit)): its gate's activation of the gate accumulator times the up
    accumulator, in torch ops."""
    if activation == CLAMPED_SWIGLU:
        if clamp is None:
            raise ValueError("clamped_swiglu needs its (alpha, limit)")
        alpha, limit = clamp
        gate = gate.clamp(max=limit)
        return (up.clamp(-limit, limit) + 1) * (gate * torch.sigmoid(alpha * gate))
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"unknown gated activation {activation!r}; expected one of {[*GATED_ACTIVATIONS, CLAMPED_SWIGLU]}")
    return apply_activation(gate, GATED_ACTIVATIONS[activation]) * up


@dataclass
class GemmOperands:
    """Checked launch operands: `weight`/`bias` are the gate half for a gated activation, `weight_up`/`bias_up`
    the up half (None otherwise); for a spec with N segments `weight`/`bias` are the first
    segment's and `more_weights`/`more_biases` the others' (empty otherwise); `out` is [M, N] of
    the spec's out_dtype."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    residual: torch.Tensor | None
    out: torch.Tensor
    weight_up: torch.Tensor | None
    bias_up: torch.Tensor | None
    more_weights: tuple[torch.Tensor, ...] = ()
    more_biases: tuple[torch.Tensor, ...] = ()

    @property
    def m(self) -> int:
        """The token count of this launch."""
        return self.x.shape[0]


def _check_operand(
    where: str, name: str, t: Any, shape: tuple[int, ...], dtypes: set[torch.dtype], device: torch.device
) -> None:
    """Raise ValueError unless `t` is a tensor of `shape`, one of `dtypes`, on `device`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{where}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype not in dtypes:
        want = " or ".join(sorted(dtype_name(d) for d in dtypes))
        raise ValueError(f"{where}: {name} must be {want}, got {dtype_name(t.dtype)}")
    if t.device != device:
        raise ValueError(f"{where}: {name} is on {t.device} but x is on {device}")


def _check_x(where: str, x: Any, k: int) -> None:
    """x must be a 2-D [M, K] tensor (its dtype and K are checked with the other operands)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{where}: x must be a 2-D [M, K={k}] tensor, got {got}")


def check_operand_kinds(where: str, x: torch.Tensor, weights: dict[str, Any], sides: dict[str, Any],
                        out_dtype: torch.dtype) -> None:
    """The dtype and device rules of a launch, for calls no kernel runs (an empty dimension, no
    rows): every weight in x's dtype, a bias or residual in it or `out_dtype`, all on x's device.
    ValueError says which operand breaks them (as `gemm_operands` would), and which dtype no
    kernel has (a call with a dimension to tile is refused for it: an empty one must be too)."""
    for name, dtype in (("x", x.dtype), ("out_dtype", out_dtype)):
        if dtype_name(dtype) not in DTYPES:
            raise ValueError(f"{where}: {name} must be one of {DTYPES}, got {dtype_name(dtype)}")
    for name, t in weights.items():
        if t is not None:
            _check_operand(where, name, t, tuple(t.shape), {x.dtype}, x.device)
    for name, t in sides.items():
        if t is not None:
            _check_operand(where, name, t, tuple(t.shape), {x.dtype, out_dtype}, x.device)


@functools.lru_cache(maxsize=512)
def _gemm_layout(spec: KernelSpec) -> tuple[int, int, bool, torch.dtype, torch.dtype, frozenset, str, tuple[int, ...]]:
    """What `gemm_operands` checks a launch of `spec` against, worked out once per spec:
    (n, k, gated, in dtype, out dtype, dtypes a side operand may have, where, N's segments)."""
    n, k = gemm_dims(spec)
    in_dtype, out_dtype = getattr(torch, spec.dtype), getattr(torch, spec.out_dtype)
    return (n, k, is_gated(spec.epilogue), in_dtype, out_dtype, frozenset({in_dtype, out_dtype}), f"kernel {spec.name}",
            gemm_segments(spec))


def gemm_operands(
    spec: KernelSpec,
    x: Any,
    weight: Any,
    bias: Any = None,
    residual: Any = None,
    *,
    out: Any = None,
    weight_up: Any = None,
    bias_up: Any = None,
    more_weights: Any = (),
    more_biases: Any = (),
) -> GemmOperands:
    """Validate a launch of `spec` and return its operands; ValueError says what is wrong.

    `x` is [M, K] of the spec dtype; `weight` is [N, K] ([2N, K] stacked gate/up for a gated activation, or
    [N, K] with `weight_up` [N, K]); `bias` ([N] / [2N] / [N] + `bias_up`) and `residual` [M, N]
    are given exactly when the epilogue has them, in the spec dtype or out_dtype; `out`, when
    given, is [M, N] of out_dtype. A spec with N segments of widths (w_0, w_1, ...) takes
    `weight` [w_0, K] and `more_weights` [w_i, K] for the others, and with a bias `bias` [w_0]
    and `more_biases` [w_i].
    """
    n, k, gated, in_dtype, out_dtype, side_dtypes, where, segments = _gemm_layout(spec)
    ep = spec.epilogue
    w_rows = 2 * n if gated else segments[0]

    _check_x(where, x, k)
    m, device = x.shape[0], x.device

    def check(name: str, t: Any, shape: tuple[int, ...], dtypes: set[torch.dtype]) -> None:
        _check_operand(where, name, t, shape, dtypes, device)

    check("x", x, (m, k), {in_dtype})
    more_weights, more_biases = tuple(more_weights or ()), tuple(more_biases or ())
    if len(segments) > 1 or more_weights or more_biases:
        _check_segments(where, segments, more_weights, more_biases, "bias" in ep)
        for i, (w, width) in enumerate(zip(more_weights, segments[1:]), start=1):
            check(f"weight of segment {i}", w, (width, k), {in_dtype})
        for i, (b, width) in enumerate(zip(more_biases, segments[1:]), start=1):
            check(f"bias of segment {i}", b, (width,), side_dtypes)
    if (weight_up is not None or bias_up is not None) and not gated:
        raise ValueError(f"{where}: weight_up/bias_up are for a gated epilogue (swiglu, geglu, geglu_tanh) only")
    if gated and weight_up is not None:
        check("weight", weight, (n, k), {in_dtype})
        check("weight_up", weight_up, (n, k), {in_dtype})
    else:
        check("weight", weight, (w_rows, k), {in_dtype})
        if gated:
            weight, weight_up = weight[:n], weight[n:]
    if "bias" in ep:
        if bias is None:
            raise ValueError(f"{where}: the epilogue has 'bias' but no bias was given")
        if gated and bias_up is not None:
            check("bias", bias, (n,), side_dtypes)
            check("bias_up", bias_up, (n,), side_dtypes)
        else:
            check("bias", bias, (w_rows,), side_dtypes)
            if gated:
                bias, bias_up = bias[:n], bias[n:]
    elif bias_up is not None:
        raise ValueError(f"{where}: a bias_up was given but the epilogue {ep} has no 'bias'")
    elif bias is not None:
        raise ValueError(f"{where}: a bias was given but the epilogue {ep} has no 'bias'")
    if "residual" in ep:
        if residual is None:
            raise ValueError(f"{where}: the epilogue has 'residual' but no residual was given")
        check("residual", residual, (m, n), side_dtypes)
    elif residual is not None:
        raise ValueError(f"{where}: a residual was given but the epilogue {ep} has no 'residual'")
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=device)
    else:
        check("out", out, (m, n), {out_dtype})
        _check_no_overlap(where, out, {"x": x, "weight": weight, "weight_up": weight_up, "bias": bias,
                                       "bias_up": bias_up, "residual": residual,
                                       **{f"weight of segment {i}": w for i, w in enumerate(more_weights, 1)},
                                       **{f"bias of segment {i}": b for i, b in enumerate(more_biases, 1)}})
    # The kernels read a bias as N consecutive values (no stride): a strided or expanded one
    # (`b[::2]`, `b.expand(n)`) is copied first (a no-op for the usual contiguous bias).
    bias, bias_up = (None if b is None else b.contiguous() for b in (bias, bias_up))
    more_biases = tuple(b.contiguous() for b in more_biases)
    return GemmOperands(x, weight, bias, residual, out, weight_up, bias_up, more_weights, more_biases)


def _check_segments(where: str, segments: tuple[int, ...], more_weights: tuple, more_biases: tuple,
                    has_bias: bool) -> None:
    """A segmented launch has one more weight per segment after the first, and a bias for each
    exactly when the epilogue adds one."""
    if len(more_weights) != len(segments) - 1:
        raise ValueError(f"{where}: the kernel's N has {len(segments)} segment(s) {list(segments)}, so it takes "
                         f"{len(segments) - 1} more weight(s) after the first, got {len(more_weights)}")
    if len(more_biases) != (len(segments) - 1 if has_bias else 0):
        want = f"{len(segments) - 1} more bias(es) after the first" if has_bias else "no more biases (its epilogue has no 'bias')"
        raise ValueError(f"{where}: the kernel takes {want}, got {len(more_biases)}")


def _check_no_overlap(where: str, out: torch.Tensor, inputs: dict[str, Any]) -> None:
    """Refuse an `out` sharing memory with an input: tiles write it while later tiles still read
    that input (an `out` that is x read its own products, 314 off)."""
    for name, t in inputs.items():
        if isinstance(t, torch.Tensor) and t.numel() and out.numel() and torch._C._overlaps(out, t):
            raise ValueError(f"{where}: out shares memory with {name}; give an output buffer of its own")


@dataclass
class GroupedGemmOperands:
    """Checked launch operands of a grouped GEMM: `weight` [E, N, K] (the gate half for a gated activation,
    `weight_up` [E, N, K] the up half, else None; for `clamped_swiglu` the whole interleaved
    [E, 2N, K]), `offsets` int32 [E], `out` [M, N]; with a bias epilogue `bias` [E, N] (split as
    the weight is, `bias_up` the up's), each row of consecutive values."""

    x: torch.Tensor
    weight: torch.Tensor
    weight_up: torch.Tensor | None
    offsets: torch.Tensor
    out: torch.Tensor
    bias: torch.Tensor | None = None
    bias_up: torch.Tensor | None = None

    @property
    def m(self) -> int:
        """The row count of this launch (all groups together)."""
        return self.x.shape[0]


def grouped_gemm_operands(spec: KernelSpec, x: Any, weight: Any, offsets: Any, bias: Any = None, *,
                          out: Any = None, split_interleaved: bool = False) -> GroupedGemmOperands:
    """Validate a launch of a `grouped_gemm` spec and return its operands; ValueError says why.

    `x` is [M, K] of the spec dtype, rows sorted by group; `weight` [E, N, K] ([E, 2N, K], gate
    rows then up rows, for a gated activation) of the spec dtype, any strides; `offsets` int32 [E], the end
    row of each group. Only metadata is checked here (no device->host copy, so a launch can be
    captured in a CUDA graph); the offsets' values are the caller's contract (`tileflow.ops.
    grouped_gemm` checks them in eager calls). `bias` ([E, N], or [E, 2N] gate then up for a gated
    activation; the spec dtype or out_dtype) is given exactly when the epilogue has one: expert
    e's rows gain row e. `out`, when given, is [M, N] of out_dtype. The gated halves come back
    as `weight`/`weight_up` (and `bias`/`bias_up`) views, but for `clamped_swiglu`, whose
    interleaved weight and bias stay whole unless `split_interleaved` (for kernels that read
    gate and up as two operands; the Triton kernel reads them in one wide tile).
    """
    n, k, e = grouped_gemm_dims(spec)
    gated = is_gated(spec.epilogue)
    in_dtype, out_dtype = getattr(torch, spec.dtype), getattr(torch, spec.out_dtype)
    where = f"kernel {spec.name}"
    _check_x(where, x, k)
    m, device = x.shape[0], x.device
    _check_operand(where, "x", x, (m, k), {in_dtype}, device)
    rows = 2 * n if gated else n
    _check_operand(where, "weight", weight, (e, rows, k), {in_dtype}, device)
    _check_operand(where, "offsets", offsets, (e,), {torch.int32}, device)
    offsets = offsets.contiguous()  # the kernels read offsets[e] with no stride
    bias_up = None
    if "bias" in spec.epilogue:
        if bias is None:
            raise ValueError(f"{where}: the epilogue has 'bias' but no bias was given")
        _check_operand(where, "bias", bias, (e, rows), {in_dtype, out_dtype}, device)
        # The kernels read a bias row as consecutive values: a strided one is copied first.
        bias = bias if bias.stride(-1) == 1 else bias.contiguous()
    elif bias is not None:
        raise ValueError(f"{where}: a bias was given but the epilogue {spec.epilogue} has no 'bias'")
    weight_up = None
    activation = gated_activation(spec.epilogue)
    if gated and (activation != CLAMPED_SWIGLU or split_interleaved):
        weight, weight_up = gate_and_up(weight, activation)  # views: the stacked tensor is not copied
        if bias is not None:
            bias, bias_up = gate_and_up(bias, activation)
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=device)
    else:
        _check_operand(where, "out", out, (m, n), {out_dtype}, device)
    return GroupedGemmOperands(x, weight, weight_up, offsets, out, bias, bias_up)
