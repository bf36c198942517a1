"""Shared benchmark helpers: device ceilings, median timing with events, result tables.

Method (see the device notes): check every method against a reference before timing; time with
CUDA events through `triton.testing.do_bench` (median); rotate input sets so repeated runs do not
measure the cache; report against ceilings measured in the same run.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def gpu_available() -> bool:
    """True when a CUDA GPU is visible (benchmarks need one; CPU runs do a smoke check)."""
    return torch.cuda.is_available()


def wall_median_ms(fn: Callable[[], Any], repeats: int, before: Callable[[], Any] = lambda: None) -> float:
    """Median wall-clock time of `fn()` in ms over `repeats` runs, `before()` called untimed
    before each (host-side timings on the CPU that runs them)."""
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def median_ms(fn: Callable[[int], Any], *, sets: int = 1, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of `fn(i)` in ms; `i` cycles over `sets` input sets (cache rotation)."""
    from triton.testing import do_bench

    counter = [0]

    def call() -> Any:
        counter[0] = (counter[0] + 1) % sets
        return fn(counter[0])

    return float(do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def graph_median_ms(fns: Sequence[Callable[[], Any]], *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of one call, with each callable captured in its own CUDA graph and the graphs
    replayed in rotation: measures device time without per-call host overhead (serving runs its
    steps as CUDA graphs too)."""
    graphs = [capture_graph(fn)[0] for fn in fns]
    return median_ms(lambda i: graphs[i].replay(), sets=len(graphs), warmup_ms=warmup_ms, rep_ms=rep_ms)


def capture_graph(fn: Callable[[], Any]) -> tuple[Any, Any]:
    """`fn` run once on a side stream (so compiling and caching stay outside the capture), then
    captured in a CUDA graph; returns (the graph, `fn`'s output inside it, which each replay
    rewrites)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def measured_matmul_tflops(dtype: torch.dtype = torch.bfloat16, size: int = 8192) -> float:
    """TFLOP/s of a large square matmul through torch (cuBLAS): the compute ceiling used here."""
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    ms = median_ms(lambda _: a @ b, rep_ms=300)
    return 2 * size**3 / ms / 1e9


def datasheet_tflops(dtype: str = "bfloat16", device: str = "cuda") -> float:
    """The device's dense peak TFLOP/s for `dtype` from tileflow's device table (its datasheet):
    the physical limit a "% of peak" column reads against. A measured ceiling is no such limit:
    a long 8192^3 matmul runs at power-limited clocks that the rows' short replays beat."""
    import tileflow

    return tileflow.runtime.device_for_target("triton", device).peak_flops(dtype) / 1e12


def measured_copy_gbs(nbytes: int = 2 << 30) -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus written."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda _: dst.copy_(src), rep_ms=300)
    return 2 * src.numel() / ms / 1e6


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64."""
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def poison_next_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> None:
    """Hand the next allocation of an output of `shape` and `dtype` on `device` a NaN-filled block.

    A check call usually follows the previous method's, whose output of the same size (from the
    same inputs: the right values) was just freed; the CUDA caching allocator hands that block
    back, so a kernel that leaves tiles unwritten would pass on stale data. This takes the freed
    block (best fit: same size), fills it with NaN and frees it again, so the method's output
    starts as NaN and an unwritten element fails the check (NaN never passes `rel_err < tol`).
    On the CPU there is no caching allocator: harmless, and tests can watch it being called."""
    block = torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    del block  # back to the allocator's pool, NaN inside: the method's output lands there


def checked_ms(what: str, call: Callable[[], torch.Tensor], want: torch.Tensor, *, out_dtype: torch.dtype, tol: float,
               time_ms: Callable[[Callable[[], Any]], float], failures: list[str], reference: str = "the reference",
               verbose: bool = False) -> float | None:
    """`time_ms(call)` once `call()` matched `want` (relative error < `tol`), or None with the
    failure in `failures` (the run goes on; the exit status becomes 1). `call`'s output (of
    `out_dtype`, want's size) starts as NaN (`poison_next_output`), so an element left unwritten
    fails rather than passing on the previous method's freed output. `verbose` prints the error
    and, on failure, the traceback."""
    try:
        poison_next_output(want.shape, out_dtype, want.device)
        err = rel_err(call(), want)
        if verbose:
            print(f"  {what}: rel err {err:.1e} against {reference}", flush=True)
        if not err < tol:
            raise AssertionError(f"relative error {err:.2e} against {reference}")
        return time_ms(call)
    except Exception as exc:  # noqa: BLE001 -- reported, and the exit status is 1
        failures.append(f"{what}: {type(exc).__name__}: {exc}")
        print(f"FAIL: {failures[-1]}", file=sys.stderr, flush=True)
        if verbose:
            traceback.print_exc()
        return None


def allow_recompiles(limit: int = 64) -> None:
    """Raise Dynamo's recompile limit and make reaching it an error: each backend compiled over
    one model, and each new shape or block mask, takes a recompile of the same code, and past the
    limit (8) Dynamo silently runs the rest eagerly, a method timed as eager under its name."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # the name before torch 2.6, kept as an alias
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, limit)
    dynamo_config.fail_on_recompile_limit_hit = True


def geomean(values: Sequence[float]) -> float:
    """Geometric mean (nan when empty)."""
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def environment() -> dict[str, str]:
    """Device, date, versions and the exact command, for the results header."""
    info = {
        "date": datetime.date.today().isoformat(),
        # The device machine gets a copy of the tree without .git: the caller names the commit.
        "commit": os.environ.get("BENCH_COMMIT") or _git_commit(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()})"
    return info


def _git_commit() -> str:
    """The checkout's short commit hash (with `+dirty` for local changes), or `unknown`."""
    import subprocess

    try:
        root = Path(__file__).resolve().parent
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def results_name(base: str, parts: Sequence[str], every_part: Sequence[str]) -> str:
    """The results-file name of a run of `parts` of a benchmark whose full run is `every_part`:
    `base` for the full run, else `base-part-part` (in `every_part`'s order), so runs of
    different parts on one device, date and commit (the e2e-prefill and e2e-serving stages)
    write different files instead of the later one replacing the earlier one's tables."""
    chosen = [p for p in every_part if p in set(parts)]
    return base if chosen == list(every_part) else "-".join([base, *chosen])


def sized_name(name: str, tokens: Sequence[int], every_size: Sequence[int]) -> str:
    """`name` for a run over the benchmark's full list of token counts, else `name-tokens-a-b`:
    a run narrowed to some sizes must not replace the full run's table of that day and commit."""
    return name if list(tokens) == list(every_size) else "-".join([name, "tokens", *map(str, tokens)])


def write_results(name: str, title: str, env: dict[str, str], body: str, *, partial: bool = False) -> Path:
    """Write a results file `bench/results/<name>-<device>-<date>-<commit>.md` and return its path.

    `name` must tell apart every run that can share a device, date and commit (e.g. the e2e
    stages that measure different parts): two runs with one name overwrite each other.

    Benchmarks call this with `partial=True` after every row, so a stage that its time limit
    cuts still leaves the rows it measured (marked partial), then once more at the end. The
    file is replaced atomically: a kill mid-write leaves the previous version."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    device = env["device"].split(" (")[0].replace(" ", "_")
    path = RESULTS / f"{name}-{device}-{env['date']}-{env['commit']}.md"
    header = "\n".join(f"- {k}: `{v}`" for k, v in env.items())
    status = "\n- status: **partial** (the run stopped, or has not yet finished, after the rows below)\n" if partial else ""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"# {title}\n\n{header}\n{status}\n{body}\n")
    os.replace(tmp, path)
    return path
