"""Reference padded GEMM: the same math as the kernels, in PyTorch ops (the CPU default and oracle)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def activate(acc: torch.Tensor, activation: str) -> torch.Tensor:
    """Apply a GEMM epilogue activation (`none`, `silu`, `gelu`, `gelu_tanh`) to an accumulator."""
    if activation == "none":
        return acc
    if activation == "silu":
        return F.silu(acc)
    if activation == "gelu":
        return F.gelu(acc)
    if activation == "gelu_tanh":
        return F.gelu(acc, approximate="tanh")
    raise ValueError(f"unknown activation {activation!r}")


def gemm_tile(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """residual + act(x @ weight.T + bias) for one block of rows, accumulated in float32 (or
    float64 for float64 inputs) like the kernels do."""
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    acc = x.to(acc_dtype) @ weight.to(acc_dtype).t()
    if bias is not None:
        acc = acc + bias.to(acc_dtype)
    if activation == "swiglu":
        n = acc.shape[1] // 2
        acc = F.silu(acc[:, :n]) * acc[:, n:]
    else:
        acc = activate(acc, activation)
    if residual is not None:
        acc = acc + residual.to(acc_dtype)
    return acc.to(out_dtype)


def ceil_div(a: int, b: int) -> int:
    """Integer ceil(a / b)."""
    return -(-a // b) if b else math.inf  # type: ignore[return-value]
