"""MoE expert GEMMs: tileflow's grouped GEMM, its epilogue fused, against torch's grouped matmul
with the epilogue in torch ops (transformers' grouped path) and a loop of one cuBLAS GEMM per
expert (transformers' eager path).

On a GPU, bf16, tokens routed uniformly at random over the experts:
- Mixtral-8x7B's experts (8 experts, top-2): gate-up, 2 x 14336 x 4096 with SwiGLU, and down,
  4096 x 14336;
- gpt-oss-20b's (32 experts, top-4): gate-up, 2 x 2880 x 2880 with gate and up interleaved,
  per-expert biases and the clamped SwiGLU, and down, 2880 x 2880 with biases.
Every method is checked against a float32 computation of the same rows before it is timed (its
output NaN-filled first). The table gives the median ms (CUDA events), TFLOP/s (2 x routed rows
x weight rows x K), the fraction of the measured bf16 matmul peak, and the ratio to the
`torch._grouped_mm` path; writes bench/results/moe-*.md.

On a CPU-only machine it runs the same methods on small shapes (Triton's interpreter, fp32) as
a smoke check.

    python bench/moe.py [--tokens 1,16,64,256,1024,4096] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass(frozen=True)
class Experts:
    """One expert projection of a model: E weights of `rows` x K, top-k routing, its epilogue."""

    model: str
    proj: str
    experts: int
    top_k: int
    rows: int  # weight rows: 2 x the output width for a gated projection
    k: int
    activation: str  # tileflow's name: none, swiglu, clamped_swiglu
    bias: bool

    @property
    def n(self) -> int:
        """The output width."""
        return self.rows // 2 if self.activation != "none" else self.rows


# gpt-oss's activation constants (transformers' GptOssExperts: alpha 1.702, swiglu_limit 7).
ALPHA, LIMIT = 1.702, 7.0

SHAPES = [
    Experts("Mixtral-8x7B", "gate-up", 8, 2, 2 * 14336, 4096, "swiglu", False),
    Experts("Mixtral-8x7B", "down", 8, 2, 4096, 14336, "none", False),
    Experts("gpt-oss-20b", "gate-up", 32, 4, 2 * 2880, 2880, "clamped_swiglu", True),
    Experts("gpt-oss-20b", "down", 32, 4, 2880, 2880, "none", True),
]
SMOKE_SHAPES = [
    Experts("small", "gate-up", 4, 2, 2 * 40, 24, "swiglu", False),
    Experts("small", "gate-up (gpt-oss)", 4, 2, 2 * 40, 24, "clamped_swiglu", True),
    Experts("small", "down", 4, 2, 24, 40, "none", True),
]


def epilogue(acc: torch.Tensor, shape: Experts) -> torch.Tensor:
    """The projection's activation in torch ops, on products whose gate and up columns are laid
    out as the model stores them (halves for Mixtral, interleaved for gpt-oss)."""
    if shape.activation == "swiglu":
        gate, up = acc.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    if shape.activation == "clamped_swiglu":
        gate, up = acc[..., 0::2].clamp(max=LIMIT), acc[..., 1::2].clamp(-LIMIT, LIMIT)
        return (up + 1) * gate * torch.sigmoid(ALPHA * gate)
    return acc


def make_inputs(shape: Experts, tokens: int, device: str, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows sorted by expert (tokens x top-k of them, routed uniformly), their expert ids, the
    int32 offsets, the weights as the model keeps them ([E, K, rows]: `torch._grouped_mm`'s
    layout; tileflow reads its transposed view) and the biases."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    m = tokens * shape.top_k
    ids = torch.randint(0, shape.experts, (m,), generator=gen).sort().values
    offsets = torch.bincount(ids, minlength=shape.experts).cumsum(0).to(torch.int32)
    x = torch.randn(m, shape.k, generator=gen)
    w = torch.randn(shape.experts, shape.k, shape.rows, generator=gen) / shape.k**0.5
    bias = torch.randn(shape.experts, shape.rows, generator=gen) if shape.bias else None
    out = {"x": x.to(device, dtype), "w": w.to(device, dtype), "ids": ids.to(device), "offsets": offsets.to(device)}
    if bias is not None:
        out["bias"] = bias.to(device, dtype)
    return out


def methods(shape: Experts, inputs: dict[str, torch.Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
    """The calls to compare, each returning the projection's [rows, N] output."""
    import tileflow  # noqa: F401  (registers the tileflow ops)

    x, w, ids, offsets, bias = inputs["x"], inputs["w"], inputs["ids"], inputs["offsets"], inputs.get("bias")
    clamp = (ALPHA, LIMIT) if shape.activation == "clamped_swiglu" else (None, None)
    # The op as a compiled graph calls it: `tileflow.ops.grouped_gemm` also checks the offsets'
    # values in eager calls, a device->host copy per call that no graph pays.
    op = torch.ops.tileflow.grouped_gemm.default

    def fused() -> torch.Tensor:
        return op(x, w.transpose(1, 2), offsets, shape.activation, None, "", "", bias, *clamp)

    def grouped_then_torch() -> torch.Tensor:
        acc = torch._grouped_mm(x, w, offs=offsets)
        return epilogue(acc + bias[ids] if bias is not None else acc, shape)

    def per_expert() -> torch.Tensor:
        out = x.new_empty(x.shape[0], shape.n)
        start = 0
        for e, end in enumerate(offsets.tolist()):  # the host reads the group sizes, as a loop must
            if end > start:
                acc = x[start:end] @ w[e]
                out[start:end] = epilogue(acc + bias[e] if bias is not None else acc, shape)
            start = end
        return out

    calls = {"tileflow grouped_gemm (epilogue fused)": fused, "loop of per-expert GEMMs": per_expert}
    if x.is_cuda:  # torch._grouped_mm has no CPU kernel
        calls["torch._grouped_mm + epilogue ops"] = grouped_then_torch
    return calls


def reference(shape: Experts, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 products of each expert's rows with its weights, the epilogue after."""
    x, w = inputs["x"].float(), inputs["w"].float()
    acc = x.new_empty(x.shape[0], shape.rows)
    start = 0
    for e, end in enumerate(inputs["offsets"].tolist()):
        acc[start:end] = x[start:end] @ w[e]
        start = end
    if "bias" in inputs:
        acc += inputs["bias"].float()[inputs["ids"]]
    return epilogue(acc, shape)


def smoke() -> int:
    """CPU: every method against the float32 reference on small shapes, in the interpreter."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import tileflow
    from common import rel_err

    print("bench/moe.py: no CUDA GPU here; timings need one. Running the interpreter smoke check.")
    with tileflow.use_config(tileflow.Config(target="triton", max_tokens=256)):
        for shape in SMOKE_SHAPES:
            for tokens in (1, 9, 40):
                inputs = make_inputs(shape, tokens, "cpu", torch.float32, seed=tokens)
                want = reference(shape, inputs)
                for name, call in methods(shape, inputs).items():
                    err = rel_err(call(), want)
                    print(f"  {shape.model} {shape.proj}, {tokens} tokens, {name}: rel err {err:.1e}")
                    if not err < 1e-4:
                        print(f"FAIL: {name} differs from the reference", file=sys.stderr)
                        return 1
    print("smoke check passed")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,16,64,256,1024,4096")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    from common import gpu_available

    if not gpu_available():
        return smoke()
    import tileflow
    from common import checked_ms, environment, geomean, markdown_table, measured_matmul_tflops, median_ms, write_results

    peak = measured_matmul_tflops()
    failures: list[str] = []
    table, ratios = [], {}
    with tileflow.use_config(tileflow.Config(target="triton", max_tokens=8192)):
        for shape in SHAPES:
            for tokens in (int(t) for t in args.tokens.split(",")):
                inputs = make_inputs(shape, tokens, "cuda", torch.bfloat16)
                want = reference(shape, inputs)
                times = {}
                for name, call in methods(shape, inputs).items():
                    ms = checked_ms(f"{shape.model} {shape.proj} {tokens} tokens, {name}", call, want,
                                    out_dtype=torch.bfloat16, tol=2e-2, time_ms=lambda c: median_ms(lambda _: c()),
                                    failures=failures, reference="float32")
                    if ms is not None:
                        times[name] = ms
                flops = 2 * inputs["x"].shape[0] * shape.rows * shape.k
                base = times.get("torch._grouped_mm + epilogue ops")
                for name, ms in times.items():
                    tflops = flops / ms / 1e9
                    ratio = base / ms if base else float("nan")
                    ratios.setdefault(name, []).append(ratio)
                    table.append([f"{shape.model} {shape.proj}", tokens, name, f"{ms:.3f}", f"{tflops:.1f}",
                                  f"{tflops / peak:.0%}", f"{ratio:.2f}x"])
    body = markdown_table(["experts", "tokens", "method", "ms", "TFLOP/s", "% of peak", "vs _grouped_mm"], table)
    body += "\n\n" + markdown_table(["method", "geomean vs _grouped_mm + epilogue ops"],
                                    [[name, f"{geomean(r):.2f}x"] for name, r in ratios.items()])
    body += (f"\n\n- measured bf16 matmul peak {peak:.0f} TFLOP/s (8192^3 through torch)"
             "\n- rows = tokens x top-k, routed uniformly at random; times: median of `triton.testing.do_bench`")
    print(body)
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    if not args.no_write:
        path = write_results("moe", "MoE expert GEMMs: grouped, fused epilogues", environment(), body, partial=bool(failures))
        print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
