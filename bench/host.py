"""What tileflow's host-side planning costs: the work done on the CPU before a launch, measured
on the CPU it runs on (no GPU needed).

- `build_task_table` for serving batches on an H100-sized grid (Llama-3-8B heads, 32 q / 8 kv):
  a large decode batch with prompt chunks (512 sequences), 256 decodes at random lengths, and a
  128k-context decode beside 200 short ones (the batch whose deal splits long tiles to balance);
  a decode step whose lengths changed builds its table anew, so this is paid per step.
- `build_tile_plan` for the Llama-3-8B GEMM shapes over M in [1, 65536] (once per compile).
- `search_split` for a Llama-like layer's nano-batch split at 2048 tokens (once per bucket), and
  for a decode step of 256 sequences over `--decode-layers` Llama-like layers with a 4096-token
  cache (the threshold's whole scan is most of it).
- what a decode step under `nano_batches="auto"` pays at a new bucket of its sequence count and
  of its cache's length (`NanoBatchPlan.sizes`: its bucket's search, and at a count between
  powers of two whether the split scaled to it wins, else the bucket below's), 256 (a power of
  two) and 200 sequences.
- what a serving step of 512 decodes over 4096-token caches pays under the serving engine's
  `nano_batches="auto"` (`AutoSplit.split` over a stage program of `--decode-layers` such
  layers): at a new shape (its bucket's search), and at a kept one (the next step, each cache
  a token longer: the step's costs and the kept answer looked up, the entries cut); and a mixed
  step of 300 decodes and two prompt chunks of new sizes, its bucket searched before (what most
  mixed steps pay: the split checked on the step's costs).

Each row is the median of `--repeats` runs (caches cleared before each). Writes
bench/results/host-*.md unless `--no-write`.

    python bench/host.py [--repeats 20] [--decode-layers 32] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, markdown_table, wall_median_ms, write_results  # noqa: E402

from tileflow import search  # noqa: E402
from tileflow.devices import get_device  # noqa: E402
from tileflow.passes.disaggregate import AttentionCut, Stage, StageProgram  # noqa: E402
from tileflow.passes.nanobatch import NanoBatchPlan  # noqa: E402
from tileflow.serving import Entry, Request  # noqa: E402
from tileflow.serving.nano_batches import AutoSplit  # noqa: E402
from tileflow.tasks import build_task_table  # noqa: E402
from tileflow.tiles import build_tile_plan, clear_plan_cache  # noqa: E402

HQ, HKV, PROGRAMS = 32, 8, 132


def _cu(q_lens: list[int]) -> list[int]:
    return [0, *np.cumsum(q_lens).tolist()]


def _task_table_cases() -> dict[str, tuple[list[int], list[int]]]:
    """(cu_seqlens_q, seqlens_kv) of each measured batch (seeded)."""
    rng = np.random.default_rng(1)
    mixed_q = [1] * 500 + [64] * 12
    decodes = [int(x) for x in rng.integers(1024, 32768, 256)]
    return {
        "500 decodes + 12 chunks of 64 (512 seqs)": (_cu(mixed_q), [int(x) for x in rng.integers(64, 8192, 512)]),
        "256 decodes at 1k-32k": (_cu([1] * 256), decodes),
        "128k decode beside 200 decodes at 2k (split to balance)": (_cu([1] * 201), [131072] + [2048] * 200),
    }


def measure(repeats: int, decode_layers: int = 32) -> list[list[Any]]:
    """One row per measured call: what, its size, the median ms."""
    rows: list[list[Any]] = []
    for name, (cu, kv) in _task_table_cases().items():
        table = build_task_table(cu, kv, num_q_heads=HQ, num_kv_heads=HKV, block_q=16, num_programs=PROGRAMS)
        summary = table.to_summary()
        ms = wall_median_ms(lambda: build_task_table(cu, kv, num_q_heads=HQ, num_kv_heads=HKV, block_q=16,
                                                 num_programs=PROGRAMS), repeats)
        rows.append(["build_task_table", f"{name}: {summary['num_tasks']} tasks, max/avg {summary['cost_ratio']:.2f}",
                     f"{ms:.2f}"])
    h100 = get_device("H100")
    for n, k in ((6144, 4096), (28672, 4096), (4096, 14336)):
        ms = wall_median_ms(lambda: build_tile_plan(n, k, "bfloat16", m_max=65536, device=h100), repeats,
                        before=clear_plan_cache)
        rows.append(["build_tile_plan", f"N={n} K={k} bf16, M in [1, 65536]", f"{ms:.2f}"])
    layer = _llama_layer(context=2048)
    ms = wall_median_ms(lambda: search.search_split(layer, h100, 2048), repeats, before=search.clear_cache)
    rows.append(["search_split", "Llama-like layer, 2048 tokens", f"{ms:.2f}"])
    # A decode step's profile: each sequence one row, attention reading its whole cache.
    decode = [op for _ in range(decode_layers) for op in _llama_layer(context=4096)]
    ms = wall_median_ms(lambda: search.search_split(decode, h100, 256), repeats, before=search.clear_cache)
    rows.append(["search_split", f"{decode_layers} Llama-like decode layers, 256 sequences, 4096-token caches",
                 f"{ms:.2f}"])
    # What a step under nano_batches="auto" pays at a new bucket of its count and of its cache's
    # length: the runner's plan (a bare one over this profile) answering the step's sizes.
    for seqs in (256, 200):
        ms = wall_median_ms(lambda: NanoBatchPlan("auto", (0, 0), {}, {}, [], [], profile=decode, device=h100).sizes(seqs),
                            repeats, before=search.clear_cache)
        rows.append(['NanoBatchPlan.sizes ("auto")',
                     f"{decode_layers} Llama-like decode layers, {seqs} sequences, 4096-token caches", f"{ms:.2f}"])
    program = serving_program(decode_layers)
    steps = [[Entry(Request(i, [1], 1), [1], start, "decode") for i in range(512)] for start in (4000, 4001)]
    ms = wall_median_ms(lambda: AutoSplit(program, h100).split(steps[0]), repeats, before=search.clear_cache)
    what = f"{decode_layers} Llama-like layers' stage program, 512 decodes, 4096-token caches"
    rows.append(['AutoSplit.split (serving "auto")', f"{what}: a new shape", f"{ms:.2f}"])
    kept = AutoSplit(program, h100)
    kept.split(steps[0])
    ms = wall_median_ms(lambda: kept.split(steps[1]), repeats)
    rows.append(['AutoSplit.split (serving "auto")', f"{what}: a kept shape, caches a token longer", f"{ms:.2f}"])
    # A mixed step's prompt chunks change from step to step: most steps are a new shape whose
    # bucket was searched before (the split checked on the step's costs, the cuts snapped).
    rng = np.random.default_rng(0)
    mixed = iter([[Entry(Request(i, [1], 1), [1], 2000 + j, "decode") for i in range(300)]
                  + [Entry(Request(300 + i, [1], 1), [1] * int(n), int(start), "prefill")
                     for i, (n, start) in enumerate(zip(rng.integers(100, 1500, 2), rng.integers(0, 2000, 2)))]
                  for j in range(repeats + 8)])
    for _ in range(8):  # (the buckets these steps reach, searched once)
        kept.split(next(mixed))
    ms = wall_median_ms(lambda: kept.split(next(mixed)), repeats)
    rows.append(['AutoSplit.split (serving "auto")',
                 f"{decode_layers} Llama-like layers' stage program, 300 decodes and 2 prompt chunks: a new shape, "
                 "its bucket searched before", f"{ms:.2f}"])
    return rows


def serving_program(layers: int, lm_head: bool = False) -> StageProgram:
    """A stage program of Llama-3-8B-like layers in bf16 for the cost model alone (its stages
    run nothing): each dense stage's GEMMs (the LM head's too with `lm_head`), each attention
    stage's cut (32 query heads, 8 KV heads of 128)."""
    d, kv, ffn, e = 4096, 1024, 14336, 2

    def gemm(name: str, n: int, k: int) -> search.OpProfile:
        return search.OpProfile(name, "compute", 2.0 * n * k, e * (n + k), float(e * n * k))

    stages, costs = [], []
    for i in range(layers + 1):
        stages.append(Stage(2 * i, "dense", []))
        costs.append(([gemm("o", d, d), gemm("gate_up", 2 * ffn, d), gemm("down", d, ffn)] if i else [])
                     + ([gemm("qkv", d + 2 * kv, d)] if i < layers else [gemm("lm_head", 128256, d)] if lm_head else []))
        if i < layers:
            cut = AttentionCut(i, f"attention_{i}", HQ, HKV, 128, 128 ** -0.5, torch.bfloat16, 2 * e * (d + kv))
            stages.append(Stage(2 * i + 1, "attention", [], cut=cut))
    return StageProgram(stages, [], 2, dense_costs=costs)


def _llama_layer(context: int) -> list[search.OpProfile]:
    """A Llama-3-8B decoder layer's ops in bf16 (GEMMs read their weights once per launch; decode
    attention reads `context` positions of 8 KV heads x 128 per token)."""
    d, kv, ffn = 4096, 1024, 14336
    return [
        search.OpProfile("qkv", "compute", 2 * d * (d + 2 * kv), 2 * (2 * d + 2 * kv), 2 * d * (d + 2 * kv)),
        search.OpProfile("attention", "memory", 4 * context * d, context * 2 * kv * 2),
        search.OpProfile("o", "compute", 2 * d * d, 4 * d, 2 * d * d),
        search.OpProfile("gate_up", "compute", 4 * d * ffn, 2 * (d + 2 * ffn), 4 * d * ffn),
        search.OpProfile("down", "compute", 2 * ffn * d, 2 * (d + ffn), 2 * ffn * d),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--decode-layers", type=int, default=32)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.decode_layers < 1:
        parser.error(f"--decode-layers must be >= 1, got {args.decode_layers}")
    body = markdown_table(["call", "input", "median ms"], measure(args.repeats, args.decode_layers))
    print(body)
    if not args.no_write:
        env = environment()
        print(f"wrote {write_results('host', 'Host-side planning time', env, body)}")


if __name__ == "__main__":
    main()
