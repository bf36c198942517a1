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
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, activation: str
) -> None:
    if activation not in _ACTIVATION_NAMES:
        raise ValueError(f"padded_gemm: unknown activation {activation!r}; use one of {list(_ACTIVATION_NAMES)}")
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"padded_gemm: x must be [M, K] and weight [N, K]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"padded_gemm: K mismatch, x is {tuple(x.shape)} and weight is {tuple(weight.shape)}")
    if activation == "swiglu" and weight.shape[0] % 2:
        raise ValueError(
            f"padded_gemm: swiglu needs the gate and up weights stacked as [2N, K]; got {tuple(weight.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"padded_gemm: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    n = gemm_out_features(weight.shape[0], activation)
    if residual is not None and (residual.dim() != 2 or residual.shape[1] != n or residual.shape[0] != x.shape[0]):
        raise ValueError(f"padded_gemm: residual must be [M, {n}], got {tuple(residual.shape)}")


@torch.library.custom_op("tileflow::padded_gemm", mutates_args=())
def _padded_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: str = "none",
    out_dtype: torch.dtype | None = None,
    plan: str = "",
) -> torch.Tensor:
    """out[M, N] = residual + act(x @ weight.T + bias), computed by fixed-tile kernels (see runtime)."""
    from .runtime import run_padded_gemm

    _check_gemm_args(x, weight, bias, residual, activation)
    return run_padded_gemm(x, weight, bias, residual, activation, out_dtype or x.dtype, plan)


@_padded_gemm.register_fake
def _padded_gemm_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: str = "none",
    out_dtype: torch.dtype | None = None,
    plan: str = "",
) -> torch.Tensor:
    _check_gemm_args(x, weight, bias, residual, activation)
    n = gemm_out_features(weight.shape[0], activation)
    return x.new_empty((x.shape[0], n), dtype=out_dtype or x.dtype)


def padded_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dynamic-M GEMM like `F.linear`, run by a tile plan's fixed-tile kernels with virtual padding.

    `x` is [M, K]; `weight` is [N, K] (for `activation="swiglu"`, the gate and up weights stacked
    as [2N, K], giving `silu(x @ Wg.T) * (x @ Wu.T)`); `bias` is [N] ([2N] for SwiGLU); `residual`
    [M, N] is added last; `out_dtype` casts the result. Callable eagerly: it builds or reuses the
    plan for the current target (`tileflow.use_config`).
    """
    return torch.ops.tileflow.padded_gemm(x, weight, bias, residual, activation or "none", out_dtype, "")
