"""Model-attention disaggregation across ranks (Lamina) on torch.distributed.

    layout, transport = init_distributed(timeout_s=30)         # under torchrun
    if layout.role(rank) == "attention":
        AttentionWorker(layout, transport).serve()
    else:
        worker = ModelWorker(build_stage_program(step, example_inputs), layout, transport)
        ...

Model workers run the dense stages the `disaggregate` pass cut out of the step; attention workers
own the paged KV cache, sharded by KV head, and run meta-attention on their shard.
"""

from .attention_worker import AttentionWorker, LayerShard
from .kv_cache import PagedKVCache
from .layout import BatchShape, Layout, replica_of, work_items
from .model_worker import Batch, ModelWorker, abort_run
from .program import CausalLMStep, build_stage_program, build_stage_programs, init_distributed, warmup_token_counts
from .transport import PeerError, RunAborted, Transport

__all__ = [
    "AttentionWorker",
    "Batch",
    "BatchShape",
    "CausalLMStep",
    "LayerShard",
    "Layout",
    "ModelWorker",
    "PagedKVCache",
    "PeerError",
    "RunAborted",
    "Transport",
    "abort_run",
    "build_stage_program",
    "build_stage_programs",
    "init_distributed",
    "replica_of",
    "warmup_token_counts",
    "work_items",
]
