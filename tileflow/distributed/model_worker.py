"""Model workers: run the dense stages of a `StageProgram`, staggered, with attention remote.

Each engine step runs one iteration of every batch in flight. The work items (dense stage k of
batch j) run in one global order on every rank, stage-major: D0(b0), D0(b1), …, D1(b0), D1(b1), …
So while the attention workers serve batch 0's layer k, the model worker already runs batch 1's
dense stage k (staggered pipelining). With m model replicas, item (j, k) runs on replica
(j + k) mod m (Lamina's rotation), and values a later stage needs travel to its replica.
Every send is non-blocking and every receive is for an item earlier in the global order, so
the schedule cannot deadlock; every receive has a timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from tileflow.passes.disaggregate import Source, StageProgram

from ..log import get_logger
from .attention_worker import LayerShard, encode_init
from .layout import (
    OP_ABORT, OP_ATTEND, OP_RELEASE, OP_SHUTDOWN, OP_STEP, TAG_ATTENTION, TAG_PLAN, Layout, attention_tag,
    carry_tag, replica_of,
)
from .transport import PeerError, RunAborted, Transport

log = get_logger("distributed")


@dataclass
class Batch:
    """One batch's iteration: the program inputs (tokens packed in one row) and, in token order,
    the sequences they belong to with each one's count of new tokens."""

    inputs: list[torch.Tensor]
    seq_ids: list[int]
    q_lens: list[int]

    def __post_init__(self) -> None:
        if len(self.seq_ids) != len(self.q_lens) or not self.seq_ids:
            raise ValueError(f"a batch needs one new-token count per sequence: {self.seq_ids} vs {self.q_lens}")
        if len(set(self.seq_ids)) != len(self.seq_ids):
            raise ValueError(f"sequence ids repeat within a batch: {self.seq_ids}")
        if any(n < 1 for n in self.q_lens):
            raise ValueError(f"every sequence needs at least one new token: {self.q_lens}")

    @property
    def tokens(self) -> int:
        """New tokens in the batch."""
        return sum(self.q_lens)


def abort_run(transport: Transport, layout: Layout, reason: str, *, wait_s: float = 2.0) -> None:
    """Best effort: tell every other rank the run failed and why, so they exit at once instead of
    waiting out their timeout. Peers that are gone are skipped."""
    data = torch.tensor(list(reason.encode()[:4000]), dtype=torch.uint8)
    for rank in range(layout.world_size):
        if rank == transport.rank:
            continue
        tag = TAG_ATTENTION if layout.role(rank) == "attention" else TAG_PLAN
        try:
            transport.send(torch.tensor([OP_ABORT], dtype=torch.int64), rank, tag)
            transport.send(data, rank, tag)
        except RuntimeError:
            pass
    try:
        transport.flush(wait_s)
    except PeerError:
        pass


class ModelWorker:
    """A model replica. On the leader (rank 0) `step` runs batches and returns their outputs; the
    other replicas call `serve`."""

    def __init__(
        self, program: StageProgram, layout: Layout, transport: Transport, *, block_size: int = 16,
        num_blocks: int = 1024, sliding_window: int | None = None,
    ) -> None:
        self.program = program
        self.layout = layout
        self.t = transport
        self.replica = layout.model_ranks.index(transport.rank)
        self.replicas = layout.model_workers
        self.num_layers = len(program.cuts)
        self.shards: list[list[tuple[int, int]]] = [layout.kv_shards(c.num_kv_heads) for c in program.cuts]
        self.block_size, self.num_blocks, self.sliding_window = block_size, num_blocks, sliding_window

    @property
    def is_leader(self) -> bool:
        """Rank 0 takes the batches."""
        return self.replica == 0

    # ---- leader API -----------------------------------------------------------------------------

    def start(self) -> None:
        """Tell every attention worker its shard of every layer (leader only)."""
        self._leader_only("start")
        for w, rank in enumerate(self.layout.attention_ranks):
            shards = [
                LayerShard(c.num_q_heads, c.num_kv_heads, c.head_dim, *self.shards[i][w], scale=c.scale)
                for i, c in enumerate(self.program.cuts)
            ]
            ctl, scales = encode_init(shards, self.block_size, self.num_blocks, self.sliding_window)
            self.t.send(ctl, rank, TAG_ATTENTION)
            self.t.send(scales, rank, TAG_ATTENTION)

    def step(self, batches: Sequence[Batch]) -> list[list[Any]]:
        """One iteration of every batch, staggered; returns each batch's flat program outputs."""
        self._leader_only("step")
        seen: set[int] = set()
        for b in batches:
            if seen & set(b.seq_ids):
                raise ValueError(f"sequences {sorted(seen & set(b.seq_ids))} are in two batches of one step")
            seen |= set(b.seq_ids)
        for rank in self.layout.model_ranks[1:]:
            self._send_plan(rank, batches)
        return self._run(list(batches))

    def release(self, seq_ids: Sequence[int]) -> None:
        """Free finished sequences' KV blocks on every attention worker."""
        self._leader_only("release")
        for rank in self.layout.attention_ranks:
            self.t.send(torch.tensor([OP_RELEASE, *seq_ids], dtype=torch.int64), rank, TAG_ATTENTION)

    def shutdown(self) -> None:
        """Stop every other rank cleanly."""
        self._leader_only("shutdown")
        for rank in self.layout.attention_ranks:
            self.t.send(torch.tensor([OP_SHUTDOWN], dtype=torch.int64), rank, TAG_ATTENTION)
        for rank in self.layout.model_ranks[1:]:
            self.t.send(torch.tensor([OP_SHUTDOWN], dtype=torch.int64), rank, TAG_PLAN)
        self.t.flush()

    def abort(self, reason: str, *, wait_s: float = 2.0) -> None:
        """Best effort: tell every other rank the run failed and why (see `abort_run`)."""
        abort_run(self.t, self.layout, reason, wait_s=wait_s)

    # ---- other replicas -------------------------------------------------------------------------

    def serve(self) -> None:
        """Run the leader's plans until SHUTDOWN (replicas other than the leader)."""
        if self.is_leader:
            raise RuntimeError("the leader drives with step(); serve() is for the other model replicas")
        while True:
            ctl = self.t.recv(0, TAG_PLAN, "the next step plan")
            op = int(ctl[0])
            if op == OP_SHUTDOWN:
                self.t.flush()
                return
            if op == OP_ABORT:
                reason = bytes(self.t.recv(0, TAG_PLAN, "the abort reason").tolist()).decode()
                raise RunAborted(f"rank {self.t.rank}: rank 0 aborted the run: {reason}")
            self._run(self._recv_plan(ctl))

    # ---- the schedule ---------------------------------------------------------------------------

    def _run(self, batches: list[Batch]) -> list[list[Any]]:
        values: list[dict[tuple[int, int], Any]] = [{} for _ in batches]
        for k in range(self.num_layers + 1):
            for j, batch in enumerate(batches):
                if replica_of(j, k, self.replicas) == self.replica:
                    self._run_dense(j, k, batch, values[j])
        if not self.is_leader:
            return []
        return [[self._value(j, src, b, values[j]) for src in self.program.outputs] for j, b in enumerate(batches)]

    def _run_dense(self, j: int, k: int, batch: Batch, values: dict[tuple[int, int], Any]) -> None:
        stage = self.program.stages[2 * k]
        args = [self._value(j, src, batch, values) for src in stage.inputs]
        outputs = stage.module(*args)
        for slot, value in enumerate(outputs):
            values[(stage.id, slot)] = value
            targets = {self._replica_needing(j, c) for c in self.program.consumers.get((stage.id, slot), [])}
            for r in sorted(targets - {self.replica}):
                self.t.send(value, self.layout.model_ranks[r], carry_tag(j, stage.id, slot))
        if k < self.num_layers:
            attention = self.program.stages[2 * k + 1]
            q, key, val = (self._value(j, src, batch, values) for src in attention.inputs)
            self._request_attention(j, k, batch, q, key, val)

    def _replica_needing(self, j: int, consumer: int) -> int:
        if consumer < 0:  # a program output: the leader collects it
            return 0
        # An attention stage 2k + 1 is requested by the replica that ran dense stage k.
        return replica_of(j, consumer // 2, self.replicas)

    def _value(self, j: int, src: Source, batch: Batch, values: dict[tuple[int, int], Any]) -> Any:
        if src.kind == "input":
            return batch.inputs[src.index]
        if src.kind == "constant":
            return self.program.constants[src.index]
        key = (src.index, src.slot)
        if key not in values:
            if src.index % 2 == 1:
                values[key] = self._gather_attention(j, src.index // 2, batch)
            else:
                owner = replica_of(j, src.index // 2, self.replicas)
                values[key] = self.t.recv(
                    self.layout.model_ranks[owner], carry_tag(j, src.index, src.slot),
                    f"output {src.slot} of dense stage {src.index // 2} (batch {j})",
                )
        return values[key]

    def _request_attention(self, j: int, layer: int, batch: Batch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        cut = self.program.cuts[layer]
        tokens = q.shape[2]
        if tokens != batch.tokens:
            raise ValueError(f"batch {j} has {tokens} tokens in its graph inputs but its sequences add up to {batch.tokens}")
        group = cut.group_size
        q, k, v = (x[0].transpose(0, 1) for x in (q, k, v))  # [T, heads, head_dim]
        reply_to = self.layout.model_ranks[replica_of(j, layer + 1, self.replicas)]
        ctl = torch.tensor(
            [OP_ATTEND, j, layer, reply_to, tokens, len(batch.seq_ids), *batch.seq_ids, *batch.q_lens], dtype=torch.int64,
        )
        for (lo, hi), rank in zip(self.shards[layer], self.layout.attention_ranks):
            payload = torch.cat([q[:, lo * group : hi * group], k[:, lo:hi], v[:, lo:hi]], dim=1)
            self.t.send(ctl, rank, TAG_ATTENTION)
            self.t.send(payload, rank, TAG_ATTENTION)

    def _gather_attention(self, j: int, layer: int, batch: Batch) -> torch.Tensor:
        parts = [
            self.t.recv(rank, attention_tag(j, layer), f"attention output of layer {layer} (batch {j})")
            for rank in self.layout.attention_ranks
        ]
        out = torch.cat(parts, dim=1)  # [T, Hq, D]
        return out.unsqueeze(0).transpose(1, 2)  # [1, Hq, T, D], as meta_attention returns it

    def _send_plan(self, rank: int, batches: Sequence[Batch]) -> None:
        ctl = [OP_STEP, len(batches)]
        for b in batches:
            ctl += [len(b.inputs), len(b.seq_ids), *b.seq_ids, *b.q_lens]
        self.t.send(torch.tensor(ctl, dtype=torch.int64), rank, TAG_PLAN)
        for b in batches:
            for x in b.inputs:
                self.t.send(x, rank, TAG_PLAN)

    def _recv_plan(self, ctl: torch.Tensor) -> list[Batch]:
        fields = ctl.tolist()
        n, pos = fields[1], 2
        shapes = []
        for _ in range(n):
            n_inputs, nseq = fields[pos], fields[pos + 1]
            seq_ids = fields[pos + 2 : pos + 2 + nseq]
            q_lens = fields[pos + 2 + nseq : pos + 2 + 2 * nseq]
            shapes.append((n_inputs, seq_ids, q_lens))
            pos += 2 + 2 * nseq
        return [
            Batch([self.t.recv(0, TAG_PLAN, "step inputs") for _ in range(n_inputs)], seq_ids, q_lens)
            for n_inputs, seq_ids, q_lens in shapes
        ]

    def _leader_only(self, what: str) -> None:
        if not self.is_leader:
            raise RuntimeError(f"{what}() runs on the leader (rank 0); other model replicas call serve()")
