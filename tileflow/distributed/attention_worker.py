"""Attention worker: owns a KV-head shard of the paged cache and runs meta-attention on it.

It serves requests from the model workers in arrival order: for one layer of one batch it
appends the new tokens' k/v to its cache and attends the batch's queries (the query heads of its
KV heads) over each sequence's whole cache, causally, with the meta-attention varlen op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..log import get_logger
from ..ops import meta_attention_varlen
from .kv_cache import PagedKVCache
from .layout import OP_ABORT, OP_ATTEND, OP_INIT, OP_RELEASE, OP_SHUTDOWN, TAG_ATTENTION, attention_tag
from .transport import PeerError, RunAborted, Transport

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

    @property
    def q_heads(self) -> tuple[int, int]:
        """The query heads [lo, hi) that read this shard's KV heads."""
        group = self.num_q_heads // self.num_kv_heads
        return self.kv_lo * group, self.kv_hi * group


def encode_init(layers: list[LayerShard], block_size: int, num_blocks: int, sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The INIT control message and its float64 scales."""
    ctl = [OP_INIT, len(layers), block_size, num_blocks, -1 if sliding_window is None else sliding_window]
    for s in layers:
        ctl += [s.num_q_heads, s.num_kv_heads, s.head_dim, s.kv_lo, s.kv_hi]
    return torch.tensor(ctl, dtype=torch.int64), torch.tensor([s.scale for s in layers], dtype=torch.float64)


class AttentionWorker:
    """Serves attention requests until the leader says stop (or a peer fails)."""

    def __init__(self, transport: Transport, leader: int = 0) -> None:
        self.transport = transport
        self.leader = leader
        self.layers: list[LayerShard] = []
        self.cache: PagedKVCache | None = None
        self.requests = 0

    def serve(self) -> None:
        """Handle requests until SHUTDOWN; raises `PeerError` on a timeout, a dead peer or ABORT."""
        t = self.transport
        while True:
            src, ctl = t.recv_any(TAG_ATTENTION, "the next attention request")
            op = int(ctl[0])
            if op == OP_INIT:
                self._init(ctl, t.recv(src, TAG_ATTENTION, "layer scales"))
            elif op == OP_ATTEND:
                self._attend(src, ctl)
            elif op == OP_RELEASE:
                for seq in ctl[1:].tolist():
                    self._cache().release(seq)
            elif op == OP_SHUTDOWN:
                t.flush()
                log.info("attention worker %d: shutdown after %d requests", t.rank, self.requests)
                return
            elif op == OP_ABORT:
                reason = bytes(t.recv(src, TAG_ATTENTION, "the abort reason").tolist()).decode()
                raise RunAborted(f"rank {t.rank}: rank {src} aborted the run: {reason}")
            else:
                raise PeerError(f"rank {t.rank}: unknown opcode {op} from rank {src}")

    def _init(self, ctl: torch.Tensor, scales: torch.Tensor) -> None:
        n, self.block_size, self.num_blocks, window = (int(x) for x in ctl[1:5])
        self.sliding_window = None if window < 0 else window
        fields = ctl[5:].view(n, 5).tolist()
        self.layers = [LayerShard(*f, scale=float(s)) for f, s in zip(fields, scales.tolist())]
        self.cache = None

    def _cache(self, dtype: torch.dtype = torch.float32) -> PagedKVCache:
        if self.cache is None:
            if not self.layers:
                raise PeerError(f"rank {self.transport.rank}: attention request before INIT")
            heads = {(s.kv_hi - s.kv_lo, s.head_dim) for s in self.layers}
            if len(heads) != 1:
                raise ValueError(f"layers differ in KV heads or head size per shard: {sorted(heads)}")
            (h, d), = heads
            self.cache = PagedKVCache(
                len(self.layers), h, d, block_size=self.block_size, num_blocks=self.num_blocks, dtype=dtype,
            )
        return self.cache

    def _attend(self, src: int, ctl: torch.Tensor) -> None:
        batch, layer, reply_to, tokens, nseq = (int(x) for x in ctl[1:6])
        seq_ids = ctl[6 : 6 + nseq].tolist()
        q_lens = ctl[6 + nseq : 6 + 2 * nseq].tolist()
        payload = self.transport.recv(src, TAG_ATTENTION, f"q/k/v of layer {layer}")
        shard = self.layers[layer]
        q_lo, q_hi = shard.q_heads
        hq, hkv, d = q_hi - q_lo, shard.kv_hi - shard.kv_lo, shard.head_dim
        q, k, v = payload.view(tokens, hq + 2 * hkv, d).split([hq, hkv, hkv], dim=1)
        cache = self._cache(payload.dtype)
        last_layer = layer == len(self.layers) - 1
        starts = []
        row = 0
        for seq, n in zip(seq_ids, q_lens):
            # Layer 0 reserves room for the step; later layers find it reserved.
            start = cache.reserve(seq, n) if layer == 0 else cache.length(seq)
            cache.write(layer, seq, start, k[row : row + n], v[row : row + n])
            starts.append(start)
            row += n
        cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        seqlens = torch.tensor([s + n for s, n in zip(starts, q_lens)], dtype=torch.int32)
        out = meta_attention_varlen(
            q.contiguous(), cache.k[layer], cache.v[layer], cache.block_table(seq_ids), cu, seqlens,
            scale=shard.scale, causal=True, sliding_window=self.sliding_window,
        )
        if last_layer:
            for seq, n in zip(seq_ids, q_lens):
                cache.commit(seq, n)
        self.transport.send(out, reply_to, attention_tag(batch, layer))
        self.requests += 1
