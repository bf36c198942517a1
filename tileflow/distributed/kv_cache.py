"""The paged KV cache an attention worker owns: its shard of KV heads, every layer of a KV group.

Blocks are shared by all layers of a sequence in the cache (one block table per sequence, as in
vLLM); a step reserves room for its new tokens, each layer writes its new k/v rows, and the step's
last layer commits the new length. Storage and attention are `tileflow.runtime.paged_kv.PagedKV`'s,
blocks come from the serving engine's allocator. When every layer of the cache slides a window of
`w` keys, a step first gives back the sequence's blocks that its first new position no longer sees
(as the serving scheduler does): their entries stay in the block list, never read again. A worker
serving a model that mixes full and sliding layers keeps one such cache per KV group when told
how many blocks the sliding layers get (`AttentionWorker`, `tileflow.serving.kv_groups`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..runtime.paged_kv import PagedKV
from ..serving.blocks import BlockAllocator, OutOfBlocks, release_behind_window


@dataclass
class _Sequence:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # committed tokens (all layers written)
    released: int = 0  # leading blocks given back: every layer's window has passed them


class PagedKVCache(PagedKV):
    """`PagedKV` plus the sequences' blocks and committed lengths (an attention worker's shard).
    `sliding_window`: the window every layer slides, or None when some layer sees the whole
    sequence (then no block goes back before its sequence is released)."""

    def __init__(
        self, num_layers: int, num_kv_heads: int, head_dim: int, *, block_size: int, num_blocks: int,
        dtype: torch.dtype, device: torch.device | str = "cpu", sliding_window: int | None = None,
    ) -> None:
        super().__init__(
            num_layers, num_kv_heads, head_dim, block_size=block_size, num_blocks=num_blocks, dtype=dtype, device=device,
        )
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        self.sliding_window = sliding_window
        self.allocator = BlockAllocator(num_blocks, block_size)
        self._seqs: dict[int, _Sequence] = {}

    def length(self, seq_id: int) -> int:
        """Committed KV length of a sequence (0 for one never seen)."""
        seq = self._seqs.get(seq_id)
        return seq.length if seq else 0

    def blocks(self, seq_id: int) -> list[int]:
        """The sequence's blocks, in position order."""
        return self._seqs[seq_id].blocks

    def reserve(self, seq_id: int, new_tokens: int) -> int:
        """Make room for `new_tokens` more tokens; returns the position of the first one. With a
        sliding window, the blocks no new token sees go back first."""
        seq = self._seqs.setdefault(seq_id, _Sequence())
        if self.sliding_window is not None:
            seq.released = release_behind_window(self.allocator, seq.blocks, seq.released, seq.length,
                                                 self.sliding_window)
        need = -(-(seq.length + new_tokens) // self.block_size)
        while len(seq.blocks) < need:
            try:
                seq.blocks.append(self.allocator.allocate())
            except OutOfBlocks:
                raise RuntimeError(
                    f"KV cache full: sequence {seq_id} needs {need} blocks of {self.block_size} tokens and no "
                    f"block is free; release finished sequences or give the attention workers more blocks"
                ) from None
        return seq.length

    def commit(self, seq_id: int, new_tokens: int) -> None:
        """The step's last layer wrote its rows: the sequence is `new_tokens` longer."""
        self._seqs[seq_id].length += new_tokens

    def release(self, seq_id: int) -> None:
        """Free a finished sequence's blocks (those it still holds)."""
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            for block in seq.blocks[seq.released:]:
                self.allocator.release(block)
