"""The Ascend C padded GEMM (backends/ascend/gemm.py), verified on the CPU.

The emitted kernel and host files are compiled in CANN's CPU debug mode against the Ascend C
test double in tests/ascend_cpu/ (g++, warnings as errors) and launched on CPU tensors: every
block of each launch runs in turn. Outputs are poisoned with NaN before each launch and compared
with a float64 reference on the same fresh random inputs (tests/gemm_cases.py, shared with the
Triton tests).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from gemm_cases import (EPILOGUE_CASES, EPILOGUE_TWINS, assert_close, epilogue_params, make_inputs, overflow_inputs,
                        poisoned_out, reference)
from golden_files import check_golden
from tileflow.backends.ascend import BACKEND, build_cpu_debug_kernel, render_sources
from tileflow.backends.ascend.gemm import gemm_layout
from tileflow.backends.ascend.project import write_project
from tileflow.kernel_spec import KernelSpec, TileConfig, make_params

HEADERS = Path(__file__).parent / "ascend_cpu"
TILE = TileConfig(16, 32, 32, group_m=4)
M_VALUES = (1, 2, 7, 16, 17, 63, 100, 129, 1000)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="CPU-debug builds need g++")


def gemm_spec(dtype: str = "float32", epilogue: tuple[str, ...] = (), *, n: int = 40, k: int = 72,
              tile: TileConfig = TILE, out_dtype: str | None = None) -> KernelSpec:
    """A padded_gemm spec; N and K are not multiples of any tile side."""
    if out_dtype is None:
        out_dtype = "float32" if "cast" in epilogue else dtype
    return KernelSpec(op="padded_gemm", dtype=dtype, out_dtype=out_dtype, tile=tile, epilogue=epilogue,
                      params=make_params(n=n, k=k))


# The Triton tests' cases, plus bf16 (which the Triton interpreter cannot check).
ASCEND_EPILOGUE_CASES = [*EPILOGUE_CASES, ("bfloat16", ("bias", "gelu", "residual"))]
# A 128 x 128 fp32 SwiGLU tile does not fit the 192 KiB UB at once: the epilogue runs on slices.
BIG_TILE_SPEC = gemm_spec("float32", ("bias", "swiglu", "residual"), n=150, k=40,
                          tile=TileConfig(128, 128, 32, group_m=2))
# `round`: through the input dtype to the output's; bfloat16 -> float16 rounds twice, its residual
# read as bfloat16.
ROUND_SPECS = [gemm_spec("float16", ("round", "cast")),
               gemm_spec("bfloat16", ("residual", "round", "cast"), out_dtype="float16")]
# The specs the default run launches (each a g++ build of about 2.5 s of CPU); the EPILOGUE_TWINS,
# under `extended`, are built when first asked for.
ALL_SPECS = [gemm_spec("float32"), gemm_spec("float16"), BIG_TILE_SPEC, *ROUND_SPECS] + [
    gemm_spec(dt, ep) for dt, ep in ASCEND_EPILOGUE_CASES if (dt, ep) not in EPILOGUE_TWINS
]


class _Kernels(dict):
    """Built kernels by spec; a spec not built yet is built on first use, into the same folder
    (so it reuses the precompiled prelude)."""

    def __init__(self, build_dir: Path) -> None:
        super().__init__()
        self.build_dir = build_dir

    def build(self, spec: KernelSpec) -> object:
        """Build `spec` into the folder and keep it."""
        self[spec] = kernel = build_cpu_debug_kernel(spec, [HEADERS], build_dir=self.build_dir)
        return kernel

    def __missing__(self, spec: KernelSpec) -> object:
        return self.build(spec)


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> dict[KernelSpec, object]:
    """The default run's specs, compiled once (two g++ at a time, after a first build alone that
    precompiles the prelude they share: two first builds at once would each precompile it)."""
    built = _Kernels(tmp_path_factory.mktemp("ascend_gemm"))
    first, *rest = ALL_SPECS
    built.build(first)
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(built.build, rest))  # (each thread stores its own spec's kernel)
    return built


def run_case(kernel, spec: KernelSpec, m: int, seed: int, **kwargs) -> torch.Tensor:
    inputs = make_inputs(spec, "cpu", m, seed)
    out = poisoned_out(spec, "cpu", m)
    got = kernel(inputs["x"], inputs["weight"], inputs["bias"], inputs["residual"], out=out, **kwargs)
    assert got is out, "a given `out` must be written in place and returned"
    assert_close(spec, out, reference(spec, **inputs))
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_every_m_with_one_kernel(kernels, dtype: str) -> None:
    # One compiled kernel serves every M: the host tiling changes, the code does not.
    spec = gemm_spec(dtype)
    for m in M_VALUES:
        run_case(kernels[spec], spec, m, seed=100 + m)


@pytest.mark.parametrize("dtype,epilogue", epilogue_params(ASCEND_EPILOGUE_CASES),
                         ids=lambda v: "-".join(v) if isinstance(v, tuple) else v)
def test_epilogue(kernels, dtype: str, epilogue: tuple[str, ...]) -> None:
    spec = gemm_spec(dtype, epilogue)
    for m in (7, 37):
        run_case(kernels[spec], spec, m, seed=sum(map(ord, dtype + "".join(epilogue))) + m)


def test_swiglu_takes_stacked_or_separate_weights(kernels) -> None:
    spec = gemm_spec("float16", ("bias", "swiglu"))
    inputs = make_inputs(spec, "cpu", 19, seed=5)
    n = spec.param("n")
    stacked = kernels[spec](inputs["x"], inputs["weight"], inputs["bias"])
    separate = kernels[spec](inputs["x"], inputs["weight"][:n], inputs["bias"][:n],
                             weight_up=inputs["weight"][n:], bias_up=inputs["bias"][n:])
    assert torch.equal(stacked, separate)
    assert_close(spec, separate, reference(spec, inputs["x"], inputs["weight"], inputs["bias"]))


def test_round_then_cast_converts_the_rounded_result(kernels) -> None:
    """`round` + `cast` is eager's `linear(x, w).to(out_dtype)`: a float16 product past 65504 is
    inf, and so is a bfloat16 one converted to float16; the plain cast converts the float
    accumulator itself (finite), and the rounded kernel's output is exactly that, rounded."""
    for spec in ROUND_SPECS:
        inputs = overflow_inputs(spec, "cpu", 37, seed=21)
        out = poisoned_out(spec, "cpu", 37)
        kernels[spec](inputs["x"], inputs["weight"], None, inputs["residual"], out=out)
        ref = reference(spec, **inputs)
        assert ref.isinf().sum() == 2  # +inf at [0, 0], -inf at [1, 0]
        assert_close(spec, out, ref)
    rounded, direct = ROUND_SPECS[0], gemm_spec("float16", ("cast",))
    inputs = overflow_inputs(direct, "cpu", 37, seed=22)
    out_direct = kernels[direct](inputs["x"], inputs["weight"])
    assert torch.isfinite(out_direct).all()
    assert torch.equal(kernels[rounded](inputs["x"], inputs["weight"]), out_direct.half().float())


def test_float16_output_is_the_float_accumulator_rounded_to_nearest_even(kernels) -> None:
    """The final cast to a half output rounds to nearest even like eager's `.half()`: the float16
    kernel's output is exactly the `cast` kernel's float32 output (the same accumulator) rounded,
    which the float16 tolerance of the reference check cannot tell from a truncation."""
    half_out, float_out = gemm_spec("float16"), gemm_spec("float16", ("cast",))
    inputs = make_inputs(half_out, "cpu", 37, seed=23)
    got = kernels[half_out](inputs["x"], inputs["weight"])
    exact = kernels[float_out](inputs["x"], inputs["weight"])
    assert got.dtype == torch.float16 and exact.dtype == torch.float32
    assert not torch.equal(exact, exact.half().float()), "the accumulator needs bits a half cannot hold"
    assert torch.equal(got, exact.half())


def test_large_tile_runs_its_epilogue_in_ub_slices(kernels) -> None:
    layout = gemm_layout(BIG_TILE_SPEC)
    assert layout.ub_rows < layout.block_m or layout.buffer_num == 1
    for m in (1, 129, 300):
        run_case(kernels[BIG_TILE_SPEC], BIG_TILE_SPEC, m, seed=m)


def test_fewer_blocks_than_tiles_cover_every_tile(kernels) -> None:
    # 1000 rows = 63 M tiles x 2 N tiles over 1 and 5 blocks: the persistent loop and the
    # grouped order (GROUP_M=4, a short last group) must still reach every tile once.
    spec = gemm_spec("float32")
    for blocks in (1, 5):
        run_case(kernels[spec], spec, 1000, seed=blocks, num_programs=blocks)


def test_host_tiling_launches_min_of_tiles_and_cores_blocks(kernels) -> None:
    """`blockDim = min(tiles, cores)`: a small M never launches blocks that have no tile (each
    would still set up its Matmul on an AI core), a large one is capped at the cores."""
    import ctypes

    from tileflow.backends.ascend.cpu_debug import CpuDebugLibrary
    from tileflow.backends.ascend.gemm import gemm_entry

    spec = gemm_spec("float32")  # N = 40: 2 N tiles of 32
    kernel = kernels[spec]
    lib = CpuDebugLibrary(kernel.meta["sources"], Path(kernel.meta["library"]))
    name = gemm_entry(spec).name
    tiling = torch.zeros(int(lib.call(f"{name}_tiling_size", restype=ctypes.c_uint32)), dtype=torch.uint8)
    for m, cores, expected in ((1, 24, 2), (17, 24, 4), (1000, 24, 24), (1000, 200, 126)):
        block_dim = ctypes.c_uint32(0)
        assert lib.call(f"{name}_tiling", ctypes.c_uint32(m), ctypes.c_uint32(cores), tiling, ctypes.byref(block_dim)) == 0
        assert block_dim.value == expected, (m, cores, block_dim.value)


def test_concurrent_launches_keep_their_own_errors(kernels) -> None:
    # ctypes releases the GIL during a launch: a failing launch on one thread must neither stop
    # nor fail a valid launch on another, and must still raise itself.
    import ctypes

    from tileflow.backends.ascend.cpu_debug import CpuDebugLibrary
    from tileflow.backends.ascend.gemm import gemm_entry

    spec = gemm_spec("float32")
    kernel = kernels[spec]
    lib = CpuDebugLibrary(kernel.meta["sources"], Path(kernel.meta["library"]))
    bad_launch = f"{gemm_entry(spec).name}_run_cpu"
    dummy = torch.zeros(64)
    inputs = make_inputs(spec, "cpu", 1000, seed=3)
    expected = reference(spec, **inputs)
    done, started = threading.Event(), threading.Event()
    bad: dict[str, int] = {"raised": 0, "silent": 0}

    def fail_repeatedly() -> None:
        while not done.is_set():
            started.set()
            try:  # blockDim 0: the double reports it for this launch only
                lib.call(bad_launch, ctypes.c_uint32(0), *[dummy] * (len(gemm_entry(spec).params)), restype=None)
                bad["silent"] += 1
            except RuntimeError as e:
                assert "blockDim 0 must be positive" in str(e)
                bad["raised"] += 1

    thread = threading.Thread(target=fail_repeatedly)
    thread.start()
    started.wait()
    try:
        for _ in range(40):
            out = poisoned_out(spec, "cpu", 1000)
            kernel(inputs["x"], inputs["weight"], out=out, num_programs=24)
            assert not torch.isnan(out).any(), "a valid launch left outputs unwritten"
            assert_close(spec, out, expected)
    finally:
        done.set()
        thread.join()
    assert bad["silent"] == 0 and bad["raised"] > 0, bad


def test_empty_m_and_bad_inputs(kernels) -> None:
    spec = gemm_spec("float32", ("bias",))
    kernel = kernels[spec]
    inputs = make_inputs(spec, "cpu", 3, seed=1)
    assert kernel(inputs["x"][:0], inputs["weight"], inputs["bias"]).shape == (0, 40)
    with pytest.raises(ValueError, match="no bias was given"):
        kernel(inputs["x"], inputs["weight"])
    with pytest.raises(ValueError, match=r"weight must have shape \[40, 72\]"):
        kernel(inputs["x"], inputs["weight"][:, :10], inputs["bias"])
    with pytest.raises(ValueError, match="out must be contiguous"):
        kernel(inputs["x"], inputs["weight"], inputs["bias"], out=torch.empty(40, 3).t())


@pytest.mark.parametrize("num_programs", [0, 2**16, 2**32, 2**32 + 1, True, 2.0])
def test_num_programs_out_of_range_is_refused(kernels, num_programs) -> None:
    # 2**32 used to wrap to 0 through the host tiling's uint32 ("the host tiling refused M=5").
    spec = gemm_spec("float32", ("bias",))
    inputs = make_inputs(spec, "cpu", 5, seed=1)
    with pytest.raises(ValueError, match=r"num_programs must be an int in \[1, 65535\]"):
        kernels[spec](inputs["x"], inputs["weight"], inputs["bias"], num_programs=num_programs)
    run_case(kernels[spec], spec, 5, seed=1, num_programs=65535)


def test_specs_the_kernel_cannot_implement_are_refused() -> None:
    with pytest.raises(ValueError, match="float64 runs on the reference backend|supports dtype"):
        gemm_layout(gemm_spec("float64"))
    with pytest.raises(ValueError, match="too small for the Ascend C kernel"):
        gemm_layout(gemm_spec("float16", tile=TileConfig(8, 32, 32)))
    with pytest.raises(ValueError, match="does not fit the 192 KiB unified buffer"):
        gemm_layout(gemm_spec("float32", ("swiglu", "residual"), tile=TileConfig(16, 2048, 32)))


def test_specs_with_n_segments_are_refused_at_render_time() -> None:
    # Sibling GEMMs as N segments (one weight per segment) run on Triton only: the Ascend kernel
    # reads one [N, K] weight, and its launcher takes no `more_weights`. Such a spec used to be
    # emitted and built, and then no launch could run it (a TypeError).
    from tileflow.lower import gemm_spec as lowered_gemm_spec

    spec = lowered_gemm_spec(dtype=torch.float16, out_dtype=torch.float16, n=96, k=32, tile=TILE, segments=(32, 32, 32))
    with pytest.raises(ValueError, match="no GEMM over N segments"):
        render_sources(spec)


def test_cube_base_blocks_fit_l0_at_render_time() -> None:
    # L0B (BLOCK_N x BLOCK_K) cannot shrink with the epilogue slice: refused when the spec is
    # rendered (export), not by the host tiling at launch ("refused M=5 (code 2)").
    with pytest.raises(ValueError, match="B base block BLOCK_N x BLOCK_K = 256 x 128 .* L0B"):
        render_sources(gemm_spec("float32", tile=TileConfig(16, 256, 128)))
    # L0A (slice rows x BLOCK_K) shrinks with the slice: 128 x 256 fp32 = 128 KiB, 64 rows fit.
    assert gemm_layout(gemm_spec("float32", tile=TileConfig(128, 16, 256))).ub_rows == 64


def test_a_deep_tile_runs_with_slices_that_fit_l0a(kernels) -> None:
    spec = gemm_spec("float32", ("bias",), n=20, k=300, tile=TileConfig(128, 16, 256))
    for m in (5, 200):
        run_case(kernels[spec], spec, m, seed=m)


def test_kernels_set_the_system_workspace_and_register_matmuls_once_before_init_buffer() -> None:
    # CANN: a <<<>>> launch built without HAVE_WORKSPACE must SetSysWorkspace (host-allocated,
    # GetLibApiWorkSpaceSize bytes) before the Matmul API; REGIST_MATMUL_OBJ takes every Matmul
    # object in one call, before InitBuffer (op.Init). The double enforces all three at run time.
    from tileflow.runtime.attention import attention_spec

    attn = attention_spec(dtype=torch.float16, head_dim=64, gqa=4, block_q=4, causal=True, sliding_window=False,
                          tree=False, bias=False)
    for spec in (gemm_spec("float16", ("bias", "swiglu")), attn):
        sources = render_sources(spec)
        kernel, host = sources.files[sources.kernel_file], sources.files[sources.host_file]
        main = kernel[kernel.index(f'extern "C" __global__ __aicore__ void {sources.ident}('):]
        assert "GM_ADDR sys_workspace, GM_ADDR tiling)" in main.splitlines()[0]
        assert main.count("REGIST_MATMUL_OBJ(") == 1
        assert main.index("SetSysWorkspace(sys_workspace);") < main.index("REGIST_MATMUL_OBJ(") < main.index("op.Init(")
        assert f'extern "C" uint32_t {sources.ident}_sys_workspace_size()' in host
        assert "GetLibApiWorkSpaceSize()" in host
    assert "op.qk, &t.qkTiling, op.pv, &t.pvTiling);" in render_sources(attn).files[render_sources(attn).kernel_file]


def test_torch_operators_declare_every_buffer_the_kernel_writes() -> None:
    # An operator's schema says which tensors it mutates; functionalization and Dynamo trust it
    # (a buffer declared read-only may be shared, reordered or dropped). The Matmul API writes
    # its system workspace, the attention kernel its split-KV partials and its scratch.
    import re

    from tileflow.runtime.attention import attention_spec

    attn = attention_spec(dtype=torch.float16, head_dim=64, gqa=4, block_q=4, causal=True, sliding_window=False,
                          tree=False, bias=False)
    writes = {
        gemm_spec("float16", ("bias",)): [{"out", "sys_workspace"}],
        attn: [{"out", "partial_out", "partial_stats", "workspace", "sys_workspace"}, {"out"}],
    }
    for spec, expected in writes.items():
        sources = render_sources(spec)
        defs = re.findall(r'm\.def\("([^"]+)"\);', sources.files[sources.torch_file])
        assert len(defs) == len(expected), defs
        for text, want in zip(defs, expected):
            schema = torch._C.parse_schema(f"tileflow_ascend::{text}")
            written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
            assert written == want, (schema.name, written)


def test_emitted_gemm_matches_golden() -> None:
    sources = render_sources(gemm_spec("float16", ("bias", "swiglu", "residual")))
    for path, text in sorted(sources.files.items()):
        check_golden(f"ascend/gemm/{Path(path).name.replace(sources.ident, 'kernel')}", text)


def test_exported_project_builds_with_cmake_in_cpu_debug_mode(tmp_path: Path) -> None:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    from tileflow.lower import grouped_gemm_spec
    from tileflow.runtime.attention import attention_spec

    # One kernel of each family, as an export of an MoE model writes them.
    specs = [
        gemm_spec("float16", ("bias",)),
        grouped_gemm_spec(dtype="float16", out_dtype="float16", n=40, k=72, experts=4, tile=TILE, activation="swiglu"),
        attention_spec(dtype=torch.float16, head_dim=64, gqa=4, block_q=4, causal=True, sliding_window=False,
                       tree=True, bias=True),
    ]
    write_project([render_sources(s) for s in specs], tmp_path / "proj")
    for cmd in (["cmake", "-S", str(tmp_path / "proj"), "-B", str(tmp_path / "build"),
                 f"-DTILEFLOW_CPU_DEBUG_INCLUDE={HEADERS}"],
                ["cmake", "--build", str(tmp_path / "build"), "-j2"]):
        run = subprocess.run(cmd, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "build" / "libtileflow_ascend_ops.so").exists()


def test_device_branch_gives_the_kernels_their_tiling_headers(tmp_path: Path) -> None:
    # The NPU branch compiles op_kernel/<ident>.cpp with ascendc_library; each includes
    # "<ident>_tiling.h" from op_host/, so that target needs op_host on its include path.
    import re

    sources = render_sources(gemm_spec("float16", ("bias",)))
    write_project([sources], tmp_path)
    device = (tmp_path / "CMakeLists.txt").read_text().split("return()\nendif()", 1)[1]
    dirs = [d for args in re.findall(r"ascendc_include_directories\(tileflow_kernels\s+PRIVATE\s+([^)]*)\)", device)
            for d in args.split()]
    assert dirs, "the device branch gives tileflow_kernels no include directories"
    dirs = [d.replace("${CMAKE_CURRENT_SOURCE_DIR}", str(tmp_path)) for d in dirs]
    assert str(tmp_path / "op_host") in dirs
    # With exactly those directories (and the Ascend C headers the toolchain brings) the kernel
    # file finds its tiling header.
    run = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-DASCENDC_CPU_DEBUG", f"-I{HEADERS}",
                          *(f"-I{d}" for d in dirs), str(tmp_path / sources.kernel_file)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


def test_device_branch_builds_with_the_installed_torchs_cxx_abi(tmp_path: Path) -> None:
    # It set _GLIBCXX_USE_CXX11_ABI=1 whatever the torch: torch_npu pairs with torch builds of the
    # old ABI too, against which the operators' library would not link. It asks the torch.
    import re
    import sys

    write_project([render_sources(gemm_spec("float16", ("bias",)))], tmp_path)
    device = (tmp_path / "CMakeLists.txt").read_text().split("return()\nendif()", 1)[1]
    (query,) = re.findall(r'execute_process\(COMMAND \S+ -c "([^"]*)"\s+OUTPUT_VARIABLE TORCH_CXX11_ABI', device)
    assert "_GLIBCXX_USE_CXX11_ABI=${TORCH_CXX11_ABI}" in device
    run = subprocess.run([sys.executable, "-c", query], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == str(int(torch._C._GLIBCXX_USE_CXX11_ABI)), run.stderr


def test_the_launch_function_is_declared_as_the_kernel_file_defines_it() -> None:
    # The binding declared `<kernel>_do(..., uint8_t* a, ...)` and the kernel file defined it with
    # `GM_ADDR a`: with `__gm__` an address space on the host, two names that do not link.
    import re

    for spec in (gemm_spec("float16", ("bias",)),):
        sources = render_sources(spec)
        kernel, binding = sources.files[sources.kernel_file], sources.files[sources.torch_file]
        for name in sources.kernels:
            defined = re.findall(rf"void {name}_do\(([^)]*)\)\s*\{{", kernel)
            declared = re.findall(rf"void {name}_do\(([^)]*)\);", binding)
            assert defined and defined == declared, (defined, declared)


def _in_two_threads(fn) -> tuple[list, list[BaseException]]:
    """Run `fn` on two threads at once: (what the calls returned, what they raised)."""
    results: list = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(fn())
        except BaseException as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


# Each trial is two whole g++ builds at once (about 6 s of CPU): two in the default run (they
# caught the old shared temporary file in about 65% of runs, four in about 85%), the old four
# under `extended`.
@pytest.mark.parametrize("trials", [2, pytest.param(4, marks=pytest.mark.extended)])
def test_racing_cpu_builds_of_one_spec_share_one_library(tmp_path: Path, trials: int) -> None:
    # Two threads (or processes sharing the cache) building one spec into one empty cache: both
    # succeed and load the same whole library (they used to share one temporary file).
    spec = gemm_spec("float16", ("bias", "gelu", "residual"))
    inputs = make_inputs(spec, "cpu", 9, seed=2)
    for trial in range(trials):
        build_dir = tmp_path / str(trial)
        built, errors = _in_two_threads(lambda: build_cpu_debug_kernel(spec, [HEADERS], build_dir=build_dir))
        assert not errors, f"trial {trial}: {errors!r}"
        assert built[0].meta["library"] == built[1].meta["library"]
        assert not list(Path(built[0].meta["library"]).parent.glob(".*.tmp")), "a temporary file was left behind"
        for kernel in built:
            out = kernel(inputs["x"], inputs["weight"], inputs["bias"], inputs["residual"])
            assert_close(spec, out, reference(spec, **inputs))


def test_builds_share_a_precompiled_prelude_g_plus_plus_can_use_or_skip(tmp_path: Path) -> None:
    # The headers both of a GEMM's files include are precompiled once per build folder, with the
    # build's own flags: g++ -Winvalid-pch -Werror accepts it for the kernel file. A prelude g++
    # cannot use (garbage here) is skipped: the next build parses the headers and is as right.
    from tileflow.backends.ascend.cpu_debug import compiler_flags, shared_includes

    first, second = gemm_spec("float16", ("bias",)), gemm_spec("float16", ("bias", "gelu"))
    sources = render_sources(first)
    includes = shared_includes(sources)
    assert '#include "kernel_operator.h"' in includes and len(set(includes)) == len(includes)
    assert not any(sources.tiling_header.split("/")[-1] in line for line in includes)
    build_cpu_debug_kernel(first, [HEADERS], build_dir=tmp_path)
    (header,) = tmp_path.glob("prelude-*/prelude.h")
    assert header.read_text().splitlines() == includes
    assert not list(header.parent.glob(".*.tmp")), "a temporary file was left behind"
    (kernel_file,) = tmp_path.glob(f"{sources.ident}-*/{sources.kernel_file}")
    flags = [flag for flag in compiler_flags() if flag != "-shared"]
    run = subprocess.run(["g++", *flags, "-Winvalid-pch", "-include", str(header), f"-I{HEADERS}",
                          f"-I{kernel_file.parent.parent / 'op_host'}", "-fsyntax-only", str(kernel_file)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    header.with_name("prelude.h.gch").write_bytes(b"not a precompiled header")
    run = subprocess.run(["g++", *flags, "-Winvalid-pch", "-include", str(header), f"-I{HEADERS}",
                          f"-I{kernel_file.parent.parent / 'op_host'}", "-fsyntax-only", str(kernel_file)],
                         capture_output=True, text=True)
    assert run.returncode != 0, "g++ took garbage for the precompiled header: the check above proves nothing"
    run_case(build_cpu_debug_kernel(second, [HEADERS], build_dir=tmp_path), second, 7, seed=3)


def test_sources_digest_changes_with_every_file() -> None:
    """A build is reused only for the same sources: changing any one emitted file (the host
    tiling as much as the kernel) changes `KernelSources.digest`, the key of CPU and NPU builds."""
    from dataclasses import replace

    sources = render_sources(gemm_spec("float16", ("bias",)))
    base = sources.digest()
    assert replace(sources, files=dict(sources.files)).digest() == base
    for path in sources.files:
        files = dict(sources.files)
        files[path] += "// changed\n"
        assert replace(sources, files=files).digest() != base, f"{path} is not in the build key"


def test_changed_cpu_headers_rebuild_the_library_and_the_prelude(tmp_path: Path) -> None:
    """The CPU-debug cache is keyed by the Ascend C headers' content: the same headers in another
    folder reuse the library, changed headers get a library and a precompiled prelude of their
    own (a stale prelude or library would run the old headers' semantics)."""
    spec = gemm_spec("float16", ("bias",))
    headers, builds = tmp_path / "headers", tmp_path / "builds"
    shutil.copytree(HEADERS, headers)
    first = build_cpu_debug_kernel(spec, [headers], build_dir=builds)
    assert build_cpu_debug_kernel(spec, [HEADERS], build_dir=builds).meta["library"] == first.meta["library"]
    with open(headers / "kernel_operator.h", "a") as f:
        f.write("\n// a changed header\n")
    changed = build_cpu_debug_kernel(spec, [headers], build_dir=builds)
    assert changed.meta["library"] != first.meta["library"], "a changed header reused the old library"
    assert len(list(builds.glob("prelude-*/prelude.h.gch"))) == 2, "a changed header reused the old prelude"
    run_case(changed, spec, 7, seed=4)


@dataclass
class NpuBuilds:
    """What the mocked NPU toolchain saw: every CMake command, each finished build's folder, each
    loaded library's bytes; setting `kill_next` kills the next build half-way through."""

    commands: list[list[str]] = field(default_factory=list)
    builds: list[str] = field(default_factory=list)
    loaded: list[bytes] = field(default_factory=list)
    kill_next: threading.Event = field(default_factory=threading.Event)


def _mock_npu_build(monkeypatch: pytest.MonkeyPatch) -> NpuBuilds:
    """Mock CMake and the loaders of `project.build_npu_kernel` (CMake for the NPU cannot run here)."""
    import tileflow.devices
    from tileflow.backends.ascend import project

    seen = NpuBuilds()

    def fake_run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        seen.commands.append(cmd)
        if cmd[1] == "--build":
            lib = Path(cmd[2]) / f"lib{project.LIBRARY}.so"
            lib.parent.mkdir(parents=True, exist_ok=True)
            lib.write_bytes(b"partial")
            if seen.kill_next.is_set():
                seen.kill_next.clear()
                raise KeyboardInterrupt  # the build was killed half-way
            lib.write_bytes(b"\x7fELF whole library")
            seen.builds.append(cmd[2])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(project.subprocess, "run", fake_run)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: seen.loaded.append(Path(path).read_bytes()))
    monkeypatch.setattr(project.ctypes, "CDLL", lambda path: object())
    monkeypatch.setattr(tileflow.devices, "detect_device", lambda kind: type("D", (), {"cores": 24})())
    return seen


def test_npu_build_never_loads_a_partial_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # CMake for the NPU cannot run here: its two commands are mocked. The library is loaded only
    # after a build finished and moved it into place; a killed build, a leftover of the old
    # in-place layout and a racing builder must never be loaded half-written.
    from tileflow.backends.ascend import project

    sources = render_sources(gemm_spec("float16"))
    root = tmp_path / f"{sources.ident}-{sources.digest()}"
    seen = _mock_npu_build(monkeypatch)
    builds, loaded, kill_next = seen.builds, seen.loaded, seen.kill_next

    # A partial library where the old layout built in place, as a killed build left it.
    (root / "build").mkdir(parents=True)
    (root / "build" / f"lib{project.LIBRARY}.so").write_bytes(b"partial")
    kill_next.set()
    with pytest.raises(KeyboardInterrupt):
        project.build_npu_kernel(sources, tmp_path)
    assert not loaded and not builds
    assert not list(root.glob(".build-*")), "the killed build's folder was left behind"

    _, errors = _in_two_threads(lambda: project.build_npu_kernel(sources, tmp_path))
    assert not errors, errors
    assert loaded == [b"\x7fELF whole library"] * 2 and 1 <= len(builds) <= 2
    project.build_npu_kernel(sources, tmp_path)  # cached: no third build
    assert len(builds) <= 2 and loaded[-1] == b"\x7fELF whole library"


def test_npu_build_is_keyed_by_the_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A changed emitter changes a kernel's sources but not its identifier (the spec's digest):
    the NPU build of the new sources must not reuse the library built from the old ones."""
    from dataclasses import replace

    from tileflow.backends.ascend import project

    builds = _mock_npu_build(monkeypatch).builds
    sources = render_sources(gemm_spec("float16"))
    project.build_npu_kernel(sources, tmp_path)
    project.build_npu_kernel(sources, tmp_path)
    assert len(builds) == 1, "the same sources were built twice"
    files = dict(sources.files)
    files[sources.kernel_file] += "// a changed emitter\n"
    project.build_npu_kernel(replace(sources, files=files), tmp_path)
    assert len(builds) == 2, "changed sources reused the old library"


def test_npu_build_is_keyed_by_the_toolchain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The NPU library links against torch, torch_npu and CANN: after any of them changed, the
    same sources are built again instead of loading a library built against the old ones."""
    from tileflow.backends.ascend import project

    builds = _mock_npu_build(monkeypatch).builds
    sources = render_sources(gemm_spec("float16"))
    monkeypatch.setenv("ASCEND_HOME_PATH", "/opt/cann-a")
    project.build_npu_kernel(sources, tmp_path)
    project.build_npu_kernel(sources, tmp_path)
    assert len(builds) == 1, "the same toolchain built twice"
    monkeypatch.setenv("ASCEND_HOME_PATH", "/opt/cann-b")
    project.build_npu_kernel(sources, tmp_path)
    assert len(builds) == 2, "another CANN toolkit reused the old library"
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    project.build_npu_kernel(sources, tmp_path)
    assert len(builds) == 3, "another torch reused the old library"
    latest = tmp_path / "latest"  # the toolkit's `latest` link, moved to a new version
    for n, version in enumerate(("8.0", "8.1"), start=4):
        (tmp_path / version).mkdir()
        latest.unlink(missing_ok=True)
        latest.symlink_to(tmp_path / version)
        monkeypatch.setenv("ASCEND_HOME_PATH", str(latest))
        project.build_npu_kernel(sources, tmp_path)
        assert len(builds) == n, "a CANN upgrade behind the same link reused the old library"


def test_npu_build_compiles_for_the_visible_soc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CMake is told the visible NPU's SoC (the project's 910B1 default is wrong on another bin),
    and a library built for one SoC is not loaded on another; with no NPU seen the default stands."""
    from types import SimpleNamespace

    from tileflow.backends.ascend import project

    seen = _mock_npu_build(monkeypatch)
    sources = render_sources(gemm_spec("float16"))
    for soc in ("Ascend910B3", "Ascend910B4", "Ascend910B3"):
        monkeypatch.setattr(torch, "npu", SimpleNamespace(is_available=lambda: True, get_device_name=lambda soc=soc: soc),
                            raising=False)
        project.build_npu_kernel(sources, tmp_path)
    configures = [cmd for cmd in seen.commands if cmd[1] == "-S"]
    assert [cmd[-1] for cmd in configures] == ["-DSOC_VERSION=Ascend910B3", "-DSOC_VERSION=Ascend910B4"]
    assert len(seen.builds) == 2, "the third call, back on the first SoC, reuses its library"
    monkeypatch.setattr(torch.npu, "is_available", lambda: False)
    project.build_npu_kernel(sources, tmp_path)
    assert not any(arg.startswith("-DSOC_VERSION") for arg in seen.commands[-2])


def test_target_ascend_without_torch_npu_says_what_is_missing() -> None:
    ok, why = BACKEND.available()
    assert not ok and "torch_npu" in why
    with pytest.raises(RuntimeError, match="target='ascend' cannot build .*torch_npu is not installed"):
        BACKEND.build(gemm_spec("float16"))


def test_ascend_target_in_a_compiled_model_and_an_eager_call_says_what_is_missing() -> None:
    import tileflow

    x, w = torch.randn(5, 72), torch.randn(40, 72)
    with tileflow.use_config(tileflow.Config(target="ascend")):
        with pytest.raises(RuntimeError, match="target 'ascend' cannot run here: torch_npu is not installed"):
            tileflow.ops.padded_gemm(x, w)
    model = torch.nn.Sequential(torch.nn.Linear(72, 40))
    compiled = torch.compile(model, backend="tileflow", dynamic=True, options={"target": "ascend"})
    with pytest.raises(Exception, match="torch_npu is not installed"):
        compiled(x)


def test_emitted_grouped_gemm_matches_golden() -> None:
    from tileflow.lower import grouped_gemm_spec

    spec = grouped_gemm_spec(dtype="float16", out_dtype="float16", n=40, k=72, experts=8, tile=TILE,
                             activation="swiglu")
    sources = render_sources(spec)
    for path in (sources.kernel_file, sources.host_file, sources.tiling_header):
        check_golden(f"ascend/grouped_gemm/{Path(path).name.replace(sources.ident, 'kernel')}", sources.files[path])


def test_lib_math_calls_never_run_in_place() -> None:
    """CANN's lib/math Tanh and Erf (unlike the basic vector ops) take no source and destination
    that overlap, in place included ("不支持源操作数与目的操作数地址重叠"): no emitted kernel
    calls them with dst == src (the CPU double refuses it too, so the numerical tests of GELU,
    GeGLU and soft-capping run into it)."""
    import re

    from tileflow.runtime.attention import attention_spec

    specs = [gemm_spec(dt, (act,)) for dt in ("float32", "float16") for act in ("gelu", "gelu_tanh", "geglu", "geglu_tanh")]
    specs.append(attention_spec(dtype=torch.float16, head_dim=16, gqa=2, block_q=4, causal=True,
                                sliding_window=False, tree=False, bias=False, softcap=True))
    call = re.compile(r"\b(Tanh|Erf)\(\s*([\w\[\].]+)\s*,\s*([\w\[\].]+)\s*,")
    for spec in specs:
        kernel = render_sources(spec).files[render_sources(spec).kernel_file]
        in_place = [m.group(0) for m in call.finditer(kernel) if m.group(2) == m.group(3)]
        assert not in_place, f"{spec.name}: lib/math called in place: {in_place}"


def test_npu_build_configures_against_the_torch_of_the_python_running_tileflow(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The device branch asks a Python for torch's and torch_npu's folders and C++ ABI. It must be
    the interpreter that runs tileflow (and loads the library), not the first `python3` on PATH:
    one without torch (a venv or pyenv interpreter run without activating it) left the include
    paths `-I/include` and the ABI "" and the configure step still succeeded."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    import os
    import sys

    from tileflow.backends.ascend import project

    sources = render_sources(gemm_spec("float16", ("bias",)))
    # The configure command tileflow's NPU build runs (nothing is built here).
    real_run, commands = subprocess.run, []
    monkeypatch.setattr(project.subprocess, "run",
                        lambda cmd, **kw: commands.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
    with pytest.raises(RuntimeError, match="produced no"):
        project._build_into(sources, tmp_path / "cache", tmp_path / "cache" / "lib.so", "")
    monkeypatch.setattr(project.subprocess, "run", real_run)
    configure = commands[0]
    assert configure[:2] == ["cmake", "-S"] and configure[3] == "-B"
    # A stand-in for CANN's ascendc.cmake, a torch_npu package, and a `python3` on PATH without torch.
    cann = tmp_path / "cann" / "compiler" / "tikcpp" / "ascendc_kernel_cmake"
    cann.mkdir(parents=True)
    (cann / "ascendc.cmake").write_text("function(ascendc_library name type)\n    add_library(${name} INTERFACE)\n"
                                        "endfunction()\nfunction(ascendc_include_directories)\nendfunction()\n")
    (tmp_path / "pkgs" / "torch_npu").mkdir(parents=True)
    (tmp_path / "pkgs" / "torch_npu" / "__init__.py").write_text("")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python3").write_text("#!/bin/sh\necho 'No module named torch' >&2\nexit 1\n")
    (tmp_path / "bin" / "python3").chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join([str(tmp_path / "pkgs"), *sys.path]))
    write_project([sources], tmp_path / "proj")
    run = real_run(["cmake", "-S", str(tmp_path / "proj"), "-B", str(tmp_path / "build"), *configure[5:],
                    f"-DASCEND_CANN_PACKAGE_PATH={tmp_path / 'cann'}"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    flags = (tmp_path / "build" / "CMakeFiles" / f"{project.LIBRARY}.dir" / "flags.make").read_text()
    assert f"-I{Path(torch.__file__).parent / 'include'} " in flags + " ", flags
    assert f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}" in flags, flags
