"""Who does what across ranks, and the message protocol they share.

Ranks 0 … m − 1 are model workers (rank 0 leads: it takes the batches and returns the outputs);
ranks m … world − 1 are attention workers, each owning a contiguous shard of the KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass

# Control opcodes (first element of an int64 control message).
OP_INIT, OP_ATTEND, OP_RELEASE, OP_STEP, OP_SHUTDOWN, OP_ABORT = range(1, 7)

# Tags: control to attention workers, plans to model replicas, then per-batch data tags.
TAG_ATTENTION = 1
TAG_PLAN = 2
_TAG_DATA = 8
_MAX_BATCHES = 256
_MAX_STAGES = 4096
_MAX_SLOTS = 64


def carry_tag(batch: int, stage: int, slot: int) -> int:
    """Tag of output `slot` of dense `stage` of in-flight `batch`, sent between model replicas."""
    if not (0 <= batch < _MAX_BATCHES and 0 <= stage < _MAX_STAGES and 0 <= slot < _MAX_SLOTS):
        raise ValueError(
            f"batch {batch}, stage {stage}, slot {slot} out of range (at most {_MAX_BATCHES} batches in flight, "
            f"{_MAX_STAGES} stages, {_MAX_SLOTS} outputs per stage)"
        )
    return _TAG_DATA + (batch * _MAX_STAGES + stage) * _MAX_SLOTS + slot


def attention_tag(batch: int, layer: int) -> int:
    """Tag of the attention output of `layer` for in-flight `batch`."""
    return carry_tag(batch, 0, 0) + _MAX_BATCHES * _MAX_STAGES * _MAX_SLOTS + layer


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
