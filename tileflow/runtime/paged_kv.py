"""Paged KV storage and attention over it, shared by the serving engine and the attention workers.

`PagedKV` holds `num_layers` k/v caches of `[num_blocks, block_size, num_kv_heads, head_dim]`;
which blocks belong to which sequence is the caller's business (a block allocator). A step's
batch layout (`PagedBatch`: block table, lengths, the cache slot of every new row) is built once
on the host and copied to the cache's device without waiting for it (`to_device`); every layer
then writes its new rows with one scatter and runs `meta_attention_varlen` over the batch without
reading anything back from the device (the host already knows the lengths the task table needs).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
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

    @property
    def num_tokens(self) -> int:
        """Query rows in the step."""
        return self.host_cu_seqlens_q[-1]


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

    def prepare(self, blocks: Sequence[Sequence[int]], q_lens: Sequence[int], starts: Sequence[int]) -> PagedBatch:
        """The layout of a step whose sequence s owns `blocks[s]` (block ids: lists, or integer
        numpy arrays, which are cheaper) and brings `q_lens[s]` new tokens at positions
        `starts[s]` …; raises ValueError when a sequence's blocks cannot hold them."""
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
        row_of_block = np.repeat(np.arange(num_seqs), owned)
        table = np.zeros((num_seqs, max(int(owned.max()), 1)), dtype=np.int32)
        table[row_of_block, np.arange(ids.size) - np.repeat(np.cumsum(owned) - owned, owned)] = ids
        cu = np.concatenate([[0], np.cumsum(new)])
        row_of_token = np.repeat(np.arange(num_seqs), new)
        pos = np.arange(int(cu[-1])) - np.repeat(cu[:-1], new) + np.repeat(first, new)
        slots = table[row_of_token, pos // bs].astype(np.int64) * bs + pos % bs
        lens = first + new
        # Copies that do not wait for the device (two: int32 metadata, int64 slots and positions).
        cu_dev, lens_dev, table_dev, slots_dev, pos_dev = to_device(
            self.device, cu.astype(np.int32), lens.astype(np.int32), table, slots, pos)
        return PagedBatch(
            block_table=table_dev,
            cu_seqlens_q=cu_dev,
            seqlens_kv=lens_dev,
            slots=slots_dev,
            positions=pos_dev,
            host_cu_seqlens_q=tuple(cu.tolist()),
            host_seqlens_kv=tuple(lens.tolist()),
        )

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
    ) -> torch.Tensor:
        """Causal meta-attention of `q` `[total_q, heads, head_dim]` over each sequence's cache,
        its new rows (already written) included, within the layer's `sliding_window` and with its
        `softcap` and attention `sinks` (float [heads]) when it has them; returns q's shape.
        `prepare` validated the metadata on the host, so nothing is read back from the device."""
        return run_meta_attention_varlen(
            q.contiguous(), self.k[layer], self.v[layer], batch.block_table, batch.cu_seqlens_q, batch.seqlens_kv,
            scale=scale, causal=True, tree_mask=tree_mask, check=False,
            host_metadata=(batch.host_cu_seqlens_q, batch.host_seqlens_kv),
            sliding_window=sliding_window, softcap=softcap, sinks=sinks,
        )
