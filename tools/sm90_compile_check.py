"""Compile tileflow's Triton kernels for a Hopper GPU (sm_90) without one.

The Triton interpreter accepts code the GPU compiler rejects or runs badly (shared memory past
what a Hopper block can have, register spills, loads it cannot pipeline). This tool compiles
kernels ahead of time with `triton.compile` and an explicit `GPUTarget` (Triton's bundled
`ptxas`, no GPU), specialized as a real launch would be (ints equal to 1 become constants;
16-byte-aligned pointers and multiples of 16 get the divisibility hint), and reports each
kernel's shared memory, registers and spill bytes, how many spill instructions sit inside its
innermost tensor-core loops (`hot_spills`, from Triton's bundled nvdisasm: the spills that cost
time), how many instructions one iteration of each such loop issues (`loop_instrs`), which
tensor-core instruction its dots became and how its loads reach shared memory.

ptxas runs as Triton 3.6 runs it for a launch (`-v` for sm_90a, less `-lineinfo`, which changes
no code): the GPU machine's Triton. Triton 3.9 adds `--regAllocOptLevel=2`, under which a few
kernels spill more than reported here (bench/NOTES.md, session 33).

Two ways to run it, both with `TRITON_INTERPRET=1`:

    python -m tools.sm90_compile_check           # the kernels the benchmarks launch on an
                                                 # H200, at their real sizes (launches recorded,
                                                 # not executed); exit 1 on any failure
    python -m pytest -p tools.sm90_compile_check tests/test_triton_gemm.py
                                                 # every kernel the tests launch (they still
                                                 # run in the interpreter); failures fail the run

`SM90_REPORT=path` makes the pytest form write one line per compiled kernel to `path`. Loop sizes
come from disassembling the attention kernels, and any kernel with local memory (for its hot
spills); `SM90_LOOP_SIZES=all` disassembles every kernel (most of a second each).
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any

import pytest
import torch

_TORCH_TO_TRITON = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "i1",
}

_LAUNCHES: dict[tuple, dict[str, Any]] = {}
# The most shared memory one block may opt in to on Hopper (228 KiB per SM less 1 KiB reserved):
# a kernel that compiles with more fails at launch.
_MAX_SHARED_BYTES = 227 * 1024


def _arg_type(value: Any) -> str:
    if type(value).__name__ == "TensorDescriptor":  # a TMA kernel's operand: Triton names its type
        from triton.runtime.jit import mangle_type

        return mangle_type(value)
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for argument {value!r}")


def _record_launch(interpreted: Any, args: tuple, kwargs: dict) -> None:
    """Remember the kernel, its argument types and constexprs (once per distinct signature)."""
    import inspect

    fn = interpreted.fn
    path = sys.modules[fn.__module__].__file__
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas") if k in kwargs}
    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args))
    bound.update(kwargs)
    # Specialize as a real launch does: ints equal to 1 become constants, and pointers and ints
    # divisible by 16 get the divisibility hint the pipeliner and vectorizer need.
    not_specialized = set(getattr(interpreted, "kwargs", {}).get("do_not_specialize") or ())
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    divisible: list[int] = []
    for index, (name, param) in enumerate(params.items()):
        value = bound.get(name, param.default)
        constexpr = "constexpr" in str(param.annotation)
        specializable = name not in not_specialized and index not in not_specialized
        if constexpr or value is None or (specializable and type(value) is int and value == 1):
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        signature[name] = _arg_type(value)
        if specializable and (
            (isinstance(value, torch.Tensor) and value.data_ptr() % 16 == 0)
            or (type(value) is int and value % 16 == 0)
        ):
            divisible.append(index)
    # Launched from CPU tensors, the attention launcher turns off the GPU-only tanh.approx; an H200
    # launch of half-precision inputs takes it.
    if constexprs.get("FAST_TANH") is False and signature.get("q_ptr") in ("*fp16", "*bf16"):
        constexprs["FAST_TANH"] = True
    key = (path, fn.__name__, repr(signature), repr(constexprs), repr(sorted(options.items())),
           tuple(divisible))
    _LAUNCHES.setdefault(key, {"path": path, "name": fn.__name__, "signature": signature,
                               "constexprs": constexprs, "options": options,
                               "divisible": divisible, "loop_sizes": _wants_loop_sizes(fn.__name__)})


def _wants_loop_sizes(kernel: str) -> bool:
    """Whether to disassemble a kernel for its innermost loops' sizes even when it uses no local
    memory: every attention kernel (their KV loop was issue-bound once, and the test bounds it), or
    every kernel under `SM90_LOOP_SIZES=all`."""
    return os.environ.get("SM90_LOOP_SIZES") == "all" or "meta_attention" in kernel


def innermost_mma_loops(sass: str) -> list[list[str]]:
    """The instructions of each innermost loop that runs tensor-core instructions (a loop is a
    backward branch to a label; one holding another such loop, say a task loop around a KV loop,
    is not innermost), from nvdisasm's SASS listing, in program order."""
    import re
    labels, body = {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(body)
        elif re.search(r"/\*[0-9a-f]{4,}\*/", line):
            body.append(line)
    loops = []
    for end, line in enumerate(body):
        target = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        if target and target.group(1) in labels and labels[target.group(1)] <= end:
            loops.append((labels[target.group(1)], end))
    mma = [(a, b) for a, b in loops if any(re.search(r"\b(HGMMA|HMMA)", body[i]) for i in range(a, b + 1))]
    return [body[a:b + 1] for a, b in mma if not any((c, d) != (a, b) and a <= c and d <= b for c, d in mma)]


def hot_loop_spills(sass: str) -> int:
    """Spill loads/stores (LDL/STL) inside the innermost loops that run tensor-core instructions:
    the ones that cost time. Spills elsewhere (a task's setup, the epilogue) run once per tile."""
    import re
    return sum(1 for loop in innermost_mma_loops(sass) for line in loop if re.search(r"\b(LDL|STL)\b", line))


def hot_loop_sizes(sass: str) -> list[int]:
    """Instructions per iteration of each innermost tensor-core loop, in program order: what one
    warp issues per K or KV step. Where the non-MMA part of that outgrows the tensor cores' time
    for the step, the loop is issue-bound (the attention kernel's address arithmetic was)."""
    return [len(loop) for loop in innermost_mma_loops(sass)]


def uses_local_memory(ptxas_log: str) -> bool:
    """Whether ptxas's verbose log gives the kernel a stack frame or spills, or does not say (a log
    of one function, all zero, is the only proof that no instruction touches local memory)."""
    import re
    sizes = [int(n) for n in re.findall(r"(\d+) bytes (?:stack frame|spill stores|spill loads)", ptxas_log)]
    return len(sizes) != 3 or any(sizes)


def ptx_instructions(compiled: "Any") -> "dict[str, Any]":
    """Which tensor-core instruction the dots became and how operands reach shared memory:
    Hopper's peak needs wgmma (mma.sync reaches about half) fed by async copies (cp.async or TMA)."""
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    return {"mma": mma, "cp_async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
            "tma": ptx.count("cp.async.bulk.tensor")}


# Runs in a fresh interpreter: with TRITON_INTERPRET=1 set at import, Triton's own standard
# library (tl.cdiv, tl.sigmoid, ...) is made of interpreted functions the compiler cannot read.
_COMPILE_SCRIPT = r'''
import importlib.util, json, sys, traceback
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def ptxas_usage(compiled, loop_sizes):
    """Registers and spill bytes of the kernel, from Triton's bundled ptxas in verbose mode, and
    the local-memory (spill) instructions inside its innermost tensor-core loops, from nvdisasm.

    nvdisasm costs most of a second per kernel (more than compiling a GEMM), so it runs only where
    it can find something: a kernel with a stack frame or spills (one without has no local-memory
    instruction anywhere, so none in a loop), or one whose loop sizes are asked for."""
    import os, re, subprocess, tempfile
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        ptxas = get_ptxas(90)
    except TypeError:  # older Triton: no arch argument
        ptxas = get_ptxas()
    ptxas = getattr(ptxas, "path", ptxas)
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as fh:
            fh.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", cubin], capture_output=True, text=True).stderr
        regs = re.search(r"Used (\d+) registers", out)
        spills = re.search(r"(\d+) bytes spill stores", out)
        local_memory = uses_local_memory(out)
        nvdisasm = os.path.join(os.path.dirname(ptxas), "nvdisasm")
        sass = (subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True).stdout
                if (loop_sizes or local_memory) and os.path.exists(nvdisasm) and os.path.exists(cubin)
                else None)
    return {"regs": int(regs.group(1)) if regs else None, "spills": int(spills.group(1)) if spills else None,
            "hot_spills": hot_loop_spills(sass) if sass is not None else None if local_memory else 0,
            "loop_instrs": None if sass is None else hot_loop_sizes(sass)}
'''
# The helpers the script shares with this module (one definition, unit-tested here).
_COMPILE_SCRIPT += "\n\n" + "\n\n".join(
    inspect.getsource(fn) for fn in (innermost_mma_loops, hot_loop_spills, hot_loop_sizes, uses_local_memory,
                                     ptx_instructions))
_COMPILE_SCRIPT += r'''


launches = json.load(open(sys.argv[1]))
modules, results = {}, []
for i, launch in enumerate(launches):
    path = launch["path"]
    if path not in modules:
        spec = importlib.util.spec_from_file_location(f"_sm90_{len(modules)}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules[path] = module
    fn = getattr(modules[path], launch["name"])
    try:
        attrs = {(i,): [["tt.divisibility", 16]] for i in launch["divisible"]}
        compiled = triton.compile(ASTSource(fn, launch["signature"], launch["constexprs"], attrs),
                                  target=GPUTarget("cuda", 90, 32), options=launch["options"])
        results.append({"ok": True, "shared": compiled.metadata.shared,
                        **ptxas_usage(compiled, launch["loop_sizes"]),
                        **ptx_instructions(compiled)})
    except Exception:
        results.append({"ok": False, "error": traceback.format_exc(limit=2)[-3000:]})
json.dump(results, open(sys.argv[2], "w"))
'''


def pytest_configure(config: pytest.Config) -> None:
    """Wrap the interpreter's launch so every launch is compiled for sm_90 first."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise pytest.UsageError("tools.sm90_compile_check needs TRITON_INTERPRET=1")
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self: Any, *args: Any, grid: Any, warmup: Any, **kwargs: Any) -> Any:
        _record_launch(self, args, dict(kwargs))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run


def _compile_all() -> list[str]:
    """Compile every recorded launch for sm_90 in a subprocess; returns one line per kernel."""
    import json
    import subprocess
    import tempfile

    launches = list(_LAUNCHES.values())
    # One compiler process per core, each with every n-th launch: ptxas and Triton's passes are
    # single-threaded, and the kernels are independent.
    workers = max(1, min(len(launches), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count() or 1))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results: list[dict] = [{}] * len(launches)
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for w in range(workers):
            src, dst = os.path.join(tmp, f"launches{w}.json"), os.path.join(tmp, f"results{w}.json")
            with open(src, "w", encoding="utf-8") as fh:
                json.dump(launches[w::workers], fh)
            procs.append((w, dst, subprocess.Popen([sys.executable, "-c", _COMPILE_SCRIPT, src, dst], env=env)))
        codes = [proc.wait() for _, _, proc in procs]  # all finish before any failure is raised
        for (w, dst, proc), code in zip(procs, codes):
            if code != 0:
                raise subprocess.CalledProcessError(code, proc.args)
            with open(dst, encoding="utf-8") as fh:
                results[w::workers] = json.load(fh)
    lines = []
    for launch, result in zip(launches, results):
        if result["ok"] and result["shared"] > _MAX_SHARED_BYTES:
            result = {"ok": False, "error": f"needs {result['shared']} bytes of shared memory; "
                                            f"a Hopper block can have {_MAX_SHARED_BYTES}"}
        consts = {k: v for k, v in launch["constexprs"].items() if v is not None}
        head = f"{launch['name']} {launch['options']} {consts}"
        if result["ok"]:
            lines.append(f"ok {head} shared={result['shared']} regs={result['regs']} spills={result['spills']} "
                         f"hot_spills={result['hot_spills']} loop_instrs={_loop_sizes(result['loop_instrs'])} "
                         f"mma={result['mma']} cp.async={result['cp_async']} "
                         f"tma={result['tma']}")
        else:
            lines.append(f"FAILED {head} ({launch['path']}):\n{result['error']}")
    return lines


def _loop_sizes(sizes: list[int] | None) -> str:
    """'985/1449' for two innermost loops; '-' where the kernel was not disassembled (no nvdisasm,
    or no local memory and no loop sizes asked for)."""
    return "-" if sizes is None else "/".join(map(str, sizes)) or "0"


_RESULT_LINES: list[str] = []


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Compile what the tests launched; a kernel that does not compile for the GPU fails the run."""
    _RESULT_LINES.extend(_compile_all() if _LAUNCHES else [])
    if any(line.startswith("FAILED") for line in _RESULT_LINES) and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the count and every failure; write the per-kernel report when asked."""
    failures = [line for line in _RESULT_LINES if line.startswith("FAILED")]
    terminalreporter.write_sep("=", f"sm_90 compile check: {len(_RESULT_LINES)} kernels, {len(failures)} failed")
    for failure in failures:
        terminalreporter.write_line(failure)
    report = os.environ.get("SM90_REPORT")
    if report:
        with open(report, "w", encoding="utf-8") as fh:
            fh.write("\n".join(_RESULT_LINES) + "\n")


def _record_only() -> None:
    """Make interpreted launches only record their signature (no execution): for compiling
    kernels at real model sizes, which the interpreter would take minutes to run."""
    from triton.runtime.interpreter import InterpretedFunction

    def run(self: Any, *args: Any, grid: Any, warmup: Any, **kwargs: Any) -> None:
        _record_launch(self, args, dict(kwargs))

    InterpretedFunction.run = run


# (bias, residual) epilogues models fuse into GEMMs of the benchmark's (N, K): Qwen2's QKV bias,
# an attention output projection with a bias and the residual (GPT-2's), Llama's down projection
# with the residual.
_MODEL_EPILOGUES = {(6144, 4096): (True, False), (4096, 4096): (True, True), (4096, 14336): (False, True)}


# What `_launch_benchmark_kernels` launches: every kernel; the GEMM variants at one shape; only
# the two largest GEMM tiles at one shape (and every attention kernel); or only the largest tile
# (and the attention kernels but the second Llama head grouping).
SCOPES = ("all", "variants-at-one-shape", "largest-tiles", "largest-tile")


def largest_tiles(tiles: list[Any], count: int = 2) -> list[Any]:
    """The `count` tiles with the most output elements (then the deepest K step, the most
    stages): the ones nearest Hopper's register file and shared-memory limits, where a
    generator change shows up as spills or a kernel too big to launch."""
    ranked = sorted(tiles, key=lambda t: (t.block_m * t.block_n, t.block_k * t.num_stages, t.num_warps))
    return ranked[-count:]


def _launch_benchmark_kernels(scope: str = "all") -> None:
    """Launch (record-only) the kernels bench/gemm.py, bench/attention.py and the grouped GEMM
    run on an H200: the tile configs its device entry offers, bf16, real Llama/Mixtral sizes.

    `scope` (one of SCOPES) narrows the GEMMs; the attention kernels are always all there.
    "variants-at-one-shape": the persistent, split-K, stream-K and TMA variants compile at the
    first (N, K) only; every shape keeps its plain and epilogue kernels. N and K are constexprs,
    so each shape is its own compile (ptxas gave two registers more or less across them), but no
    other code path; it cuts 191 compiles to 101 (a GEMM's takes about 1 s, cold).
    "largest-tiles": also the plain kernels at the first (N, K) only (each model epilogue stays
    at its own), and every GEMM family (plain, each variant, each model epilogue, SwiGLU,
    grouped experts) at its two `largest_tiles` only: 63 kernels. "largest-tile": each family at
    its one largest tile, and the attention kernels but those of Llama's second head grouping
    (32 query heads over 4 KV heads: the same code as over 8, another GQA constant): 37 kernels,
    the default test run's form (a compile takes about 2 s of a core, cold; CI has two)."""
    import math

    from tileflow import runtime
    from tileflow.devices import get_device
    from tileflow.lower import gemm_spec, grouped_gemm_spec
    from tileflow.runtime.attention import run_meta_attention, run_meta_attention_varlen
    from tileflow.tiles import candidate_configs

    bf16 = torch.bfloat16
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r} is not one of {SCOPES}")

    largest = scope in ("largest-tiles", "largest-tile")

    def tiles(*args: Any, **kwargs: Any) -> list[Any]:
        offered = candidate_configs(*args, **kwargs)
        return largest_tiles(offered, 1 if scope == "largest-tile" else 2) if largest else offered

    device = get_device("H200")
    # Launches only record their signature, so GEMM operands are left uninitialized: random
    # values for the expert weights alone (8 x 28672 x 4096) took most of a minute.
    for shape, (n, k) in enumerate([(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]):
        x, w = torch.empty(3, k, dtype=bf16), torch.empty(n, k, dtype=bf16)
        for tile in tiles(n, k, "bfloat16", device):
            if shape == 0 or not largest:
                spec = gemm_spec(dtype=bf16, out_dtype=bf16, n=n, k=k, tile=tile)
                runtime.get_kernel("triton", spec)(x, w)
            if shape == 0 or scope == "all":
                spec = gemm_spec(dtype=bf16, out_dtype=bf16, n=n, k=k, tile=tile, persistent=True)
                runtime.get_kernel("triton", spec)(x, w)
                # The split-K pair (partial tiles, then the reduce kernel) and the stream-K pair.
                spec = gemm_spec(dtype=bf16, out_dtype=bf16, n=n, k=k, tile=tile, split_k=True)
                runtime.get_kernel("triton", spec)(x, w, split_k=4)
                spec = gemm_spec(dtype=bf16, out_dtype=bf16, n=n, k=k, tile=tile, stream_k=True)
                runtime.get_kernel("triton", spec)(x, w, num_programs=device.cores)
                spec = gemm_spec(dtype=bf16, out_dtype=bf16, n=n, k=k, tile=tile, tma=True)
                runtime.get_kernel("triton", spec)(x, w)
            # With the epilogue models give the GEMM of this shape, if any.
            bias, residual = _MODEL_EPILOGUES.get((n, k), (False, False))
            if bias or residual:
                spec = gemm_spec(dtype=bf16, out_dtype=bf16, n=n, k=k, tile=tile, tma=True, has_bias=bias,
                                 has_residual=residual)
                runtime.get_kernel("triton", spec)(x, w, torch.empty(n, dtype=bf16) if bias else None,
                                                    torch.empty(3, n, dtype=bf16) if residual else None)
    # Llama-3-8B's fused SwiGLU MLP (gate and up weights separate, as the pass fuses them).
    x = torch.empty(3, 4096, dtype=bf16)
    gate, up = torch.empty(14336, 4096, dtype=bf16), torch.empty(14336, 4096, dtype=bf16)
    for tile in tiles(14336, 4096, "bfloat16", device, weight_tiles=2):
        for split in (False, True):
            spec = gemm_spec(dtype=bf16, out_dtype=bf16, n=14336, k=4096, tile=tile, activation="swiglu", split_k=split)
            runtime.get_kernel("triton", spec)(x, gate, weight_up=up, **({"split_k": 2} if split else {}))
        # Gemma's GeGLU: the tanh GELU of the gate in the same two-accumulator kernel.
        spec = gemm_spec(dtype=bf16, out_dtype=bf16, n=14336, k=4096, tile=tile, activation="geglu_tanh")
        runtime.get_kernel("triton", spec)(x, gate, weight_up=up)
    # Llama-3-8B's Q, K and V projections as one GEMM over their three weights (N segments), with
    # the bias Qwen2's have (and without, outside the largest-tile scopes); every variant.
    widths = (4096, 1024, 1024)
    weights = [torch.empty(width, 4096, dtype=bf16) for width in widths]
    biases = [torch.empty(width, dtype=bf16) for width in widths]
    for tile in tiles(6144, 4096, "bfloat16", device):
        for variant, launch in (({}, {}), ({"persistent": True}, {}), ({"split_k": True}, {"split_k": 4}),
                                ({"stream_k": True}, {"num_programs": device.cores}), ({"tma": True}, {})):
            for bias in (True,) if largest else (False, True):
                spec = gemm_spec(dtype=bf16, out_dtype=bf16, n=6144, k=4096, tile=tile, has_bias=bias, segments=widths,
                                 **variant)
                runtime.get_kernel("triton", spec)(x, weights[0], biases[0] if bias else None, more_weights=weights[1:],
                                                    more_biases=biases[1:] if bias else (), **launch)
    # Mixtral-like experts: 8 experts, SwiGLU gate/up (N = 2 x 14336) and down; gpt-oss-like
    # gate/up ones (hidden and expert width 2880): interleaved gate and up, per-expert biases,
    # the clamped SwiGLU.
    for n, k, activation in [(14336, 4096, "swiglu"), (4096, 14336, "none"), (2880, 2880, "clamped_swiglu")]:
        gated = activation != "none"
        rows = 2 * n if gated else n
        clamp = (1.702, 7.0) if activation == "clamped_swiglu" else None
        for tile in tiles(n, k, "bfloat16", device, weight_tiles=2 if gated else 1):
            spec = grouped_gemm_spec(dtype=bf16, out_dtype=bf16, n=n, k=k, experts=8, tile=tile,
                                     activation=activation, has_bias=clamp is not None, clamp=clamp)
            kernel = runtime.get_kernel("triton", spec)
            x, offsets = torch.empty(5, k, dtype=bf16), torch.tensor([0, 2, 2, 3, 5, 5, 5, 5], dtype=torch.int32)
            if clamp is None:
                kernel(x, torch.empty(8, rows, k, dtype=bf16), offsets)
            else:  # gpt-oss's [E, K, 2N] parameter, transposed
                kernel(x, torch.empty(8, k, rows, dtype=bf16).transpose(1, 2), offsets, torch.empty(8, rows, dtype=bf16))
    page = 16
    # Llama-3-8B-like heads (32 query heads of 128 over 4 or 8 KV heads), Gemma-2-9B's (16 over 8
    # heads of 256, scores soft-capped), gpt-oss-20b's (64 over 8 heads of 64, attention sinks,
    # 128-token windows) and MPT-7B's (32 heads of 128, no GQA, ALiBi): decode-sized and prefill tiles.
    for q_lens, kv_lens, hq, hkv, d, softcap, sinks, alibi in [
            ([1] * 4, [40] * 4, 32, 4, 128, None, False, False), ([64, 5, 1], [64, 80, 33], 32, 4, 128, None, False, False),
            ([1] * 4, [40] * 4, 32, 8, 128, None, False, False), ([64, 5, 1], [64, 80, 33], 32, 8, 128, None, False, False),
            ([1] * 4, [40] * 4, 16, 8, 256, 50.0, False, False), ([80, 5, 1], [80, 80, 33], 16, 8, 256, 50.0, False, False),
            ([1] * 4, [40] * 4, 64, 8, 64, None, True, False), ([80, 5, 1], [80, 80, 33], 64, 8, 64, None, True, False),
            ([1] * 4, [40] * 4, 32, 32, 128, None, False, True), ([64, 5, 1], [64, 80, 33], 32, 32, 128, None, False, True)]:
        if scope == "largest-tile" and (hq, hkv) == (32, 4):
            continue
        pages = [math.ceil(n / page) for n in kv_lens]
        table = torch.zeros(len(kv_lens), max(pages), dtype=torch.int32)
        start = 0
        for s, count in enumerate(pages):
            table[s, :count] = torch.arange(start, start + count, dtype=torch.int32)
            start += count
        cu = torch.tensor([0] + [sum(q_lens[:i + 1]) for i in range(len(q_lens))], dtype=torch.int32)
        run_meta_attention_varlen(
            torch.randn(sum(q_lens), hq, d, dtype=bf16), torch.randn(start, page, hkv, d, dtype=bf16),
            torch.randn(start, page, hkv, d, dtype=bf16), table, cu,
            torch.tensor(kv_lens, dtype=torch.int32), target="triton", softcap=softcap,
            sinks=torch.randn(hq) if sinks else None, sliding_window=128 if sinks else None,
            alibi_slopes=2.0 ** -torch.arange(1.0, hq + 1) if alibi else None)
    # The dense op with a compiled transformers model's causal mask as a bias (the e2e prompts).
    s = 80
    mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
    run_meta_attention(torch.randn(1, 32, s, 128, dtype=bf16), torch.randn(1, 8, s, 128, dtype=bf16),
                       torch.randn(1, 8, s, 128, dtype=bf16), mask, False, None, target="triton")
    run_meta_attention(torch.randn(1, 16, s, 256, dtype=bf16), torch.randn(1, 8, s, 256, dtype=bf16),
                       torch.randn(1, 8, s, 256, dtype=bf16), mask, False, None, target="triton",
                       softcap=torch.tensor(50.0))
    # A compiled plain-causal model on "tileflow_causal": the causal rule and its packed sequences'
    # key starts (two sequences in the prefill's row, one in the decode-sized call's), no mask.
    for tokens in (s, 3):  # the prefill-sized tile and the decode-sized one
        run_meta_attention(torch.randn(1, 32, tokens, 128, dtype=bf16), torch.randn(1, 8, tokens, 128, dtype=bf16),
                           torch.randn(1, 8, tokens, 128, dtype=bf16), None, True, None, target="triton",
                           key_starts=(torch.arange(tokens) >= 30).int()[None] * 30)
    # BLOOM-like: its finfo.min causal mask as a bias, ALiBi slopes, 32 heads of 128.
    eager_mask = torch.full((s, s), torch.finfo(torch.float32).min).triu(1)[None, None]
    run_meta_attention(torch.randn(1, 32, s, 128, dtype=bf16), torch.randn(1, 32, s, 128, dtype=bf16),
                       torch.randn(1, 32, s, 128, dtype=bf16), eager_mask, False, None, target="triton",
                       alibi_slopes=[2.0 ** -(h + 1) for h in range(32)])


def main() -> int:
    """`TRITON_INTERPRET=1 python -m tools.sm90_compile_check [--scope SCOPE]`: compile the
    benchmarks' kernels at their real sizes for sm_90 and print shared memory per kernel;
    exit 1 on any failure."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--scope", choices=SCOPES, default="all",
                        help="all: every kernel (191); variants-at-one-shape: the GEMMs' persistent, split-K, "
                             "stream-K and TMA variants at one (N, K) only (101); largest-tiles: every GEMM family "
                             "at its two largest tiles, at one (N, K) (each model epilogue at its own), and every "
                             "attention kernel (63); largest-tile: each GEMM family at its largest tile, and the "
                             "attention kernels but Llama's second head grouping (37; the default test run's form)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("run with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    _record_only()
    _launch_benchmark_kernels(args.scope)
    lines = _compile_all()
    print("\n".join(lines))
    failed = sum(line.startswith("FAILED") for line in lines)
    print(f"sm_90 compile check: {len(lines)} kernels, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
