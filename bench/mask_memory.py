"""Peak memory of one compiled forward whose attention mask tileflow may replace by its causal rule.

    python bench/mask_memory.py --tokens 4096 --attention eager --use-cache
    python bench/mask_memory.py --tokens 4096 --attention sdpa --left-padded
    python bench/mask_memory.py --tokens 4096 --model bloom --left-padded
    python bench/mask_memory.py --tokens 4096 --model falcon --left-padded
    PYTHONPATH=.base/597e1af python bench/mask_memory.py --tokens 4096 ...   # the code before

Builds a 2-layer Llama (hidden 64, random weights; `--model bloom`: BLOOM, whose own attention
code counts its ALiBi positions along a padding mask; `--model falcon`: Falcon with ALiBi, which
folds those positions into the mask it hands SDPA), compiles it with `backend="tileflow"` at 64
tokens, then resets the process's resident high-water mark (`/proc/self/clear_refs`, Linux) and
runs two forwards at `--tokens`: prints the peak resident memory over the memory before them, the
two calls' times and the report's `mask_as_rule` / `key_mask` / `empty_rows_average` /
`mask_as_float32_bias` counts. `--left-padded` calls it on a batch of two with an attention_mask,
the second row left-padded by half the tokens (transformers then joins a padding term to its
mask; with eager attention, rows that see no key average every key). On a CPU the memory is the
measure (a float32 [S, S] mask bias is 64 MiB a batch row at 4096 tokens); the times depend on
what else the machine runs. Linux only.
"""

from __future__ import annotations

import argparse
import time

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1])


def main() -> None:
    """Parse the flags, run the measurement, print one line."""
    import transformers

    import tileflow

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the measured forwards")
    parser.add_argument("--attention", choices=["eager", "sdpa"], default="eager",
                        help="attn_implementation (Llama; BLOOM's attention is its own, Falcon's SDPA)")
    parser.add_argument("--model", choices=["llama", "bloom", "falcon"], default="llama", help="the architecture")
    parser.add_argument("--use-cache", action="store_true", help="call with use_cache=True (default: False)")
    parser.add_argument("--left-padded", action="store_true",
                        help="a batch of two with an attention_mask, the second row left-padded by half the tokens")
    args = parser.parse_args()
    if args.tokens < 2:
        parser.error(f"--tokens must be at least 2, got {args.tokens}")
    torch.manual_seed(0)
    if args.model == "bloom":
        model = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2,
                                                                       n_head=4)).eval()
    elif args.model == "falcon":
        model = transformers.FalconForCausalLM(transformers.FalconConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True,
            new_decoder_architecture=False, multi_query=True)).eval()
    else:
        config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=max(args.tokens, 64))
        config._attn_implementation = args.attention
        model = transformers.LlamaForCausalLM(config).eval()
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend(report=report), dynamic=True)

    def inputs(tokens: int) -> dict[str, torch.Tensor]:
        if not args.left_padded:
            return {"input_ids": torch.randint(0, 128, (1, tokens))}
        mask = torch.ones(2, tokens, dtype=torch.long)
        mask[1, :tokens // 2] = 0
        return {"input_ids": torch.randint(0, 128, (2, tokens)), "attention_mask": mask}

    with torch.no_grad():
        compiled(**inputs(64), use_cache=args.use_cache)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current resident size
        before = _status_kib("VmRSS")
        times = []
        for _ in range(2):
            measured = inputs(args.tokens)
            start = time.perf_counter()
            compiled(**measured, use_cache=args.use_cache)
            times.append((time.perf_counter() - start) * 1e3)
        peak = _status_kib("VmHWM")
    rewrites = report.rewrites
    batch = "left-padded batch of 2" if args.left_padded else "batch of 1"
    what = {"llama": args.attention, "bloom": "own attention", "falcon": "sdpa with ALiBi"}[args.model]
    print(f"{args.model}, tokens {args.tokens}, {what}, use_cache={args.use_cache}, {batch}: peak "
          f"{(peak - before) / 1024:.0f} MiB over the start; calls {times[0]:.0f} ms, {times[1]:.0f} ms; "
          f"mask_as_rule {rewrites.get('mask_as_rule', 0)}, key_mask {rewrites.get('key_mask', 0)}, "
          f"empty_rows_average {rewrites.get('empty_rows_average', 0)}, "
          f"mask_as_float32_bias {rewrites.get('mask_as_float32_bias', 0)}, "
          f"meta_attention {rewrites.get('meta_attention', 0)}, product_bias {rewrites.get('product_bias', 0)}, "
          f"key_bias {rewrites.get('key_bias', 0)} "
          f"(tileflow {tileflow.__file__})")


if __name__ == "__main__":
    main()
