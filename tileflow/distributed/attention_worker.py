"""Attention worker: owns a KV-head shard of the paged cache and runs meta-attention on it.

Each step it walks the same work items as the model workers: for layer k of batch j it receives
the batch's q/k/v for its heads from the replica that ran dense stage k, appends the new k/v to
its cache, attends the queries over each sequence's whole cache, causally, with the
meta-attention varlen op, and sends the output to the replica that runs dense stage k + 1.
A model mixing full and sliding-window layers, with `sliding_blocks` in the INIT, gets a cache
per KV group (the serving engine's split, `tileflow.serving.kv_groups`): the sliding layers'
blocks go back behind the window, and the full layers get the memory they leave.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..log import get_logger
from ..runtime.attention import per_head_tensor
from ..serving.blocks import kv_groups
from .kv_cache import PagedKVCache
from .layout import OP_INIT, OP_SHUTDOWN, OP_STEP, BatchShape, Layout, decode_plan, replica_of, work_items
from .transport import PeerError, Transport

log = get_logger("distributed")


@dataclass(frozen=True)
class LayerShard:
    """One layer as one attention worker sees it: its KV heads [kv_lo, kv_hi) of `num_kv_heads`."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    kv_lo: int
    kv_hi: int
    scale: float
    sliding_window: int | None = None
    softcap: float | None = None
    sinks: tuple[float, ...] | None = None  # the attention-sink logits of this shard's query heads
    attention_chunk: int | None = None  # chunked attention: a query sees its chunk's keys only

    @property
    def q_heads(self) -> tuple[int, int]:
        """The query heads [lo, hi) that read this shard's KV heads."""
        group = self.num_q_heads // self.num_kv_heads
        return self.kv_lo * group, self.kv_hi * group


def encode_init(layers: list[LayerShard], block_size: int, num_blocks: int, sliding_blocks: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The INIT message (the sliding layers' blocks, 0 for none; per layer its sliding window and
    attention chunk, 0 when it has none, then how many sink logits it has) and its float64
    values: per layer the scale, the soft-cap (0 when none) and the sinks."""
    ctl = [OP_INIT, len(layers), block_size, num_blocks, sliding_blocks or 0]
    floats: list[float] = []
    for s in layers:
        sinks = s.sinks or ()
        ctl += [s.num_q_heads, s.num_kv_heads, s.head_dim, s.kv_lo, s.kv_hi, s.sliding_window or 0,
                s.attention_chunk or 0, len(sinks)]
        floats += [s.scale, s.softcap or 0.0, *sinks]
    return torch.tensor(ctl, dtype=torch.int64), torch.tensor(floats, dtype=torch.float64)


class AttentionWorker:
    """Serves the leader's steps until SHUTDOWN (or a peer fails)."""

    def __init__(self, layout: Layout, transport: Transport, *, idle_timeout_s: float | None = None) -> None:
        self.layout = layout
        self.t = transport
        self.idle_timeout_s = idle_timeout_s
        self.layers: list[LayerShard] = []
        # For a model mixing full and sliding layers, the sliding ones' own blocks (None: one pool).
        self.sliding_blocks: int | None = None
        self.cache: PagedKVCache | None = None  # the first KV group's (the only one, unless split)
        self.caches: list[PagedKVCache] = []  # per KV group (`kv_groups`)
        self._layer_at: list[tuple[int, int]] = []  # each layer's (group, layer in the group's cache)
        self.steps = 0

    def serve(self) -> None:
        """Run steps until SHUTDOWN; raises `PeerError` on a timeout or a dead peer (`RunAborted`
        when a peer reported a failure)."""
        t = self.t
        ctl = t.recv(0, "INIT", self.idle_timeout_s)
        if int(ctl[0]) == OP_SHUTDOWN:  # the leader stopped before its first step (and start())
            t.flush()
            return
        self._init(ctl)
        while True:
            ctl = t.recv(0, "the next step plan", self.idle_timeout_s)
            op = int(ctl[0])
            if op == OP_STEP:
                batches, release, _ = decode_plan(ctl)
                self._step(batches, release)
            elif op == OP_SHUTDOWN:
                t.flush()
                log.info("attention worker %d: shutdown after %d steps", t.rank, self.steps)
                return
            else:
                raise PeerError(f"rank {t.rank}: unexpected opcode {op} from rank 0 (expected a step plan)")

    def _init(self, ctl: torch.Tensor) -> None:
        if int(ctl[0]) != OP_INIT:
            raise PeerError(f"rank {self.t.rank}: expected INIT from rank 0, got opcode {int(ctl[0])}")
        floats = self.t.recv(0, "layer scales, soft-caps and sinks").tolist()
        n, self.block_size, self.num_blocks, sliding = (int(x) for x in ctl[1:5])
        self.sliding_blocks = sliding or None
        self.layers, at = [], 0
        for f in ctl[5:].view(n, 8).tolist():
            scale, cap, sinks = floats[at], floats[at + 1], tuple(floats[at + 2:at + 2 + f[7]])
            at += 2 + f[7]
            self.layers.append(LayerShard(*f[:5], scale=scale, sliding_window=f[5] or None, softcap=cap or None,
                                          sinks=sinks or None, attention_chunk=f[6] or None))
        heads = {(s.kv_hi - s.kv_lo, s.head_dim) for s in self.layers}
        if len(heads) != 1:
            raise ValueError(f"layers differ in KV heads or head size per shard: {sorted(heads)}")
        self.cache, self.caches = None, []

    def _step(self, batches: list[BatchShape], release: list[int]) -> None:
        for seq in release:
            for cache in self.caches:
                cache.release(seq)
        ranks, m = self.layout.model_ranks, self.layout.model_workers
        for k, j in work_items(len(batches), len(self.layers)):
            src, reply_to = ranks[replica_of(j, k, m)], ranks[replica_of(j, k + 1, m)]
            payload = self.t.recv(src, f"q/k/v of layer {k} (batch {j})")
            try:
                out = self._attend(k, batches[j], payload)
            except Exception as exc:
                # The replica waiting for this output learns why instead of timing out.
                self.t.send_failure(f"attention worker rank {self.t.rank}: {exc}", reply_to)
                raise
            self.t.send(out, reply_to)
        self.steps += 1

    def _caches_for(self, dtype: torch.dtype, device: torch.device) -> list[PagedKVCache]:
        """One paged cache per KV group (the serving engine's split: `kv_groups`), made on the
        first step: a model mixing full and sliding layers, given `sliding_blocks`, gives its
        sliding layers' blocks back behind the window and its full layers the memory they save."""
        if not self.caches:
            # Where the q/k/v arrive (the transport's device: cuda:N under NCCL), not the CPU.
            h, d = self.layers[0].kv_hi - self.layers[0].kv_lo, self.layers[0].head_dim
            groups = kv_groups([s.sliding_window for s in self.layers], self.num_blocks, self.sliding_blocks)
            self.caches = [PagedKVCache(len(g.layers), h, d, block_size=self.block_size, num_blocks=g.num_blocks,
                                        dtype=dtype, device=device, sliding_window=g.window) for g in groups]
            self._layer_at = [(0, 0)] * len(self.layers)
            for i, g in enumerate(groups):
                for j, layer in enumerate(g.layers):
                    self._layer_at[layer] = (i, j)
            self.cache = self.caches[0]
        return self.caches

    def _attend(self, layer: int, batch: BatchShape, payload: torch.Tensor) -> torch.Tensor:
        shard = self.layers[layer]
        q_lo, q_hi = shard.q_heads
        hq, hkv, d = q_hi - q_lo, shard.kv_hi - shard.kv_lo, shard.head_dim
        q, k, v = payload.view(batch.tokens, hq + 2 * hkv, d).split([hq, hkv, hkv], dim=1)
        caches = self._caches_for(payload.dtype, payload.device)
        group, local = self._layer_at[layer]
        cache = caches[group]  # every group's cache holds each sequence's same length
        for seq, start in zip(batch.seq_ids, batch.starts):
            if cache.length(seq) != start:
                raise ValueError(
                    f"sequence {seq}: its new tokens start at position {start} but the KV cache holds "
                    f"{cache.length(seq)} tokens (positions must continue the cache)"
                )
        if layer == 0:  # layer 0 makes room for the step in every group; the later layers find it made
            for g, c in enumerate(caches):
                for seq, n in zip(batch.seq_ids, batch.q_lens):
                    try:
                        c.reserve(seq, n)
                    except RuntimeError as exc:
                        if g == 0 or len(caches) == 1:
                            raise
                        # More num_blocks gives the full layers more blocks, not the sliding ones.
                        raise RuntimeError(
                            f"{exc} (the sliding layers' KV group, {c.num_blocks} blocks: raise "
                            f"sliding_blocks, which must hold every sequence's window and step at once)"
                        ) from None
        chunks = () if shard.attention_chunk is None else (shard.attention_chunk,)
        step = cache.prepare([cache.blocks(s) for s in batch.seq_ids], batch.q_lens, batch.starts,
                             attention_chunks=chunks)
        cache.write_batch(local, step, k, v)
        sinks = None if shard.sinks is None else per_head_tensor(shard.sinks, str(q.device))
        out = cache.attend_batch(local, q, step, scale=shard.scale, sliding_window=shard.sliding_window,
                                 softcap=shard.softcap, sinks=sinks, attention_chunk=shard.attention_chunk)
        if layer == len(self.layers) - 1:
            for c in caches:
                for seq, n in zip(batch.seq_ids, batch.q_lens):
                    c.commit(seq, n)
        return out
