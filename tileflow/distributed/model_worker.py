"""Model workers: run the dense stages of a `StageProgram`, staggered, with attention remote.

Each engine step runs one iteration of every batch in flight. Every rank walks the work items
(dense stage k of batch j) in one global order, stage-major: D0(b0), D0(b1), …, D1(b0), D1(b1), …
so while the attention workers serve batch 0's layer k, the model worker already runs batch 1's
dense stage k (staggered pipelining). With m model replicas, item (k, j) runs on replica
(j + k) mod m (Lamina's rotation), and the values a later stage needs travel to its replica:
after each item its producer sends, to each other replica, the outputs that replica will need, in
slot order; a replica receives them, in the global order of the items that produced them, before
its next item. Sends never block and every receive waits on an earlier item, so the schedule
cannot deadlock; every receive has a timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from tileflow.passes.disaggregate import Source, StageProgram

from ..log import get_logger
from ..runtime.paged_kv import check_chunk_blocks
from ..transfers import to_device
from .attention_worker import LayerShard, encode_init
from .layout import (
    OP_SHUTDOWN, OP_STEP, BatchShape, Layout, decode_plan, encode_plan, replica_of, work_items,
)
from .transport import PeerError, RunAborted, Transport

log = get_logger("distributed")


@dataclass
class Batch:
    """One batch's iteration: the program inputs (tokens packed along dim 1 of each) and, in
    token order, its sequences with each one's count of new tokens and first new position."""

    inputs: list[torch.Tensor]
    seq_ids: list[int]
    q_lens: list[int]
    starts: list[int]

    def __post_init__(self) -> None:
        if not self.seq_ids or not (len(self.seq_ids) == len(self.q_lens) == len(self.starts)):
            raise ValueError(
                f"a batch needs, per sequence, a new-token count and a start position: {self.seq_ids}, "
                f"{self.q_lens}, {self.starts}"
            )
        if len(set(self.seq_ids)) != len(self.seq_ids):
            raise ValueError(f"sequence ids repeat within a batch: {self.seq_ids}")
        if any(n < 1 for n in self.q_lens) or any(s < 0 for s in self.starts):
            raise ValueError(f"every sequence needs >= 1 new token and a start >= 0: {self.q_lens}, {self.starts}")
        for x in self.inputs:
            if x.dim() < 2 or x.shape[0] != 1 or x.shape[1] != self.tokens:
                raise ValueError(
                    f"inputs must be [1, tokens, ...] with the sequences' {self.tokens} tokens packed along dim 1, "
                    f"got shape {tuple(x.shape)}"
                )

    @property
    def tokens(self) -> int:
        """New tokens in the batch."""
        return sum(self.q_lens)

    @property
    def shape(self) -> BatchShape:
        """What the other ranks need to know of the batch."""
        return BatchShape(tuple(self.seq_ids), tuple(self.q_lens), tuple(self.starts))


def abort_run(transport: Transport, layout: Layout, reason: str, *, wait_s: float = 2.0) -> None:
    """Best effort, from the leader (the rank every other one hears from between steps): tell
    every other rank the run failed and why. A rank hears it at its next receive from the leader;
    one waiting on another rank hears it once that wait ends (its own timeout at the latest)."""
    for rank in range(layout.world_size):
        if rank == transport.rank:
            continue
        try:
            transport.send_failure(reason, rank)
        except PeerError:
            pass  # that peer is gone; the others still hear
    try:
        transport.flush(wait_s)
    except PeerError:
        pass


class ModelWorker:
    """A model replica. On the leader (rank 0) `step` runs batches and returns their outputs; the
    other replicas call `serve`. Each attention worker keeps `num_blocks` blocks of
    `block_size` positions per layer. `sliding_blocks`, for a model mixing full and
    sliding-window layers: the sliding layers' own blocks per attention worker, given back
    behind the window, enough for every sequence at once (its window and its step's new
    tokens: the workers have no scheduler to wait or preempt); the full layers get the memory
    that leaves, as more blocks (`tileflow.serving.kv_groups`). None: every layer's blocks stay
    until their sequence is released."""

    def __init__(
        self, program: StageProgram, layout: Layout, transport: Transport, *, block_size: int = 16,
        num_blocks: int = 1024, idle_timeout_s: float | None = None, sliding_blocks: int | None = None,
    ) -> None:
        for label, value in (("block_size", block_size), ("num_blocks", num_blocks)):
            # The attention workers refuse them only at the first step, once its plan is out:
            # that ends the run.
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be an int >= 1, got {value!r}")
        if sliding_blocks is not None and (isinstance(sliding_blocks, bool) or not isinstance(sliding_blocks, int)
                                           or sliding_blocks < 1):
            raise ValueError(f"sliding_blocks must be an int >= 1 or None, got {sliding_blocks!r}")
        for cut_stage in (s for s in program.stages if s.kind == "attention"):
            # The reply goes to the replica of the next dense stage: nothing else may read it.
            if program.consumers.get((cut_stage.id, 0)) != [cut_stage.id + 1]:
                raise ValueError(
                    f"attention stage {cut_stage.index}'s output is read by stages "
                    f"{program.consumers.get((cut_stage.id, 0))}, not only by dense stage {cut_stage.index + 1}"
                )
        self.program = program
        self.layout = layout
        self.t = transport
        self.replica = layout.model_ranks.index(transport.rank)
        self.replicas = layout.model_workers
        self.num_layers = len(program.cuts)
        self.shards: list[list[tuple[int, int]]] = [layout.kv_shards(c.num_kv_heads) for c in program.cuts]
        # An attention worker keeps one paged cache for every layer: the same KV heads and head
        # size in each (it would refuse its INIT, and the leader hear only that it died).
        per_layer = sorted({(c.num_kv_heads, c.head_dim) for c in program.cuts})
        if len(per_layer) > 1:
            raise ValueError(
                f"layers differ in KV heads or head size, (KV heads, head size) = {per_layer}: an attention "
                "worker's KV cache holds the same heads for every layer"
            )
        check_chunk_blocks((c.attention_chunk for c in program.cuts), block_size)
        self.block_size, self.num_blocks, self.sliding_blocks = block_size, num_blocks, sliding_blocks
        self.idle_timeout_s = idle_timeout_s
        self._release: list[int] = []
        self._broken: str | None = None  # why a step failed after its plan went out
        # The attention workers read INIT first and nothing after SHUTDOWN: "new", "started", "shut down".
        self._state = "new"

    @property
    def is_leader(self) -> bool:
        """Rank 0 takes the batches."""
        return self.replica == 0

    # ---- leader API -----------------------------------------------------------------------------

    def start(self) -> None:
        """Tell every attention worker its shard of every layer (leader only; the first step does
        it when not done yet, and a second call does nothing)."""
        self._leader_only("start")
        if self._state == "shut down":
            raise RuntimeError("the run was shut down: start a new one")
        if self._state == "started":
            return  # a second INIT would reach the attention workers as a step plan, and end the run
        self._state = "started"
        for w, rank in enumerate(self.layout.attention_ranks):
            shards = [
                LayerShard(c.num_q_heads, c.num_kv_heads, c.head_dim, *self.shards[i][w], scale=c.scale,
                           sliding_window=c.sliding_window, softcap=c.softcap,
                           sinks=_shard_sinks(c.sinks, c.group_size, *self.shards[i][w]),
                           attention_chunk=c.attention_chunk)
                for i, c in enumerate(self.program.cuts)
            ]
            ctl, scales = encode_init(shards, self.block_size, self.num_blocks, self.sliding_blocks)
            self.t.send(ctl, rank)
            self.t.send(scales, rank)

    @torch.inference_mode()
    def step(self, batches: Sequence[Batch]) -> list[list[Any]]:
        """One iteration of every batch, staggered; returns each batch's flat program outputs.
        A step that fails once the plan went out ends the run on every rank (`abort_run`; after
        a peer's failure, `PeerError`, the caller's), and this worker refuses later steps."""
        self._leader_only("step")
        if self._state == "shut down":
            raise RuntimeError("the run was shut down: start a new one")
        if self._broken:
            raise RuntimeError(f"an earlier step failed after the other ranks had its plan ({self._broken}); the run "
                               "is over: start a new one")
        seen: set[int] = set()
        for b in batches:
            if seen & set(b.seq_ids):
                raise ValueError(f"sequences {sorted(seen & set(b.seq_ids))} are in two batches of one step")
            seen |= set(b.seq_ids)
            if len(b.inputs) != self.program.num_inputs:
                raise ValueError(f"the program takes {self.program.num_inputs} inputs, a batch gave {len(b.inputs)}")
            self._check_batch(b)
        # Nothing has been sent yet: a batch refused above leaves every rank ready for the next step.
        # Without INIT first the attention workers would read the plan as it and stop, and this
        # rank hear only that they closed their connections.
        self.start()
        plan = encode_plan([b.shape for b in batches], self._release, self.program.num_inputs)
        self._release = []
        for rank in self.layout.model_ranks[1:]:
            self.t.send(plan, rank)
            for b in batches:
                for x in b.inputs:
                    self.t.send(x, rank)
        for rank in self.layout.attention_ranks:
            self.t.send(plan, rank)
        try:
            return self._run(list(batches))
        except PeerError as exc:
            # Another rank failed: it told the others, or they hear of it from their waits. The
            # run is over here too: a rank that was only late (a receive here timed out) still
            # sends this step's outputs, which a later step would read as its own.
            self._broken = f"{type(exc).__name__}: {exc}"
            raise
        except Exception as exc:
            # The other ranks wait for this step's messages: tell them the run failed and why (the
            # next step would otherwise be read as this one's), and refuse any later step here.
            self._broken = f"{type(exc).__name__}: {exc}"
            abort_run(self.t, self.layout, f"the leader's step failed: {self._broken}")
            raise

    def _check_batch(self, b: Batch) -> None:
        """What the program cannot run, refused before the plan goes out: once the attention
        workers have it they wait for the step's q/k/v, and a dense stage failing mid-step (a
        failed shape guard, an embedding index error) would leave them reading the next step's
        messages as those."""
        p = self.program
        for i, x in enumerate(b.inputs):
            # Token ids and positions: integers of shape [1, T] (a float id or a [1, T, 1] shape
            # would fail inside a dense stage, once the other ranks wait for the step).
            if i < 2 and (not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex()
                          or x.dtype == torch.bool or tuple(x.shape) != (1, b.tokens)):
                what = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"input {i} ({'token ids' if i == 0 else 'positions'}) of the batch of sequences "
                                 f"{b.seq_ids} must be an integer tensor of shape [1, {b.tokens}], got a {what}")
        if p.max_tokens is not None and b.tokens > p.max_tokens:
            raise ValueError(f"a batch of {b.tokens} tokens is more than the {p.max_tokens} a step of this program "
                             "may hold: split it, or build the program with build_stage_program(max_tokens=...)")
        # (input, bound, what, why the bound): the token table's rows, the positions the step holds for.
        bounds_of = ((0, p.vocab_size, "token ids", "vocabulary entries"),
                     (1, p.max_positions, "positions", p.max_positions_reason))
        checks = [c for c in bounds_of if c[1] is not None and c[0] < len(b.inputs) and b.inputs[c[0]].numel()]
        positions = b.inputs[1][0] if len(b.inputs) > 1 else None
        if not checks and positions is None:
            return
        # One read-back for every check: each read of a device value waits for the device.
        device = b.inputs[checks[0][0] if checks else 1].device
        rows_read = [torch.stack(torch.aminmax(b.inputs[index])).to(device, torch.int64) for index, *_ in checks]
        if positions is not None:
            # The attention workers place keys and apply the causal rule by `starts`, the model's
            # rotary embedding by the positions: positions that do not continue each sequence
            # from its start would give other logits than the model's, with no error.
            # (Compared where the positions are, after a copy that does not wait for the device.)
            (expected,) = to_device(positions.device, np.concatenate(
                [np.arange(s, s + n, dtype=np.int64) for s, n in zip(b.starts, b.q_lens)]))
            off = positions != expected
            rows_read.append(torch.stack([off.any().to(torch.int64), off.to(torch.int64).argmax()]).to(device))
        read = torch.stack(rows_read).tolist()
        for (_, rows, what, why), (lo, hi) in zip(checks, read):
            if lo < 0 or hi >= rows:
                bad = lo if lo < 0 else hi
                raise ValueError(f"{what} must be in [0, {rows}) (the model's {rows} {why}), got {bad} "
                                 f"in the batch of sequences {b.seq_ids}")
        if positions is not None and read[-1][0]:
            at = read[-1][1]
            i = next(i for i in range(len(b.q_lens)) if at < sum(b.q_lens[: i + 1]))
            first = sum(b.q_lens[:i])
            got = positions[first : first + b.q_lens[i]].tolist()
            raise ValueError(f"positions (input 1) of sequence {b.seq_ids[i]} must run from its start {b.starts[i]} "
                             f"to {b.starts[i] + b.q_lens[i] - 1} (its KV length before the step, then one per new "
                             f"token), got {got}")

    def release(self, seq_ids: Sequence[int]) -> None:
        """Free finished sequences' KV blocks on every attention worker (before the next step)."""
        self._leader_only("release")
        self._release.extend(seq_ids)

    def shutdown(self) -> None:
        """Stop every other rank cleanly."""
        self._leader_only("shutdown")
        if self._state == "shut down":
            return  # the other ranks have gone
        self._state = "shut down"
        for rank in range(1, self.layout.world_size):
            self.t.send(torch.tensor([OP_SHUTDOWN], dtype=torch.int64), rank)
        self.t.flush()

    # ---- other replicas -------------------------------------------------------------------------

    @torch.inference_mode()
    def serve(self) -> None:
        """Run the leader's steps until SHUTDOWN (replicas other than the leader)."""
        if self.is_leader:
            raise RuntimeError("the leader drives with step(); serve() is for the other model replicas")
        while True:
            ctl = self.t.recv(0, "the next step plan", self.idle_timeout_s)
            op = int(ctl[0])
            if op == OP_SHUTDOWN:
                self.t.flush()
                return
            if op != OP_STEP:
                raise PeerError(f"rank {self.t.rank}: unexpected opcode {op} from rank 0 (expected a step plan)")
            shapes, _, n_inputs = decode_plan(ctl)
            batches = [
                Batch([self.t.recv(0, "step inputs") for _ in range(n_inputs)], list(s.seq_ids), list(s.q_lens), list(s.starts))
                for s in shapes
            ]
            try:
                self._run(batches)
            except Exception as exc:
                self._tell_leader(exc)
                raise

    def _tell_leader(self, exc: Exception) -> None:
        """Send the leader why this replica's step failed (its own error, or an attention worker's,
        which reaches only the replica waiting for that output): the leader reports the run's
        failure, and otherwise hears only that this rank closed its connection, or times out."""
        leader = self.layout.model_ranks[0]
        if isinstance(exc, RunAborted) and exc.src == leader:
            return  # the leader's own abort: it knows
        reason = str(exc) if isinstance(exc, RunAborted) else f"model replica rank {self.t.rank}: {type(exc).__name__}: {exc}"
        try:
            self.t.send_failure(reason, leader)
        except PeerError:
            pass  # the leader is gone: it has its own error

    # ---- the schedule ---------------------------------------------------------------------------

    def _run(self, batches: list[Batch]) -> list[list[Any]]:
        values: list[dict[tuple[int, int], Any]] = [{} for _ in batches]
        items = work_items(len(batches), self.num_layers + 1)
        received = 0  # items before this index have had their values for us received
        for index, (k, j) in enumerate(items):
            if replica_of(j, k, self.replicas) != self.replica:
                continue
            received = self._receive_carries(items, received, index, values)
            self._run_dense(j, k, batches[j], values[j])
        if not self.is_leader:
            return []
        self._receive_carries(items, received, len(items), values)
        return [[self._value(j, src, b, values[j]) for src in self.program.outputs] for j, b in enumerate(batches)]

    def _needed_slots(self, j: int, k: int, replica: int) -> list[int]:
        """Outputs of dense stage k of batch j that `replica` will read, in slot order."""
        sid = 2 * k
        return sorted(
            slot for (stage, slot), users in self.program.consumers.items()
            if stage == sid and any(self._replica_reading(j, u) == replica for u in users)
        )

    def _replica_reading(self, j: int, consumer: int) -> int:
        if consumer < 0:  # a program output: the leader collects it
            return 0
        # Attention stage 2k + 1 reads its q/k/v on the replica that ran dense stage k.
        return replica_of(j, consumer // 2, self.replicas)

    def _receive_carries(self, items: list[tuple[int, int]], start: int, stop: int, values: list[dict]) -> int:
        """Receive what other replicas' items start … stop − 1 produced for this replica."""
        for k, j in items[start:stop]:
            owner = replica_of(j, k, self.replicas)
            if owner == self.replica:
                continue
            for slot in self._needed_slots(j, k, self.replica):
                values[j][(2 * k, slot)] = self.t.recv(
                    self.layout.model_ranks[owner], f"output {slot} of dense stage {k} (batch {j})",
                )
        return stop

    def _run_dense(self, j: int, k: int, batch: Batch, values: dict[tuple[int, int], Any]) -> None:
        stage = self.program.stages[2 * k]
        args = [self._value(j, src, batch, values) for src in stage.inputs]
        outputs = stage.module(*args)
        for slot, value in enumerate(outputs):
            values[(stage.id, slot)] = value
        for r in range(self.replicas):
            if r != self.replica:
                for slot in self._needed_slots(j, k, r):
                    self.t.send(outputs[slot], self.layout.model_ranks[r])
        if k < self.num_layers:
            attention = self.program.stages[2 * k + 1]
            q, key, val = (self._value(j, src, batch, values) for src in attention.inputs)
            self._request_attention(k, q, key, val)

    def _value(self, j: int, src: Source, batch: Batch, values: dict[tuple[int, int], Any]) -> Any:
        if src.kind == "input":
            return batch.inputs[src.index]
        if src.kind == "constant":
            return self.program.constants[src.index]
        key = (src.index, src.slot)
        if key not in values:
            if src.index % 2 == 0:
                raise AssertionError(f"output {src.slot} of dense stage {src.index // 2} (batch {j}) never arrived")
            values[key] = self._gather_attention(j, src.index // 2)
        return values[key]

    def _request_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        group = self.program.cuts[layer].group_size
        q, k, v = (x[0].transpose(0, 1) for x in (q, k, v))  # [T, heads, head_dim]
        for (lo, hi), rank in zip(self.shards[layer], self.layout.attention_ranks):
            self.t.send(torch.cat([q[:, lo * group : hi * group], k[:, lo:hi], v[:, lo:hi]], dim=1), rank)

    def _gather_attention(self, j: int, layer: int) -> torch.Tensor:
        parts = []
        for rank in self.layout.attention_ranks:
            parts.append(self.t.recv(rank, f"attention output of layer {layer} (batch {j})"))
        out = torch.cat(parts, dim=1)  # [T, Hq, D]
        return out.unsqueeze(0).transpose(1, 2)  # [1, Hq, T, D], as meta_attention returns it

    def _leader_only(self, what: str) -> None:
        if not self.is_leader:
            raise RuntimeError(f"{what}() runs on the leader (rank 0); other model replicas call serve()")


def _shard_sinks(sinks: tuple[float, ...] | None, group: int, kv_lo: int, kv_hi: int) -> tuple[float, ...] | None:
    """The sink logits of the query heads that read KV heads [kv_lo, kv_hi)."""
    return None if sinks is None else sinks[kv_lo * group:kv_hi * group]
