"""What drawing a serving step's sampled tokens costs: the keyed Gumbel-max draw of
`tileflow.serving.sampling` as eager torch ops and fused by Inductor, beside the argmax that
greedy decoding needs.

On a GPU: bf16 logits of Llama-3's vocabulary (128256) for 64 and 256 rows (one decode step of
that many sequences); temperature-only draws (eager and fused), draws filtered by top-p and min-p
(a sort first), and `argmax` as the floor. Before any timing, the fused draw is checked against
the eager one on the same rows (the tokens agree but for near-ties that the two compute paths'
rounding of the logs may break differently). Reports ms, GB/s of logits read, and the fraction
of the measured copy bandwidth; writes bench/results/sampling-*.md.

On a CPU-only machine it runs the same draws on small logits as a smoke check (fused through
Inductor's C++ backend).

    python bench/sampling.py [--rows 64,256] [--vocab 128256] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, gpu_available, markdown_table, measured_copy_gbs, median_ms, write_results  # noqa: E402

from tileflow.serving.sampling import SamplingParams, draw, row_sampling  # noqa: E402


def _params(rows: int, **filters: float) -> list[SamplingParams]:
    return [SamplingParams(0.8, seed=1000 + i, **filters) for i in range(rows)]


def _setup(rows: int, vocab: int, device: str, dtype: torch.dtype, **filters: float):
    logits = (torch.randn(rows, vocab, device=device) * 3).to(dtype)  # spread like a model's logits
    sampling = row_sampling(device, list(range(rows)), _params(rows, **filters), [100 + i for i in range(rows)])
    return logits, sampling


def agreement(rows: int, vocab: int, device: str, dtype: torch.dtype) -> float:
    """The share of rows whose fused draw equals the eager one, on fresh random logits."""
    logits, sampling = _setup(rows, vocab, device, dtype)
    fused, eager = draw(logits, sampling, fused=True), draw(logits, sampling, fused=False)
    return (fused == eager).float().mean().item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="64,256")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    if not gpu_available():
        print("bench/sampling.py needs a GPU for its timings: a smoke check of the draws on small logits instead")
        share = agreement(32, 1000, "cpu", torch.float32)
        print(f"fused vs eager draws agree on {share:.0%} of 32 rows")
        if share < 0.95:
            return 1
        print("smoke check passed")
        return 0

    device, dtype = "cuda", torch.bfloat16
    env = environment()
    copy_gbs = measured_copy_gbs()
    table = []
    failures: list[str] = []
    title = "Sampling a serving step's tokens (keyed Gumbel-max)"

    def body() -> str:
        return (markdown_table(["rows", "draw", "ms", "logits GB/s", "% of copy"], table)
                + f"\n\n- vocabulary {args.vocab}, bf16 logits; measured copy bandwidth {copy_gbs:.0f} GB/s (read + write)"
                "\n- times: median of `triton.testing.do_bench` (CUDA events), row metadata already on the device"
                + "".join(f"\n- FAILED: {failure}" for failure in failures))

    for rows in rows_list:
        share = agreement(rows, args.vocab, device, dtype)
        if share < 0.99:
            # Reported, and the other row counts still measured (the exit status becomes 1): the
            # rows measured before must not be lost with it.
            failures.append(f"fused and eager draws disagree on {1 - share:.1%} of {rows} rows: not timed")
            print(f"FAIL: {failures[-1]}", file=sys.stderr)
            continue
        plain, _ = _setup(rows, args.vocab, device, dtype)
        cases = {
            "argmax (greedy)": (plain, None),
            "draw, eager": _setup(rows, args.vocab, device, dtype),
            "draw, fused": _setup(rows, args.vocab, device, dtype),
            "draw, top-p 0.9 + min-p 0.05 (eager sort)": _setup(rows, args.vocab, device, dtype, top_p=0.9, min_p=0.05),
        }
        for name, (logits, sampling) in cases.items():
            if sampling is None:
                fn = lambda _, x=logits: x.argmax(-1)  # noqa: E731
            else:
                fn = lambda _, x=logits, s=sampling, f=name.endswith("fused"): draw(x, s, fused=f)  # noqa: E731
            ms = median_ms(fn)
            gbs = logits.numel() * logits.element_size() / ms / 1e6  # the logits read once
            table.append([rows, name, f"{ms:.3f}", f"{gbs:.0f}", f"{gbs / copy_gbs:.0%}"])
        table.append([rows, "fused agrees with eager", f"{share:.1%} of rows", "", ""])
        if not args.no_write:  # after every row count, so a stage cut by its limit keeps them
            write_results("sampling", title, env, body(), partial=True)
    print(body())
    if not args.no_write:
        print(f"wrote {write_results('sampling', title, env, body())}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
