"""Dynamic-M GEMM benchmark: tileflow's padded fixed-tile GEMM vs cuBLAS vs Inductor.

On a GPU (bf16, Llama-3-8B projection shapes, M from 1 to 8192), in one run: tileflow
(`padded_gemm`, plan over M in [1, 8192]), `torch.mm` through F.linear (cuBLAS), `torch.compile`
Inductor with dynamic shapes, and Inductor max-autotune with dynamic shapes. Each method is one
compiled artifact serving every M, as in serving. A second table measures the fused SwiGLU
input projection the models run (one tileflow kernel vs two GEMMs plus the elementwise work), a
third the Q, K and V projections (one tileflow kernel over the three weights vs three GEMMs,
and cuBLAS over a stacked weight, as vLLM loads them). Prints TFLOP/s, % of the bf16 datasheet peak
(and the matmul ceiling measured in the same run), the geometric-mean ratio per baseline and the kernel count, and writes
the table under bench/results/.

On a CPU-only machine it says so and runs a small smoke check through the Triton interpreter.

    python bench/gemm.py [--quick] [--no-write] [--variant-m 1,64,512,4096|all] [--tile-timings FILE]
    python bench/gemm.py --measure-tiles FILE
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K): qkv, o, gate+up, down
M_VALUES = [1, 8, 16, 33, 64, 100, 128, 256, 512, 1000, 1024, 2048, 4096, 8192]
MAX_TOKENS = 8192
# The M values the variant columns are timed at by default (`--variant-m`): each variant builds
# a kernel per planned tile and adds a timed column, and at all 14 M of 4 shapes the two
# variants (about 28 builds, 112 timed cells) no longer fit the gemm stage's limit.
VARIANT_M = (1, 64, 512, 4096)
# `--measure-tiles` order: the down projection first. A stage cut by its limit loses the last
# shape, and this is the one whose plans split-K (K = 14336, N = 4096) changes most.
TILE_SHAPES = [SHAPES[-1], *SHAPES[:-1]]


# Kernel variants a plan runs only where measured tile times say so: the main table times each
# M's planned tile as each of them, which is what such a measurement would compare.
VARIANTS = {"stream-K": {"stream_k": True}, "TMA": {"tma": True}}


def planned_variant(x, w, variant: str):
    """`x @ w^T` with the tile tileflow's plan picks for this M on x's device, run as `variant`
    (a key of VARIANTS; stream-K over every SM or CPU core)."""
    import tileflow
    from tileflow.lower import gemm_spec

    n, k = w.shape
    plan = tileflow.runtime.gemm_plan(n, k, x.dtype, "triton", x.device.type, m_max=MAX_TOKENS)
    spec = gemm_spec(dtype=x.dtype, out_dtype=x.dtype, n=n, k=k, tile=plan.select_tile(x.shape[0]), **VARIANTS[variant])
    return tileflow.runtime.get_kernel("triton", spec)(x, w)


def smoke() -> int:
    """CPU: correctness of the benchmark's code path on small shapes, under the interpreter."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    import tileflow
    from common import rel_err

    print("bench/gemm.py: no CUDA GPU here; timings need one. Running the interpreter smoke check.")
    n, k = 48, 40
    w = torch.randn(n, k) / k**0.5
    with tileflow.use_config(tileflow.Config(target="triton", max_tokens=256)):
        for m in (1, 17, 100):
            x = torch.randn(m, k)
            for name, fn in (("planned", tileflow.ops.padded_gemm),
                             *((v, functools.partial(planned_variant, variant=v)) for v in VARIANTS)):
                err = rel_err(fn(x, w), x.double() @ w.double().t())
                print(f"  M={m:4d} N={n} K={k} {name}: rel err {err:.1e}")
                if not err < 1e-5:
                    print(f"FAIL: tileflow GEMM ({name}) disagrees with the float64 reference", file=sys.stderr)
                    return 1
        # The fused SwiGLU MLP input projection of the GPU run's second table.
        gate, up = (torch.randn(n, k) / k**0.5 for _ in range(2))
        x = torch.randn(33, k)
        err = rel_err(swiglu_methods(config=tileflow.current_config())["tileflow"](x, gate, up), swiglu_reference(x, gate, up))
        print(f"  SwiGLU M=33 N={n} K={k}: rel err {err:.1e}")
        if not err < 1e-5:
            print("FAIL: tileflow's fused SwiGLU GEMM disagrees with the float64 reference", file=sys.stderr)
            return 1
        # The Q, K and V projections of the third table (one kernel: its BLOCK_N divides 64 and 96).
        weights = [torch.randn(rows, k) / k**0.5 for rows in (64, 32, 32)]
        for name, fn in qkv_methods(config=tileflow.current_config()).items():
            err = rel_err(fn(x, *weights), qkv_reference(x, *weights))
            print(f"  Q, K, V M=33 N=64+32+32 K={k} {name}: rel err {err:.1e}")
            if not err < 1e-5:
                print(f"FAIL: {name} disagrees with the float64 reference", file=sys.stderr)
                return 1
    kernels = tileflow.runtime.compiled_kernels("padded_gemm")
    if not any(kernel.spec.param("segments") for kernel in kernels):
        print("FAIL: tileflow ran the Q, K and V projections as separate kernels", file=sys.stderr)
        return 1
    print(f"smoke check passed ({len(kernels)} kernels built)")
    return 0


def checked_tflops(fn, inputs, want, flops: float, failures: list[str], what: str) -> float | None:
    """TFLOP/s of `fn` over the argument tuples `inputs` (median over CUDA-graph replays that
    rotate through them) once `fn(*inputs[0])` matched the float64 `want`. A method that fails is
    reported (None in its cell, the failure in `failures`, the exit status 1) and the run goes
    on: one broken baseline must not cost the whole table. The output starts as NaN (see
    `poison_next_output`): an element `fn` leaves unwritten fails the check."""
    from common import graph_median_ms, poison_next_output, rel_err

    try:
        # The previous method's output (same size, same inputs: right values) was just freed.
        poison_next_output(want.shape, inputs[0][0].dtype, inputs[0][0].device)
        err = rel_err(fn(*inputs[0]), want)
        if not err < 1e-2:
            raise AssertionError(f"relative error {err:.2e} against float64")
        ms = graph_median_ms([lambda args=args: fn(*args) for args in inputs])
        return flops / ms / 1e9
    except Exception as exc:  # noqa: BLE001 -- reported, and the exit status is 1
        failures.append(f"{what}: {type(exc).__name__}: {exc}")
        print(f"FAIL: {failures[-1]}", file=sys.stderr, flush=True)
        traceback.print_exc()
        return None


def add_ratios(ratios: dict[str, list[float]], tflops: dict[str, float | None]) -> float | None:
    """Append tileflow's ratio to each baseline that ran; returns tileflow's TFLOP/s."""
    ours = tflops["tileflow"]
    for name in ratios:
        if ours and tflops[name]:
            ratios[name].append(ours / tflops[name])
    return ours


def swiglu_reference(x, gate, up):
    """float64 silu(x @ gate^T) * (x @ up^T)."""
    import torch.nn.functional as F

    x, gate, up = x.double(), gate.double(), up.double()
    return F.silu(x @ gate.t()) * (x @ up.t())


def swiglu_methods(config):
    """The MLP's input projection, silu(x @ gate^T) * (x @ up^T), three ways: tileflow's one fused
    kernel (as the gemm_padding pass emits it), two cuBLAS GEMMs and eager elementwise ops, and
    the same through Inductor with dynamic shapes (cuBLAS GEMMs, one fused elementwise kernel)."""
    import torch
    import torch.nn.functional as F

    import tileflow

    def tileflow_swiglu(x, gate, up):
        with tileflow.use_config(config):
            return tileflow.ops.padded_gemm(x, gate, weight_up=up, activation="swiglu")

    def unfused(x, gate, up):
        return F.silu(F.linear(x, gate)) * F.linear(x, up)

    methods = {"tileflow": tileflow_swiglu, "cuBLAS + eager": unfused}
    if torch.cuda.is_available():
        methods["Inductor-dynamic"] = torch.compile(unfused, dynamic=True)
    return methods


def qkv_reference(x, *weights):
    """float64 x @ cat(weights)^T."""
    import torch

    return x.double() @ torch.cat(weights).double().t()


def qkv_methods(config):
    """A layer's Q, K and V projections (x @ cat(Wq, Wk, Wv)^T): tileflow's one kernel reading the
    three weights (as the gemm_padding pass emits it), tileflow's three GEMMs (as before it), three
    cuBLAS GEMMs written into one output, and one cuBLAS GEMM over a stacked weight (vLLM's
    QKVParallelLinear, whose copy is made at load time: outside the timing)."""
    import torch
    import torch.nn.functional as F

    import tileflow

    def tileflow_one(x, wq, wk, wv):
        with tileflow.use_config(config):
            return tileflow.ops.padded_gemm(x, wq, more_weights=[wk, wv])

    def tileflow_three(x, *weights):
        with tileflow.use_config(config):
            return torch.cat([tileflow.ops.padded_gemm(x, w) for w in weights], dim=1)

    def cublas_three(x, *weights):
        out = x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))
        start = 0
        for w in weights:
            torch.mm(x, w.t(), out=out[:, start:start + w.shape[0]])
            start += w.shape[0]
        return out

    stacked: dict[tuple[int, ...], torch.Tensor] = {}

    def cublas_stacked(x, *weights):
        key = tuple(w.data_ptr() for w in weights)
        if key not in stacked:
            stacked[key] = torch.cat(weights)
        return F.linear(x, stacked[key])

    return {"tileflow": tileflow_one, "tileflow, three GEMMs": tileflow_three, "cuBLAS, three GEMMs": cublas_three,
            "cuBLAS, stacked weight": cublas_stacked}


def _fused_table(title: str, label: str, methods: dict, weights: list, reference, flops_per_row: float,
                 m_values: list[int], peak: float, failures: list[str], checkpoint, device: str, notes: str) -> str:
    """Time `methods` (each fn(x, *weights)) at every M of `m_values` against `reference(x,
    *weights)`: TFLOP/s, tileflow's % of the datasheet `peak`, and its geomean ratio to each other method
    (`label` names the table's cells in failures)."""
    import torch

    from common import geomean, markdown_table

    k = weights[0].shape[1]
    rows, ratios = [], {name: [] for name in methods if name != "tileflow"}
    headers = ["M"] + [f"{name} TFLOP/s" for name in methods] + ["tileflow % of datasheet peak"]
    for m in m_values:
        xs = [torch.randn(m, k, device=device, dtype=torch.bfloat16) for _ in range(max(1, min(8, (64 << 20) // (m * k * 2))))]
        want = reference(xs[0], *weights)
        tflops = {name: checked_tflops(fn, [(x, *weights) for x in xs], want, m * flops_per_row, failures,
                                       f"{label} {name} at M={m}") for name, fn in methods.items()}
        ours = add_ratios(ratios, tflops)
        rows.append([m] + [_cell(tflops, name) for name in methods] + ([f"{100 * ours / peak:.0f}%"] if ours else ["FAIL"]))
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
        if checkpoint:
            checkpoint(f"## {title}\n\n" + markdown_table(headers, rows))
    return (f"## {title}\n\n" + markdown_table(headers, rows) + "\n\n"
            + "\n".join(f"- geomean tileflow / {name}: **{geomean(vals):.2f}x**" for name, vals in ratios.items() if vals)
            + "\n- " + notes)


def run_swiglu(quick: bool, peak: float, failures: list[str], checkpoint=None, *, device: str = "cuda") -> str:
    """GPU: Llama-3-8B's fused SwiGLU input projection (gate and up 14336 x 4096), the model's
    largest GEMM, which the main table measures only unfused (28672 x 4096)."""
    import torch

    import tileflow

    n, k = 14336, 4096
    gate, up = (torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5 for _ in range(2))
    return _fused_table("Fused SwiGLU input projection (gate and up 14336 x 4096)", "SwiGLU",
                        swiglu_methods(tileflow.Config(target="triton", max_tokens=MAX_TOKENS)), [gate, up],
                        swiglu_reference, 2 * 2 * n * k, [64, 4096] if quick else [16, 64, 256, 1024, 4096, 8192],
                        peak, failures, checkpoint, device,
                        "tileflow: one kernel (both weights' tiles, silu(gate) * up in the epilogue); the others: two "
                        "GEMMs and the elementwise work; TFLOP/s count both GEMMs")


def run_qkv(quick: bool, peak: float, failures: list[str], checkpoint=None, *, device: str = "cuda") -> str:
    """GPU: Llama-3-8B's Q, K and V projections (4096 + 1024 + 1024 rows x 4096): one tileflow
    kernel over the three weights against three GEMMs and a stacked weight's one."""
    import torch

    import tileflow

    k = 4096
    weights = [torch.randn(rows, k, device=device, dtype=torch.bfloat16) / k**0.5 for rows in (4096, 1024, 1024)]
    return _fused_table("Q, K and V projections (4096 + 1024 + 1024 x 4096)", "QKV",
                        qkv_methods(tileflow.Config(target="triton", max_tokens=MAX_TOKENS)), weights, qkv_reference,
                        2 * 6144 * k, [16, 4096] if quick else [1, 16, 64, 256, 1024, 4096, 8192], peak, failures,
                        checkpoint, device,
                        "tileflow: one kernel, each output tile reading its columns' weight (a TMA piece of the plan "
                        "runs the three apart); `tileflow, three GEMMs` is what models compiled before this ran; "
                        "the stacked weight is copied once, outside the timing")


def run_gpu(quick: bool, write: bool, tile_timings: str | None = None, variant_m: Sequence[int] | None = VARIANT_M,
            *, device: str = "cuda") -> int:
    """GPU: the dynamic-M table, then the fused SwiGLU one. The variant columns (tileflow's
    kernel variants: VARIANTS) are timed at the M values in `variant_m` only (None: at every
    M), "-" elsewhere. The results file, summary included, is rewritten after every row.
    `device` is for the CPU check of this path (with the timing stubbed)."""
    import torch
    import torch.nn.functional as F

    import tileflow
    from common import datasheet_tflops, environment, geomean, markdown_table, measured_matmul_tflops, write_results

    if tile_timings == "auto" and not tileflow.runtime.shipped_tile_timings(
            tileflow.runtime.device_for_target("triton", device)):
        # `auto` is then the cost model: the `gemm` table again, under the measured plans' title,
        # for the stage's whole limit (only H200 times ship; a lent machine is often an H100).
        print(f"bench/gemm.py --tile-timings auto: tileflow ships no tile times for "
              f"{tileflow.runtime.device_for_target('triton', device).name}; nothing measured (run the `tiles` "
              "stage first and give its file, or the `gemm` stage for the cost model's plans)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dtype = torch.bfloat16
    env = environment()
    ceiling, peak = measured_matmul_tflops(dtype), datasheet_tflops("bfloat16", device)
    print(f"{env['device']}: measured bf16 matmul ceiling {ceiling:.0f} TFLOP/s, datasheet {peak:.0f}")
    shapes = SHAPES[:2] if quick else SHAPES
    m_values = [1, 33, 1000, 4096] if quick else M_VALUES

    def linear(x, w):
        return F.linear(x, w)

    inductor_dyn = torch.compile(linear, dynamic=True)
    inductor_max = torch.compile(linear, dynamic=True, mode="max-autotune-no-cudagraphs")
    # With measured tile times the plans choose among every kernel variant by measurement.
    config = tileflow.Config(target="triton", max_tokens=MAX_TOKENS, tile_timings=tile_timings)

    def tileflow_gemm(x, w):
        with tileflow.use_config(config):
            return tileflow.ops.padded_gemm(x, w)

    variant_methods = {f"tileflow {v}": functools.partial(planned_variant, variant=v) for v in VARIANTS}
    methods = {"tileflow": tileflow_gemm, "cuBLAS": linear, "Inductor-dynamic": inductor_dyn, "Inductor-max-autotune": inductor_max,
               **variant_methods}
    rows, ratios = [], {name: [] for name in methods if not name.startswith("tileflow")}
    variant_ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
    failures: list[str] = []
    big_m_tflops: list[float] = []  # tileflow's at M >= 2048
    cublas_best = [0.0]  # the measured peak is the best of the ceiling probe and these
    headers = (["N x K", "M"] + [f"{name} TFLOP/s" for name in methods]
               + ["tileflow % of datasheet peak", "tileflow / cuBLAS"] + [f"{v} / cuBLAS" for v in VARIANTS])
    file_name, title = (("gemm_measured_plans", "Dynamic-M GEMM with measured tile plans: tileflow vs cuBLAS vs Inductor (bf16)")
                        if tile_timings else ("gemm", "Dynamic-M GEMM: tileflow vs cuBLAS vs Inductor (bf16)"))
    if quick:
        file_name += "-quick"  # a gemm-quick stage must not replace the full table of the same day and commit
    variant_note = "every M" if variant_m is None else (
        "M in {" + ", ".join(str(m) for m in m_values if m in variant_m) + "} only (`--variant-m`), \"-\" elsewhere")
    if tile_timings == "auto":
        shipped = tileflow.runtime.shipped_tile_timings(tileflow.runtime.device_for_target("triton", device))
        preface = f"- tileflow's plans from the tile times it ships for this device (`{shipped}`)\n\n"
    elif tile_timings:
        preface = f"- tileflow's plans from the tile times in `{tile_timings}`\n\n"
    else:
        preface = "- tileflow's plans from its cost model (no tile times)\n\n"
    preface += (f"- bf16 peak: {peak:.0f} TFLOP/s (datasheet, the % column's); a large matmul through torch reached "
                f"{ceiling:.0f} in this run\n")
    preface += f"- the variant columns ({', '.join(VARIANTS)}) timed at {variant_note}\n\n"

    def summary() -> list[str]:
        """The geomeans and notes over the rows so far (every ratio from rows where both sides
        were measured): written at every checkpoint, so a cut stage still has them."""
        kernels: dict[str, int] = {}
        table_shapes = {f"{n}x{k}" for n, k in shapes}
        for kern in tileflow.runtime.compiled_kernels("padded_gemm"):
            if any(kern.spec.param(flag, False) for variant in VARIANTS.values() for flag in variant):
                continue  # the variant columns' kernels are not the plans'
            key = f"{kern.spec.param('n')}x{kern.spec.param('k')}"
            # The SwiGLU and Q, K and V tables' kernels (checkpointed with this summary) are not
            # this table's: their one kernel over three weights has the Q, K and V shape's N.
            if key in table_shapes and not kern.spec.param("segments", None):
                kernels[key] = kernels.get(key, 0) + 1
        def mean(vals: list[float]) -> str:
            return f"**{geomean(vals):.2f}x** ({len(vals)} rows)" if vals else "no row measured yet"

        measured = max(ceiling, cublas_best[0])
        big_m = (f"{geomean(big_m_tflops) / measured:.0%} of the measured bf16 peak ({measured:.0f} TFLOP/s: the best of "
                 f"the 8192^3 matmul and this run's cuBLAS rows) and {geomean(big_m_tflops) / peak:.0%} of the "
                 f"{peak:.0f} TFLOP/s datasheet peak" if big_m_tflops else "(no row measured yet)")
        return [
            f"- geomean tileflow / {name}: {mean(vals)}" for name, vals in ratios.items()
        ] + [
            *(f"- geomean tileflow {v} / cuBLAS: {mean(vals)} ({variant_note}; each M's planned tile as {v}: not in "
              "the plans until measured tile times put it there)" for v, vals in variant_ratios.items()),
            f"- tileflow at M >= 2048 (geomean): {big_m}",
            f"- tileflow kernels compiled per (N, K): {kernels} (each serves its plan's M range; a split-K kernel and its "
            "reduce kernel count as one; no recompiles)",
            "- cuBLAS and Inductor pick their own kernels per call; Inductor compiled once per method with dynamic=True.",
            "- times: median over CUDA-graph replays (device time, no host launch overhead), rotating input sets.",
        ] + [f"- FAILED: {failure}" for failure in failures]

    def checkpoint(extra: str = "") -> None:
        """Rewrite the results file (marked partial) with the rows so far and their summary: a
        stage cut by its time limit keeps both."""
        if write:
            write_results(file_name, title, env, preface + markdown_table(headers, rows) + "\n\n" + "\n".join(summary())
                          + extra, partial=True)

    for n, k in shapes:
        w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
        for m in m_values:
            sets = max(1, min(8, (64 << 20) // (m * k * 2)))  # rotate inputs that fit in L2
            xs = [torch.randn(m, k, device=device, dtype=dtype) for _ in range(sets)]
            want = xs[0].double() @ w.double().t()
            # A method left out at this M has no key: its cells read "-", a failure's "FAIL".
            timed = {name: fn for name, fn in methods.items()
                     if name not in variant_methods or variant_m is None or m in variant_m}
            tflops = {name: checked_tflops(fn, [(x, w) for x in xs], want, 2 * m * n * k, failures,
                                           f"{name} at N={n} K={k} M={m}") for name, fn in timed.items()}
            ours = add_ratios(ratios, tflops)
            if m >= 2048 and ours:
                big_m_tflops.append(ours)
            cublas_best[0] = max(cublas_best[0], tflops.get("cuBLAS") or 0.0)
            for v, vals in variant_ratios.items():
                if tflops.get(f"tileflow {v}") and tflops["cuBLAS"]:
                    vals.append(tflops[f"tileflow {v}"] / tflops["cuBLAS"])
            rows.append([f"{n}x{k}", m] + [_cell(tflops, name) for name in methods]
                        + ([f"{100 * ours / peak:.0f}%"] if ours else ["FAIL"])
                        + [_ratio_cell(tflops, name, "cuBLAS") for name in ("tileflow", *variant_methods)])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
            checkpoint()
    print("\n" + "\n".join(summary()))
    extra = ""
    for run_table in (run_swiglu, run_qkv):
        done = extra
        extra += "\n\n" + run_table(quick, peak, failures, device=device,
                                     checkpoint=(lambda text, done=done: checkpoint(done + "\n\n" + text)) if write else None)
    body = preface + markdown_table(headers, rows) + "\n\n" + "\n".join(summary()) + extra
    if write:
        print(f"wrote {write_results(file_name, title, env, body)}")
    return 1 if failures else 0


def _cell(tflops: dict[str, float | None], name: str) -> str:
    """`name`'s TFLOP/s table cell: "-" where it was not timed, FAIL where it failed its check or run."""
    if name not in tflops:
        return "-"
    return "FAIL" if tflops[name] is None else f"{tflops[name]:.1f}"


def _ratio_cell(tflops: dict[str, float | None], name: str, base: str) -> str:
    """`name` / `base` as a table cell: "-" where `name` was not timed, FAIL where either failed."""
    if name not in tflops:
        return "-"
    return f"{tflops[name] / tflops[base]:.2f}" if tflops[name] and tflops[base] else "FAIL"


def measure_tiles(path: str, *, shapes=TILE_SHAPES, device_type: str = "cuda", time_ms=None) -> int:
    """Time every candidate tile config on this GPU, plain, persistent, with TMA loads, as
    stream-K and split along K, and write per-tile seconds for `Config(tile_timings=path)`: time
    at an M giving about four full waves, divided by the waves of one program per SM (with
    that M, which `load_tile_timings` needs to turn it into a wave of the programs an SM holds
    at once). Plans then run a config's variant where it measured faster. A split kernel's
    entry is per program (one tile's K part), a stream-K kernel's per work unit (one BLOCK_K
    step of one tile): the reduce's or fixup's modeled time is taken out of the measurement, as
    plans add it back per M. Plain, TMA and split entries also carry one lone wave's time
    (`one_wave_m`, `one_wave_seconds`), which plans do not read yet.

    The file is rewritten (atomically) after each (N, K) shape, so a run cut by its time limit
    keeps every shape it finished, and a shape in the file always has all its configs (a plan
    mixing measured and modeled configs of one shape would compare numbers of different kinds).
    A kernel that fails its check or its build is reported and left out (exit status 1); the
    rest are still measured. Shapes go in TILE_SHAPES' order, the down projection first (a cut
    loses the last). `shapes`, `device_type` and `time_ms` (ms of a callable) are for the CPU
    check of this path."""
    import json
    import math

    import torch

    from common import checked_ms as checked
    from common import graph_median_ms
    from tileflow import runtime
    from tileflow.devices import detect_device
    from tileflow.lower import gemm_spec
    from tileflow.tiles import (candidate_configs, programs_per_core, split_k_factors, split_reduce_seconds,
                                stream_k_fixup_seconds)

    time_ms = time_ms or (lambda fn: graph_median_ms([fn]))
    device = detect_device(device_type)
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    dtype_label = "bfloat16" if device_type == "cuda" else "float32"
    tol = 1e-2 if device_type == "cuda" else 1e-5
    entries: list[dict] = []
    failures: list[str] = []

    def checked_ms(what: str, fn, want) -> float | None:
        return checked(what, fn, want, out_dtype=dtype, tol=tol, time_ms=time_ms, failures=failures, reference="float64")

    for n, k in shapes:
        shape_entries = []
        w = torch.randn(n, k, device=device_type, dtype=dtype) / k**0.5
        for tile in candidate_configs(n, k, dtype_label, device):
            n_tiles = math.ceil(n / tile.block_n)
            m = min(16384, tile.block_m * math.ceil(4 * device.cores / n_tiles))
            waves = math.ceil(math.ceil(m / tile.block_m) * n_tiles / device.cores)
            x = torch.randn(m, k, device=device_type, dtype=dtype)
            want = x.double() @ w.double().t()
            base = {"device": device.name, "dtype": dtype_label, "n": n, "k": k, "tile": tile.to_dict()}
            resident = programs_per_core(tile, dtype_label, device)

            def one_wave(kernel_call, programs_per_rows: int, what: str, split: int = 1) -> dict:
                """The kernel timed over the largest grid one wave of resident programs holds (at
                least one BLOCK_M of rows): `one_wave_m` and `one_wave_seconds` (a split's reduce,
                modeled, taken out). Plans do not read them yet: they are what a model of a lone
                wave would be fitted to (bench/NOTES.md, Session 39)."""
                m1 = tile.block_m * max(1, device.cores * resident // programs_per_rows)
                x1 = x[:m1] if m1 <= m else torch.randn(m1, k, device=device_type, dtype=dtype)
                ms1 = checked_ms(f"{what} (one wave, M={m1})", lambda: kernel_call(x1), x1.double() @ w.double().t())
                if ms1 is None:
                    return {}
                reduce_s = float(split_reduce_seconds(m1, n, split, device, dtype_label)) if split > 1 else 0.0
                return {"one_wave_m": m1, "one_wave_seconds": max(ms1 / 1e3 - reduce_s, 1e-9)}

            # The config's whole-tile kernels: plans run the persistent or TMA one where it wins.
            for variant in ({}, {"persistent": True}, {"tma": True}):
                spec = gemm_spec(dtype=dtype, out_dtype=dtype, n=n, k=k, tile=tile, **variant)
                try:
                    kernel = runtime.get_kernel("triton", spec)
                except Exception as exc:  # noqa: BLE001 -- reported, the rest still measured
                    failures.append(f"{spec.name}: {type(exc).__name__}: {exc}")
                    print(f"FAIL: {failures[-1]}", file=sys.stderr, flush=True)
                    continue
                ms = checked_ms(spec.name, lambda kernel=kernel: kernel(x, w), want)
                if ms is None:
                    continue
                lone = {} if variant.get("persistent") else one_wave(lambda xs, kernel=kernel: kernel(xs, w), n_tiles, spec.name)
                shape_entries.append({**base, "tile_seconds": ms / 1e3 / waves, "m": m, **variant, **lone})
                print(f"{n}x{k} {spec.name}: {ms:.3f} ms at M={m} ({waves} waves)", flush=True)
            # Stream-K at the same M: the time of one work unit (a BLOCK_K step of one tile) on the
            # busiest SM, the fixup's modeled time taken out (plans add it back per M).
            spec = gemm_spec(dtype=dtype, out_dtype=dtype, n=n, k=k, tile=tile, stream_k=True)
            ms = checked_ms(f"{spec.name} (stream-K)",
                            lambda spec=spec: runtime.get_kernel("triton", spec)(x, w, num_programs=device.cores), want)
            if ms is not None:
                tiles = math.ceil(m / tile.block_m) * n_tiles
                busiest = math.ceil(tiles * math.ceil(k / tile.block_k) / device.cores)
                fixup_s = float(stream_k_fixup_seconds(tiles, tile.block_m, tile.block_n, device.cores, device))
                # The fixup's model may overestimate it: never credit it with more than half the time.
                shape_entries.append({**base, "tile_seconds": max(ms / 1e3 - fixup_s, ms / 2e3) / busiest, "m": m,
                                      "stream_k": True})
                print(f"{n}x{k} {spec.name}: {ms:.3f} ms at M={m} ({busiest} units on the busiest SM, "
                      f"fixup modeled at {fixup_s * 1e3:.3f} ms)", flush=True)
            for split in split_k_factors(tile, k, device)[1:]:
                # Few rows, so the split has idle SMs to fill: as many programs as about four waves.
                m_split = tile.block_m * max(1, math.ceil(4 * device.cores / (n_tiles * split)))
                waves_split = math.ceil(math.ceil(m_split / tile.block_m) * n_tiles * split / device.cores)
                xs = x[:m_split] if m_split <= m else torch.randn(m_split, k, device=device_type, dtype=dtype)
                spec = gemm_spec(dtype=dtype, out_dtype=dtype, n=n, k=k, tile=tile, split_k=True)
                ms = checked_ms(f"{spec.name} (split {split})",
                                lambda spec=spec, xs=xs, split=split: runtime.get_kernel("triton", spec)(xs, w, split_k=split),
                                xs.double() @ w.double().t())
                if ms is None:
                    continue
                reduce_s = split_reduce_seconds(m_split, n, split, device, dtype_label)
                lone = one_wave(lambda xs, spec=spec, split=split: runtime.get_kernel("triton", spec)(xs, w, split_k=split),
                                n_tiles * split, f"{spec.name} (split {split})", split=split)
                shape_entries.append({**base, "tile_seconds": max(ms / 1e3 - reduce_s, 1e-9) / waves_split, "m": m_split,
                                      "split_k": split, **lone})
                print(f"{n}x{k} {spec.name} split {split}: {ms:.3f} ms at M={m_split} ({waves_split} waves, "
                      f"reduce modeled at {reduce_s * 1e3:.3f} ms)", flush=True)
        entries += shape_entries
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(entries, f, indent=1)
        os.replace(tmp, path)
        print(f"wrote {len(entries)} tile timings to {path} ({n}x{k} done)", flush=True)
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes and four M values")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/")
    parser.add_argument("--measure-tiles", metavar="FILE", help="measure per-tile times for Config(tile_timings=FILE)")
    parser.add_argument("--tile-timings", metavar="FILE",
                        help="plan tileflow's GEMMs from these measured tile times ('auto': the ones tileflow ships for "
                             "this device); without it, from the cost model")
    parser.add_argument("--variant-m", default=",".join(map(str, VARIANT_M)), metavar="M,M,...|all",
                        help=f"time the kernel-variant columns ({', '.join(VARIANTS)}) at these M only, or at every M "
                             "('all'); default %(default)s")
    args = parser.parse_args()
    try:
        variant_m = None if args.variant_m == "all" else [int(m) for m in args.variant_m.split(",") if m]
    except ValueError:
        parser.error(f"--variant-m takes comma-separated integers or 'all', got {args.variant_m!r}")
    import torch

    if not torch.cuda.is_available():
        if args.measure_tiles:
            print("bench/gemm.py --measure-tiles needs a CUDA GPU", file=sys.stderr)
            return 2
        return smoke()
    if args.measure_tiles:
        return measure_tiles(args.measure_tiles)
    return run_gpu(args.quick, not args.no_write, args.tile_timings, variant_m)


if __name__ == "__main__":
    sys.exit(main())
