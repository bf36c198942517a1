"""The public kernel ops on inputs the usual tests do not build, on the reference target and on
Triton (the interpreter without a GPU): strided and expanded operands the kernels index without
strides, and NaN inputs, which must come out NaN, not as plausible numbers."""

from __future__ import annotations

import os

import torch

# As in tests/test_triton_gemm.py: the interpreter must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import tileflow  # noqa: E402
from tileflow import ops  # noqa: E402

pytest.importorskip("triton", reason="the Triton target needs triton installed")

TARGETS = ["reference", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _on(target: str):
    return tileflow.use_config(tileflow.Config(target=target))


@pytest.mark.parametrize("target", TARGETS)
def test_gemm_reads_strided_and_expanded_biases(target: str) -> None:
    """The kernels read a bias as N consecutive values: a strided view, an expanded scalar and a
    column of a matrix were misread on Triton (an expanded one read past its storage)."""
    gen = torch.Generator().manual_seed(0)
    m, k, n = 5, 24, 20
    x, w = torch.randn(m, k, generator=gen).to(DEVICE), torch.randn(n, k, generator=gen).to(DEVICE)
    biases = [torch.randn(2 * n, generator=gen)[::2], torch.randn(1, generator=gen).expand(n),
              torch.randn(n, 2, generator=gen)[:, 0]]
    with _on(target):
        for bias in biases:
            bias = bias.to(DEVICE)
            want = x.double() @ w.double().t() + bias.double()
            torch.testing.assert_close(ops.padded_gemm(x, w, bias).double(), want, rtol=1e-4, atol=1e-4)
        w2, b2 = torch.randn(2 * n, k, generator=gen).to(DEVICE), torch.randn(4 * n, generator=gen)[::2].to(DEVICE)
        gate = x.double() @ w2[:n].double().t() + b2[:n].double()
        up = x.double() @ w2[n:].double().t() + b2[n:].double()
        got = ops.padded_gemm(x, w2, b2, activation="swiglu")
        torch.testing.assert_close(got.double(), torch.nn.functional.silu(gate) * up, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", TARGETS)
def test_grouped_gemm_reads_strided_offsets(target: str) -> None:
    """Group offsets taken as a column of a larger int32 tensor (stride 2): Triton read them as
    if contiguous, and with larger hidden values wrote rows past the output."""
    gen = torch.Generator().manual_seed(1)
    m, k, n = 7, 24, 20
    x, w = torch.randn(m, k, generator=gen).to(DEVICE), torch.randn(3, n, k, generator=gen).to(DEVICE)
    offsets = torch.tensor([[2, 50], [2, 60], [7, 70]], dtype=torch.int32)[:, 0].to(DEVICE)
    want, start = torch.zeros(m, n, dtype=torch.float64, device=DEVICE), 0
    for e, end in enumerate(offsets.tolist()):
        want[start:end] = x[start:end].double() @ w[e].double().t()
        start = end
    with _on(target):
        torch.testing.assert_close(ops.grouped_gemm(x, w, offsets).double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", TARGETS)
def test_nan_inputs_come_out_nan_from_attention(target: str) -> None:
    """A NaN in a query, in the cache, in a sink or an ALiBi slope reaches the rows it feeds as
    NaN on both targets (Triton's final step read a NaN row sum as "saw no key" and wrote 0)."""
    gen = torch.Generator().manual_seed(2)
    hq, hkv, d, bs = 4, 2, 16, 4
    k = torch.randn(6, bs, hkv, d, generator=gen)
    v = torch.randn(6, bs, hkv, d, generator=gen)
    block_table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    cu, lens = torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([7, 5], dtype=torch.int32)
    q = torch.randn(5, hq, d, generator=gen)
    args = [t.to(DEVICE) for t in (q, k, v, block_table, cu, lens)]
    with _on(target):
        clean = ops.meta_attention_varlen(*args)
        assert torch.isfinite(clean).all()
        q_nan = args[0].clone()
        q_nan[0, 0, 0] = float("nan")
        out = ops.meta_attention_varlen(q_nan, *args[1:])
        assert out[0, 0].isnan().all() and torch.isfinite(out[1:]).all()
        k_nan = args[1].clone()
        k_nan[0, 1, 0, 0] = float("nan")  # sequence 0's position 1, KV head 0: every row of it sees it
        out = ops.meta_attention_varlen(args[0], k_nan, *args[2:])
        assert out[:3, :2].isnan().all() and torch.isfinite(out[3:]).all()
        sinks = torch.tensor([float("nan"), 0.0, 0.0, 0.0], device=DEVICE)
        out = ops.meta_attention_varlen(*args, sinks=sinks)
        assert out[:, 0].isnan().all() and torch.isfinite(out[:, 1:]).all()
        slopes = torch.tensor([float("nan"), 0.1, 0.1, 0.1], device=DEVICE)
        out = ops.meta_attention_varlen(*args, alibi_slopes=slopes)
        assert out[:, 0].isnan().all() and torch.isfinite(out[:, 1:]).all()
