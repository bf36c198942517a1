"""Meta-attention task tables: XY-Serve's Token-Table, computed on the host.

One meta-attention launch serves a whole mixed batch — prefill, chunked prefill over a cached
prefix, decode and speculative verify sequences — with a single matmul-softmax-matmul kernel.
The kernel itself knows nothing about the batch: a *task table* built here from the batch
metadata (query counts and KV lengths, plain host-side ints) tells each program of a static
grid which tiles to compute, so a new batch composition never means a new kernel.

A task is (sequence, KV head, a tile of up to `block_q` consecutive query positions, a KV range).
The `R = Hq // Hkv` query heads that share a KV head are packed into the tile's rows
(`row r -> query position q_start + r // R, head g * R + r % R`), so decode tiles, which have a
single query position, still fill `R` rows of the matmul. Tiles whose visible KV range is long
while the batch has few tiles are split along KV (split-KV); their partial results are merged
with the log-sum-exp rule (see `tileflow.backends.reference.attention.merge_partials`).

Tasks are sorted by cost (longest first; equal costs later query rows first) and dealt in
symmetric round-robin over the programs (0, 1, .., P-1, P-1, .., 1, 0, 0, 1, ..), which keeps the
per-program work within a small factor of the average on realistic serving batches.

The full contract (field layouts shared with the Triton kernel) is in the module docstrings below
and in `TaskTable`. `check_metadata` validates the tensors the varlen attention op takes.
"""

from __future__ import annotations

import functools
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Union

import numpy as np
import torch

from .transfers import record_upload, to_device, wait_for_upload

__all__ = [
    "TASK_COLUMNS",
    "MERGE_COLUMNS",
    "TaskTable",
    "build_task_table",
    "check_metadata",
]

# Column layout of `TaskTable.tasks` (shared with the kernels: do not reorder).
TASK_COLUMNS: tuple[str, ...] = (
    "seq", "kv_head", "q_start", "q_rows", "kv_start", "kv_end", "slot", "cost",
)
# Column layout of `TaskTable.merges`.
MERGE_COLUMNS: tuple[str, ...] = (
    "seq", "kv_head", "q_start", "q_rows", "first_slot", "num_slots",
)

# Automatic split-KV chunks are a multiple of this many positions ...
_SPLIT_QUANTUM = 64
# ... and at least this long, so that each chunk amortizes the extra partial write and merge.
_MIN_AUTO_CHUNK = 256
# A deal whose busiest program carries at most this times the average is kept without more splits.
_BALANCED = 1.25

IntsLike = Union[Sequence[int], torch.Tensor, np.ndarray]


@dataclass
class TaskTable:
    """The host-computed schedule of one meta-attention launch.

    Fields (torch int32 CPU tensors unless said otherwise; layouts are a contract with the
    kernels, see `TASK_COLUMNS` / `MERGE_COLUMNS`):

    - ``tasks`` ``[T, 8]``: ``seq, kv_head, q_start, q_rows, kv_start, kv_end, slot, cost``.
      ``q_start`` is relative to the sequence's first query row; ``[kv_start, kv_end)`` are the
      KV positions the task reads, clipped to what the tile's rows can see; ``slot == -1`` means
      the task covers its tile's whole KV range and writes the output directly, ``slot >= 0`` a
      split-KV task writing workspace slot ``slot``; ``cost = q_rows * (kv_end - kv_start)``.
    - ``program_offsets`` ``[P + 1]`` / ``program_tasks`` ``[T]``: program ``p`` runs
      ``program_tasks[program_offsets[p]:program_offsets[p + 1]]`` in that order.
    - ``merges`` ``[G, 6]``: ``seq, kv_head, q_start, q_rows, first_slot, num_slots`` for each
      split tile.
    - ``num_slots``: workspace slots needed (``partial_out [num_slots, block_q * R, D]``, the
      normalized partial outputs, and ``partial_stats [num_slots, 2, block_q * R]``, each row's
      max score in natural-log units (``-inf``: no visible key) and its sum of exp against that
      max; float32, rows laid out as tile rows).
    - ``block_q``, ``num_q_heads``, ``num_kv_heads``: copies of the build arguments.

    Additive fields (not read by the kernels): ``cu_seqlens_q`` ``[S + 1]`` and ``seqlens_kv``
    ``[S]``, host copies of the metadata the table was built from, so that a merge can map a
    tile back to global query rows without being handed the metadata again; ``causal`` and
    ``sliding_window``, the masking the KV ranges were clipped for, so an executor can refuse to
    run the table under different masking; ``uploaded``, the event after the copy ``to()`` made
    to a CUDA device (see ``ready_on_current_stream``).
    """

    tasks: torch.Tensor
    program_offsets: torch.Tensor
    program_tasks: torch.Tensor
    merges: torch.Tensor
    num_slots: int
    block_q: int
    num_q_heads: int
    num_kv_heads: int
    cu_seqlens_q: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.int32))
    seqlens_kv: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32))
    causal: bool = True
    sliding_window: int | None = None
    uploaded: Any = None  # the event after `to()`'s copy to a CUDA device (None: nothing to wait for)

    @functools.cached_property
    def host_extent(self) -> tuple[int, int] | None:
        """(longest query run, longest KV length) of the batch, from the host copies of its
        metadata; None without them (empty, or not on the host). Computed once per table: a
        launch that reads a bias checks its extent against them on every call."""
        cu, lens = self.cu_seqlens_q, self.seqlens_kv
        if cu.device.type != "cpu" or lens.device.type != "cpu" or lens.numel() == 0 or cu.numel() != lens.numel() + 1:
            return None
        return int((cu[1:] - cu[:-1]).max()), int(lens.max())

    @property
    def num_programs(self) -> int:
        """P, the size of the static grid the table was dealt over."""
        return int(self.program_offsets.numel()) - 1

    @property
    def num_tasks(self) -> int:
        """T, the number of tasks (tiles plus extra split-KV chunks)."""
        return int(self.tasks.shape[0])

    @property
    def group_size(self) -> int:
        """R = Hq // Hkv, the query heads packed into each tile's rows."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def tile_rows(self) -> int:
        """Rows of one tile (``block_q * R``): the row dimension of the split-KV workspace."""
        return self.block_q * self.group_size

    def to(self, device: torch.device | str) -> "TaskTable":
        """The table with the tensors the kernels read (tasks, program lists, merges) on `device`;
        the host copies of the metadata stay on the host. The copy does not wait for the device
        (`to_device`), so building a table never stalls the host behind queued kernels."""
        tasks, offsets, order, merges = to_device(device, self.tasks, self.program_offsets, self.program_tasks,
                                                  self.merges)
        return replace(self, tasks=tasks, program_offsets=offsets, program_tasks=order, merges=merges,
                       uploaded=record_upload(device))

    def ready_on_current_stream(self) -> None:
        """Call before launching kernels that read the table on the current stream: a table
        `to()` uploaded (and a cache kept) may be used on another stream than the one its copy
        was queued on; this stream then waits for the copy (see `wait_for_upload`)."""
        wait_for_upload(self.uploaded, self.tasks, self.program_offsets, self.program_tasks, self.merges)

    def workspace_shapes(self, head_dim: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Shapes of ``(partial_out, partial_stats)`` the caller allocates for split-KV tasks."""
        return (self.num_slots, self.tile_rows, head_dim), (self.num_slots, 2, self.tile_rows)

    def program_costs(self) -> np.ndarray:
        """Total task cost per program (int64 numpy array of length P), of a table on any device."""
        cost = self.tasks[:, 7].cpu().numpy().astype(np.int64)
        prog = np.repeat(np.arange(self.num_programs), np.diff(self.program_offsets.cpu().numpy()))
        out = np.zeros(self.num_programs, dtype=np.int64)
        np.add.at(out, prog, cost[self.program_tasks.cpu().numpy()])
        return out

    def to_summary(self) -> dict[str, Any]:
        """Counts and load balance of the table, for reports (JSON-serializable)."""
        costs = self.program_costs()
        total = int(costs.sum())
        num_programs = self.num_programs
        avg = total / num_programs if num_programs else 0.0
        max_cost = int(costs.max()) if costs.size else 0
        slots = self.tasks[:, 6]
        return {
            "num_sequences": int(self.seqlens_kv.numel()),
            "num_tasks": self.num_tasks,
            "num_tiles": int((slots < 0).sum()) + int(self.merges.shape[0]),
            "num_split_tiles": int(self.merges.shape[0]),
            "num_split_tasks": int((slots >= 0).sum()),
            "num_slots": int(self.num_slots),
            "num_programs": num_programs,
            "busy_programs": int((costs > 0).sum()),
            "total_cost": total,
            "max_task_cost": int(self.tasks[:, 7].max()) if self.num_tasks else 0,
            "max_program_cost": max_cost,
            "avg_program_cost": avg,
            # max / avg: 1.0 is perfect balance; an empty batch counts as balanced.
            "cost_ratio": (max_cost / avg) if avg > 0 else 1.0,
            "block_q": self.block_q,
            "num_q_heads": self.num_q_heads,
            "num_kv_heads": self.num_kv_heads,
        }


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _as_int_array(values: IntsLike, name: str) -> np.ndarray:
    """A 1-D int64 numpy copy of host-side integer metadata (list, numpy array or tensor)."""
    if isinstance(values, torch.Tensor):
        # A bool tensor is no count (a bool list is refused below, by its numpy dtype).
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got a {values.dtype} tensor")
        arr = values.detach().cpu().numpy()
    else:
        arr = np.asarray(values)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, got {arr.dtype} values")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    return arr.astype(np.int64, copy=True)


def _as_int(value: Any, name: str) -> int:
    """A plain int from an int-like argument (rejects floats and bools)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None


def _validated_lengths(
    cu_seqlens_q: IntsLike, seqlens_kv: IntsLike, *, more_queries_than_keys: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cu, n, L) as int64 arrays after checking the metadata is a consistent batch
    (`more_queries_than_keys`: n_s > L_s allowed, see `build_task_table`)."""
    cu = _as_int_array(cu_seqlens_q, "cu_seqlens_q")
    kv = _as_int_array(seqlens_kv, "seqlens_kv")
    if cu.size != kv.size + 1:
        raise ValueError(
            f"cu_seqlens_q has {cu.size} entries and seqlens_kv has {kv.size}: expected "
            f"len(cu_seqlens_q) == len(seqlens_kv) + 1 (one offset per sequence plus the total)"
        )
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens_q must start at 0, got {int(cu[0])}")
    n = np.diff(cu)
    bad = np.flatnonzero(n < 0)
    if bad.size:
        s = int(bad[0])
        raise ValueError(
            f"cu_seqlens_q must be non-decreasing: sequence {s} would have a negative number "
            f"of query rows ({int(cu[s])} -> {int(cu[s + 1])})"
        )
    bad = np.flatnonzero(kv < 0)
    if bad.size:
        s = int(bad[0])
        raise ValueError(f"seqlens_kv must be >= 0: sequence {s} has {int(kv[s])}")
    bad = np.flatnonzero(n > kv)
    if bad.size and not more_queries_than_keys:
        s = int(bad[0])
        raise ValueError(
            f"sequence {s} has {int(n[s])} query rows but only {int(kv[s])} KV positions: the new "
            f"tokens' K/V must already be in the cache, so n_s <= L_s"
        )
    return cu, n, kv


# ---------------------------------------------------------------------------------------------
# Building the table
# ---------------------------------------------------------------------------------------------


def _ceil_div(a: np.ndarray | int, b: int) -> Any:
    return -(-a // b)


def _auto_chunk(ranges: np.ndarray, num_programs: int) -> int | None:
    """The split-KV chunk for a batch with fewer tiles than programs, or None for no split.

    The smallest multiple of `_SPLIT_QUANTUM` (>= `_MIN_AUTO_CHUNK`) for which the total task
    count stays <= num_programs: as many tasks as the grid can run in one wave, no more.
    """
    longest = int(ranges.max()) if ranges.size else 0
    if longest <= _MIN_AUTO_CHUNK:
        return None  # no tile is long enough for two chunks of the minimum size
    lo = _MIN_AUTO_CHUNK // _SPLIT_QUANTUM
    hi = _ceil_div(longest, _SPLIT_QUANTUM)  # chunk >= longest: nothing splits, always fits

    def count(k: int) -> int:
        return int(_ceil_div(ranges, k * _SPLIT_QUANTUM).sum())

    while lo < hi:  # task count is non-increasing in the chunk size: binary search
        mid = (lo + hi) // 2
        if count(mid) <= num_programs:
            hi = mid
        else:
            lo = mid + 1
    if count(lo) == ranges.size:
        return None
    return lo * _SPLIT_QUANTUM


def _auto_chunks(ranges: np.ndarray, q_rows: np.ndarray, p_first: np.ndarray, num_programs: int) -> np.ndarray:
    """Each tile's split-KV chunk length (a tile whose KV range is no longer is not split).

    The first candidate: with fewer tiles than programs, one chunk for all tiles that fills one
    wave (`_auto_chunk`); with more, no split. When that deal leaves its busiest program more
    than `_BALANCED` times the average program's cost (one long-KV tile beside many short ones,
    or a tile count just past the grid), tiles costing more than half the average are also tried
    cut into chunks of about half the average cost: no task is then more than half a fair share,
    so the deal's busiest program stays near 1.5x of it. The candidate whose busiest program
    carries less wins (a tie keeps the first, with fewer tasks to merge).
    """
    num_tiles = ranges.size
    uniform = _auto_chunk(ranges, num_programs) if num_tiles < num_programs else None
    first = np.full(num_tiles, uniform or 0, dtype=np.int64)
    cost = q_rows * ranges
    average = cost.sum() / num_programs
    busiest = _busiest_program(ranges, q_rows, p_first, first, num_programs)
    if busiest <= _BALANCED * average:
        return first
    pieces = np.maximum(np.ceil(cost / max(average / 2, 1)), 1).astype(np.int64)
    length = np.maximum(_ceil_div(_ceil_div(ranges, pieces), _SPLIT_QUANTUM) * _SPLIT_QUANTUM, _MIN_AUTO_CHUNK)
    second = np.where((cost > average / 2) & (ranges > _MIN_AUTO_CHUNK), length, first)
    return second if _busiest_program(ranges, q_rows, p_first, second, num_programs) < busiest else first


def _chunked(kv_start: np.ndarray, kv_end: np.ndarray, chunk: np.ndarray) -> tuple[np.ndarray, ...]:
    """Tiles cut into chunks of `chunk[t]` KV positions (0: whole): each task's tile (in tile
    order) and KV range, and each tile's chunk count."""
    ranges = kv_end - kv_start
    nchunks = np.maximum(np.where(chunk > 0, _ceil_div(ranges, np.maximum(chunk, 1)), 1), 1)
    num_tasks = int(nchunks.sum())
    tile_of = np.repeat(np.arange(ranges.size, dtype=np.int64), nchunks)
    chunk_idx = np.arange(num_tasks, dtype=np.int64) - np.repeat(np.cumsum(nchunks) - nchunks, nchunks)
    start = kv_start[tile_of] + chunk_idx * chunk[tile_of]
    end = np.where(nchunks[tile_of] > 1, np.minimum(start + chunk[tile_of], kv_end[tile_of]), kv_end[tile_of])
    return tile_of, start, end, nchunks


def _busiest_program(ranges: np.ndarray, q_rows: np.ndarray, p_first: np.ndarray, chunk: np.ndarray,
                     num_programs: int) -> float:
    """The cost the busiest program gets when the tiles are cut into `chunk`s and dealt."""
    tile_of, start, end, _ = _chunked(np.zeros_like(ranges), ranges, chunk)
    if not tile_of.size:
        return 0.0
    cost = q_rows[tile_of] * (end - start)
    order, prog = _deal(cost, p_first[tile_of], num_programs)
    return float(np.bincount(prog, weights=cost[order], minlength=num_programs).max())


def _deal(cost: np.ndarray, p_first: np.ndarray, num_programs: int) -> tuple[np.ndarray, np.ndarray]:
    """Tasks dealt longest first in symmetric round-robin: the task order and, for the k-th task
    in it, its program.

    Equal costs go later query rows (`p_first`) first, then by task index (sequence, kv head, q
    tile, kv chunk): deterministic. When the host cannot see the real cost (a model's causal mask
    given as a bias, which the kernel uses to skip keys), later rows usually cost more, and
    dealing that ramp in symmetric round-robin pairs cheap tasks with dear ones.
    """
    num_tasks = cost.size
    order = np.lexsort((np.arange(num_tasks), -p_first, -cost))
    rnd, pos = np.divmod(np.arange(num_tasks, dtype=np.int64), num_programs)
    return order, np.where(rnd % 2 == 0, pos, num_programs - 1 - pos)


def _check_fits_int32(*columns: tuple[str, np.ndarray]) -> None:
    """Raise ValueError when a (name, values) column would not fit the kernels' int32 metadata."""
    limit = np.iinfo(np.int32).max
    for name, values in columns:
        if values.size and int(values.max()) > limit:
            raise ValueError(f"{name} is {int(values.max())}, past the int32 metadata the kernels read "
                             f"({limit}): split the batch")


def _i32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))


def build_task_table(
    cu_seqlens_q: IntsLike,
    seqlens_kv: IntsLike,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    block_q: int,
    num_programs: int,
    sliding_window: int | None = None,
    causal: bool = True,
    kv_split: int | None = None,
    sequences: Sequence[int] | None = None,
) -> TaskTable:
    """Compute the meta-attention task table of one batch (host side, deterministic).

    Args:
        cu_seqlens_q: ``[S + 1]`` query-row offsets (list, numpy array or tensor; a device tensor
            is copied to the host). Sequence ``s`` owns rows ``cu[s]:cu[s+1]``.
        seqlens_kv: ``[S]`` KV lengths, ``n_s <= L_s``; without ``causal`` and
            ``sliding_window`` also ``n_s > L_s``: the table's KV ranges then read no row's
            position (every row sees every ``j < L_s``), so the queries may outnumber the keys
            (cross-attention over a shorter input). ALiBi, applied by the kernels, reads the
            positions too: its callers refuse ``n_s > L_s`` with it (`run_meta_attention`).
        num_q_heads / num_kv_heads: Hq and Hkv (Hq a multiple of Hkv; Hkv == 1 is MQA).
        block_q: query positions per tile (the tile has ``block_q * Hq // Hkv`` rows).
        num_programs: P, the static grid size the tasks are dealt over (programs may be idle).
        sliding_window: ``w``: a row at position p sees only ``j > p - w``.
        causal: rows see ``j <= p`` (otherwise every ``j < L_s``).
        kv_split: split-KV policy. ``None`` (default): automatic — when the batch has fewer
            tiles than programs, tiles longer than a chunk are split into chunks of a multiple of
            64 (>= 256) positions chosen so the task count approaches ``num_programs``; when a
            deal would still leave one program far above the average (a long-KV tile beside
            many short ones), the dear tiles are cut finer (`_auto_chunks`).
            ``k > 0``: every tile whose KV range exceeds ``k`` is split into chunks of ``k``
            positions regardless of the tile count (tuning and tests). ``0``: never split.
        sequences: when given, only these sequences (indices into the batch) get tasks; the
            table still describes the whole batch's metadata. A batch whose sequences want
            different tile heights runs one launch per group, each with its own table.

    Returns:
        The `TaskTable`. Sequences with no query rows produce no task.

    Raises:
        ValueError: inconsistent metadata (lengths that disagree, ``n_s > L_s`` under a
            rule that reads positions, negative
            values) or bad parameters (``num_programs < 1``, ``Hq % Hkv != 0``, ...).
    """
    num_q_heads = _as_int(num_q_heads, "num_q_heads")
    num_kv_heads = _as_int(num_kv_heads, "num_kv_heads")
    block_q = _as_int(block_q, "block_q")
    num_programs = _as_int(num_programs, "num_programs")
    if num_q_heads < 1 or num_kv_heads < 1:
        raise ValueError(
            f"num_q_heads and num_kv_heads must be >= 1, got {num_q_heads} and {num_kv_heads}"
        )
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads}): "
            f"each KV head serves the same number of query heads"
        )
    if block_q < 1:
        raise ValueError(f"block_q must be >= 1, got {block_q}")
    if num_programs < 1:
        raise ValueError(f"num_programs must be >= 1, got {num_programs}")
    window = None if sliding_window is None else _as_int(sliding_window, "sliding_window")
    if window is not None and window < 1:
        raise ValueError(f"sliding_window must be >= 1 (or None), got {window}")
    split = None if kv_split is None else _as_int(kv_split, "kv_split")
    if split is not None and split < 0:
        raise ValueError(f"kv_split must be >= 0 (0 disables split-KV) or None, got {split}")

    cu, n, kv_len = _validated_lengths(cu_seqlens_q, seqlens_kv,
                                       more_queries_than_keys=not causal and window is None)
    # The lengths size the per-tile arrays below: refuse what the kernels cannot read before
    # building them (2**40 query rows would ask numpy for a 2**40-entry array first).
    _check_fits_int32(("a KV length", kv_len), ("the query row count", cu))
    num_seqs = kv_len.size

    # --- tiles, in (sequence, kv head, q tile) order ---------------------------------------
    tiles_per_seq = _ceil_div(n, block_q)
    if sequences is not None:
        chosen = np.zeros(num_seqs, dtype=bool)
        # Indices, checked like the metadata: a boolean mask would read as indices 0 and 1, and a
        # float as its truncation, covering other sequences than the caller meant.
        picked = _as_int_array(sequences if isinstance(sequences, (torch.Tensor, np.ndarray)) else list(sequences),
                               "sequences")
        if picked.size and (picked.min() < 0 or picked.max() >= num_seqs):
            raise ValueError(f"sequences must index the batch's {num_seqs} sequences, got {sorted(set(picked.tolist()))}")
        chosen[picked] = True
        tiles_per_seq = np.where(chosen, tiles_per_seq, 0)
    per_seq = tiles_per_seq * num_kv_heads
    num_tiles = int(per_seq.sum())
    seq = np.repeat(np.arange(num_seqs, dtype=np.int64), per_seq)
    local = np.arange(num_tiles, dtype=np.int64) - np.repeat(np.cumsum(per_seq) - per_seq, per_seq)
    tps = np.repeat(tiles_per_seq, per_seq)
    head = local // np.maximum(tps, 1)
    q_start = (local % np.maximum(tps, 1)) * block_q
    q_rows = np.minimum(block_q, n[seq] - q_start)
    # Positions of the tile's first and last query rows; the new tokens are the last n_s (with
    # n_s > L_s, the first ones below 0: only the deal's order reads them then).
    p_first = kv_len[seq] - n[seq] + q_start
    p_last = p_first + q_rows - 1
    # The union of the rows' visible sets is one interval: consecutive rows' windows overlap.
    kv_start = np.maximum(0, p_first - window + 1) if window is not None else np.zeros_like(seq)
    kv_end = p_last + 1 if causal else kv_len[seq].copy()
    ranges = kv_end - kv_start

    # --- split-KV ----------------------------------------------------------------------------
    if split is None:
        chunk = _auto_chunks(ranges, q_rows, p_first, num_programs)
    else:
        chunk = np.full(num_tiles, split, dtype=np.int64)
    tile_of, t_kv_start, t_kv_end, nchunks = _chunked(kv_start, kv_end, chunk)
    num_tasks = tile_of.size
    is_split = nchunks[tile_of] > 1
    slot = np.full(num_tasks, -1, dtype=np.int64)
    num_slots = int(is_split.sum())
    # Tasks are in tile order, so one tile's chunks get consecutive slots.
    slot[is_split] = np.arange(num_slots, dtype=np.int64)
    t_q_rows = q_rows[tile_of]
    cost = t_q_rows * (t_kv_end - t_kv_start)

    tasks = np.stack(
        [seq[tile_of], head[tile_of], q_start[tile_of], t_q_rows, t_kv_start, t_kv_end, slot, cost],
        axis=1,
    ) if num_tasks else np.zeros((0, 8), dtype=np.int64)

    split_tiles = np.flatnonzero(nchunks > 1)
    first_slot = np.cumsum(nchunks[split_tiles]) - nchunks[split_tiles]
    merges = np.stack(
        [seq[split_tiles], head[split_tiles], q_start[split_tiles], q_rows[split_tiles],
         first_slot, nchunks[split_tiles]],
        axis=1,
    ) if split_tiles.size else np.zeros((0, 6), dtype=np.int64)

    order, prog = _deal(cost, p_first[tile_of], num_programs)
    # A stable sort by program keeps each program's tasks in the order they were dealt.
    by_prog = np.argsort(prog, kind="stable")
    program_tasks = order[by_prog]
    counts = np.bincount(prog, minlength=num_programs)
    program_offsets = np.concatenate([[0], np.cumsum(counts)])
    _check_fits_int32(("a task's cost (rows x KV length)", tasks))

    return TaskTable(
        tasks=_i32(tasks.reshape(-1, 8)),
        program_offsets=_i32(program_offsets),
        program_tasks=_i32(program_tasks),
        merges=_i32(merges.reshape(-1, 6)),
        num_slots=num_slots,
        block_q=block_q,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        cu_seqlens_q=_i32(cu),
        seqlens_kv=_i32(kv_len),
        causal=bool(causal),
        sliding_window=window,
    )


# ---------------------------------------------------------------------------------------------
# Metadata check for the varlen op
# ---------------------------------------------------------------------------------------------


def check_sliding_window(op: str, window: object, name: str = "sliding_window") -> None:
    """Raise ValueError unless `window` is None or an int >= 1 (a bool is not a window); `name`:
    the argument's name in the message (an attention chunk is checked the same way)."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1):
        raise ValueError(f"{op}: {name} must be a positive int or None, got {window!r}")


def check_metadata(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seqlens_kv: torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    *,
    causal: bool = True,
    more_queries_than_keys: bool = False,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate the tensors of ``meta_attention_varlen``; raise ValueError saying what to fix.

    Checks shapes (``q [total_q, Hq, D]``, caches ``[num_blocks, block_size, Hkv, D]``), dtypes
    (float q/k/v of one dtype, int32 metadata, bool tree mask), ``Hq % Hkv == 0``,
    ``cu_seqlens_q`` monotone from 0 to ``total_q``, ``0 <= n_s <= L_s``, a block table wide
    enough for every ``L_s`` whose needed entries are in ``[0, num_blocks)``, and the tree mask's
    shape. With ``causal`` it also requires each applied tree mask to be lower-triangular (a
    token's parent comes before it), because the tiled kernels clip a tile's KV range causally.
    `more_queries_than_keys` allows ``n_s > L_s``, for a call with no rule that reads positions
    (not causal, no sliding window, no tree mask: the dense op's cross-attention); it raises
    ValueError with ``causal`` or a tree mask.

    This reads the metadata on the host (a device sync for device tensors): use it in tests,
    debug mode, or once per batch before building a task table, not inside a captured graph.
    Returns ``(cu_seqlens_q, seqlens_kv)`` as host int tuples, so the caller need not read them
    from the device a second time.
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache),
                    ("block_table", block_table), ("cu_seqlens_q", cu_seqlens_q),
                    ("seqlens_kv", seqlens_kv)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3:
        raise ValueError(f"q must be [total_q, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(
            f"k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got shape "
            f"{tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache shape {tuple(v_cache.shape)} differs from k_cache shape "
            f"{tuple(k_cache.shape)}: both caches use the same paging"
        )
    if not q.is_floating_point():
        raise ValueError(f"q must be a floating-point tensor, got {q.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, "
            f"{v_cache.dtype}: cast the cache or the queries"
        )
    total_q, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, kv_dim = k_cache.shape
    if kv_dim != head_dim:
        raise ValueError(f"head_dim differs: q has {head_dim}, the KV cache has {kv_dim}")
    if num_kv_heads < 1 or num_q_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"q has {num_q_heads} heads, not a multiple of the cache's {num_kv_heads} KV heads (each needs at least one)"
        )
    if block_size < 1:
        raise ValueError("k_cache has block_size 0: each page must hold at least one position")
    for name, t in (("block_table", block_table), ("cu_seqlens_q", cu_seqlens_q),
                    ("seqlens_kv", seqlens_kv)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}: convert with .to(torch.int32)")
    if block_table.dim() != 2:
        raise ValueError(
            f"block_table must be [num_seqs, max_blocks_per_seq], got shape {tuple(block_table.shape)}"
        )
    if cu_seqlens_q.dim() != 1 or seqlens_kv.dim() != 1:
        raise ValueError("cu_seqlens_q and seqlens_kv must be 1-D")
    num_seqs = seqlens_kv.shape[0]
    if block_table.shape[0] != num_seqs:
        raise ValueError(
            f"block_table has {block_table.shape[0]} rows but seqlens_kv has {num_seqs} sequences"
        )
    devices = {t.device for t in (q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_kv)}
    if tree_mask is not None:
        devices.add(tree_mask.device)
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")

    if more_queries_than_keys and (causal or tree_mask is not None):
        raise ValueError("more_queries_than_keys needs causal=False and no tree_mask: those rules read the "
                         "queries' positions, the last n_s of the L_s keys'")
    cu, n, kv_len = _validated_lengths(cu_seqlens_q, seqlens_kv, more_queries_than_keys=more_queries_than_keys)
    if int(cu[-1]) != total_q:
        raise ValueError(
            f"cu_seqlens_q ends at {int(cu[-1])} but q has {total_q} rows: the last offset "
            f"must equal q.shape[0]"
        )

    # Every block a sequence needs must exist and be a valid page index.
    blocks_needed = _ceil_div(kv_len, block_size)
    width = block_table.shape[1]
    if blocks_needed.size and int(blocks_needed.max()) > width:
        s = int(np.argmax(blocks_needed))
        raise ValueError(
            f"block_table has {width} columns but sequence {s} needs {int(blocks_needed[s])} "
            f"blocks for {int(kv_len[s])} KV positions at block_size {block_size}: widen the table"
        )
    if width and num_seqs:
        table = block_table.detach().cpu().numpy().astype(np.int64)
        needed = np.arange(width)[None, :] < blocks_needed[:, None]
        bad = needed & ((table < 0) | (table >= num_blocks))
        if bad.any():
            s, b = (int(x) for x in np.argwhere(bad)[0])
            raise ValueError(
                f"block_table[{s}, {b}] = {int(table[s, b])} is outside [0, {num_blocks}): "
                f"sequence {s} needs that block for its KV positions"
            )

    if tree_mask is not None:
        if tree_mask.dtype != torch.bool:
            raise ValueError(f"tree_mask must be bool, got {tree_mask.dtype}")
        if tree_mask.dim() != 3 or tree_mask.shape[0] != num_seqs or tree_mask.shape[1] != tree_mask.shape[2]:
            raise ValueError(
                f"tree_mask must be [num_seqs={num_seqs}, T, T], got shape {tuple(tree_mask.shape)}"
            )
        size = tree_mask.shape[1]
        if causal and size:
            # Rows/columns the op actually reads: i, j < n_s for sequences with n_s <= T.
            mask = tree_mask.detach().cpu().numpy()
            idx = np.arange(size)
            applies = (n <= size)[:, None, None]
            inside = (idx[None, :, None] < n[:, None, None]) & (idx[None, None, :] < n[:, None, None])
            upper = idx[None, :, None] < idx[None, None, :]
            bad = mask & applies & inside & upper
            if bad.any():
                s, i, j = (int(x) for x in np.argwhere(bad)[0])
                raise ValueError(
                    f"tree_mask[{s}, {i}, {j}] is True but token {j} comes after token {i}: with "
                    f"causal=True the kernels read only KV positions up to each tile's last row; "
                    f"order the tree's tokens so that every parent precedes its children"
                )
    return tuple(cu.tolist()), tuple(kv_len.tolist())
