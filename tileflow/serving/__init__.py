"""Hybrid prefill/decode/verify serving over a paged KV cache (continuous batching).

    program = tileflow.distributed.build_stage_program(CausalLMStep(model), example_inputs)
    engine = ServingEngine(program, token_budget=64, decode_slots=8, max_draft=3)
    metrics = engine.run([Request(0, prompt_ids, max_new_tokens=32)])
"""

from .blocks import BlockAllocator, OutOfBlocks, common_window, prefix_hashes, release_behind_window
from .engine import Metrics, ServingEngine, StepInputs, prompt_lookup_draft, split_entries
from .scheduler import Entry, Request, Scheduler, accept_draft

__all__ = [
    "BlockAllocator",
    "Entry",
    "Metrics",
    "OutOfBlocks",
    "Request",
    "Scheduler",
    "ServingEngine",
    "StepInputs",
    "accept_draft",
    "common_window",
    "prefix_hashes",
    "prompt_lookup_draft",
    "release_behind_window",
    "split_entries",
]
