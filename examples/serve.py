"""Serve a small-config Llama, Mistral or Llama 4 (random weights) with continuous batching,
chunked prefill and speculative verify over a paged KV cache, and print the serving metrics.

    python examples/serve.py [--draft 3] [--requests 12] [--nano-batches 2|auto] [--check]
    python examples/serve.py --arch mistral --window 8 --blocks 10 --check
    python examples/serve.py --arch llama4 --chunk 16 --check
    python examples/serve.py --temperature 0.8 --top-p 0.95 --check

Mistral slides a window over every layer, so each request holds only the KV blocks its window
and its step need: 10 blocks of 8 tokens serve prompts of up to 75 tokens (and their 24 new
ones) beside each other. Llama 4 (a mixture of experts) attends in chunks of `--chunk`
positions on its RoPE layers, its NoPE layer over the whole sequence.

The model's step is compiled by tileflow's passes (padded GEMMs, meta-attention, cut at its
attention ops); each step packs decode/verify tokens first, then prompt chunks, up to the token
budget. `--check` compares every request's tokens with eager transformers greedy generation (with
`--temperature` > 0, with the eager model's draws under each request's seed) and exits 1 on any
difference.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings

import torch


def _nano_batches(value: str) -> int | str:
    """--nano-batches: a count, or "auto"."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a count or 'auto', got {value!r}") from None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("llama", "mistral", "llama4"), default="llama")
    p.add_argument("--window", type=int, default=None, help="Mistral's sliding window (keys; default 8)")
    p.add_argument("--chunk", type=int, default=None, help="Llama 4's attention chunk (positions; a multiple of 8; default 16)")
    p.add_argument("--blocks", type=int, default=512, help="KV cache blocks of 8 tokens")
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--draft", type=int, default=3, help="drafted tokens verified per step (0: no speculation)")
    p.add_argument("--budget", type=int, default=64, help="tokens per step")
    p.add_argument("--slots", type=int, default=6, help="requests decoding at once")
    p.add_argument("--nano-batches", type=_nano_batches, default=1,
                   help="nano-batches per step, each on its own stream (1: off; auto: where the cost model says a "
                        "split wins, on a GPU, on its streams: dense stages on one, attention on another)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sample, each request with its seed")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens reaching this mass")
    p.add_argument("--min-p", type=float, default=0.0, help="sample among tokens at least this share as likely as the best")
    p.add_argument("--check", action="store_true", help="compare with eager generation")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    # Each shape flag belongs to one architecture: given with another, it would be silently ignored.
    for name, arch, default in (("window", "mistral", 8), ("chunk", "llama4", 16)):
        if getattr(args, name) is None:
            setattr(args, name, default)
        elif args.arch != arch:
            p.error(f"--{name} applies to --arch {arch} only, got --arch {args.arch}")
    # Bad values fail here naming the flag, not as a traceback from inside the engine or export.
    # --budget: the step export needs a token range of at least 2 (a size-1 dim is specialized).
    lows = {"requests": 1, "new_tokens": 1, "budget": 2, "slots": 1, "blocks": 1, "nano_batches": 1, "draft": 0,
            "window": 1, "chunk": 1}
    for name, low in lows.items():
        if getattr(args, name) != "auto" and getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    # Request i samples with seed (seed * 1000 + i) mod 2**63, a SamplingParams seed; torch's
    # generators take the seed itself. Out of range, it failed after the model was built, naming
    # a seed the user never gave (seed * 1000).
    if not 0 <= args.seed < 2**63:
        p.error(f"--seed must be in [0, 2**63), got {args.seed}")
    # The engine's own checks, here so that they name the flags (the example's blocks hold 8 tokens).
    if args.budget <= args.slots * (1 + args.draft):
        p.error(f"--budget must be above --slots * (1 + --draft) = {args.slots * (1 + args.draft)} (each step gives "
                f"every running request its decode slot and drafts first), got {args.budget}")
    if args.arch == "llama4" and args.chunk % 8:
        p.error(f"--chunk must be a multiple of the KV block size 8, got {args.chunk}")
    from tileflow.serving import SamplingParams

    try:
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p)
    except ValueError as exc:
        p.error(str(exc))
    # A greedy request ignores the filters: without a temperature they were silently dropped
    # (`--top-p 0.95 --check` served and checked greedy decoding).
    if sampling.greedy and (args.top_k, args.top_p, args.min_p) != (0, 1.0, 0.0):
        p.error(f"--top-k, --top-p and --min-p filter sampled tokens, but --temperature {args.temperature:g} is greedy "
                f"decoding: give --temperature > 0 with them")
    # torch.export's pytree deprecation notes (torch's own use, nothing the example can change).
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)

    import transformers

    from tileflow.distributed import CausalLMStep, build_stage_program
    from tileflow.serving import Request, SamplingParams, ServingEngine, generate_reference

    torch.manual_seed(args.seed)
    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512)
    if args.arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=args.window, **shape))
    elif args.arch == "llama4":
        config = transformers.Llama4TextConfig(**shape, head_dim=16, intermediate_size_mlp=128, num_local_experts=4,
                                               num_experts_per_tok=1, attention_chunk_size=args.chunk,
                                               no_rope_layers=[1, 0])
        model = transformers.Llama4ForCausalLM(config)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    model.eval()
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = "sdpa"
    example = min(4, args.budget)  # the example step's tokens: within the budget, the program's range
    program = build_stage_program(CausalLMStep(model), (torch.zeros(1, example, dtype=torch.long),
                                                        torch.arange(example)[None]),
                                  max_tokens=args.budget)
    gen = torch.Generator().manual_seed(args.seed + 1)
    system = torch.randint(0, 128, (16,), generator=gen).tolist()  # a shared prefix, reused from the cache
    prompts = [
        system + torch.randint(0, 128, (int(torch.randint(1, 60, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(args.requests)
    ]
    eos = model.generation_config.eos_token_id  # requests stop after it, as `generate` does
    stops = [eos] if isinstance(eos, int) else eos or []
    requests = [Request(i, prompt, args.new_tokens, stop_tokens=stops,
                        sampling=SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p,
                                                seed=(args.seed * 1000 + i) % 2**63))
                for i, prompt in enumerate(prompts)]
    engine = ServingEngine(program, token_budget=args.budget, decode_slots=args.slots, max_draft=args.draft,
                           block_size=8, num_blocks=args.blocks, nano_batches=args.nano_batches)
    for r in requests:
        try:
            engine.add(r)
        except ValueError as exc:  # the random prompts' lengths are known only now
            p.error(f"--blocks {args.blocks} is too few for these requests: {exc}")
    metrics = engine.run(progress=True)
    print(json.dumps({k: round(v, 4) for k, v in metrics.summary().items()}, indent=1))
    if args.check:
        for r in requests:
            if r.sampling.greedy:
                ids = torch.tensor([r.prompt])
                with torch.no_grad():
                    out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                             do_sample=False, pad_token_id=0)
                want = out[0, len(r.prompt):].tolist()
            else:  # the eager model's draws, one token at a time, keyed by the request's seed
                want = generate_reference(reference, r.prompt, args.new_tokens, r.sampling, r.stop_tokens)
            if want != r.tokens[len(r.prompt):]:
                print(f"MISMATCH request {r.id}", file=sys.stderr)
                return 1
        mode = "greedy generation" if all(r.sampling.greedy for r in requests) else "sampling with the same seeds"
        print(f"check passed: {len(requests)} requests equal eager {mode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
