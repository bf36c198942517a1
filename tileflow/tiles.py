"""Tile plans for GEMMs whose M (the token count) changes every step: SmoothGEMM / virtual padding.

In LLM serving the number of tokens M that reaches a linear layer differs on every step, while
tile-based kernels want one fixed tile shape. XY-Serve's answer, which tileflow follows, is a
handful of fixed-tile kernels chosen by a *plan* computed once over the whole range
[m_min, m_max]: each M runs the kernel whose tile shape wastes the least time, and the last,
partial M tile is padded virtually (masked in on-chip buffers, never copied).

This module provides:

- `candidate_configs`: the few (at most 6) tile shapes worth considering on a device;
- `estimate_tile_seconds` / `estimate_seconds`: a small, documented analytic cost model
  (a per-tile roofline times the number of waves of tiles over the cores), which measured
  per-tile times can replace;
- `split_k_factors` / `split_reduce_seconds`: split-K on GPUs, where a few hundred tokens leave
  most SMs idle with whole-K tiles: each tile's K range runs on several programs and a second
  small kernel sums the fp32 partials and applies the epilogue;
- `stream_k_range` / `stream_k_segments`: stream-K on GPUs, where the tiles of one M leave the
  last wave of SMs partly idle: every SM takes an equal, contiguous share of all tiles' BLOCK_K
  steps, and a tile whose steps several SMs ran is summed from their fp32 partials;
- `build_tile_plan` -> `TilePlan`: the cheapest config (and split) for every M, merged into
  pieces;
- `token_range`: integer bounds of a symbolic M (a sympy expression over shape symbols).

Everything here is deterministic: plans depend only on their arguments, never on the machine.
"""

from __future__ import annotations

import bisect
import functools
import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from .devices import DeviceInfo
from .kernel_spec import TileConfig, dtype_name

# Bytes per element for the dtypes tile plans support.
ELEMENT_BYTES: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}

# Most distinct kernels a plan may use: each is a separate compiled kernel (and, on CUDA, a
# separate set of captured graphs), so the set must stay small.
MAX_CONFIGS = 6

# Per-tile overhead of the efficiency model, in rows/columns of equivalent work (see
# `tile_efficiency`).
_TILE_OVERHEAD = 16

# (block_m, block_n, block_k) shapes per device kind and element size, before fitting to N and K.
# GPUs: 16-row tiles for decode-sized M up to 128x128 (or 128x256 for wide N) for prefill.
# Small-M GEMMs stream the weight and little else, so their tiles are narrow (more programs to
# spread the weight over the SMs: 16x64 tiles left half of an H200 idle at N=4096) and deep in K
# (more bytes in flight per program). float32 tiles are narrower because each element
# costs twice the shared memory. For M <= 16 the 16-row tile never costs more than another
# under the cost model (see tests/test_tiles.py); ties go to the larger tile.
_GPU_SHAPES: dict[int, tuple[tuple[int, int, int], ...]] = {
    2: ((16, 32, 128), (32, 64, 128), (64, 128, 64), (128, 128, 64)),
    4: ((16, 32, 64), (32, 64, 32), (64, 64, 32), (128, 64, 32)),
    8: ((16, 32, 16), (32, 32, 16), (64, 32, 16), (128, 32, 16)),
}
# The 128x256 half-precision tile only pays off when N is wide enough to fill the cores.
_GPU_WIDE_MIN_N = 2048
_GPU_WIDE_SHAPE = (128, 256, 64)
# Ascend cube: L0A/L0B are 64 KiB and L0C (fp32 accumulator) 128 KiB per AI core on 910B; a
# bm x 128 tile with bk = 64 (fp16) keeps A, B and a double-buffered accumulator resident.
_NPU_BLOCK_M: tuple[int, ...] = (16, 32, 64, 128)
_NPU_BLOCK_N = 128
_NPU_BLOCK_K: dict[int, int] = {2: 64, 4: 32, 8: 16}
# CPU (Triton interpreter / reference path): small tiles keep the interpreter fast.
_CPU_BLOCK_M: tuple[int, ...] = (16, 32, 64)
_CPU_BLOCK_NK = 32
# tl.dot needs every block dimension >= 16.
_MIN_BLOCK = 16
_MAX_STAGES = 4

# Split-K (GPUs only): when a GEMM's tiles leave SMs idle (a few hundred tokens against a 4096-wide
# weight), each tile's K range is split over `split_k` programs that write fp32 partial tiles; a
# second small kernel sums them and applies the epilogue. Each part keeps at least
# `_MIN_SPLIT_K` of K, so a program still streams enough of the weight to pipeline its loads.
SPLIT_K_FACTORS: tuple[int, ...] = (2, 4)
_MIN_SPLIT_K = 1024
# The reduce kernel's launch, on top of its memory traffic (a kernel launch on the device).
_SPLIT_REDUCE_LAUNCH_SECONDS = 3e-6

MeasuredArg = Union[Mapping[TileConfig, float], Iterable[tuple[TileConfig, float]], None]


def _element_bytes(dtype: str) -> int:
    try:
        return ELEMENT_BYTES[dtype]
    except KeyError:
        raise ValueError(
            f"tile plans support dtypes {tuple(ELEMENT_BYTES)}, got {dtype!r}"
        ) from None


def _pow2_ceil(x: int) -> int:
    """Smallest power of two >= x (x >= 1)."""
    return 1 << max(0, (x - 1).bit_length())


def _fit(block: int, size: int) -> int:
    """Shrink a block to the problem size (rounded up to a power of two), never below 16."""
    return min(block, max(_MIN_BLOCK, _pow2_ceil(size)))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if operator.index(value) < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")


# The system reserves 1 KiB of each SM's shared memory per block (Ampere and Hopper tuning
# guides): a block can opt in to at most `smem_kib_per_core` - 1 KiB.
_SMEM_RESERVED_BYTES = 1024


# Per-SM register file of NVIDIA GPUs since Volta (CUDA programming guide, compute capability
# table): 64k 32-bit registers; a thread holds at most 255. (With the base figure below, the
# registers bind before the 2048 resident threads ever do.)
_GPU_REGISTERS_PER_CORE = 65536
_GPU_MAX_REGISTERS_PER_THREAD = 255
# Registers a GEMM thread needs besides its fp32 accumulator (addresses, loop state, operand
# fragments): a rough figure, only to tell one resident program from several.
_GPU_BASE_REGISTERS = 64


def programs_per_core(config: TileConfig, dtype: Any, device: DeviceInfo, *, weight_tiles: int = 1) -> int:
    """How many programs of a tile kernel with `config` one core holds resident at once.

    On GPUs the lesser of what shared memory (one block's pipeline buffers, as in
    `stages_that_fit`, plus the per-block reserve) and registers (the fp32 accumulator spread
    over the block's threads, plus `_GPU_BASE_REGISTERS`) allow; a 128x256 tile holds a Hopper
    SM alone, a 64x128 tile shares it with another, a 16x32 tile with three.
    Elsewhere 1 (an Ascend AI core or a CPU core runs one tile at a time). Measured tile times
    are per wave of `cores * programs_per_core` programs (see `estimate_seconds`): a grid
    smaller than that still takes one wave, which per-core waves took for a fraction of one.
    """
    if device.kind != "gpu":
        return 1
    threads = config.num_warps * 32
    smem = (config.num_stages * (config.block_m + weight_tiles * config.block_n) * config.block_k
            * _element_bytes(dtype_name(dtype)) + _SMEM_RESERVED_BYTES)
    accumulator = weight_tiles * config.block_m * config.block_n // threads
    registers = min(_GPU_MAX_REGISTERS_PER_THREAD, accumulator + _GPU_BASE_REGISTERS) * threads
    return max(1, min(device.smem_kib_per_core * 1024 // smem, _GPU_REGISTERS_PER_CORE // registers))


def stages_that_fit(bm: int, bn: int, bk: int, nbytes: int, smem_kib: int, *, weight_tiles: int = 1) -> int:
    """Pipeline stages (at most 4, at least 1) whose buffers fit a block's shared memory.

    One stage buffers an x tile (bm x bk) and `weight_tiles` weight tiles (bk x bn each: two for
    a fused SwiGLU, which streams the gate and up weights together).
    """
    per_stage = (bm + weight_tiles * bn) * bk * nbytes
    return max(1, min(_MAX_STAGES, (smem_kib * 1024 - _SMEM_RESERVED_BYTES) // per_stage))


def _gpu_config(bm: int, bn: int, bk: int, nbytes: int, smem_kib: int, weight_tiles: int = 1) -> TileConfig:
    """A GPU/CPU tile with as many pipeline stages as shared memory holds (2..4).

    One stage buffers an A tile (bm x bk) and `weight_tiles` B tiles (bk x bn each):
    (bm + weight_tiles * bn) * bk * bytes. If even two stages do not fit, BLOCK_K is halved (down
    to 16) rather than losing double buffering.
    """
    while bk > _MIN_BLOCK and stages_that_fit(bm, bn, bk, nbytes, smem_kib, weight_tiles=weight_tiles) < 2:
        bk //= 2
    stages = stages_that_fit(bm, bn, bk, nbytes, smem_kib, weight_tiles=weight_tiles)
    # Big tiles need more warps to keep enough MMA work in flight per warp.
    warps = 8 if bm * bn >= 128 * 256 else 4
    return TileConfig(bm, bn, bk, num_warps=warps, num_stages=stages)


@functools.lru_cache(maxsize=1024)
def _candidate_configs_cached(
    n: int, k: int, dtype: str, device: DeviceInfo, weight_tiles: int = 1
) -> tuple[TileConfig, ...]:
    nbytes = _element_bytes(dtype)
    device.peak_flops(dtype)  # fail early, naming the known dtypes, if the device lacks a rate
    configs: list[TileConfig] = []
    if device.kind == "gpu":
        shapes = list(_GPU_SHAPES[nbytes])
        # A fused SwiGLU keeps two fp32 accumulators: at 128x256 they alone outgrow the register
        # file (ptxas spills even with 16 warps), so it gets no wide tile.
        if nbytes == 2 and n >= _GPU_WIDE_MIN_N and weight_tiles == 1:
            shapes.append(_GPU_WIDE_SHAPE)
        for bm, bn, bk in shapes:
            configs.append(_gpu_config(bm, _fit(bn, n), _fit(bk, k), nbytes, device.smem_kib_per_core, weight_tiles))
    elif device.kind == "npu":
        bk = _fit(_NPU_BLOCK_K[nbytes], k)
        bn = _fit(_NPU_BLOCK_N, n)
        for bm in _NPU_BLOCK_M:
            # One AI core runs a tile with no warps; 2 stages = the cube's ping-pong buffers.
            configs.append(TileConfig(bm, bn, bk, num_warps=1, num_stages=2))
    else:  # cpu
        bn = _fit(_CPU_BLOCK_NK, n)
        bk = _fit(_CPU_BLOCK_NK, k)
        for bm in _CPU_BLOCK_M:
            configs.append(_gpu_config(bm, bn, bk, nbytes, device.smem_kib_per_core, weight_tiles))
    # Fitting to a small N or K can make two shapes identical; keep the first of each.
    unique = tuple(dict.fromkeys(configs))
    assert len(unique) <= MAX_CONFIGS, unique
    return unique


def candidate_configs(
    n: int, k: int, dtype: Any, device: DeviceInfo, *, weight_tiles: int = 1
) -> tuple[TileConfig, ...]:
    """The fixed, small set (at most 6) of tile configs a plan for an (M x K) @ (K x N) GEMM
    chooses from on `device`, in increasing block_m.

    GPUs: BLOCK_M in {16, 32, 64, 128}; half precision uses 16x32 and 32x64 tiles 128 deep in K
    for small M, 64x128 and 128x128 (plus 128x256 when N >= 2048) 64 deep; float32 narrower and
    shallower tiles; the number of pipeline stages is what a block's shared memory holds:
    (bm + bn) * bk * bytes * stages <= smem - 1 KiB.
    NPUs (Ascend): BLOCK_M in {16, 32, 64, 128} x 128 x 64, which fits the cube's L0 buffers.
    CPU: BLOCK_M in {16, 32, 64} x 32 x 32 so the Triton interpreter stays fast.
    BLOCK_N and BLOCK_K shrink to N and K (rounded up to a power of two, at least 16).
    `weight_tiles=2` is for a fused SwiGLU, whose kernel streams the gate and up weights together:
    its stages are sized for two weight tiles and it gets no 128x256 tile.
    The result depends only on the arguments (deterministic) and is cached.
    """
    _check_positive(n=n, k=k)
    if weight_tiles not in (1, 2):
        raise ValueError(f"weight_tiles must be 1 or 2 (2 for a fused SwiGLU), got {weight_tiles!r}")
    return _candidate_configs_cached(int(n), int(k), dtype_name(dtype), device, weight_tiles)


def tile_efficiency(config: TileConfig) -> float:
    """Fraction of peak compute a tile of this shape reaches, in (0, 1).

    Model: each tile pays a fixed overhead (prologue, pipeline fill, epilogue, and on Hopper
    the 64-row granularity of warpgroup MMAs) worth about 16 rows and 16 columns of work, so
    efficiency = bm / (bm + 16) * bn / (bn + 16). A 16x64 tile reaches 0.40 of peak, a 128x128
    tile 0.79 and a 128x256 tile 0.84 (an 8192^3 bf16 matmul measured 0.81 of peak on an H100).
    """
    return (
        config.block_m / (config.block_m + _TILE_OVERHEAD)
        * config.block_n / (config.block_n + _TILE_OVERHEAD)
    )


def estimate_tile_seconds(
    config: TileConfig, n: int, k: int, dtype: Any, device: DeviceInfo
) -> float:
    """Estimated time for one core to compute one full (block_m x block_n) output tile.

    A per-tile roofline: max(compute, memory), where
      compute = 2 * bm * bn * k / (peak_flops / cores * tile_efficiency(config)),
      memory  = (bm * k + bn * k) * bytes / (bandwidth / cores).
    Each core gets an equal share of the device's peak rate and bandwidth. The memory term
    counts every operand tile as read from HBM, ignoring L2 reuse between tiles, so it is
    pessimistic for large tiles at large M; measured per-tile times (see `build_tile_plan`)
    replace the whole estimate when available. `n` does not change a full tile's time; it is
    accepted so every cost function takes the same problem description.
    """
    del n  # a tile costs the same whatever the total N (see docstring)
    return max(_tile_roofline(config, k, dtype_name(dtype), device))


def _tile_roofline(config: TileConfig, k: int, dtype: str, device: DeviceInfo) -> tuple[float, float]:
    """(compute, memory) seconds of one tile on one core (see `estimate_tile_seconds`)."""
    nbytes = _element_bytes(dtype)
    peak_per_core = device.peak_flops(dtype) / device.cores
    bw_per_core = device.mem_bw_bytes / device.cores
    compute = 2.0 * config.block_m * config.block_n * k / (peak_per_core * tile_efficiency(config))
    memory = (config.block_m + config.block_n) * k * nbytes / bw_per_core
    return compute, memory


def _measured_items(measured: MeasuredArg) -> tuple[tuple[TileConfig, float], ...]:
    """Canonical, hashable form of `measured`: sorted (config, seconds) pairs, validated."""
    if measured is None:
        return ()
    items = measured.items() if isinstance(measured, Mapping) else measured
    out: dict[TileConfig, float] = {}
    for config, seconds in items:
        if not isinstance(config, TileConfig):
            raise TypeError(f"measured keys must be TileConfig, got {type(config).__name__}")
        seconds = float(seconds)
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ValueError(
                f"measured time for {config.name} must be positive and finite, got {seconds}"
            )
        out[config] = seconds
    return tuple(sorted(out.items()))


def tile_times_at_depth(
    samples: Mapping[TileConfig, Iterable[tuple[int, float]]], k: int, *, per_step: bool = False
) -> dict[TileConfig, float]:
    """Per-tile times at reduction depth `k`, from times measured at other (N, K) shapes.

    `samples` maps each config to its measured (K, seconds) pairs. A whole tile streams K / BLOCK_K
    steps of its operands after a fixed prologue and epilogue, so its time is modeled as
    a + b * K: the least-squares line through the samples, evaluated at `k`. With one measured
    depth, or a line whose fixed part comes out negative (which would shrink small depths to
    nothing), the line through the origin is used instead (time proportional to K). N is left
    out: a full tile's work does not depend on it (only L2 reuse does, which this ignores).
    `per_step` is for times of one BLOCK_K step (stream-K work units), which do not grow with K:
    their mean. Configs without samples are left out.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    times: dict[TileConfig, float] = {}
    for config, pairs in samples.items():
        ks, secs = np.array([[float(depth), float(seconds)] for depth, seconds in pairs]).reshape(-1, 2).T
        if ks.size == 0:
            continue
        if per_step:
            times[config] = float(secs.mean())
            continue
        slope = float((ks * secs).sum() / (ks * ks).sum())  # through the origin
        if np.unique(ks).size > 1:
            b, a = np.polyfit(ks, secs, 1)
            if a >= 0 and b > 0:
                times[config] = float(a + b * k)
                continue
        times[config] = slope * k
    return times


def split_k_factors(config: TileConfig, k: int, device: DeviceInfo) -> tuple[int, ...]:
    """The split-K factors a plan may run `config` with over reduction length `k` on `device`:
    1, plus `SPLIT_K_FACTORS` on GPUs where every part keeps at least `_MIN_SPLIT_K` of K (in
    whole BLOCK_K steps)."""
    if device.kind != "gpu":
        return (1,)
    steps = -(-k // config.block_k)
    return (1,) + tuple(s for s in SPLIT_K_FACTORS if steps // s * config.block_k >= _MIN_SPLIT_K)


def split_reduce_seconds(rows: Any, n: int, split_k: int, device: DeviceInfo, out_dtype: Any, *, weight_tiles: int = 1) -> Any:
    """The split-K reduce kernel's time for `rows` output rows (an int or a numpy array): it
    reads `split_k` fp32 partial tiles per output (two per output for a fused SwiGLU), which the
    GEMM wrote, and writes the output once; plus a launch. 0 for `split_k` 1.

    Callers pass M rounded up to the tile's block_m (partials are counted in whole row tiles,
    like the GEMM's own cost), so the cost is constant between tile boundaries."""
    if split_k == 1:
        return 0.0 * rows
    partial_bytes = 2 * split_k * weight_tiles * rows * n * 4  # written, then read back
    out_bytes = rows * n * _element_bytes(dtype_name(out_dtype))
    return (partial_bytes + out_bytes) / device.mem_bw_bytes + _SPLIT_REDUCE_LAUNCH_SECONDS


# TMA (the Hopper copy engine) reads 2-D tiles from rows that start at 16-byte boundaries.
TMA_ALIGN_BYTES = 16


def tma_rows_aligned(n: int, k: int, dtype: Any) -> bool:
    """Whether a GEMM's operands can feed TMA in their usual layouts: K elements (a row of x, of
    an [N, K] weight) and N elements (a row of a [K, N] weight) whole multiples of
    `TMA_ALIGN_BYTES`."""
    size = _element_bytes(dtype_name(dtype))
    return (k * size) % TMA_ALIGN_BYTES == 0 and (n * size) % TMA_ALIGN_BYTES == 0


def stream_k_range(program: int, units: int, programs: int) -> tuple[int, int]:
    """The work units `[lo, hi)` that program `program` of a stream-K launch runs: `units` (output
    tiles x BLOCK_K steps, tile-major) dealt to `programs` programs in equal contiguous ranges
    (their sizes differ by at most one; a program gets none when units < programs)."""
    return program * units // programs, (program + 1) * units // programs


def stream_k_segments(tile: int, steps: int, units: int, programs: int) -> tuple[tuple[int, int, int], ...]:
    """Who ran output tile `tile` (of `steps` BLOCK_K steps) in a stream-K launch: (program,
    first step, end step) per program, in program order; one segment (0, steps) when one
    program ran the whole tile. The programs are those whose ranges meet the tile's units
    `[tile * steps, (tile + 1) * steps)`: the first is the last program starting at or before
    the tile's first unit, the last the one that owns its last unit (closed forms that the
    kernels compute too)."""
    u0 = tile * steps
    first = ((u0 + 1) * programs - 1) // units
    last = ((u0 + steps) * programs - 1) // units
    segments = []
    for q in range(first, last + 1):
        lo, hi = stream_k_range(q, units, programs)
        if hi > lo:
            segments.append((q, max(lo, u0) - u0, min(hi, u0 + steps) - u0))
    return tuple(segments)


def stream_k_fixup_seconds(tiles: Any, block_m: int, block_n: int, programs: int, device: DeviceInfo, *,
                           weight_tiles: int = 1) -> Any:
    """The stream-K fixup's time for `tiles` output tiles (an int or a numpy array) over
    `programs` programs: every program writes at most two fp32 partial tiles (its range's first
    and last, where they are partial), each read back once by the fixup kernel, which sums a
    split tile and applies the epilogue; plus a launch. Bounded by min(2 * programs, programs +
    tiles) partial tiles, counted at that bound."""
    partials = np.minimum(2 * programs, programs + np.asarray(tiles))
    return 2 * partials * weight_tiles * block_m * block_n * 4 / device.mem_bw_bytes + _SPLIT_REDUCE_LAUNCH_SECONDS


def estimate_seconds(
    m: int,
    n: int,
    k: int,
    config: TileConfig,
    device: DeviceInfo,
    dtype: Any,
    measured: MeasuredArg = None,
    *,
    split_k: int = 1,
    weight_tiles: int = 1,
    stream_k: bool = False,
    persistent: bool = False,
) -> float:
    """Estimated time of an (m x k) @ (k x n) GEMM run with one fixed tile `config`.

    tiles = ceil(m / bm) * ceil(n / bn); the cores run them in waves = ceil(tiles / cores). With
    a measured time (`measured`, a mapping or an iterable of (config, seconds) pairs) of one
    wave of resident programs, cost = ceil(programs / (cores * `programs_per_core`)) * that
    time: a core runs the programs it holds at once side by side, so a grid that leaves it one
    program still takes a whole such wave (`persistent=True`: the persistent variant's grid,
    one program per core, runs ceil(tiles / cores) waves). Otherwise the two roofline terms of
    `estimate_tile_seconds` scale differently: compute costs waves * per-tile compute (a partly filled last wave costs a full
    wave), memory costs max(1, tiles / cores) * per-tile memory (resident tiles share the
    device's bandwidth, so a partly filled wave leaves none of it idle), and cost is the larger.
    Rows padded in the last M tile cost full time through ceil(m / bm).

    With `split_k` > 1 each tile becomes `split_k` programs over ceil(k / split_k) of the
    reduction, and `split_reduce_seconds` is added (`weight_tiles=2` for a fused SwiGLU, whose
    programs keep two partial tiles). `measured` always holds times of the variant estimated:
    per-tile times of the unsplit kernel for `split_k` 1, per-program times of the split kernel
    for `split_k` > 1 (cost = resident waves of programs * that time + the reduce).

    `stream_k` estimates the stream-K variant over one program per core, from a measured time
    per work unit (one BLOCK_K step of one tile) in `measured` only: ceil(units / cores) units on
    the busiest core plus `stream_k_fixup_seconds`. It has no analytic model (the roofline
    above cannot rank it against whole tiles), so an unmeasured config raises ValueError. Plans
    run it only over at least one whole tile per core (see `build_tile_plan`).
    """
    m = operator.index(m)
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    _check_positive(n=n, k=k, split_k=split_k)
    if stream_k and split_k > 1:
        raise ValueError("a GEMM runs split along K or stream-K, not both")
    if persistent and (stream_k or split_k > 1):
        raise ValueError("the persistent variant runs whole tiles: not split along K, not stream-K")
    tiles = -(-m // config.block_m) * -(-n // config.block_n)
    if tiles == 0:
        return 0.0
    measured_map = dict(_measured_items(measured))
    if stream_k:
        if config not in measured_map:
            raise ValueError(f"stream-K has no analytic cost model: measure {config.name} (bench/gemm.py --measure-tiles)")
        units = tiles * -(-k // config.block_k)
        return (-(-units // device.cores) * measured_map[config]
                + float(stream_k_fixup_seconds(tiles, config.block_m, config.block_n, device.cores, device,
                                               weight_tiles=weight_tiles)))
    programs = tiles * split_k
    waves = -(-programs // device.cores)
    reduce = split_reduce_seconds(-(-m // config.block_m) * config.block_m, n, split_k, device, dtype,
                                  weight_tiles=weight_tiles)
    if config in measured_map:
        resident = 1 if persistent else programs_per_core(config, dtype, device, weight_tiles=weight_tiles)
        return -(-programs // (device.cores * resident)) * measured_map[config] + reduce
    compute, memory = _tile_roofline(config, -(-k // split_k), dtype_name(dtype), device)
    # Compute is bound to the core running the tile: a partly filled last wave costs a full
    # wave. Bandwidth is not: tiles resident beside each other share the whole memory system,
    # so memory time grows with the tile count itself once every core has a tile.
    return max(waves * compute, max(1.0, programs / device.cores) * memory) + reduce


@dataclass(frozen=True)
class PlanPiece:
    """Token counts `lo..hi` (both inclusive) run with tile config `config`, as the persistent
    kernel variant when `persistent` (chosen only where measured times say it wins), with each
    tile's K range split over `split_k` programs when it is more than 1 (see `SPLIT_K_FACTORS`),
    as stream-K when `stream_k` (see `stream_k_segments`), or with its operand tiles fetched by
    TMA when `tma` (the last two chosen only where measured)."""

    lo: int
    hi: int
    config: TileConfig
    persistent: bool = False
    split_k: int = 1
    stream_k: bool = False
    tma: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.hi:
            raise ValueError(f"PlanPiece needs 1 <= lo <= hi, got lo={self.lo}, hi={self.hi}")
        if isinstance(self.split_k, bool) or not isinstance(self.split_k, int) or self.split_k < 1:
            raise ValueError(f"PlanPiece split_k must be an int >= 1, got {self.split_k!r}")
        if self.persistent + (self.split_k > 1) + self.stream_k + self.tma > 1:
            raise ValueError("a PlanPiece is at most one of persistent, split along K, stream-K and TMA")

    @property
    def kernel_variant(self) -> tuple[TileConfig, bool, bool, bool, bool]:
        """(config, persistent, split, stream_k, tma): the compiled kernel this piece runs (a
        split kernel serves every split factor of its config)."""
        return self.config, self.persistent, self.split_k > 1, self.stream_k, self.tma

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        data = {"lo": self.lo, "hi": self.hi, "config": self.config.to_dict()}
        if self.persistent:
            data["persistent"] = True
        if self.split_k > 1:
            data["split_k"] = self.split_k
        if self.stream_k:
            data["stream_k"] = True
        if self.tma:
            data["tma"] = True
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PlanPiece":
        """Inverse of `to_dict`."""
        return cls(int(data["lo"]), int(data["hi"]), TileConfig.from_dict(dict(data["config"])),
                   bool(data.get("persistent", False)), int(data.get("split_k", 1)), bool(data.get("stream_k", False)),
                   bool(data.get("tma", False)))


@dataclass(frozen=True)
class TilePlan:
    """Which tile config runs each token count M in [m_min, m_max] for one GEMM shape.

    `pieces` are contiguous, non-overlapping and cover [m_min, m_max] exactly (checked on
    construction, so a corrupted serialized plan fails loudly). `device` is the device's name.
    A GEMM over sibling weights (N segments) also carries each segment's own plan
    (`segment_plans`, widths summing to N, the same M range): a piece whose kernel cannot read
    the segments in one launch runs them apart, each by its own plan's piece.
    """

    n: int
    k: int
    dtype: str
    device: str
    m_min: int
    m_max: int
    pieces: tuple[PlanPiece, ...]
    segment_plans: tuple["TilePlan", ...] = ()
    # Upper bounds of the pieces, for bisection in `select_tile` (derived, not compared).
    _his: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.pieces:
            raise ValueError("a TilePlan needs at least one piece")
        if self.pieces[0].lo != self.m_min or self.pieces[-1].hi != self.m_max:
            raise ValueError(
                f"plan pieces cover {self.pieces[0].lo}..{self.pieces[-1].hi}, "
                f"not the plan's range {self.m_min}..{self.m_max}"
            )
        for prev, nxt in zip(self.pieces, self.pieces[1:]):
            if nxt.lo != prev.hi + 1:
                raise ValueError(f"plan pieces are not contiguous: {prev.hi} then {nxt.lo}")
        if self.segment_plans and (
                sum(p.n for p in self.segment_plans) != self.n
                or any((p.k, p.dtype, p.m_min, p.m_max) != (self.k, self.dtype, self.m_min, self.m_max)
                       for p in self.segment_plans)):
            raise ValueError(f"segment plans of widths {[p.n for p in self.segment_plans]} do not split this "
                             f"plan's N={self.n} over its K, dtype and M range")
        object.__setattr__(self, "_his", tuple(p.hi for p in self.pieces))

    def piece_for(self, m: int) -> PlanPiece:
        """The piece (config and kernel variant) for token count `m`; ValueError outside the range."""
        m = operator.index(m)
        if not self.m_min <= m <= self.m_max:
            raise ValueError(
                f"token count M={m} is outside this GEMM plan's range "
                f"[{self.m_min}, {self.m_max}] (n={self.n}, k={self.k}, {self.dtype}); "
                f"raise `max_tokens` (or the token dimension's upper bound) to cover it"
            )
        return self.pieces[bisect.bisect_left(self._his, m)]

    def select_tile(self, m: int) -> TileConfig:
        """The tile config for token count `m` (binary search over the pieces).

        Raises ValueError when m is outside [m_min, m_max]; the message says to raise
        `max_tokens`.
        """
        return self.piece_for(m).config

    @property
    def configs(self) -> tuple[TileConfig, ...]:
        """Distinct configs the plan uses, in order of first use (increasing M)."""
        return tuple(dict.fromkeys(p.config for p in self.pieces))

    @property
    def variants(self) -> tuple[tuple[TileConfig, bool, bool, bool, bool], ...]:
        """Distinct (config, persistent, split, stream_k, tma) kernels the plan uses, in order of
        first use: a split kernel serves every split factor of its config (the factor is a
        launch argument)."""
        return tuple(dict.fromkeys(p.kernel_variant for p in self.pieces))

    def padded_rows(self, m: int) -> int:
        """Rows of (virtual) padding in the last M tile when `m` runs with its selected config."""
        bm = self.select_tile(m).block_m
        return -(-m // bm) * bm - m

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form; `TilePlan.from_dict(plan.to_dict()) == plan`."""
        return {
            "n": self.n,
            "k": self.k,
            "dtype": self.dtype,
            "device": self.device,
            "m_min": self.m_min,
            "m_max": self.m_max,
            "pieces": [p.to_dict() for p in self.pieces],
            **({"segment_plans": [p.to_dict() for p in self.segment_plans]} if self.segment_plans else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TilePlan":
        """Inverse of `to_dict`."""
        return cls(
            n=int(data["n"]),
            k=int(data["k"]),
            dtype=str(data["dtype"]),
            device=str(data["device"]),
            m_min=int(data["m_min"]),
            m_max=int(data["m_max"]),
            pieces=tuple(PlanPiece.from_dict(p) for p in data["pieces"]),
            segment_plans=tuple(TilePlan.from_dict(p) for p in data.get("segment_plans", ())),
        )

    def describe(self) -> str:
        """One line per piece joined by '; ', e.g. `M 1..16 -> m16n64k64w4s4; M 17..64 -> ...`."""
        return "; ".join(f"M {p.lo}..{p.hi} -> {p.config.name}" + (" persistent" if p.persistent else "")
                         + (f" split-K {p.split_k}" if p.split_k > 1 else "") + (" stream-K" if p.stream_k else "")
                         + (" TMA" if p.tma else "") for p in self.pieces)


@functools.lru_cache(maxsize=256)
def _build_tile_plan_cached(
    n: int,
    k: int,
    dtype: str,
    m_min: int,
    m_max: int,
    device: DeviceInfo,
    measured: tuple[tuple[TileConfig, float], ...],
    measured_persistent: tuple[tuple[TileConfig, float], ...] = (),
    weight_tiles: int = 1,
    split_variants: bool = True,
    measured_split: tuple[tuple[int, tuple[tuple[TileConfig, float], ...]], ...] = (),
    measured_stream_k: tuple[tuple[TileConfig, float], ...] = (),
    measured_tma: tuple[tuple[TileConfig, float], ...] = (),
) -> TilePlan:
    measured_map = dict(measured)
    persistent_map = dict(measured_persistent)
    split_maps = {split: dict(items) for split, items in measured_split}
    stream_k_map = dict(measured_stream_k) if split_variants and device.kind == "gpu" else {}
    # TMA for 16-bit operands only: fp32 TMA tiles read as [N, K] spill kilobytes (their
    # transpose goes through registers; sm_90 compile check), and no GPU run measured them.
    tma_map = (dict(measured_tma) if device.kind == "gpu" and _element_bytes(dtype) == 2 and tma_rows_aligned(n, k, dtype)
               else {})
    # Descending config order + argmin's first-minimum rule = ties go to the larger block_m
    # (then larger block_n, block_k, ...): fewer, fuller tiles for the same estimated time. A
    # config's persistent variant is a candidate only where it was measured, right after the
    # plain one, so a tie keeps the plain kernel.
    configs = sorted(candidate_configs(n, k, dtype, device, weight_tiles=weight_tiles), reverse=True)
    # Candidates: (config, persistent, split_k); split variants come after their config's unsplit
    # kernel, so a tie keeps the single launch. A measured plan (any candidate measured) compares
    # measured times only, so a split runs there only where it was measured (a model's estimate
    # and a measurement are numbers of different kinds); a modeled plan models every split the
    # config allows.
    # A config's stream-K and TMA variants, like its persistent one, are candidates only where
    # measured (TMA also only where the operands' rows are aligned for it).
    # A measured split time (of a split the plan may run) makes the plan measured too: otherwise
    # a file with only split times for a shape had every other split modeled beside it.
    any_measured = any(c in measured_map or c in persistent_map or c in stream_k_map or c in tma_map
                       or (split_variants and any(c in split_maps.get(s, {}) for s in split_k_factors(c, k, device)[1:]))
                       for c in configs)  # others are ignored
    # Candidates: (config, persistent, split_k, stream_k, tma).
    cands = []
    for c in configs:
        cands.append((c, False, 1, False, False))
        if c in persistent_map:
            cands.append((c, True, 1, False, False))
        if c in tma_map:
            cands.append((c, False, 1, False, True))
        if c in stream_k_map:
            cands.append((c, False, 1, True, False))
        if split_variants:
            cands += [(c, False, s, False, False) for s in split_k_factors(c, k, device)[1:]
                      if not any_measured or c in split_maps.get(s, {})]
    # Every block_m is a power of two, so all tile boundaries are multiples of the smallest
    # one, g: ceil(m / bm) and hence every candidate's cost is constant on (j*g, (j+1)*g].
    # Evaluating one M per such segment is exact and g times cheaper than every M.
    g = functools.reduce(math.gcd, (c.block_m for c in configs))
    j_first = -(-m_min // g)  # first j with j*g + 1 > m_min
    j_last = (m_max - 1) // g
    starts = np.concatenate(
        ([m_min], np.arange(j_first, j_last + 1, dtype=np.int64) * g + 1)
    ).astype(np.int64)
    costs = np.empty((len(cands), len(starts)), dtype=np.float64)
    for row, (config, persistent, split, stream_k, tma) in enumerate(cands):
        tiles = -(-starts // config.block_m) * (-(-n // config.block_n))
        if stream_k:  # same arithmetic as `estimate_seconds(..., stream_k=True)` where it may run
            units = tiles * -(-k // config.block_k)
            costs[row] = (-(-units // device.cores) * stream_k_map[config]
                          + stream_k_fixup_seconds(tiles, config.block_m, config.block_n, device.cores, device,
                                                   weight_tiles=weight_tiles))
            # Stream-K evens out the last wave of a grid of whole tiles; over fewer tiles than
            # cores every core runs slices of tiles that it must fix up, and its time per work
            # unit, measured over several waves, no longer holds (an H200 ran 128x256 stream-K
            # over 16 tiles in 66 us where the unit time gave 24 us).
            costs[row][tiles < device.cores] = np.inf
            continue
        # Same arithmetic as `estimate_seconds`, so the plan agrees bit for bit with a
        # brute-force evaluation. A measured time is one wave of resident programs; a
        # persistent grid (one program per core) runs ceil(tiles / cores) such waves.
        programs = tiles * split
        waves = -(-programs // device.cores)
        if persistent:
            measured_time = persistent_map.get(config)
        elif tma:
            measured_time = tma_map.get(config)
        elif split > 1:
            measured_time = split_maps.get(split, {}).get(config)
        else:
            measured_time = measured_map.get(config)
        if measured_time is not None:
            resident = 1 if persistent else programs_per_core(config, dtype, device, weight_tiles=weight_tiles)
            costs[row] = -(-programs // (device.cores * resident)) * measured_time
        else:
            compute, memory = _tile_roofline(config, -(-k // split), dtype, device)
            costs[row] = np.maximum(waves * compute, np.maximum(1.0, programs / device.cores) * memory)
        costs[row] += split_reduce_seconds(-(-starts // config.block_m) * config.block_m, n, split, device, dtype,
                                           weight_tiles=weight_tiles)
    choice = np.argmin(costs, axis=0)
    # Every kernel variant is a kernel of its own: while the plan would use more than MAX_CONFIGS,
    # drop the variant other than a config's plain kernel whose loss slows the token counts it
    # serves least (each token count's relative slowdown, summed: a variant that serves a few
    # counts well can matter more than one that serves many about as well as another kernel),
    # and choose again (at most MAX_CONFIGS candidate configs, so the plain kernels alone fit).
    def variant(i: int) -> tuple[TileConfig, bool, bool, bool, bool]:
        config, persistent, split, stream_k, tma = cands[i]
        return config, persistent, split > 1, stream_k, tma

    widths = np.diff(np.append(starts, m_max + 1))
    while len({variant(i) for i in np.unique(choice)}) > MAX_CONFIGS:
        best = costs[choice, np.arange(len(starts))]
        loss: dict[tuple[TileConfig, bool, bool, bool, bool], float] = {}
        for key in {variant(int(i)) for i in np.unique(choice)}:
            if not any(key[1:]):
                continue
            rows = [row for row in range(len(cands)) if variant(row) == key]
            served = np.isin(choice, rows)
            others = costs[:, served]
            others[rows] = np.inf
            loss[key] = float(np.sum(widths[served] * (others.min(axis=0) / best[served] - 1.0)))
        drop = min(loss, key=lambda key: (loss[key], key))
        for row in range(len(cands)):
            if variant(row) == drop:
                costs[row] = np.inf
        choice = np.argmin(costs, axis=0)
    # Merge consecutive segments with the same choice into pieces.
    change = np.flatnonzero(choice[1:] != choice[:-1]) + 1
    bounds = [0, *change.tolist(), len(starts)]
    pieces = []
    for a, b in zip(bounds, bounds[1:]):
        lo = int(starts[a])
        hi = int(starts[b]) - 1 if b < len(starts) else m_max
        config, persistent, split, stream_k, tma = cands[int(choice[a])]
        pieces.append(PlanPiece(lo, hi, config, persistent, split, stream_k, tma))
    return TilePlan(n, k, dtype, device.name, m_min, m_max, tuple(pieces))


def clear_plan_cache() -> None:
    """Forget every plan `build_tile_plan` has built (benchmarks time a fresh build)."""
    _build_tile_plan_cached.cache_clear()


def build_tile_plan(
    n: int,
    k: int,
    dtype: Any,
    *,
    m_min: int = 1,
    m_max: int,
    device: DeviceInfo,
    measured: MeasuredArg = None,
    measured_persistent: MeasuredArg = None,
    weight_tiles: int = 1,
    split_variants: bool = True,
    measured_split: Mapping[int, MeasuredArg] | None = None,
    measured_stream_k: MeasuredArg = None,
    measured_tma: MeasuredArg = None,
) -> TilePlan:
    """The tile plan for an (M x k) @ (k x n) GEMM over every integer M in [m_min, m_max].

    Each M gets the candidate config (see `candidate_configs`) of least `estimate_seconds`;
    ties go to the larger block_m (then larger block_n, ...). Adjacent M with the same choice
    are merged into `PlanPiece`s. `measured` (a mapping or (config, seconds) pairs) gives
    measured per-tile times that replace the model for those configs; configs that are not
    candidates are ignored. `measured_persistent` gives measured per-tile times of configs'
    persistent kernel variant: a piece runs persistent only where that time wins. The plan is exact for every M (the costs are piecewise constant
    between multiples of the smallest block_m, evaluated with numpy) and is cached, so
    building it again with equal arguments returns the same object. `weight_tiles=2` plans a
    fused SwiGLU (see `candidate_configs`).

    On GPUs a piece may split each tile's K range over `split_k` programs (factors from
    `split_k_factors`, costed by `estimate_seconds` with the reduce kernel) where that is
    cheaper, as when a few hundred tokens leave most SMs idle. In a measured plan, a split runs
    only where `measured_split` ({split_k: per-program times of the split kernel}) measured it;
    `split_variants=False` plans unsplit kernels only (for kernels without split-K or stream-K
    variants). `measured_stream_k` gives configs' measured stream-K time per work unit (one
    BLOCK_K step of one tile): a piece runs stream-K only where that, costed by
    `estimate_seconds(..., stream_k=True)`, wins (GPUs only). `measured_tma` gives configs'
    measured per-tile times with TMA operand loads: on GPUs, for 16-bit operands whose rows TMA
    can read (`tma_rows_aligned`), a piece runs TMA where that time wins. Every kernel variant
    counts as a kernel of its own: a plan never uses more than MAX_CONFIGS.
    """
    _check_positive(n=n, k=k, m_min=m_min, m_max=m_max)
    if m_min > m_max:
        raise ValueError(f"m_min ({m_min}) must be <= m_max ({m_max})")
    return _build_tile_plan_cached(
        int(n), int(k), dtype_name(dtype), int(m_min), int(m_max), device, _measured_items(measured),
        _measured_items(measured_persistent), weight_tiles, split_variants,
        tuple(sorted((int(split), _measured_items(items)) for split, items in (measured_split or {}).items())),
        _measured_items(measured_stream_k),
        _measured_items(measured_tma),
    )


# ---------------------------------------------------------------------------------------------
# token_range: integer bounds of a symbolic token count


def _as_bound(value: Any, *, upper: bool) -> Any:
    """A range endpoint as a sympy number; None / oo / int_oo / inf become -oo or +oo."""
    import sympy

    if value is None:
        return sympy.oo if upper else -sympy.oo
    value = sympy.sympify(value)
    if not value.is_number:
        raise ValueError(f"range bound {value} is not a number")
    as_float = float(value)  # also handles torch's int_oo, whose sympy flags say "finite"
    if math.isinf(as_float):
        return sympy.oo if as_float > 0 else -sympy.oo
    return value


def _mul_bound(a: Any, b: Any) -> Any:
    # 0 * oo is nan in sympy; for interval endpoints the product is 0.
    return 0 if a == 0 or b == 0 else a * b


def _div_bound(a: Any, b: Any) -> Any:
    # b > 0 here. oo / oo keeps the numerator's infinity, which only widens the interval.
    if b.is_infinite:
        return a if a.is_infinite else 0
    return a / b


def _bounds(expr: Any, ranges: Mapping[Any, tuple[Any, Any]]) -> tuple[Any, Any]:
    """(lo, hi) of `expr` by interval arithmetic (each node bounded from its children's bounds)."""
    import sympy

    if expr.is_Number:
        return _as_bound(expr, upper=False), _as_bound(expr, upper=True)
    if expr.is_Symbol:
        if expr in ranges:
            return ranges[expr]
        by_name = {str(s): r for s, r in ranges.items()}
        if str(expr) in by_name:  # same name, different assumptions
            return by_name[str(expr)]
        # Unlisted symbol: only its sympy assumptions bound it.
        if expr.is_positive and expr.is_integer:
            return sympy.Integer(1), sympy.oo
        if expr.is_nonnegative:
            return sympy.Integer(0), sympy.oo
        return -sympy.oo, sympy.oo
    known = (
        expr.is_Add
        or expr.is_Mul
        or (expr.is_Pow and expr.exp.is_Integer)
        or isinstance(expr, (sympy.floor, sympy.ceiling, sympy.Max, sympy.Min))
        or type(expr).__name__ == "FloorDiv"
    )
    if not known:  # bound the whole node with torch's analysis, not its pieces
        return _torch_bounds(expr, ranges)
    args = [_bounds(a, ranges) for a in expr.args]
    if expr.is_Add:
        return sum(lo for lo, _ in args), sum(hi for _, hi in args)
    if expr.is_Mul:
        lo, hi = args[0]
        for blo, bhi in args[1:]:
            prods = [_mul_bound(x, y) for x in (lo, hi) for y in (blo, bhi)]
            lo, hi = min(prods), max(prods)
        return lo, hi
    if expr.is_Pow and expr.exp.is_Integer:
        (blo, bhi), e = args[0], int(expr.exp)
        if e >= 0:
            if e % 2 == 1 or blo >= 0:  # monotone increasing
                return blo**e, bhi**e
            if bhi <= 0:  # even power of a non-positive base: decreasing
                return bhi**e, blo**e
            return sympy.Integer(0), max(blo**e, bhi**e)
        if blo > 0:  # negative power of a positive base: decreasing
            return _div_bound(sympy.Integer(1), bhi**-e), _div_bound(sympy.Integer(1), blo**-e)
    if isinstance(expr, (sympy.floor, sympy.ceiling)):
        (lo, hi), = args
        return expr.func(lo), expr.func(hi)
    if isinstance(expr, (sympy.Max, sympy.Min)):
        pick = max if isinstance(expr, sympy.Max) else min
        return pick(lo for lo, _ in args), pick(hi for _, hi in args)
    if type(expr).__name__ == "FloorDiv" and len(args) == 2 and args[1][0] > 0:
        # torch's shape-environment floor division by a positive divisor.
        (alo, ahi), (blo, bhi) = args
        lo = min(_div_bound(alo, blo), _div_bound(alo, bhi))
        hi = max(_div_bound(ahi, blo), _div_bound(ahi, bhi))
        return sympy.floor(lo), sympy.floor(hi)
    return _torch_bounds(expr, ranges)


def _torch_bounds(expr: Any, ranges: Mapping[Any, tuple[Any, Any]]) -> tuple[Any, Any]:
    """Last resort for nodes the interval rules above do not know (torch's own sympy functions):
    torch's value-range analysis, when available."""
    try:
        from torch.utils._sympy.numbers import int_oo
        from torch.utils._sympy.value_ranges import ValueRanges, bound_sympy

        def conv(v: Any) -> Any:
            return v if v.is_finite else (int_oo if v > 0 else -int_oo)

        vr = {
            s: ValueRanges(conv(lo), conv(hi))
            for s, (lo, hi) in ranges.items()
            if s in expr.free_symbols
        }
        result = bound_sympy(expr, vr)
        return _as_bound(result.lower, upper=False), _as_bound(result.upper, upper=True)
    except Exception as exc:  # noqa: BLE001 - report any failure as "cannot bound"
        raise ValueError(
            f"cannot bound the token count expression {expr} ({type(expr).__name__}) by interval "
            f"arithmetic: {exc}"
        ) from exc


def token_range(
    expr: Any, var_ranges: Mapping[Any, tuple[Any, Any]], max_tokens: int
) -> tuple[int, int]:
    """Integer bounds (lo, hi) of a token count M given as a sympy expression (or an int).

    `expr` is M in terms of shape symbols, e.g. `s0*s1` for a flattened batch x sequence (a
    torch SymInt is accepted too). `var_ranges` maps each symbol (or its name) to (lo, hi); hi
    may be None, `sympy.oo`, torch's `int_oo` or `math.inf` for "unbounded". Bounds come from
    interval arithmetic over the expression tree (Add, Mul, integer Pow, floor/ceiling,
    Max/Min, FloorDiv; torch's value-range analysis for anything else), so they are sound but
    may be loose when a symbol appears twice. The result is clamped to [1, max_tokens]: an
    unbounded hi becomes max_tokens. Raises ValueError when the smallest M exceeds
    max_tokens, or when M can never be >= 1.
    """
    import sympy

    max_tokens = operator.index(max_tokens)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    node = getattr(expr, "node", None)  # torch.SymInt -> its sympy expression
    if node is not None and hasattr(node, "expr"):
        expr = node.expr
    expr = sympy.sympify(expr)
    ranges: dict[Any, tuple[Any, Any]] = {}
    for key, bounds in var_ranges.items():
        sym = key if isinstance(key, sympy.Symbol) else sympy.Symbol(str(key))
        lo_raw, hi_raw = bounds
        lo, hi = _as_bound(lo_raw, upper=False), _as_bound(hi_raw, upper=True)
        if lo == sympy.oo or hi == -sympy.oo or lo > hi:
            raise ValueError(f"invalid range ({lo_raw}, {hi_raw}) for {sym}")
        ranges[sym] = (lo, hi)
    lo, hi = _bounds(expr, ranges)
    # M is an integer: round the real bounds inward.
    lo_int = 1 if lo == -sympy.oo else max(1, int(sympy.ceiling(lo)))
    if lo_int > max_tokens:
        raise ValueError(
            f"the smallest token count of {expr} is {lo_int}, above max_tokens={max_tokens}; "
            f"raise max_tokens to at least {lo_int}"
        )
    hi_int = max_tokens if hi == sympy.oo else min(max_tokens, int(sympy.floor(hi)))
    if hi_int < lo_int:
        raise ValueError(f"token count {expr} is at most {hi} under {dict(ranges)}: never >= 1")
    return lo_int, hi_int
