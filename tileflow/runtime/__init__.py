"""Runtime: runs tileflow's ops on a target — plan lookup, kernel cache, dispatch by M.

Kernels are cached per (target, KernelSpec) for the life of the process; the Triton backend also
caches generated sources on disk. Dispatch picks the plan's config for the call's M and launches
the kernel built for it, so a new token count never compiles anything.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import threading
from pathlib import Path
from typing import Any

import torch

from ..config import current_config
from ..devices import DeviceInfo, detect_device, get_device
from ..gemm_operands import apply_activation, apply_gated_activation, check_operand_kinds, gate_and_up
from ..kernel_spec import KernelSpec, TileConfig, file_stem, is_gated, segment_starts
from ..log import get_logger
from ..targets import CompiledKernel, get_backend, resolve_target
from ..tiles import (
    PlanPiece,
    TilePlan,
    build_tile_plan,
    candidate_configs,
    programs_per_core,
    tile_times_at_depth,
    tma_rows_aligned,
)
from .streams import shared_programs

log = get_logger("runtime")

_KERNELS: dict[tuple[str, KernelSpec], CompiledKernel] = {}
_LOCK = threading.Lock()


def device_for_target(target: str, device_type: str) -> DeviceInfo:
    """The device-table entry whose numbers drive plans for `target` on `device_type` tensors."""
    if target == "triton" and device_type == "cuda":
        return detect_device("cuda")
    if target == "ascend":
        return detect_device("npu") if device_type == "npu" else get_device("Ascend-910B")
    return get_device("cpu")


def gemm_plan(
    n: int,
    k: int,
    dtype: torch.dtype | str,
    target: str,
    device_type: str,
    *,
    m_min: int = 1,
    m_max: int,
    tile_timings: str | None = None,
    persistent_variants: bool = True,
    weight_tiles: int = 1,
    split_variants: bool = True,
) -> TilePlan:
    """The tile plan for a GEMM of width N and depth K over M in [m_min, m_max] on a target.

    `tile_timings` names a JSON file of measured per-tile times (see `load_tile_timings`), or is
    `auto` for the file tileflow ships for the device, if any (`shipped_tile_timings`); the
    entries for this device, dtype, N and K replace the cost model's estimates, and entries of a
    config's persistent or TMA variant let the plan run it so where it measured faster (unless
    `persistent_variants` is False: for kernels that have neither variant). A shape the file
    does not hold takes the times of the shapes it does, carried to its K (`timings_at_shape`).
    `weight_tiles=2` plans a fused SwiGLU (two weight tiles per stage, no 128x256 tile);
    `split_variants=False` leaves split-K and stream-K pieces out (for kernels without them);
    measured stream-K entries let the plan run stream-K where they win.
    """
    from ..kernel_spec import dtype_name

    device = device_for_target(target, device_type)
    measured = _measured_times(n, k, dtype_name(dtype), device, _tile_timings_file(tile_timings, device),
                               persistent_variants=persistent_variants, weight_tiles=weight_tiles,
                               split_variants=split_variants)
    return build_tile_plan(n, k, dtype_name(dtype), m_min=m_min, m_max=m_max, device=device,
                           weight_tiles=weight_tiles, split_variants=split_variants, **measured)


def plan_tile_times(
    n: int,
    k: int,
    dtype: torch.dtype | str,
    target: str,
    device_type: str,
    *,
    tile_timings: str | None,
    weight_tiles: int = 1,
    persistent_variants: bool = True,
    split_variants: bool = True,
) -> str | None:
    """The file whose measured tile times plan this GEMM under `gemm_plan`'s rules, given the
    same arguments (the report names it), or None where the cost model plans it alone."""
    from ..kernel_spec import dtype_name

    device = device_for_target(target, device_type)
    source = _tile_timings_file(tile_timings, device)
    measured = _measured_times(n, k, dtype_name(dtype), device, source, persistent_variants=persistent_variants,
                               weight_tiles=weight_tiles, split_variants=split_variants)
    return source if any(measured.values()) else None


def _tile_timings_file(tile_timings: str | None, device: DeviceInfo) -> str | None:
    """`tile_timings` with `auto` resolved to the file shipped for `device` (or None)."""
    return shipped_tile_timings(device) if tile_timings == "auto" else tile_timings


def _measured_times(n: int, k: int, dtype: str, device: DeviceInfo, tile_timings: str | None, *,
                    persistent_variants: bool, weight_tiles: int, split_variants: bool) -> dict[str, Any]:
    """`build_tile_plan`'s measured-time arguments for this shape from a tile-timings file (all
    empty where the file has none for it). Times are carried from other shapes for plain GEMMs
    only: a fused SwiGLU's tiles carry two weight tiles."""
    found: dict[str, Any] = {"measured": None, "measured_persistent": None, "measured_stream_k": None,
                             "measured_tma": None, "measured_split": {}}
    if not tile_timings:
        return found
    key = (device.name, dtype, int(n), int(k))
    timings = load_tile_timings(tile_timings, device)
    if weight_tiles == 1 and not any(t[:4] == key for t in timings):
        # Cached per file version: eager op calls plan on every call.
        timings = _timings_at_shape_cached(tile_timings, _file_version(Path(tile_timings)), device, *key[1:])
    found["measured"] = timings.get((*key, False, 1, False, False))
    if persistent_variants:  # the padded GEMM's whole-tile variants: persistent grid, TMA loads
        found["measured_persistent"] = timings.get((*key, True, 1, False, False))
        found["measured_tma"] = timings.get((*key, False, 1, False, True))
    if split_variants:
        found["measured_split"] = {t[5]: items for t, items in timings.items()
                                   if t[:5] == (*key, False) and t[5] > 1 and not t[6] and not t[7]}
        found["measured_stream_k"] = timings.get((*key, False, 1, True, False))
    return found


TimingKey = tuple[str, str, int, int, bool, int, bool, bool]

_SHIPPED_TIMINGS = Path(__file__).resolve().parent.parent / "tile_timings"


def shipped_tile_timings(device: DeviceInfo) -> str | None:
    """The tile times tileflow ships for `device` (`tileflow/tile_timings/<name>.json`, measured
    with `bench/gemm.py --measure-tiles` on such a device), or None where it ships none."""
    path = _SHIPPED_TIMINGS / f"{device.name}.json"
    return str(path) if path.is_file() else None


def _file_version(path: Path) -> tuple[int, int]:
    """(modification time in ns, size) of a file: a cache key that changes when it is rewritten,
    also when two writes fall within one tick of the file system's clock but differ in length."""
    st = path.stat()
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=256)
def _timings_at_shape_cached(path: str, version: tuple[int, int], device: DeviceInfo, dtype: str, n: int, k: int
                             ) -> dict[TimingKey, tuple[tuple[TileConfig, float], ...]]:
    # `version` is only part of the cache key, so an edited file is carried again.
    return timings_at_shape(load_tile_timings(path, device), device, dtype, n, k)


def timings_at_shape(
    timings: dict[TimingKey, tuple[tuple[TileConfig, float], ...]], device: DeviceInfo, dtype: str, n: int, k: int,
) -> dict[TimingKey, tuple[tuple[TileConfig, float], ...]]:
    """Tile times for an (N, K) shape the file does not hold, from the shapes it does (same
    device and dtype): each variant's per-config times carried to depth `k` by
    `tile_times_at_depth` (a stream-K entry, one BLOCK_K step, as measured). So a few measured
    shapes plan every GEMM of a model. Empty (the cost model plans) unless the plain kernels'
    times cover every candidate config of the shape (a plan never weighs a measured config
    against a modeled one) and `k` lies between the depths they were measured at (no line is
    carried past its samples). For plain GEMMs only: a fused SwiGLU's tiles carry two weight
    tiles."""
    samples: dict[tuple[bool, int, bool, bool], dict[TileConfig, list[tuple[int, float]]]] = {}
    for (dev, dt, _, depth, *variant), items in timings.items():
        if (dev, dt) == (device.name, dtype):
            per_config = samples.setdefault(tuple(variant), {})  # type: ignore[arg-type]
            for config, seconds in items:
                per_config.setdefault(config, []).append((depth, seconds))
    candidates = set(candidate_configs(n, k, dtype, device))
    plain = samples.get((False, 1, False, False), {})
    if not candidates or not candidates <= set(plain):
        return {}
    depths = [depth for config in candidates for depth, _ in plain[config]]
    if not min(depths) <= k <= max(depths):
        return {}  # a line carried past its samples is no measurement: the model plans
    out: dict[TimingKey, tuple[tuple[TileConfig, float], ...]] = {}
    for variant, per_config in samples.items():
        times = tile_times_at_depth({c: v for c, v in per_config.items() if c in candidates}, k, per_step=variant[2])
        if times:
            out[(device.name, dtype, n, k, *variant)] = tuple(sorted(times.items()))
    log.debug("tile times for %dx%d (%s) carried from the measured shapes %s", n, k, dtype,
              sorted({(t[2], t[3]) for t in timings if t[:2] == (device.name, dtype)}))
    return out


def load_tile_timings(path: str, device: DeviceInfo | None = None) -> dict[TimingKey, tuple[tuple[TileConfig, float], ...]]:
    """Read measured per-tile times: a JSON list of
    `{"device", "dtype", "n", "k", "tile": {TileConfig fields}, "tile_seconds"[, "m"][, "persistent"][, "split_k"][, "stream_k"][, "tma"]}`
    entries, grouped by (device, dtype, n, k, persistent, split_k, stream_k, tma). `tile_seconds`
    is the measured time over the waves of one program per core (`bench/gemm.py
    --measure-tiles`); for a split-K kernel (`split_k` > 1) over waves of its programs (a tile's
    K part each), its reduce kernel left out; for a stream-K kernel, the time of one work unit
    (one BLOCK_K step of one tile), its fixup left out.

    Plans cost a measured kernel per wave of the programs a core holds at once
    (`tiles.programs_per_core`). Given the `device` the times were taken on, each plain, TMA and
    split entry of that device that records its measured `m` is turned into such a wave's time:
    its measured time, ceil(P / cores) * `tile_seconds` for its P programs, over
    ceil(P / (cores * programs_per_core)) waves. An entry without `m` (with a warning where
    programs share a core) and a persistent one (one program per core) are taken as they stand.
    Other fields (the bench's `one_wave_m`, `one_wave_seconds`) are not read. Cached per file
    path, modification time, size and device."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"tileflow option 'tile_timings': no file at {str(path)!r}; write one with "
                         "`python bench/gemm.py --measure-tiles FILE` on the device, or give 'auto' (the times tileflow "
                         "ships for the device) or None (the cost model)")
    return _load_tile_timings(str(p), _file_version(p), device)


def _resident_wave_seconds(entry: dict[str, Any], config: TileConfig, seconds: float, device: DeviceInfo | None) -> float:
    """An entry's time per wave of resident programs (see `load_tile_timings`)."""
    if (device is None or entry["device"] != device.name or entry.get("persistent", False)
            or entry.get("stream_k", False)):
        return seconds
    resident = programs_per_core(config, str(entry["dtype"]), device)
    if "m" not in entry:
        if resident > 1:
            log.warning("tile time of %s at %dx%d has no measured m: taken as the time of a wave of %d resident "
                        "programs per SM (bench/gemm.py --measure-tiles records m)", config.name, int(entry["n"]),
                        int(entry["k"]), resident)
        return seconds
    programs = (-(-int(entry["m"]) // config.block_m) * -(-int(entry["n"]) // config.block_n)
                * int(entry.get("split_k", 1)))
    return seconds * -(-programs // device.cores) / -(-programs // (device.cores * resident))


def _whole(entry: dict[str, Any], name: str, default: int | None = None) -> int:
    """An entry's integer field, >= 1 (`int()` would truncate 4096.5 and take `true` as 1, and a
    zero N or split turned into a division by zero when waves were counted)."""
    value = entry[name] if default is None else entry.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"an entry's {name!r} must be an integer >= 1, got {value!r} (entry {entry})")
    return value


def _flag(entry: dict[str, Any], name: str) -> bool:
    """An entry's boolean field (`bool("false")` is True: a quoted false made a plain entry
    persistent)."""
    value = entry.get(name, False)
    if not isinstance(value, bool):
        raise ValueError(f"an entry's {name!r} must be true or false, got {value!r} (entry {entry})")
    return value


def _number(entry: dict[str, Any], name: str) -> float:
    """An entry's number field (not a boolean or a string of digits)."""
    value = entry[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"an entry's {name!r} must be a number, got {value!r} (entry {entry})")
    return float(value)


@functools.lru_cache(maxsize=8)
def _load_tile_timings(path: str, version: tuple[int, int], device: DeviceInfo | None
                       ) -> dict[TimingKey, tuple[tuple[TileConfig, float], ...]]:
    # `version` is only part of the cache key, so an edited file is read again.
    try:
        entries = json.loads(Path(path).read_text())
        if not isinstance(entries, list):
            raise TypeError(f"the file holds a JSON {type(entries).__name__}")
        grouped: dict[TimingKey, list[tuple[TileConfig, float]]] = {}
        for e in entries:
            key = (str(e["device"]), str(e["dtype"]), _whole(e, "n"), _whole(e, "k"), _flag(e, "persistent"),
                   _whole(e, "split_k", 1), _flag(e, "stream_k"), _flag(e, "tma"))
            seconds = _number(e, "tile_seconds")
            if not (math.isfinite(seconds) and seconds > 0):
                raise ValueError(f"a tile time must be positive and finite, got {seconds} (entry {e})")
            if "m" in e and (isinstance(e["m"], bool) or not isinstance(e["m"], int) or e["m"] < 1):
                raise ValueError(f"an entry's measured m must be >= 1, got {e['m']!r} (entry {e})")
            config = TileConfig.from_dict(e["tile"])
            if any(c == config for c, _ in grouped.get(key, ())):
                # Kept both, the plan would take whichever came last in the file (carried to another
                # shape, both would be fitted): a merged or edited file must say which it means.
                raise ValueError(f"{config.name} is timed twice for the same shape and variant (entry {e})")
            grouped.setdefault(key, []).append((config, _resident_wave_seconds(e, config, seconds, device)))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"tile_timings file {path!r} is malformed ({type(exc).__name__}: {exc}); expected a JSON list of "
                         "{device, dtype, n, k, tile, tile_seconds} entries") from exc
    return {key: tuple(items) for key, items in grouped.items()}


def encode_plan(plan: TilePlan) -> str:
    """A plan as the compact JSON text a `padded_gemm` node carries."""
    return json.dumps(plan.to_dict(), separators=(",", ":"), sort_keys=True)


@functools.lru_cache(maxsize=1024)
def decode_plan(text: str) -> TilePlan:
    """Inverse of `encode_plan` (cached: nodes carry the same text on every call)."""
    try:
        return TilePlan.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed tile plan in a padded_gemm node ({exc}); recompile the model") from exc


def get_kernel(target: str, spec: KernelSpec, artifact_dir: Path | None = None) -> CompiledKernel:
    """The built kernel for `spec` on `target` (built on first use, then cached)."""
    key = (target, spec)
    kernel = _KERNELS.get(key)
    if kernel is None:
        backend = get_backend(target)
        ok, why = backend.available()
        if not ok:
            raise RuntimeError(f"target {target!r} cannot run here: {why}")
        with _LOCK:
            kernel = _KERNELS.get(key)
            if kernel is None:
                kernel = backend.build(spec, artifact_dir)
                _KERNELS[key] = kernel
                log.debug("built %s for %s", spec.name, target)
    return kernel


def save_kernel_source(kernel: CompiledKernel, artifact_dir: Path) -> Path:
    """Write a kernel's source into an artifact folder (a graph's `debug_dir/.../kernels`), even
    when the kernel was built earlier for another graph; returns the file's path."""
    artifact_dir.mkdir(parents=True, exist_ok=True)
    name = Path(kernel.source_path).name if kernel.source_path else f"{file_stem(kernel.spec.name)}.{kernel.target}.py"
    path = artifact_dir / name
    if not path.exists() or path.read_text() != kernel.source:
        path.write_text(kernel.source)
    return path


def compiled_kernels(op: str | None = None) -> list[CompiledKernel]:
    """Every kernel built in this process (optionally only those of one op family)."""
    # A snapshot (`dict.copy` runs in C, under the GIL): another thread's build adds to the cache
    # while this walks it, which raised `dictionary changed size during iteration`.
    return [k for (_, spec), k in _KERNELS.copy().items() if op is None or spec.op == op]


# (n, k, m_min, m_max, above): one warning per plan and side; keyed by M, a server past
# max_tokens warned at almost every step and kept every M.
_WARNED_RANGE: set[tuple[int, int, int, int, bool]] = set()


def _select_piece(tile_plan: TilePlan, m: int, op: str, grouped: tuple[int, int] | None = None) -> PlanPiece:
    """The plan's piece for dispatch key `m`; outside the plan's range, the nearest piece.
    `grouped` is a grouped GEMM's (M, E): its key is not M but the rows per expert, ceil(M / E),
    and the warning says so."""
    if m > tile_plan.m_max or m < tile_plan.m_min:
        # The plan covers the compile-time range; outside it the nearest piece is still correct.
        key = (tile_plan.n, tile_plan.k, tile_plan.m_min, tile_plan.m_max, m > tile_plan.m_max)
        if key not in _WARNED_RANGE:
            _WARNED_RANGE.add(key)
            log.warning(
                "%s %s is outside its plan's range [%d, %d]; using the nearest config "
                "(raise max_tokens to plan for it; not said again for this plan)", op,
                f"rows per expert ceil(M / E) = ceil({grouped[0]} / {grouped[1]}) = {m}" if grouped else f"M={m}",
                tile_plan.m_min, tile_plan.m_max,
            )
    return tile_plan.piece_for(min(max(m, tile_plan.m_min), tile_plan.m_max))


def run_padded_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    out_dtype: torch.dtype,
    plan: str,
    target: str,
    weight_up: torch.Tensor | None = None,
    bias_up: torch.Tensor | None = None,
    round_first: bool = False,
    more_weights: tuple[torch.Tensor, ...] | list[torch.Tensor] = (),
    more_biases: tuple[torch.Tensor, ...] | list[torch.Tensor] = (),
) -> torch.Tensor:
    """Execute `tileflow::padded_gemm`: pick the plan's config for this M and launch its kernel.

    `plan` is the node's encoded plan ("" for eager calls: built for the current config's
    `max_tokens`); `target` is the node's target ("" for eager calls: the current config's).
    `round_first` rounds the result to x's dtype before the cast to `out_dtype`. With
    `more_weights` (sibling GEMMs on x: N segments, `weight` the first), one kernel computes
    them all where `segments_in_one_kernel` says it can, else one kernel per segment writes its
    columns of the output.
    """
    from ..lower import gemm_spec

    config = None if (target and plan) else current_config()
    target = resolve_target(target or config.target, x.device)
    separate_up = weight_up is not None
    if more_weights and any(w.shape[0] == 0 for w in (weight, *more_weights)):
        weight, bias, more_weights, more_biases = _without_empty_segments(weight, bias, more_weights, more_biases)
    widths = (weight.shape[0], *(w.shape[0] for w in more_weights)) if more_weights else None
    n = weight.shape[0] // 2 if is_gated(activation) and not separate_up else sum(widths or (weight.shape[0],))
    k = weight.shape[1]
    m = x.shape[0]
    if n == 0 or k == 0 or m == 0:
        # No kernel checks these operands: the rules it would apply, here.
        check_operand_kinds("padded_gemm", x, {"weight": weight, "weight_up": weight_up,
                                               **{f"weight of segment {i}": w for i, w in enumerate(more_weights, 1)}},
                            {"bias": bias, "bias_up": bias_up, "residual": residual,
                             **{f"bias of segment {i}": b for i, b in enumerate(more_biases, 1)}}, out_dtype)
    if n == 0 or k == 0:
        if more_weights:  # empty: nothing to copy
            weight = torch.cat([weight, *more_weights])
            bias = None if bias is None else torch.cat([bias, *more_biases])
        return _gemm_of_empty_dim(x, weight, bias, residual, activation, out_dtype, weight_up, bias_up, round_first)
    weight_tiles = 2 if is_gated(activation) else 1
    if plan:
        tile_plan = decode_plan(plan)
    else:
        def plan_of(width: int) -> TilePlan:
            return gemm_plan(width, k, x.dtype, target, x.device.type, m_max=config.max_tokens,
                             tile_timings=config.tile_timings, weight_tiles=weight_tiles)

        tile_plan = plan_of(n)
        if widths is not None:
            tile_plan = dataclasses.replace(tile_plan, segment_plans=tuple(plan_of(width) for width in widths))
    if m == 0:
        return x.new_empty((0, n), dtype=out_dtype)
    piece = _select_piece(tile_plan, m, "padded_gemm")

    def launch(piece: PlanPiece, width: int, *args: Any, segments: tuple[int, ...] | None = None,
               **kwargs: Any) -> torch.Tensor:
        kernel = get_kernel(target, gemm_spec(
            dtype=x.dtype, out_dtype=out_dtype, n=width, k=k, tile=piece.config, activation=activation,
            has_bias=bias is not None, has_residual=residual is not None, persistent=piece.persistent,
            split_k=piece.split_k > 1, stream_k=piece.stream_k, tma=piece.tma, round_first=round_first,
            segments=segments,
        ))
        if piece.split_k > 1:
            kwargs["split_k"] = piece.split_k
        if piece.persistent or piece.stream_k:
            # A persistent grid can take a share of the device (nano-batching's SM partition).
            programs = shared_programs(x.device)
            if programs is not None:
                kwargs["num_programs"] = programs
        return kernel(x, *args, **kwargs)

    if widths is None:
        return launch(piece, n, weight, bias, residual, weight_up=weight_up, bias_up=bias_up)
    if (segments_in_one_kernel(target, piece.config, widths)
            and all(w.stride() == weight.stride() for w in more_weights)):
        return launch(piece, n, weight, bias, residual, segments=widths, more_weights=tuple(more_weights),
                      more_biases=tuple(more_biases))
    # One launch per segment, each by its own plan's piece for this M (the fused piece where the
    # plan has none), writing its columns of one output (no copy, no concatenation).
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    biases = (bias, *more_biases) if bias is not None else (None,) * len(widths)
    pieces = ([_select_piece(p, m, "padded_gemm") for p in tile_plan.segment_plans] if tile_plan.segment_plans
              else [segment_piece(piece, width, k, x.dtype) for width in widths])
    for w, b, start, width, own in zip((weight, *more_weights), biases, segment_starts(widths), widths, pieces):
        if not width:
            continue  # an empty segment: no columns to write
        columns = slice(start, start + width)
        part = None if residual is None else residual[:, columns]
        if target == "ascend":  # its kernels write contiguous rows only: computed apart, copied in
            out[:, columns] = launch(own, width, w, b, part)
        else:
            launch(own, width, w, b, part, out=out[:, columns])
    return out


@functools.lru_cache(maxsize=None)
def _reads_segments(target: str) -> bool:
    """Whether `target`'s padded GEMM kernels read N segments from several weights."""
    return bool(getattr(get_backend(target), "gemm_segments", False))


def segments_in_one_kernel(target: str, config: TileConfig, widths: tuple[int, ...]) -> bool:
    """Whether one kernel of tile `config` computes sibling GEMMs of these output widths (N
    segments, none empty): the target's kernels read several weights, and the tile's BLOCK_N
    divides every segment's first column, so each output tile reads one weight. (On a TMA
    piece that also makes every segment's rows a descriptor's where the whole N's are: all but
    the last are whole tiles wide.) Otherwise each segment runs by itself (its own plan's
    piece, or `segment_piece`)."""
    return (_reads_segments(target) and min(widths) > 0
            and all(start % config.block_n == 0 for start in segment_starts(widths)))


def segment_piece(piece: PlanPiece, width: int, k: int, dtype: Any) -> PlanPiece:
    """The piece one N segment of `width` runs by itself when its plan has no plan per segment:
    the GEMM's own, without TMA where the segment's rows cannot be a descriptor's (the whole
    N's could)."""
    return piece if not piece.tma or tma_rows_aligned(width, k, dtype) else dataclasses.replace(piece, tma=False)


def _without_empty_segments(weight: torch.Tensor, bias: torch.Tensor | None, more_weights: Any,
                            more_biases: Any) -> tuple[torch.Tensor, torch.Tensor | None, list, list]:
    """Sibling weights (and biases) without those of no rows, which have no columns and no plan
    of their own; the first alone when every one is empty (an empty GEMM all the same)."""
    biases = [bias, *more_biases] if bias is not None else [None] * (1 + len(more_weights))
    pairs = [(w, b) for w, b in zip([weight, *more_weights], biases) if w.shape[0]] or [(weight, bias)]
    (weight, bias), more = pairs[0], pairs[1:]
    return weight, bias, [w for w, _ in more], [b for _, b in more] if bias is not None else []


def _gemm_of_empty_dim(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    out_dtype: torch.dtype,
    weight_up: torch.Tensor | None,
    bias_up: torch.Tensor | None,
    round_first: bool = False,
) -> torch.Tensor:
    """`padded_gemm` with N = 0 or K = 0, by `F.linear` in the accumulator's dtype: no tile plan
    covers an empty dimension, and there is nothing to tile (an empty result, or the epilogue of
    zero products)."""
    f = torch.nn.functional
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32

    def linear(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return f.linear(x.to(acc_dtype), w.to(acc_dtype), None if b is None else b.to(acc_dtype))

    if is_gated(activation) and weight_up is None and bias_up is not None:
        bias = torch.cat([bias, bias_up])  # a stacked [2N, K] weight with the gate's and up's biases apart
    acc = linear(weight, bias)
    if is_gated(activation):
        n = acc.shape[1] if weight_up is not None else acc.shape[1] // 2
        gate, up = (acc, linear(weight_up, bias_up)) if weight_up is not None else (acc[:, :n], acc[:, n:])
        acc = apply_gated_activation(gate, up, activation)
    else:
        acc = apply_activation(acc, activation)
    if residual is not None:
        acc = acc + residual.to(acc_dtype)
    if round_first:
        acc = acc.to(x.dtype)  # the kernels' `round` (a no-op for float32 / float64)
    return acc.to(out_dtype)


def expected_group_rows(m: int, experts: int) -> int:
    """The dispatch key of a grouped GEMM over `m` rows and `experts` groups: ceil(M / E), the
    rows an expert gets when the routing is balanced (at least 1).

    The group sizes themselves live on the device (the offsets tensor) and reading them would
    cost a device->host sync per call, so the tile is chosen from what the host knows: M and E.
    """
    return max(1, -(-int(m) // int(experts)))


def grouped_gemm_plan(
    n: int,
    k: int,
    experts: int,
    dtype: torch.dtype | str,
    target: str,
    device_type: str,
    *,
    m_min: int = 1,
    m_max: int,
    tile_timings: str | None = None,
    weight_tiles: int = 1,
) -> TilePlan:
    """The tile plan of a grouped GEMM whose total row count M lies in [m_min, m_max].

    The same plan machinery as `gemm_plan` (cost model, at most 6 configs), over the range of the
    dispatch key `expected_group_rows(M, E)`: [ceil(m_min / E), ceil(m_max / E)]. Each piece thus
    answers "the best tile for one expert's GEMM of that many rows"; the cost model does not add
    the E-fold number of tiles of the whole launch to its wave count.
    """
    return gemm_plan(
        n, k, dtype, target, device_type, m_min=expected_group_rows(m_min, experts),
        m_max=expected_group_rows(m_max, experts), tile_timings=tile_timings, persistent_variants=False,
        weight_tiles=weight_tiles, split_variants=False,
    )


def run_grouped_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor | None,
    activation: str,
    out_dtype: torch.dtype,
    plan: str,
    target: str,
    bias: torch.Tensor | None = None,
    *,
    clamp: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Execute `tileflow::grouped_gemm`: pick the plan's config for ceil(M / E) rows per expert and
    launch its kernel (one launch for all experts; the offsets stay on the device).

    `plan` is the node's encoded plan ("" for eager calls: built for the current config's
    `max_tokens`); `target` is the node's target ("" for eager calls: the current config's).
    Without offsets (x [E, T, K], the batched form), expert e's rows are x[e]: the same kernel
    runs over x's rows with offsets T, 2T, ..., ET, and the result is [E, T, N]. `bias` [E, rows
    of weight[e]] adds row e to expert e's rows. `clamp`: `clamped_swiglu`'s (alpha, limit).
    """
    if offsets is None:
        e, t = x.shape[0], x.shape[1]
        offsets = torch.arange(1, e + 1, dtype=torch.int32, device=x.device) * t
        out = run_grouped_gemm(x.reshape(e * t, x.shape[2]), weight, offsets, activation, out_dtype, plan, target, bias,
                               clamp=clamp)
        return out.view(e, t, out.shape[1])
    from ..lower import grouped_gemm_spec

    config = None if (target and plan) else current_config()
    target = resolve_target(target or config.target, x.device)
    e, rows, k = (int(d) for d in weight.shape)
    n = rows // 2 if is_gated(activation) else rows
    m = x.shape[0]
    if n == 0 or k == 0 or m == 0 or e == 0:
        check_operand_kinds("grouped_gemm", x, {"weight": weight}, {"bias": bias}, out_dtype)
    if e == 0:  # no expert, so no row (the offsets cover M): an empty result
        return x.new_empty((m, n), dtype=out_dtype)
    if n == 0 or k == 0:
        # No tile plan covers an empty dimension: each row is its expert's epilogue of zero
        # products, its bias row through the activation (zero without a bias: every activation's
        # of zero is zero).
        if bias is None or n == 0:
            return x.new_zeros((m, n), dtype=out_dtype)
        return _grouped_bias_rows(offsets, bias, m, n, activation, out_dtype, clamp)
    # An eager call's plan covers E x max_tokens rows, max_tokens rows per expert: a token reaches
    # an expert at most once (top-k routing hands the experts k x T rows for T tokens; a batched
    # call, each expert all T), so max_tokens caps the rows per expert, the plan's key. (Planned
    # for max_tokens rows in all, a top-2 call over 8 experts past half of max_tokens tokens
    # warned and took the nearest piece; on the shipped device entries the narrower range's
    # pieces are the wider one's, checked for Mixtral's and gpt-oss's shapes.)
    tile_plan = decode_plan(plan) if plan else grouped_gemm_plan(
        n, k, e, x.dtype, target, x.device.type, m_max=config.max_tokens * e, tile_timings=config.tile_timings,
        weight_tiles=2 if is_gated(activation) else 1,
    )
    if m == 0:
        return x.new_empty((0, n), dtype=out_dtype)
    tile = _select_piece(tile_plan, expected_group_rows(m, e), "grouped_gemm", (m, e)).config
    spec = grouped_gemm_spec(dtype=x.dtype, out_dtype=out_dtype, n=n, k=k, experts=e, tile=tile, activation=activation,
                             has_bias=bias is not None, clamp=clamp)
    return get_kernel(target, spec)(x, weight, offsets, bias)


def _grouped_bias_rows(offsets: torch.Tensor, bias: torch.Tensor, m: int, n: int, activation: str,
                       out_dtype: torch.dtype, clamp: tuple[float, float] | None) -> torch.Tensor:
    """A grouped GEMM with K = 0: each row is its expert's `bias` row ([E, N], or [E, 2N] for a
    gated activation) through the epilogue. The expert of each row is found on the device (rows
    past offsets[-1] take the last expert's; nothing promises them a value)."""
    rows = torch.arange(m, device=offsets.device, dtype=offsets.dtype)
    experts = torch.searchsorted(offsets, rows, right=True).clamp(max=bias.shape[0] - 1)
    acc = bias.to(torch.float64 if bias.dtype == torch.float64 else torch.float32)[experts]
    if is_gated(activation):
        acc = apply_gated_activation(*gate_and_up(acc, activation), activation, clamp)
    else:
        acc = apply_activation(acc, activation)
    return acc.to(out_dtype)
