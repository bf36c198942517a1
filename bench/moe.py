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
x weight rows x K), the fraction of the bf16 datasheet peak, and the ratio to the
`torch._grouped_mm` path; writes bench/results/moe-*.md.

On a CPU-only machine it runs the same code on small shapes (Triton's interpreter, fp32, wall
times) as a smoke check.

    python bench/moe.py [--tokens 1,16,64,256,1024,4096] [--no-write]
"""

from __future__ import annotations

import argparse
import functools
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

# Token counts of the full table (`--tokens` narrows a run; its file is named for them).
TOKENS = [1, 16, 64, 256, 1024, 4096]

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


@functools.lru_cache(maxsize=1)
def expert_weights(shape: Experts, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The projection's weights as the model keeps them ([E, K, rows]: `torch._grouped_mm`'s
    layout; tileflow reads its transposed view) and its biases, made on the device once per
    shape (Mixtral's gate-up is 1.9 GB: made on the host, its values took 28 s on a 2-core CPU,
    once per token count)."""
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(shape.experts, shape.k, shape.rows, generator=gen, device=device, dtype=dtype) / shape.k**0.5
    bias = torch.randn(shape.experts, shape.rows, generator=gen, device=device, dtype=dtype) if shape.bias else None
    return w, bias


def make_inputs(shape: Experts, tokens: int, device: str, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows sorted by expert (tokens x top-k of them, routed uniformly), their expert ids, the
    int32 offsets, and `expert_weights`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    m = tokens * shape.top_k
    ids = torch.randint(0, shape.experts, (m,), generator=gen, device=device).sort().values
    offsets = torch.bincount(ids, minlength=shape.experts).cumsum(0).to(torch.int32)
    w, bias = expert_weights(shape, device, dtype)
    out = {"x": torch.randn(m, shape.k, generator=gen, device=device, dtype=dtype), "w": w, "ids": ids, "offsets": offsets}
    if bias is not None:
        out["bias"] = bias
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
    if _grouped_mm_runs(x.device, x.dtype):
        calls[GROUPED_MM] = grouped_then_torch
    return calls


GROUPED_MM = "torch._grouped_mm + epilogue ops"


def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch has a `torch._grouped_mm` kernel for `dtype` on `device` (bf16 on
    sm_90 GPUs; CPU kernels came in later releases)."""
    try:
        torch._grouped_mm(torch.zeros(2, 16, device=device, dtype=dtype), torch.zeros(2, 16, 16, device=device, dtype=dtype),
                          offs=torch.tensor([1, 2], dtype=torch.int32, device=device))
    except (RuntimeError, NotImplementedError):
        return False
    return True


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


def measure(shapes: list[Experts], tokens: list[int], device: str, dtype: torch.dtype, *,
            time_ms: Callable[[Callable[[], torch.Tensor]], float], peak: float | None, tol: float,
            failures: list[str], progress: Callable[[str], None] | None = None) -> str:
    """The markdown tables: every method of every shape and token count, checked against the
    float32 reference (`checked_ms`: a failure goes to `failures` and the run goes on), timed by
    `time_ms`; TFLOP/s against `peak` when given; ratios to `torch._grouped_mm`'s path.
    `progress(tables so far)` after every row, each row printed as it is measured: a stage cut
    by its limit keeps what it measured."""
    from common import checked_ms, geomean, markdown_table

    table, ratios = [], {}
    headers = ["experts", "tokens", "method", "ms", "TFLOP/s", "% of peak", "vs _grouped_mm"]

    def tables() -> str:
        return markdown_table(headers, table) + "\n\n" + markdown_table(
            ["method", "geomean vs _grouped_mm + epilogue ops"], [[name, f"{geomean(r):.2f}x"] for name, r in ratios.items()])

    for shape in shapes:
        for count in tokens:
            inputs = make_inputs(shape, count, device, dtype, seed=count)
            want = reference(shape, inputs)
            times = {}
            for name, call in methods(shape, inputs).items():
                ms = checked_ms(f"{shape.model} {shape.proj} {count} tokens, {name}", call, want, out_dtype=dtype,
                                tol=tol, time_ms=time_ms, failures=failures, reference="float32")
                if ms is not None:
                    times[name] = ms
                    # The rows so far now (their ratios once the baseline is in): a cut stage keeps them.
                    if progress:
                        pending = [_row(shape, count, n, t, inputs, peak, None) for n, t in times.items()]
                        progress(markdown_table(headers, table + pending))
            base = times.get(GROUPED_MM)
            for name, ms in times.items():
                ratio = base / ms if base else float("nan")
                ratios.setdefault(name, []).append(ratio)
                table.append(_row(shape, count, name, ms, inputs, peak, ratio))
                print(" | ".join(str(c) for c in table[-1]), flush=True)
            if progress:
                progress(tables())
    return tables()


def _row(shape: Experts, count: int, name: str, ms: float, inputs: dict[str, torch.Tensor], peak: float | None,
         ratio: float | None) -> list:
    """One table row: TFLOP/s over 2 x routed rows x weight rows x K (`ratio` None: not yet known)."""
    tflops = 2 * inputs["x"].shape[0] * shape.rows * shape.k / ms / 1e9
    return [f"{shape.model} {shape.proj}", count, name, f"{ms:.3f}", f"{tflops:.2f}",
            f"{tflops / peak:.0%}" if peak else "n/a", "-" if ratio is None else f"{ratio:.2f}x"]


def smoke() -> int:
    """CPU: the GPU run's code on small shapes, in the interpreter, fp32, wall-clock times (not
    results)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import tileflow
    from common import wall_median_ms

    print("bench/moe.py: no CUDA GPU here; timings need one. Running the interpreter smoke check.")
    failures: list[str] = []
    with tileflow.use_config(tileflow.Config(target="triton", max_tokens=256)):
        body = measure(SMOKE_SHAPES, [1, 9, 40], "cpu", torch.float32, time_ms=lambda call: wall_median_ms(call, 1),
                       peak=None, tol=1e-4, failures=failures)
    print(body)
    print("(the interpreter's and this CPU's times: a check of the benchmark's code, not results)")
    if failures:
        return 1
    print("smoke check passed")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    from common import gpu_available

    if not gpu_available():
        return smoke()
    return run_gpu([int(t) for t in args.tokens.split(",")], write=not args.no_write)


def run_gpu(tokens: list[int], *, write: bool, shapes: list[Experts] = SHAPES, device: str = "cuda",
            dtype: torch.dtype = torch.bfloat16, tol: float = 2e-2) -> int:
    """GPU: the table, rewritten (marked partial) after every row, so a stage cut by its limit
    keeps what it measured. `shapes`, `device`, `dtype` and `tol` are for the CPU check of this
    path."""
    import common
    import tileflow

    env = common.environment()
    ceiling, peak = common.measured_matmul_tflops(), common.datasheet_tflops("bfloat16", device)
    failures: list[str] = []
    notes = (f"\n\n- % of peak: of the {peak:.0f} TFLOP/s bf16 datasheet peak (an 8192^3 matmul through torch "
             f"reached {ceiling:.0f} in this run)"
             "\n- rows = tokens x top-k, routed uniformly at random; times: median of `triton.testing.do_bench`")
    title = "MoE expert GEMMs: grouped, fused epilogues"

    name = common.sized_name("moe", tokens, TOKENS)

    def checkpoint(text: str) -> None:
        if write:
            common.write_results(name, title, env, text + notes + "".join(f"\n- FAILED: {f}" for f in failures),
                                 partial=True)

    with tileflow.use_config(tileflow.Config(target="triton", max_tokens=8192)):
        body = measure(shapes, tokens, device, dtype, time_ms=lambda call: common.median_ms(lambda _: call()), peak=peak,
                       tol=tol, failures=failures, progress=checkpoint)
    body += notes + "".join(f"\n- FAILED: {f}" for f in failures)
    print(body)
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    if write:
        print(f"wrote {common.write_results(name, title, env, body)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
