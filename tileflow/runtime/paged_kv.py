"""Paged KV storage and attention over it, shared by the serving engine and the attention workers.

`PagedKV` holds `num_layers` k/v caches of `[num_blocks, block_size, num_kv_heads, head_dim]`;
which blocks belong to which sequence is the caller's business (a block allocator). It writes a
step's new rows and runs `meta_attention_varlen` for a batch of sequences, each given by its
block list, its count of new tokens and the position of the first one.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..ops import meta_attention_varlen


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

    def write(self, layer: int, blocks: Sequence[int], start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store rows `k`/`v` `[n, heads, head_dim]` at positions start … start + n − 1 of the
        sequence owning `blocks`."""
        pos = torch.arange(start, start + k.shape[0])
        block_ids = torch.tensor(list(blocks), dtype=torch.long)[pos // self.block_size]
        self.k[layer][block_ids, pos % self.block_size] = k
        self.v[layer][block_ids, pos % self.block_size] = v

    def attend(
        self, layer: int, q: torch.Tensor, blocks: Sequence[Sequence[int]], q_lens: Sequence[int],
        starts: Sequence[int], *, scale: float, tree_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal meta-attention of `q` `[sum(q_lens), heads, head_dim]` over each sequence's
        cache, its new rows (already written) included; returns q's shape."""
        width = max(len(b) for b in blocks)
        table = torch.zeros(len(blocks), width, dtype=torch.int32)
        for row, b in enumerate(blocks):
            table[row, : len(b)] = torch.tensor(list(b), dtype=torch.int32)
        cu = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        seqlens = torch.tensor([s + n for s, n in zip(starts, q_lens)], dtype=torch.int32)
        return meta_attention_varlen(
            q.contiguous(), self.k[layer], self.v[layer], table, cu, seqlens, scale=scale, causal=True, tree_mask=tree_mask,
        )
