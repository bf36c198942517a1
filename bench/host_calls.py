"""Host time of one call of each tileflow op, with no GPU: the call as a compiled graph or the
serving engine makes it (through `torch.ops`, a plan and a target given), every Triton launch
stubbed out (the interpreter's `run` made a counter, as in `bench/host_step.py`). What is timed
is tileflow's Python from the op's dispatch to the launch, less Triton's own launcher.

A step that is not replayed from a CUDA graph pays this per op per layer on the host, beside
Triton's launches, so a decode step of a deep model can be host-bound on this alone (a 32-layer
model calls 5-7 ops a layer). Each row is the median over `--repeats` sets of `--calls` calls;
the launches per call are counted exactly. Float32 on this CPU (the launch is stubbed: the
dtype changes no host work).

    python bench/host_calls.py [--repeats 5] [--calls 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

# Before Triton is imported: kernels go through the interpreter, whose `run` is stubbed.
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/common.py, host_step.py

# Llama-3-8B-like heads at a CPU-friendly head size: 32 query heads over 8 KV heads.
HQ, HKV, HEAD_DIM, BLOCK = 32, 8, 32, 16


def _cases() -> dict[str, Callable[[], Any]]:
    """name -> one call, as the compiled graph or the serving engine makes it."""
    import torch

    import tileflow
    from tileflow.runtime import encode_plan, gemm_plan
    from tileflow.runtime.paged_kv import PagedKV

    torch.manual_seed(0)
    cases: dict[str, Callable[[], Any]] = {}
    x, w = torch.randn(16, 256), torch.randn(768, 256)
    plan = encode_plan(gemm_plan(768, 256, torch.float32, "triton", "cpu", m_max=8192))
    cases["padded_gemm, M = 16 (plan given)"] = lambda: torch.ops.tileflow.padded_gemm(
        x, w, None, None, "none", None, plan, "triton", None, None, False)
    # A layer's Q, K and V (512 + 128 + 128 rows): one call over the three weights, against the
    # three calls compiled graphs made before sibling GEMMs ran as one.
    weights = [w[:512], w[512:640].clone(), w[640:].clone()]
    plans = [encode_plan(gemm_plan(rows.shape[0], 256, torch.float32, "triton", "cpu", m_max=8192)) for rows in weights]
    cases["padded_gemm over Q, K and V, M = 16 (one call)"] = lambda: torch.ops.tileflow.padded_gemm(
        x, weights[0], None, None, "none", None, plan, "triton", None, None, False, weights[1:], None)
    cases["padded_gemm for Q, K and V, M = 16 (three calls)"] = lambda: [torch.ops.tileflow.padded_gemm(
        x, wi, None, None, "none", None, pi, "triton", None, None, False) for wi, pi in zip(weights, plans)]
    for t in (16, 256):
        q, k, v = torch.randn(1, HQ, t, HEAD_DIM), torch.randn(1, HKV, t, HEAD_DIM), torch.randn(1, HKV, t, HEAD_DIM)
        mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
        ranges = tileflow.ops.attention_mask_ranges(mask)
        cases[f"meta_attention, causal, T = {t}"] = lambda q=q, k=k, v=v: torch.ops.tileflow.meta_attention(
            q, k, v, None, True, None, "triton", None, None, None, None, None, None, None)
        cases[f"meta_attention, mask with its ranges, T = {t}"] = (
            lambda q=q, k=k, v=v, mask=mask, ranges=ranges: torch.ops.tileflow.meta_attention(
                q, k, v, mask, False, None, "triton", ranges, None, None, None, None, None, None))
        cases[f"attention_mask_ranges, T = {t}"] = lambda mask=mask: torch.ops.tileflow.attention_mask_ranges(mask)
    for seqs, context in ((64, 1024), (256, 1024)):
        cache = PagedKV(1, HKV, HEAD_DIM, block_size=BLOCK, num_blocks=seqs * context // BLOCK, dtype=torch.float32)
        blocks = [list(range(i * context // BLOCK, (i + 1) * context // BLOCK)) for i in range(seqs)]
        batch = cache.prepare(blocks, [1] * seqs, [context - 1] * seqs)
        q = torch.randn(seqs, HQ, HEAD_DIM)
        cases[f"serving attention, {seqs} decodes at {context}"] = (
            lambda cache=cache, q=q, batch=batch: cache.attend_batch(0, q, batch, scale=HEAD_DIM ** -0.5))
    return cases


def measure(repeats: int, calls: int) -> list[list[str]]:
    """One row per case: its median host time per call (us) and the launches per call."""
    import tileflow
    from host_step import stub_launches

    counter = stub_launches()
    rows = []
    with tileflow.use_config(tileflow.Config(target="triton")):
        for name, call in _cases().items():
            call()  # builds the kernels and fills the caches a repeated call finds warm
            before = counter["launches"]
            call()
            launches = counter["launches"] - before
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(calls):
                    call()
                times.append((time.perf_counter() - start) / calls * 1e6)
            rows.append([name, f"{statistics.median(times):.1f}", str(launches)])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    if args.repeats < 1 or args.calls < 1:
        parser.error("--repeats and --calls must be >= 1")
    import torch

    from common import markdown_table

    with torch.no_grad():
        rows = measure(args.repeats, args.calls)
    print(markdown_table(["call", "host us per call (launches stubbed)", "launches per call"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
