"""Demo: compile a small-config Hugging Face model with `backend="tileflow"` and show the report.

Builds the architecture from a small config with random weights (no download), compiles it once
with dynamic shapes, runs several sequence lengths, checks each against eager, and prints what
the compiler did. Exits non-zero if any output differs from eager.

    python examples/demo.py [--model llama|qwen2|mistral|mixtral|gpt2] [--debug-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import tileflow

VOCAB = 256
POSITIONS = 512  # every model's positions (GPT-2's are learned: a longer sequence has none)
TOLERANCE = 1e-4


def build_model(name: str) -> torch.nn.Module:
    """A small random-weight causal LM of the given architecture."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=POSITIONS)
    if name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif name == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif name == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=16))
    elif name == "mixtral":
        model = transformers.MixtralForCausalLM(
            transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
        )
    elif name == "gpt2":
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=128, n_layer=2, n_head=4,
                                    bos_token_id=0, eos_token_id=0)
        )
    else:
        raise SystemExit(f"unknown model {name!r}; choose llama, qwen2, mistral, mixtral or gpt2")
    return model.eval()


def parse_seq_lens(parser: argparse.ArgumentParser, text: str, least: int, most: int) -> list[int]:
    """`--seq-lens` as ints from `least` to `most`: bad values fail here naming the flag, not as a
    traceback from inside torch.compile."""
    try:
        seq_lens = [int(s) for s in text.split(",")]
    except ValueError:
        parser.error(f"--seq-lens must be comma-separated integers, got {text!r}")
    if min(seq_lens) < least:
        parser.error(f"--seq-lens must be >= {least}, got {text!r}")
    if max(seq_lens) > most:
        parser.error(f"--seq-lens must be <= {most} (the models' positions), got {text!r}")
    return seq_lens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama")
    parser.add_argument("--seq-lens", default="5,16,33,64,100", help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--debug-dir", default=None, help="write each pass's before/after graphs here")
    args = parser.parse_args()
    seq_lens = parse_seq_lens(parser, args.seq_lens, 1, POSITIONS)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")

    torch.manual_seed(0)
    model = build_model(args.model)
    options = {"debug_dir": args.debug_dir} if args.debug_dir else {}
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend(options, report=report), dynamic=True)

    print(f"tileflow {tileflow.__version__} on torch {torch.__version__}: {args.model}, batch {args.batch}")
    worst, failed = 0.0, False
    with torch.no_grad():
        for seq_len in seq_lens:
            ids = torch.randint(0, VOCAB, (args.batch, seq_len))
            start = time.perf_counter()
            got = compiled(ids, use_cache=False).logits
            took = time.perf_counter() - start
            want = model(ids, use_cache=False).logits
            diff = (got - want).abs().max().item()
            worst = max(worst, diff)
            # `not <=`: a NaN difference fails too (`max` keeps the old worst over NaN, and
            # NaN > tolerance is False).
            failed |= not diff <= TOLERANCE
            print(f"  seq_len {seq_len:4d}: max |tileflow - eager| = {diff:.2e}  ({took * 1e3:.0f} ms)")
    print(f"compiled graphs: {len(report.graphs)} for {len(seq_lens)} sequence lengths")
    print()
    print(report)
    if failed:
        print(f"FAIL: outputs differ from eager by more than {TOLERANCE:.0e} (worst {worst:.2e}; NaN counts as differing)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
