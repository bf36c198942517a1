"""Decode a small-config Llama with attention on other ranks (Lamina's disaggregation).

    torchrun --nproc-per-node 3 examples/disaggregate.py --check

Rank 0 runs the dense stages (and leads); the other ranks are attention workers, each owning a
KV-head shard of the paged cache. Batches of sequences with different prompt lengths are
prefilled, then decoded greedily, two batches in flight (staggered); mid-run a sequence finishes
and a new one joins with its prompt (chunked prefill mixed with decode). `--check` runs the same
tokens through the eager transformers model with a per-sequence KV cache on rank 0 and compares
every step's logits; the script exits 1 on any mismatch, 2 when a peer fails. `--arch gemma2`
decodes a Gemma-2 instead: every other layer has a 5-token sliding window and every layer soft-
caps its scores; `--arch gpt_oss` a gpt-oss, with windows and attention sinks; `--arch mistral`
a Mistral, whose every layer slides a 5-token window, so the attention workers give each
sequence's blocks behind it back as it decodes; `--arch llama4` a Llama 4, whose RoPE layers
attend in chunks of 4 positions (its NoPE layers see the whole sequence). The attention workers
apply them from what the cuts carry. With `--sliding-blocks N`, Gemma-2's and gpt-oss's sliding
layers keep their blocks apart, N per attention worker, given back behind the window (the full
layers get the memory left, as more blocks).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import torch

LLAMA4_CHUNK = 4  # `--arch llama4`'s attention chunk (positions): `--block-size` must divide it


def build_model(gqa: int, layers: int, seed: int, arch: str = "llama") -> torch.nn.Module:
    """The same random-weight model on every rank (same seed): a Llama, a Gemma-2 with a sliding
    window shorter than the prompts and a soft-cap that bends its scores, a gpt-oss with such
    windows and random attention sinks, a Mistral with such a window on every layer, or a Llama 4
    whose every other layer attends in chunks of 4 positions (a mixture-of-experts model)."""
    import transformers

    kv_heads = 4 if gqa == 1 else 2
    shape = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": layers,
             "num_attention_heads": kv_heads * gqa, "num_key_value_heads": kv_heads,
             "head_dim": 64 // (kv_heads * gqa), "max_position_embeddings": 512}
    torch.manual_seed(seed)
    if arch == "gemma2":
        cfg = transformers.Gemma2Config(**shape, sliding_window=5, attn_logit_softcapping=0.5, initializer_range=0.2)
        return transformers.Gemma2ForCausalLM(cfg).eval()
    if arch == "llama4":
        cfg = transformers.Llama4TextConfig(**shape, intermediate_size_mlp=128, num_local_experts=2,
                                            num_experts_per_tok=1, attention_chunk_size=LLAMA4_CHUNK,
                                            no_rope_layers=[1 - i % 2 for i in range(layers)])
        return transformers.Llama4ForCausalLM(cfg).eval()
    if arch == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**shape, sliding_window=5)).eval()
    if arch == "gpt_oss":
        cfg = transformers.GptOssConfig(**shape, sliding_window=5, num_local_experts=4, num_experts_per_tok=2)
        model = transformers.GptOssForCausalLM(cfg).eval()
        with torch.no_grad():  # they start at zero: random ones, to matter
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0)
        return model
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).eval()


class Reference:
    """The single-process run: the eager model (SDPA; transformers' own attention for models with
    soft-caps or sinks, which SDPA lacks) with a transformers KV cache per sequence."""

    def __init__(self, model: torch.nn.Module) -> None:
        import copy

        import transformers

        self.model = copy.deepcopy(model)
        beyond_sdpa = self.model.config.model_type in ("gemma2", "gpt_oss")
        self.model.config._attn_implementation = "eager" if beyond_sdpa else "sdpa"
        self.caches: dict[int, transformers.DynamicCache] = {}
        self._cache_type = transformers.DynamicCache

    @torch.no_grad()
    def logits(self, seq: int, tokens: list[int]) -> torch.Tensor:
        cache = self.caches.setdefault(seq, self._cache_type(config=self.model.config))
        out = self.model(input_ids=torch.tensor([tokens]), past_key_values=cache, use_cache=True)
        return out.logits[0]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-workers", type=int, default=1, help="model replicas (ranks 0 … m − 1); the rest attend")
    p.add_argument("--gqa", type=int, default=4, choices=(1, 4), help="query heads per KV head")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--arch", choices=("llama", "gemma2", "gpt_oss", "mistral", "llama4"), default="llama",
                   help="gemma2: sliding-window layers and soft-capped scores; gpt_oss: windows and attention sinks; "
                        "mistral: a window on every layer (blocks behind it go back); llama4: chunked attention")
    p.add_argument("--steps", type=int, default=8, help="decode steps after the prefill")
    p.add_argument("--batches", type=int, default=2, help="batches in flight (>= 2 staggers them)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a receive within a step waits before failing")
    p.add_argument("--idle-timeout", type=float, default=300.0,
                   help="seconds a worker waits for the next step (model loading and tracing included)")
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--num-blocks", type=int, default=256, help="KV blocks per attention worker")
    p.add_argument("--sliding-blocks", type=int, default=None,
                   help="gemma2, gpt_oss: the sliding layers' own blocks per attention worker, given back behind the "
                        "window (the full layers get the memory left as more blocks); default: one pool")
    p.add_argument("--check", action="store_true", help="compare every step's logits with a single-process run")
    p.add_argument("--tolerance", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-delay", type=float, default=0.0, help="sleep between steps (for failure tests)")
    p.add_argument("--pid-dir", type=Path, default=None, help="write rank<N>.pid files here (for failure tests)")
    args = p.parse_args()
    # Bad sizes fail here naming the flag (on every rank, before any process group), not as a run
    # that decodes nothing (--batches 0) or a traceback from inside the workers.
    lows = {"model_workers": 1, "layers": 1, "steps": 0, "batches": 1, "block_size": 1, "num_blocks": 1}
    for name, low in lows.items():
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    for name in ("timeout", "idle_timeout"):  # 0 failed in torch's store as a socket timeout of 0ms
        if not 0 < getattr(args, name) < float("inf"):
            p.error(f"--{name.replace('_', '-')} must be a positive number of seconds, got {getattr(args, name)}")
    # Both failed only after the model was built and traced: a traceback from inside the model
    # worker on rank 0 (the chunk's, naming no flag), or silently nothing (--sliding-blocks with a
    # model whose layers all slide or none does: one KV group, the flag ignored).
    if args.arch == "llama4" and LLAMA4_CHUNK % args.block_size:
        p.error(f"--block-size must divide Llama 4's attention chunk of {LLAMA4_CHUNK} positions (1, 2 or 4), "
                f"got {args.block_size}")
    if args.sliding_blocks is not None:
        if args.arch not in ("gemma2", "gpt_oss"):
            p.error(f"--sliding-blocks applies to --arch gemma2 or gpt_oss only (the models mixing sliding and full "
                    f"layers), got --arch {args.arch}")
        if args.sliding_blocks < 1:
            p.error(f"--sliding-blocks must be >= 1, got {args.sliding_blocks}")
    if "RANK" not in os.environ:
        p.error("run it under torchrun: torchrun --nproc-per-node 3 examples/disaggregate.py --check")
    return args


def main() -> int:
    args = parse_args()
    from tileflow.distributed import (
        AttentionWorker, Batch, CausalLMStep, ModelWorker, PeerError, abort_run, build_stage_program,
        init_distributed,
    )

    layout, transport = init_distributed(args.timeout, args.model_workers)
    rank = transport.rank
    role = layout.role(rank)
    if args.pid_dir is not None:
        args.pid_dir.mkdir(parents=True, exist_ok=True)
        (args.pid_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    try:
        if role == "attention":
            AttentionWorker(layout, transport, idle_timeout_s=args.idle_timeout).serve()
            return 0
        model = build_model(args.gqa, args.layers, args.seed, args.arch)
        example = (torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None])
        program = build_stage_program(CausalLMStep(model), example, max_tokens=256)
        worker = ModelWorker(
            program, layout, transport, block_size=args.block_size, num_blocks=args.num_blocks,
            idle_timeout_s=args.idle_timeout, sliding_blocks=args.sliding_blocks,
        )
        if not worker.is_leader:
            worker.serve()
            return 0
        return lead(args, worker, model, Batch)
    except Exception as exc:
        # The leader tells the others at once (they would otherwise wait out their timeout); then
        # leave without process-group teardown, which could wait on peers that are gone.
        if not isinstance(exc, PeerError):
            traceback.print_exc()
        print(f"[rank {rank} {role}] error: {exc}", file=sys.stderr, flush=True)
        if rank == 0:
            abort_run(transport, layout, f"rank 0 failed: {exc}")
        else:
            try:  # deliver a failure report already queued (an attention worker's, say)
                transport.flush(2.0)
            except PeerError:
                pass
        sys.stdout.flush()
        os._exit(2 if isinstance(exc, PeerError) else 1)


def lead(args: argparse.Namespace, worker, model: torch.nn.Module, Batch) -> int:
    """Rank 0: schedule sequences into batches, run the steps, check against the reference."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    # Batches of different sizes, sequences of different prompt lengths.
    groups = [list(range(10 * b, 10 * b + 2 + b % 2)) for b in range(args.batches)]
    pending: dict[int, list[int]] = {
        s: torch.randint(0, 128, (int(torch.randint(2, 12, (1,), generator=gen)),), generator=gen).tolist()
        for g in groups for s in g
    }
    lengths: dict[int, int] = {}
    reference = Reference(model) if args.check else None
    worst = 0.0
    worker.start()
    for step in range(args.steps + 1):
        if step == 3:  # a sequence joins mid-run: its prompt is prefilled beside the others' decode
            new = 10 * args.batches + 1
            groups[-1].append(new)
            pending[new] = torch.randint(0, 128, (7,), generator=gen).tolist()
        if step == 5:  # and one finishes: its blocks go back to the attention workers
            done = groups[0].pop(0)
            worker.release([done])
        batches = []
        for group in groups:
            ids, pos, q_lens, starts = [], [], [], []
            for s in group:
                toks = pending[s]
                start = lengths.get(s, 0)
                ids += toks
                pos += range(start, start + len(toks))
                q_lens.append(len(toks))
                starts.append(start)
            batches.append(Batch([torch.tensor([ids]), torch.tensor([pos])], list(group), q_lens, starts))
        outputs = worker.step(batches)
        for group, batch, (logits,) in zip(groups, batches, outputs):
            row = 0
            for s, n in zip(group, batch.q_lens):
                mine = logits[0, row : row + n]
                if reference is not None:
                    diff = (mine - reference.logits(s, pending[s])).abs().max().item()
                    worst = max(worst, diff)
                    if not diff <= args.tolerance:  # (a NaN difference, NaN logits, is a mismatch too)
                        print(f"MISMATCH step {step} sequence {s}: max |diff| {diff:.3e}", flush=True)
                        worker.shutdown()
                        return 1
                lengths[s] = lengths.get(s, 0) + n
                pending[s] = [int(mine[-1].argmax())]
                row += n
        print(f"step {step}: {sum(b.tokens for b in batches)} tokens in {len(batches)} batches", flush=True)
        if args.step_delay:
            time.sleep(args.step_delay)
    worker.shutdown()
    if reference is not None:
        print(f"check passed: {args.steps + 1} steps, max |logits diff| {worst:.3e} <= {args.tolerance:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
