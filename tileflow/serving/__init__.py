"""Hybrid prefill/decode/verify serving over a paged KV cache (continuous batching).

    program = tileflow.distributed.build_stage_program(CausalLMStep(model), example_inputs)
    engine = ServingEngine(program, token_budget=64, decode_slots=8, max_draft=3)
    metrics = engine.run([Request(0, prompt_ids, max_new_tokens=32)])
    # sampled instead of greedy: the same tokens in any batch, with or without drafts
    Request(1, prompt_ids, 32, sampling=SamplingParams(temperature=0.8, top_p=0.95, seed=7))
"""

from .blocks import (
    BlockAllocator, KVGroup, OutOfBlocks, common_window, kv_groups, prefix_hashes, release_behind_window,
    sliding_blocks_for,
)
from .engine import Metrics, ServingEngine, StepInputs, prompt_lookup_draft
from .nano_batches import split_entries, split_entries_at
from .sampling import SamplingParams, generate_reference, next_tokens
from .scheduler import Entry, Request, Scheduler, accept_draft

__all__ = [
    "BlockAllocator",
    "Entry",
    "KVGroup",
    "Metrics",
    "OutOfBlocks",
    "Request",
    "SamplingParams",
    "Scheduler",
    "ServingEngine",
    "StepInputs",
    "accept_draft",
    "common_window",
    "generate_reference",
    "kv_groups",
    "next_tokens",
    "prefix_hashes",
    "prompt_lookup_draft",
    "release_behind_window",
    "sliding_blocks_for",
    "split_entries",
    "split_entries_at",
]
