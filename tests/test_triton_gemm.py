"""Tests for the Triton padded fixed-tile GEMM (backends/triton/gemm.py and build.py).

Kernels run on the CPU under the Triton interpreter. Every launch writes into an output poisoned
with NaN, so a tile the kernel forgets to store shows up, and is compared with a float64 torch
reference computed on upcast inputs.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch  # importing torch does not import triton

# Without a GPU the kernels run in the interpreter, which must be chosen before triton is first
# imported (`@triton.jit` reads it when a kernel module is imported); tests/conftest.py does the
# same, this keeps the file runnable alone. With a GPU they run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="the Triton backend tests need triton installed")

from tileflow.backends.triton import build as tbuild  # noqa: E402
from tileflow.backends.triton.build import build_triton_kernel, clear_memo  # noqa: E402
from tileflow.backends.triton.gemm import make_gemm_launcher, render_gemm_source  # noqa: E402
from tileflow.kernel_spec import KernelSpec, TileConfig, make_params  # noqa: E402
from tileflow.targets import triton_interpreter_enabled  # noqa: E402

from gemm_cases import EPILOGUE_CASES, assert_close, epilogue_params, make_inputs, overflow_inputs, poisoned_out, reference  # noqa: E402

TILE_A = TileConfig(16, 32, 32)
TILE_B = TileConfig(32, 32, 16)

pytestmark = pytest.mark.skipif(
    not triton_interpreter_enabled() and not torch.cuda.is_available(),
    reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1",
)
DEVICE = "cpu" if triton_interpreter_enabled() else "cuda"


@pytest.fixture(autouse=True, scope="module")
def _private_cache(private_triton_cache: Path) -> Path:
    """Every test of this module builds into a private kernel cache (see conftest)."""
    return private_triton_cache


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty kernel cache and memo of the test's own, for tests of the cache itself (the memo
    is cleared after the test too, so no kernel it built reaches another test)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("TILEFLOW_CACHE_DIR", str(root))
    clear_memo()
    yield root
    clear_memo()


def gemm_spec(
    dtype: str = "float32",
    epilogue: tuple[str, ...] = (),
    *,
    n: int = 40,
    k: int = 24,
    tile: TileConfig = TILE_A,
    persistent: bool = False,
    out_dtype: str | None = None,
    split_k: bool = False,
    stream_k: bool = False,
    tma: bool = False,
) -> KernelSpec:
    """A padded_gemm spec; `cast` in the epilogue defaults the output to float32."""
    if out_dtype is None:
        out_dtype = "float32" if "cast" in epilogue else dtype
    return KernelSpec(
        op="padded_gemm",
        dtype=dtype,
        out_dtype=out_dtype,
        tile=tile,
        epilogue=epilogue,
        params=make_params(n=n, k=k, persistent=persistent, **({"split_k": True} if split_k else {}),
                           **({"stream_k": True} if stream_k else {}), **({"tma": True} if tma else {})),
    )


def build(spec: KernelSpec, artifact_dir: Path | None = None):
    return build_triton_kernel(spec, render_gemm_source, make_gemm_launcher, artifact_dir)


def run_case(spec: KernelSpec, m: int, seed: int, **launch_kwargs) -> torch.Tensor:
    kernel = build(spec)
    inputs = make_inputs(spec, DEVICE, m, seed)
    out = poisoned_out(spec, DEVICE, m)
    got = kernel(inputs["x"], inputs["weight"], inputs["bias"], inputs["residual"], out=out,
                 **launch_kwargs)
    assert got is out, "a given `out` must be written in place and returned"
    assert_close(spec, out, reference(spec, **inputs))
    return out


# ------------------------------------------------------------------------------------------
# Correctness across M (the dynamic token count)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("m", [1, 2, 7, 16, 17, 63, 100, 129])
def test_plain_gemm_every_m(dtype: str, m: int) -> None:
    run_case(gemm_spec(dtype), m, seed=1000 + m)


def test_large_m_tail_tile() -> None:
    # 1000 = 62 full 16-row tiles + an 8-row tail; K = 72 has a masked tail step too.
    run_case(gemm_spec("float32", ("bias",), k=72), 1000, seed=7)


# ------------------------------------------------------------------------------------------
# Epilogues
# ------------------------------------------------------------------------------------------



def _case_id(value: object) -> str:
    return "-".join(value) if isinstance(value, tuple) else str(value)


@pytest.mark.parametrize("dtype,epilogue", EPILOGUE_CASES, ids=_case_id)
def test_epilogue(dtype: str, epilogue: tuple[str, ...]) -> None:
    spec = gemm_spec(dtype, epilogue, k=72, tile=TILE_B)
    run_case(spec, 37, seed=sum(map(ord, dtype + "-".join(epilogue))))


# ------------------------------------------------------------------------------------------
# Split-K: partial tiles into an fp32 workspace, then the reduce kernel with the epilogue
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
# Split-K is planned for few M tiles; 129 already spans several (M = 1000, half a minute in the
# interpreter, adds nothing the plain kernel's test does not cover).
@pytest.mark.parametrize("m", [1, 2, 7, 16, 17, 63, 100, 129])
def test_split_k_gemm_every_m(dtype: str, m: int) -> None:
    # K = 136: five BLOCK_K steps of 32, the last one masked. split_k 2 gives parts of 3 + 2
    # steps; 4 asks for more parts than a 2-step split allows and runs 3.
    for split_k in (2, 4):
        run_case(gemm_spec(dtype, k=136, split_k=True), m, seed=3000 + m + split_k, split_k=split_k)


@pytest.mark.parametrize("dtype,epilogue", epilogue_params(), ids=_case_id)
def test_split_k_epilogue(dtype: str, epilogue: tuple[str, ...]) -> None:
    spec = gemm_spec(dtype, epilogue, k=72, tile=TILE_B, split_k=True)
    run_case(spec, 37, seed=sum(map(ord, dtype + "split" + "-".join(epilogue))), split_k=3)


def test_split_k_one_part_and_launch_errors() -> None:
    spec = gemm_spec("float32", ("bias", "residual"), k=96, split_k=True)
    run_case(spec, 20, seed=5, split_k=1)  # one part: the reduce kernel alone applies the epilogue
    kernel = build(spec)
    inputs = make_inputs(spec, DEVICE, 4, 0)
    with pytest.raises(ValueError, match="needs split_k"):
        kernel(inputs["x"], inputs["weight"], inputs["bias"], inputs["residual"])
    plain = build(gemm_spec("float32"))
    with pytest.raises(ValueError, match="split-K kernel"):
        plain(*make_inputs(gemm_spec("float32"), DEVICE, 4, 0).values(), split_k=2)
    with pytest.raises(ValueError, match="at most one of"):
        render_gemm_source(gemm_spec("float32", persistent=True, split_k=True))


@pytest.mark.parametrize("variant", [{"persistent": True}, {"stream_k": True}], ids=str)
def test_num_programs_is_not_a_bool(variant: dict) -> None:
    # `num_programs=True` is an int to isinstance: a persistent kernel ran on one program without
    # a word and a stream-K kernel failed inside Triton (int64 / int1); split_k refuses a bool.
    spec = gemm_spec("float32", **variant)
    kernel = build(spec)
    for bad in (True, False):
        with pytest.raises(ValueError, match="num_programs must be a positive int"):
            kernel(*make_inputs(spec, DEVICE, 20, 0).values(), num_programs=bad)


# ------------------------------------------------------------------------------------------
# N segments: sibling GEMMs on one x (Q, K and V) in one kernel, each tile from its own weight
# ------------------------------------------------------------------------------------------

SEGMENTS = (32, 16, 24)  # starts 0, 32, 48: multiples of BLOCK_N = 16; the last ends in a tail tile
TILE_SEG = TileConfig(16, 16, 16)


def segment_spec(dtype: str, epilogue: tuple[str, ...], **variant: bool) -> KernelSpec:
    """A spec over SEGMENTS with K = 40 (a masked last K step) and one of the kernel variants."""
    return KernelSpec(op="padded_gemm", dtype=dtype, out_dtype=dtype, tile=TILE_SEG, epilogue=epilogue,
                      params=make_params(n=sum(SEGMENTS), k=40, persistent=variant.pop("persistent", False),
                                         segments="x".join(map(str, SEGMENTS)), **variant))


def segment_inputs(spec: KernelSpec, m: int, seed: int) -> tuple[dict, list[torch.Tensor], list[torch.Tensor]]:
    """make_inputs' operands, the stacked weight and bias cut into one fresh tensor per segment."""
    inputs = make_inputs(spec, DEVICE, m, seed)
    bounds = [0, *torch.tensor(SEGMENTS).cumsum(0).tolist()]
    weights = [inputs["weight"][a:b].clone() for a, b in zip(bounds, bounds[1:])]
    biases = [] if inputs["bias"] is None else [inputs["bias"][a:b].clone() for a, b in zip(bounds, bounds[1:])]
    return inputs, weights, biases


@pytest.mark.parametrize("variant", [{}, {"persistent": True}, {"split_k": True}, {"stream_k": True}, {"tma": True}],
                         ids=str)
@pytest.mark.parametrize("dtype,epilogue", [("float32", ()), ("float16", ("bias",)), ("float32", ("bias", "gelu", "residual"))],
                         ids=_case_id)
@pytest.mark.parametrize("m", [1, 17, 63])
def test_segments_read_each_tile_from_its_weight(variant: dict, dtype: str, epilogue: tuple[str, ...], m: int) -> None:
    spec = segment_spec(dtype, epilogue, **variant)
    kernel = build(spec)
    inputs, weights, biases = segment_inputs(spec, m, seed=m + len(epilogue) + 10 * len(variant))
    out = poisoned_out(spec, DEVICE, m)
    launch = {"split_k": 2} if "split_k" in variant else {"num_programs": 3} if "stream_k" in variant else {}
    kernel(inputs["x"], weights[0], biases[0] if biases else None, inputs["residual"], out=out,
           more_weights=tuple(weights[1:]), more_biases=tuple(biases[1:]), **launch)
    assert_close(spec, out, reference(spec, **inputs))


def test_tma_segments_stored_k_by_n(caplog: pytest.LogCaptureFixture) -> None:
    """A TMA kernel over N segments reads weights stored [K, N] (transposed views, here column
    blocks of one [K, N] tensor: the same strides) through one descriptor each."""
    spec = segment_spec("float16", ("bias",), tma=True)
    kernel = build(spec)
    inputs, weights, biases = segment_inputs(spec, 19, seed=41)
    full_kn = inputs["weight"].t().contiguous()
    bounds = [0, *torch.tensor(SEGMENTS).cumsum(0).tolist()]
    stored_kn = [full_kn[:, a:b].t() for a, b in zip(bounds, bounds[1:])]
    out = poisoned_out(spec, DEVICE, 19)
    with caplog.at_level(logging.INFO, logger="tileflow.backends.triton.gemm"):
        kernel(inputs["x"], stored_kn[0], biases[0], out=out, more_weights=tuple(stored_kn[1:]),
               more_biases=tuple(biases[1:]))
    assert_close(spec, out, reference(spec, **inputs))
    # Aligned column blocks are read in place, as [K, N] (no copy into [N, K]).
    assert "copied for TMA" not in caplog.text


def _segment_weights_laid_out(weights: list[torch.Tensor], layout: str) -> list[torch.Tensor]:
    """The same values in one pair of strides that makes `tma_operand` copy one weight or all:
    [N, K] rows of 48 with segment 2's base 2 bytes off 16 ("nk_one_misaligned"), [K, N] column
    blocks of one [K, 128] tensor, segment 2's at column 65, 2 bytes off ("kn_one_misaligned"),
    or of one [K, 74] tensor, whose rows (148 or 296 bytes) no descriptor can take ("kn_rows_unaligned")."""
    if layout == "nk_one_misaligned":
        out = []
        for i, w in enumerate(weights):
            flat = torch.zeros(w.shape[0] * 48 + 1, dtype=w.dtype, device=w.device)
            buf = (flat[1:] if i == 2 else flat[:-1]).view(w.shape[0], 48)
            buf[:, :w.shape[1]] = w
            out.append(buf[:, :w.shape[1]])
        return out
    k = weights[0].shape[1]
    ld, starts = (128, (0, 40, 65)) if layout == "kn_one_misaligned" else (74, (0, 32, 48))
    store = torch.zeros(k, ld, dtype=weights[0].dtype, device=weights[0].device)
    out = []
    for w, start in zip(weights, starts):
        store[:, start:start + w.shape[0]] = w.t()
        out.append(store[:, start:start + w.shape[0]].t())
    return out


@pytest.mark.parametrize("layout", ["nk_one_misaligned", "kn_one_misaligned", "kn_rows_unaligned"])
@pytest.mark.parametrize("dtype,epilogue", [("float16", ("bias",)), ("float32", ("bias", "gelu", "residual"))],
                         ids=_case_id)
def test_tma_segments_whose_weights_are_copied_for_tma(layout: str, dtype: str, epilogue: tuple[str, ...]) -> None:
    """Weights of one pair of strides that `tma_operand` copies (one of them, or all) no longer
    share strides: the kernel reads every segment with the first one's, so they must be brought
    back to one pair (contiguous [N_i, K] copies share (K, 1); contiguous [K, N_i] ones do not)."""
    spec = segment_spec(dtype, epilogue, tma=True)
    kernel = build(spec)
    inputs, weights, biases = segment_inputs(spec, 19, seed=43)
    laid = _segment_weights_laid_out(weights, layout)
    assert len({w.stride() for w in laid}) == 1 and all(torch.equal(a, b) for a, b in zip(laid, weights))
    out = poisoned_out(spec, DEVICE, 19)
    kernel(inputs["x"], laid[0], biases[0], inputs["residual"], out=out, more_weights=tuple(laid[1:]),
           more_biases=tuple(biases[1:]))
    assert_close(spec, out, reference(spec, **inputs))


def test_tma_segments_give_triton_an_allocator_unless_the_caller_set_one() -> None:
    """A segmented TMA kernel makes descriptors on the device, in a global scratch Triton gets
    from its allocator (a context variable): the launch sets tileflow's where the context has
    none, and keeps the caller's. (Empty contexts: nothing leaks into this process's.)"""
    import contextvars

    import triton
    from triton.runtime import _allocation

    spec = segment_spec("float16", (), tma=True)
    kernel = build(spec)
    inputs, weights, _ = segment_inputs(spec, 3, seed=44)

    def launch_and_read(allocator=None):
        if allocator is not None:
            triton.set_allocator(allocator)
        kernel(inputs["x"], weights[0], more_weights=tuple(weights[1:]))
        return _allocation._allocator.get()

    assert not isinstance(contextvars.Context().run(launch_and_read), _allocation.NullAllocator)

    def mine(size: int, alignment: int, stream: int | None) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device="cuda")  # never called by the interpreter

    assert contextvars.Context().run(launch_and_read, mine) is mine


def test_segment_source_and_launch_errors() -> None:
    spec = segment_spec("float32", ("bias",))
    source = render_gemm_source(spec)
    assert "w1_ptr, w2_ptr," in source and "bias1_ptr, bias2_ptr," in source
    assert "cat(W0, W1, W2)" in source
    kernel = build(spec)
    inputs, weights, biases = segment_inputs(spec, 5, seed=3)
    with pytest.raises(ValueError, match="takes 2 more weight"):
        kernel(inputs["x"], weights[0], biases[0], more_weights=(weights[1],), more_biases=tuple(biases[1:]))
    with pytest.raises(ValueError, match="2 more bias"):
        kernel(inputs["x"], weights[0], biases[0], more_weights=tuple(weights[1:]))
    with pytest.raises(ValueError, match=r"weight of segment 2 must have shape \[24, 40\]"):
        kernel(inputs["x"], weights[0], biases[0], more_weights=(weights[1], weights[1]), more_biases=tuple(biases[1:]))
    shared = torch.empty(16 * 40, device=DEVICE)  # an out laid over segment 1's weight
    with pytest.raises(ValueError, match="out shares memory with weight of segment 1"):
        kernel(inputs["x"], weights[0], biases[0], out=shared[:5 * 72].view(5, 72),
               more_weights=(shared.view(16, 40), weights[2]), more_biases=tuple(biases[1:]))
    transposed = weights[2].t().contiguous().t()  # the same values stored [K, N]: other strides
    with pytest.raises(ValueError, match="share one pair of strides"):
        kernel(inputs["x"], weights[0], biases[0], more_weights=(weights[1], transposed), more_biases=tuple(biases[1:]))
    with pytest.raises(ValueError, match="divides each start"):
        render_gemm_source(dataclasses.replace(spec, tile=TileConfig(16, 32, 16)))  # 48 is not a multiple of 32
    tma_source = render_gemm_source(segment_spec("float16", (), tma=True))
    # One K loop over a descriptor made on the device for the tile's segment (a loop per segment
    # would triple the pipeline's shared memory).
    assert "w1_ptr, w2_ptr," in tma_source and tma_source.count("tl.make_tensor_descriptor(w_seg") == 2
    assert tma_source.count("for k0 in range(0, K, BLOCK_K):") == 1
    # Each descriptor is as wide as its segment (reads past it are zeros, not the next tensor's).
    assert "seg_width = n_first * 0 + 32" in tma_source
    assert "seg_width = tl.where(n_first >= 32, 16, seg_width)" in tma_source
    assert "seg_width = tl.where(n_first >= 48, 24, seg_width)" in tma_source
    with pytest.raises(ValueError, match="sum to N"):
        render_gemm_source(dataclasses.replace(spec, params=make_params(n=72, k=40, persistent=False, segments="32x16")))


@pytest.mark.parametrize("widths,one_kernel", [((64, 32, 32), True), ((24, 40), False)])
def test_sibling_gemms_run_in_one_kernel_where_the_tiles_allow(widths: tuple[int, ...], one_kernel: bool) -> None:
    """The op over sibling weights runs one segmented kernel when its tile's BLOCK_N divides
    every segment's start, else one kernel per segment into its columns: the same result."""
    import tileflow
    from tileflow.ops import padded_gemm
    from tileflow.runtime import compiled_kernels

    gen = torch.Generator().manual_seed(sum(widths))
    x = torch.randn(21, 56, generator=gen).to(DEVICE)  # K = 56: no other test's kernels
    weights = [torch.randn(rows, 56, generator=gen).to(DEVICE) for rows in widths]
    biases = [torch.randn(rows, generator=gen).to(DEVICE) for rows in widths]
    with tileflow.use_config(tileflow.Config(target="triton", max_tokens=64)):
        out = padded_gemm(x, weights[0], biases[0], more_weights=weights[1:], more_biases=biases[1:])
    want = torch.nn.functional.linear(x.double(), torch.cat(weights).double(), torch.cat(biases).double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)
    specs = [k.spec for k in compiled_kernels("padded_gemm")]
    segmented = any(spec.param("segments") == "x".join(map(str, widths)) for spec in specs)
    per_segment = all(any(spec.param("n") == rows and spec.param("k") == 56 and not spec.param("segments") for spec in specs)
                      for rows in widths)
    assert (segmented, per_segment) == (one_kernel, not one_kernel)


# ------------------------------------------------------------------------------------------
# TMA: operand tiles through tensor descriptors, zero-filled past M, N and K by the hardware
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("m", [1, 2, 7, 16, 17, 63, 100, 129])
def test_tma_gemm_every_m(dtype: str, m: int) -> None:
    # K = 136 and N = 40: the last K step and column tile read past the operands (zeros).
    run_case(gemm_spec(dtype, k=136, tma=True), m, seed=5000 + m)


@pytest.mark.parametrize("dtype,epilogue", epilogue_params(), ids=_case_id)
def test_tma_epilogue(dtype: str, epilogue: tuple[str, ...]) -> None:
    run_case(gemm_spec(dtype, epilogue, k=72, tile=TILE_B, tma=True), 37, seed=sum(map(ord, dtype + "tma" + "-".join(epilogue))))


def test_tma_weight_layouts_and_unaligned_operands() -> None:
    """A weight stored [K, N] (a transposed view) is read as such; operands TMA cannot read or
    write in place (a row stride or base off 16 bytes) are copied, and a shape whose rows can
    never be aligned is refused with a message that says so."""
    spec = gemm_spec("float32", ("bias",), k=72, tma=True)
    kernel = build(spec)
    gen = torch.Generator().manual_seed(50)
    x = torch.randn(21, 72, generator=gen)
    w_kn = torch.randn(72, 40, generator=gen)
    bias = torch.randn(40, generator=gen)
    want = x.double() @ w_kn.double() + bias.double()
    for xv, wv in [(x, w_kn.t()),                                   # [K, N] storage: W_KN
                   (torch.randn(21, 73, generator=gen)[:, 1:].copy_(x), w_kn.t().contiguous()),  # base off by 4 bytes
                   (x, torch.randn(40, 80, generator=gen)[:, :72].copy_(w_kn.t()))]:           # rows of 80
        out = torch.full((21, 40), float("nan"), device=DEVICE)
        kernel(xv.to(DEVICE), wv.to(DEVICE), bias.to(DEVICE), out=out)
        torch.testing.assert_close(out.cpu().double(), want, rtol=1e-5, atol=1e-4)
    # A fused SwiGLU whose stacked fp16 weight is stored [K, 2N], and an expanded x (overlapping rows).
    swiglu = build(gemm_spec("float16", ("swiglu",), k=72, tma=True))
    x16 = torch.randn(1, 72, generator=gen).half().expand(21, 72)
    w16 = (torch.randn(72, 80, generator=gen) / 72**0.5).half()
    out = torch.full((21, 40), float("nan"), device=DEVICE, dtype=torch.float16)
    swiglu(x16.to(DEVICE), w16.t().to(DEVICE), out=out)
    acc = x16.double() @ w16.double()
    torch.testing.assert_close(out.cpu().double(), torch.nn.functional.silu(acc[:, :40]) * acc[:, 40:],
                               rtol=2e-3, atol=2e-3)
    # The residual comes in and the output goes out through descriptors too: ones whose base is
    # off 16 bytes are copied (the output computed into a copy and copied back into place).
    res_kernel = build(gemm_spec("float32", ("residual",), k=72, tma=True))
    residual = torch.randn(21, 41, generator=gen)[:, 1:]
    out_big = torch.full((21, 41), float("nan"), device=DEVICE)
    out = out_big[:, 1:]
    res_kernel(x.to(DEVICE), w_kn.t().contiguous().to(DEVICE), None, residual.to(DEVICE), out=out)
    torch.testing.assert_close(out.cpu().double(), x.double() @ w_kn.double() + residual.double(), rtol=1e-5, atol=1e-4)
    assert torch.isnan(out_big[:, 0]).all()  # nothing written beside the output
    odd = build(gemm_spec("float16", k=20, tma=True))  # 20 x 2 bytes per row of x
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        odd(torch.randn(3, 20, device=DEVICE).half(), torch.randn(40, 20, device=DEVICE).half())


# ------------------------------------------------------------------------------------------
# Stream-K: equal ranges of (tile, BLOCK_K step) units per program, then the fixup kernel
# ------------------------------------------------------------------------------------------


# In the default run, float32 at one row, a few rows, a tile and one past it, and the largest (9 M
# tiles: 63 and 100, with 4 and 7, split the same kinds of boundary), float16 at one row, a tile and
# one past it, and the largest; the other Ms extended.
@pytest.mark.parametrize(("dtype", "m"), [
    *(("float32", m) for m in (1, 2, 7, 16, 17, 129)), *(("float16", m) for m in (1, 16, 17, 129)),
    *(pytest.param("float32", m, marks=pytest.mark.extended) for m in (63, 100)),
    *(pytest.param("float16", m, marks=pytest.mark.extended) for m in (2, 7, 63, 100))])
def test_stream_k_gemm_every_m(dtype: str, m: int) -> None:
    # N = 40 and K = 136 (five BLOCK_K steps of 32, the last masked): grids that split tiles
    # at every kind of boundary, one program, and more programs than units (capped).
    for k in (136, 128):  # a masked last K step, and K a multiple of BLOCK_K (as in models)
        spec = gemm_spec(dtype, k=k, stream_k=True)
        for programs in (1, 3, 7, 13, 10_000):
            run_case(spec, m, seed=4000 + m + k + programs, num_programs=programs)


@pytest.mark.parametrize("dtype,epilogue", epilogue_params(), ids=_case_id)
def test_stream_k_epilogue(dtype: str, epilogue: tuple[str, ...]) -> None:
    # 37 rows x 40 columns in 32x32 tiles = 4 tiles of 5 steps over 7 programs: every tile is
    # shared, so the fixup kernel applies the epilogue; over 2 programs, two tiles are whole.
    spec = gemm_spec(dtype, epilogue, k=72, tile=TILE_B, stream_k=True)
    for programs in (7, 2):
        run_case(spec, 37, seed=sum(map(ord, dtype + "stream" + "-".join(epilogue))) + programs,
                 num_programs=programs)


def test_stream_k_source_and_launch_errors() -> None:
    spec = gemm_spec("float32", ("bias",), stream_k=True)
    src = render_gemm_source(spec)
    assert "while u < u_end:" in src and "_fixup(" in src
    assert "stream-K" in src.split('"""')[1]  # the header says how the kernel schedules its work
    with pytest.raises(ValueError, match="at most one of"):
        render_gemm_source(gemm_spec("float32", stream_k=True, split_k=True))
    with pytest.raises(ValueError, match="persistent or stream-K kernel only"):
        build(gemm_spec("float32"))(*make_inputs(gemm_spec("float32"), DEVICE, 4, 0).values(), num_programs=2)


def test_cast_to_float16_from_float32() -> None:
    spec = gemm_spec("float32", ("cast",), out_dtype="float16")
    out = run_case(spec, 17, seed=3)
    assert out.dtype == torch.float16


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's numpy
def test_round_then_cast_is_the_float16_result_widened() -> None:
    """`round` + `cast` (a float16 GEMM with a float32 output: `linear(x, w).float()`) rounds the
    result to float16 before widening it, so a product past 65504 is inf as in eager; the plain
    `cast` widens the accumulator itself (finite). Each is the other's kernel but the rounding."""
    rounded, direct = gemm_spec("float16", ("round", "cast")), gemm_spec("float16", ("cast",))
    assert rounded.name != direct.name and "acc.to(tl.float16).to(tl.float32)" in render_gemm_source(rounded)
    inputs = overflow_inputs(rounded, DEVICE, 17, seed=9)
    outs = []
    for spec in (rounded, direct):
        out = poisoned_out(spec, DEVICE, 17)
        build(spec)(inputs["x"], inputs["weight"], out=out)
        outs.append(out.cpu())
    ref = reference(rounded, **inputs)
    assert ref.isinf().sum() == 2  # +inf at [0, 0], -inf at [1, 0]
    assert_close(rounded, outs[0], ref)
    assert torch.isfinite(outs[1]).all()
    assert torch.equal(outs[0], outs[1].half().float())


def test_even_k_has_no_k_mask() -> None:
    # K = 64 is a multiple of BLOCK_K = 16 and 32: the K mask is left out of the source.
    spec = gemm_spec("float32", ("bias",), k=64, tile=TILE_B)
    assert "K - k0" not in render_gemm_source(spec)
    run_case(spec, 23, seed=4)


# ------------------------------------------------------------------------------------------
# Layouts, in-place output, persistent schedule
# ------------------------------------------------------------------------------------------


def test_transposed_weight_view_and_strided_x() -> None:
    spec = gemm_spec("float32", ("bias",), k=24)
    gen = torch.Generator().manual_seed(11)
    m, n, k = 45, 40, 24
    w_kn = torch.randn(k, n, generator=gen).to(DEVICE)  # stored [K, N]; the op wants [N, K]
    weight = w_kn.t()
    assert not weight.is_contiguous()
    x_wide = torch.randn(m, 2 * k, generator=gen).to(DEVICE)
    x = x_wide[:, 5 : 5 + k]  # row stride 2K, not K
    bias = torch.randn(n, generator=gen).to(DEVICE)
    out = poisoned_out(spec, DEVICE, m)
    build(spec)(x, weight, bias, out=out)
    assert_close(spec, out, reference(spec, x, weight, bias))


def test_row_and_column_offsets_are_int64_in_every_variant() -> None:
    """An [M, N] operand may be column-major (stride_n = M; `out=` takes any strides), so a
    column offset times its stride passes 2^31 once M * N does: in int32 it wrapped (the
    residual's and out's columns did, a crash at M = 16384, N = 131072 under the interpreter, an
    illegal address or a stray write on a GPU). Running that needs 2^31-element views, so this
    reads the rendered sources instead: every row or column index scaled by a stride is int64
    (K offsets are bounded by a tile and stay int32)."""
    from tileflow.backends.triton.grouped_gemm import render_grouped_gemm_source
    from tileflow.lower import grouped_gemm_spec

    sources = [render_gemm_source(gemm_spec("float32", ("bias", "residual"), **kw))
               for kw in ({}, {"persistent": True}, {"split_k": True}, {"stream_k": True})]
    sources.append(render_grouped_gemm_source(grouped_gemm_spec(
        dtype=torch.float32, out_dtype=torch.float32, n=40, k=24, experts=3, tile=TileConfig(16, 32, 32))))
    terms = {(m.group(1), m.group(2)) for src in sources
             for m in re.finditer(r"([\w.()\[\]:, ]+?)\s*\*\s*(stride_\w+)", src)}
    scaled = {(index.strip(), stride) for index, stride in terms if re.search(r"\b(rows|cols|offs_m|offs_n)\b", index)}
    assert {stride for _, stride in scaled} >= {"stride_xm", "stride_wn", "stride_rm", "stride_rn", "stride_om", "stride_on"}
    for index, stride in scaled:
        assert index == "rows" or index.endswith(".to(tl.int64)"), f"{index} * {stride} is computed in int32"


def test_only_real_rows_and_columns_are_written() -> None:
    # `out` is a window of a bigger buffer: rows past M and columns past N must stay untouched
    # (virtual padding never writes the padded part of the tail tile).
    spec = gemm_spec("float32")
    m, n = 19, 40
    buf = torch.full((m + 13, n + 7), -7.0, device=DEVICE)
    out = buf[:m, :n]
    inputs = make_inputs(spec, DEVICE, m, seed=12)
    build(spec)(inputs["x"], inputs["weight"], out=out)
    assert_close(spec, out, reference(spec, **inputs))
    assert torch.all(buf[m:] == -7.0) and torch.all(buf[:, n:] == -7.0)


def test_allocates_output_when_not_given() -> None:
    spec = gemm_spec("float16", ("cast",))
    inputs = make_inputs(spec, DEVICE, 9, seed=13)
    out = build(spec)(inputs["x"], inputs["weight"])
    assert out.shape == (9, 40) and out.dtype == torch.float32
    assert_close(spec, out, reference(spec, **inputs))


def test_zero_tokens_launches_nothing() -> None:
    spec = gemm_spec("float32")
    kernel = build(spec)
    x = torch.empty(0, 24, device=DEVICE)
    w = torch.randn(40, 24, device=DEVICE)
    out = kernel(x, w)
    assert out.shape == (0, 40)


@pytest.mark.parametrize(
    "dtype,epilogue,m,num_programs",
    [
        ("float32", (), 100, 3),                    # 7 x 2 = 14 tiles over 3 programs
        ("float16", ("bias", "swiglu"), 129, 5),   # 9 x 2 = 18 tiles over 5 programs
        ("float32", ("residual",), 1000, 7),       # 63 x 2 = 126 tiles over 7 programs
        ("float32", ("bias",), 40, None),          # default grid size
    ],
)
def test_persistent(
    dtype: str, epilogue: tuple[str, ...], m: int, num_programs: int | None
) -> None:
    spec = gemm_spec(dtype, epilogue, persistent=True)
    src = render_gemm_source(spec)
    assert "for tile_id in range(pid, num_tiles, NUM_PROGRAMS):" in src
    run_case(spec, m, seed=20 + m, num_programs=num_programs)


def test_persistent_more_programs_than_tiles() -> None:
    run_case(gemm_spec("float32", persistent=True), 5, seed=21, num_programs=64)


# ------------------------------------------------------------------------------------------
# Build: caching, one kernel for every M, artifacts
# ------------------------------------------------------------------------------------------


def test_an_unwritable_cache_names_the_setting_to_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("a file where the cache should be")
    monkeypatch.setenv("TILEFLOW_CACHE_DIR", str(not_a_dir))
    clear_memo()
    with pytest.raises(OSError, match="TILEFLOW_CACHE_DIR"):
        build(gemm_spec("float32"))


def test_a_relative_cache_dir_is_taken_from_where_the_kernel_was_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative TILEFLOW_CACHE_DIR left the kernel's recorded source path (the report's, when no
    debug_dir is set) relative to a working directory the process may leave."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TILEFLOW_CACHE_DIR", "cache")
    clear_memo()
    kernel = build(gemm_spec("float32"))
    monkeypatch.chdir("/")
    assert kernel.source_path.is_absolute() and kernel.source_path.read_text() == kernel.source
    assert kernel.source_path.is_relative_to(tmp_path / "cache")
    clear_memo()


def test_one_kernel_serves_every_m(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, private_cache: Path) -> None:
    writes: list[Path] = []
    real_write = tbuild._write_atomic

    def counting_write(path: Path, text: str) -> None:
        writes.append(Path(path))
        real_write(path, text)

    monkeypatch.setattr(tbuild, "_write_atomic", counting_write)
    spec = gemm_spec("float32", ("bias", "silu"))
    first = build(spec)
    assert first.target == "triton" and first.spec == spec
    assert first.source_path is not None and first.source_path.is_file()
    assert first.source_path.is_relative_to(tmp_path / "cache")
    assert first.source_path.read_text() == first.source
    assert writes == [first.source_path]
    stat = first.source_path.stat()

    for m in (1, 16, 17, 100, 3):
        again = build(spec)
        assert again is first  # memoized: same CompiledKernel, nothing rebuilt
        inputs = make_inputs(spec, DEVICE, m, seed=30 + m)
        out = poisoned_out(spec, DEVICE, m)
        again(inputs["x"], inputs["weight"], inputs["bias"], out=out)
        assert_close(spec, out, reference(spec, **inputs))

    # A fresh process (simulated by forgetting the memo) finds the file and does not rewrite it.
    clear_memo()
    rebuilt = build(spec)
    assert rebuilt is not first and rebuilt.source_path == first.source_path
    assert writes == [first.source_path], "the cached source file must be written only once"
    assert first.source_path.stat().st_mtime_ns == stat.st_mtime_ns


def test_source_saved_to_artifact_dir(tmp_path: Path) -> None:
    spec = gemm_spec("float16", ("bias", "gelu_tanh"), persistent=True)
    kernel = build(spec, artifact_dir=tmp_path / "artifacts")
    saved = tmp_path / "artifacts" / f"{spec.name}.py"
    assert saved.is_file()
    assert saved.read_text() == kernel.source
    assert kernel.meta["digest"] in str(kernel.source_path)


def test_cache_key_includes_versions() -> None:
    spec = gemm_spec("float32")
    import triton

    kernel = build(spec)
    expected = spec.digest(tbuild.tileflow_version(), triton.__version__)
    assert kernel.meta["digest"] == expected
    assert kernel.source_path.parent.parent.name == expected  # <digest>/<text hash>/<name>.py


def test_two_generators_of_one_version_keep_their_own_cache_files(private_cache: Path) -> None:
    """Two tileflow trees with one version string (a checkout and an edited copy of it, both
    reporting the installed version) render different text for the same spec. They shared one
    cache file, which each rewrote with its own text: a process whose kernel was built but not
    yet launched then ran the other tree's code (the interpreter reads the file at the first
    launch; a compiled build reads it at import, which races the same way)."""
    spec = gemm_spec("float32")
    store = "tl.store(out_ptrs, acc.to(tl.float32), mask=mask_out)"

    def negating_render(s: KernelSpec) -> str:  # the other tree's (edited) generator
        text = render_gemm_source(s)
        assert store in text
        return text.replace(store, "tl.store(out_ptrs, (-acc).to(tl.float32), mask=mask_out)")

    mine = build(spec)  # built here, not launched yet
    clear_memo()  # the other process: its own memo, the same cache directory
    theirs = build_triton_kernel(spec, negating_render, make_gemm_launcher)
    assert mine.source_path.read_text() == mine.source
    assert theirs.source_path.read_text() == theirs.source
    inputs = make_inputs(spec, DEVICE, 7, seed=41)
    ref = reference(spec, **inputs)
    for kernel, expected in ((mine, ref), (theirs, -ref)):
        out = poisoned_out(spec, DEVICE, 7)
        kernel(inputs["x"], inputs["weight"], out=out)
        assert_close(spec, out, expected)


def test_specs_differing_in_out_dtype_or_group_m_keep_apart(tmp_path: Path) -> None:
    """A kernel's name keys its file in a debug_dir or archive, the report and the visualizer's
    links: specs that differ only in the cast's output dtype, or in the tile's GROUP_M, had one
    name, and the second one's source overwrote the first's."""
    specs = [
        gemm_spec("float32", ("cast",), out_dtype="float16"),
        gemm_spec("float32", ("cast",), out_dtype="bfloat16"),
        gemm_spec("float16", ("cast",)),
        gemm_spec("float16", ("round", "cast")),  # the float16 result widened: another kernel
        gemm_spec("float32", tile=TileConfig(16, 32, 32, group_m=4)),
        gemm_spec("float32", tile=TileConfig(16, 32, 32)),
    ]
    kernels = [build(spec, artifact_dir=tmp_path) for spec in specs]
    assert len({spec.name for spec in specs}) == len(specs), [spec.name for spec in specs]
    for spec, kernel in zip(specs, kernels):
        assert (tmp_path / f"{spec.name}.py").read_text() == kernel.source


def test_the_interpreter_warns_of_bf16_operands_only(monkeypatch: pytest.MonkeyPatch, private_cache: Path) -> None:
    """Under TRITON_INTERPRET=1 a kernel of bf16 operands warns that its dots are wrong there; a
    float32 GEMM cast to a bf16 output dots float32 and is right (it matches the reference), so it
    builds without the warning."""
    import warnings

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # only builds: nothing is launched off the CPU
    cast = gemm_spec("float32", ("cast",), out_dtype="bfloat16")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        kernel = build(cast)
    assert not [w for w in seen if "bf16 kernels give wrong results" in str(w.message)]
    if DEVICE == "cpu":
        inputs = make_inputs(cast, DEVICE, 9, seed=45)
        out = poisoned_out(cast, DEVICE, 9)
        kernel(inputs["x"], inputs["weight"], out=out)
        assert_close(cast, out, reference(cast, **inputs))
    with pytest.warns(RuntimeWarning, match="bf16 kernels give wrong results under TRITON_INTERPRET=1"):
        build(gemm_spec("bfloat16"))


def test_a_gemm_over_many_sibling_weights_builds_despite_its_long_name(private_cache: Path, tmp_path: Path) -> None:
    """A GEMM's name spells each N segment's width: 64 sibling linears of 64 columns (a model of
    one Linear per head and projection) made a name of 250 characters, and writing its file
    (with the temporary file's longer name) failed "File name too long", telling the user to set
    TILEFLOW_CACHE_DIR. The file name is cut, with a hash, and two such names keep two files."""
    def spec_of(widths: list[int]) -> KernelSpec:
        return KernelSpec(op="padded_gemm", dtype="float32", out_dtype="float32", tile=TILE_A,
                          params=make_params(n=sum(widths), k=24, persistent=False, segments="x".join(map(str, widths))))

    first, second = spec_of([64] * 64), spec_of([64] * 63 + [32, 32])
    assert len(first.name) > 250
    kernels = [build(spec, artifact_dir=tmp_path / "artifacts") for spec in (first, second)]
    names = [k.source_path.name for k in kernels]
    assert all(len(name.encode()) <= 255 for name in names) and names[0] != names[1]
    assert [(tmp_path / "artifacts" / name).read_text() for name in names] == [k.source for k in kernels]


def test_every_build_copies_its_source_to_the_artifact_dir_it_is_given(tmp_path: Path) -> None:
    """The artifact copy is made on every build, not only on the one that rendered the kernel: a
    second run (its own debug_dir) of a kernel this process already built still gets its file."""
    spec = gemm_spec("float32", ("relu",), n=48)
    first = build(spec, artifact_dir=tmp_path / "run1")
    second = build(spec, artifact_dir=tmp_path / "run2")
    assert second is first
    for run in ("run1", "run2"):
        assert (tmp_path / run / f"{spec.name}.py").read_text() == first.source


def test_a_cache_file_not_holding_its_text_is_rewritten_before_import(private_cache: Path) -> None:
    """A cache file whose content is not the rendered text (cut short by a writer that died, or
    edited by hand) is rewritten from the text before it is imported, never imported as found."""
    spec = gemm_spec("float32")
    first = build(spec)
    clear_memo()  # a fresh process finds the damaged file
    first.source_path.write_text(first.source[: len(first.source) // 2])
    again = build(spec)
    assert again.source_path == first.source_path
    assert again.source_path.read_text() == again.source
    inputs = make_inputs(spec, DEVICE, 5, seed=42)
    out = poisoned_out(spec, DEVICE, 5)
    again(inputs["x"], inputs["weight"], out=out)
    assert_close(spec, out, reference(spec, **inputs))


def test_a_failed_source_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    """Sources are written to a temporary file renamed into place, so a reader (another process
    building the same spec) sees the old file or the whole new one: a write that fails part way
    (here the text cannot be encoded) leaves the old file as it was and no temporary file."""
    path = tmp_path / "kernel.py"
    tbuild._write_atomic(path, "OLD = 1\n")
    with pytest.raises(UnicodeEncodeError):
        tbuild._write_atomic(path, "NEW = 1\n# \ud800\n")
    assert path.read_text() == "OLD = 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernel.py"]
    tbuild._write_atomic(path, "NEW = 2\n")
    assert path.read_text() == "NEW = 2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernel.py"]


def test_a_source_that_fails_to_import_leaves_nothing_memoized_or_registered(private_cache: Path) -> None:
    """A build whose source raises at import raises that error and caches nothing in the process:
    no half-initialized module stays in sys.modules and the next build renders afresh."""
    spec = gemm_spec("float32")
    renders: list[str] = []

    def broken_render(s: KernelSpec) -> str:
        renders.append("broken")
        return render_gemm_source(s) + "\nraise RuntimeError('generated module failed')\n"

    before = set(sys.modules)
    with pytest.raises(RuntimeError, match="generated module failed"):
        build_triton_kernel(spec, broken_render, make_gemm_launcher)
    assert not [name for name in set(sys.modules) - before if name.startswith("_tileflow_triton_")]
    with pytest.raises(RuntimeError, match="generated module failed"):
        build_triton_kernel(spec, broken_render, make_gemm_launcher)
    assert renders == ["broken", "broken"], "a failed build must not be memoized"
    kernel = build(spec)
    inputs = make_inputs(spec, DEVICE, 3, seed=43)
    out = poisoned_out(spec, DEVICE, 3)
    kernel(inputs["x"], inputs["weight"], out=out)
    assert_close(spec, out, reference(spec, **inputs))


def test_each_kernel_module_is_registered_under_its_own_name(private_cache: Path) -> None:
    """A kernel's module is in sys.modules under `meta["module"]` (what looks a function up by its
    module name, e.g. pickle, finds it), and two renders of one spec (two trees of one version)
    register two modules, each the one whose file is its kernel's source."""
    spec = gemm_spec("float32")
    mine = build(spec)
    clear_memo()
    theirs = build_triton_kernel(spec, lambda s: render_gemm_source(s) + "\n# edited\n", make_gemm_launcher)
    assert mine.meta["module"] != theirs.meta["module"]
    for kernel in (mine, theirs):
        module = sys.modules[kernel.meta["module"]]
        assert Path(module.__file__) == kernel.source_path
        assert getattr(module, kernel.meta["kernel_name"]) is kernel.launch.kernel


def test_the_entry_kernel_is_the_named_one_or_the_only_one_the_module_defines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, private_cache: Path
) -> None:
    """A source whose entry kernel has another name than `kernel_identifier(spec)` builds when it
    defines exactly one `@triton.jit` function (helpers it imports from elsewhere do not count);
    with two of its own, the build says it expected exactly one."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "tileflow_test_jit_helpers.py").write_text(
        "import triton\n\n\n@triton.jit\ndef imported_helper(x):\n    return x\n")
    spec = gemm_spec("float32")
    ident = tbuild.kernel_identifier(spec)

    def renamed(extra: str) -> Callable[[KernelSpec], str]:
        return lambda s: render_gemm_source(s).replace(f"def {ident}(", "def renamed_entry(") + extra

    kernel = build_triton_kernel(spec, renamed("\nfrom tileflow_test_jit_helpers import imported_helper\n"),
                                 make_gemm_launcher)
    assert kernel.meta["kernel_name"] == "renamed_entry"
    inputs = make_inputs(spec, DEVICE, 4, seed=44)
    out = poisoned_out(spec, DEVICE, 4)
    kernel(inputs["x"], inputs["weight"], out=out)
    assert_close(spec, out, reference(spec, **inputs))
    clear_memo()
    second = "\n\n@triton.jit\ndef another_kernel(x_ptr):\n    pass\n"
    with pytest.raises(ImportError, match=r"2 @triton.jit functions \(expected exactly one\)"):
        build_triton_kernel(spec, renamed(second), make_gemm_launcher)


def test_the_memo_keeps_interpreted_and_compiled_kernels_apart(monkeypatch: pytest.MonkeyPatch, private_cache: Path) -> None:
    """`@triton.jit` picks the interpreted or the compiled function when the module is imported,
    so a build after TRITON_INTERPRET changes must not return the kernel built before it."""
    spec = gemm_spec("float32")
    before = build(spec)
    flag = triton_interpreter_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "0" if flag else "1")
    after = build(spec)  # imported only: nothing is launched
    assert after is not before
    assert (before.meta["interpreted"], after.meta["interpreted"]) == (flag, not flag)
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(before.launch.kernel, InterpretedFunction) == flag
    assert isinstance(after.launch.kernel, InterpretedFunction) == (not flag)
    monkeypatch.setenv("TRITON_INTERPRET", "1" if flag else "0")
    assert build(spec) is before


def test_threads_building_one_spec_render_it_once_and_share_the_kernel(private_cache: Path) -> None:
    """Two threads building one spec at once: the second waits for the first's build (it must
    not import a file the first is still writing) and both get the one CompiledKernel."""
    import threading
    import time

    spec = gemm_spec("float32")
    renders: list[float] = []

    def slow_render(s: KernelSpec) -> str:
        renders.append(time.monotonic())
        time.sleep(0.3)  # the other thread arrives while this build is in progress
        return render_gemm_source(s)

    results: list[object] = [None, None]

    def worker(i: int) -> None:
        results[i] = build_triton_kernel(spec, slow_render, make_gemm_launcher)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(renders) == 1
    assert results[0] is not None and results[0] is results[1]


# ------------------------------------------------------------------------------------------
# Generated source
# ------------------------------------------------------------------------------------------


def test_source_is_readable_and_minimal() -> None:
    spec = gemm_spec("float32", ("bias",))
    src = render_gemm_source(spec)
    compile(src, "<generated>", "exec")
    assert "import triton\n" in src and "import triton.language as tl\n" in src
    assert src.count("@triton.jit") == 1
    assert re.search(r"^\s*M,", src, re.M)  # M is a runtime argument...
    assert not re.search(r"\bM: tl.constexpr", src)  # ...never a constexpr
    assert 'do_not_specialize=["M"]' in src
    assert 'input_precision="ieee"' in src or "allow_tf32=False" in src
    assert "mask_m = offs_m < M" in src and "offs_k[None, :] < K - k0" in src
    assert "bias_ptr" in src and "res_ptr" not in src and "_sigmoid" not in src
    assert "tl.store(out_ptrs, acc.to(tl.float32), mask=mask_out)" in src
    # fp16 inputs: no precision override (it only means something for fp32)
    src16 = render_gemm_source(gemm_spec("float16", ("swiglu", "cast")))
    assert "input_precision" not in src16 and "allow_tf32" not in src16
    assert "acc_gate" in src16 and "acc_up" in src16 and "acc.to(tl.float32)" in src16


@pytest.mark.parametrize("persistent", [False, True])
def test_every_epilogue_combination_renders(persistent: bool) -> None:
    acts = [(), ("silu",), ("gelu",), ("gelu_tanh",), ("relu",), ("relu2",), ("swiglu",)]
    for act in acts:
        for bias in ((), ("bias",)):
            for res in ((), ("residual",)):
                for cast in ((), ("cast",), ("round", "cast")):
                    spec = gemm_spec("float16", bias + act + res + cast, persistent=persistent)
                    compile(render_gemm_source(spec), spec.name, "exec")


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors() -> None:
    spec = gemm_spec("float32", ("bias",))
    kernel = build(spec)
    x = torch.randn(5, 24, device=DEVICE)
    w = torch.randn(40, 24, device=DEVICE)
    b = torch.randn(40, device=DEVICE)
    with pytest.raises(ValueError, match=r"x must have shape \[5, 24\], got \[5, 23\]"):
        kernel(torch.randn(5, 23, device=DEVICE), w, b)
    with pytest.raises(ValueError, match="2-D"):
        kernel(torch.randn(24, device=DEVICE), w, b)
    with pytest.raises(ValueError, match="weight must have shape"):
        kernel(x, torch.randn(41, 24, device=DEVICE), b)
    with pytest.raises(ValueError, match="epilogue has 'bias' but no bias was given"):
        kernel(x, w)
    with pytest.raises(ValueError, match="bias must have shape"):
        kernel(x, w, torch.randn(80, device=DEVICE))
    with pytest.raises(ValueError, match="x must be float32, got float16"):
        kernel(x.half(), w, b)
    with pytest.raises(ValueError, match="has no 'residual'"):
        kernel(x, w, b, torch.randn(5, 40, device=DEVICE))
    with pytest.raises(ValueError, match="out must have shape"):
        kernel(x, w, b, out=torch.empty(6, 40, device=DEVICE))
    with pytest.raises(ValueError, match="persistent"):
        kernel(x, w, b, num_programs=4)

    plain = build(gemm_spec("float32"))
    with pytest.raises(ValueError, match="has no 'bias'"):
        plain(x, w, b)
    persistent = build(gemm_spec("float32", persistent=True))
    with pytest.raises(ValueError, match="num_programs must be a positive int"):
        persistent(x, w, num_programs=0)


def test_bad_specs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="at most one activation"):
        render_gemm_source(gemm_spec("float32", ("silu", "swiglu")))
    with pytest.raises(ValueError, match="no 'cast'"):
        render_gemm_source(gemm_spec("float16", (), out_dtype="float32"))
    with pytest.raises(ValueError, match="too small for the Triton kernel"):
        render_gemm_source(gemm_spec("float32", tile=TileConfig(8, 32, 32)))
    with pytest.raises(ValueError, match="positive integer param 'k'"):
        render_gemm_source(KernelSpec("padded_gemm", "float32", "float32", TILE_A, (),
                                      make_params(n=40)))
    with pytest.raises(ValueError, match="handles op 'padded_gemm'"):
        render_gemm_source(KernelSpec("meta_attention", "float32", "float32", TILE_A))
    with pytest.raises(ValueError, match="supports dtype"):
        render_gemm_source(gemm_spec("float64"))
    # `round` before a cast from float16 / bfloat16 only (else it would rename one kernel).
    for dtype, epilogue in (("float16", ("round",)), ("float32", ("round", "cast"))):
        with pytest.raises(ValueError, match="'round'.*needs 'cast' and a float16 or bfloat16 input"):
            render_gemm_source(gemm_spec(dtype, epilogue, out_dtype="float16" if dtype == "float32" else None))
    with pytest.raises(ValueError, match="order"):
        render_gemm_source(gemm_spec("float16", ("cast", "round")))


def test_epilogue_out_of_order_is_refused() -> None:
    """The kernels apply the epilogue in EPILOGUES order whatever order a spec lists it in: a
    spec of silu then bias rendered silu(x @ W^T + bias), not silu(x @ W^T) + bias."""
    with pytest.raises(ValueError, match="order"):
        render_gemm_source(gemm_spec("float32", ("silu", "bias")))
    with pytest.raises(ValueError, match="order"):
        render_gemm_source(gemm_spec("float16", ("cast", "residual")))


def test_a_param_no_kernel_reads_is_refused() -> None:
    """A misspelt flag built the plain kernel without a word."""
    spec = gemm_spec("float32")
    misspelt = dataclasses.replace(spec, params=spec.params + (("persistant", True),))
    with pytest.raises(ValueError, match="persistant"):
        render_gemm_source(misspelt)


# ------------------------------------------------------------------------------------------
# GPU only: the compiled (not interpreted) kernel never recompiles for a new M
# ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton)")
def test_cuda_no_recompile_across_m(tmp_path: Path) -> None:
    # A subprocess, because this process runs Triton in interpreter mode.
    script = textwrap.dedent(
        """
        import torch
        from tileflow.backends.triton.build import build_triton_kernel
        from tileflow.backends.triton.gemm import make_gemm_launcher, render_gemm_source
        from tileflow.kernel_spec import KernelSpec, TileConfig, make_params

        spec = KernelSpec("padded_gemm", "float32", "float32", TileConfig(32, 32, 32),
                          ("bias",), make_params(n=96, k=80, persistent=False))
        kernel = build_triton_kernel(spec, render_gemm_source, make_gemm_launcher)
        w = torch.randn(96, 80, device="cuda")
        b = torch.randn(96, device="cuda")
        for m in (1, 16, 17, 100, 1000):
            x = torch.randn(m, 80, device="cuda")
            out = kernel(x, w, b)
            ref = x.double() @ w.double().T + b.double()
            rel = ((out.double() - ref).norm() / ref.norm()).item()
            assert rel < 1e-5, (m, rel)  # also proves no TF32
        caches = getattr(kernel.launch.kernel, "device_caches", None)
        if caches:
            sizes = [len(entry[0]) for entry in caches.values()]
            assert sizes == [1], f"recompiled for a new M: {sizes}"
        print("OK")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="0", TILEFLOW_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------
# Property: any M, one kernel (hypothesis picks the token counts)
# ------------------------------------------------------------------------------------------



# Draws per run: 6 in the default run, the 12 it had under `extended` (each an interpreter launch).
@pytest.mark.parametrize("examples", [6, pytest.param(12, marks=pytest.mark.extended)])
def test_any_m_property(examples: int) -> None:
    settings(max_examples=examples, deadline=None, derandomize=True)(
        given(m=st.integers(min_value=1, max_value=300), persistent=st.booleans(),
              num_programs=st.integers(min_value=1, max_value=9))(_any_m_checked))()


def _any_m_checked(m: int, persistent: bool, num_programs: int) -> None:
    spec = gemm_spec("float32", ("bias", "gelu"), k=72, tile=TILE_B, persistent=persistent)
    kwargs = {"num_programs": num_programs} if persistent else {}
    run_case(spec, m, seed=m, **kwargs)


def test_every_load_and_store_is_masked_at_the_real_rows_and_columns() -> None:
    """Virtual padding in the source of every variant: a load of x is masked at the real rows
    (and at K when K has a tail), a weight or bias load at the real columns, a residual load
    and every store of the output at both. An unmasked load past M or N (a residual read with
    the column mask only, a bias read past N, x rows past M when K needs no mask) leaves every
    output element right, since the extra rows and columns are never stored, so the numeric
    tests cannot see it: it reads past the operand's memory."""
    from tileflow.backends.triton.grouped_gemm import render_grouped_gemm_source
    from tileflow.lower import grouped_gemm_spec

    variants = [{}, {"persistent": True}, {"split_k": True}, {"stream_k": True}]
    sources = [(k, render_gemm_source(gemm_spec("float32", epilogue, k=k, **kw)))
               for k in (64, 72) for kw in variants for epilogue in (("bias", "residual"), ("bias", "swiglu"))]
    sources += [(k, render_grouped_gemm_source(grouped_gemm_spec(
        dtype=torch.float32, out_dtype=torch.float32, n=40, k=k, experts=3, tile=TILE_A, activation=activation)))
        for k in (64, 72) for activation in ("none", "swiglu")]
    want = {"x_ptrs": ["mask_m[:, None]"], "w_ptrs": ["mask_n[None, :]"], "wu_ptrs": ["mask_n[None, :]"],
            "bias_ptr": ["mask_n"], "bias_up_ptr": ["mask_n"], "res_ptrs": ["mask_out"], "out_ptrs": ["mask_out"]}
    for k, src in sources:
        assert re.search(r"mask_m = offs_m < (M|row_end)\b", src)
        assert "mask_n = offs_n < N" in src
        if "mask_out" in src:
            assert "mask_out = mask_m[:, None] & mask_n[None, :]" in src
        accesses = re.findall(r"tl\.(load|store)\((\w+)[^\n]*?(?:mask=([^\n]*?), other|mask=([^\n]*?)\)$|\)$)", src, re.M)
        seen = set()
        for _, ptr, load_mask, store_mask in accesses:
            mask = load_mask or store_mask
            if ptr not in want:
                continue
            seen.add(ptr)
            k_mask = {"x_ptrs": ["offs_k[None, :] < K - k0"], "w_ptrs": ["offs_k[:, None] < K - k0"],
                      "wu_ptrs": ["offs_k[:, None] < K - k0"]}.get(ptr, []) if k % 32 else []
            for part in want[ptr] + k_mask:
                assert part in mask, f"tl access of {ptr} with mask {mask!r} lacks {part!r}"
        assert {"x_ptrs", "w_ptrs", "out_ptrs"} <= seen


def test_a_strided_or_expanded_bias_is_read_by_value() -> None:
    """The kernels read a bias as N consecutive values: a strided one (`b[::2]`) or an expanded
    one (stride 0) is used by its values, as `F.linear` does (the launch copies it first)."""
    spec = gemm_spec("float32", ("bias",), k=72)
    kernel = build(spec)
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(19, 72, generator=gen).to(DEVICE)
    w = (torch.randn(40, 72, generator=gen) / 72**0.5).to(DEVICE)
    for bias in (torch.randn(80, generator=gen)[::2], torch.randn(1, generator=gen).expand(40)):
        bias = bias.to(DEVICE)
        assert not bias.is_contiguous()
        out = poisoned_out(spec, DEVICE, 19)
        kernel(x, w, bias, out=out)
        assert_close(spec, out, reference(spec, x, w, bias))


@pytest.mark.parametrize("m", [1, 17, 100])
def test_split_k_with_k_a_multiple_of_block_k(m: int) -> None:
    """K = 160: five whole BLOCK_K steps of 32, so the source has no K mask (as in models).
    split_k 2 gives parts of 3 + 2 steps and 4 parts of 2 + 2 + 1: a last part shorter than the
    others must stop at K, not run a whole part's steps past it (unmasked, those read the next
    rows of x and the weight)."""
    spec = gemm_spec("float32", ("bias",), k=160, split_k=True)
    assert "K - k0" not in render_gemm_source(spec)
    for split_k in (2, 4):
        run_case(spec, m, seed=6000 + m + split_k, split_k=split_k)


@pytest.mark.parametrize("variant", [{}, {"persistent": True}, {"split_k": True}, {"stream_k": True}], ids=str)
def test_nothing_past_k_is_read(variant: dict) -> None:
    """x and the weights are windows of wider buffers whose columns past K are NaN: a load that
    reads one column past K (a K mask off by one, or a last K part that runs past K when K is a
    multiple of BLOCK_K) multiplies a NaN by the other operand's zero fill, and the NaN shows."""
    launch = {"split_k": 2} if "split_k" in variant else {"num_programs": 3} if "stream_k" in variant else {}
    for k in (72, 96):  # K in 2.25 and 3 steps of 32
        spec = gemm_spec("float32", ("bias", "swiglu"), k=k, **variant)
        inputs = make_inputs(spec, DEVICE, 19, seed=k)
        x_buf = torch.full((19, k + 32), float("nan"), device=DEVICE)
        w_buf = torch.full((80, k + 32), float("nan"), device=DEVICE)
        x, w = x_buf[:, :k].copy_(inputs["x"]), w_buf[:, :k].copy_(inputs["weight"])
        out = poisoned_out(spec, DEVICE, 19)
        build(spec)(x, w, inputs["bias"], out=out, **launch)
        assert_close(spec, out, reference(spec, x, w, inputs["bias"]))


def test_m_is_never_specialized_on_in_any_variant() -> None:
    """Every kernel that takes M (the plain, persistent, split-K and stream-K kernels and their
    reduce / fixup) lists it in `do_not_specialize`, so a new M (M == 1, M % 16 == 0) reuses the
    compiled kernel on a GPU. The interpreter never specializes, so this reads the sources (the
    GPU run is `test_cuda_no_recompile_across_m`)."""
    for kw in ({}, {"persistent": True}, {"split_k": True}, {"stream_k": True}):
        src = render_gemm_source(gemm_spec("float32", ("bias", "residual"), **kw))
        kernels = re.findall(r"@triton\.jit(\([^)]*\))?\ndef (\w+)\(([^)]*)\)", src)
        with_m = [(deco, name) for deco, name, params in kernels if re.search(r"^\s*M,", params, re.M)]
        assert len(with_m) == (2 if kw.keys() & {"split_k", "stream_k"} else 1), kw
        for deco, name in with_m:
            assert re.search(r'do_not_specialize=\[[^\]]*"M"', deco), f"{name} ({kw}) specializes on M"


def _one_piece_plan(n: int, k: int, dtype: str, **piece: bool) -> str:
    from tileflow.runtime import encode_plan
    from tileflow.tiles import PlanPiece, TilePlan

    return encode_plan(TilePlan(n, k, dtype, "cpu", 1, 64, (PlanPiece(1, 64, TileConfig(16, 16, 16), **piece),)))


def test_sibling_gemms_on_a_tma_piece_with_a_narrow_segment() -> None:
    """A TMA piece whose BLOCK_N (16) does not divide the segments' starts (24, 28) runs each
    segment by itself into its columns; a plan picks TMA when the whole N's rows align (64
    bytes here), but a 4-column fp16 segment's rows (8 bytes) cannot be a descriptor's: that
    segment runs the same tile without TMA (a TMA launch refused it)."""
    from tileflow.runtime import run_padded_gemm

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 32, generator=gen).half().to(DEVICE)
    weights = [torch.randn(rows, 32, generator=gen).half().to(DEVICE) for rows in (24, 4, 4)]
    out = run_padded_gemm(x, weights[0], None, None, "none", torch.float16, _one_piece_plan(32, 32, "float16", tma=True),
                          "triton", more_weights=weights[1:])
    torch.testing.assert_close(out.float(), torch.nn.functional.linear(x.float(), torch.cat(weights).float()),
                               rtol=1e-2, atol=1e-2)


def test_sibling_gemms_on_a_tma_piece_run_in_one_tma_kernel() -> None:
    """Where BLOCK_N divides the segments' starts, a TMA piece reads every segment through its
    own descriptor in one launch: no kernel of one segment is built."""
    from tileflow.runtime import compiled_kernels, run_padded_gemm

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(23, 48, generator=gen).half().to(DEVICE)  # K = 48: no other test's kernels
    weights = [torch.randn(rows, 48, generator=gen).half().to(DEVICE) for rows in (32, 16, 24)]
    biases = [torch.randn(rows, generator=gen).half().to(DEVICE) for rows in (32, 16, 24)]
    out = run_padded_gemm(x, weights[0], biases[0], None, "none", torch.float16,
                          _one_piece_plan(72, 48, "float16", tma=True), "triton", more_weights=weights[1:],
                          more_biases=biases[1:])
    want = torch.nn.functional.linear(x.double(), torch.cat(weights).double(), torch.cat(biases).double())
    torch.testing.assert_close(out.double(), want, rtol=1e-2, atol=1e-2)
    specs = [k.spec for k in compiled_kernels("padded_gemm") if k.spec.param("k") == 48]
    assert [(spec.param("segments"), spec.param("tma")) for spec in specs] == [("32x16x24", True)]


def test_sibling_gemms_stored_k_by_n_on_a_tma_piece_whose_rows_must_be_copied() -> None:
    """Sibling weights stored [K, N] as column blocks of one [K, 74] fp16 tensor: one pair of
    strides, so the TMA piece runs them in one kernel, but rows of 148 bytes cannot be a
    descriptor's and each weight is copied; the op still equals linear over the weights."""
    from tileflow.runtime import run_padded_gemm

    gen = torch.Generator().manual_seed(10)
    x = torch.randn(21, 40, generator=gen).half().to(DEVICE)
    store = torch.randn(40, 74, generator=gen).half().to(DEVICE)
    weights = [store[:, a:b].t() for a, b in ((0, 32), (32, 48), (48, 72))]
    out = run_padded_gemm(x, weights[0], None, None, "none", torch.float16, _one_piece_plan(72, 40, "float16", tma=True),
                          "triton", more_weights=weights[1:])
    want = torch.nn.functional.linear(x.double(), torch.cat(weights).double())
    torch.testing.assert_close(out.double(), want, rtol=1e-2, atol=1e-2)


def test_sibling_gemms_with_a_transposed_weight_run_per_segment() -> None:
    """Weights of other strides (one stored [K, N]) run one kernel per segment: the segmented
    kernel reads every weight with the first one's strides."""
    from tileflow.runtime import run_padded_gemm

    gen = torch.Generator().manual_seed(8)
    x = torch.randn(7, 40, generator=gen).to(DEVICE)
    weights = [torch.randn(rows, 40, generator=gen).to(DEVICE) for rows in (16, 16, 8)]
    transposed = weights[2].t().contiguous().t()
    out = run_padded_gemm(x, weights[0], None, None, "none", torch.float32, _one_piece_plan(40, 40, "float32"),
                          "triton", more_weights=[weights[1], transposed])
    torch.testing.assert_close(out, torch.nn.functional.linear(x, torch.cat(weights)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("triton_version,numpy_version,warns", [("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False),
                                                                 ("3.7.1", "2.4.6", False), ("3.10.0", "2.4.0", False)])
def test_the_interpreter_warns_once_where_numpy_breaks_its_loaded_loop_bounds(
        monkeypatch: pytest.MonkeyPatch, triton_version: str, numpy_version: str, warns: bool) -> None:
    """Triton 3.6's interpreter fails every loop bounded by a loaded value under numpy 2.4 with
    an error that names neither: building a kernel there warns once, saying what to install."""
    import warnings

    import numpy

    monkeypatch.setattr(numpy, "__version__", numpy_version)
    monkeypatch.setattr(tbuild, "_INTERPRETER_NUMPY_CHECKED", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tbuild._check_interpreter_numpy(triton_version)
        tbuild._check_interpreter_numpy(triton_version)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == int(warns), messages
    if warns:
        assert "install numpy<2.4, or Triton 3.7 or newer" in messages[0]


def test_only_an_interpreter_build_checks_numpy(monkeypatch: pytest.MonkeyPatch, private_cache: Path) -> None:
    """The numpy check concerns the interpreter alone: a kernel built for a GPU (interpreter
    off) never runs it, an interpreted build does, with Triton's version."""
    import triton

    calls: list[str] = []
    monkeypatch.setattr(tbuild, "_check_interpreter_numpy", calls.append)
    for interpreted in (False, True):
        monkeypatch.setattr(tbuild, "triton_interpreter_enabled", lambda interpreted=interpreted: interpreted)
        build(gemm_spec())
        assert calls == ([triton.__version__] if interpreted else []), (interpreted, calls)
