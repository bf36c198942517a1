"""The paged KV cache an attention worker owns: its shard of KV heads, every layer.

Blocks are shared by all layers of a sequence (one block table per sequence, as in vLLM); a step
reserves room for its new tokens, each layer writes its new k/v rows, and the step's last layer
commits the new length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _Sequence:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # committed tokens (all layers written)


class PagedKVCache:
    """`num_layers` k/v caches of `[num_blocks, block_size, num_kv_heads, head_dim]`."""

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
        self._free = list(range(num_blocks - 1, -1, -1))
        self._seqs: dict[int, _Sequence] = {}

    def length(self, seq_id: int) -> int:
        """Committed KV length of a sequence (0 for one never seen)."""
        seq = self._seqs.get(seq_id)
        return seq.length if seq else 0

    def reserve(self, seq_id: int, new_tokens: int) -> int:
        """Make room for `new_tokens` more tokens; returns the position of the first one."""
        seq = self._seqs.setdefault(seq_id, _Sequence())
        need = -(-(seq.length + new_tokens) // self.block_size)
        while len(seq.blocks) < need:
            if not self._free:
                raise RuntimeError(
                    f"KV cache full: sequence {seq_id} needs {need} blocks of {self.block_size} tokens and no "
                    f"block is free; release finished sequences or give the attention workers more blocks"
                )
            seq.blocks.append(self._free.pop())
        return seq.length

    def write(self, layer: int, seq_id: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store rows `k`/`v` `[n, heads, head_dim]` at positions start … start + n − 1."""
        blocks = self._seqs[seq_id].blocks
        pos = torch.arange(start, start + k.shape[0])
        block_ids = torch.tensor(blocks, dtype=torch.long)[pos // self.block_size]
        self.k[layer][block_ids, pos % self.block_size] = k
        self.v[layer][block_ids, pos % self.block_size] = v

    def commit(self, seq_id: int, new_tokens: int) -> None:
        """The step's last layer wrote its rows: the sequence is `new_tokens` longer."""
        self._seqs[seq_id].length += new_tokens

    def release(self, seq_id: int) -> None:
        """Free a finished sequence's blocks."""
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self._free.extend(reversed(seq.blocks))

    def block_table(self, seq_ids: list[int]) -> torch.Tensor:
        """int32 `[len(seq_ids), max_blocks]`; unused entries point at block 0 (never read)."""
        width = max(len(self._seqs[s].blocks) for s in seq_ids)
        table = torch.zeros(len(seq_ids), width, dtype=torch.int32)
        for row, s in enumerate(seq_ids):
            blocks = self._seqs[s].blocks
            table[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        return table
