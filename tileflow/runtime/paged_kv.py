"""Paged KV storage and attention over it, shared by the serving engine and the attention workers.

`PagedKV` holds `num_layers` k/v caches of `[num_blocks, block_size, num_kv_heads, head_dim]`;
which blocks belong to which sequence is the caller's business (a block allocator). A step's
batch layout (`PagedBatch`: block table, lengths, the cache slot of every new row) is built once
on the host and copied to the cache's device without waiting for it (`to_device`); every layer
then writes its new rows with one scatter and runs `meta_attention_varlen` over the batch without
reading anything back from the device (the host already knows the lengths the task table needs).

Chunked attention (Llama 4's: positions cut into chunks of `c`, a query sees only its own
chunk's keys) runs on the same kernel through a second layout of the step, its chunk view: each
sequence's new tokens are cut at chunk boundaries and each piece is a sequence of its own, whose
block list starts at its chunk's first block, so the causal rule over it is the chunked one. It
needs `c` to be a multiple of the block size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..transfers import to_device
from .attention import run_meta_attention_varlen


@dataclass(frozen=True)
class PagedBatch:
    """One step's batch over a `PagedKV`: device tensors for the kernels, host copies of the
    lengths for the task table.

    `block_table` int32 [S, max_blocks]; `cu_seqlens_q` int32 [S + 1]; `seqlens_kv` int32 [S];
    `slots` int64 [total_q]: the flat cache slot (block * block_size + offset) of each new row;
    `positions` int64 [total_q]: each new row's position in its sequence.
    """

    block_table: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seqlens_kv: torch.Tensor
    slots: torch.Tensor
    positions: torch.Tensor
    host_cu_seqlens_q: tuple[int, ...]
    host_seqlens_kv: tuple[int, ...]
    # Per attention chunk size the step was prepared for, its chunk view (module docstring).
    chunk_views: dict[int, ChunkView] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """Query rows in the step."""
        return self.host_cu_seqlens_q[-1]


def check_chunk_blocks(chunks: Iterable[int | None], block_size: int) -> None:
    """ValueError unless `block_size` divides every attention chunk size in `chunks` (None: a
    layer without chunks): a chunk view starts each piece's block list at its chunk's first block."""
    bad = sorted(c for c in set(chunks) if c is not None and c % block_size)
    if bad:
        raise ValueError(f"the model attends in chunks of {bad[0]} positions, which the KV block size {block_size} "
                         "does not divide: pick a block size that divides the chunk (a power of two below it)")


def _check_distinct_slots(slots: np.ndarray, cu: np.ndarray, block_size: int) -> None:
    """ValueError when two new rows of a step go to one cache slot (two sequences handed one
    block to write, or one sequence listing a block twice): the scatter would keep one of them
    (on a GPU, either) and the other sequence would attend over it. Blocks a step only reads may
    be shared (a cached prefix); a block is written by one sequence at a time."""
    if slots.size < 2:
        return
    ordered = np.sort(slots)  # (tens of microseconds for thousands of rows)
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    if same.size:
        slot = int(ordered[same[0]])
        first, second = (int(r) for r in np.flatnonzero(slots == slot)[:2])
        seq_a, seq_b = (int(s) for s in np.searchsorted(cu, [first, second], "right") - 1)
        raise ValueError(f"new rows {first} (sequence {seq_a}) and {second} (sequence {seq_b}) both go to cache slot "
                         f"{slot} (block {slot // block_size}): a block written in a step must belong to one "
                         "sequence, once in its block list")


@dataclass(frozen=True)
class ChunkView:
    """A step cut at the boundaries of attention chunks: `batch` has one sequence per piece (the
    new tokens of one sequence within one chunk, in the step's row order), whose blocks start at
    the chunk's first block; None when that is the step itself (every sequence one piece in its
    first chunk: the view then holds no reference back to the step). `piece_seq[p]`,
    `piece_row[p]`: the step's sequence piece p comes from and the piece's first row among that
    sequence's new tokens; `seq_new[s]`: the new tokens of the step's sequence s (host arrays,
    for the tree mask)."""

    batch: PagedBatch | None
    piece_seq: np.ndarray
    piece_row: np.ndarray
    seq_new: np.ndarray
    # The step's tree mask and the pieces' (every chunked layer of the step asks for the same one).
    _tree: list[torch.Tensor] = field(default_factory=list, repr=False, compare=False)

    def tree_mask(self, tree_mask: torch.Tensor) -> torch.Tensor:
        """The step's tree mask (bool [S, T, T], rows and columns over each sequence's new tokens,
        a sequence with more than T new tokens causal) for the pieces: each piece's block of its
        sequence's mask, and causal where its sequence was. A row sees no drafted token after it
        (drafts come in tree order), so none it loses to another piece."""
        if self._tree and self._tree[0] is tree_mask:
            return self._tree[1]
        if self.piece_seq.size == self.seq_new.size:  # one piece per sequence: its own rows
            return tree_mask
        t = tree_mask.shape[-1]
        device = tree_mask.device
        seq = torch.as_tensor(self.piece_seq, device=device)
        rows = (torch.as_tensor(self.piece_row, device=device)[:, None] + torch.arange(t, device=device)).clamp_(max=t - 1)
        pieces = tree_mask[seq[:, None, None], rows[:, :, None], rows[:, None, :]]
        causal = torch.as_tensor(self.seq_new[self.piece_seq] > t, device=device)
        tril = torch.ones(t, t, dtype=torch.bool, device=device).tril_()
        self._tree[:] = [tree_mask, torch.where(causal[:, None, None], tril, pieces)]
        return self._tree[1]


@dataclass(frozen=True)
class _HostLayout:
    """A step's layout on the host: block table int32 [S, max_blocks] (zero past a sequence's
    blocks), and per sequence the blocks it owns, its new tokens, its first new position, and
    the running count of new tokens (`cu`, [S + 1])."""

    table: np.ndarray
    owned: np.ndarray
    new: np.ndarray
    first: np.ndarray
    cu: np.ndarray

    @property
    def lens(self) -> np.ndarray:
        """KV length of each sequence once its new tokens are in."""
        return self.first + self.new

    def slots_and_positions(self, block_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Each new row's flat cache slot and position (int64 [total_q])."""
        rows = np.repeat(np.arange(self.new.size), self.new)
        pos = np.arange(int(self.cu[-1])) - np.repeat(self.cu[:-1], self.new) + np.repeat(self.first, self.new)
        return self.table[rows, pos // block_size].astype(np.int64) * block_size + pos % block_size, pos


class PagedKV:
    """k/v block storage for every layer."""

    def __init__(
        self, num_layers: int, num_kv_heads: int, head_dim: int, *, block_size: int, num_blocks: int,
        dtype: torch.dtype, device: torch.device | str = "cpu",
    ) -> None:
        if block_size < 1 or num_blocks < 1:
            raise ValueError(f"block_size and num_blocks must be >= 1, got {block_size} and {num_blocks}")
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = torch.device(device)

    def prepare(self, blocks: Sequence[Sequence[int]], q_lens: Sequence[int], starts: Sequence[int], *,
                attention_chunks: Iterable[int] = ()) -> PagedBatch:
        """The layout of a step whose sequence s owns `blocks[s]` (block ids: lists, or integer
        numpy arrays, which are cheaper) and brings `q_lens[s]` new tokens at positions
        `starts[s]` …, with its chunk view for each size in `attention_chunks` (module docstring);
        raises ValueError when a sequence's blocks cannot hold them, or two new rows would share a
        cache slot."""
        host = self._host_layout(blocks, q_lens, starts)
        slots, positions = host.slots_and_positions(self.block_size)
        _check_distinct_slots(slots, host.cu, self.block_size)
        # Copies that do not wait for the device (two: int32 metadata, int64 slots and positions).
        cu, lens, table, slots_dev, positions_dev = to_device(
            self.device, host.cu.astype(np.int32), host.lens.astype(np.int32), host.table, slots, positions)
        batch = PagedBatch(cu_seqlens_q=cu, seqlens_kv=lens, block_table=table, slots=slots_dev,
                           positions=positions_dev, host_cu_seqlens_q=tuple(host.cu.tolist()),
                           host_seqlens_kv=tuple(host.lens.tolist()))
        for chunk in set(attention_chunks):
            batch.chunk_views[chunk] = self._chunk_view(host, batch, chunk)
        return batch

    def _chunk_view(self, host: _HostLayout, batch: PagedBatch, chunk: int) -> ChunkView:
        check_chunk_blocks((chunk,), self.block_size)
        # Vectorized over pieces (a decode step's sequences are one piece each): piece k of
        # sequence s lies in chunk first // chunk + k, and a sequence without new tokens keeps
        # one empty piece so that every sequence stays in the view.
        end = host.first + host.new
        pieces = np.where(host.new > 0, (end - 1) // chunk - host.first // chunk + 1, 1)
        seq = np.repeat(np.arange(host.new.size), pieces)
        k = np.arange(seq.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        base = (host.first[seq] // chunk + k) * chunk
        at = np.where(k == 0, host.first[seq], base)
        piece_end = np.minimum(end[seq], base + chunk)
        cu = np.concatenate([[0], np.cumsum(piece_end - at)])
        lens = piece_end - base
        skip = base // self.block_size
        if seq.size == host.new.size and not skip.any():
            # Every sequence is one piece in its first chunk (contexts shorter than a chunk): the step itself.
            return ChunkView(None, seq, at - host.first[seq], host.new)
        # Piece p's block list is its sequence's from the chunk's first block on, as far as the
        # piece reads (its keys lie in one chunk, so the table is at most a chunk's blocks wide).
        column = skip[:, None] + np.arange(max(int(-(-lens.max() // self.block_size)), 1))
        table = np.where(column < host.owned[seq, None],
                         host.table[seq[:, None], np.minimum(column, host.table.shape[1] - 1)], 0).astype(np.int32)
        cu_dev, lens_dev, table_dev = to_device(self.device, cu.astype(np.int32), lens.astype(np.int32), table)
        # The pieces keep the step's rows in order, so the rows' cache slots and positions are the step's.
        view = PagedBatch(block_table=table_dev, cu_seqlens_q=cu_dev, seqlens_kv=lens_dev, slots=batch.slots,
                          positions=batch.positions, host_cu_seqlens_q=tuple(cu.tolist()),
                          host_seqlens_kv=tuple(lens.tolist()))
        return ChunkView(view, seq, at - host.first[seq], host.new)

    def _host_layout(self, blocks: Sequence[Sequence[int]], q_lens: Sequence[int], starts: Sequence[int]) -> _HostLayout:
        if not (len(blocks) == len(q_lens) == len(starts)) or not blocks:
            raise ValueError(
                f"blocks, q_lens and starts must describe the same non-empty batch, got {len(blocks)}, "
                f"{len(q_lens)} and {len(starts)} sequences"
            )
        bs = self.block_size
        num_seqs = len(blocks)
        owned = np.fromiter(map(len, blocks), dtype=np.int64, count=num_seqs)
        if isinstance(blocks[0], np.ndarray):  # arrays (the serving engine keeps one per request): one call
            ids = np.concatenate(blocks).astype(np.int64, copy=False)
        else:
            ids = np.fromiter(itertools.chain.from_iterable(blocks), dtype=np.int64, count=int(owned.sum()))
        new = np.asarray(q_lens, dtype=np.int64)
        first = np.asarray(starts, dtype=np.int64)
        bad = (new < 0) | (first < 0) | (first + new > owned * bs)
        if bad.any():
            s = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"sequence {s}: {new[s]} new tokens at position {first[s]} need {-(-(first[s] + new[s]) // bs)} "
                f"blocks of {bs} tokens, it has {owned[s]}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_blocks):
            s = int(np.searchsorted(np.cumsum(owned), np.flatnonzero((ids < 0) | (ids >= self.num_blocks))[0], "right"))
            raise ValueError(f"sequence {s}: block ids {[int(b) for b in blocks[s]]} outside [0, {self.num_blocks})")
        # Vectorized over tokens and blocks: a decode step has thousands of sequences.
        table = np.zeros((num_seqs, max(int(owned.max()), 1)), dtype=np.int32)
        table[np.repeat(np.arange(num_seqs), owned), np.arange(ids.size) - np.repeat(np.cumsum(owned) - owned, owned)] = ids
        return _HostLayout(table, owned, new, first, np.concatenate([[0], np.cumsum(new)]))

    def write_batch(self, layer: int, batch: PagedBatch, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the step's new rows `k`/`v` `[total_q, heads, head_dim]` (one scatter per cache)."""
        if k.shape[0] != batch.num_tokens or v.shape[0] != batch.num_tokens:
            raise ValueError(f"the batch has {batch.num_tokens} new rows, got k/v with {k.shape[0]}/{v.shape[0]}")
        cache_k, cache_v = self.k[layer], self.v[layer]
        cache_k.view(-1, *cache_k.shape[2:]).index_copy_(0, batch.slots, k.to(cache_k.dtype))
        cache_v.view(-1, *cache_v.shape[2:]).index_copy_(0, batch.slots, v.to(cache_v.dtype))

    def attend_batch(
        self, layer: int, q: torch.Tensor, batch: PagedBatch, *, scale: float, tree_mask: torch.Tensor | None = None,
        sliding_window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
        attention_chunk: int | None = None,
    ) -> torch.Tensor:
        """Causal meta-attention of `q` `[total_q, heads, head_dim]` over each sequence's cache,
        its new rows (already written) included, within the layer's `sliding_window` or
        `attention_chunk` (the batch must be prepared with that chunk size) and with its `softcap`
        and attention `sinks` (float [heads]) when it has them; returns q's shape. `prepare`
        validated the metadata on the host, so nothing is read back from the device."""
        if attention_chunk is not None:
            view = batch.chunk_views.get(attention_chunk)
            if view is None:
                raise ValueError(f"the layer attends in chunks of {attention_chunk} positions, but the batch was "
                                 f"prepared for chunks of {sorted(batch.chunk_views)}: pass "
                                 f"attention_chunks=({attention_chunk},) to prepare")
            batch = view.batch or batch
            tree_mask = None if tree_mask is None else view.tree_mask(tree_mask)
        return run_meta_attention_varlen(
            q.contiguous(), self.k[layer], self.v[layer], batch.block_table, batch.cu_seqlens_q, batch.seqlens_kv,
            scale=scale, causal=True, tree_mask=tree_mask, check=False,
            host_metadata=(batch.host_cu_seqlens_q, batch.host_seqlens_kv),
            sliding_window=sliding_window, softcap=softcap, sinks=sinks,
        )
