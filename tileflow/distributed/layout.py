"""Who does what across ranks, and the message protocol they share.

Ranks 0 … m − 1 are model workers (rank 0 leads: it takes the batches and returns the outputs);
ranks m … world − 1 are attention workers, each owning a contiguous shard of the KV heads.

The protocol uses no tags and no any-source receives (NCCL has neither): every rank walks the
same global order of work items (dense stage k of batch j, stage-major), so between any two ranks
the receiver posts its receives in the order the sender sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

# Control opcodes: the first element of every message the leader sends between steps.
OP_INIT, OP_STEP, OP_SHUTDOWN = range(1, 4)


@dataclass(frozen=True)
class BatchShape:
    """What every rank must know of a batch: its sequences in token order, each one's count of
    new tokens and the position of its first new token (its KV length before the step)."""

    seq_ids: tuple[int, ...]
    q_lens: tuple[int, ...]
    starts: tuple[int, ...]

    @property
    def tokens(self) -> int:
        """New tokens in the batch."""
        return sum(self.q_lens)


def encode_plan(batches: Sequence[BatchShape], release: Sequence[int], inputs_per_batch: int) -> torch.Tensor:
    """The STEP message: sequences to release first, then each batch's shape."""
    ctl = [OP_STEP, len(batches), inputs_per_batch, len(release), *release]
    for b in batches:
        ctl += [len(b.seq_ids), *b.seq_ids, *b.q_lens, *b.starts]
    return torch.tensor(ctl, dtype=torch.int64)


def decode_plan(ctl: torch.Tensor) -> tuple[list[BatchShape], list[int], int]:
    """(batch shapes, sequences to release, inputs per batch) from a STEP message."""
    fields = ctl.tolist()
    n_batches, inputs_per_batch, n_release = fields[1:4]
    pos = 4 + n_release
    release = fields[4:pos]
    batches = []
    for _ in range(n_batches):
        n = fields[pos]
        seq_ids, q_lens, starts = (tuple(fields[pos + 1 + i * n : pos + 1 + (i + 1) * n]) for i in range(3))
        batches.append(BatchShape(seq_ids, q_lens, starts))
        pos += 1 + 3 * n
    return batches, release, inputs_per_batch


def work_items(num_batches: int, num_dense_stages: int) -> list[tuple[int, int]]:
    """The global order every rank walks: (dense stage k, batch j), stage-major, so batch j + 1's
    stage k runs while batch j's attention k is away (staggered pipelining)."""
    return [(k, j) for k in range(num_dense_stages) for j in range(num_batches)]

def replica_of(batch: int, stage: int, replicas: int) -> int:
    """Lamina's rotation: dense `stage` of `batch` runs on model replica (batch + stage) mod replicas,
    so consecutive slices of a batch move on to the next replica while it waits on attention."""
    return (batch + stage) % replicas


@dataclass(frozen=True)
class Layout:
    """The ranks' roles: `model_workers` model replicas first, attention workers after."""

    world_size: int
    model_workers: int = 1

    def __post_init__(self) -> None:
        if self.model_workers < 1 or self.world_size - self.model_workers < 1:
            raise ValueError(
                f"need at least one model worker and one attention worker: world size {self.world_size} with "
                f"{self.model_workers} model worker(s) (launch with torchrun --nproc-per-node N, N > model workers)"
            )

    @property
    def model_ranks(self) -> list[int]:
        """Ranks of the model replicas (rank 0 leads)."""
        return list(range(self.model_workers))

    @property
    def attention_ranks(self) -> list[int]:
        """Ranks of the attention workers."""
        return list(range(self.model_workers, self.world_size))

    def role(self, rank: int) -> str:
        """`"model"` or `"attention"`."""
        return "model" if rank < self.model_workers else "attention"

    def kv_shards(self, num_kv_heads: int) -> list[tuple[int, int]]:
        """Each attention worker's KV heads [lo, hi): contiguous, sizes differing by at most one."""
        n = len(self.attention_ranks)
        if n > num_kv_heads:
            raise ValueError(
                f"{n} attention workers but only {num_kv_heads} KV heads: the cache is sharded by KV head, "
                f"so use at most {num_kv_heads} attention workers"
            )
        return [(i * num_kv_heads // n, (i + 1) * num_kv_heads // n) for i in range(n)]
