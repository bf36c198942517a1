"""KV block allocator with reference counts and prefix reuse.

A block holds `block_size` consecutive token positions of one sequence's KV, in every layer of
its KV group (a model mixing full and sliding-window layers has two, each its own allocator; see
`kv_groups`). Full blocks of a prompt are registered under the hash of every token up to their
end, so a later request with the same prefix shares them (its reference count goes up) instead of
recomputing them. A cached block nobody references stays cached until an allocation needs the
room (least recently used first).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence


class OutOfBlocks(RuntimeError):
    """No free block, and no cached block that could be evicted."""


def prefix_hashes(tokens: Sequence[int], block_size: int) -> list[str]:
    """The hash of each full block's whole prefix (tokens 0 … end of that block)."""
    out, h = [], hashlib.sha256()
    for i in range(len(tokens) // block_size):
        h.update(",".join(map(str, tokens[i * block_size : (i + 1) * block_size])).encode() + b";")
        out.append(h.copy().hexdigest())
    return out


def common_window(windows: Iterable[int | None]) -> int | None:
    """The window a model's attention layers all slide (the widest, if they differ), or None
    when some layer sees the whole sequence: only then may blocks go back before it ends."""
    windows = list(windows)
    return None if None in windows else max(windows)


@dataclass(frozen=True)
class KVGroup:
    """Attention layers (indices into the program's cuts) whose KV shares one block pool of
    `num_blocks` blocks, and one block list per request: `window` keys when they all slide one
    (the widest, if theirs differ), None when they see the whole sequence."""

    layers: tuple[int, ...]
    window: int | None
    num_blocks: int


def kv_groups(windows: Sequence[int | None], num_blocks: int, sliding_blocks: int | None = None) -> list[KVGroup]:
    """Split a model's attention layers (`windows`: each layer's sliding window, None for full
    attention) into KV groups, and `num_blocks` blocks' worth of memory (that many blocks in
    every layer) between them (vLLM's hybrid KV cache).

    One group, of `num_blocks` blocks, when every layer slides (it frees blocks behind its
    widest window) or none does, or without `sliding_blocks` (every layer's blocks then stay
    until their sequence ends). Otherwise two: the full-attention layers, whose blocks stay until
    their sequence ends, then the sliding layers, whose blocks go back behind the widest window,
    with `sliding_blocks` blocks (at most `num_blocks`). The full group gets the rest of the
    memory: each block the sliding layers do not take is `sliding layers / full layers` more
    full-group blocks. So the groups hold at most `num_blocks` blocks of every layer, as one
    would, and the full group at least `num_blocks`."""
    full = tuple(i for i, w in enumerate(windows) if w is None)
    sliding = tuple(i for i, w in enumerate(windows) if w is not None)
    if not full or not sliding or sliding_blocks is None:
        return [KVGroup(tuple(range(len(windows))), common_window(windows), num_blocks)]
    held = min(num_blocks, sliding_blocks)
    return [KVGroup(full, None, num_blocks + (num_blocks - held) * len(sliding) // len(full)),
            KVGroup(sliding, max(w for w in windows if w is not None), held)]


def sliding_blocks_for(window: int, *, block_size: int, decode_slots: int, token_budget: int, max_draft: int = 0) -> int:
    """Sliding-layer blocks that `decode_slots` running requests can ever hold at once under a
    window of `window` keys, so that a sliding group of this many never runs short: each holds
    its window, its decode or verify slot and the partial blocks at both ends, and the step's
    prompt chunks (at most `token_budget` tokens) their blocks."""
    # A request in a step holds at most (window + max(its tokens, 1 + max_draft) - 3) // block_size
    # + 2 sliding blocks (the scheduler's bound); summed over decode_slots requests whose step
    # tokens add up to at most token_budget, that is below this.
    return decode_slots * ((window + max_draft) // block_size + 3) + token_budget // block_size


def first_block_in_window(position: int, window: int, block_size: int) -> int:
    """The index of the first block a query at `position` sees under a sliding window of
    `window` keys (it sees positions > position - window)."""
    # Never below 0: early positions give a negative count, a slice end from the back.
    return max(0, (position - window + 1) // block_size)


def release_behind_window(allocator: BlockAllocator, blocks: Sequence[int], released: int, position: int,
                          window: int) -> int:
    """Release the leading `blocks` past `released` that a sequence's queries at `position` and
    later never see under a sliding window of `window` keys (a query at p sees positions
    > p - window); returns how many leading blocks are released now."""
    passed = max(released, first_block_in_window(position, window, allocator.block_size))
    for block in blocks[released:passed]:
        allocator.release(block)
    return passed


class BlockAllocator:
    """`num_blocks` blocks: free, referenced (count > 0), or cached with no reference."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._by_hash: dict[str, int] = {}
        self._hash_of: dict[int, str] = {}
        self._idle_cached: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced, LRU first

    @property
    def available(self) -> int:
        """Blocks an allocation could get now (free, or cached and unreferenced)."""
        return len(self._free) + len(self._idle_cached)

    def allocate(self) -> int:
        """A block with one reference: a free one, else the least recently used idle cached one."""
        if self._free:
            block = self._free.pop()
        elif self._idle_cached:
            block, _ = self._idle_cached.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
        else:
            raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use")
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more reference to a block in use or cached."""
        if self.refs[block] == 0:
            if block not in self._idle_cached:
                raise ValueError(f"block {block} is free: nothing to share")
            del self._idle_cached[block]
        self.refs[block] += 1

    def release(self, block: int) -> None:
        """Drop one reference; an unreferenced block goes back (to the cache when registered)."""
        if self.refs[block] <= 0:
            raise ValueError(f"block {block} released more often than it was referenced")
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self._hash_of:
                self._idle_cached[block] = None
            else:
                self._free.append(block)

    def is_free(self, block: int) -> bool:
        """True when nothing references the block and it is not cached for prefix reuse: its
        contents mean nothing to anyone."""
        return self.refs[block] == 0 and block not in self._hash_of

    def register(self, block: int, prefix_hash: str) -> None:
        """Offer a full block for reuse by later requests with the same prefix. The block must
        be in use: a free one's contents mean nothing, and the next allocation could overwrite
        what a lookup offers."""
        if self.refs[block] < 1:
            raise ValueError(f"block {block} is not in use (no reference): only a block holding a request's KV "
                             "can be offered for prefix reuse")
        if prefix_hash not in self._by_hash and block not in self._hash_of:
            self._by_hash[prefix_hash] = block
            self._hash_of[block] = prefix_hash

    def lookup(self, hashes: Sequence[str]) -> list[int]:
        """The cached blocks of the longest run of registered hashes at the start of `hashes`
        (not yet shared)."""
        blocks = []
        for h in hashes:
            if h not in self._by_hash:
                break
            blocks.append(self._by_hash[h])
        return blocks

    def forget(self, block: int) -> None:
        """Stop offering an idle cached block for prefix reuse: it becomes free."""
        if block not in self._idle_cached:
            raise ValueError(f"block {block} is not cached and unreferenced: nothing to forget")
        del self._idle_cached[block]
        del self._by_hash[self._hash_of.pop(block)]
        self._free.append(block)

    def drop_cache(self) -> None:
        """Forget every idle cached block (they become free)."""
        for block in list(self._idle_cached):
            self.forget(block)

    def all_free(self) -> bool:
        """True when no block is referenced (cached idle blocks count as free)."""
        return not any(self.refs) and self.available == self.num_blocks
