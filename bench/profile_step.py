"""Where a compiled step's time goes: device kernels by category, and the host's share.

On a GPU: the Llama-3-8B-shaped model of `bench/e2e.py` (random bf16 weights, `--layers`
layers), one forward step of each `--tokens` size through Inductor and through tileflow, and a
mixed serving step of the largest size (half prompt chunks, half decodes over a paged cache)
through the serving engine without and with nano-batches, under `torch.profiler`. For each it reports the step's wall time, the device time summed over its
kernels, and the kernels grouped into GEMM, attention, split-K reduce, elementwise/norm and copy
categories (by kernel name), with the ten most expensive kernels, and the forward steps' host
functions by own time (cProfile). Device time well below wall time means the step waits on the
host (launches, Python), and the host table says on what; a category's share says which kernels
to work on. Writes the tables under bench/results/.

On a CPU-only machine it profiles a tiny Llama on the CPU (the ops' own CPU time stands in for
kernels) as a smoke check.

    python bench/profile_step.py [--layers 2] [--tokens 256,4096] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Kernel-name patterns per category, first match wins (Triton kernels carry tileflow's names;
# cuBLAS/cuDNN/flash kernels theirs; Inductor's fused kernels start with triton_). cuBLAS on
# Hopper names most of its GEMMs `nvjet_*` (an H200's bf16 matmul: `nvjet_sm90_tst_256x128`),
# its matrix-vector products `gemv*` and its split-K pass `splitKreduce_kernel`.
CATEGORIES = (
    ("split-K reduce", ("_reduce", "splitkreduce")),
    ("attention", ("meta_attention", "flash", "fmha", "attention", "sdpa")),
    ("GEMM", ("padded_gemm", "grouped_gemm", "gemm", "gemv", "nvjet", "matmul", "sm90_xmma", "cutlass", "mm_", "_mm",
              "aten::mm", "aten::addmm", "aten::linear", "aten::bmm")),
    ("copy", ("copy", "memcpy", "memset", "cat", "fill")),
    ("elementwise / norm", ("triton_", "elementwise", "reduce", "vectorized", "unrolled", "norm", "aten::")),
)


# Inductor names a fused kernel after its ATen ops (`triton_red_fused__to_copy_add_embedding_mean_
# mul_pow_rsqrt_0` is a bf16 RMSNorm: its float32 upcast is a `_to_copy`); one that does any of
# these computes, so it is elementwise / norm work, not a copy, whatever moves data beside it.
ARITHMETIC = frozenset({"add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "mean", "sum", "amax", "exp",
                        "log", "tanh", "sigmoid", "silu", "gelu", "erf", "relu", "sin", "cos", "where", "softmax",
                        "clamp", "minimum", "maximum"})


def category(name: str) -> str:
    """The category of a kernel, by name."""
    lowered = name.lower()
    for label, patterns in CATEGORIES:
        if any(p in lowered for p in patterns):
            if label == "copy" and lowered.startswith("triton_") and ARITHMETIC & set(lowered.split("_")):
                return "elementwise / norm"
            return label
    return "other"


def profile(fn, *, device: str, steps: int = 5) -> dict:
    """Profile `steps` calls of `fn()` (after warm-up): mean wall ms per step, mean device ms
    per step, and per-kernel device ms per step."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(3):
        fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        wall = (time.perf_counter() - start) / steps * 1e3
    kernels: dict[str, float] = {}
    for avg in prof.key_averages():
        if device == "cuda":
            # The kernels' own rows, as torch's table sums them: the CPU op that launched a kernel
            # (and a CPU-side profiler row) carries the kernel's time as its self device time too,
            # and a GPU user annotation spans kernels; counting them doubled the device time.
            if avg.device_type == DeviceType.CPU or getattr(avg, "is_user_annotation", False):
                continue
            us = getattr(avg, "self_device_time_total", None) or getattr(avg, "self_cuda_time_total", 0)
        else:
            # On the CPU the ops themselves do the work: their self time, ATen and tileflow ops.
            us = avg.self_cpu_time_total if avg.key.startswith(("aten::", "tileflow::")) else 0
        if us > 0:
            kernels[avg.key] = us / 1e3 / steps
    return {"wall_ms": wall, "device_ms": sum(kernels.values()), "kernels": kernels}


def host_functions(fn, *, device: str, steps: int = 5, top: int = 12) -> list[tuple[str, float, float]]:
    """The Python-level functions (and the C functions they call) that take a step's host time:
    `steps` calls of `fn()` under cProfile (after a warm-up), synchronized at the end, so time
    spent waiting on the device shows as the synchronize call. Returns the `top` entries by own
    time: (function, own ms per step, cumulative ms per step)."""
    import cProfile
    import pstats

    import torch

    fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        fn()
    sync()
    profiler.disable()
    return rank_host_functions(pstats.Stats(profiler).stats, steps=steps, top=top)


def rank_host_functions(stats: dict, *, steps: int, top: int) -> list[tuple[str, float, float]]:
    """`pstats.Stats(...).stats` ({(file, line, name): (calls, primitive calls, own s,
    cumulative s, callers)}) over `steps` steps as the `top` rows by own time: (function, own ms
    per step, cumulative ms per step); a C function (file "~") by its name alone, a Python one as
    file:line name."""
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]

    def where(key: tuple) -> str:
        file, line, name = key
        return name if file == "~" else f"{Path(file).name}:{line} {name}"

    return [(where(key), 1e3 * tottime / steps, 1e3 * cumtime / steps) for key, (_, _, tottime, cumtime, _) in rows]


def report(label: str, result: dict) -> str:
    """A markdown section: wall vs device time, categories, top kernels (and the host functions
    by own time, when `result` has them)."""
    from common import markdown_table

    by_category: dict[str, float] = defaultdict(float)
    for name, ms in result["kernels"].items():
        by_category[category(name)] += ms
    device_ms = result["device_ms"] or float("nan")
    lines = [f"### {label}", "",
             f"- wall {result['wall_ms']:.3f} ms per step; device (kernels summed) {result['device_ms']:.3f} ms "
             f"({100 * result['device_ms'] / result['wall_ms']:.0f}% of wall)", ""]
    cats = sorted(by_category.items(), key=lambda kv: -kv[1])
    lines.append(markdown_table(["category", "device ms", "share"],
                                [[c, f"{ms:.3f}", f"{100 * ms / device_ms:.0f}%"] for c, ms in cats]))
    top = sorted(result["kernels"].items(), key=lambda kv: -kv[1])[:10]
    lines += ["", markdown_table(["kernel", "category", "device ms"],
                                 [[name[:90], category(name), f"{ms:.3f}"] for name, ms in top])]
    if result.get("host"):
        lines += ["", "Host functions by own time (cProfile, per step; its overhead inflates Python's share):", "",
                  markdown_table(["function", "own ms", "cumulative ms"],
                                 [[name[:90], f"{own:.3f}", f"{cum:.3f}"] for name, own, cum in result["host"]])]
    return "\n".join(lines)


def run(model, tokens: list[int], *, scale, serving: bool = True) -> str:
    """Profile Inductor and tileflow steps of `model` at each size, then (with `serving`) a mixed
    serving step (half prompt chunks, half decodes over a paged cache, as in `bench/e2e.py`)
    through the tileflow program without and with nano-batches; the report's markdown."""
    import random

    import torch

    from e2e import mixed_entries, serving_engine, serving_programs

    methods = {
        "Inductor": torch.compile(model, dynamic=True),
        "tileflow": torch.compile(model, backend="tileflow", dynamic=True),
    }
    sections = []
    for t in tokens:
        ids = torch.randint(0, scale.vocab, (1, t), device=scale.device)
        for name, fn in methods.items():
            with torch.no_grad():
                result = profile(lambda fn=fn: fn(ids, use_cache=False), device=scale.device)
                # Where the host's time goes, by function: a step whose device time is well
                # below its wall time is waiting on these.
                result["host"] = host_functions(lambda fn=fn: fn(ids, use_cache=False), device=scale.device)
            sections.append(report(f"{name}, {t} tokens", result))
            print(sections[-1] + "\n", flush=True)
    if not serving:
        return "\n\n".join(sections)
    # Serving switches the model to packed-token attention: after the steps above.
    program = serving_programs(model, max_tokens=max(scale.budget, *tokens), names=("tileflow",))["tileflow"]
    t = max(tokens)
    entries, blocks = mixed_entries(t, random.Random(0), scale)
    engine = serving_engine(program, scale, num_blocks=blocks, slots=1)
    for nano in (1, 2):
        engine.nano_batches = nano
        result = profile(lambda: engine.forward(entries), device=scale.device)
        sections.append(report(f"tileflow serving step, {t} tokens (half decodes), {nano} nano-batch(es)", result))
        print(sections[-1] + "\n", flush=True)
    return "\n\n".join(sections)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", default="256,4096")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--steps-only", action="store_true",
                        help="profile the forward steps only, not the serving step (whose API an older tileflow may lack)")
    args = parser.parse_args()
    import torch

    import tileflow

    # Which tileflow: with PYTHONPATH naming another commit's tree (gpu_session.sh profile-base),
    # that tree's.
    print(f"tileflow from {Path(tileflow.__file__).resolve().parent}", flush=True)

    from e2e import GPU, SMOKE, _llama, gpu_model

    tokens = [int(t) for t in args.tokens.split(",")]
    if not torch.cuda.is_available():
        print("bench/profile_step.py: no CUDA GPU here; device times need one. Running the CPU smoke check.")
        model = _llama(1, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=SMOKE.vocab)
        text = run(model, [16], scale=SMOKE, serving=not args.steps_only)
        # Both steps did GEMM work the profile attributes (tileflow's padded GEMMs, Inductor's mm).
        if text.count("| GEMM |") < 4:
            print("FAIL: the profile attributed no GEMM time", file=sys.stderr)
            return 1
        print("smoke check passed")
        return 0
    from common import environment, write_results

    env = environment()
    model = gpu_model(args.layers)
    body = f"- model: Llama-3-8B-shaped, {args.layers} layers, random bf16 weights\n\n"
    body += run(model, tokens, scale=GPU, serving=not args.steps_only)
    if not args.no_write:
        print(f"wrote {write_results('profile', 'Where a step goes (torch.profiler)', env, body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
