"""Paged KV storage and attention over it, shared by the serving engine and the attention workers.

`PagedKV` holds `num_layers` k/v caches of `[num_blocks, block_size, num_kv_heads, head_dim]`;
which blocks belong to which sequence is the caller's business (a block allocator). A step's
batch layout (`PagedBatch`: block table, lengths, the cache slot of every new row) is built once
on the host and copied to the cache's device in one go; every layer then writes its new rows with
one scatter and runs `meta_attention_varlen` over the batch without reading anything back from
the device (the host already knows the lengths the task table needs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .attention import run_meta_attention_varlen


@dataclass(frozen=True)
class PagedBatch:
    """One step's batch over a `PagedKV`: device tensors for the kernels, host copies of the
    lengths for the task table.

    `block_table` int32 [S, max_blocks]; `cu_seqlens_q` int32 [S + 1]; `seqlens_kv` int32 [S];
    `slots` int64 [total_q]: the flat cache slot (block * block_size + offset) of each new row.
    """

    block_table: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seqlens_kv: torch.Tensor
    slots: torch.Tensor
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
        """The layout of a step whose sequence s owns `blocks[s]` and brings `q_lens[s]` new tokens
        at positions `starts[s]` …; raises ValueError when a sequence's blocks cannot hold them."""
        if not (len(blocks) == len(q_lens) == len(starts)) or not blocks:
            raise ValueError(
                f"blocks, q_lens and starts must describe the same non-empty batch, got {len(blocks)}, "
                f"{len(q_lens)} and {len(starts)} sequences"
            )
        bs = self.block_size
        width = max(len(b) for b in blocks)
        table = torch.zeros(len(blocks), max(width, 1), dtype=torch.int32)
        slots: list[int] = []
        for s, (b, n, start) in enumerate(zip(blocks, q_lens, starts)):
            if n < 0 or start < 0 or start + n > len(b) * bs:
                raise ValueError(
                    f"sequence {s}: {n} new tokens at position {start} need {-(-(start + n) // bs)} blocks of "
                    f"{bs} tokens, it has {len(b)}"
                )
            if any(not 0 <= block < self.num_blocks for block in b):
                raise ValueError(f"sequence {s}: block ids {list(b)} outside [0, {self.num_blocks})")
            table[s, : len(b)] = torch.tensor(list(b), dtype=torch.int32)
            slots.extend(b[p // bs] * bs + p % bs for p in range(start, start + n))
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        lens = [start + n for start, n in zip(starts, q_lens)]
        host = torch.tensor(cu + lens, dtype=torch.int32)
        # One host-to-device copy for the lengths, one for the table, one for the slots.
        dev = host.to(self.device)
        return PagedBatch(
            block_table=table.to(self.device),
            cu_seqlens_q=dev[: len(cu)],
            seqlens_kv=dev[len(cu):],
            slots=torch.tensor(slots, dtype=torch.long).to(self.device),
            host_cu_seqlens_q=tuple(cu),
            host_seqlens_kv=tuple(lens),
        )

    def write_batch(self, layer: int, batch: PagedBatch, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the step's new rows `k`/`v` `[total_q, heads, head_dim]` (one scatter per cache)."""
        if k.shape[0] != batch.num_tokens or v.shape[0] != batch.num_tokens:
            raise ValueError(f"the batch has {batch.num_tokens} new rows, got k/v with {k.shape[0]}/{v.shape[0]}")
        self.k[layer].view(-1, *k.shape[1:]).index_copy_(0, batch.slots, k)
        self.v[layer].view(-1, *v.shape[1:]).index_copy_(0, batch.slots, v)

    def attend_batch(
        self, layer: int, q: torch.Tensor, batch: PagedBatch, *, scale: float, tree_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal meta-attention of `q` `[total_q, heads, head_dim]` over each sequence's cache,
        its new rows (already written) included; returns q's shape. `prepare` validated the
        metadata on the host, so nothing is read back from the device."""
        return run_meta_attention_varlen(
            q.contiguous(), self.k[layer], self.v[layer], batch.block_table, batch.cu_seqlens_q, batch.seqlens_kv,
            scale=scale, causal=True, tree_mask=tree_mask, check=False,
            host_metadata=(batch.host_cu_seqlens_q, batch.host_seqlens_kv),
        )

    def write(self, layer: int, blocks: Sequence[int], start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store rows `k`/`v` `[n, heads, head_dim]` at positions start … start + n − 1 of the
        sequence owning `blocks`."""
        self.write_batch(layer, self.prepare([blocks], [k.shape[0]], [start]), k, v)

    def attend(
        self, layer: int, q: torch.Tensor, blocks: Sequence[Sequence[int]], q_lens: Sequence[int],
        starts: Sequence[int], *, scale: float, tree_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal meta-attention of `q` `[sum(q_lens), heads, head_dim]` over each sequence's
        cache, its new rows (already written) included; returns q's shape."""
        return self.attend_batch(layer, q, self.prepare(blocks, q_lens, starts), scale=scale, tree_mask=tree_mask)
