"""Runtime: runs tileflow's ops on the current target (kernel choice, caches, dispatch)."""

from __future__ import annotations

import torch

from ..backends.reference.gemm import gemm_tile


def run_padded_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    out_dtype: torch.dtype,
    plan: str,
) -> torch.Tensor:
    """Execute `tileflow::padded_gemm` on the current target."""
    return gemm_tile(x, weight, bias, residual, activation, out_dtype)
