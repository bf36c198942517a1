"""tileflow's custom ops, declared with `torch.library.custom_op` plus fake (meta) implementations.

Because they are real library ops with fake implementations, Dynamo, `torch.export`, Inductor and
the `.pt2` format all carry them as opaque calls; the graph after tileflow's passes is still a
valid ATen graph. Each op's real implementation asks the runtime for the kernel of the current
target (`tileflow.use_config` picks it for eager calls).
"""

from __future__ import annotations

import torch

from .kernel_spec import ACTIVATIONS

__all__ = ["padded_gemm", "gemm_out_features"]

_ACTIVATION_NAMES = ("none",) + ACTIVATIONS


def gemm_out_features(weight_rows: int, activation: str) -> int:
    """Output width N of a GEMM whose weight has `weight_rows` rows (SwiGLU halves it)."""
    return weight_rows // 2 if activation == "swiglu" else weight_rows


def _check_gemm_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    weight_up: torch.Tensor | None = None,
    bias_up: torch.Tensor | None = None,
) -> int:
    """Validate a padded_gemm call; return its output width N."""
    if activation not in _ACTIVATION_NAMES:
        raise ValueError(f"padded_gemm: unknown activation {activation!r}; use one of {list(_ACTIVATION_NAMES)}")
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"padded_gemm: x must be [M, K] and weight [N, K]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"padded_gemm: K mismatch, x is {tuple(x.shape)} and weight is {tuple(weight.shape)}")
    if (weight_up is not None or bias_up is not None) and activation != "swiglu":
        raise ValueError("padded_gemm: weight_up/bias_up are only used with activation='swiglu'")
    if weight_up is not None:
        if weight_up.shape != weight.shape:
            raise ValueError(
                f"padded_gemm: weight_up must match weight's shape {tuple(weight.shape)}, got {tuple(weight_up.shape)}"
            )
        n = weight.shape[0]
    else:
        if activation == "swiglu" and weight.shape[0] % 2:
            raise ValueError(
                f"padded_gemm: swiglu needs the gate and up weights stacked as [2N, K] (or passed "
                f"separately as weight and weight_up); got {tuple(weight.shape)}"
            )
        n = gemm_out_features(weight.shape[0], activation)
    bias_rows = n if (weight_up is not None or bias_up is not None) else weight.shape[0]
    for name, b in (("bias", bias), ("bias_up", bias_up)):
        if b is not None and (b.dim() != 1 or b.shape[0] != bias_rows):
            raise ValueError(f"padded_gemm: {name} must be [{bias_rows}], got {tuple(b.shape)}")
    if residual is not None and (residual.dim() != 2 or residual.shape[1] != n or residual.shape[0] != x.shape[0]):
        raise ValueError(f"padded_gemm: residual must be [M, {n}], got {tuple(residual.shape)}")
    return n


@torch.library.custom_op("tileflow::padded_gemm", mutates_args=())
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
) -> torch.Tensor:
    """out[M, N] = residual + act(x @ weight.T + bias), computed by fixed-tile kernels (see runtime).

    `plan` is the encoded tile plan the compiler chose ("" = build one for the current config);
    `target` the kernel target ("" = the current config's).
    """
    from .runtime import run_padded_gemm

    _check_gemm_args(x, weight, bias, residual, activation, weight_up, bias_up)
    return run_padded_gemm(x, weight, bias, residual, activation, out_dtype or x.dtype, plan, target, weight_up, bias_up)


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
) -> torch.Tensor:
    n = _check_gemm_args(x, weight, bias, residual, activation, weight_up, bias_up)
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
) -> torch.Tensor:
    """Dynamic-M GEMM like `F.linear`, run by a tile plan's fixed-tile kernels with virtual padding.

    `x` is [M, K]; `weight` is [N, K]. With `activation="swiglu"` the result is
    `silu(x @ Wg.T + bg) * (x @ Wu.T + bu)`, the gate and up weights given stacked as one [2N, K]
    `weight` (and [2N] `bias`), or separately as `weight`/`weight_up` (and `bias`/`bias_up`).
    `residual` [M, N] is added last; `out_dtype` casts the result. Callable eagerly: it builds or
    reuses the plan for the current target (`tileflow.use_config`).
    """
    return torch.ops.tileflow.padded_gemm(
        x, weight, bias, residual, activation or "none", out_dtype, "", "", weight_up, bias_up
    )
