"""A compiled step's host time, with no GPU: a Llama compiled with `backend="tileflow"` for the
Triton target, each of its kernel launches stubbed out (the Triton interpreter's `run` made a
counter), so what is timed is tileflow's Python, its ops' dispatch and the residual graph (ATen
or Inductor C++ on the CPU), against eager transformers' whole step on the same CPU.

For finding host-side regressions between commits on any machine (run it in two checkouts): a
GPU step is host-bound when this time, on the GPU machine's CPU, reaches the step's device
time. The residual's own arithmetic runs for real here (norms, rotary, the mask's ranges), so a
larger `--tokens` also times CPU math a GPU does in microseconds. The launches per step are
counted exactly, for the plans of this CPU (the cost model's; a GPU's plans may add split-K
reduce and stream-K fixup launches).

    python bench/host_step.py [--tokens 256,1024] [--layers 2] [--hidden 256] [--residual eager|inductor] [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import sys

# Before Triton is imported: kernels go through the interpreter, whose `run` is stubbed below.
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/common.py


def stub_launches() -> dict[str, int]:
    """Make every Triton kernel launch a no-op that counts itself; returns the counter."""
    import triton.runtime.interpreter as interpreter

    counter = {"launches": 0}

    def run(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 -- the interpreter's signature
        counter["launches"] += 1

    interpreter.InterpretedFunction.run = run
    return counter


def measure(tokens: list[int], *, layers: int, hidden: int, residual: str, repeats: int) -> list[list[str]]:
    """One row per token count: tileflow's host ms per step, eager's ms, launches per step."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import tileflow
    from common import wall_median_ms

    counter = stub_launches()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 128),
                         vocab_size=1024, max_position_embeddings=max(8192, max(tokens)))
    model = LlamaForCausalLM(config).eval()
    backend = tileflow.TileflowBackend({"target": "triton", "residual": residual})
    compiled = torch.compile(model, backend=backend, dynamic=True)
    rows = []
    with torch.no_grad():
        for t in tokens:
            ids = torch.randint(0, config.vocab_size, (1, t))
            compiled(ids, use_cache=False)  # compiles (the first count) and builds this count's kernels
            before = counter["launches"]
            compiled(ids, use_cache=False)
            launches = counter["launches"] - before
            ms = wall_median_ms(lambda ids=ids: compiled(ids, use_cache=False), repeats)
            eager = wall_median_ms(lambda ids=ids: model(ids, use_cache=False), repeats)
            rows.append([str(t), f"{ms:.2f}", f"{eager:.2f}", str(launches)])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="256,1024", help="token counts per step, comma-separated")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (a multiple of 128)")
    parser.add_argument("--residual", choices=("eager", "inductor"), default="eager",
                        help="how the graph around tileflow's ops runs (inductor: as on a GPU, C++ here)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        parser.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
    if not tokens or min(tokens) < 1:
        parser.error(f"--tokens must be positive, got {args.tokens!r}")
    if args.layers < 1 or args.repeats < 1 or args.hidden < 128 or args.hidden % 128:
        parser.error("--layers and --repeats must be >= 1, --hidden a positive multiple of 128")
    from common import markdown_table

    rows = measure(tokens, layers=args.layers, hidden=args.hidden, residual=args.residual, repeats=args.repeats)
    print(markdown_table(["tokens", "tileflow host ms (launches stubbed)", "eager ms", "launches per step"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
